"""``metaxfer distill``: train a student by knowledge distillation from a trained teacher.

The command is ``metaxfer train`` with the teacher filled in: it resolves
``--teacher`` (a run directory, model directory or zoo name) to the teacher's
checkpoint, checks that teacher and student fit together (same training data,
same base classes, a teacher with a classifier), and then runs the train
command's own path — run directory, resume, checkpoints, validation and the
final test on the fixed episodes — with ``model.learner_args.teacher`` set to
that checkpoint. The command recorded in the run's checkpoints is that
equivalent ``metaxfer train`` line.

The preset either trains learner ``distill`` (``learner_args``: ``student``,
``temperature``, ``alpha`` and the student's own arguments), e.g.
``omniglot/distill_conv4_from_resnet12_5w1s``, or any transfer preset
(``baseline``, ``baseline_pp``, ``finetune``), whose model becomes the student:
with the teacher's own preset that is born-again self-distillation (Tian et
al. 2020). Either way the run directory holds checkpoints of the student alone
(see :class:`metaxfer.transfer.Distill`), which ``metaxfer eval`` and
:func:`metaxfer.load` use like any Baseline / Baseline++ checkpoint.

Example:
    $ metaxfer train --config omniglot/baseline_pp_resnet12_5w1s --run-dir runs/teacher
    $ metaxfer distill --config omniglot/distill_conv4_from_resnet12_5w1s --teacher runs/teacher --run-dir runs/student
    $ metaxfer distill --config omniglot/baseline_pp_resnet12_5w1s --teacher runs/teacher --run-dir runs/gen1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

from metaxfer.errors import CheckpointError, ConfigError

STUDENTS = ("baseline", "baseline_pp", "finetune")
_HINT = ("train the teacher first, e.g. `metaxfer train --config omniglot/baseline_pp_resnet12_5w1s`, and pass its "
         "run directory")


def resolve_teacher(teacher: str) -> tuple[Path, str]:
    """The teacher's checkpoint directory and the value recorded for it in the run's config.

    A zoo name is recorded as the name; a run or model directory as the
    absolute path of the checkpoint it resolves to (the best one of a run),
    so the record names exactly the weights distilled from.

    Raises:
        CheckpointError: when nothing loadable is there, saying what to pass.
    """
    from metaxfer.hub import list_zoo, resolve

    try:
        directory = resolve(teacher)
    except CheckpointError as e:
        raise CheckpointError(f"--teacher {teacher}: {e}; {_HINT}") from None
    if not Path(teacher).exists() and teacher in list_zoo():
        return directory, teacher
    return directory, str(directory.resolve())


def _data_identity(data: dict[str, Any]) -> dict[str, Any]:
    # The root only says where the files are; dataset, arguments and split say which classes and labels.
    return {"dataset": data.get("dataset"), "args": data.get("args") or {}, "train_split": data.get("train_split")}


def check_teacher(card: dict[str, Any], cfg: Any, teacher: str) -> None:
    """Check a teacher's saved config against the student's run config before any data is loaded.

    Raises:
        ConfigError: a teacher without a classifier over base classes, another
            number of base classes, or other training data (its labels would
            not be the student's).
    """
    model = card.get("model") or {}
    if model.get("learner") not in STUDENTS:
        raise ConfigError(f"--teacher {teacher} is a {model.get('learner') or 'non-metaxfer'} model, which has no "
                          f"classifier over the base classes to distil from; use a teacher trained with learner "
                          f"{', '.join(STUDENTS)} (train.sampler: classes, e.g. omniglot/baseline_pp_resnet12_5w1s)")
    teacher_classes = (model.get("learner_args") or {}).get("num_base_classes")
    student_classes = cfg.model.learner_args.get("num_base_classes")
    if teacher_classes is not None and student_classes is not None and teacher_classes != student_classes:
        raise ConfigError(f"the teacher classifies {teacher_classes} base classes but the student {student_classes}; "
                          f"set model.learner_args.num_base_classes={teacher_classes} (both must be trained over the "
                          "same classes)")
    run_config = card.get("run_config") or {}
    if "data" not in run_config:
        warnings.warn(f"--teacher {teacher} records no training data; cannot check that its classes are the "
                      "student's", RuntimeWarning, stacklevel=2)
        return
    theirs, ours = _data_identity(run_config["data"]), _data_identity(dataclasses.asdict(cfg.data))
    if theirs != ours:
        raise ConfigError(f"the teacher was trained on {theirs} but this run trains on {ours}: the teacher's class "
                          "labels would not be the student's; set data.dataset / data.args / data.train_split to the "
                          "teacher's, or use a teacher trained on this data")


def cmd_distill(args: argparse.Namespace) -> int:
    """Distil a teacher into the preset's student through the ``metaxfer train`` path, then test the student."""
    from metaxfer.cli.main import cmd_train
    from metaxfer.config import load_config
    from metaxfer.hub import read_config

    cfg = load_config(args.config, args.overrides)
    directory, recorded = resolve_teacher(args.teacher)
    check_teacher(read_config(directory), cfg, args.teacher)
    overrides = list(args.overrides)
    if cfg.model.learner != "distill":
        if cfg.model.learner not in STUDENTS:
            raise ConfigError(f"preset {args.config} trains learner {cfg.model.learner!r}, which cannot be a student; "
                              f"use a distillation preset (model.learner: distill, e.g. "
                              f"omniglot/distill_conv4_from_resnet12_5w1s) or a {', '.join(STUDENTS)} preset")
        # The preset's model becomes the student; its own run directory name would be the teacher's.
        overrides = [f"name={cfg.name}_distilled", *overrides, "model.learner=distill",
                     f"model.learner_args.student={cfg.model.learner}"]
    overrides.append(f"model.learner_args.teacher={json.dumps(recorded)}")
    final = load_config(args.config, overrides)
    run_dir = Path(args.run_dir or final.run_dir or Path("runs") / final.name).resolve()
    if directory.resolve().is_relative_to(run_dir):
        raise ConfigError(f"the run directory {run_dir} holds the teacher's checkpoint {directory}: the student would "
                          "resume from (and overwrite) the teacher; give --run-dir a new folder")
    return int(cmd_train(argparse.Namespace(**{**vars(args), "overrides": overrides, "init": None})))


def add_distill_parser(sub: Any) -> None:
    """Register ``metaxfer distill`` on the sub-parsers of the ``metaxfer`` command."""
    p = sub.add_parser("distill", help="train a student by knowledge distillation: metaxfer distill --config "
                       "omniglot/distill_conv4_from_resnet12_5w1s --teacher RUN_DIR [train.steps=100 ...]")
    p.add_argument("--config", required=True, help="a distillation preset (model.learner: distill) or a baseline / "
                   "baseline_pp / finetune preset whose model is the student (see `metaxfer configs`), or a YAML path")
    p.add_argument("--teacher", required=True, metavar="RUN_DIR_OR_ZOO_NAME",
                   help="the teacher: a training run directory (its best checkpoint), a model directory or a zoo name")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100 "
                   "model.learner_args.temperature=4 model.learner_args.alpha=0.5")
    p.add_argument("--run-dir", help="where the student's checkpoints and metrics go (default: runs/<name>)")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints in the run directory")
    p.add_argument("--no-test", action="store_true", help="skip the final test evaluation")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: on a terminal)")
    p.set_defaults(func=cmd_distill)
