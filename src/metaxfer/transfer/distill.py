"""Knowledge distillation (Hinton, Vinyals & Dean 2015) and born-again self-distillation (Tian et al. 2020).

A *student* transfer learner (:class:`~metaxfer.transfer.baseline.Baseline`,
:class:`~metaxfer.transfer.baseline.BaselinePlusPlus` or
:class:`~metaxfer.transfer.finetune.FineTune`) is pretrained on the same
supervised batches of all base classes as Baseline pretraining
(:class:`~metaxfer.tasks.supervised.ClassBatchSampler`), but against the
softened class distribution of a frozen *teacher* as well as the labels:

``loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)``

(Hinton et al. 2015, "Distilling the Knowledge in a Neural Network",
section 2) with student logits ``s``, teacher logits ``t``, labels ``y`` and
temperature ``T``. The ``T^2`` keeps the soft term's gradients (which scale
as ``1 / T^2``) comparable to the hard term's whatever the temperature.
``alpha`` is the weight of the teacher's (soft) term: ``alpha = 0`` is plain
Baseline pretraining on the labels, ``alpha = 1`` learns from the teacher
alone. The defaults (``T = 4``, ``alpha = 0.5``) are those of Tian et al.
2020 ("Rethinking Few-Shot Image Classification: a Good Embedding Is All You
Need", ECCV, section 3.3; their ``-r 0.5 -a 0.5``, ``kd_T = 4``).

:class:`Distill` is the learner around it: ``loss(batch)`` is the objective
above (so :func:`metaxfer.fit` trains it like any learner), ``adapt`` is the
student's own (a new head on frozen support features, as Baseline /
Baseline++), and the teacher is held *outside* the module tree — not in
``parameters()``, ``state_dict()`` or ``train()`` — so the optimiser,
checkpoints and mode switches never reach it. A :class:`Distill`'s
``state_dict`` and ``build_spec`` are its student's: a checkpoint written by
``fit`` (or :func:`metaxfer.save`) *is* a Baseline / Baseline++ checkpoint,
which :func:`metaxfer.load` rebuilds, evaluates and serves without the teacher.

Born-again networks (Furlanello et al. 2018) as used by Tian et al. 2020 for
few-shot embeddings: generation ``k + 1`` is a freshly initialised copy of the
architecture of generation ``k``, distilled from it
(:meth:`Distill.born_again`).

Registry name ``"distill"`` (``model.learner: distill``; ``learner_args``:
``teacher``, ``student`` (the student learner's registry name), ``temperature``,
``alpha``, and the student's own arguments such as ``num_base_classes``).
"""

from __future__ import annotations

import copy
import math
import numbers
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaxfer.errors import CheckpointError, ConfigError
from metaxfer.learners.base import Learner
from metaxfer.learners.registry import create_learner, register_learner
from metaxfer.tasks.episode import Episode
from metaxfer.transfer.baseline import Baseline, HeadPredictor, supervised_examples
from metaxfer.transfer.finetune import BodyHead

__all__ = ["DISTILL_ARGS", "Distill", "FrozenTeacher", "as_teacher", "distillation_loss", "soft_target_loss",
           "student_spec"]

#: ``learner_args`` of the ``"distill"`` learner that belong to distillation, not to the student.
DISTILL_ARGS = ("teacher", "student", "temperature", "alpha")

_TEACHER_HINT = ("train a teacher first, e.g. `metaxfer train --config omniglot/baseline_pp_resnet12_5w1s`, and give "
                 "its run directory")


def _check_temperature(temperature: object) -> float:
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not math.isfinite(float(temperature)) or float(temperature) <= 0):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}; set it to e.g. 4 (Tian et "
                          "al. 2020): higher values soften the teacher's distribution, 1 leaves it as it is")
    return float(temperature)


def _check_alpha(alpha: object) -> float:
    if (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(float(alpha))
            or not 0.0 <= float(alpha) <= 1.0):
        raise ConfigError(f"alpha must lie in [0, 1], got {alpha!r}; it weights the teacher's term: loss = alpha * "
                          "soft + (1 - alpha) * cross-entropy, so 0 trains on the labels alone, 1 on the teacher "
                          "alone (Tian et al. 2020 use 0.5)")
    return float(alpha)


