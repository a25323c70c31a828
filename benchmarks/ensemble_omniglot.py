"""Ensemble of ProtoNet + MAML + Baseline++ vs the best single member on the same fixed Omniglot test episodes.

Usage (the members are zoo names, model directories or training run directories):

    METAXFER_DATA=../shared/data .venv/bin/python benchmarks/ensemble_omniglot.py \
        --member protonet-omniglot-5w1s \
        --member benchmarks/resumable/maml_omniglot_5w1s_phase2 \
        --member benchmarks/resumable/baseline_pp_omniglot_5w1s \
        --out benchmarks/results/ensemble_omniglot_5w1s.json

Every member and the ensemble (:class:`metaxfer.transfer.Ensemble`, the average
of the members' softmax probabilities by default) are evaluated with
:func:`metaxfer.evaluate` on the SAME fixed episodes (600 by default, 5-way
1-shot, 15 queries per class, seed 0: the episodes of ``metaxfer eval`` and
``benchmarks/omniglot_accuracy.py``, whose fingerprint is recorded). Reports
each as mean ± 95% CI over the episodes, and the paired per-episode
difference ensemble − best member (mean ± 1.96·s/√n of the differences),
which is much tighter than comparing the two intervals. The best member is
picked on these same episodes, which favours the member: a positive
difference is conservative.

Writes one JSON record (command, commit, machine, date) with ``--out``, and
prints it as the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import _common as C

from metaxfer.build import build_dataset
from metaxfer.config import config_from_dict
from metaxfer.errors import MetaxferError
from metaxfer.evaluate import evaluate
from metaxfer.hub import load, resolve
from metaxfer.runtime import tune_allocator
from metaxfer.tasks import EpisodeSampler
from metaxfer.transfer import Ensemble

DEFAULT_MEMBERS = [
    "protonet-omniglot-5w1s",
    "benchmarks/resumable/maml_omniglot_5w1s_phase2",
    "benchmarks/resumable/baseline_pp_omniglot_5w1s",
]


def locate(name: str) -> str:
    """A member name as given, or relative to the repository root (so the defaults work from any folder)."""
    if not Path(name).exists() and (C.REPO / name).exists():
        return str(C.REPO / name)
    return name


def data_key(learner) -> tuple:
    """What must agree between members for them to be tested on one set of episodes."""
    cfg = config_from_dict(learner.card["run_config"])
    return cfg.data.dataset, json.dumps(cfg.data.args, sort_keys=True), cfg.data.test_split


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--member", action="append", help="zoo name, model or run directory (repeat; default: "
                        + ", ".join(DEFAULT_MEMBERS) + ")")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--combine", choices=("probs", "logits"), default="probs")
    parser.add_argument("--weights", type=float, nargs="+", help="one weight per member (default: uniform)")
    parser.add_argument("--data-root", help="dataset folder (default: $METAXFER_DATA/omniglot)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args()
    tune_allocator()
    C.set_threads(args.threads)
    names = args.member or DEFAULT_MEMBERS
    try:
        members = [load(locate(name), device=args.device) for name in names]
        keys = {data_key(m) for m in members}
        if len(keys) != 1:
            print(f"ensemble_omniglot: error: the members were tested on different data {sorted(keys)}; ensemble "
                  "models of one dataset", file=sys.stderr)
            return 2
        ensemble = Ensemble(members, weights=args.weights, combine=args.combine)
    except MetaxferError as e:
        print(f"ensemble_omniglot: error: {e}", file=sys.stderr)
        return 2
    cfg = config_from_dict(members[0].card["run_config"])
    if args.data_root:
        cfg.data.root = args.data_root
    test_set = build_dataset(cfg.data, cfg.data.test_split)
    episodes = EpisodeSampler(test_set, args.ways, args.shots, args.queries, seed=args.seed).fixed_episodes(
        args.episodes, seed=args.seed)
    protocol = " ".join(str(p) for p in (cfg.data.dataset, cfg.data.args.get("protocol"), cfg.data.test_split) if p)

    rows, member_records, results = [], [], []
    for name, learner in zip(names, members):
        t0 = time.perf_counter()
        res = evaluate(learner, episodes, protocol=protocol, progress=args.progress)
        seconds = time.perf_counter() - t0
        results.append(res)
        print(f"{name}: {res.line()}", flush=True)
        member_records.append({"member": name, "path": str(resolve(locate(name))), "class": type(learner).__name__,
                               "checkpoint_step": learner.card.get("trained_steps"), "seconds": seconds,
                               "result": res.to_dict()})
        rows.append([name, type(learner).__name__, f"{res.mean:.2f} ± {res.ci95:.2f}"])
    t0 = time.perf_counter()
    ens = evaluate(ensemble, episodes, protocol=protocol, progress=args.progress)
    ens_seconds = time.perf_counter() - t0
    print(f"ensemble: {ens.line()}", flush=True)
    assert all(r.fingerprint == ens.fingerprint for r in results)  # one set of episodes for all
    best = max(range(len(members)), key=lambda i: results[i].mean)
    vs_best = C.paired_difference(ens.accuracies, results[best].accuracies)
    vs_each = {names[i]: C.paired_difference(ens.accuracies, results[i].accuracies) for i in range(len(members))}
    rows.append([f"ensemble ({args.combine})", "Ensemble", f"{ens.mean:.2f} ± {ens.ci95:.2f}"])
    human = (C.table(rows, ["member", "class", "accuracy % (95% CI)"])
             + f"\nensemble - best member ({names[best]}): {vs_best['mean']:+.2f} ± {vs_best['ci95']:.2f} "
               f"percentage points (paired over {vs_best['n']} episodes; wins/ties/losses "
               f"{vs_best['wins']}/{vs_best['ties']}/{vs_best['losses']})")
    command = "python benchmarks/ensemble_omniglot.py " + " ".join(
        [*(f"--member {n}" for n in names), f"--episodes {args.episodes}", f"--ways {args.ways}",
         f"--shots {args.shots}", f"--queries {args.queries}", f"--seed {args.seed}", f"--combine {args.combine}",
         *([f"--weights {' '.join(map(str, args.weights))}"] if args.weights else []),
         *([f"--out {args.out}"] if args.out else [])])
    record = {
        "benchmark": "ensemble_omniglot",
        "protocol": protocol,
        "episodes": {"n": ens.n, "ways": ens.ways, "shots": ens.shots, "queries": ens.queries, "seed": ens.seed,
                     "fingerprint": ens.fingerprint},
        "members": member_records,
        "ensemble": {"combine": args.combine, "weights": list(ensemble.weights), "seconds": ens_seconds,
                     "result": ens.to_dict()},
        "best_member": names[best],
        "best_member_note": "picked on these same test episodes, which favours it",
        "ensemble_minus_best_member": vs_best,
        "ensemble_minus_each_member": vs_each,
        "command": command,
    }
    C.emit(C.stamp(record), human, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
