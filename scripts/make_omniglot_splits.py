"""Make the committed Omniglot "vinyals" character splits (run once; the output is package data).

Why not the original files: the split files of Vinyals et al. 2016 (used as
``data/omniglot/splits/vinyals/*.txt`` in the ProtoNet code of Snell et al.
2017) were not available offline when metaxfer was written. This script
therefore makes a *character-level random split of the same sizes*:
1028 train / 172 val / 423 test characters (1200 train+val, as in those papers),
each later rotated by 0/90/180/270 degrees by :class:`metaxfer.data.Omniglot`.
Results are comparable in protocol, not split-for-split identical.

Procedure (deterministic, documented so anyone can re-derive the files):

1. List every ``ALPHABET/characterNN`` of ``images_background.zip`` and
   ``images_evaluation.zip`` (1623 in all) and sort them (Python string order).
   Only member *names* are used, so any copy of the official zips gives the same list.
2. ``torch.randperm(1623, generator=torch.Generator().manual_seed(0))``.
3. Characters at permutation positions 0..1027 are train, the next 172 val,
   the last 423 test.
4. Each list is written sorted, one character per line, to
   ``src/metaxfer/data/splits/omniglot_vinyals/{train,val,test}.txt``.

Usage:
    python scripts/make_omniglot_splits.py [--root DIR] [--check]

``--root`` defaults to ``$METAXFER_DATA/omniglot``, else ``../shared/data/omniglot``
next to the repository. ``--check`` verifies the committed files instead of writing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "src" / "metaxfer" / "data" / "splits" / "omniglot_vinyals"
SIZES = (("train", 1028), ("val", 172), ("test", 423))
SEED = 0


def make_splits(characters: list[str], seed: int = SEED) -> dict[str, list[str]]:
    """Split sorted ``characters`` (1623 of them) into sorted train/val/test lists."""
    total = sum(n for _, n in SIZES)
    if len(characters) != total:
        raise SystemExit(f"expected {total} characters in the two zips, found {len(characters)}; use the complete official zips")
    ordered = sorted(characters)
    perm = torch.randperm(len(ordered), generator=torch.Generator().manual_seed(seed)).tolist()
    out: dict[str, list[str]] = {}
    start = 0
    for name, n in SIZES:
        out[name] = sorted(ordered[i] for i in perm[start : start + n])
        start += n
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", type=Path, default=None, help="folder with images_background.zip and images_evaluation.zip")
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing them")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing
    from metaxfer.data.omniglot import ZIP_NAMES, list_characters

    root = args.root
    if root is None:
        env = os.environ.get("METAXFER_DATA")
        root = Path(env) / "omniglot" if env else REPO.parent / "shared" / "data" / "omniglot"
    characters = [c for name in ZIP_NAMES for c in list_characters(root / name)]
    splits = make_splits(characters)

    bad = 0
    for name, chars in splits.items():
        text = "\n".join(chars) + "\n"
        path = OUT_DIR / f"{name}.txt"
        if args.check:
            same = path.is_file() and path.read_text(encoding="utf-8") == text
            print(f"{path}: {'ok' if same else 'DIFFERS'} ({len(chars)} characters)")
            bad += not same
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path} ({len(chars)} characters)")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
