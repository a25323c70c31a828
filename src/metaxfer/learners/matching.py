"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, NeurIPS 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaxfer.errors import ConfigError
from metaxfer.learners.base import Learner
from metaxfer.learners.registry import register_learner
from metaxfer.learners.support import (
    EvalModule,
    check_support_classes,
    embed_tasks,
    episode_ways,
)
from metaxfer.tasks.episode import Episode

__all__ = ["FullContextEmbedding", "MatchingNet", "MatchingPredictor", "matching", "matching_log_probs"]


def matching_log_probs(query: Tensor, support: Tensor, support_y: Tensor, ways: int,
                       scale: Tensor | float = 1.0) -> Tensor:
    """Log class probabilities of the cosine-attention classifier (Vinyals et al. 2016, eqs. 1-2).

    ``a(q, x_i) = softmax_i(scale * cos(f(q), g(x_i)))`` and ``P(y = k | q) = sum_{i: y_i = k} a(q, x_i)``
    (``scale = 1`` is the paper's kernel).
    Computed as ``logsumexp_{i: y_i = k} c_i - logsumexp_i c_i`` (``c_i`` the cosines),
    which is the log of that sum without the ``log(0)`` of an underflowing
    attention weight.

    Args:
        query: ``[..., Q, D]`` query embeddings ``f``.
        support: ``[..., S, D]`` support embeddings ``g``.
        support_y: ``[..., S]`` labels in ``0 .. ways-1``.
        ways: number of classes.
        scale: multiplies the cosines before the softmax (a float or a scalar tensor).

    Returns:
        ``[..., Q, ways]`` log-probabilities (logits whose softmax is the attention mass of each class).
    """
    cos = scale * (F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).transpose(-1, -2))  # [..., Q, S]
    member = F.one_hot(support_y, ways).transpose(-1, -2).bool().unsqueeze(-3)  # [..., 1, ways, S]
    per_class = cos.unsqueeze(-2).masked_fill(~member, float("-inf"))  # [..., Q, ways, S]
    return torch.logsumexp(per_class, -1) - torch.logsumexp(cos, -1, keepdim=True)


class FullContextEmbedding(nn.Module):
    """Full Context Embeddings (Vinyals et al. 2016, section 2.1.2 and appendix A.1, A.2).

    * ``g(x_i, S) = g'(x_i) + h_fwd_i + h_bwd_i``: a bidirectional LSTM (hidden
      size ``D``) reads the support embeddings in their episode order.
    * ``f(q, S)``: an attention LSTM runs ``K`` processing steps,
      ``h^_k, c_k = LSTM(f'(q), [h_{k-1}, r_{k-1}], c_{k-1})``, ``h_k = h^_k + f'(q)``,
      ``r_{k-1} = sum_i softmax_i(h_{k-1}^T g(x_i)) g(x_i)``; ``f = h_K``. The
      LSTM's recurrent input ``[h_{k-1}, r_{k-1}]`` is implemented as an
      ``nn.LSTMCell`` whose input is ``[f'(q), r_{k-1}]`` (gates are linear in
      the concatenation, so the split between "input" and "hidden" weights is
      only bookkeeping). Initial state ``h^_0 = 0`` (so ``h_0 = f'(q)``), ``c_0 = 0``.

    Each query is processed on its own (rows of the LSTM cell's batch never
    interact), so ``f`` depends only on that query and the support set: not transductive.

    Args:
        dim: embedding width ``D`` (the backbone's output features).
        processing_steps: ``K``.
    """

    def __init__(self, dim: int, processing_steps: int = 5) -> None:
        super().__init__()
        if processing_steps < 1:
            raise ConfigError(f"processing_steps must be >= 1 (the paper's K), got {processing_steps}")
        self.dim, self.processing_steps = dim, processing_steps
        self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        self.query_cell = nn.LSTMCell(2 * dim, dim)

    def embed_support(self, support: Tensor) -> Tensor:
        """``g``: ``[T, S, D] -> [T, S, D]``."""
        out, _ = self.support_lstm(support)  # [T, S, 2D]: forward and backward hidden states
        return support + out[..., : self.dim] + out[..., self.dim :]

    def embed_query(self, query: Tensor, g: Tensor) -> Tensor:
        """``f``: queries ``[T, Q, D]`` attending to their task's ``g [T, S, D]`` -> ``[T, Q, D]``."""
        t, q, d = query.shape
        flat = query.reshape(t * q, d)
        h_hat = torch.zeros_like(flat)
        c = torch.zeros_like(flat)
        for _ in range(self.processing_steps):
            h = (h_hat + flat).view(t, q, d)
            attention = (h @ g.transpose(-1, -2)).softmax(-1)  # [T, Q, S], dot-product attention (appendix A.2)
            readout = (attention @ g).reshape(t * q, d)
            h_hat, c = self.query_cell(torch.cat([flat, readout], -1), (h_hat + flat, c))
        return (h_hat + flat).view(t, q, d)


