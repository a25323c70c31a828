"""``metaxfer predict``: classify a user's images with a few labelled examples per class.

The practitioner's path: a zoo or trained model, a *support* folder laid out as
``support/CLASS_NAME/*.png`` (a few labelled images per class) and a *query*
folder of unlabelled images (flat or nested). The model is adapted to the
support set with ``learner.adapt`` (for ProtoNet: class prototypes) after
``learner.preprocess`` turns every image into exactly the tensors the model
was trained on, and one CSV row per query image is written::

    file,predicted_class,confidence,circle,square,triangle
    a.png,circle,0.9871,0.9871,0.0104,0.0025

``file`` is relative to the query folder; ``confidence`` is the softmax
probability of the predicted class; then one probability column per class in
the support folder's (sorted) class order. Unreadable query images are skipped
with a warning that names them; the others are still predicted.

Example:
    $ metaxfer predict --model protonet-omniglot-5w1s --support my_support --query my_queries --out predictions.csv
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Any

from metaxfer.errors import ConfigError, DataError

_BATCH = 256  # query images per forward pass: bounds memory on large query folders


def predict_folder(
    learner: Any,
    support: str | Path,
    query: str | Path,
    device: str = "cpu",
    batch_size: int = _BATCH,
) -> tuple[list[str], list[str], Any, list[tuple[Path, str]]]:
    """Adapt ``learner`` to the ``support`` folder and classify the images under ``query``.

    Args:
        learner: a loaded learner with ``preprocess`` and ``adapt`` (``metaxfer.load(...)``).
        support: ``support/CLASS_NAME/*.png``, at least two classes.
        query: a folder of images (searched recursively) or one image file.
        device: where the tensors go (the learner must already be there).
        batch_size: query images per forward pass.

    Returns:
        ``(class_names, files, probabilities, skipped)``: the support classes;
        query file names relative to ``query``; ``float32 [len(files), ways]``
        probabilities; ``(path, reason)`` of unreadable query images (also
        reported in one :class:`~metaxfer.data.image_folder.UnreadableImageWarning`).

    Raises:
        ConfigError: a regression model (it has no classes), or a learner that carries no preprocessing.
        DataError: a bad support folder (see :class:`~metaxfer.data.image_folder.ImageFolder`),
            or a query folder with no readable image.
    """
    import torch
    import torch.nn.functional as F

    from metaxfer.data.image_folder import (
        ImageFolder,
        list_images,
        load_images,
        warn_skipped,
    )
    from metaxfer.data.images import ImagePreprocess

    if getattr(learner, "loss_fn", None) is F.mse_loss:
        # A MAML-family learner built with loss=mse fits real-valued outputs (sinusoid regression): it has no
        # classes, so asking for image preprocessing (the message below) would send the user the wrong way.
        data = (getattr(learner, "card", None) or {}).get("data")
        dataset = data.get("dataset") if isinstance(data, dict) else None
        raise ConfigError(
            f"this model is a regression model{f' (trained on {dataset} tasks)' if dataset else ''}: it predicts "
            "real-valued outputs, fitted with the mean squared error, not classes, so it cannot classify images; "
            "use a classification model: a zoo model (see `metaxfer models`) or one trained with `metaxfer train` "
            "on an image dataset"
        )
    pre = getattr(learner, "preprocessor", None)
    if not isinstance(pre, ImagePreprocess):
        raise ConfigError(
            "this model carries no image preprocessing, so predict cannot know how to turn your images into its "
            "inputs; use a zoo model or one trained with `metaxfer train` (or saved after setting "
            "learner.preprocessor to an ImagePreprocess)"
        )
    support_set = ImageFolder(support, preprocess=pre)
    query_root = Path(query).expanduser()
    if query_root.is_file():
        files, base = [query_root], query_root.parent
    elif query_root.is_dir():
        files, base = list_images(query_root), query_root
    else:
        raise DataError(f"query folder {query_root} does not exist; pass a folder of images (or one image) with --query")
    if not files:
        raise DataError(f"{query_root} holds no images (looked for .png, .jpg, .jpeg, .bmp, .gif, .webp, recursively)")
    pixels, kept, skipped = load_images(files, pre)
    if kept:
        warn_skipped(skipped, f"query images under {query_root} (the others are predicted)")
    else:
        listing = "; ".join(f"{p} ({why})" for p, why in skipped[:5])
        raise DataError(f"none of the {len(files)} query images under {query_root} could be read: {listing}")

    support_x, support_y = support_set.tensors()
    predictor = learner.adapt(support_x.to(device), support_y.to(device))
    probs = []
    with torch.no_grad():
        for start in range(0, len(kept), batch_size):
            x = pre.from_pixels(pixels[start : start + batch_size]).to(device)
            logits = predictor(x)
            if logits.dim() != 2 or logits.shape[-1] != support_set.num_classes:
                raise ConfigError(
                    f"the model gives {tuple(logits.shape)} outputs for {x.shape[0]} images but the support folder has "
                    f"{support_set.num_classes} classes; it has a fixed number of ways: give it a support folder with "
                    f"that many classes, or use a model that adapts to any number (e.g. a ProtoNet)"
                )
            probs.append(torch.softmax(logits.float(), dim=-1).cpu())
    names = [files[i].relative_to(base).as_posix() for i in kept]
    return support_set.class_names, names, torch.cat(probs), skipped


def write_csv(out: Any, class_names: list[str], files: list[str], probs: Any, digits: int = 6) -> None:
    """Rows ``file, predicted_class, confidence, <one probability per class>`` into the text stream ``out``."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["file", "predicted_class", "confidence", *class_names])
    confidence, predicted = probs.max(dim=-1)
    for name, c, conf, row in zip(files, predicted.tolist(), confidence.tolist(), probs.tolist()):
        writer.writerow([name, class_names[c], f"{conf:.{digits}f}", *(f"{p:.{digits}f}" for p in row)])


def cmd_predict(args: argparse.Namespace) -> int:
    """Adapt a model to a labelled support folder and write predictions for the query images as CSV."""
    import warnings

    from metaxfer.atomic import atomic_write_text
    from metaxfer.hub import load

    learner = load(args.model, device=args.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        class_names, files, probs, skipped = predict_folder(learner, args.support, args.query, args.device,
                                                            args.batch_size)
    # Shown in the CLI's words (naming the files), without Python's "file:line: Category" prefix.
    for w in caught:
        print(f"metaxfer predict: warning: {w.message}", file=sys.stderr)
    buffer = io.StringIO()
    write_csv(buffer, class_names, files, probs)
    if args.out == "-":
        sys.stdout.write(buffer.getvalue())
    else:
        atomic_write_text(args.out, buffer.getvalue())
        print(f"predicted {len(files)} image(s) into {len(class_names)} classes ({', '.join(class_names)}); "
              f"wrote {args.out}" + (f"; skipped {len(skipped)} unreadable" if skipped else ""), file=sys.stderr)
    return 0


def add_predict_parser(sub: Any) -> None:
    """Register ``metaxfer predict`` on the sub-parsers of the ``metaxfer`` command."""
    p = sub.add_parser("predict", help="classify your images: a labelled support folder (CLASS/*.png) + query images -> CSV")
    p.add_argument("--model", required=True, metavar="NAME_OR_DIR",
                   help="zoo name (see `metaxfer models`), model directory or run directory")
    p.add_argument("--support", required=True, metavar="DIR", help="labelled examples: DIR/CLASS_NAME/*.png, 2+ classes")
    p.add_argument("--query", required=True, metavar="DIR", help="images to classify (searched recursively), or one image")
    p.add_argument("--out", default="predictions.csv", help="CSV to write, '-' for stdout (default predictions.csv)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=_BATCH, help=f"query images per forward pass (default {_BATCH})")
    p.set_defaults(func=cmd_predict)
