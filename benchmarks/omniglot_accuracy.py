"""Evaluate a trained Omniglot run on fixed test episodes and record the figures.

Usage (after `metaxfer train --config omniglot/protonet_5w1s --run-dir runs/protonet_5w1s`):

    METAXFER_DATA=../shared/data .venv/bin/python benchmarks/omniglot_accuracy.py \
        --run-dir runs/protonet_5w1s --eval 5,1 --eval 20,1 --out benchmarks/results/protonet_5w1s.json

Writes one JSON record with, per (ways, shots): mean ± 95% CI over 600 fixed episodes
(seed 0, 15 queries per class), the episode fingerprint, the checkpoint's step, and the
wall-clock time at which validation accuracy first reached --target (from metrics.jsonl).
--transductive normalises each episode's queries with their own BatchNorm batch statistics
(the "transduction" rows of the MAML and Reptile papers) instead of the support statistics;
for Relation Networks, support and queries together, as in training (the authors' test code).
--one-query-per-class (with --transductive) predicts the queries in batches of one per class, the test
batches of the reference MAML and Reptile code, whose transductive figures those papers report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _common as C

from metaxfer.build import build_dataset
from metaxfer.config import config_from_dict
from metaxfer.errors import ConfigError
from metaxfer.evaluate import evaluate
from metaxfer.hub import load
from metaxfer.runtime import tune_allocator
from metaxfer.tasks import EpisodeSampler


def time_to(records: list[dict], target: float) -> dict | None:
    """First validation record reaching ``target`` percent: its step and wall-clock seconds."""
    for r in records:
        if r.get("val_accuracy") is not None and r["val_accuracy"] >= target:
            return {"step": r["step"], "seconds": r["seconds"], "val_accuracy": r["val_accuracy"]}
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--eval", action="append", required=True, help="ways,shots (repeatable)")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=97.0, help="validation accuracy for time-to-accuracy")
    parser.add_argument("--transductive", action="store_true",
                        help="BatchNorm on the query batch's own statistics (gradient-based learners, Relation Networks)")
    parser.add_argument("--one-query-per-class", action="store_true",
                        help="with --transductive: query batches of one query per class (reference MAML/Reptile code)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.one_query_per_class and not args.transductive:
        parser.error("--one-query-per-class changes only transductive predictions; add --transductive")
    tune_allocator()
    run_dir = Path(args.run_dir)
    learner = load(run_dir)
    if args.transductive:
        try:
            learner.set_transductive(True)
        except ConfigError as e:
            raise SystemExit(f"--transductive: {e}") from None
    cfg = config_from_dict(learner.card["run_config"])
    test_set = build_dataset(cfg.data, cfg.data.test_split)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    results = []
    for spec in args.eval:
        ways, shots = (int(v) for v in spec.split(","))
        episodes = EpisodeSampler(test_set, ways, shots, args.queries, seed=args.seed).fixed_episodes(args.episodes, seed=args.seed)
        protocol = f"{cfg.data.dataset} {cfg.data.args.get('protocol', '')} {cfg.data.test_split}".replace("  ", " ")
        res = evaluate(learner, episodes, protocol=protocol,
                       query_batches="one_per_class" if args.one_query_per_class else "all")
        print(res.line(), flush=True)
        results.append(res.to_dict())
    record = {
        "run_dir": str(run_dir),
        "preset": cfg.name,
        "train_command": learner.card.get("command"),
        "checkpoint_step": learner.card.get("trained_steps"),
        "trained_steps_total": max((r["step"] for r in records), default=0),
        "train_seconds_total": max((r["seconds"] for r in records), default=0),
        f"time_to_val_{args.target:g}": time_to(records, args.target),
        "transductive": bool(getattr(learner, "transductive", False)),
        "results": results,
        "eval_command": "python benchmarks/omniglot_accuracy.py " + " ".join(
            f"--eval {e}" for e in args.eval) + (" --transductive" if args.transductive else "")
        + (" --one-query-per-class" if args.one_query_per_class else "")
        + f" --run-dir {args.run_dir} --out {args.out}",
    }
    C.write_record(record, args.out)


if __name__ == "__main__":
    main()