def _check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.dim() != 2 or teacher_logits.dim() != 2:
        raise ConfigError(f"distillation needs logits of shape [N, classes]; got student {tuple(student_logits.shape)} "
                          f"and teacher {tuple(teacher_logits.shape)}: give models that end in a classifier over the "
                          "base classes (flatten any other dimensions first)")
    if student_logits.shape != teacher_logits.shape:
        (ns, cs), (nt, ct) = student_logits.shape, teacher_logits.shape
        if ns != nt:
            raise ConfigError(f"the student has logits for {ns} examples but the teacher for {nt}; score the same "
                              "batch with both")
        raise ConfigError(f"the teacher outputs {ct} classes but the student {cs}: both must classify the same base "
                          f"classes in the same order; set the student's num_base_classes "
                          f"(model.learner_args.num_base_classes) to {ct}, or use a teacher trained on the student's "
                          "training split")


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """The soft term of Hinton et al. (2015): ``T^2 * KL(softmax(t / T) || softmax(s / T))``, mean over examples.

    The teacher's logits are detached: no gradient ever reaches the teacher.
    For large ``T`` and zero-mean logits it tends to
    ``sum_c (s_c - t_c)^2 / (2 C)`` (Hinton et al., section 2.1: matching logits).

    Args:
        student_logits: ``[N, C]``.
        teacher_logits: ``[N, C]``.
        temperature: ``T > 0``.

    Returns:
        Scalar tensor.

    Raises:
        ConfigError: for ``temperature <= 0`` or logits of different shapes.

    Example:
        >>> soft_target_loss(torch.zeros(2, 3), torch.zeros(2, 3))
        tensor(0.)
    """
    t = _check_temperature(temperature)
    _check_logits(student_logits, teacher_logits)
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    return t * t * F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None,
    temperature: float = 4.0,
    alpha: float = 0.5,
) -> Tensor:
    """Knowledge-distillation objective (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network").

    ``alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)``,
    each term a mean over the ``N`` examples; the cross-entropy uses the
    student's logits at temperature 1. ``alpha = 0`` returns exactly the
    cross-entropy, ``alpha = 1`` exactly the soft term (``targets`` may then be
    ``None``). The teacher's logits are detached.

    Args:
        student_logits: ``[N, C]``.
        teacher_logits: ``[N, C]``, over the same classes in the same order.
        targets: ``[N]`` integer class labels ``0 .. C-1``; ``None`` only with ``alpha = 1``.
        temperature: ``T > 0`` softening both distributions of the soft term.
        alpha: weight of the soft (teacher) term, in ``[0, 1]``.

    Returns:
        Scalar tensor.

    Raises:
        ConfigError: for ``temperature <= 0``, ``alpha`` outside ``[0, 1]``,
            logits of different shapes, or missing / mis-shaped targets.

    Example:
        >>> s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
        >>> distillation_loss(s, t, y, temperature=4.0, alpha=0.5)
    """
    t = _check_temperature(temperature)
    a = _check_alpha(alpha)
    soft = soft_target_loss(student_logits, teacher_logits, t)
    if a == 1.0:
        return soft
    if targets is None:
        raise ConfigError(f"targets are needed for the cross-entropy term (alpha={a} < 1); pass the labels, or "
                          "alpha=1 to learn from the teacher alone")
    if targets.shape != student_logits.shape[:1]:
        raise ConfigError(f"targets must have shape [N] = [{student_logits.shape[0]}] (one class index per example), "
                          f"got {tuple(targets.shape)}")
    hard = F.cross_entropy(student_logits, targets)
    if a == 0.0:
        return hard
    return a * soft + (1.0 - a) * hard


