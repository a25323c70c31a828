"""Classifier heads on frozen features: linear, cosine (Baseline++), nearest centroid, logistic regression.

All heads map features ``[N, D]`` to logits ``[N, ways]``. :func:`fit_head`
trains a new head on a support set's features ``[S, D]`` from scratch, with
its own seeded generator (initialisation and mini-batch order), so the same
support set and seed always give the same head and the global RNG is never touched.
:func:`extract_features` computes the frozen features of a large set (a test
set, a dataset's images) in mini-batches without gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaxfer.errors import ConfigError

__all__ = [
    "HEADS",
    "CentroidHead",
    "CosineClassifier",
    "extract_features",
    "fit_head",
    "logistic_regression",
    "nearest_centroid",
    "new_head",
    "paper_scale",
]

HEADS = ("linear", "cosine", "centroid", "logreg")


def paper_scale(num_classes: int) -> float:
    """Baseline++'s fixed softmax scale for a cosine head over ``num_classes`` classes.

    The released code of Chen et al. (2019) uses 2 for up to 200 classes and 10
    above (Omniglot's thousands of pretraining classes need sharper logits to
    train at all).
    """
    return 2.0 if num_classes <= 200 else 10.0


class CosineClassifier(nn.Module):
    """The Baseline++ head (Chen et al. 2019, section 3.2): scaled cosine similarity to class weight vectors.

    ``logits[n, c] = scale * g_c * <x_n / |x_n|, w_c / |w_c|>``. With
    ``class_gain=True`` each class has a learnable gain ``g_c`` (initialised to
    ``|w_c|``), i.e. the weight-norm parametrisation ``W = g * V / |V|`` of the
    authors' released code (their ``distLinear``; see its issues #4 and #8);
    with ``class_gain=False`` ``g_c = 1`` and the logits are exactly the scaled
    cosine of the paper's equation.

    Args:
        in_features: ``D``.
        out_features: number of classes ``C``.
        scale: softmax scale (temperature inverse); ``None`` uses
            :func:`paper_scale` (2 for at most 200 classes, 10 above).
        learn_scale: make the scale a trainable parameter (initialised to ``scale``).
        class_gain: learnable per-class gain, as the released code.
        generator: seeds the initialisation (the global RNG otherwise).

    Shapes:
        ``[N, D] -> [N, C]``.

    Example:
        >>> head = CosineClassifier(64, 5)
        >>> head(torch.randn(3, 64)).shape
        torch.Size([3, 5])
    """

    def __init__(self, in_features: int, out_features: int, scale: float | None = None, learn_scale: bool = False,
                 class_gain: bool = True, generator: torch.Generator | None = None) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default initialisation range
        weight = (torch.rand(out_features, in_features, generator=generator) * 2 - 1) * bound
        self.weight = nn.Parameter(weight)
        self.gain = nn.Parameter(weight.norm(dim=1).clone()) if class_gain else None
        value = float(paper_scale(out_features) if scale is None else scale)
        if value <= 0:
            raise ConfigError(f"the cosine head's scale must be positive, got {value}; use e.g. 2 (few classes) or 10")
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(value))
        else:
            self.register_buffer("scale", torch.tensor(value))
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: Tensor) -> Tensor:
        """``x [N, D] -> logits [N, C]``."""
        # eps as in the released code: a zero feature vector (dead ReLUs) gives zero logits, not NaN.
        w = F.normalize(self.weight, dim=1, eps=1e-5)
        if self.gain is not None:
            w = w * self.gain[:, None]
        return self.scale * F.linear(F.normalize(x, dim=1, eps=1e-5), w)


class CentroidHead(nn.Module):
    """Nearest class centroid on L2-normalised features (SimpleShot, Wang et al. 2019, "L2N").

    ``logits[n, c] = -| x_n/|x_n| - mu_c |^2`` with ``mu_c`` the mean of class
    ``c``'s normalised support features. No training, no hyperparameters.

    Shapes:
        ``centroids [C, D]``; ``[N, D] -> [N, C]``.
    """

    def __init__(self, centroids: Tensor) -> None:
        super().__init__()
        self.register_buffer("centroids", centroids)

    def forward(self, x: Tensor) -> Tensor:
        """``x [N, D] -> logits [N, C]``."""
        return -torch.cdist(F.normalize(x, dim=1), self.centroids).pow(2)


def nearest_centroid(features: Tensor, labels: Tensor, ways: int) -> CentroidHead:
    """A :class:`CentroidHead` from support features ``[S, D]`` and labels ``[S]`` in ``0 .. ways-1``."""
    z = F.normalize(features.detach(), dim=1)
    sums = torch.zeros(ways, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, labels, z)
    counts = torch.bincount(labels, minlength=ways).clamp_min(1).to(z.dtype)
    return CentroidHead(sums / counts[:, None])


def logistic_regression(features: Tensor, labels: Tensor, ways: int, l2: float = 1.0, max_iter: int = 100) -> nn.Linear:
    """Multinomial logistic regression on L2-normalised features, fitted to convergence with L-BFGS.

    As the linear readout of RFS (Tian et al. 2020, "Rethinking Few-Shot Image
    Classification", ECCV), which fits scikit-learn's ``LogisticRegression`` on
    normalised embeddings: the objective (mean cross-entropy +
    ``l2 / (2 S) * |W|^2``) is convex and the start is zero, so the result is
    deterministic and needs no seed.

    Args:
        features: support features ``[S, D]``.
        labels: ``[S]`` in ``0 .. ways-1``.
        ways: number of classes.
        l2: inverse of scikit-learn's ``C`` (1.0 by default).
        max_iter: L-BFGS iterations.

    Returns:
        ``nn.Linear(D, ways)`` that expects normalised features; wrap it with
        :func:`torch.nn.functional.normalize` (:func:`fit_head` does).
    """
    z = F.normalize(features.detach(), dim=1)
    # skip_init: the default initialisation would draw from (and so advance) the global RNG.
    head = nn.utils.skip_init(nn.Linear, z.shape[1], ways, device=z.device, dtype=z.dtype)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    s = z.shape[0]

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(z), labels) + l2 / (2 * s) * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return head


@torch.no_grad()
def extract_features(
    module: nn.Module,
    x: Tensor,
    batch_size: int = 256,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``module(transform(x[i : i + batch_size]))`` over all of ``x`` in ``eval()`` mode without gradient, concatenated.

    For the frozen features of a set too large for one forward pass (e.g.
    10,000 test images through an ImageNet backbone): BatchNorm uses its
    running statistics, dropout is off, no graph is kept, and only one batch
    of transformed inputs is in memory at a time. Any module works, so it
    also gives the logits of a whole classifier. The module's training mode
    is restored afterwards.

    Args:
        module: ``[B, *x_shape] -> [B, *out_shape]``.
        x: ``[N, ...]`` inputs, e.g. ``uint8`` pixels that ``transform`` scales.
        batch_size: examples per forward pass.
        transform: applied to every slice before ``module`` (e.g.
            ``ImagePreprocess.from_pixels``, a move to the module's device or
            memory format); ``None``: the slices as they are.

    Returns:
        ``[N, *out_shape]`` (detached, on the device the module returns).

    Raises:
        ConfigError: ``batch_size`` below 1, or an empty ``x``.

    Example:
        >>> feats = extract_features(backbone, test_pixels, transform=preprocess.from_pixels)
    """
    if batch_size < 1:
        raise ConfigError(f"extract_features needs batch_size >= 1, got {batch_size}")
    was_training = module.training
    module.eval()
    try:
        outs = []
        for start in range(0, x.shape[0], batch_size):
            batch = x[start : start + batch_size]
            outs.append(module(transform(batch) if transform is not None else batch).detach())
    finally:
        module.train(was_training)
    if not outs:
        raise ConfigError("extract_features got no inputs (x is empty)")
    return torch.cat(outs)


class _Normalised(nn.Module):
    """``head(x / |x|)``: a head fitted on normalised features."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.normalize(x, dim=1))


def new_head(kind: str, in_features: int, ways: int, generator: torch.Generator | None = None,
             scale: float | None = None) -> nn.Module:
    """A freshly initialised trainable head: ``"linear"`` (``nn.Linear``) or ``"cosine"`` (:class:`CosineClassifier`).

    The initialisation follows ``nn.Linear``'s default range ``U(-1/sqrt(D), 1/sqrt(D))``
    but draws from ``generator``, so it is reproducible without the global RNG.
    """
    if kind == "linear":
        head = nn.utils.skip_init(nn.Linear, in_features, ways)  # no draw from the global RNG
        bound = 1.0 / math.sqrt(in_features)
        with torch.no_grad():
            head.weight.copy_((torch.rand(ways, in_features, generator=generator) * 2 - 1) * bound)
            head.bias.copy_((torch.rand(ways, generator=generator) * 2 - 1) * bound)
        return head
    if kind == "cosine":
        return CosineClassifier(in_features, ways, scale=scale, generator=generator)
    raise ConfigError(f"unknown trainable head {kind!r}; choose 'linear' or 'cosine'")


def fit_head(
    kind: str,
    features: Tensor,
    labels: Tensor,
    ways: int,
    *,
    epochs: int = 100,
    batch_size: int = 4,
    lr: float = 0.01,
    momentum: float = 0.9,
    dampening: float = 0.9,
    weight_decay: float = 1e-3,
    seed: int = 0,
    scale: float | None = None,
) -> nn.Module:
    """Train a new head on frozen support features; return it (``[N, D] -> [N, ways]``).

    ``"linear"`` and ``"cosine"`` follow the adaptation of Chen et al. (2019),
    as in their released code: a new head trained from scratch for ``epochs``
    passes over the support set in shuffled mini-batches of ``batch_size``, SGD
    with learning rate 0.01, momentum 0.9, dampening 0.9, weight decay 1e-3
    (the paper's "100 iterations" are 100 such passes). ``"centroid"``
    (:func:`nearest_centroid`) and ``"logreg"`` (:func:`logistic_regression`)
    fit in closed form / to convergence and ignore the SGD settings.

    Args:
        kind: one of :data:`HEADS`.
        features: support features ``[S, D]`` (detached; the backbone is frozen).
        labels: ``[S]`` in ``0 .. ways-1``.
        ways: number of classes.
        epochs: passes over the support set.
        batch_size: support examples per SGD step.
        lr, momentum, dampening, weight_decay: SGD settings.
        seed: seeds the head's initialisation and the mini-batch order.
        scale: the cosine head's scale (:func:`paper_scale` of ``ways`` when ``None``).

    Raises:
        ConfigError: unknown ``kind`` or non-positive ``epochs``/``batch_size``.
    """
    features = features.detach()
    if kind == "centroid":
        return nearest_centroid(features, labels, ways)
    if kind == "logreg":
        return _Normalised(logistic_regression(features, labels, ways))
    if kind not in HEADS:
        raise ConfigError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
    if epochs < 0 or batch_size <= 0:
        raise ConfigError(f"the head needs epochs >= 0 and batch_size > 0, got epochs={epochs}, batch_size={batch_size}")
    g = torch.Generator().manual_seed(seed)
    head = new_head(kind, features.shape[1], ways, generator=g, scale=scale).to(features.device, features.dtype)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
    s = features.shape[0]
    with torch.enable_grad():  # adapt may be called under no_grad (evaluate does)
        for _ in range(epochs):
            order = torch.randperm(s, generator=g).to(features.device)
            for start in range(0, s, batch_size):
                pick = order[start : start + batch_size]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(head(features[pick]), labels[pick]).backward()
                opt.step()
    head.requires_grad_(False)
    return head
