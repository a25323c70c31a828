"""Speed of one ProtoNet training episode: metaxfer vs easyfsl 1.5.0, alternating in one process.

Episode: 60-way 5-shot 5-query (600 images of 1x28x28), Conv4-64 backbone,
forward + backward + Adam step. easyfsl's PrototypicalNetworks gets the same
Conv4 architecture (stock PyTorch modules, the paper's layer order) with the
same initial weights. Both sides run after ``metaxfer.runtime.tune_allocator()``.

The record also holds a lower bound: the conv/linear FLOPs of a step (forward
+ backward, counted from the layers' shapes) divided by this CPU's float32
GEMM rate, measured between the steps of the same run.

Run (after ``bash benchmarks/setup_peers.sh``):

    .venv-bench/bin/python benchmarks/speed_protonet.py --rounds 20
    .venv-bench/bin/python benchmarks/speed_protonet.py --rounds 20 --ablation --memory --out bench-out/protonet.json

Prints a table, then the JSON record as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Before `import torch`: libgomp reads this once, when torch loads it. With the default (ACTIVE)
# policy, idle OpenMP threads spin, and on a machine whose cores are shared with other work a
# 2-thread step slowed down 3-6x here; PASSIVE cost ~3% on an idle machine. All variants share
# the process, so the comparison is fair either way; set OMP_WAIT_POLICY=ACTIVE to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
import torch
import torch.nn.functional as F

import metaxfer.runtime
from metaxfer.backbones import Conv4
from metaxfer.learners import ProtoNet
from metaxfer.tasks import Episode

VARIANTS = ("metaxfer", "easyfsl", "metaxfer+plain-conv4")


def make_episode(ways: int, shots: int, queries: int, seed: int) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(
        torch.rand(1, ways * shots, 1, 28, 28, generator=g),
        torch.arange(ways).repeat_interleave(shots)[None],
        torch.rand(1, ways * queries, 1, 28, 28, generator=g),
        torch.arange(ways).repeat_interleave(queries)[None],
    )


def build(variant: str, episode: Episode, seed: int, lr: float) -> tuple[Callable[[], float], torch.nn.Module, Callable[[], Any]]:
    """(step, backbone, forward-only call for FLOP counting) of one variant, from the same initial weights."""
    torch.manual_seed(seed)
    reference = Conv4(in_channels=1)  # the initial weights every variant starts from
    sx, sy, qx, qy = (t[0] for t in episode)

    if variant in ("metaxfer", "metaxfer+plain-conv4"):
        backbone = reference if variant == "metaxfer" else C.PlainConv4(in_channels=1)
        backbone.load_state_dict(reference.state_dict())
        learner = ProtoNet(backbone)
        opt = torch.optim.Adam(learner.parameters(), lr)

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            loss = learner.loss(episode)
            loss.backward()
            opt.step()
            return loss.item()

        return step, backbone, lambda: learner.loss(episode)

    if variant == "easyfsl":
        from easyfsl.methods import PrototypicalNetworks

        backbone = C.PlainConv4(in_channels=1)
        backbone.load_state_dict(reference.state_dict())
        model = PrototypicalNetworks(backbone)
        opt = torch.optim.Adam(model.parameters(), lr)

        def forward() -> torch.Tensor:
            # easyfsl's episodic training step (its README / notebooks): support pass, then query pass.
            model.process_support_set(sx, sy)
            return F.cross_entropy(model(qx), qy)

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            loss = forward()
            loss.backward()
            opt.step()
            return loss.item()

        return step, backbone, forward

    raise SystemExit(f"unknown variant {variant!r}; choose from {VARIANTS}")


def child_memory(args: argparse.Namespace) -> None:
    """One variant alone in this process: peak RSS of setup + a few steps (one JSON line)."""
    metaxfer.runtime.tune_allocator()
    C.set_threads(args.threads)
    episode = make_episode(args.ways, args.shots, args.queries, args.seed)
    step, _, _ = build(args.child_memory, episode, args.seed, args.lr)
    setup = C.rss_mb()
    for _ in range(args.warmup + 2):
        step()
    print(json.dumps({"variant": args.child_memory, "rss_after_setup_mb": round(setup, 1), "peak_rss_mb": round(C.peak_rss_mb(), 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per variant (alternating)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--ways", type=int, default=60)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--ablation", action="store_true", help="also time metaxfer's ProtoNet on the plain (paper-order, NCHW) Conv4")
    parser.add_argument("--memory", action="store_true", help="also measure each variant's peak RSS in its own subprocess")
    parser.add_argument("--out", default=None, help="also write the JSON record to this file")
    parser.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        return child_memory(args)

    metaxfer.runtime.tune_allocator()  # for every variant alike: they share this process
    C.set_threads(args.threads)
    env = C.environment(["metaxfer", "easyfsl", "torchvision", "numpy"])
    variants = ["metaxfer", "easyfsl"] + (["metaxfer+plain-conv4"] if args.ablation else [])
    episode = make_episode(args.ways, args.shots, args.queries, args.seed)
    built = {v: build(v, episode, args.seed, args.lr) for v in variants}
    flops = {v: C.conv_linear_flops(b[1], b[2]) for v, b in built.items()}
    first_loss = {v: b[0]() for v, b in built.items()}  # also the first warm-up step

    probe = C.GemmProbe()
    steps: dict[str, Callable[[], Any]] = {v: built[v][0] for v in variants}
    steps.update(probe.steps())
    times = C.alternate(steps, rounds=args.rounds, warmup=max(args.warmup - 1, 0))
    gemm = probe.rates(times)

    results: dict[str, Any] = {}
    for v in variants:
        s = C.summary(times[v])
        bound = flops[v]["total"] / (gemm["bound_gflops"] * 1e9)
        results[v] = {
            "seconds": s,
            "first_loss": first_loss[v],
            "conv_linear_gflop": flops[v]["total"] / 1e9,
            "flop_bound_seconds": bound,
            "times_bound": s["median"] / bound,
            "achieved_gflops": flops[v]["total"] / s["median"] / 1e9,
        }
    base = times["metaxfer"]
    for v in variants:
        results[v]["ratio_to_metaxfer"] = results[v]["seconds"]["median"] / results["metaxfer"]["seconds"]["median"]
        results[v]["paired_ratio_to_metaxfer"] = C.paired_ratio(times[v], base)

    if args.memory:
        extra = ["--ways", str(args.ways), "--shots", str(args.shots), "--queries", str(args.queries), "--seed", str(args.seed),
                 "--warmup", str(args.warmup)] + (["--threads", str(args.threads)] if args.threads else [])
        for v in variants:
            results[v]["memory"] = C.measure_in_subprocess(Path(__file__), v, extra)

    record = {
        "benchmark": "protonet_episode",
        "task": {"ways": args.ways, "shots": args.shots, "queries": args.queries, "image": [1, 28, 28],
                 "backbone": "Conv4-64", "optimizer": f"Adam(lr={args.lr})", "rounds": args.rounds, "warmup": args.warmup,
                 "seed": args.seed},
        "gemm": gemm,
        "results": results,
        "environment": env,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    rows = []
    for v in variants:
        r = results[v]
        mem = r.get("memory", {})
        rows.append([
            v,
            f"{r['seconds']['median']:.3f}",
            f"{r['seconds']['p25']:.3f}-{r['seconds']['p75']:.3f}",
            f"{r['ratio_to_metaxfer']:.2f}x",
            f"{r['paired_ratio_to_metaxfer']:.2f}x",
            f"{r['times_bound']:.1f}x",
            f"{r['achieved_gflops']:.0f}",
            f"{mem['peak_rss_mb']:.0f}" if "peak_rss_mb" in mem else "-",
        ])
    human = (
        f"ProtoNet episode {args.ways}-way {args.shots}-shot {args.queries}-query, Conv4-64, fwd+bwd+Adam; "
        f"{args.rounds} alternating rounds; torch {env['torch']}, {env['torch_threads']} threads, {env['cpu_model']}, "
        f"load {env['loadavg_start'][0]:.1f}\n"
        f"FLOP bound: {results['metaxfer']['conv_linear_gflop']:.1f} GFLOP conv/linear fwd+bwd at {gemm['bound_gflops']:.0f} GFLOP/s "
        f"= {results['metaxfer']['flop_bound_seconds']:.3f} s (GEMM medians this run: oneDNN 1x1 conv "
        f"{gemm['onednn_conv1x1']['median_gflops']:.0f}, MKL mm {gemm['mkl_mm']['median_gflops']:.0f} GFLOP/s)\n\n"
        + C.table(rows, ["variant", "median s", "IQR s", "vs metaxfer", "paired", "x bound", "GFLOP/s", "peak RSS MB"])
    )
    C.emit(record, human, args.out)


if __name__ == "__main__":
    main()
