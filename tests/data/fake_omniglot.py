"""Tiny fake Omniglot zips in the official layout, for the data tests (no real data, no downloads)."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

# alphabet -> number of characters; 20 images per character as in Omniglot.
BACKGROUND = {"Alpha_A": 3, "Beta_B": 2}
EVALUATION = {"Gamma_C": 3}
IMAGES_PER_CHARACTER = 20

SPLITS = {
    "train": ["Alpha_A/character01", "Alpha_A/character02", "Gamma_C/character01"],
    "val": ["Beta_B/character01", "Gamma_C/character02"],
    "test": ["Alpha_A/character03", "Beta_B/character02", "Gamma_C/character03"],
}


def png_bytes(rng: np.random.Generator) -> bytes:
    """A 105x105 mode "1" PNG: white paper with a few random dark strokes (like Omniglot)."""
    canvas = np.ones((105, 105), dtype=bool)
    for _ in range(3):
        r, c = rng.integers(10, 95, size=2)
        h, w = rng.integers(2, 30, size=2)
        canvas[r : r + h, c : c + 3] = False
        canvas[r : r + 3, c : c + w] = False
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")  # bool array -> mode "1"
    return buf.getvalue()


def write_omniglot_zip(
    path: Path,
    alphabets: Mapping[str, int],
    seed: int = 0,
    replace: Mapping[str, bytes] | None = None,
    compression: int = zipfile.ZIP_DEFLATED,
) -> list[str]:
    """Write ``path`` (its stem is the top folder) in the official layout; returns the PNG member names.

    ``replace`` maps member names to bytes written instead of the generated PNG.
    """
    rng = np.random.default_rng(seed)
    top = path.stem
    members: list[str] = []
    char_id = 1 + seed * 1000
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        zf.writestr(f"{top}/", b"")
        for alphabet, n_chars in alphabets.items():
            zf.writestr(f"{top}/{alphabet}/", b"")
            for c in range(1, n_chars + 1):
                folder = f"{top}/{alphabet}/character{c:02d}"
                zf.writestr(folder + "/", b"")
                for k in range(1, IMAGES_PER_CHARACTER + 1):
                    name = f"{folder}/{char_id:04d}_{k:02d}.png"
                    data = png_bytes(rng)
                    zf.writestr(name, (replace or {}).get(name, data))
                    members.append(name)
                char_id += 1
    return members
