"""Metrics of a run as JSONL and CSV, and a learning-curve PNG."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

COLUMNS = ["step", "loss", "accuracy", "mse", "lr", "seconds", "val_accuracy", "val_ci95", "val_mse"]


class MetricsLog:
    """Appends one record per logged step to ``metrics.jsonl`` and ``metrics.csv``.

    On resume, records after the checkpoint's step are dropped first, so the
    files describe exactly one uninterrupted history.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and self.jsonl.exists():
            for line in self.jsonl.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    rec = json.loads(line)
                    if rec.get("step", 0) <= resume_step:
                        self.records.append(rec)
        self._rewrite()

    def _rewrite(self) -> None:
        with open(self.jsonl, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in self.records)
        with open(self.csv, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.records)

    def append(self, record: dict[str, Any]) -> None:
        """Add one record (a dict with at least ``step``)."""
        self.records.append(record)
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        with open(self.csv, "a", encoding="utf-8", newline="") as f:
            csv.DictWriter(f, COLUMNS, extrasaction="ignore").writerow(record)


def plot_learning_curve(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Training loss and accuracy, and validation accuracy (or MSE) ± CI, against step. Needs matplotlib (the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed (pip install 'metaxfer[plot]'); skipping %s", path)
        return None
    train = [r for r in records if r.get("loss") is not None]
    val = [r for r in records if r.get("val_accuracy") is not None]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8)
        with_acc = [r for r in train if r.get("accuracy") is not None]
        if with_acc:
            ax_acc.plot([r["step"] for r in with_acc], [100 * r["accuracy"] for r in with_acc], lw=0.8, label="train episodes")
    if val:
        steps = [r["step"] for r in val]
        acc = [r["val_accuracy"] for r in val]
        ci = [r.get("val_ci95") or 0.0 for r in val]
        ax_acc.errorbar(steps, acc, yerr=ci, marker="o", ms=3, capsize=2, label="validation ± 95% CI")
    val_mse = [r for r in records if r.get("val_mse") is not None]
    if val_mse:  # regression runs (sinusoids): validation MSE ± CI instead of accuracy
        ax_acc.errorbar([r["step"] for r in val_mse], [r["val_mse"] for r in val_mse],
                        yerr=[r.get("val_ci95") or 0.0 for r in val_mse], marker="o", ms=3, capsize=2,
                        label="validation ± 95% CI")
    ax_loss.set(xlabel="step", ylabel="training loss", yscale="log")
    ax_acc.set(xlabel="step", ylabel="validation MSE" if val_mse and not val else "accuracy (%)")
    if ax_acc.get_legend_handles_labels()[0]:  # a run without accuracy or validation has nothing to label
        ax_acc.legend(loc="upper right" if val_mse and not val else "lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
