"""Speed of one Relation Networks training episode: metaxfer vs easyfsl 1.5.0, alternating in one process.

Episode: 5-way 1-shot with 19 queries per class (the paper's Omniglot training
episode; 100 images of 1x28x28), forward + backward + Adam step. Both sides use
the same embedding (metaxfer's ``relation_conv4``, the paper's feature-map Conv4:
64x5x5 maps for 28x28 inputs) from the same initial weights, the paper's MSE to
one-hot, and their own relation module: metaxfer's is the paper's (2 conv blocks
with max-pool, FC 64-8-1); easyfsl's ``default_relation_module`` is its
adaptation (adaptive max-pools, same channel counts). Class maps: sum over shots
(metaxfer, the paper) / mean (easyfsl); with 1 shot they are the same.

Run (after ``bash benchmarks/setup_peers.sh``):

    .venv-bench/bin/python benchmarks/speed_relation.py --rounds 20
    .venv-bench/bin/python benchmarks/speed_relation.py --rounds 20 --memory --out bench-out/relation.json

``metaxfer-pairs`` is metaxfer's learner with the relation module run on every concatenated
(class, query) pair, the paper's literal form, instead of the factored first convolution.

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

# Before `import torch` (see speed_protonet.py): idle OpenMP threads must not spin on a shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
import torch
import torch.nn.functional as F

import metaxfer.runtime
from metaxfer.backbones import create
from metaxfer.learners.registry import create_learner
from metaxfer.tasks import Episode

VARIANTS = ("metaxfer", "metaxfer-pairs", "easyfsl")


def concatenated_pairs(module: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The relation module scoring every concatenated (class, query) pair, as the paper draws it (and as
    metaxfer did before its first convolution was factored): the ablation of that factoring."""

    def forward(classes: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        q, ways = query.shape[0], classes.shape[0]
        pairs = torch.cat([classes.unsqueeze(0).expand(q, *classes.shape),
                           query.unsqueeze(1).expand(q, ways, *query.shape[1:])], 2)
        return module.pairs(pairs.flatten(0, 1)).view(q, ways)

    return forward


def make_episode(ways: int, shots: int, queries: int, seed: int) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(
        torch.rand(1, ways * shots, 1, 28, 28, generator=g),
        torch.arange(ways).repeat_interleave(shots)[None],
        torch.rand(1, ways * queries, 1, 28, 28, generator=g),
        torch.arange(ways).repeat_interleave(queries)[None],
    )


def build(variant: str, episode: Episode, args: argparse.Namespace) -> Callable[[], float]:
    """One training step (zero grads, loss, backward, Adam) of ``variant`` from the same embedding weights."""
    torch.manual_seed(args.seed)
    reference = create("relation_conv4", in_channels=1)
    ways = args.ways

    if variant in ("metaxfer", "metaxfer-pairs"):
        learner = create_learner("relation", reference, loss="mse")
        if variant == "metaxfer-pairs":
            learner.relation.forward = concatenated_pairs(learner.relation)
        opt = torch.optim.Adam(learner.parameters(), args.lr)

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            loss = learner.loss(episode)
            loss.backward()
            opt.step()
            return loss.item()

        return step

    if variant == "easyfsl":
        from easyfsl.methods import RelationNetworks

        backbone = create("relation_conv4", in_channels=1)
        backbone.load_state_dict(reference.state_dict())
        model = RelationNetworks(backbone, feature_dimension=64)
        opt = torch.optim.Adam(model.parameters(), args.lr)
        sx, sy, qx, qy = (t[0] for t in episode)
        target = F.one_hot(qy, ways).float()

        def step() -> float:
            # easyfsl's episodic training step: support pass, then query pass; MSE to one-hot as in its
            # Relation Networks notebook (the relation module ends with a sigmoid).
            opt.zero_grad(set_to_none=True)
            model.process_support_set(sx, sy)
            loss = F.mse_loss(model(qx), target)
            loss.backward()
            opt.step()
            return loss.item()

        return step

    raise SystemExit(f"unknown variant {variant!r}; choose from {VARIANTS}")


def child_memory(args: argparse.Namespace) -> None:
    """One variant alone in this process: peak RSS of setup + a few steps (one JSON line)."""
    metaxfer.runtime.tune_allocator()
    C.set_threads(args.threads)
    step = build(args.child_memory, make_episode(args.ways, args.shots, args.queries, args.seed), args)
    setup = C.rss_mb()
    for _ in range(args.warmup + 2):
        step()
    print(json.dumps({"variant": args.child_memory, "rss_after_setup_mb": round(setup, 1), "peak_rss_mb": round(C.peak_rss_mb(), 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per variant (alternating)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=19)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--memory", action="store_true", help="also measure each variant's peak RSS in its own subprocess")
    parser.add_argument("--out", default=None, help="also write the JSON record to this file")
    parser.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        return child_memory(args)

    metaxfer.runtime.tune_allocator()  # for every variant alike: they share this process
    C.set_threads(args.threads)
    env = C.environment(["metaxfer", "easyfsl", "torchvision", "numpy"])
    episode = make_episode(args.ways, args.shots, args.queries, args.seed)
    steps: dict[str, Callable[[], Any]] = {v: build(v, episode, args) for v in VARIANTS}
    first_loss = {v: step() for v, step in steps.items()}
    times = C.alternate(steps, rounds=args.rounds, warmup=max(args.warmup - 1, 0))

    results: dict[str, Any] = {v: {"seconds": C.summary(times[v]), "first_loss": first_loss[v]} for v in VARIANTS}
    for v in VARIANTS:
        results[v]["ratio_to_metaxfer"] = results[v]["seconds"]["median"] / results["metaxfer"]["seconds"]["median"]
        results[v]["paired_ratio_to_metaxfer"] = C.paired_ratio(times[v], times["metaxfer"])
    if args.memory:
        extra = ["--ways", str(args.ways), "--shots", str(args.shots), "--queries", str(args.queries), "--seed", str(args.seed),
                 "--warmup", str(args.warmup)] + (["--threads", str(args.threads)] if args.threads else [])
        for v in VARIANTS:
            results[v]["memory"] = C.measure_in_subprocess(Path(__file__), v, extra)

    record = {
        "benchmark": "relation_episode",
        "task": {"ways": args.ways, "shots": args.shots, "queries": args.queries, "image": [1, 28, 28],
                 "embedding": "relation_conv4 (64x5x5 maps)", "loss": "mse to one-hot", "optimizer": f"Adam(lr={args.lr})",
                 "rounds": args.rounds, "warmup": args.warmup, "seed": args.seed},
        "results": results,
        "environment": env,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    rows = []
    for v in VARIANTS:
        r = results[v]
        mem = r.get("memory", {})
        rows.append([v, f"{r['seconds']['median']:.4f}", f"{r['seconds']['p25']:.4f}-{r['seconds']['p75']:.4f}",
                     f"{r['ratio_to_metaxfer']:.2f}x", f"{r['paired_ratio_to_metaxfer']:.2f}x",
                     f"{mem['peak_rss_mb']:.0f}" if "peak_rss_mb" in mem else "-"])
    human = (
        f"Relation Networks episode {args.ways}-way {args.shots}-shot {args.queries}-query, fwd+bwd+Adam; "
        f"{args.rounds} alternating rounds; torch {env['torch']}, {env['torch_threads']} threads, {env['cpu_model']}, "
        f"load {env['loadavg_start'][0]:.1f}\n\n"
        + C.table(rows, ["variant", "median s", "IQR s", "vs metaxfer", "paired", "peak RSS MB"])
    )
    C.emit(record, human, args.out)


if __name__ == "__main__":
    main()
