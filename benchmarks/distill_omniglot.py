"""Knowledge distillation on Omniglot: a Conv4 distilled from a ResNet-12 teacher vs the same Conv4 trained directly.

Three runs, each trained (or resumed, or only loaded when finished) through the CLI with ``--train``:

* teacher: ``omniglot/baseline_pp_resnet12_5w1s`` (Baseline++ ResNet-12) for ``--teacher-steps`` steps;
* student: ``omniglot/distill_conv4_from_resnet12_5w1s`` (Baseline++ Conv4, T = 4, alpha = 0.5) for
  ``--steps`` steps, distilled from the teacher's best checkpoint (``metaxfer distill``);
* direct: ``omniglot/baseline_pp_5w1s`` (the same Baseline++ Conv4 on the labels alone) for ``--steps``
  steps: the same budget (steps, batches of 64, Adam 1e-3, validation) as the student.

Then the best checkpoint of each (by validation accuracy) is evaluated on the same 600 fixed 5-way
1-shot test episodes (seed 0, 15 queries per class), and the per-episode paired difference
student - direct is summarised as mean ± 1.96·s/√n (the same episodes for both, so the
between-episode variance cancels). The teacher is scored on the same episodes for reference.

Full experiment (the lead runs it; on one CPU thread the teacher takes ~1.25 s per step (~9 h for
25000 steps), the student ~0.37 s per step (~2.6 h: its Conv4 step plus one ResNet-12 forward
pass) and the direct Conv4 ~0.05 s per step (~25 min), measured over 20 steps each on real
Omniglot, 2-core machine under load ~1.5, plus ~10-15 s per validation of 200 episodes and a few
minutes for the final evaluations)::

    METAXFER_DATA=../shared/data OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distill_omniglot.py --train \\
        --teacher-run runs/baseline_pp_resnet12_5w1s --student-run runs/distill_conv4_from_resnet12_5w1s \\
        --direct-run runs/baseline_pp_5w1s --teacher-steps 25000 --steps 25000 \\
        --out benchmarks/results/distill_omniglot_5w1s.json

The same with the runs already trained (by ``metaxfer train`` / ``metaxfer distill`` into those
folders) only evaluates: leave out ``--train``. ``--override KEY=VALUE`` (repeatable) goes to all
three training commands, e.g. ``--override device=cuda``.

Smoke test (a few steps; what was run to check the script)::

    METAXFER_DATA=../shared/data OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distill_omniglot.py --train \\
        --teacher-run /tmp/kd/teacher --student-run /tmp/kd/student --direct-run /tmp/kd/direct \\
        --teacher-steps 3 --steps 3 --episodes 20 --override train.val_every=3 --override train.val_episodes=5 \\
        --out /tmp/kd/distill.json

Writes one JSON record: command, commit, machine, date, each run (training command, checkpoint
step, steps and seconds, test accuracy ± CI) and the paired difference with its 95% CI.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import _common as C

from metaxfer.build import build_dataset
from metaxfer.cli.main import main as metaxfer_main
from metaxfer.config import config_from_dict
from metaxfer.evaluate import EvalResult, evaluate
from metaxfer.hub import load
from metaxfer.runtime import tune_allocator
from metaxfer.tasks import EpisodeSampler

TEACHER_PRESET = "omniglot/baseline_pp_resnet12_5w1s"
STUDENT_PRESET = "omniglot/distill_conv4_from_resnet12_5w1s"
DIRECT_PRESET = "omniglot/baseline_pp_5w1s"


def run_cli(args: list[str]) -> float:
    """``metaxfer ARGS`` in this process (a finished run directory is only loaded); returns its wall seconds."""
    t0 = time.perf_counter()
    if metaxfer_main(args) != 0:
        raise SystemExit(f"failed: metaxfer {' '.join(args)}")
    return round(time.perf_counter() - t0, 1)


def describe_run(run_dir: Path) -> dict[str, Any]:
    """What identifies a trained run: its command, best checkpoint, steps and training time."""
    learner = load(run_dir)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = max((r["step"] for r in records), default=0)
    seconds = max((r["seconds"] for r in records), default=0.0)
    cfg = learner.card.get("run_config") or {}
    train = cfg.get("train") or {}
    return {
        "run_dir": str(run_dir),
        "preset": cfg.get("name"),
        "train_command": learner.card.get("command"),
        "model": learner.card.get("model"),
        "teacher": ((cfg.get("model") or {}).get("learner_args") or {}).get("teacher"),
        "checkpoint_step": learner.card.get("trained_steps"),
        "trained_steps_total": steps,
        "train_seconds_total": seconds,
        "seconds_per_step": round(seconds / steps, 4) if steps else None,
        "budget": {k: train.get(k) for k in ("steps", "batch_size", "optimizer", "lr", "tasks_per_step")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-run", required=True, help="run directory of the ResNet-12 teacher")
    parser.add_argument("--student-run", required=True, help="run directory of the distilled Conv4")
    parser.add_argument("--direct-run", required=True, help="run directory of the Conv4 trained on labels alone")
    parser.add_argument("--train", action="store_true", help="train / resume the three runs first (through the CLI)")
    parser.add_argument("--steps", type=int, default=25000, help="training steps of the student and the direct Conv4")
    parser.add_argument("--teacher-steps", type=int, default=25000, help="training steps of the teacher")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for all three training commands (repeatable)")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-teacher-eval", action="store_true",
                        help="do not score the teacher on the test episodes")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    tune_allocator()
    teacher_run, student_run, direct_run = Path(args.teacher_run), Path(args.student_run), Path(args.direct_run)
    wall: dict[str, float] = {}
    if args.train:
        # Options before the overrides: argparse takes the positional overrides as one block.
        wall["teacher"] = run_cli(["train", "--config", TEACHER_PRESET, "--run-dir", str(teacher_run), "--no-test",
                                   f"train.steps={args.teacher_steps}", *args.override])
        wall["direct"] = run_cli(["train", "--config", DIRECT_PRESET, "--run-dir", str(direct_run), "--no-test",
                                  f"train.steps={args.steps}", *args.override])
        wall["student"] = run_cli(["distill", "--config", STUDENT_PRESET, "--teacher", str(teacher_run),
                                   "--run-dir", str(student_run), "--no-test", f"train.steps={args.steps}",
                                   *args.override])

    runs = {"teacher": describe_run(teacher_run), "student": describe_run(student_run),
            "direct": describe_run(direct_run)}
    for name, seconds in wall.items():
        runs[name]["seconds_this_call"] = seconds
    if runs["student"]["budget"] != runs["direct"]["budget"]:
        print(f"warning: the student and the direct run differ in budget: {runs['student']['budget']} vs "
              f"{runs['direct']['budget']}", file=sys.stderr)

    # The same fixed test episodes for every model, from the student's data config.
    student = load(student_run)
    cfg = config_from_dict(student.card["run_config"])
    test_set = build_dataset(cfg.data, cfg.data.test_split)
    episodes = EpisodeSampler(test_set, args.ways, args.shots, args.queries, seed=args.seed).fixed_episodes(
        args.episodes, seed=args.seed)
    protocol = f"{cfg.data.dataset} {cfg.data.args.get('protocol', '')} {cfg.data.test_split}".replace("  ", " ")
    results: dict[str, EvalResult] = {}
    for name, run_dir in (("student", student_run), ("direct", direct_run), ("teacher", teacher_run)):
        if name == "teacher" and args.skip_teacher_eval:
            continue
        t0 = time.perf_counter()
        results[name] = evaluate(student if name == "student" else load(run_dir), episodes, protocol=protocol)
        runs[name]["test"] = {**results[name].to_dict(), "eval_seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name:8s} {results[name].line()}", flush=True)

    difference = {
        "what": "student - direct, per-episode paired difference of accuracy (percentage points)",
        **C.paired_difference(results["student"].accuracies, results["direct"].accuracies,
                              wins="student_better", losses="direct_better"),
    }
    print(f"difference student - direct: {difference['mean']:+.2f} ± {difference['ci95']:.2f} points "
          f"(95% CI, {difference['n']} paired episodes)")
    record = {
        "experiment": "Conv4 Baseline++ distilled from a ResNet-12 Baseline++ teacher vs the same Conv4 trained "
                      "directly with the same budget, Omniglot",
        "episodes": {"n": args.episodes, "ways": args.ways, "shots": args.shots, "queries": args.queries,
                     "seed": args.seed, "protocol": protocol, "fingerprint": results["student"].fingerprint},
        "runs": runs,
        "difference": difference,
        "command": "python benchmarks/distill_omniglot.py " + " ".join(sys.argv[1:]),
    }
    C.write_record(record, args.out)


if __name__ == "__main__":
    main()
