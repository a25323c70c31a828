"""Speed and memory of one second-order MAML meta-iteration: metaxfer (vmap, loop) vs learn2learn 0.2.0.

Meta-iteration: 32 tasks of 5-way 1-shot with 15 queries per class
(1x28x28 inputs), Conv4-64 with a linear head, 1 inner step of lr 0.4,
second order, then one Adam step on the meta-gradient.

* metaxfer: ``MAML(Conv4(num_classes=5, norm="batchnorm_split"), 0.4, 1,
  vectorize=True)`` (tasks vectorised with ``torch.func.vmap``) and
  ``vectorize=False`` (a loop over tasks); one ``loss(batch).backward()``.
* learn2learn: ``l2l.algorithms.MAML(model, lr=0.4, first_order=False)``
  used as in its ``examples/vision/maml_omniglot.py``: per task
  ``clone()``, ``adapt()``, query loss ``backward()``, then gradients scaled
  by 1/32. ``model`` is the same architecture (stock modules, affine
  BatchNorm) from the same initial weights.

Timings alternate in one process, together with a float32 GEMM probe
(``_common.GemmProbe``) that gives this machine's attainable FLOP rate under the
same load; with the convolution/linear FLOPs of one meta-iteration (counted with
module hooks) that makes a lower bound on the time of *any* float32
implementation, and so an upper bound on the speed-up over learn2learn that one
can reach here. Peak memory (VmHWM) is measured for each variant alone in its
own subprocess. Everything runs after
``metaxfer.runtime.tune_allocator()``.

Note the BatchNorm policies differ (metaxfer normalises queries with the
support statistics, non-transductive; learn2learn's usual loop uses query
batch statistics), so first losses differ; the work per task is the same
(both run the support pass on 5 rows and the query pass on 75).

Run (after ``bash benchmarks/setup_peers.sh``):

    .venv-bench/bin/python benchmarks/speed_maml.py --rounds 10
    .venv-bench/bin/python benchmarks/speed_maml.py --rounds 10 --ablation --out bench-out/maml.json

The small model of the gradient-family issue, where per-task overhead dominates (Conv4 with 8 channels;
``metaxfer-vmap-chunked`` vectorises 8 tasks at a time to bound vmap's memory):

    .venv-bench/bin/python benchmarks/speed_maml.py --hidden 8 --threads 1 --rounds 20 \
        --variants learn2learn,metaxfer-loop,metaxfer-vmap,metaxfer-vmap-chunked --tasks-per-backward 8

The ablation of Conv4's fold of the support statistics into the query pass's convolutions (2026-12-06):

    .venv-bench/bin/python benchmarks/speed_maml.py --threads 1 --rounds 6 --tasks-per-backward 1 \
        --variants learn2learn,metaxfer-chunked,metaxfer-chunked+unfolded

Idle machine, both threads, with each variant's time inside the convolution kernels (profiled after the
timed rounds; set the OpenMP policy before Python starts, the script's PASSIVE default costs ~1.5x on an idle
machine here for this many small kernels):

    OMP_WAIT_POLICY=ACTIVE .venv-bench/bin/python benchmarks/speed_maml.py --threads 2 --rounds 8 \
        --tasks-per-backward 1 --variants learn2learn,metaxfer-chunked --conv-time

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
from metaxfer.tasks import Episode

VARIANTS = ("metaxfer-vmap", "metaxfer-loop", "metaxfer-chunked", "metaxfer-vmap-chunked", "learn2learn",
            "metaxfer-vmap+plain-conv4", "metaxfer-loop+plain-conv4")
# Any metaxfer variant + this suffix: the same, with Conv4's folding of the support statistics into the query
# pass's convolutions switched off (ConvBlock.fold_support_statistics), the ablation of that fold.
UNFOLDED = "+unfolded"


def make_batch(tasks: int, ways: int, shots: int, queries: int, seed: int) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(
        torch.rand(tasks, ways * shots, 1, 28, 28, generator=g),
        torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1),
        torch.rand(tasks, ways * queries, 1, 28, 28, generator=g),
        torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1),
    )


def build(variant: str, batch: Episode, args: argparse.Namespace) -> Callable[[], float]:
    """A meta-iteration of ``variant`` (zero grads, meta-loss, backward, Adam step) from the same initial weights."""
    torch.manual_seed(args.seed)
    reference = Conv4(hidden=args.hidden, num_classes=args.ways, norm="batchnorm_split")

    unfolded = variant.endswith(UNFOLDED)
    variant = variant.removesuffix(UNFOLDED)
    if variant.startswith("metaxfer"):
        from metaxfer.learners.gradient import MAML
        from metaxfer.train.fit import forward_backward

        if variant.endswith("+plain-conv4"):
            model: torch.nn.Module = C.PlainConv4(hidden=args.hidden, num_classes=args.ways, norm="batchnorm_split")
            model.load_state_dict(reference.state_dict())
        elif args.norm == "batchnorm":
            # Affine BatchNorm: metaxfer folds its scale and shift into the normalisation (one pass less).
            model = Conv4(hidden=args.hidden, num_classes=args.ways, norm="batchnorm")
            model.load_state_dict(C.split_to_affine_state(reference.state_dict()))
        else:
            model = reference
        if unfolded:
            for block in getattr(model, "features", []):
                block.fold_support_statistics = False
        learner = MAML(model, inner_lr=args.inner_lr, inner_steps=args.inner_steps, first_order=False,
                       vectorize=variant.startswith("metaxfer-vmap"))
        opt = torch.optim.Adam(learner.parameters(), args.lr)
        # metaxfer-chunked: the per-task loop, backpropagated every `tasks_per_backward` tasks (what
        # `train.tasks_per_backward` does in fit): same gradient, one chunk's graph alive at a time.
        # metaxfer-vmap-chunked: the same with each chunk's tasks vectorised (bounded memory for vmap).
        chunk = args.tasks_per_backward if variant in ("metaxfer-chunked", "metaxfer-vmap-chunked") else None

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            loss, _, _ = forward_backward(learner, batch, chunk)
            opt.step()
            return loss.item()

        return step

    if variant == "learn2learn":
        model = C.PlainConv4(hidden=args.hidden, num_classes=args.ways, norm="batchnorm")
        model.load_state_dict(C.split_to_affine_state(reference.state_dict()))
        return C.learn2learn_maml_step(model, batch, F.cross_entropy, args.inner_lr, args.inner_steps, args.lr)

    raise SystemExit(f"unknown variant {variant!r}; choose from {VARIANTS} (metaxfer ones also with {UNFOLDED!r})")


def meta_iteration_flops(batch: Episode, args: argparse.Namespace) -> dict[str, float]:
    """Convolution and linear FLOPs of one metaxfer meta-iteration (per-task loop), counted with module hooks.

    A lower bound on the work of every variant: the support pass's second backward (the Hessian-vector
    product of second-order MAML) and all element-wise work are left out.
    """
    from metaxfer.learners.gradient import MAML

    torch.manual_seed(args.seed)
    model = Conv4(hidden=args.hidden, num_classes=args.ways, norm="batchnorm_split")
    for block in model.features:
        # The folded query pass calls its convolutions without the module hooks that count them (same FLOPs).
        block.fold_support_statistics = False
    learner = MAML(model, inner_lr=args.inner_lr, inner_steps=args.inner_steps, first_order=False, vectorize=False)
    return C.conv_linear_flops(model, lambda: learner.loss(batch).backward())


# The kernels that do the convolutions' arithmetic (their double backward calls these too); the wrappers
# around them (aten::convolution, aten::_convolution) only dispatch, so their self time is not counted.
CONV_KERNELS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward",
                "aten::_slow_conv2d_backward")


def convolution_seconds(step: Callable[[], float], repeats: int = 2) -> float:
    """Seconds per meta-iteration spent inside convolution kernels (profiler self time, mean of ``repeats``).

    What the convolutions of an implementation actually cost, as opposed to the FLOP bound (which assumes
    every convolution runs at the GEMM probe's rate): no speed-up beyond this variant's total over this
    number is possible without faster convolutions.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in CONV_KERNELS) / 1e6 / repeats


