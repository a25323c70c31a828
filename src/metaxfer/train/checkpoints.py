"""Checkpoint directories of a run, with atomic pointers to the latest and best.

Layout::

    run_dir/checkpoints/step-00000500/   config.json model.safetensors trainer.json trainer.safetensors
    run_dir/checkpoints/latest           text file naming the newest complete checkpoint
    run_dir/checkpoints/best             text file naming the best-on-validation checkpoint

A checkpoint directory is renamed into place only once complete, and a
pointer is replaced atomically only after that, so a crash at any moment
leaves the previous checkpoint loadable. Directories no pointer names are
deleted after the pointers move.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from metaxfer.atomic import atomic_write_text
from metaxfer.errors import CheckpointError
from metaxfer.train.state import load_state


class Checkpoints:
    """The ``checkpoints/`` folder of a run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir) / "checkpoints"

    @staticmethod
    def name(step: int) -> str:
        """Directory name of the checkpoint taken after ``step`` steps."""
        return f"step-{step:08d}"

    def pointer(self, which: str) -> Path | None:
        """The checkpoint directory ``latest`` or ``best`` points to, if any."""
        f = self.root / which
        if not f.is_file():
            return None
        target = self.root / f.read_text(encoding="utf-8").strip()
        return target if target.is_dir() else None

    def point(self, which: str, directory: Path) -> None:
        """Atomically make ``which`` point to ``directory``."""
        atomic_write_text(self.root / which, directory.name + "\n")

    def prune(self) -> None:
        """Delete checkpoint directories no pointer names (and leftovers of interrupted writes)."""
        keep = {p.name for p in (self.pointer("latest"), self.pointer("best")) if p is not None}
        if not self.root.is_dir():
            return
        for d in self.root.iterdir():
            if d.is_dir() and d.name not in keep and (d.name.startswith("step-") or d.name.startswith(".step-")):
                shutil.rmtree(d, ignore_errors=True)

    def complete(self) -> list[str]:
        """Names of the complete checkpoint directories, oldest first (interrupted writes are ``.step-*``)."""
        if not self.root.is_dir():
            return []
        return sorted(d.name for d in self.root.iterdir() if d.is_dir() and d.name.startswith("step-"))

    def latest_state(self) -> tuple[Path, dict] | None:
        """``(directory, trainer state)`` of the latest checkpoint, or ``None`` if the run has none.

        Raises:
            CheckpointError: when checkpoints exist but ``latest`` does not name one of them (a
                deleted or hand-edited pointer). Starting from step 0 instead would go on to delete
                those checkpoints, so the error says how to pick one or start over.
        """
        latest = self.pointer("latest")
        if latest is not None:
            return latest, load_state(latest, "trainer")
        present = self.complete()
        if not present:
            return None
        f = self.root / "latest"
        named = f.read_text(encoding="utf-8").strip() if f.is_file() else None
        problem = f"{f} names {named!r}, which is not there" if named is not None else f"{f} is missing"
        raise CheckpointError(
            f"cannot resume: {problem}, but the run has checkpoints {present}; write the one to resume from into "
            f"that file (e.g. echo {present[-1]} > {f}), or start over with --restart (resume=False), which deletes them"
        )
