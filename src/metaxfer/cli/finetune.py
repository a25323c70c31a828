"""``metaxfer finetune``: fine-tune a trained model or a pretrained backbone on your own labelled image folder.

The transfer-learning path of timm's ``train.py`` for a user's classes: take
the feature extractor of a zoo model, a trained run or model directory, or a
registered backbone (``efficientnet_lite0 --pretrained`` for ImageNet
weights), put a new classifier head over the classes of ``--train``
(``train/CLASS_NAME/*.png``, the torchvision ``ImageFolder`` layout) and train
it with :func:`metaxfer.transfer.finetune` in one of three modes:

* ``linear``: linear probe, the backbone frozen, only the head trains;
* ``full``: every parameter not matched by ``--freeze`` trains;
* ``lpft`` (default): linear probe for ``--lp-epochs``, then full fine-tuning
  from the fitted head (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained
  Features and Underperform Out-of-Distribution", ICLR), which keeps the large
  early gradients of a random head from distorting the pretrained features.

Images go through the source model's own preprocessing (a bare backbone
takes ``--image-size``/``--image-mode``/``--invert``, or the ImageNet
preprocessing of its pretrained weights). With ``--val`` the held-out accuracy
is measured after every epoch and the best epoch is kept; ``--test`` reports
the accuracy of the final model on another held-out folder (mean ± 95% CI
over its images). The result is written atomically to ``--out`` as a
``baseline`` (linear head) or ``baseline_pp`` (cosine head) learner whose
pretraining classes are your classes:

* ``metaxfer.load(OUT)`` rebuilds it; ``learner.head(learner.backbone(x))``
  gives logits over ``learner.card["class_names"]`` for ``x =
  learner.preprocess(images)``;
* ``metaxfer predict --model OUT --support DIR --query DIR`` adapts a new head
  on the fine-tuned features to a support folder, as for any model;
* :func:`metaxfer.evaluate` treats it as a few-shot learner (a new head per
  task on the fine-tuned features, as :class:`~metaxfer.transfer.Baseline`).

Example:
    $ metaxfer finetune --model protonet-omniglot-5w1s --train my_train --test my_test --out my_model
    $ metaxfer finetune --model efficientnet_lite0 --pretrained --train photos/train --val photos/val \\
          --mode lpft --epochs 10 --freeze backbone.stem --layer-lr backbone=0.001 --out photos_model
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from metaxfer.config import load_yaml, value_kind
from metaxfer.errors import CheckpointError, ConfigError, DataError, MetaxferError

logger = logging.getLogger(__name__)

MODES = ("linear", "full", "lpft")
_EVAL_BATCH = 256  # images per forward pass when measuring accuracy


def _key_values(items: list[str] | None, flag: str, example: str) -> dict[str, Any]:
    """``["key=value", ...]`` with YAML-parsed values (``pretrained=true``, ``hidden=4``).

    ``example`` is a valid ``KEY=VALUE`` of ``flag`` for the error message (each option has its own keys).
    """
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{flag} {item!r} must look like KEY=VALUE, e.g. {flag} {example}")
        key, raw = item.split("=", 1)
        out[key.strip()] = load_yaml(raw) if raw else None
    return out


def _layer_lrs(items: list[str] | None) -> dict[str, float]:
    """``--layer-lr PATTERN=LR`` values as ``{pattern: learning rate}``, each a finite number > 0."""
    out: dict[str, float] = {}
    for pattern, value in _key_values(items, "--layer-lr", "backbone=0.001").items():
        lr = math.nan
        # YAML reads `true` as a bool and an empty value as None: neither is a rate (float(True) would be 1.0).
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                lr = float(value)  # also a quoted number ('0.001')
            except ValueError:
                lr = math.nan
        if not 0 < lr < math.inf:
            shown = "" if value is None else _yaml_value(value)
            raise ConfigError(f"--layer-lr {pattern}={shown} needs a learning rate, a number > 0, e.g. --layer-lr "
                              f"{pattern or 'backbone'}=0.001 (to keep parameters fixed, use --freeze)")
        out[pattern] = lr
    return out


def _check_numbers(args: argparse.Namespace) -> None:
    """Reject numeric options that torch would answer with a traceback, or that would train silently wrong."""
    for flag, value in (("--lr", args.lr), ("--lp-lr", args.lp_lr)):
        # nan passes torch's `lr < 0` check and turns every weight into nan; 0 trains nothing.
        if value is not None and not 0 < value < math.inf:
            raise ConfigError(f"{flag} must be > 0 (a learning rate such as 0.01), got {value}")
    if not 0 <= args.momentum < 1:
        # Momentum >= 1 never forgets old gradients: the updates grow without bound instead of converging.
        raise ConfigError(f"--momentum must be >= 0 and < 1 (0.9 is usual, 0 for plain SGD), got {args.momentum}")
    if not 0 <= args.weight_decay < math.inf:
        # A negative decay pushes weights away from zero, growing them every step.
        raise ConfigError(f"--weight-decay must be >= 0 (e.g. 0.0005; 0 for none), got {args.weight_decay}")


def _feature_args(args: dict[str, Any]) -> dict[str, Any]:
    """Backbone arguments for a features-only copy that builds without downloads.

    A backbone built with ``num_classes`` ends in its own classifier (MAML's
    Conv4, ImageNet's EfficientNet); fine-tuning puts a new head on the
    features, so that classifier goes. ``pretrained`` weights are copied from
    the source module instead of being loaded again.
    """
    out = dict(args)
    if out.get("num_classes") is not None:
        out["num_classes"] = None
    if out.get("pretrained"):
        out["pretrained"] = False
    return out


def _create(name: str, args: dict[str, Any]) -> Any:
    from metaxfer.backbones.registry import create

    try:
        return create(name, **args)
    except MetaxferError:
        raise  # already says what to change (missing weights package, bad MLP widths, ...)
    except (TypeError, ValueError, RuntimeError) as e:
        # A value the constructor cannot use (hidden=-1, norm='abc') surfaces from deep inside torch; name
        # the arguments so the message points at the option to change.
        shown = ", ".join(f"{k}={v!r}" for k, v in args.items()) or "no arguments"
        raise ConfigError(f"backbone {name!r} cannot be built with {shown}: {e}; "
                          "check --backbone-arg") from None


def _yaml_value(value: Any) -> str:
    """``value`` as a ``KEY=VALUE`` command-line value reads it back (``true``, ``[40,40]``, ``batchnorm``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(_yaml_value, value)) + "]"
    return str(value)


def _takes_pretrained(name: str) -> bool:
    """Whether backbone ``name`` has a ``pretrained`` argument (weights to load), from its signature alone."""
    from metaxfer.backbones.registry import BACKBONES

    found = BACKBONES.parameters(name)
    return found is not None and "pretrained" in found[0]


def _check_backbone_args(name: str, args: dict[str, Any], pretrained: bool) -> None:
    """Check ``--backbone-arg`` names and kinds and ``--pretrained`` against backbone ``name``'s signature.

    A wrong kind otherwise fails deep inside torch with a message that names neither the argument nor its
    value (``hidden='abc'`` gives "not all arguments converted during string formatting").
    """
    from metaxfer.backbones.registry import BACKBONES, list_backbones

    found = BACKBONES.parameters(name)
    if found is None:
        return  # a factory taking **kwargs we cannot see through: the constructor's own error is reported
    params, hints = found
    if pretrained and "pretrained" not in params:
        others = [b for b in list_backbones() if _takes_pretrained(b)]
        raise ConfigError(f"backbone {name!r} has no pretrained weights, so --pretrained does not apply: drop it to "
                          "train from random weights"
                          + (f", or use a backbone that has them ({', '.join(others)})" if others else ""))
    unknown = [k for k in args if k not in params]
    if unknown:
        given = " ".join(f"--backbone-arg {k}={_yaml_value(args[k])}" for k in unknown)
        raise ConfigError(f"backbone {name!r} has no argument {', '.join(map(repr, unknown))} ({given}); "
                          f"it takes: {', '.join(params)}")
    for key, value in args.items():
        kind = value_kind(hints.get(key))
        if kind is not None and not kind[0](value):
            default = params[key].default
            example = ("" if default is inspect.Parameter.empty or default is None
                       else f" (its default: --backbone-arg {key}={_yaml_value(default)})")
            raise ConfigError(f"--backbone-arg {key}={_yaml_value(value)}: backbone {name!r} expects {kind[1]} "
                              f"for {key!r}, got {value!r} ({type(value).__name__}){example}")


def _find_backbone(learner: Any, name: str, args: dict[str, Any]) -> Any:
    """The sub-module of ``learner`` that is its ``name(**args)`` backbone (same keys and shapes)."""
    probe = _create(name, _without_download(args))
    want = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    for _, module in learner.named_modules():
        if type(module) is type(probe) and {k: tuple(v.shape) for k, v in module.state_dict().items()} == want:
            return module
    raise ConfigError(f"cannot find the {name} backbone inside this {type(learner).__name__} model, so there is "
                      "nothing to fine-tune; use a model whose learner holds its backbone (ProtoNet, MAML, "
                      "Baseline, ...) or give a backbone name")


def _without_download(args: dict[str, Any]) -> dict[str, Any]:
    return {**args, "pretrained": False} if args.get("pretrained") else dict(args)


def _features_of(source: Any, name: str, args: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A features-only backbone with the weights of ``source`` (its own classifier, if any, dropped)."""
    feature_args = _feature_args(args)
    backbone = _create(name, feature_args)
    state = source.state_dict()
    own = backbone.state_dict()
    missing = [k for k in own if k not in state or state[k].shape != own[k].shape]
    if missing:
        raise ConfigError(f"the {name} backbone without its classifier does not match the model's weights "
                          f"(e.g. {missing[0]!r}); this model cannot be fine-tuned by name, rebuild it in Python")
    backbone.load_state_dict({k: state[k] for k in own})
    return backbone, feature_args


def load_source(model: str, backbone_args: dict[str, Any] | None = None, pretrained: bool = False,
                image: dict[str, Any] | None = None) -> tuple[Any, str, dict[str, Any], dict[str, Any]]:
    """The feature extractor to fine-tune, with its spec and preprocessing.

    Args:
        model: a zoo name, a model or run directory (its learner's backbone
            is used), or a registered backbone name.
        backbone_args: arguments of a backbone given by name.
        pretrained: build a backbone given by name with ``pretrained=True``.
        image: ``ImagePreprocess`` fields (``size``, ``mode``, ``invert``) for a
            backbone given by name; ``None`` uses the backbone's
            ``pretrained_preprocess`` when it has one.

    Returns:
        ``(backbone, name, feature_args, preprocess)``: a features-only module
        ``[N, C, H, W] -> [N, D]`` with the source's weights, the backbone's
        registry name and arguments (no classifier, no download) for the saved
        spec, and the ``ImagePreprocess`` dict of its inputs.

    Raises:
        ConfigError: an unknown name, options that do not apply to the source,
            or a source without preprocessing and no ``image`` options.
    """
    from metaxfer.backbones.registry import list_backbones
    from metaxfer.hub import list_zoo, load, resolve

    backbone_args = dict(backbone_args or {})
    try:
        directory = resolve(model)
    except CheckpointError:
        directory = None
    if directory is not None:
        if backbone_args or pretrained:
            raise ConfigError(f"--backbone-arg and --pretrained apply to a backbone name; {model!r} is a trained model "
                              "whose architecture and weights are fixed: drop them")
        if image:
            raise ConfigError(f"{model!r} carries the preprocessing it was trained with; drop --image-size, "
                              "--image-mode and --invert (your images are converted the way its training images were)")
        learner = load(directory)
        spec, preprocess = learner.card.get("model") or {}, learner.card.get("preprocess")
        if not spec or not preprocess:
            raise ConfigError(f"{directory} does not record its architecture and image preprocessing; save it with "
                              "metaxfer.save from a learner built by metaxfer.build_learner with a preprocess")
        name, args = spec["backbone"], dict(spec.get("backbone_args") or {})
        backbone, feature_args = _features_of(_find_backbone(learner, name, args), name, args)
        return backbone, name, feature_args, dict(preprocess)
    if model not in list_backbones():
        raise ConfigError(f"--model {model!r} is neither a model (zoo: {', '.join(list_zoo()) or 'none'}; or a model / "
                          f"run directory) nor a backbone name ({', '.join(list_backbones())})")
    _check_backbone_args(model, backbone_args, pretrained)
    if pretrained:
        backbone_args["pretrained"] = True
    preprocess: dict[str, Any] | None = None
    if image:
        from metaxfer.data.images import ImagePreprocess

        if "size" not in image:
            raise ConfigError("--image-mode and --invert need --image-size (the input side in pixels)")
        pre = ImagePreprocess(**{"mode": "RGB", "invert": False, "resample": "bilinear", **image})
        preprocess = pre.to_dict()
        backbone_args.setdefault("in_channels", pre.channels)
    source = _create(model, backbone_args)
    if preprocess is None:
        preprocess = getattr(source, "pretrained_preprocess", None)
        if preprocess is None:
            raise ConfigError(f"backbone {model!r} does not say how images become its inputs: pass --image-size "
                              "(and --image-mode L|RGB, --invert as needed)")
    backbone, feature_args = _features_of(source, model, backbone_args)
    return backbone, model, feature_args, dict(preprocess)


def _labelled(folder: str, preprocess: dict[str, Any], class_names: list[str] | None = None) -> tuple[Any, Any, Any]:
    """``(x float32 [N, C, H, W], y int64 [N], dataset)`` of an image folder, labels by ``class_names``."""
    import torch

    from metaxfer.data.image_folder import ImageFolder

    data = ImageFolder(folder, preprocess=preprocess, min_classes=2 if class_names is None else 1)
    x, y = data.tensors()
    if class_names is not None:
        unknown = [c for c in data.class_names if c not in class_names]
        if unknown:
            raise DataError(f"{folder} has class folder(s) {', '.join(unknown)} that the training folder does not; "
                            f"the model knows only {', '.join(class_names)}: remove or rename them")
        y = torch.tensor([class_names.index(c) for c in data.class_names], dtype=torch.long)[y]
    return x, y, data


def _accuracy(model: Any, x: Any, y: Any, device: str) -> tuple[float, float, int]:
    """Accuracy in percent, its 95% CI half-width over the images, and the number of images."""
    from metaxfer.evaluate.evaluate import mean_ci95
    from metaxfer.transfer.heads import extract_features

    logits = extract_features(model, x, batch_size=_EVAL_BATCH, transform=lambda batch: batch.to(device))
    correct = (logits.argmax(-1).cpu() == y).float().mul(100).tolist()
    mean, ci, _ = mean_ci95(correct)
    return mean, ci, len(correct)


def _check_trainable(model: Any, mode: str, freeze: list[str], frozen: set[str], layer_lr_hits: dict[str, list[str]],
                     lp_epochs: int) -> None:
    """Refuse a ``--freeze`` that leaves a stage nothing to train, and ``--layer-lr`` patterns on untrained parameters.

    What each mode trains (see :func:`metaxfer.transfer.finetune`): ``linear`` the head only (the backbone is
    frozen on top of ``--freeze``); ``full`` every parameter; ``lpft`` the head in its linear probe, then every
    parameter. Otherwise the run "trains" fixed weights, reports the untouched model's accuracy and saves it.
    """
    names = [n for n, _ in model.named_parameters()]
    head = [n for n in names if n.startswith("head.")]
    trained = [n for n in (head if mode == "linear" else names) if n not in frozen]
    patterns = " ".join(freeze)
    if not trained:
        what = {"linear": "the head, head.*: linear probing always keeps the backbone fixed",
                "full": "all of backbone.* and head.*",
                "lpft": "the head, head.*, in the linear probe, then all of backbone.* and head.*"}[mode]
        fix = ("drop the head from --freeze (--mode linear already keeps the backbone fixed)" if mode == "linear"
               else "freeze less, e.g. --freeze backbone to keep the features and train the head")
        raise ConfigError(f"nothing left to train: --freeze {patterns} covers every parameter that --mode {mode} "
                          f"trains ({what}); {fix}")
    if mode == "lpft" and lp_epochs > 0 and all(n in frozen for n in head):
        raise ConfigError(f"--freeze {patterns} covers the whole head, so the linear probe of --mode lpft would "
                          "train nothing and the full fine-tuning would start from a random head; use --mode full "
                          "to fine-tune the backbone under the fixed head, or unfreeze the head")
    untrained = [p for p, hits in layer_lr_hits.items() if not set(hits) & set(trained)]
    if untrained:
        why = "frozen by --freeze" + (", or in the backbone, which --mode linear keeps fixed" if mode == "linear"
                                      else "")
        raise ConfigError(f"--layer-lr pattern(s) {', '.join(map(repr, untrained))} match only parameters that do not "
                          f"train ({why}); drop those --layer-lr options")


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (options that differ from their defaults)."""
    parts = ["metaxfer", "finetune"]
    for action in args.finetune_parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        value = getattr(args, action.dest, None)
        if value is None or value == action.default:
            continue
        flag = action.option_strings[-1]
        if isinstance(value, bool):
            parts.append(flag)
        elif isinstance(value, list):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _check_out(out: Path, overwrite: bool) -> None:
    from metaxfer.hub import CONFIG_FILE

    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the model")
    if not any(out.iterdir()):
        return
    if not (out / CONFIG_FILE).is_file():
        raise ConfigError(f"--out {out} already holds files that are not a metaxfer model, and would be replaced; "
                          "choose a new or empty folder")
    if not overwrite:
        raise ConfigError(f"--out {out} already holds a model; pass --overwrite to replace it, "
                          "or choose another folder")


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a model on ``--train``, select on ``--val``, test on ``--test``, save to ``--out``."""
    import torch

    from metaxfer.atomic import atomic_write_dir
    from metaxfer.build import build_learner
    from metaxfer.hub import write_learner
    from metaxfer.transfer.finetune import BodyHead, finetune, flip_and_shift, match_parameters
    from metaxfer.transfer.heads import new_head

    for flag, value in (("--epochs", args.epochs), ("--lp-epochs", args.lp_epochs)):
        if value is not None and value < 0:
            raise ConfigError(f"{flag} must be >= 0, got {value}")
    if args.shift < 0:
        raise ConfigError(f"--shift must be >= 0 pixels, got {args.shift}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    _check_numbers(args)
    if args.lp_epochs is not None and args.mode != "lpft":
        raise ConfigError(f"--lp-epochs applies to --mode lpft only (got --mode {args.mode}); drop it")
    out = Path(args.out)
    _check_out(out, args.overwrite)
    layer_lrs = _layer_lrs(args.layer_lr)
    image = {k: v for k, v in (("size", args.image_size), ("mode", args.image_mode), ("invert", args.invert))
             if v is not None}
    torch.manual_seed(args.seed)  # dropout in --train-mode; the head and the batch order have their own generators
    t0 = time.perf_counter()
    backbone, name, feature_args, preprocess = load_source(
        args.model, _key_values(args.backbone_arg, "--backbone-arg", "hidden=64"), args.pretrained, image or None)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_x, train_y, train_set = _labelled(args.train, preprocess)
        class_names = train_set.class_names
        held_out = {}
        for split in ("val", "test"):
            folder = getattr(args, split)
            if folder:
                x, y, _ = _labelled(folder, preprocess, class_names)
                held_out[split] = (x, y)
    # Shown in the CLI's words (naming the skipped files), without Python's "file:line: Category" prefix.
    for w in caught:
        print(f"metaxfer finetune: warning: {w.message}", file=sys.stderr)

    backbone = backbone.to(args.device).eval()
    with torch.no_grad():
        features = backbone(train_x[:2].to(args.device))
    if features.dim() != 2:
        raise ConfigError(f"backbone {name!r} gives outputs of shape {tuple(features.shape)} for 2 images, not "
                          "[N, D] feature vectors; fine-tuning puts a linear head on flat features")
    dim, ways = int(features.shape[1]), len(class_names)
    head = new_head(args.head, dim, ways, generator=torch.Generator().manual_seed(args.seed))
    model = BodyHead(backbone, head).to(args.device)
    lp_epochs = args.epochs if args.lp_epochs is None else args.lp_epochs
    # Check every pattern before training: a typo must not cost a run.
    frozen = match_parameters(model, args.freeze, "--freeze pattern")
    _check_trainable(model, args.mode, args.freeze, {n for hits in frozen.values() for n in hits},
                     match_parameters(model, list(layer_lrs), "--layer-lr pattern"), lp_epochs)

    n = train_x.shape[0]
    per_epoch = 1 if args.batch_size >= n else n // args.batch_size  # finetune() draws whole batches per pass
    steps = args.epochs * per_epoch
    lp_steps = lp_epochs * per_epoch if args.mode == "lpft" else 0
    freeze = [*args.freeze, "backbone"] if args.mode == "linear" else list(args.freeze)

    best: dict[str, Any] = {}
    callback = None
    if "val" in held_out:
        val_x, val_y = held_out["val"]

        def callback(stage: str, step: int, tuned: Any) -> None:
            total = lp_steps if stage == "linear_probe" else steps
            if step % per_epoch and step != total:
                return
            epoch = math.ceil(step / per_epoch)
            acc, _, _ = _accuracy(tuned, val_x, val_y, args.device)
            logger.info("%s epoch %d/%d: val accuracy %.2f %%", stage.replace("_", " "), epoch,
                        math.ceil(total / per_epoch), acc)
            if not best or acc > best["accuracy"]:
                best.update(accuracy=acc, stage=stage, epoch=epoch,
                            state={k: v.detach().clone() for k, v in tuned.state_dict().items()})

    tuned = finetune(model, train_x.to(args.device), train_y.to(args.device), steps=steps, lr=args.lr, freeze=freeze,
                     layer_lrs=layer_lrs, lp_ft=args.mode == "lpft", lp_steps=lp_steps, lp_lr=args.lp_lr, head="head",
                     batch_size=args.batch_size, momentum=args.momentum, weight_decay=args.weight_decay,
                     train_mode=args.train_mode, seed=args.seed, callback=callback,
                     augment=flip_and_shift(args.shift, args.hflip) if args.shift or args.hflip else None)
    if best:
        tuned.load_state_dict(best["state"])
    seconds = time.perf_counter() - t0

    results: dict[str, Any] = {}
    lines = [(f"fine-tuned {args.model} ({args.mode}) on {n} images of {ways} classes ({', '.join(class_names)}): "
              f"{lp_steps + steps} steps of batch {min(args.batch_size, n)} in {seconds:.1f} s")]
    for split, (x, y) in held_out.items():
        acc, ci, count = _accuracy(tuned, x, y, args.device)
        results[split] = {"accuracy": acc, "ci95": ci, "n": count, "folder": str(getattr(args, split))}
        where = f", best epoch: {best['stage'].replace('_', ' ')} {best['epoch']}" if split == "val" and best else ""
        lines.append(f"{split} accuracy: {acc:.2f} ± {ci:.2f} % (95% CI, {count} images{where})")
    if best:
        results["selected"] = {"stage": best["stage"], "epoch": best["epoch"]}

    learner_name = "baseline" if args.head == "linear" else "baseline_pp"
    spec = {"learner": learner_name, "backbone": name, "backbone_args": feature_args,
            "learner_args": {"num_base_classes": ways, "feature_dim": dim}}
    learner = build_learner(spec, preprocess=preprocess)
    learner.load_state_dict({k: v.detach().cpu() for k, v in tuned.state_dict().items()})
    command = _command(args)
    card = {
        "name": out.name,
        "accuracy": (f"{results['test']['accuracy']:.2f} ± {results['test']['ci95']:.2f} % (95% CI, "
                     f"{results['test']['n']} test images)") if "test" in results else None,
        "class_names": class_names,
        "source": args.model,
        "finetune": {"mode": args.mode, "epochs": args.epochs, "lp_epochs": lp_epochs if args.mode == "lpft" else None,
                     "steps": steps, "lp_steps": lp_steps, "batch_size": args.batch_size, "lr": args.lr,
                     "lp_lr": args.lp_lr, "layer_lrs": layer_lrs, "freeze": freeze, "head": args.head,
                     "momentum": args.momentum, "weight_decay": args.weight_decay, "train_mode": args.train_mode,
                     "shift": args.shift, "hflip": args.hflip, "seed": args.seed},
        "data": train_set.describe(),
        "results": results,
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
    }
    extra = {"card": card, "class_names": class_names, "command": command}
    atomic_write_dir(out, lambda tmp: write_learner(learner, tmp, extra))
    lines.append(f"saved to {out} (metaxfer.load({str(out)!r}); "
                 f"metaxfer predict --model {out} --support DIR --query DIR)")
    print("\n".join(lines), flush=True)
    return 0


def add_finetune_parser(sub: Any) -> None:
    """Register ``metaxfer finetune`` on the sub-parsers of the ``metaxfer`` command."""
    p = sub.add_parser(
        "finetune",
        help="fine-tune a model or pretrained backbone on your image folder (DIR/CLASS_NAME/*.png)",
        description="Fine-tune the feature extractor of a zoo model, a trained run / model directory or a\n"
                    "registered backbone with a new classifier head over the classes of --train\n"
                    "(DIR/CLASS_NAME/*.png), using the model's own image preprocessing.\n\n"
                    "modes: linear (head only), full (all parameters not --freeze'd), lpft (linear probe,\n"
                    "then full; Kumar et al. 2022). --val keeps the epoch with the best held-out accuracy;\n"
                    "--test reports the accuracy on another held-out folder.\n\n"
                    "The result is saved atomically to --out as a baseline (baseline_pp with --head cosine)\n"
                    "learner over your classes: metaxfer.load(OUT) rebuilds it (card['class_names'];\n"
                    "head(backbone(x)) gives the logits), and metaxfer predict --model OUT adapts a new\n"
                    "head on the fine-tuned features to a support folder.",
        epilog="examples:\n"
               "  metaxfer finetune --model protonet-omniglot-5w1s --train my_train --test my_test --out my_model\n"
               "  metaxfer finetune --model efficientnet_lite0 --pretrained --train photos/train --val photos/val \\\n"
               "      --mode full --epochs 10 --freeze backbone.stem --layer-lr backbone=0.001 --out photos_model\n"
               "  metaxfer finetune --model conv4 --backbone-arg hidden=32 --image-size 32 --train t --out m",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="NAME_OR_DIR",
                   help="zoo name (see `metaxfer models`), model or run directory, or a backbone name "
                        "(conv4, resnet12, efficientnet_lite0, ...)")
    p.add_argument("--train", required=True, metavar="DIR",
                   help="labelled training images: DIR/CLASS_NAME/*.png, 2+ classes")
    p.add_argument("--val", metavar="DIR", help="held-out images (same class names) scored after every epoch; "
                   "the best epoch is kept")
    p.add_argument("--test", metavar="DIR", help="held-out images (same class names) scored once at the end")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the fine-tuned model (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--mode", choices=MODES, default="lpft",
                   help="linear: head only; full: everything not frozen; lpft: linear probe then full (default)")
    p.add_argument("--freeze", nargs="+", action="extend", default=[], metavar="PATTERN",
                   help="parameters kept fixed: a name, a dotted prefix (backbone.features.0) or a glob "
                        "(backbone.*.bias); the model's parameters are backbone.* and head.*")
    p.add_argument("--layer-lr", action="append", metavar="PATTERN=LR",
                   help="learning rate of the parameters a pattern matches (the longest match wins), "
                        "e.g. --layer-lr backbone=0.001; repeatable")
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning passes over --train (default 10)")
    p.add_argument("--lp-epochs", type=int, help="linear-probe passes of --mode lpft (default: --epochs)")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate (default 0.01; SGD with momentum)")
    p.add_argument("--lp-lr", type=float, help="learning rate of the linear probe (default: --lr)")
    p.add_argument("-b", "--batch-size", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="SGD weight decay (default 0)")
    p.add_argument("--head", choices=("linear", "cosine"), default="linear",
                   help="the new classifier: linear (saved as a baseline learner) or cosine (Baseline++; saved as "
                        "baseline_pp)")
    p.add_argument("--shift", type=int, default=0, metavar="PIXELS",
                   help="augmentation: translate each training image by up to this many pixels (default 0)")
    p.add_argument("--hflip", action="store_true",
                   help="augmentation: mirror training images left-right at random (not for characters or digits)")
    p.add_argument("--train-mode", action="store_true",
                   help="train with BatchNorm batch statistics and dropout (updates the running statistics, frozen "
                        "layers' too); default: eval mode, BatchNorm keeps the pretrained statistics, which suits "
                        "small folders")
    p.add_argument("--seed", type=int, default=0, help="seeds the head and the batch order (default 0)")
    p.add_argument("--device", default="cpu")
    g = p.add_argument_group("backbone given by name")
    g.add_argument("--pretrained", action="store_true", help="load the backbone's pretrained (ImageNet) weights")
    g.add_argument("--backbone-arg", action="append", metavar="KEY=VALUE",
                   help="backbone argument, e.g. --backbone-arg hidden=64; repeatable")
    g.add_argument("--image-size", type=int, help="input side in pixels (default: the pretrained weights' own "
                   "preprocessing, when the backbone has one)")
    g.add_argument("--image-mode", choices=("L", "RGB"), help="L (grayscale) or RGB (default RGB)")
    g.add_argument("--invert", action="store_true", default=None,
                   help="map pixel v to 1 - v (dark strokes on white paper become 1, as Omniglot models expect)")
    p.set_defaults(func=cmd_finetune, finetune_parser=p)


if __name__ == "__main__":  # pragma: no cover
    from metaxfer.cli.main import main

    sys.exit(main(["finetune", *sys.argv[1:]]))
