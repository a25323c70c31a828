"""Correctness: metaxfer's MAML meta-gradient against learn2learn 0.2.0 and higher 0.2.1, same weights, same data.

Every implementation computes the meta-gradient of the mean query loss over
a meta-batch (Finn et al. 2017, eq. 3) for one set of initial weights and one
float64 meta-batch; the script reports, per case, the largest absolute
difference between metaxfer's gradient and each peer's over all parameters.

Cases: Conv4 (``--hidden`` channels, 1x28x28 inputs, linear head), 5-way
1-shot with ``--queries`` queries per class, ``--tasks`` tasks, inner lr 0.4,
1 and 2 inner steps, second and first order, three normalisations:

* ``batchnorm``: affine ``nn.BatchNorm2d`` (metaxfer ``Conv4(norm="batchnorm")``,
  peers the stock-module ``PlainConv4`` with the same ``state_dict``);
* ``batchnorm_split``: BatchNorm without affine + a per-channel affine layer
  (the same function, metaxfer's MAML preset);
* ``none``: no normalisation at all.

BatchNorm policy. learn2learn and higher run the query through the module in
``train()`` mode, i.e. BatchNorm normalises the query with the *query* batch
statistics (transductive). metaxfer's default normalises the query with the
*support* statistics (non-transductive), a different function, so BatchNorm
models are compared with ``MAML(..., transductive=True)``, which computes what
the peers compute. The default's distance to the peers is reported too, as an
information row (expected to be large: it shows the comparison can fail).

What each library computes, and how it is called here:

* metaxfer: ``MAML(model, 0.4, steps, first_order, vectorize=True|False,
  transductive=...)``; ``torch.autograd.grad(learner.loss(batch), params)``.
* learn2learn: ``l2l.algorithms.MAML(model, lr=0.4, first_order=...)``; per
  task ``clone()``, ``adapt(support_loss)`` per step, query ``loss.backward()``;
  gradients scaled by 1/tasks (as in its ``examples/vision/maml_omniglot.py``).
  ``first_order=True`` takes the inner gradients without a graph, so
  ``theta' = theta - lr * const`` and the meta-gradient is the query gradient
  at ``theta'`` (FOMAML), as in metaxfer.
* higher: ``higher.innerloop_ctx(model, SGD(lr=0.4), copy_initial_weights=False,
  track_higher_grads=not first_order)``; ``diffopt.step(support_loss)`` per
  step, query ``loss.backward()``. Second order: the gradient lands in
  ``model.parameters()``. First order (``track_higher_grads=False``): higher
  detaches the fast weights after every step (``p.detach().requires_grad_()``
  in ``DifferentiableOptimizer.step``), so ``backward()`` leaves *no* gradient
  on the model's parameters; the FOMAML gradient has to be read from
  ``fmodel.fast_params`` (the query gradient at the adapted weights) and
  copied over by hand. The script records both what lands on the model
  (``higher-fo-model-grad``) and the fast-weight gradient (``higher``). It also
  records that higher's default ``copy_initial_weights=True`` leaves no
  gradient on the model even in second order.

Run (after ``bash benchmarks/setup_peers.sh``):

    OMP_NUM_THREADS=1 .venv-bench/bin/python benchmarks/maml_gradients_vs_peers.py \\
        --out benchmarks/results/maml_gradients_vs_peers.json

Prints a table, then the JSON record as the last line; exits with status 1 if
any required comparison exceeds ``--tol``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaxfer.backbones import Conv4
from metaxfer.learners.gradient import MAML
from metaxfer.tasks import Episode

Grads = dict[str, Tensor]
NORMS = ("batchnorm", "batchnorm_split", "none")


def make_batch(tasks: int, ways: int, shots: int, queries: int, size: int, seed: int) -> Episode:
    """A float64 meta-batch ``[T, ways*shots, 1, size, size]`` etc. with labels grouped by class."""
    g = torch.Generator().manual_seed(seed)
    return Episode(
        torch.rand(tasks, ways * shots, 1, size, size, generator=g, dtype=torch.float64),
        torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1),
        torch.rand(tasks, ways * queries, 1, size, size, generator=g, dtype=torch.float64),
        torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1),
    )


def build_models(norm: str, hidden: int, ways: int, size: int, seed: int) -> tuple[nn.Module, nn.Module]:
    """(metaxfer ``Conv4``, stock-module ``PlainConv4``) in float64 with identical ``state_dict``."""
    torch.manual_seed(seed)
    ours = Conv4(in_channels=1, hidden=hidden, num_classes=ways, norm=norm, image_size=size).double()
    plain = C.PlainConv4(in_channels=1, hidden=hidden, num_classes=ways, norm=norm, image_size=size).double()
    plain.load_state_dict(ours.state_dict())
    return ours, plain


def metaxfer_grads(model: nn.Module, batch: Episode, args: argparse.Namespace, steps: int, first_order: bool,
                   vectorize: bool, transductive: bool) -> Grads:
    learner = MAML(model, inner_lr=args.inner_lr, inner_steps=steps, first_order=first_order,
                   vectorize=vectorize, transductive=transductive)
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(learner.loss(batch), params)
    return dict(zip(names, grads))


def learn2learn_grads(model: nn.Module, batch: Episode, args: argparse.Namespace, steps: int, first_order: bool) -> Grads:
    import learn2learn as l2l

    model = copy.deepcopy(model).train()
    maml = l2l.algorithms.MAML(model, lr=args.inner_lr, first_order=first_order)
    sx, sy, qx, qy = batch
    for t in range(batch.num_tasks):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(sx[t]), sy[t]))
        F.cross_entropy(learner(qx[t]), qy[t]).backward()
    return {name: p.grad / batch.num_tasks for name, p in model.named_parameters()}


def higher_grads(model: nn.Module, batch: Episode, args: argparse.Namespace, steps: int, first_order: bool,
                 copy_initial_weights: bool = False) -> tuple[Grads | None, Grads]:
    """(gradient left on ``model.parameters()`` or None where higher leaves none, mean fast-weight gradient).

    The fast-weight gradient is d(query loss)/d(adapted weights): what a user
    of higher must copy by hand to get FOMAML when ``track_higher_grads=False``.
    """
    import higher

    model = copy.deepcopy(model).train()
    opt = torch.optim.SGD(model.parameters(), lr=args.inner_lr)
    sx, sy, qx, qy = batch
    names = [n for n, _ in model.named_parameters()]
    fast_sum: Grads = {}
    for t in range(batch.num_tasks):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=copy_initial_weights,
                                  track_higher_grads=not first_order) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(F.cross_entropy(fmodel(sx[t]), sy[t]))
            query_loss = F.cross_entropy(fmodel(qx[t]), qy[t])
            fast = list(fmodel.fast_params)
            fast_grads = torch.autograd.grad(query_loss, fast, retain_graph=True)
            query_loss.backward()
        for name, g in zip(names, fast_grads):
            fast_sum[name] = fast_sum.get(name, 0) + g / batch.num_tasks
    on_model = {n: p.grad / batch.num_tasks for n, p in model.named_parameters() if p.grad is not None}
    return (on_model if len(on_model) == len(names) else None), fast_sum


def max_abs_diff(a: Grads, b: Grads) -> float:
    if a.keys() != b.keys():
        raise KeyError(f"parameter names differ: {sorted(a.keys() ^ b.keys())}")
    return max((a[k] - b[k]).abs().max().item() for k in a)


def max_abs(a: Grads) -> float:
    return max(v.abs().max().item() for v in a.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=16, help="Conv4 channels")
    parser.add_argument("--size", type=int, default=28, help="input height = width")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=3, help="query examples per class")
    parser.add_argument("--inner-lr", type=float, default=0.4)
    parser.add_argument("--steps", default="1,2", help="comma-separated inner step counts")
    parser.add_argument("--norms", default=",".join(NORMS), help=f"comma-separated, from {NORMS}")
    parser.add_argument("--tol", type=float, default=1e-5, help="max abs difference that counts as equal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (correctness only: 1 is plenty)")
    parser.add_argument("--out", default=None, help="also write the JSON record to this file")
    args = parser.parse_args()
    C.set_threads(args.threads)
    env = C.environment(["metaxfer", "learn2learn", "higher", "numpy"])
    batch = make_batch(args.tasks, args.ways, args.shots, args.queries, args.size, args.seed)
    steps_list = [int(s) for s in args.steps.split(",") if s]

    cases: list[dict[str, Any]] = []
    rows: list[list[Any]] = []
    for norm in [n for n in args.norms.split(",") if n]:
        has_bn = norm != "none"
        ours, plain = build_models(norm, args.hidden, args.ways, args.size, args.seed)
        for steps in steps_list:
            for first_order in (False, True):
                order = "first" if first_order else "second"
                mx = {impl: metaxfer_grads(ours, batch, args, steps, first_order, impl == "vmap", transductive=has_bn)
                      for impl in ("vmap", "loop")}
                peers: dict[str, Grads] = {"learn2learn": learn2learn_grads(plain, batch, args, steps, first_order)}
                on_model, fast = higher_grads(plain, batch, args, steps, first_order)
                # Second order: the meta-gradient is what backward() leaves on the model. First order:
                # higher leaves nothing there (see the docstring); the fast-weight gradient is FOMAML's.
                peers["higher"] = on_model if not first_order and on_model is not None else fast
                diffs = {f"{impl}_vs_{peer}": max_abs_diff(mx[impl], g) for impl in mx for peer, g in peers.items()}
                diffs["vmap_vs_loop"] = max_abs_diff(mx["vmap"], mx["loop"])
                case: dict[str, Any] = {
                    "norm": norm, "inner_steps": steps, "order": order,
                    "metaxfer_transductive": has_bn,
                    "max_abs_grad": max_abs(mx["loop"]),
                    "max_abs_diff": diffs,
                    "higher_grad_on_model": on_model is not None,
                }
                if has_bn:
                    # Information only: metaxfer's default (support statistics) is another function.
                    default = metaxfer_grads(ours, batch, args, steps, first_order, False, transductive=False)
                    case["info_nontransductive_loop_vs_learn2learn"] = max_abs_diff(default, peers["learn2learn"])
                worst = max(diffs.values())
                case["passed"] = worst < args.tol
                cases.append(case)
                rows.append([
                    norm + (" (transductive)" if has_bn else ""), steps, order,
                    f"{case['max_abs_grad']:.3g}",
                    f"{max(diffs['vmap_vs_learn2learn'], diffs['loop_vs_learn2learn']):.2e}",
                    f"{max(diffs['vmap_vs_higher'], diffs['loop_vs_higher']):.2e}",
                    f"{diffs['vmap_vs_loop']:.2e}",
                    "yes" if on_model is not None else "NO",
                    f"{case['info_nontransductive_loop_vs_learn2learn']:.2e}" if has_bn else "-",
                    "ok" if case["passed"] else "FAIL",
                ])

    # higher's default copy_initial_weights=True: the inner loop starts from a detached copy.
    ours, plain = build_models("none", args.hidden, args.ways, args.size, args.seed)
    default_on_model, _ = higher_grads(plain, batch, args, 1, False, copy_initial_weights=True)

    passed = all(c["passed"] for c in cases)
    record = {
        "benchmark": "maml_gradients_vs_peers",
        "task": {"tasks": args.tasks, "ways": args.ways, "shots": args.shots, "queries_per_class": args.queries,
                 "image": [1, args.size, args.size], "model": f"Conv4-{args.hidden} + linear head", "dtype": "float64",
                 "inner_lr": args.inner_lr, "inner_steps": steps_list, "seed": args.seed, "tolerance": args.tol},
        "results": {
            "passed": passed,
            "cases": cases,
            "higher_notes": {
                "first_order_track_higher_grads_false_leaves_grad_on_model": any(
                    c["higher_grad_on_model"] for c in cases if c["order"] == "first"),
                "second_order_copy_initial_weights_true_leaves_grad_on_model": default_on_model is not None,
            },
        },
        "environment": env,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    human = (
        f"MAML meta-gradient vs peers: {args.tasks} tasks x {args.ways}-way {args.shots}-shot {args.queries} queries/class, "
        f"Conv4-{args.hidden}, {args.size}x{args.size}, float64, inner lr {args.inner_lr}; "
        f"max abs difference over all parameters (tolerance {args.tol:g}); torch {env['torch']}, "
        f"learn2learn {env['packages']['learn2learn']}, higher {env['packages']['higher']}\n\n"
        + C.table(rows, ["norm", "steps", "order", "max |g|", "vs learn2learn", "vs higher", "vmap vs loop",
                         "higher grad on model", "info: support-stats vs l2l", "result"])
        + "\n\nhigher, first order (track_higher_grads=False): backward() leaves no gradient on the model's parameters; "
        "the 'vs higher' column uses the gradient of the query loss w.r.t. fmodel.fast_params (FOMAML).\n"
        f"higher, second order with its default copy_initial_weights=True: gradient on the model: "
        f"{'yes' if default_on_model is not None else 'NONE'}.\n"
        f"{'PASSED' if passed else 'FAILED'}"
    )
    C.emit(record, human, args.out)
    if not passed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
