"""Several trained models side by side on the same fixed Omniglot test episodes: a table and a bar plot with CIs.

Usage (models are zoo names, model directories or training run directories):

    METAXFER_DATA=../shared/data .venv/bin/python benchmarks/compare_omniglot.py \
        --model protonet-omniglot-5w1s --model maml-omniglot-5w1s \
        --model benchmarks/resumable/baseline_omniglot_5w1s --model benchmarks/resumable/baseline_pp_omniglot_5w1s \
        --eval 5,1 --eval 5,5 --out benchmarks/results/transfer_vs_meta_omniglot.json \
        --plot docs/figures/transfer_vs_meta_omniglot.png

For each ``--eval WAYS,SHOTS`` setting, every model is evaluated with
:func:`metaxfer.evaluate` on ONE set of fixed episodes (600 by default, 15
queries per class, seed 0: the episodes ``metaxfer eval`` and
``benchmarks/omniglot_accuracy.py`` use for that setting; the fingerprint is
recorded), as mean ± 95% CI over episodes. Each model is also compared with the
best one of the setting by the paired per-episode difference (mean ± 95% CI),
which is tighter than comparing two intervals.

Models are used as they were trained: a model meta-trained for 5-way 1-shot
and tested at 5 shots is simply adapted on 5 shots (the record keeps each
model's training command, so a reader sees what it was trained for).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _common as C
from ensemble_omniglot import data_key, locate

from metaxfer.build import build_dataset
from metaxfer.config import config_from_dict
from metaxfer.errors import MetaxferError
from metaxfer.evaluate import evaluate
from metaxfer.hub import load
from metaxfer.runtime import tune_allocator
from metaxfer.tasks import EpisodeSampler


def label(name: str) -> str:
    """Short display name: the zoo name, or the run directory's folder name."""
    return Path(name).name if Path(name).exists() else name


def bar_plot(settings: list[dict], episodes: int, path: str) -> None:
    """Grouped bars (one group per ways/shots setting, one bar per model) with 95% CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [row["model"] for row in settings[0]["rows"]]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(settings) * len(models) / 2, 3.6))
    for m, model in enumerate(models):
        means = [s["rows"][m]["result"]["mean"] for s in settings]
        cis = [s["rows"][m]["result"]["ci95"] for s in settings]
        xs = [i + (m - (len(models) - 1) / 2) * width for i in range(len(settings))]
        ax.bar(xs, means, width, yerr=cis, capsize=3, label=model)
    ax.set_xticks(range(len(settings)), [f"{s['ways']}-way {s['shots']}-shot" for s in settings])
    low = min(s["rows"][m]["result"]["mean"] - s["rows"][m]["result"]["ci95"] for s in settings for m in range(len(models)))
    ax.set_ylim(max(0.0, low - 2.0), 100.5)
    ax.set_ylabel("test accuracy % (95% CI)")
    ax.set_title(f"Omniglot (vinyals) test, {episodes} fixed episodes per setting")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="zoo name, model or run directory (repeat)")
    parser.add_argument("--eval", action="append", default=None, help="WAYS,SHOTS (repeat; default 5,1)")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", help="dataset folder (default: $METAXFER_DATA/omniglot)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--plot", help="PNG bar plot to write (needs matplotlib)")
    args = parser.parse_args()
    tune_allocator()
    C.set_threads(args.threads)
    try:
        models = [load(locate(name), device=args.device) for name in args.model]
    except MetaxferError as e:
        print(f"compare_omniglot: error: {e}", file=sys.stderr)
        return 2
    if len({data_key(m) for m in models}) != 1:
        print("compare_omniglot: error: the models were trained for different test data; compare models of one "
              "dataset and protocol", file=sys.stderr)
        return 2
    cfg = config_from_dict(models[0].card["run_config"])
    if args.data_root:
        cfg.data.root = args.data_root
    test_set = build_dataset(cfg.data, cfg.data.test_split)
    protocol = " ".join(str(p) for p in (cfg.data.dataset, cfg.data.args.get("protocol"), cfg.data.test_split) if p)

    settings, lines = [], []
    for spec in args.eval or ["5,1"]:
        ways, shots = (int(v) for v in spec.split(","))
        episodes = EpisodeSampler(test_set, ways, shots, args.queries, seed=args.seed).fixed_episodes(
            args.episodes, seed=args.seed)
        rows, results = [], []
        for name, learner in zip(args.model, models):
            t0 = time.perf_counter()
            res = evaluate(learner, episodes, protocol=protocol)
            print(f"{ways}-way {shots}-shot {name}: {res.line()}", flush=True)
            results.append(res)
            rows.append({"model": label(name), "source": name, "class": type(learner).__name__,
                         "train_command": learner.card.get("card", {}).get("train_command")
                         or learner.card.get("command"), "seconds": time.perf_counter() - t0,
                         "result": res.to_dict()})
        best = max(range(len(models)), key=lambda i: results[i].mean)
        for i, row in enumerate(rows):
            row["minus_best"] = None if i == best else C.paired_difference(results[i].accuracies,
                                                                               results[best].accuracies)
        settings.append({"ways": ways, "shots": shots, "fingerprint": results[0].fingerprint, "best": rows[best]["model"],
                         "rows": rows})
        table = [[r["model"], r["class"], f"{r['result']['mean']:.2f} ± {r['result']['ci95']:.2f}",
                  "best" if r["minus_best"] is None else f"{r['minus_best']['mean']:+.2f} ± {r['minus_best']['ci95']:.2f}"]
                 for r in rows]
        lines.append(f"{ways}-way {shots}-shot ({args.episodes} episodes, fingerprint {results[0].fingerprint})\n"
                     + C.table(table, ["model", "class", "accuracy % (95% CI)", "vs best (paired)"]))
    if args.plot:
        bar_plot(settings, args.episodes, args.plot)
    command = "python benchmarks/compare_omniglot.py " + " ".join(
        [*(f"--model {n}" for n in args.model), *(f"--eval {e}" for e in (args.eval or ["5,1"])),
         f"--episodes {args.episodes}", f"--queries {args.queries}", f"--seed {args.seed}",
         *([f"--out {args.out}"] if args.out else []), *([f"--plot {args.plot}"] if args.plot else [])])
    record = {"benchmark": "compare_omniglot", "protocol": protocol, "settings": settings, "command": command}
    C.emit(C.stamp(record), "\n\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
