"""Speed of a second-order MAML meta-iteration on the sinusoid MLP: metaxfer (vmap, loop) vs learn2learn 0.2.0.

The small-model case of the gradient-family issue, where per-task overhead dominates: Finn et al.
2017's sinusoid regression (section 5.1), a 1-40-40-1 ReLU MLP, MSE, 25 tasks per meta-batch with
K = 10 support and 10 query points, one inner step of lr 0.01, second order, then one Adam step.

* metaxfer: ``MAML(MLP(), inner_lr=0.01, inner_steps=1, loss_fn=F.mse_loss, vectorize=True)`` (the tasks
  vectorised with ``torch.func.vmap``) and ``vectorize=False`` (a loop over tasks); one
  ``loss(batch).backward()`` per meta-iteration (``metaxfer.train.fit.forward_backward``, as ``speed_maml.py``).
* learn2learn: ``l2l.algorithms.MAML(model, lr=0.01, first_order=False)`` as in its
  ``examples`` (``_common.learn2learn_maml_step``, shared with ``speed_maml.py``). The same
  architecture from the same initial weights.

Timings alternate in one process (``_common.alternate``); the ratio reported is the median over
rounds of the per-round ratio, robust to load that changes between rounds. The first meta-losses
are printed too: they must agree (same weights, same data, same algorithm).

Run (after ``bash benchmarks/setup_peers.sh``):

    .venv-bench/bin/python benchmarks/speed_maml_sinusoid.py --threads 1 --rounds 50 \\
        --out benchmarks/results/speed_maml_sinusoid.json
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see speed_maml.py)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
import torch
import torch.nn.functional as F

import metaxfer.runtime
from metaxfer.backbones import create
from metaxfer.tasks import SinusoidTasks

VARIANTS = ("learn2learn", "metaxfer-vmap", "metaxfer-loop")


def build(variant: str, batch: Any, args: argparse.Namespace) -> Callable[[], float]:
    """A meta-iteration of ``variant`` (zero grads, meta-loss, backward, Adam step) from the same initial weights."""
    torch.manual_seed(args.seed)
    model = create("mlp", in_features=1, hidden=[40, 40], out_features=1)
    if variant.startswith("metaxfer"):
        from metaxfer.learners.gradient import MAML
        from metaxfer.train.fit import forward_backward

        learner = MAML(model, inner_lr=args.inner_lr, inner_steps=1, first_order=False, loss_fn=F.mse_loss,
                       vectorize=variant == "metaxfer-vmap")
        opt = torch.optim.Adam(learner.parameters(), args.lr)

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            loss, _, _ = forward_backward(learner, batch, None)
            opt.step()
            return loss.item()

        return step

    if variant == "learn2learn":
        return C.learn2learn_maml_step(model, batch, F.mse_loss, args.inner_lr, 1, args.lr)

    raise SystemExit(f"unknown variant {variant!r}; choose from {VARIANTS}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50, help="timed meta-iterations per variant (alternating)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=25)
    parser.add_argument("--shots", type=int, default=10, help="K: support points per task")
    parser.add_argument("--queries", type=int, default=10, help="query points per task")
    parser.add_argument("--inner-lr", type=float, default=0.01)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    parser.add_argument("--out", default=None, help="also write the JSON record to this file")
    args = parser.parse_args()

    metaxfer.runtime.tune_allocator()
    C.set_threads(args.threads)
    env = C.environment(["metaxfer", "learn2learn", "numpy"])
    batch = SinusoidTasks(shots=args.shots, queries=args.queries, seed=args.seed).sample_batch(args.tasks)
    variants = [v for v in args.variants.split(",") if v]
    steps = {v: build(v, batch, args) for v in variants}
    first_loss = {v: steps[v]() for v in variants}
    times = C.alternate(steps, rounds=args.rounds, warmup=max(args.warmup - 1, 0))
    base = variants[0]
    results = {v: {"seconds": C.summary(times[v]), "first_meta_loss": first_loss[v],
                   f"paired_ratio_to_{base}": C.paired_ratio(times[v], times[base]),
                   f"speedup_over_{base}": C.paired_ratio(times[base], times[v])} for v in variants}
    record = {
        "benchmark": "maml_meta_iteration_sinusoid",
        "task": {"tasks": args.tasks, "shots": args.shots, "queries": args.queries, "model": "MLP 1-40-40-1 (ReLU)",
                 "loss": "mse", "inner_lr": args.inner_lr, "inner_steps": 1, "order": "second",
                 "optimizer": f"Adam(lr={args.lr})", "rounds": args.rounds, "warmup": args.warmup, "seed": args.seed},
        "results": results,
        "environment": env,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    rows = [[v, f"{r['seconds']['median'] * 1e3:.2f}", f"{r['seconds']['p25'] * 1e3:.2f}-{r['seconds']['p75'] * 1e3:.2f}",
             f"{r[f'speedup_over_{base}']:.2f}x", f"{r['first_meta_loss']:.6f}"] for v, r in results.items()]
    human = (f"MAML meta-iteration, sinusoid MLP 1-40-40-1: {args.tasks} tasks, K={args.shots}, {args.queries} queries, "
             f"1 inner step, second order, Adam; {args.rounds} alternating rounds; torch {env['torch']}, "
             f"{env['torch_threads']} threads, {env['cpu_model']}, load {env['loadavg_start'][0]:.1f}\n\n"
             + C.table(rows, ["variant", "median ms", "IQR ms", f"speed-up over {base} (paired)", "first meta-loss"]))
    C.emit(record, human, args.out)


if __name__ == "__main__":
    main()
