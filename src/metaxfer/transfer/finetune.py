"""Fine-tuning on a support set: freezing by name, layer-wise learning rates, linear probing then fine-tuning.

:func:`finetune` trains a deep copy of a classifier (``x -> logits``) on a
few labelled examples and returns the copy; the caller's model is never
touched. Parameters are selected by name patterns (``"backbone"``,
``"backbone.features.0.*"``, ``"head"``): a pattern matches a parameter whose
name equals it, starts with ``pattern + "."``, or matches it as a glob
(:func:`fnmatch.fnmatchcase`). A pattern that matches nothing is an error
listing the available prefixes, so a typo never silently fine-tunes everything.

:class:`FineTune` (registry name ``"finetune"``) is the learner around it:
pretrained like :class:`~metaxfer.transfer.baseline.Baseline` (or not at all,
for a backbone with ImageNet weights), it adapts by fine-tuning the whole
backbone with a new head for each task.

Why a deep copy rather than the functional parameter dicts the
meta-learners adapt with: fine-tuning needs a stateful optimiser with
parameter groups, a head of a new size (``ways`` outputs) and the model's own
buffers; a private copy gives all of that with any ``nn.Module`` and keeps the
caller's model (and the learner) unchanged by construction. No gradient flows
back to the original, so this is not the clone-and-mutate pattern the design
notes warn about (that one differentiates through the copy).

Two helpers for training more than a head: :func:`flip_and_shift`, a seeded
mini-batch augmentation for ``finetune(augment=...)``, and
:func:`recalibrate_batchnorm`, which re-estimates BatchNorm running statistics
after fine-tuning in ``train_mode`` (needed when the statistics moved little
during a short run, e.g. a network trained from random initialisation).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaxfer.errors import ConfigError
from metaxfer.learners.registry import register_learner
from metaxfer.learners.support import EvalModule, check_support_classes
from metaxfer.transfer.baseline import Baseline, HeadPredictor, backbone_feature_dim
from metaxfer.transfer.heads import new_head

__all__ = ["BodyHead", "FineTune", "finetune", "flip_and_shift", "match_parameters", "param_groups",
           "recalibrate_batchnorm"]


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def _prefixes(names: Sequence[str], depth: int = 3) -> list[str]:
    """Distinct module prefixes (up to ``depth`` components) of parameter names, for error messages."""
    out: set[str] = set()
    for name in names:
        parts = name.split(".")[:-1]
        for d in range(1, min(depth, len(parts)) + 1):
            out.add(".".join(parts[:d]))
        if not parts:
            out.add(name)
    return sorted(out)


def match_parameters(model: nn.Module, patterns: Sequence[str], what: str = "pattern") -> dict[str, list[str]]:
    """Names of the parameters of ``model`` each pattern matches (see the module docstring for the rules).

    Args:
        model: any module.
        patterns: parameter-name patterns, e.g. ``["backbone.features.0", "head.*"]``.
        what: how the error names the patterns (``"freeze pattern"``, ...).

    Returns:
        ``{pattern: [parameter names]}`` in ``named_parameters`` order.

    Raises:
        ConfigError: for a pattern that matches no parameter; the message lists
            the available prefixes.

    Example:
        >>> match_parameters(nn.Sequential(nn.Linear(2, 2)), ["0"])
        {'0': ['0.weight', '0.bias']}
    """
    if isinstance(patterns, str):
        patterns = [patterns]  # a lone string would otherwise be read as a list of one-letter patterns
    names = [n for n, _ in model.named_parameters()]
    found = {p: [n for n in names if _matches(n, p)] for p in patterns}
    missing = [p for p, hits in found.items() if not hits]
    if missing:
        raise ConfigError(
            f"{what}(s) {', '.join(repr(p) for p in missing)} match no parameter of {type(model).__name__}; "
            f"available prefixes: {', '.join(_prefixes(names)) or '(the model has no parameters)'} "
            "(a pattern matches a name, a dotted prefix of it, or a glob such as 'backbone.features.3.*')"
        )
    return found


def param_groups(model: nn.Module, lr: float, layer_lrs: Mapping[str, float] | None = None,
                 frozen: Sequence[str] = ()) -> list[dict[str, object]]:
    """Optimiser parameter groups with layer-wise learning rates.

    Every trainable parameter (not in ``frozen``) goes to the group of the
    longest ``layer_lrs`` pattern that matches its name (the most specific
    wins: ``{"backbone": 1e-4, "backbone.features.3": 1e-3}`` gives the last
    block 1e-3 and the rest of the backbone 1e-4), or to the ``"default"`` group
    at ``lr``. Empty groups are left out.

    Args:
        model: the module to optimise.
        lr: learning rate of parameters no pattern matches.
        layer_lrs: ``{pattern: learning rate}``.
        frozen: names of parameters to leave out (frozen).

    Returns:
        ``[{"params": [...], "lr": float, "name": pattern or "default"}, ...]``,
        ready for any ``torch.optim`` optimiser.

    Raises:
        ConfigError: a pattern matches no parameter, or only frozen ones.
    """
    layer_lrs = dict(layer_lrs or {})
    found = match_parameters(model, list(layer_lrs), "layer_lrs pattern")
    frozen_set = set(frozen)
    only_frozen = [p for p, hits in found.items() if all(h in frozen_set for h in hits)]
    if only_frozen:
        raise ConfigError(f"layer_lrs pattern(s) {', '.join(map(repr, only_frozen))} match only frozen parameters; "
                          "remove them from layer_lrs or from freeze")
    by_length = sorted(layer_lrs, key=len, reverse=True)
    groups: dict[str, list[nn.Parameter]] = {p: [] for p in [*layer_lrs, "default"]}
    for name, param in model.named_parameters():
        if name in frozen_set:
            continue
        pattern = next((p for p in by_length if _matches(name, p)), "default")
        groups[pattern].append(param)
    return [{"params": params, "lr": float(layer_lrs.get(pattern, lr)), "name": pattern}
            for pattern, params in groups.items() if params]


#: ``augment(x_batch, generator) -> x_batch``: a mini-batch transform drawing only from ``generator``.
Augment = Callable[[Tensor, torch.Generator], Tensor]


def flip_and_shift(max_shift: int, flip: bool = True) -> Augment:
    """A seeded image augmentation for :func:`finetune`: random translation and horizontal flip per example.

    Each image ``[C, H, W]`` is shifted by an integer offset in
    ``-max_shift .. max_shift`` pixels along each axis (the border pixels are
    repeated into the gap, so a plain background stays plain) and, with
    ``flip``, mirrored left-right with probability 1/2. All draws come from
    the generator passed to the returned function, so ``finetune``'s ``seed``
    makes the result deterministic; the global RNG is never touched.

    Args:
        max_shift: largest shift in pixels (0: no translation).
        flip: also mirror horizontally (not for images whose class depends on
            handedness, e.g. digits or characters).

    Returns:
        ``augment(x [N, C, H, W], generator) -> [N, C, H, W]`` (same dtype and
        device; the memory format is not kept).

    Raises:
        ConfigError: negative ``max_shift``.

    Example:
        >>> tuned = finetune(model, x, y, steps=100, augment=flip_and_shift(2))
    """
    if not isinstance(max_shift, int) or max_shift < 0:
        raise ConfigError(f"flip_and_shift needs an integer max_shift >= 0, got {max_shift!r}")

    def augment(x: Tensor, generator: torch.Generator) -> Tensor:
        n, c, h, w = x.shape
        if max_shift:
            p, dev = max_shift, x.device
            padded = F.pad(x, [p, p, p, p], mode="replicate")
            dy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(dev)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(dev)
            rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
            x = padded[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                       rows, cols]
        if flip:
            mirror = (torch.rand(n, generator=generator) < 0.5).to(x.device)
            x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
        return x

    return augment


def _run(model: nn.Module, groups: list[dict[str, object]], x: Tensor, y: Tensor, steps: int, batch_size: int | None,
         momentum: float, weight_decay: float, generator: torch.Generator,
         loss_fn: Callable[[Tensor, Tensor], Tensor], stage: str = "finetune",
         callback: Callable[[str, int, nn.Module], None] | None = None, augment: Augment | None = None) -> None:
    if steps == 0 or not groups:
        return
    opt = torch.optim.SGD(groups, lr=float(groups[0]["lr"]), momentum=momentum, weight_decay=weight_decay)  # type: ignore[arg-type]
    s = x.shape[0]
    full = batch_size is None or batch_size >= s
    order, at = torch.empty(0, dtype=torch.long), s
    for step in range(1, steps + 1):
        if full:
            xb, yb = x, y
        else:
            assert batch_size is not None
            if at + batch_size > s:  # a new shuffled pass over the support set
                order, at = torch.randperm(s, generator=generator).to(x.device), 0
            pick = order[at : at + batch_size]
            at += batch_size
            xb, yb = x[pick], y[pick]
        if augment is not None:
            with torch.no_grad():
                xb = augment(xb, generator)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(xb), yb).backward()
        opt.step()
        if callback is not None:
            callback(stage, step, model)


def finetune(
    model: nn.Module,
    support_x: Tensor,
    support_y: Tensor,
    *,
    steps: int = 100,
    lr: float = 0.01,
    freeze: Sequence[str] = (),
    layer_lrs: Mapping[str, float] | None = None,
    lp_ft: bool = False,
    lp_steps: int | None = None,
    lp_lr: float | None = None,
    head: str = "head",
    batch_size: int | None = None,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    train_mode: bool = False,
    seed: int = 0,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    callback: Callable[[str, int, nn.Module], None] | None = None,
    augment: Augment | None = None,
) -> nn.Module:
    """Fine-tune a deep copy of ``model`` on a support set; return the copy (the caller's model is unchanged).

    With ``lp_ft=True`` this is LP-FT (Kumar et al. 2022, "Fine-Tuning can
    Distort Pretrained Features and Underperform Out-of-Distribution", ICLR):
    first a linear probe — only the ``head`` parameters train, for ``lp_steps``
    steps at ``lp_lr`` — then every non-frozen parameter fine-tunes for
    ``steps`` steps with the layer-wise learning rates. Starting the full
    fine-tuning from a fitted head keeps the large early gradients of a random
    head from distorting the pretrained features.

    SGD with momentum throughout; the mini-batches (``batch_size`` examples, the
    whole support set when ``None``) are drawn in shuffled passes from a
    generator seeded with ``seed``, so the result is deterministic. An
    ``augment`` function (e.g. :func:`flip_and_shift`) transforms every
    mini-batch, in both stages, drawing from the same generator.

    Args:
        model: classifier ``[N, *x_shape] -> logits [N, ways]`` (with a head of
            the task's size; :class:`FineTune` builds one).
        support_x: ``[S, *x_shape]``.
        support_y: ``[S]`` targets for ``loss_fn`` (class indices ``0 .. ways-1``).
        steps: fine-tuning steps (after the linear probe with ``lp_ft``).
        lr: learning rate of parameters no ``layer_lrs`` pattern matches.
        freeze: parameter-name patterns kept fixed throughout.
        layer_lrs: ``{pattern: learning rate}`` (see :func:`param_groups`).
        lp_ft: linear probe first, then fine-tune.
        lp_steps: steps of the linear probe (``steps`` when ``None``).
        lp_lr: learning rate of the linear probe (``lr`` when ``None``).
        head: pattern of the head parameters (what the linear probe trains).
        batch_size: support examples per step; ``None``: all.
        momentum, weight_decay: SGD settings.
        train_mode: fine-tune in ``train()`` mode. The default, ``eval()``
            mode, keeps BatchNorm on its pretrained running statistics (a
            support set of a few images gives useless batch statistics) and
            turns dropout off.
        seed: seeds the mini-batch order.
        loss_fn: ``(logits, targets) -> scalar``.
        callback: called after every optimiser step as ``callback(stage, step,
            model)``: ``stage`` is ``"linear_probe"`` or ``"finetune"``, ``step``
            counts from 1 within the stage, ``model`` is the copy being trained
            (in the mode ``train_mode`` selects, under ``torch.enable_grad``). For
            validation or checkpoints (``metaxfer finetune`` keeps the epoch with
            the best validation accuracy); a callback that evaluates must run
            under ``torch.no_grad()`` and restore the model's mode.
        augment: ``augment(x_batch, generator) -> x_batch`` applied (without
            gradient) to every mini-batch of both stages, e.g.
            :func:`flip_and_shift`; ``None``: the support images as they are.

    Returns:
        The fine-tuned copy in ``eval()`` mode, with the ``requires_grad``
        flags of ``model``.

    Raises:
        ConfigError: a ``freeze``, ``layer_lrs`` or ``head`` pattern that matches
            no parameter (the message lists the available prefixes), or
            negative step counts.

    Example:
        >>> tuned = finetune(model, support_x, support_y, steps=50, freeze=["backbone.features.0"],
        ...                  layer_lrs={"backbone": 1e-3, "head": 1e-2}, lp_ft=True)
        >>> tuned(query_x).argmax(-1)
    """
    lp_steps = steps if lp_steps is None else lp_steps
    if steps < 0 or lp_steps < 0:
        raise ConfigError(f"steps and lp_steps must be >= 0, got steps={steps}, lp_steps={lp_steps}")
    tuned = copy.deepcopy(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    patterns = [freeze] if isinstance(freeze, str) else list(freeze)
    frozen = sorted({n for hits in match_parameters(tuned, patterns, "freeze pattern").values() for n in hits})
    tuned.train(train_mode)
    x, y = support_x.detach(), support_y.detach()
    g = torch.Generator().manual_seed(seed)
    with torch.enable_grad():  # adapt may run under no_grad (evaluate does)
        if lp_ft:
            head_names = {n for hits in match_parameters(tuned, [head], "head pattern").values() for n in hits}
            for name, param in tuned.named_parameters():
                param.requires_grad_(name in head_names and name not in frozen)
            probe = [p for n, p in tuned.named_parameters() if n in head_names and n not in frozen]
            groups = [{"params": probe, "lr": float(lr if lp_lr is None else lp_lr), "name": "linear_probe"}] if probe else []
            _run(tuned, groups, x, y, lp_steps, batch_size, momentum, weight_decay, g, loss_fn, "linear_probe",
                 callback, augment)
        for name, param in tuned.named_parameters():
            param.requires_grad_(name not in frozen)
        _run(tuned, param_groups(tuned, lr, layer_lrs, frozen), x, y, steps, batch_size, momentum, weight_decay, g,
             loss_fn, "finetune", callback, augment)
    for name, param in tuned.named_parameters():
        param.requires_grad_(flags[name])
        param.grad = None
    return tuned.eval()


_NORMS = (nn.modules.batchnorm._BatchNorm,)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: Tensor, batch_size: int | None = None) -> nn.Module:
    """Re-estimate every BatchNorm layer's running statistics of ``model`` on ``x``, in place ("precise BN").

    The running mean and variance are reset and replaced by the average of
    the batch statistics over ``x`` in mini-batches of ``batch_size`` (all of
    ``x`` when ``None``), with the weights fixed. After a short run in
    ``train()`` mode the running statistics are a stale blend of the
    initial values and the early weights' batch statistics (BatchNorm's
    momentum is 0.01 in TensorFlow-converted networks: 100 steps leave 37 % of
    the initial values); ``eval()`` predictions then use statistics the
    network was never trained with. Call it with the training images.

    Args:
        model: any module; one without BatchNorm is returned unchanged.
        x: ``[N, *x_shape]`` inputs (no gradient is taken).
        batch_size: images per forward pass; ``None``: all at once.

    Returns:
        ``model`` (the same object), with its training mode and the layers'
        momentum as they were.

    Raises:
        ConfigError: ``batch_size`` below 2 (batch statistics of one image are meaningless) or empty ``x``.
    """
    norms = [m for m in model.modules() if isinstance(m, _NORMS) and m.track_running_stats]
    if not norms:
        return model
    n = x.shape[0]
    size = n if batch_size is None else int(batch_size)
    if n == 0 or size < 2:
        raise ConfigError(f"recalibrate_batchnorm needs a non-empty x and batch_size >= 2, got {n} examples, "
                          f"batch_size={batch_size}")
    was_training = model.training
    momenta = [m.momentum for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: the mean of the batch statistics
        model.train()
        for start in range(0, n, size):
            batch = x[start : start + size]
            if batch.shape[0] >= 2 or start == 0:
                model(batch)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return model


class BodyHead(nn.Module):
    """``head(backbone(x))``, with the parameter prefixes ``backbone.`` ... and ``head.`` ... that patterns refer to.

    The same names as in a :class:`FineTune` learner's ``state_dict``, so freeze and
    layer-rate patterns (``freeze=["backbone.features.0"]``) read the same in both
    (ANIL's :class:`metaxfer.learners.anil.BodyHead` names its feature extractor ``body``).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        """``x [N, *x_shape] -> logits [N, ways]``."""
        return self.head(self.backbone(x))


class FineTune(Baseline):
    """Transfer by fine-tuning the whole backbone with a new head per task (optionally LP-FT).

    Pretraining is that of :class:`~metaxfer.transfer.baseline.Baseline`
    (cross-entropy over all ``num_base_classes`` on supervised batches); with
    ``num_base_classes=None`` there is no pretraining head and the backbone's
    own weights are used as they are (e.g. ``efficientnet_lite0`` with
    ``pretrained=True``). ``adapt`` builds ``BodyHead(backbone, new head(ways))``
    and runs :func:`finetune` on the support set: freeze patterns, layer-wise
    learning rates and linear-probe-then-fine-tune (Kumar et al. 2022) refer to
    the parameter names ``backbone.*`` and ``head.*``. The learner itself never
    changes (``finetune`` works on a copy). Not transductive; ``order = None``.

    Args:
        backbone: ``[N, *x_shape] -> [N, D]``.
        num_base_classes: classes of the pretraining split, or ``None`` to skip pretraining.
        adapt_head: the new head, ``"linear"`` or ``"cosine"``.
        finetune_steps: fine-tuning steps per task (after the linear probe).
        finetune_lr: learning rate outside ``layer_lrs``.
        freeze: parameter patterns kept fixed, e.g. ``["backbone.features.0"]``.
        layer_lrs: ``{pattern: learning rate}``, e.g. ``{"backbone": 1e-3}``.
        lp_ft: linear probe first (``lp_steps`` steps at ``lp_lr``, head only).
        lp_steps, lp_lr: the linear probe; default ``finetune_steps`` and ``finetune_lr``.
        finetune_batch_size: support examples per step (``None``: all).
        momentum, weight_decay: SGD settings.
        adapt_seed: seeds the new head and the mini-batch order.
        **kwargs: passed to :class:`Baseline` (``classifier``, ``feature_dim``, ``scale``, ...).

    Shapes:
        as :class:`Baseline`.

    Raises:
        ConfigError: invalid sizes, or patterns that match no parameter (at the first ``adapt``).

    Example:
        >>> learner = FineTune(metaxfer.create_backbone("conv4", in_channels=1), num_base_classes=4112,
        ...                    layer_lrs={"backbone": 1e-3}, lp_ft=True)
        >>> predict = learner.adapt(support_x, support_y)
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_base_classes: int | None = None,
        adapt_head: str = "linear",
        finetune_steps: int = 100,
        finetune_lr: float = 0.01,
        freeze: Sequence[str] = (),
        layer_lrs: Mapping[str, float] | None = None,
        lp_ft: bool = True,
        lp_steps: int | None = None,
        lp_lr: float | None = None,
        finetune_batch_size: int | None = None,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        adapt_seed: int = 0,
        **kwargs: object,
    ) -> None:
        if adapt_head not in ("linear", "cosine"):
            raise ConfigError(f"FineTune trains its head with the backbone: adapt_head must be 'linear' or 'cosine', "
                              f"got {adapt_head!r}")
        if not isinstance(finetune_steps, int) or finetune_steps < 0:
            raise ConfigError(f"finetune_steps must be an integer >= 0, got {finetune_steps!r}")
        pretrain = num_base_classes is not None
        super().__init__(backbone, num_base_classes if pretrain else 2, adapt_head=adapt_head,
                         finetune_lr=finetune_lr, adapt_seed=adapt_seed, **kwargs)  # type: ignore[arg-type]
        if not pretrain:
            # No pretraining classes: no pretraining head either (nothing unused in the checkpoint).
            del self.head
            self.head = None  # type: ignore[assignment]
            self.num_base_classes = None  # type: ignore[assignment]
        self.feature_dim = backbone_feature_dim(backbone, kwargs.get("feature_dim"))  # type: ignore[arg-type]
        self.finetune_steps = finetune_steps
        self.freeze = [freeze] if isinstance(freeze, str) else list(freeze)
        self.layer_lrs = dict(layer_lrs or {})
        self.lp_ft, self.lp_steps, self.lp_lr = lp_ft, lp_steps, lp_lr
        self.finetune_batch_size = finetune_batch_size  # type: ignore[assignment]
        self.momentum, self.weight_decay = momentum, weight_decay

    def loss(self, batch):  # type: ignore[no-untyped-def]
        """Baseline pretraining loss; needs ``num_base_classes``.

        Raises:
            ConfigError: when the learner was built without ``num_base_classes``.
        """
        if self.head is None:
            raise ConfigError("this FineTune learner has no pretraining head: set model.learner_args.num_base_classes "
                              "to pretrain it, or use it only to adapt a pretrained backbone")
        return super().loss(batch)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> HeadPredictor:
        """Fine-tune a copy of backbone + new head on one task; never mutates the learner."""
        ways = check_support_classes(support_y)
        g = torch.Generator().manual_seed(self.adapt_seed)
        ref = next(self.backbone.parameters(), None)
        head = new_head(self.adapt_head, self.feature_dim, ways, generator=g, scale=self.adapt_scale)
        if ref is not None:
            head = head.to(ref.device, ref.dtype)
        tuned = finetune(BodyHead(self.backbone, head), support_x, support_y, steps=self.finetune_steps,
                         lr=self.finetune_lr, freeze=self.freeze, layer_lrs=self.layer_lrs, lp_ft=self.lp_ft,
                         lp_steps=self.lp_steps, lp_lr=self.lp_lr, head="head", batch_size=self.finetune_batch_size,
                         momentum=self.momentum, weight_decay=self.weight_decay, seed=self.adapt_seed)
        tuned.requires_grad_(False)
        return HeadPredictor(EvalModule(tuned), nn.Identity())


@register_learner("finetune")
def finetune_learner(backbone: nn.Module, num_base_classes: int | None = None, **kwargs: object) -> FineTune:
    """FineTune around ``backbone`` (see :class:`FineTune`)."""
    return FineTune(backbone, num_base_classes, **kwargs)  # type: ignore[arg-type]