def child_memory(args: argparse.Namespace) -> None:
    """One variant alone in this process: peak RSS of setup + a few meta-iterations (one JSON line)."""
    metaxfer.runtime.tune_allocator()
    C.set_threads(args.threads)
    batch = make_batch(args.tasks, args.ways, args.shots, args.queries, args.seed)
    step = build(args.child_memory, batch, args)
    setup = C.rss_mb()
    for _ in range(args.memory_steps):
        step()
    peak = C.peak_rss_mb()
    print(json.dumps({"variant": args.child_memory, "rss_after_setup_mb": round(setup, 1), "peak_rss_mb": round(peak, 1),
                      "peak_minus_setup_mb": round(peak - setup, 1), "steps": args.memory_steps}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed meta-iterations per variant (alternating)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed meta-iterations per variant first")
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64, help="Conv4 channels (8: the issue's small model, where per-task "
                        "overhead dominates)")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15, help="query examples per class")
    parser.add_argument("--inner-lr", type=float, default=0.4)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--norm", choices=("batchnorm_split", "batchnorm"), default="batchnorm_split",
                        help="BatchNorm form of metaxfer's Conv4 (learn2learn always gets affine BatchNorm)")
    parser.add_argument("--tasks-per-backward", type=int, default=1,
                        help="chunk size of the metaxfer-chunked and metaxfer-vmap-chunked variants")
    parser.add_argument("--variants", default="metaxfer-vmap,metaxfer-loop,learn2learn", help=f"comma-separated, from {VARIANTS}")
    parser.add_argument("--ablation", action="store_true", help="also time metaxfer's MAML on the plain (paper-order, NCHW) Conv4")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory subprocesses")
    parser.add_argument("--memory-steps", type=int, default=3, help="meta-iterations in each memory subprocess")
    parser.add_argument("--conv-time", action="store_true", help="also profile each variant's time inside convolution "
                        "kernels (after the timed rounds)")
    parser.add_argument("--out", default=None, help="also write the JSON record to this file")
    parser.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        return child_memory(args)

    variants = [v for v in args.variants.split(",") if v]
    if args.ablation:
        variants += [v for v in ("metaxfer-vmap+plain-conv4", "metaxfer-loop+plain-conv4") if v not in variants]
    metaxfer.runtime.tune_allocator()  # for every variant alike: they share this process
    C.set_threads(args.threads)
    env = C.environment(["metaxfer", "learn2learn", "torchvision", "numpy"])
    batch = make_batch(args.tasks, args.ways, args.shots, args.queries, args.seed)
    steps = {v: build(v, batch, args) for v in variants}
    first_loss = {v: steps[v]() for v in variants}  # also the first warm-up iteration
    flop = meta_iteration_flops(batch, args)
    probe = C.GemmProbe()
    times = C.alternate({**steps, **probe.steps()}, rounds=args.rounds, warmup=max(args.warmup - 1, 0))
    gemm = probe.rates(times)
    bound = flop["total"] / (gemm["bound_gflops"] * 1e9)

    base_name = variants[0]
    results: dict[str, Any] = {}
    for v in variants:
        results[v] = {
            "seconds": C.summary(times[v]),
            "first_meta_loss": first_loss[v],
            f"ratio_to_{base_name}": C.summary(times[v])["median"] / C.summary(times[base_name])["median"],
            f"paired_ratio_to_{base_name}": C.paired_ratio(times[v], times[base_name]),
            "times_flop_bound": C.summary(times[v])["median"] / bound,
        }
        if args.conv_time:
            results[v]["convolution_seconds"] = convolution_seconds(steps[v])
    if not args.no_memory:
        extra = ["--tasks", str(args.tasks), "--ways", str(args.ways), "--shots", str(args.shots), "--queries", str(args.queries),
                 "--inner-lr", str(args.inner_lr), "--inner-steps", str(args.inner_steps), "--seed", str(args.seed),
                 "--memory-steps", str(args.memory_steps), "--hidden", str(args.hidden), "--norm", args.norm,
                 "--tasks-per-backward", str(args.tasks_per_backward)] + (["--threads", str(args.threads)] if args.threads else [])
        for v in variants:
            results[v]["memory"] = C.measure_in_subprocess(Path(__file__), v, extra)

    record = {
        "benchmark": "maml_meta_iteration",
        "task": {"tasks": args.tasks, "ways": args.ways, "shots": args.shots, "queries_per_class": args.queries,
                 "image": [1, 28, 28], "model": f"Conv4-{args.hidden} + linear head", "inner_lr": args.inner_lr,
                 "inner_steps": args.inner_steps, "order": "second", "optimizer": f"Adam(lr={args.lr})",
                 "rounds": args.rounds, "warmup": args.warmup, "seed": args.seed},
        "results": results,
        "flop_bound": {
            "conv_linear_gflop": flop["total"] / 1e9, "gemm": gemm, "seconds": bound,
            # No implementation that does these convolutions in float32 can be faster than `seconds`, so this is
            # the largest speed-up over learn2learn any such implementation can reach on this machine and load.
            "max_speedup_over_learn2learn": (C.summary(times["learn2learn"])["median"] / bound
                                             if "learn2learn" in times else None),
        },
        "environment": env,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    rows = []
    fb = record["flop_bound"]
    for v in variants:
        r = results[v]
        mem = r.get("memory", {})
        rows.append([
            v,
            f"{r['seconds']['median']:.3f}",
            f"{r['seconds']['p25']:.3f}-{r['seconds']['p75']:.3f}",
            f"{r[f'ratio_to_{base_name}']:.2f}x",
            f"{r[f'paired_ratio_to_{base_name}']:.2f}x",
            f"{mem['peak_rss_mb']:.0f}" if "peak_rss_mb" in mem else mem.get("error", "-"),
            f"{mem['peak_minus_setup_mb']:.0f}" if "peak_minus_setup_mb" in mem else "-",
            f"{r['times_flop_bound']:.1f}x",
        ] + ([f"{r['convolution_seconds']:.3f}"] if args.conv_time else []))
    human = (
        f"MAML meta-iteration: {args.tasks} tasks x {args.ways}-way {args.shots}-shot {args.queries} queries/class, Conv4-{args.hidden}, "
        f"{args.inner_steps} inner step lr {args.inner_lr}, second order, Adam; {args.rounds} alternating rounds; "
        f"torch {env['torch']}, {env['torch_threads']} threads, {env['cpu_model']}, load {env['loadavg_start'][0]:.1f}\n\n"
        + C.table(rows, ["variant", "median s", "IQR s", f"vs {base_name}", "paired", "peak RSS MB", "peak - setup MB",
                         "x FLOP bound"] + (["conv kernels s"] if args.conv_time else []))
        + f"\n\nFLOP lower bound: {fb['conv_linear_gflop']:.1f} GFLOP of convolutions and linear layers (forward and first "
        f"backward; the support pass's second backward is not counted) at {gemm['bound_gflops']:.0f} GFLOP/s "
        f"({gemm['bound_kernel']}, measured between the steps) = {bound:.3f} s"
        + (f"; largest possible speed-up over learn2learn: {fb['max_speedup_over_learn2learn']:.2f}x"
           if fb["max_speedup_over_learn2learn"] else "")
    )
    C.emit(record, human, args.out)


if __name__ == "__main__":
    main()
