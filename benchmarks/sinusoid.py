"""Sinusoid regression (Finn et al. 2017, section 5.1): MAML against the pretrained baseline.

Usage:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sinusoid.py --shots 5

For each method (presets ``sinusoid/maml_k{K}`` and ``sinusoid/pretrained_k{K}``) this trains the
preset with ``metaxfer train`` into ``runs/sinusoid_{method}_k{K}`` (a finished run directory is
resumed, i.e. only loaded; an unfinished one continues), loads its best checkpoint (lowest
validation MSE) and measures the mean squared error ± 95% CI after 0, 1 and 10 gradient steps on
the K support points of 600 fixed test tasks (seed 0, 100 query points each).

* MAML adapts with its meta-training step size (0.01), as in the paper.
* The pretrained baseline ("regression on all tasks, fine-tuned at test time with gradient
  descent with an automatically tuned step size") gets, for each number of steps, the step size
  from ``--lr-grid`` with the lowest MSE on 200 fixed *validation* tasks (never the test tasks).

Writes the JSON record ``benchmarks/results/sinusoid_k{K}.json`` (command, commit, machine, date,
training commands and times, test fingerprint, every MSE with its CI, the tuning table) and the
figure ``docs/figures/sinusoid_k{K}.png``: one test task's true curve, its K points and both
models' predictions after 0, 1 and 10 steps.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import _common as C
import torch
import torch.nn.functional as F

from metaxfer.build import build_sampler
from metaxfer.cli.main import main as metaxfer_main
from metaxfer.config import config_from_dict
from metaxfer.errors import NonFiniteLossError
from metaxfer.evaluate import EvalResult, evaluate
from metaxfer.hub import load
from metaxfer.learners.gradient import MAML
from metaxfer.tasks import SinusoidEpisodeSet

STEPS = (0, 1, 10)
PAPER_K5 = {"maml": 0.35, "pretrained": 2.19}  # Finn et al. 2017, section 5.1, MSE after 10 steps (K = 5)
TARGET_MAML_K5 = 0.40


def machine() -> str:
    """CPU model, torch threads and platform of this machine."""
    return f"{C.cpu_model()}, {torch.get_num_threads()} torch threads, {platform.system()} {platform.machine()}"


def commit() -> str:
    """Current git commit, with -dirty when tracked files have changes."""
    info = C.git_commit()
    return f"{info['commit'][:7]}{'-dirty' if info['dirty'] else ''}"


def with_steps(model: torch.nn.Module, inner_lr: float, steps: int) -> MAML:
    """The trained network adapted with ``steps`` MSE gradient steps of size ``inner_lr`` (MAML's own ``adapt``)."""
    return MAML(model, inner_lr=inner_lr, inner_steps=0, eval_inner_steps=steps, loss_fn=F.mse_loss)


def train(preset: str, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Train (or resume / load) ``preset`` in ``run_dir`` through the CLI; returns what identifies the run."""
    args = ["train", "--config", preset, "--run-dir", str(run_dir), "--no-test", *overrides]
    t0 = time.perf_counter()
    if metaxfer_main(args) != 0:
        raise SystemExit(f"training failed: metaxfer {' '.join(args)}")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"train_command": "metaxfer " + " ".join(args), "run_dir": str(run_dir),
            "trained_steps_total": max((r["step"] for r in records), default=0),
            "train_seconds_total": max((r["seconds"] for r in records), default=0.0),
            "seconds_this_call": round(time.perf_counter() - t0, 1)}


def tune_lr(model: torch.nn.Module, val: SinusoidEpisodeSet, steps: int, grid: list[float]) -> tuple[float, dict[str, float | None]]:
    """Step size of ``grid`` with the lowest validation MSE after ``steps`` steps, and the whole table.

    A step size whose fine-tuning diverges on some task (non-finite loss) counts as infinitely bad
    and is recorded as ``None``.
    """
    table: dict[str, float | None] = {}
    for lr in grid:
        try:
            table[f"{lr:g}"] = evaluate(with_steps(model, lr, steps), val).mean
        except NonFiniteLossError:
            table[f"{lr:g}"] = None
        if table[f"{lr:g}"] is not None and not math.isfinite(table[f"{lr:g}"]):  # type: ignore[arg-type]
            table[f"{lr:g}"] = None
    finite = [lr for lr in grid if table[f"{lr:g}"] is not None]
    if not finite:
        raise SystemExit(f"every step size in {grid} diverges after {steps} steps; give smaller ones with --lr-grid")
    return min(finite, key=lambda lr: table[f"{lr:g}"]), table  # type: ignore[arg-type,return-value]


@torch.no_grad()
def predict(model: torch.nn.Module, inner_lr: float, steps: int, ep: Any, x: torch.Tensor) -> torch.Tensor:
    return with_steps(model, inner_lr, steps).adapt(ep.support_x, ep.support_y)(x)


def plot(path: Path, test: SinusoidEpisodeSet, index: int, models: dict[str, tuple[torch.nn.Module, dict[int, float]]],
         shots: int, mses: dict[str, dict[int, float]]) -> None:
    """True curve, K points and predictions after 0/1/10 steps of each model, for test task ``index``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = test[index]
    x = torch.linspace(-5, 5, 400)[:, None]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), sharey=True)
    styles = {0: ":", 1: "--", 10: "-"}
    for ax, (name, (model, lrs)) in zip(axes, models.items()):
        ax.plot(x[:, 0], test.curve(index, x)[:, 0], color="black", lw=2, label="ground truth")
        for s in STEPS:
            ax.plot(x[:, 0], predict(model, lrs[s], s, ep, x)[:, 0], styles[s], lw=1.6,
                    label=f"after {s} step{'s' if s != 1 else ''} (mean test MSE {mses[name][s]:.2f})")
        ax.scatter(ep.support_x[:, 0], ep.support_y[:, 0], color="tab:red", marker="^", s=60, zorder=5,
                   label=f"{shots} points used for gradient")
        ax.set(title=f"{name}, K={shots}", xlabel="x")
        ax.legend(fontsize=8, loc="lower left")
    axes[0].set_ylabel("y")
    fig.suptitle(f"Sinusoid regression (Finn et al. 2017, 5.1): test task {index}, "
                 f"A={float(test.amplitude[index]):.2f}, phase={float(test.phase[index]):.2f}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, default=5, help="K support points (5 or 10)")
    parser.add_argument("--run-root", default="runs", help="where the run directories go")
    parser.add_argument("--train-steps", type=int, help="override train.steps of both presets (default: the presets')")
    parser.add_argument("--episodes", type=int, default=600, help="fixed test tasks")
    parser.add_argument("--queries", type=int, default=100, help="query points per test task")
    parser.add_argument("--val-episodes", type=int, default=200, help="validation tasks for tuning the baseline's step size")
    parser.add_argument("--lr-grid", default="0.001,0.002,0.005,0.01,0.02,0.05,0.1,0.2")
    parser.add_argument("--plot-task", type=int, default=0, help="index of the test task drawn in the figure")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="default: benchmarks/results/sinusoid_k{K}.json")
    parser.add_argument("--figure", help="default: docs/figures/sinusoid_k{K}.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # the machine is shared: one thread, like OMP_NUM_THREADS=1
    k = args.shots
    out = Path(args.out or C.REPO / "benchmarks" / "results" / f"sinusoid_k{k}.json")
    figure = Path(args.figure or C.REPO / "docs" / "figures" / f"sinusoid_k{k}.png")
    grid = [float(v) for v in args.lr_grid.split(",")]
    overrides = [f"train.steps={args.train_steps}"] if args.train_steps else []

    results: dict[str, Any] = {}
    models: dict[str, tuple[torch.nn.Module, dict[int, float]]] = {}
    mses: dict[str, dict[int, float]] = {}
    test = None
    for method in ("maml", "pretrained"):
        preset = f"sinusoid/{method}_k{k}"
        run = train(preset, Path(args.run_root) / f"sinusoid_{method}_k{k}", overrides)
        learner = load(run["run_dir"])
        cfg = config_from_dict(learner.card["run_config"])
        # The same fixed tasks for both methods (the sampler depends only on the data config, K and the seed).
        test = build_sampler(cfg.data, cfg.data.test_split, 1, k, args.queries, 0).fixed_episodes(args.episodes, seed=0)
        val = build_sampler(cfg.data, cfg.data.val_split, 1, k, args.queries, 0).fixed_episodes(args.val_episodes, seed=100)
        entry: dict[str, Any] = {"preset": preset, **run, "checkpoint_step": learner.card.get("trained_steps")}
        if method == "maml":
            lrs = {s: float(learner.inner_lr) for s in STEPS}  # the paper adapts with the training step size
        else:
            lrs, tuning = {0: float(learner.inner_lr)}, {}
            for s in STEPS[1:]:
                lrs[s], tuning[str(s)] = tune_lr(learner.model, val, s, grid)
            entry["step_size_tuning"] = {"val_tasks": args.val_episodes, "val_seed": 100, "grid": grid,
                                         "val_mse": tuning}
        entry["inner_lr"] = {str(s): lrs[s] for s in STEPS}
        entry["test"] = {}
        mses[method] = {}
        for s in STEPS:
            res: EvalResult = evaluate(with_steps(learner.model, lrs[s], s), test, protocol="sinusoid test")
            print(f"{method:10s} lr={lrs[s]:<6g} {res.line()}", flush=True)
            entry["test"][str(s)] = res.to_dict()
            mses[method][s] = res.mean
        results[method] = entry
        models[method] = (learner.model, lrs)
    assert test is not None
    plot(figure, test, args.plot_task, models, k, mses)
    record: dict[str, Any] = {
        "benchmark": "sinusoid regression (Finn et al. 2017, section 5.1)",
        "shots": k,
        "test_tasks": {"episodes": args.episodes, "queries": args.queries, "seed": 0, "split": "test",
                       "fingerprint": test.fingerprint},
        "metric": "mean squared error over the query points of each task; mean ± 1.96·σ/√n over tasks",
        "results": results,
        "figure": str(figure.relative_to(C.REPO)) if figure.is_relative_to(C.REPO) else str(figure),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "commit": commit(),
        "machine": machine(),
        "date": dt.date.today().isoformat(),
    }
    if k == 5:
        record["paper_10_steps"] = PAPER_K5
        record["target"] = {"maml_10_steps_mse_at_most": TARGET_MAML_K5,
                            "met": mses["maml"][10] <= TARGET_MAML_K5}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} and {figure}")


if __name__ == "__main__":
    main()
