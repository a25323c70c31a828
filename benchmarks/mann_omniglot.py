"""Per-instance accuracy of a trained MANN run on fixed Omniglot test sequences (Santoro et al. 2016, table 1).

Usage (after `metaxfer train --config omniglot/mann_5w --run-dir runs/mann_5w`):

    METAXFER_DATA=../shared/data OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mann_omniglot.py \
        --run-dir runs/mann_5w --out benchmarks/results/mann_omniglot_5w.json

Each test sequence is one fixed episode of the run's test split (600 by default, seed 0): ``ways``
classes x ``instances`` examples, support and query concatenated and shuffled with a generator seeded
by ``--seed`` (:func:`metaxfer.learners.memory.instance_accuracy`), labels shown one step late. The
record holds, for the 1st, 2nd, 5th and 10th presentation of a class, the mean accuracy over the
sequences (percent) ± the 95% CI half-width 1.96·s/√n, plus the episode fingerprint, the checkpoint
step, the command, commit, machine and date (the format of ``omniglot_accuracy.py``).

The paper's figures (table 1: MANN, 5 classes, one-hot labels, 20x20 Omniglot) are
36.4 / 82.8 / 94.9 / 98.1 % at the 1st / 2nd / 5th / 10th instance.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import _common as C
import torch

from metaxfer.build import build_dataset
from metaxfer.config import config_from_dict
from metaxfer.evaluate.evaluate import mean_ci95
from metaxfer.hub import load
from metaxfer.learners.memory import MANN, instance_accuracy
from metaxfer.runtime import tune_allocator
from metaxfer.tasks import EpisodeSampler

PAPER = {1: 36.4, 2: 82.8, 5: 94.9, 10: 98.1}


def machine() -> str:
    """CPU model, torch threads and platform of this machine."""
    return f"{C.cpu_model()}, {torch.get_num_threads()} torch threads, {platform.system()} {platform.machine()}"


def commit() -> str:
    """Current git commit, with -dirty when tracked files have changes."""
    info = C.git_commit()
    return f"{info['commit'][:7]}{'-dirty' if info['dirty'] else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="a `metaxfer train` run directory (or a saved model)")
    parser.add_argument("--ways", type=int, default=None, help="classes per sequence (default: the run's train.ways)")
    parser.add_argument("--instances", type=int, default=10, help="examples of each class per sequence")
    parser.add_argument("--report", default="1,2,5,10", help="which presentations to report")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0, help="seed of the episodes and of the sequence order")
    parser.add_argument("--split", default=None, help="data split (default: the run's test split)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    tune_allocator()
    learner = load(args.run_dir)
    if not isinstance(learner, MANN):
        sys.exit(f"{args.run_dir} holds a {type(learner).__name__}, not a MANN; train omniglot/mann_5w first")
    cfg = config_from_dict(learner.card["run_config"])
    if args.data_root:
        cfg.data.root = args.data_root
    split = args.split or cfg.data.test_split
    ways = args.ways or cfg.train.ways
    instances = [int(k) for k in args.report.split(",")]
    if args.instances < 2 or max(instances) > args.instances:
        sys.exit(f"--instances must be >= 2 and >= every reported presentation ({max(instances)})")
    test_set = build_dataset(cfg.data, split)
    # A sequence of `instances` examples per class is an episode with instances - 1 shots and 1 query.
    episodes = EpisodeSampler(test_set, ways, args.instances - 1, 1, seed=args.seed).fixed_episodes(
        args.episodes, seed=args.seed)
    acc = instance_accuracy(learner, episodes, instances, seed=args.seed)
    results = []
    for k in instances:
        mean, ci, std = mean_ci95([100.0 * v for v in acc[k].tolist()])
        results.append({"instance": k, "mean": mean, "ci95": ci, "std": std, "n": len(episodes),
                        "paper": PAPER.get(k)})
        print(f"instance {k:>2}: {mean:6.2f} ± {ci:.2f} %  (paper {PAPER.get(k, '-')})", flush=True)
    records = []
    metrics = Path(args.run_dir) / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    record = {
        "run_dir": str(args.run_dir),
        "preset": cfg.name,
        "train_command": learner.card.get("command"),
        "checkpoint_step": learner.card.get("trained_steps"),
        "trained_steps_total": max((r["step"] for r in records), default=None),
        "train_seconds_total": max((r["seconds"] for r in records), default=None),
        "protocol": {"dataset": cfg.data.dataset, "data_args": cfg.data.args, "split": split, "ways": ways,
                     "instances_per_class": args.instances, "sequence_length": ways * args.instances,
                     "labels": "one-hot, shown one step late", "order_seed": args.seed,
                     "transductive": False, **episodes.describe()},
        "results": results,
        "command": "python benchmarks/mann_omniglot.py " + " ".join(sys.argv[1:]),
        "commit": commit(),
        "machine": machine(),
        "date": dt.date.today().isoformat(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
