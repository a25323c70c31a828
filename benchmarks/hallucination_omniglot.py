"""Feature hallucination vs its ProtoNet control on the same fixed Omniglot test episodes, paired.

Usage (after training both presets; they differ only in the learner, see the preset comment):

    METAXFER_DATA=../shared/data .venv/bin/metaxfer train --config omniglot/hallucination_20w1s --run-dir runs/hallucination_20w1s
    METAXFER_DATA=../shared/data .venv/bin/metaxfer train --config omniglot/protonet_20w1s --run-dir runs/protonet_20w1s
    METAXFER_DATA=../shared/data .venv/bin/python benchmarks/hallucination_omniglot.py \
        --hallucination runs/hallucination_20w1s --control runs/protonet_20w1s \
        --out benchmarks/results/hallucination_vs_protonet_20w1s.json

Both learners are evaluated on the same 600 fixed 20-way 1-shot episodes (seed 0, 15 queries
per class). Each is reported as mean ± 95% CI (1.96·s/√n); because the episodes are shared, the
comparison is the per-episode difference (hallucination − control) with its own 95% CI, which is
much tighter than the two separate intervals suggest. Hallucination's ``adapt`` draws its seeds
and noise from a generator seeded per call (seed 0 by default, ``--adapt-seed``), so the figures
are deterministic. The runs must agree on backbone, data and training budget (``train`` section)
unless ``--allow-mismatch`` is given; the differences found are recorded either way.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import _common as C

from metaxfer.build import build_dataset
from metaxfer.config import config_from_dict
from metaxfer.evaluate import evaluate
from metaxfer.hub import load
from metaxfer.runtime import tune_allocator
from metaxfer.tasks import EpisodeSampler

# What may differ between a treatment run and its control: which learner, and the run's labels.
ALLOWED = {"name", "description", "run_dir", "model.learner", "model.learner_args"}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in ALLOWED:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def mismatches(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Config keys (other than :data:`ALLOWED`) whose values differ between two run configs."""
    fa, fb = flatten(a), flatten(b)
    return [{"key": k, "hallucination": fa.get(k), "control": fb.get(k)}
            for k in sorted(set(fa) | set(fb)) if k not in ALLOWED and fa.get(k) != fb.get(k)]


class SeededAdapt:
    """``learner`` as :func:`metaxfer.evaluate` sees it, with ``adapt(..., seed=seed)`` (no patching of the learner)."""

    def __init__(self, learner: Any, seed: int) -> None:
        self.learner, self.seed = learner, seed
        self.transductive = learner.transductive

    def parameters(self) -> Any:
        return self.learner.parameters()

    def adapt(self, support_x: Any, support_y: Any) -> Any:
        return self.learner.adapt(support_x, support_y, seed=self.seed)


def run_summary(run_dir: Path, learner: Any) -> dict[str, Any]:
    """Which checkpoint was evaluated and the run's budget (from metrics.jsonl)."""
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.is_file() else []
    return {
        "run_dir": str(run_dir),
        "preset": learner.card["run_config"].get("name"),
        "learner": learner.card["run_config"]["model"]["learner"],
        "learner_args": learner.card["run_config"]["model"].get("learner_args", {}),
        "train_command": learner.card.get("command"),
        "checkpoint_step": learner.card.get("trained_steps"),
        "trained_steps_total": max((r["step"] for r in records), default=0),
        "train_seconds_total": max((r.get("seconds", 0) for r in records), default=0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hallucination", required=True, help="run directory of the hallucination learner")
    parser.add_argument("--control", required=True, help="run directory of the ProtoNet control")
    parser.add_argument("--ways", type=int, default=20)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0, help="seed of the fixed test episodes")
    parser.add_argument("--adapt-seed", type=int, default=0, help="seed of hallucination's adapt (noise and seeds)")
    parser.add_argument("--allow-mismatch", action="store_true",
                        help="compare runs whose backbone, data or training budget differ (recorded in the output)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    tune_allocator()
    hal_dir, ctl_dir = Path(args.hallucination), Path(args.control)
    hal, ctl = load(hal_dir), load(ctl_dir)
    hal_cfg, ctl_cfg = hal.card["run_config"], ctl.card["run_config"]
    diff = mismatches(hal_cfg, ctl_cfg)
    if diff and not args.allow_mismatch:
        keys = ", ".join(d["key"] for d in diff)
        sys.exit(f"the runs are not a controlled comparison: they differ in {keys}; retrain the control with the "
                 "same settings (or pass --allow-mismatch to compare anyway, recorded in the output)")
    seeded = "seed" in inspect.signature(hal.adapt).parameters
    cfg = config_from_dict(hal_cfg)
    test_set = build_dataset(cfg.data, cfg.data.test_split)
    episodes = EpisodeSampler(test_set, args.ways, args.shots, args.queries, seed=args.seed).fixed_episodes(
        args.episodes, seed=args.seed)
    protocol = f"{cfg.data.dataset} {cfg.data.args.get('protocol', '')} {cfg.data.test_split}".replace("  ", " ")
    results = {}
    for name, learner in (("hallucination", SeededAdapt(hal, args.adapt_seed) if seeded else hal), ("control", ctl)):
        res = evaluate(learner, episodes, protocol=protocol)
        print(f"{name:13s} {res.line()}", flush=True)
        results[name] = res
    paired = {
        **C.paired_difference(results["hallucination"].accuracies, results["control"].accuracies),
        "definition": "per-episode accuracy (percentage points) of hallucination minus control, "
                      "mean ± 1.96·s/√n over the shared episodes",
    }
    print(f"paired difference (hallucination − control): {paired['mean']:+.2f} ± {paired['ci95']:.2f} points "
          f"(95% CI, {paired['n']} episodes; wins/ties/losses {paired['wins']}/{paired['ties']}/{paired['losses']})",
          flush=True)
    record = {
        "protocol": f"{protocol}, {args.ways}-way {args.shots}-shot, {args.queries} queries per class, "
                    f"{args.episodes} fixed episodes, seed {args.seed}",
        "hallucination": {**run_summary(hal_dir, hal), "adapt_seed": args.adapt_seed if seeded else None,
                          "result": results["hallucination"].to_dict()},
        "control": {**run_summary(ctl_dir, ctl), "result": results["control"].to_dict()},
        "paired_difference": paired,
        "config_mismatches": diff,
        "command": "python benchmarks/hallucination_omniglot.py " + " ".join(sys.argv[1:]),
    }
    C.write_record(record, args.out)


if __name__ == "__main__":
    main()