class MatchingPredictor:
    """Adapted Matching Network for one task: log class probabilities of each query."""

    def __init__(self, backbone: nn.Module, fce: FullContextEmbedding | None, support: Tensor, support_y: Tensor,
                 ways: int, scale: float = 1.0) -> None:
        self.backbone = EvalModule(backbone)
        self.scale = scale
        self.fce = fce
        self.support = support  # [1, S, D] final support embeddings g, detached
        self.support_y = support_y  # [1, S]
        self.ways = ways

    @torch.no_grad()
    def __call__(self, query_x: Tensor) -> Tensor:
        """``query_x [Q, *x_shape] -> logits [Q, ways]`` (log-probabilities)."""
        f = self.backbone(query_x).unsqueeze(0)
        if self.fce is not None:
            f = self.fce.embed_query(f, self.support)  # the LSTMs have no dropout: no train/eval difference
        return matching_log_probs(f, self.support, self.support_y, self.ways, self.scale)[0]


class MatchingNet(Learner):
    """Matching Networks (Vinyals et al., "Matching Networks for One Shot Learning", NeurIPS 2016).

    A query is classified by attention over the support set: the softmax of
    cosine similarities between the query embedding and every support
    embedding weights the support labels (eqs. 1-2). ``loss`` is the query
    cross-entropy of those class probabilities; the predictor returns their
    logarithms as logits (so ``argmax`` and cross-entropy apply unchanged).

    With ``fce=True`` the embeddings are Full Context Embeddings
    (:class:`FullContextEmbedding`): a bidirectional LSTM over the support
    embeddings and a ``K``-step attention LSTM for each query. Queries are
    processed independently, so the learner is not transductive either way.
    No inner-loop gradients (``order = None``).

    Args:
        backbone: any module mapping ``[N, *x_shape]`` to ``[N, D]`` features
            (Conv4 in the paper: 64 features on 28x28 Omniglot).
        fce: use Full Context Embeddings.
        feature_dim: ``D``, needed by FCE; read from ``backbone.out_features`` when omitted.
        processing_steps: FCE's ``K`` (the paper does not state it for its experiments; 5 here).
        scale: multiplies the cosines inside the attention softmax. The paper's
            kernel is ``scale = 1``; with non-negative features (a ReLU last,
            as in Conv4) the cosines then lie in [0, 1] and the attention can
            barely prefer one support example (5-way 1-shot loss >= ~0.43),
            which slows training. A larger scale sharpens it (metric scaling,
            Oreshkin et al. 2018, "TADAM").
        learn_scale: meta-learn ``scale`` (initialised to ``scale``).

    Shapes:
        ``loss(batch)``: ``support_x [T, ways*shots, *x_shape]``, ``query_x [T, ways*queries, *x_shape]``.
        ``adapt(support_x [S, *x_shape], support_y [S])`` returns ``query_x [Q, *x_shape] -> logits [Q, ways]``.

    BatchNorm: training uses batch statistics of each task's support and query
    examples together (as ProtoNet); ``adapt`` and the predictor run in ``eval()`` mode.

    Raises:
        ConfigError: ``fce=True`` without a known ``feature_dim``.
        EpisodeError: a class ``0 .. ways-1`` without a support example.

    Example:
        >>> learner = MatchingNet(metaxfer.backbones.create("conv4", in_channels=1), fce=True)
        >>> loss = learner.loss(sampler.sample_batch(4))
        >>> learner.adapt(support_x, support_y)(query_x).argmax(-1)
    """

    def __init__(self, backbone: nn.Module, fce: bool = False, feature_dim: int | None = None,
                 processing_steps: int = 5, scale: float = 1.0, learn_scale: bool = False) -> None:
        super().__init__()
        if scale <= 0:
            raise ConfigError(f"scale must be > 0 (it multiplies the cosine similarities), got {scale}")
        self.backbone = backbone
        # A buffer when fixed, so optimisers never see it; the state_dict key is "scale" either way.
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)))
        self.fce: FullContextEmbedding | None = None
        if fce:
            dim = feature_dim if feature_dim is not None else getattr(backbone, "out_features", None)
            if not isinstance(dim, int) or dim <= 0:
                raise ConfigError(
                    "fce=True needs the embedding width: pass learner_args.feature_dim (the backbone's output "
                    f"features, 64 for conv4 on 28x28 images); the backbone {type(backbone).__name__} has no out_features"
                )
            self.fce = FullContextEmbedding(dim, processing_steps)
        self.last_metrics: dict[str, float] = {}

    def _check_width(self, features: Tensor) -> None:
        if self.fce is not None and features.shape[-1] != self.fce.dim:
            raise ConfigError(
                f"the backbone outputs {features.shape[-1]} features but the FCE LSTMs were built for "
                f"feature_dim={self.fce.dim}; set learner_args.feature_dim to {features.shape[-1]}"
            )

    def task_logits(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        """Log-probabilities ``[T, Q, ways]`` from embeddings ``support [T, S, D]``, ``query [T, Q, D]``."""
        self._check_width(support)
        if self.fce is not None:
            support = self.fce.embed_support(support)
            query = self.fce.embed_query(query, support)
        return matching_log_probs(query, support, support_y, ways, self.scale)

    def loss(self, batch: Episode) -> Tensor:
        """Mean query cross-entropy over the tasks of ``batch`` (``[T, ...]`` tensors)."""
        batch = batch.batch()
        ways = episode_ways(batch)
        zs, zq = embed_tasks(self.backbone, batch)
        logits = self.task_logits(zs.flatten(2), batch.support_y, zq.flatten(2), ways)
        loss = F.nll_loss(logits.flatten(0, 1), batch.query_y.flatten())  # logits are log-probabilities
        with torch.no_grad():
            self.last_metrics = {"accuracy": (logits.argmax(-1) == batch.query_y).float().mean().item()}
        return loss

    @torch.no_grad()
    def adapt(self, support_x: Tensor, support_y: Tensor) -> MatchingPredictor:
        """Embed one task's support set (``g``, with FCE when enabled); no parameters change."""
        ways = check_support_classes(support_y)
        g = EvalModule(self.backbone)(support_x).flatten(1).unsqueeze(0)
        self._check_width(g)
        if self.fce is not None:
            g = self.fce.embed_support(g)
        return MatchingPredictor(self.backbone, self.fce, g, support_y.unsqueeze(0), ways, float(self.scale))


@register_learner("matching")
def matching(backbone: nn.Module, fce: bool = False, feature_dim: int | None = None,
             processing_steps: int = 5, scale: float = 1.0, learn_scale: bool = False) -> MatchingNet:
    """Matching Networks around ``backbone`` (see :class:`MatchingNet`)."""
    return MatchingNet(backbone, fce=fce, feature_dim=feature_dim, processing_steps=processing_steps, scale=scale,
                       learn_scale=learn_scale)