class FrozenTeacher:
    """A frozen teacher: ``images [N, *x_shape] -> logits [N, C]`` in ``eval()`` mode, without gradients.

    Not an ``nn.Module`` on purpose: a :class:`Distill` holding one keeps it out
    of its ``parameters()``, ``state_dict()`` and ``train()``, so no optimiser,
    checkpoint or mode switch reaches it. It follows its inputs to their device
    and floating-point dtype (the first call after ``fit`` moved the student).

    Args:
        model: ``[N, *x_shape] -> [N, C]`` logits; put in ``eval()`` mode with
            ``requires_grad`` off (pass a copy you do not mind freezing:
            :class:`Distill` does).
        num_classes: ``C`` when known (checked against the student up front).
        source: where it came from (a path or zoo name), for records.
    """

    def __init__(self, model: nn.Module, num_classes: int | None = None, source: str | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.num_classes = num_classes
        self.source = source

    def _follow(self, x: Tensor) -> None:
        ref = next((t for t in (*self.model.parameters(), *self.model.buffers()) if t.is_floating_point()), None)
        if ref is None:
            return
        if ref.device != x.device or (x.is_floating_point() and ref.dtype != x.dtype):
            self.model.to(device=x.device, dtype=x.dtype if x.is_floating_point() else None)

    def __call__(self, x: Tensor) -> Tensor:
        """Teacher logits ``[N, C]`` for images ``[N, *x_shape]``; BatchNorm uses its running statistics."""
        self._follow(x)
        if self.model.training:  # someone switched it; a teacher always runs on its running statistics
            self.model.eval()
        with torch.no_grad():
            return self.model(x)

    def __repr__(self) -> str:
        return f"FrozenTeacher({type(self.model).__name__}, classes={self.num_classes}, source={self.source!r})"


def _load_teacher(path_or_name: str | os.PathLike[str]) -> Learner:
    from metaxfer.hub import load, resolve

    try:
        directory = resolve(path_or_name)
    except CheckpointError as e:
        raise CheckpointError(f"teacher {str(path_or_name)!r}: {e}; {_TEACHER_HINT}") from None
    return load(directory)


def as_teacher(teacher: nn.Module | str | os.PathLike[str]) -> FrozenTeacher:
    """Freeze ``teacher`` for distillation, without touching the caller's object.

    Args:
        teacher: a transfer learner with a classifier over the base classes
            (Baseline, Baseline++, FineTune, a :class:`Distill`'s student), any
            ``nn.Module`` mapping images to logits, or the run directory, model
            directory or zoo name of a saved one (loaded with :func:`metaxfer.load`).

    Returns:
        A :class:`FrozenTeacher` over a private deep copy (or over the loaded model).

    Raises:
        CheckpointError: for a path or name with no model.
        ConfigError: for a learner without a classifier over base classes (e.g. ProtoNet).
    """
    source: str | None = None
    owned = False
    if isinstance(teacher, (str, os.PathLike)):
        source, owned = str(teacher), True
        teacher = _load_teacher(teacher)
    if isinstance(teacher, Distill):
        teacher = teacher.student
    if not isinstance(teacher, nn.Module):
        raise ConfigError(f"the teacher must be an nn.Module, a learner, or the run directory / model directory / zoo "
                          f"name of a saved one, got {type(teacher).__name__}")
    model = teacher if owned else copy.deepcopy(teacher)  # freezing must not change the caller's module
    if isinstance(model, Learner):
        head, body = getattr(model, "head", None), getattr(model, "backbone", None)
        if not isinstance(head, nn.Module) or not isinstance(body, nn.Module):
            raise ConfigError(f"the teacher ({type(model).__name__}) has no classifier over the base classes to "
                              "distil from; use a teacher pretrained with learner baseline, baseline_pp or finetune "
                              "(train.sampler: classes, e.g. omniglot/baseline_pp_resnet12_5w1s), or pass an "
                              "nn.Module that maps images to base-class logits")
        classes = getattr(model, "num_base_classes", None)
        return FrozenTeacher(BodyHead(body, head), classes if isinstance(classes, int) else None, source)
    return FrozenTeacher(model, None, source)


def student_spec(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """The student's model spec inside a ``"distill"`` spec (the distillation arguments removed); others as they are.

    Example:
        >>> student_spec({"learner": "distill", "backbone": "conv4", "backbone_args": {},
        ...               "learner_args": {"student": "baseline_pp", "teacher": "runs/t", "num_base_classes": 5}})
        {'learner': 'baseline_pp', 'backbone': 'conv4', 'backbone_args': {}, 'learner_args': {'num_base_classes': 5}}
    """
    if not spec or spec.get("learner") != "distill":
        return spec
    args = dict(spec.get("learner_args") or {})
    name = args.get("student", "baseline")
    return {**spec, "learner": name, "learner_args": {k: v for k, v in args.items() if k not in DISTILL_ARGS}}


class Distill(Learner):
    """Knowledge distillation into a transfer learner (Hinton, Vinyals & Dean 2015; Tian et al. 2020).

    Pretraining (``loss``): on a supervised batch of all base classes (global
    labels, as Baseline's ``loss``), the student's logits ``s = head(backbone(x))``
    and the frozen teacher's logits ``t`` on the same images give
    :func:`distillation_loss` ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``.
    Adaptation (``adapt``): the student's own — for Baseline / Baseline++ a new
    head trained on frozen support features, for FineTune fine-tuning a copy.
    Not transductive; ``order = None``.

    The teacher is frozen: a private deep copy (or the model loaded from a
    path) in ``eval()`` mode with ``requires_grad`` off, called under
    ``no_grad``, and held outside the module tree, so ``fit`` never trains,
    checkpoints or switches it, and the caller's teacher is never mutated. It
    costs one teacher forward pass per batch and the memory of that copy.

    ``state_dict`` / ``load_state_dict`` and ``build_spec`` are the student's:
    checkpoints of a distillation run (and :func:`metaxfer.save` of a
    :class:`Distill`) load with :func:`metaxfer.load` as the student learner,
    without the teacher, when the student was built with
    :func:`metaxfer.build_learner` (as the CLI and presets do; a student built
    by hand saves weights only, for :func:`metaxfer.hub.load_weights` on a
    rebuilt one). ``parameters()`` are the student's too.

    Args:
        student: a :class:`~metaxfer.transfer.baseline.Baseline` (or
            Baseline++ / FineTune) with a pretraining head over ``num_base_classes``.
        teacher: a transfer learner with a classifier over the same base classes
            (e.g. a Baseline++ ResNet-12), any ``nn.Module`` mapping images to
            logits ``[N, num_base_classes]``, or the run directory, model
            directory or zoo name of a saved one.
        temperature: ``T > 0`` (4 in Tian et al. 2020).
        alpha: weight of the teacher's soft term in ``[0, 1]`` (0.5 in Tian et al. 2020).

    Shapes:
        ``loss(batch)``: ``support_x [T, B, *x_shape]``, ``support_y [T, B]`` global labels
        in ``0 .. num_base_classes-1``, empty query tensors (a ClassBatchSampler batch).
        ``adapt(support_x [S, *x_shape], support_y [S])`` returns ``query_x [Q, *x_shape] -> logits [Q, ways]``.

    Raises:
        ConfigError: a student without a pretraining head, a teacher without a
            classifier, different class counts, ``temperature <= 0`` or
            ``alpha`` outside ``[0, 1]``.
        CheckpointError: a teacher path or zoo name with no model.

    Example:
        >>> teacher = metaxfer.load("runs/baseline_pp_omniglot_resnet12_5w1s")
        >>> student = metaxfer.build_learner({"learner": "baseline_pp", "backbone": "conv4",
        ...     "backbone_args": {"in_channels": 1}, "learner_args": {"num_base_classes": 4112}})
        >>> learner = Distill(student, teacher, temperature=4.0, alpha=0.5)
        >>> metaxfer.fit(learner, ClassBatchSampler(train_set, 64), torch.optim.Adam(learner.parameters()), 25000)
        >>> predict = learner.adapt(support_x, support_y)     # the student's Baseline++ adaptation
        >>> metaxfer.save(learner, "models/conv4_distilled")  # a Baseline++ Conv4: metaxfer.load gives it back
    """

    def __init__(self, student: Baseline, teacher: nn.Module | str | os.PathLike[str], temperature: float = 4.0,
                 alpha: float = 0.5) -> None:
        super().__init__()
        if not isinstance(student, Baseline):
            raise ConfigError("the student must be a transfer learner with a classifier over the base classes "
                              "(Baseline, BaselinePlusPlus or FineTune; learner_args.student: baseline, baseline_pp "
                              f"or finetune), got {type(student).__name__}")
        if getattr(student, "head", None) is None:
            raise ConfigError("the student has no pretraining head: give it num_base_classes "
                              "(model.learner_args.num_base_classes, the number of classes of the training split)")
        self.temperature = _check_temperature(temperature)
        self.alpha = _check_alpha(alpha)
        self.student = student
        frozen = as_teacher(teacher)
        if frozen.num_classes is not None and frozen.num_classes != student.num_base_classes:
            raise ConfigError(f"the teacher classifies {frozen.num_classes} base classes but the student "
                              f"{student.num_base_classes}: both must be trained over the same classes in the same "
                              f"order; set the student's num_base_classes (model.learner_args.num_base_classes) to "
                              f"{frozen.num_classes}, or use a teacher trained on the student's training split")
        self.teacher = frozen  # not an nn.Module: stays out of parameters(), state_dict() and train()
        self.distill_spec: dict[str, Any] | None = None
        self.last_metrics: dict[str, float] = {}

    # The checkpoint of a distillation run is the student's: same keys, same spec.

    @property
    def build_spec(self) -> dict[str, Any] | None:
        """The student's model spec (what a checkpoint records, so it loads as the student alone)."""
        return getattr(self.student, "build_spec", None)

    @build_spec.setter
    def build_spec(self, spec: dict[str, Any] | None) -> None:
        self.distill_spec = spec  # the full "distill" spec, teacher included
        self.student.build_spec = student_spec(spec)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The student's ``state_dict`` (keys ``backbone.*``, ``head.*``, as a Baseline checkpoint)."""
        return self.student.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load a student (Baseline-family) ``state_dict`` into the student."""
        return self.student.load_state_dict(state_dict, strict=strict, assign=assign)

    def logits(self, x: Tensor) -> Tensor:
        """The student's pretraining logits ``[N, num_base_classes]`` for images ``[N, *x_shape]``."""
        return self.student.head(self.student.backbone(x))

    def loss(self, batch: Episode) -> Tensor:
        """Distillation loss of a supervised batch (``[T, B, ...]`` tensors, global labels), mean over all examples.

        Also sets ``last_metrics``: the student's and the teacher's batch
        accuracy and the two terms of the loss.

        Raises:
            ConfigError: for an episode with queries (episode-local labels):
                distillation needs ``train.sampler: classes``.
            EpisodeError: for labels outside ``0 .. num_base_classes-1``.
        """
        x, y = supervised_examples(batch, self.student.num_base_classes, "Distill",
                                   "the student and teacher classify",
                                   "distil on the training split both were built for (ClassBatchSampler.num_classes "
                                   "classes)")
        student_logits = self.logits(x)
        teacher_logits = self.teacher(x)
        soft = soft_target_loss(student_logits, teacher_logits, self.temperature)
        hard = F.cross_entropy(student_logits, y)
        # distillation_loss's combination, from the two terms computed once (both are also reported).
        loss = soft if self.alpha == 1.0 else hard if self.alpha == 0.0 else self.alpha * soft + (1 - self.alpha) * hard
        self.last_metrics = {
            "accuracy": (student_logits.argmax(-1) == y).float().mean().item(),
            "teacher_accuracy": (teacher_logits.argmax(-1) == y).float().mean().item(),
            "soft": soft.item(),
            "hard": hard.item(),
        }
        return loss

    def adapt(self, support_x: Tensor, support_y: Tensor) -> HeadPredictor:
        """The student's adaptation to one task (see :meth:`Baseline.adapt`); never mutates the learner."""
        return self.student.adapt(support_x, support_y)

    @classmethod
    def born_again(cls, teacher: Learner | str | os.PathLike[str], temperature: float = 4.0,
                   alpha: float = 0.5) -> Distill:
        """Self-distillation: a fresh student with the teacher's architecture (Tian et al. 2020, section 3.3).

        Born-again networks (Furlanello et al. 2018, "Born-Again Neural
        Networks", ICML) as Tian et al. use them on a pretrained few-shot
        embedding: generation ``k + 1`` has the architecture of generation
        ``k``, is initialised afresh (from the global RNG: seed it) and is
        distilled from it. Chain generations by passing the previous
        learner (or its run directory) as the next teacher.

        Args:
            teacher: a learner built with :func:`metaxfer.build_learner` or
                loaded with :func:`metaxfer.load` (its ``build_spec`` says how
                to rebuild it), a :class:`Distill` (its student is the
                teacher), or the run directory / model directory / zoo name of one.
            temperature, alpha: as :class:`Distill`.

        Returns:
            A :class:`Distill` whose student is a fresh copy of the teacher's
            architecture, with its preprocessing.

        Raises:
            ConfigError: for a teacher without ``build_spec``.

        Example:
            >>> teacher = metaxfer.load("runs/gen0")
            >>> for generation in (1, 2):
            ...     learner = Distill.born_again(teacher)
            ...     metaxfer.fit(learner, sampler, torch.optim.Adam(learner.parameters(), 1e-3), 25000,
            ...                  run_dir=f"runs/gen{generation}")
            ...     teacher = learner
        """
        from metaxfer.build import build_learner

        if isinstance(teacher, (str, os.PathLike)):
            teacher = _load_teacher(teacher)
        spec = getattr(teacher, "build_spec", None)
        if not spec:
            raise ConfigError(f"born_again rebuilds the teacher's architecture from its build_spec, and this "
                              f"{type(teacher).__name__} has none; build the teacher with metaxfer.build_learner or "
                              "load it with metaxfer.load, or build a student yourself and use "
                              "Distill(student, teacher)")
        preprocess = getattr(teacher, "preprocess_spec", None)
        student = build_learner(student_spec(spec), preprocess=preprocess)  # type: ignore[arg-type]
        learner = cls(student, teacher, temperature=temperature, alpha=alpha)  # type: ignore[arg-type]
        if preprocess is not None:
            learner.preprocessor, learner.preprocess_spec = student.preprocessor, dict(preprocess)  # type: ignore[assignment]
        return learner

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, teacher={self.teacher!r}"


@register_learner("distill")
def distill_learner(backbone: nn.Module, teacher: str | os.PathLike[str] | nn.Module | None = None,
                    student: str = "baseline", temperature: float = 4.0, alpha: float = 0.5,
                    **student_args: Any) -> Distill:
    """:class:`Distill` into a ``student`` learner built around ``backbone`` with ``student_args``.

    Args:
        backbone: the student's backbone.
        teacher: run directory, model directory or zoo name of the teacher (or a module).
        student: registry name of the student learner: ``"baseline"``, ``"baseline_pp"`` or ``"finetune"``.
        temperature, alpha: see :class:`Distill`.
        **student_args: the student learner's arguments (``num_base_classes``, ...).

    Raises:
        ConfigError: without a teacher, or for a student that is not a transfer learner.
    """
    if teacher is None:
        raise ConfigError("learner 'distill' needs a teacher: run `metaxfer distill --config PRESET --teacher "
                          "RUN_DIR_OR_ZOO_NAME`, or set model.learner_args.teacher to the teacher's run directory, "
                          "model directory or zoo name")
    if student == "distill":
        raise ConfigError("learner_args.student names the student's own learner (baseline, baseline_pp or finetune), "
                          "not 'distill'")
    return Distill(create_learner(student, backbone, **student_args), teacher,  # type: ignore[arg-type]
                   temperature=temperature, alpha=alpha)
