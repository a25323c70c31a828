"""Memory-Augmented Neural Networks (Santoro, Bartunov, Botvinick, Wierstra & Lillicrap, ICML 2016).

"Meta-Learning with Memory-Augmented Neural Networks" (arXiv:1605.06065, "One-shot Learning with
Memory-Augmented Neural Networks"). An LSTM controller reads an external memory by cosine-similarity
content addressing and writes it with Least-Recently-Used Access (LRUA). An episode is a sequence of
examples whose labels arrive one step late, ``(x_t, y_{t-1})``: the network must bind each example
to its label in memory and recall the label when the class comes back.

The equations (section 3 of the paper; ``B`` sequences in parallel, ``N`` memory slots of width
``M``, ``R`` read heads, each with its own write weights, as in the public re-implementations):

* read (eqs. 2-4): ``w^r_t(i) = softmax_i(cos(k_t, M_t(i)))``, ``r_t = sum_i w^r_t(i) M_t(i)``;
* usage (eq. 5): ``w^u_t = gamma * w^u_{t-1} + w^r_t + w^w_t``;
* least used (eq. 6): ``w^lu_t`` marks the ``n`` least-used slots of ``w^u_t``, ``n`` = number of
  reads (here: head ``h`` gets the ``h``-th least-used slot, so the heads never write the same fresh slot);
* write (eq. 7): ``w^w_t = sigmoid(alpha) * w^r_{t-1} + (1 - sigmoid(alpha)) * w^lu_{t-1}``;
* before writing, the least-used slot of ``w^u_{t-1}`` is set to zero (one per head: each head's
  ``w^lu_{t-1}`` slot; with one head this is the paper's single slot), then (eq. 8)
  ``M_t(i) = M_{t-1}(i) + w^w_t(i) k_t``, summed over the heads;
* the read at step ``t`` addresses ``M_t``, the memory after this step's write (as eqs. 2-4 are written).

Details the paper leaves open follow the Theano re-implementation tristandeleu/ntm-one-shot:
``gamma = 0.95``, ``k_t = tanh(W_k h_t)``, the previous read vectors are fed back into the
controller (as in the Neural Turing Machine), the memory starts at ``1e-6`` everywhere (so cosines
are defined). Differences from it: the key ``k_t`` itself is written, as in eq. 8 (it writes a
separate "add" vector), and read and usage weights start at zero (it starts them one-hot).
snowkylin/ntm and Leputa/MANN-meta-learning (TensorFlow) address the read on ``M_{t-1}`` instead;
on a synthetic task both orders learned at the same pace here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaxfer.backbones.registry import register_backbone
from metaxfer.errors import ConfigError, EpisodeError
from metaxfer.learners.base import Learner
from metaxfer.learners.registry import register_learner
from metaxfer.learners.support import EvalModule
from metaxfer.tasks.episode import Episode

__all__ = [
    "MANN",
    "MANNPredictor",
    "MemoryState",
    "PixelEncoder",
    "cosine_read_weights",
    "instance_accuracy",
    "least_used_weights",
    "mann",
    "offset_labels",
    "per_instance_accuracy",
]

#: The instances (presentations of a class within a sequence) the paper's tables report.
PAPER_INSTANCES = (1, 2, 3, 4, 5, 10)
_MEMORY_INIT = 1e-6


class PixelEncoder(nn.Module):
    """Raw pixels as features: ``[N, C, H, W] -> [N, C*H*W]`` (the paper's input: 20x20 Omniglot, no conv).

    Registered as the ``"pixels"`` backbone (importing :mod:`metaxfer.learners` registers it).

    Args:
        in_channels: ``C``.
        image_size: ``H = W``.

    Attributes:
        out_features: ``C * H * W``, which :class:`MANN` reads to size its controller.

    Example:
        >>> PixelEncoder(1, 20)(torch.zeros(3, 1, 20, 20)).shape
        torch.Size([3, 400])
    """

    def __init__(self, in_channels: int = 1, image_size: int = 20) -> None:
        super().__init__()
        if in_channels < 1 or image_size < 1:
            raise ConfigError(f"in_channels and image_size must be >= 1, got {in_channels} and {image_size}")
        self.in_channels, self.image_size = in_channels, image_size
        self.out_features = in_channels * image_size * image_size

    def forward(self, x: Tensor) -> Tensor:
        """``x [N, *x_shape] -> [N, prod(x_shape)]``."""
        return x.flatten(1)


@register_backbone("pixels")
def pixels(in_channels: int = 1, image_size: int = 20) -> PixelEncoder:
    """The ``"pixels"`` backbone: flattened raw pixels (see :class:`PixelEncoder`)."""
    return PixelEncoder(in_channels, image_size)


class MemoryState(NamedTuple):
    """The recurrent state of :class:`MANN` for ``B`` sequences.

    Attributes:
        h: ``[B, hidden]`` controller output.
        c: ``[B, hidden]`` controller cell.
        memory: ``[B, slots, width]`` the external memory ``M_t``.
        reads: ``[B, heads, width]`` read vectors ``r_t``.
        read_weights: ``[B, heads, slots]`` ``w^r_t``.
        usage: ``[B, slots]`` usage weights ``w^u_t``.
    """

    h: Tensor
    c: Tensor
    memory: Tensor
    reads: Tensor
    read_weights: Tensor
    usage: Tensor

    def expand(self, n: int) -> MemoryState:
        """The state of one sequence (``B = 1``) repeated ``n`` times, ``[n, ...]`` (views, not copies).

        Safe to share: :meth:`MANN.step` never writes in place, it returns new tensors.
        """
        return MemoryState(*(t.expand(n, *t.shape[1:]) for t in self))


def offset_labels(labels: Tensor, ways: int) -> Tensor:
    """The label input of each step: the one-hot label of the PREVIOUS example, zeros at ``t = 0``.

    Args:
        labels: ``[..., L]`` integer labels ``0 .. ways-1`` of a sequence.
        ways: one-hot width.

    Returns:
        ``[..., L, ways]`` float: row ``t`` is ``one_hot(labels[t-1])``, row 0 is zeros.

    Example:
        >>> offset_labels(torch.tensor([2, 0, 1]), 3)
        tensor([[0., 0., 0.],
                [0., 0., 1.],
                [1., 0., 0.]])
    """
    onehot = F.one_hot(labels, ways).float()
    return torch.cat([torch.zeros_like(onehot[..., :1, :]), onehot[..., :-1, :]], dim=-2)


def cosine_read_weights(keys: Tensor, memory: Tensor) -> Tensor:
    """Content addressing (eqs. 2-3): ``softmax_i(cos(k, M(i)))`` over the slots.

    Args:
        keys: ``[B, heads, width]``.
        memory: ``[B, slots, width]``.

    Returns:
        ``[B, heads, slots]`` read weights, each row summing to 1.
    """
    cos = F.normalize(keys, dim=-1) @ F.normalize(memory, dim=-1).transpose(-1, -2)
    return cos.softmax(-1)


def least_used_weights(usage: Tensor, heads: int) -> Tensor:
    """One-hot least-used weights (eq. 6): head ``h`` gets the ``h``-th least-used slot.

    Ties (e.g. the all-zero usage of a fresh memory) go to the lower slot index, so the choice is
    deterministic. The selection is piecewise constant: no gradient flows through it (as in the paper).

    Args:
        usage: ``[B, slots]`` usage weights ``w^u``.
        heads: number of heads ``n`` (at most ``slots``).

    Returns:
        ``[B, heads, slots]`` float, one 1 per row, distinct slots across the heads of a sequence.
    """
    order = torch.argsort(usage.detach(), dim=-1, stable=True)[:, :heads]  # [B, heads]
    return F.one_hot(order, usage.shape[-1]).to(usage.dtype)


def per_instance_accuracy(predictions: Tensor, labels: Tensor,
                          instances: Sequence[int] = PAPER_INSTANCES) -> dict[int, Tensor]:
    """Accuracy at the ``k``-th presentation of a class within each sequence (the paper's table 1 metric).

    Step ``t`` is the ``k``-th instance when its class appeared ``k - 1`` times before ``t`` in the
    same sequence. The accuracy at instance ``k`` of a sequence is the fraction of its ``k``-th
    instances that were predicted correctly (over the classes that have a ``k``-th instance).

    Args:
        predictions: ``[E, L]`` predicted labels (e.g. ``logits.argmax(-1)``).
        labels: ``[E, L]`` true labels ``>= 0``.
        instances: which ``k`` (1-based) to report.

    Returns:
        ``{k: [E] float tensor}`` accuracies in ``[0, 1]``; NaN for a sequence without a ``k``-th instance.

    Example:
        >>> per_instance_accuracy(torch.tensor([[0, 1, 0, 0]]), torch.tensor([[0, 1, 1, 0]]), (1, 2))
        {1: tensor([1.]), 2: tensor([0.5000])}
    """
    if predictions.shape != labels.shape or labels.dim() != 2:
        raise ValueError(f"predictions and labels must both be [episodes, steps], got {tuple(predictions.shape)} "
                         f"and {tuple(labels.shape)}")
    onehot = F.one_hot(labels, int(labels.max().item()) + 1 if labels.numel() else 1)
    occurrence = (onehot.cumsum(1) * onehot).sum(-1)  # [E, L]: 1 at a class's first step, 2 at its second, ...
    correct = (predictions == labels).float()
    out: dict[int, Tensor] = {}
    for k in instances:
        if k < 1:
            raise ValueError(f"instances are 1-based presentation counts, got {k}")
        mask = (occurrence == k).float()
        out[int(k)] = (correct * mask).sum(1) / mask.sum(1)  # 0 / 0 = NaN where there is no k-th instance
    return out


class MANNPredictor:
    """Adapted MANN for one task: each query is the next step after the support sequence.

    Every query starts from a copy of the post-support state, sees the last support label as its
    offset label input, and is classified after its own memory step; nothing a query writes reaches
    another query (not transductive), and the predictor keeps no state between calls.
    """

    def __init__(self, learner: MANN, state: MemoryState, last_label: Tensor) -> None:
        self.learner = learner
        self.encoder = EvalModule(learner.backbone)
        self.state = state  # B = 1, detached
        self.last_label = last_label  # [1, ways]

    @torch.no_grad()
    def __call__(self, query_x: Tensor) -> Tensor:
        """``query_x [Q, *x_shape] -> logits [Q, ways]``."""
        if query_x.dim() < 2:
            raise EpisodeError(f"query_x must be [Q, *x_shape], got shape {tuple(query_x.shape)}")
        q = query_x.shape[0]
        features = self.learner.encode(query_x, encoder=self.encoder)
        inputs = torch.cat([features, self.last_label.expand(q, -1)], -1)
        _, out = self.learner.step(self.state.expand(q), inputs)
        return self.learner.output(out)


class MANN(Learner):
    """Memory-Augmented Neural Network with LRUA (Santoro et al., ICML 2016; see the module docstring).

    The episode is a sequence. At step ``t`` the controller (an LSTM cell) receives the encoded
    example ``x_t``, the one-hot label of the previous example ``y_{t-1}`` (zeros at ``t = 0``) and
    the previous read vectors; its hidden state and the new read vectors give class logits through
    one linear layer. The weights are meta-learned across episodes whose class-to-label assignment
    changes every episode (:class:`~metaxfer.tasks.sampler.EpisodeSampler` draws classes in random
    order), so the only way to predict a label is to remember it from earlier in the sequence.

    How episodes map onto the learner contract:

    * ``loss(batch)``: per task, the support and query examples are concatenated and shuffled
      (``shuffle=True``, torch's global generator, which :func:`metaxfer.fit` checkpoints) into one
      sequence of ``ways * (shots + queries)`` steps; the loss is the cross-entropy of every step's
      prediction, as in the paper. The paper's episodes, 5 classes x 10 instances = 50 steps,
      are ``ways=5, shots=9, queries=1`` (see ``configs/omniglot/mann_5w.yaml``).
    * ``adapt(support_x, support_y)`` runs the memory over the support sequence (labels offset by
      one step) and returns a :class:`MANNPredictor` that classifies each query as the next step,
      independently, from a copy of the final state. The support order is a seeded shuffle
      (``eval_order_seed``): the sampler groups the support by class, an order training never shows.
    * :func:`instance_accuracy` measures the paper's metric (accuracy at the 1st, 2nd, ... presentation
      of a class) on whole sequences.

    Not transductive; no inner-loop gradients (``order = None``). All the tasks of a meta-batch run
    together as the batch dimension of the LSTM and memory operations; only time is a Python loop.

    Args:
        backbone: the input encoder ``[N, *x_shape] -> [N, D]`` (or ``[N, ...]``, flattened):
            ``"pixels"`` (:class:`PixelEncoder`, the paper's raw 20x20 pixels) or any ``nn.Module``,
            e.g. Conv4 (the "CNN encoder" option).
        ways: classes per sequence; the width of the label input and of the logits.
        feature_dim: ``D``; read from ``backbone.out_features`` when omitted.
        hidden: LSTM controller units (200 in the paper).
        memory_slots: ``N`` (128 in the paper).
        memory_width: ``M`` (40 in the paper).
        read_heads: ``R`` (4 in the paper), each with its LRUA write weights.
        gamma: usage decay (0.95, as the public implementations; the paper does not state it).
        shuffle: shuffle each training sequence (support and query together); ``False`` keeps the
            order support then query.
        eval_order_seed: seed of the support shuffle in :meth:`adapt`; ``None`` keeps the given order.

    Shapes:
        ``loss(batch)``: ``support_x [T, S, *x_shape]``, ``support_y [T, S]``, ``query_x [T, Q, *x_shape]``,
        ``query_y [T, Q]``; ``sequence_logits(x [T, L, *x_shape], y [T, L]) -> [T, L, ways]``;
        ``adapt(support_x [S, *x_shape], support_y [S])`` returns ``query_x [Q, *x_shape] -> logits [Q, ways]``.

    Raises:
        ConfigError: non-positive sizes, or no known ``feature_dim``.
        EpisodeError: labels outside ``0 .. ways-1``, a query set larger than ``memory_slots`` (in
            ``loss`` every query is written to memory), inputs the encoder maps to the wrong width, or
            support and query shapes that disagree (messages say what to change).

    Example:
        >>> learner = MANN(PixelEncoder(1, 20), ways=5)
        >>> loss = learner.loss(EpisodeSampler(omniglot20, 5, 9, 1).sample_batch(16))  # 50-step sequences
        >>> learner.adapt(support_x, support_y)(query_x).argmax(-1)
        >>> instance_accuracy(learner, sampler.fixed_episodes(600))[2].mean()  # 2nd-instance accuracy
    """

    transductive = False
    order = None

    def __init__(self, backbone: nn.Module, ways: int = 5, feature_dim: int | None = None, hidden: int = 200,
                 memory_slots: int = 128, memory_width: int = 40, read_heads: int = 4, gamma: float = 0.95,
                 shuffle: bool = True, eval_order_seed: int | None = 0) -> None:
        super().__init__()
        sizes = {"ways": ways, "hidden": hidden, "memory_slots": memory_slots, "memory_width": memory_width,
                 "read_heads": read_heads}
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if read_heads > memory_slots:
            raise ConfigError(f"read_heads={read_heads} exceeds memory_slots={memory_slots}: every head writes its "
                              "own least-used slot; use at most memory_slots heads")
        if not 0.0 <= gamma <= 1.0:
            raise ConfigError(f"gamma is the usage decay of LRUA and must lie in [0, 1], got {gamma}")
        dim = feature_dim if feature_dim is not None else getattr(backbone, "out_features", None)
        if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
            raise ConfigError(
                f"MANN needs the encoder's output width to size its controller: pass learner_args.feature_dim "
                f"(e.g. 400 for 'pixels' on 20x20 images, 64 for conv4); {type(backbone).__name__} has no out_features"
            )
        self.backbone = backbone
        self.ways, self.feature_dim, self.hidden = ways, dim, hidden
        self.memory_slots, self.memory_width, self.read_heads = memory_slots, memory_width, read_heads
        self.gamma, self.shuffle, self.eval_order_seed = float(gamma), shuffle, eval_order_seed
        self.controller = nn.LSTMCell(dim + ways + read_heads * memory_width, hidden)
        self.key = nn.Linear(hidden, read_heads * memory_width)  # k_t, one per head (tanh)
        self.gate = nn.Linear(hidden, read_heads)  # alpha: sigmoid(alpha) interpolates w^r_{t-1} and w^lu_{t-1}
        self.output = nn.Linear(hidden + read_heads * memory_width, ways)
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ the recurrent core

    def initial_state(self, batch: int, device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> MemoryState:
        """The state before the first step, for ``batch`` sequences."""
        n, m, r = self.memory_slots, self.memory_width, self.read_heads
        zeros = torch.zeros(batch, self.hidden, device=device, dtype=dtype)
        return MemoryState(
            h=zeros, c=zeros.clone(),
            memory=torch.full((batch, n, m), _MEMORY_INIT, device=device, dtype=dtype),
            reads=torch.zeros(batch, r, m, device=device, dtype=dtype),
            read_weights=torch.zeros(batch, r, n, device=device, dtype=dtype),
            usage=torch.zeros(batch, n, device=device, dtype=dtype),
        )

    def step(self, state: MemoryState, inputs: Tensor) -> tuple[MemoryState, Tensor]:
        """One time step for ``B`` sequences (never writes in place).

        Args:
            state: the state after step ``t - 1``.
            inputs: ``[B, D + ways]``: encoded ``x_t`` and the offset label ``y_{t-1}``.

        Returns:
            ``(state_t, out_t)`` with ``out_t = [h_t, r_t]`` of shape ``[B, hidden + heads * width]``
            (``self.output(out_t)`` are the logits).
        """
        b, r, m = inputs.shape[0], self.read_heads, self.memory_width
        h, c = self.controller(torch.cat([inputs, state.reads.flatten(1)], -1), (state.h, state.c))
        keys = torch.tanh(self.key(h)).view(b, r, m)
        alpha = torch.sigmoid(self.gate(h)).unsqueeze(-1)  # [B, R, 1]
        least_used = least_used_weights(state.usage, r)  # w^lu_{t-1}, from w^u_{t-1}
        write_weights = alpha * state.read_weights + (1.0 - alpha) * least_used  # eq. 7, [B, R, N]
        # "Prior to writing to memory, the least used memory location is computed from w^u_{t-1} and is
        # set to zero": each head's least-used slot is cleared, so a fresh write does not mix with old content.
        keep = 1.0 - least_used.amax(1)  # [B, N]
        memory = state.memory * keep.unsqueeze(-1) + write_weights.transpose(1, 2) @ keys  # eq. 8
        read_weights = cosine_read_weights(keys, memory)  # eqs. 2-3, read from M_t
        reads = read_weights @ memory  # eq. 4, [B, R, M]
        usage = self.gamma * state.usage + read_weights.sum(1) + write_weights.sum(1)  # eq. 5
        return MemoryState(h, c, memory, reads, read_weights, usage), torch.cat([h, reads.flatten(1)], -1)

    def run(self, features: Tensor, labels: Tensor, state: MemoryState | None = None) -> tuple[Tensor, MemoryState]:
        """Run the memory over ``B`` sequences of encoded examples.

        Args:
            features: ``[B, L, D]`` encoded examples.
            labels: ``[B, L]`` their labels (fed one step late, :func:`offset_labels`).
            state: start state; the initial state when omitted.

        Returns:
            ``(out [B, L, hidden + heads * width], final state)``.
        """
        b, length = labels.shape
        inputs = torch.cat([features, offset_labels(labels, self.ways).to(features.dtype)], -1)
        if state is None:
            state = self.initial_state(b, features.device, features.dtype)
        outs = []
        for t in range(length):  # recurrent: only time is a loop, sequences run together
            state, out = self.step(state, inputs[:, t])
            outs.append(out)
        return torch.stack(outs, 1), state

    # ------------------------------------------------------------------ inputs and checks

    def encode(self, x: Tensor, encoder: EvalModule | None = None) -> Tensor:
        """``x [N, *x_shape] -> [N, D]`` through the backbone (flattened), with the width checked."""
        z = (encoder or self.backbone)(x).flatten(1)
        if z.shape[-1] != self.feature_dim:
            raise EpisodeError(
                f"the encoder maps inputs of shape {tuple(x.shape[1:])} to {z.shape[-1]} features but the controller "
                f"was built for feature_dim={self.feature_dim}; feed the image size the encoder was built for (e.g. "
                f"data.args.image_size 20 with backbone_args.image_size 20 for 'pixels') or set "
                f"learner_args.feature_dim={z.shape[-1]}"
            )
        return z

    def _check_labels(self, labels: Tensor, what: str) -> None:
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise EpisodeError(f"{what} must be integer class indices 0..{self.ways - 1}, got {labels.dtype}; "
                               "MANN classifies, it takes no real-valued targets")
        if labels.numel() == 0:
            raise EpisodeError(f"{what} is empty: a MANN sequence needs at least one example")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= self.ways:
            raise EpisodeError(
                f"{what} holds labels {lo}..{hi} but this MANN was built for ways={self.ways} (its label input and "
                f"output layer have {self.ways} units); build it with learner_args.ways={max(hi + 1, self.ways)} or "
                f"sample {self.ways}-way episodes with labels 0..{self.ways - 1}"
            )

    def _check_queries(self, queries: int) -> None:
        if queries > self.memory_slots:
            raise EpisodeError(
                f"the query set of {queries} examples per task is larger than the memory ({self.memory_slots} slots): "
                "in training every query is written to memory as a step of the sequence, so LRUA would have to "
                "overwrite the episode while reading it; lower queries (or ways) to at most "
                f"{self.memory_slots} queries per task, or build the learner with learner_args.memory_slots >= {queries}"
            )

    def _encode_tasks(self, x: Tensor) -> Tensor:
        """``[T, L, *x_shape] -> [T, L, D]``, one encoder pass per task (BatchNorm statistics stay per task)."""
        return torch.stack([self.encode(x[t]) for t in range(x.shape[0])])

    # ------------------------------------------------------------------ the contract

    def sequence_logits(self, x: Tensor, y: Tensor) -> Tensor:
        """Logits of every step of ``T`` sequences, differentiable.

        Args:
            x: ``[T, L, *x_shape]`` examples in presentation order.
            y: ``[T, L]`` their labels (the model sees ``y[:, t-1]`` at step ``t``).

        Returns:
            ``[T, L, ways]``: step ``t``'s prediction of ``y[:, t]``.
        """
        if y.dim() != 2 or x.shape[:2] != y.shape:
            raise EpisodeError(f"x must be [T, L, *x_shape] and y [T, L] with the same T and L, got {tuple(x.shape)} "
                               f"and {tuple(y.shape)}")
        self._check_labels(y, "the sequence labels")
        out, _ = self.run(self._encode_tasks(x), y)
        return self.output(out)

    def loss(self, batch: Episode) -> Tensor:
        """Mean cross-entropy over every step of the shuffled support + query sequence of every task.

        ``last_metrics["accuracy"]`` is the accuracy over all steps (first presentations included,
        which are at chance): use :func:`instance_accuracy` for the paper's per-instance figures.
        """
        batch = batch.batch()
        s_x, s_y, q_x, q_y = batch
        if s_x.shape[2:] != q_x.shape[2:] or s_x.shape[:2] != s_y.shape or q_x.shape[:2] != q_y.shape:
            raise EpisodeError(
                f"support and query must be [T, S, *x_shape] / [T, S] and [T, Q, *x_shape] / [T, Q] with the same "
                f"x_shape, got support_x {tuple(s_x.shape)}, support_y {tuple(s_y.shape)}, query_x {tuple(q_x.shape)}, "
                f"query_y {tuple(q_y.shape)}"
            )
        self._check_queries(q_y.shape[1])
        x, y = torch.cat([s_x, q_x], 1), torch.cat([s_y, q_y], 1)
        if self.shuffle:
            # Labels are fed one step late, so the order matters: shuffle so that classes interleave as in
            # the paper's episodes (the sampler groups each set by class).
            perm = torch.rand(y.shape, device=y.device).argsort(1)
            y = y.gather(1, perm)
            x = x.gather(1, perm.view(*perm.shape, *([1] * (x.dim() - 2))).expand_as(x))
        logits = self.sequence_logits(x, y)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        with torch.no_grad():
            self.last_metrics = {"accuracy": (logits.argmax(-1) == y).float().mean().item()}
        return loss

    @torch.no_grad()
    def adapt(self, support_x: Tensor, support_y: Tensor) -> MANNPredictor:
        """Run the memory over one task's support sequence; no parameters or buffers change.

        The support is presented in a seeded random order (``eval_order_seed``; the given order when
        ``None``), its labels one step late; the predictor continues from the final state.

        Args:
            support_x: ``[S, *x_shape]``.
            support_y: ``[S]`` labels ``0 .. ways-1``.
        """
        if support_y.dim() != 1 or support_x.dim() < 2 or support_x.shape[0] != support_y.shape[0]:
            raise EpisodeError(
                f"adapt takes ONE task: support_x [S, *x_shape] and support_y [S], got {tuple(support_x.shape)} and "
                f"{tuple(support_y.shape)}; for a meta-batch [T, ...] call adapt per task (episode.task(i))"
            )
        self._check_labels(support_y, "support_y")
        if self.eval_order_seed is not None:
            g = torch.Generator().manual_seed(int(self.eval_order_seed))
            perm = torch.randperm(support_y.shape[0], generator=g).to(support_y.device)
            support_x, support_y = support_x[perm], support_y[perm]
        encoder = EvalModule(self.backbone)
        features = self.encode(support_x, encoder=encoder).unsqueeze(0)
        _, state = self.run(features, support_y.unsqueeze(0))
        last = F.one_hot(support_y[-1:], self.ways).to(features.dtype)  # the offset label of the next step
        return MANNPredictor(self, MemoryState(*(t.detach() for t in state)), last)


@torch.no_grad()
def instance_accuracy(learner: MANN, episodes: Iterable[Episode], instances: Sequence[int] = PAPER_INSTANCES,
                      seed: int = 0, batch_size: int = 100, device: torch.device | str | None = None) -> dict[int, Tensor]:
    """The paper's metric: per-episode accuracy at the ``k``-th presentation of a class.

    Each episode's support and query examples are concatenated and shuffled (a generator seeded
    with ``seed``, so the same episodes give the same sequences everywhere) into one sequence,
    which the learner runs in eval mode, predicting every step's label before it is shown.

    Args:
        learner: a :class:`MANN`.
        episodes: unbatched episodes of equal sizes, e.g. ``EpisodeSampler(test, 5, 9, 1).fixed_episodes(600)``
            (10 instances of each of 5 classes: 50-step sequences).
        instances: the ``k`` to report (1-based).
        seed: seed of the sequence order.
        batch_size: sequences run together.
        device: where to run; the learner's device by default.

    Returns:
        ``{k: [E] float tensor}``: accuracy in ``[0, 1]`` of each of the ``E`` episodes at instance ``k``
        (NaN where an episode has no ``k``-th instance). ``mean_ci95(result[2].tolist())`` summarises one.

    Example:
        >>> acc = instance_accuracy(learner, EpisodeSampler(test, 5, 9, 1).fixed_episodes(600, seed=0))
        >>> {k: float(v.mean()) for k, v in acc.items()}
    """
    if device is None:
        first = next(learner.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    was_training = learner.training
    learner.eval()
    preds, targets = [], []
    pending: list[tuple[Tensor, Tensor]] = []

    def flush() -> None:
        x = torch.stack([p[0] for p in pending]).to(device)
        y = torch.stack([p[1] for p in pending]).to(device)
        preds.append(learner.sequence_logits(x, y).argmax(-1).cpu())
        targets.append(y.cpu())
        pending.clear()

    try:
        for episode in episodes:
            if episode.is_batched:
                raise ValueError("instance_accuracy expects unbatched episodes; iterate an EpisodeSet, not .batches()")
            x = torch.cat([episode.support_x, episode.query_x])
            y = torch.cat([episode.support_y, episode.query_y])
            perm = torch.randperm(len(y), generator=g)
            if pending and y.shape != pending[0][1].shape:
                flush()  # sequences of another length run in their own batch
            pending.append((x[perm], y[perm]))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    finally:
        learner.train(was_training)
    if not preds:
        raise ValueError("no episodes to evaluate: pass at least one episode")
    lengths = {p.shape[1] for p in preds}
    if len(lengths) > 1:
        # Different lengths: score each batch on its own and concatenate the per-episode results.
        parts = [per_instance_accuracy(p, t, instances) for p, t in zip(preds, targets)]
        return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
    return per_instance_accuracy(torch.cat(preds), torch.cat(targets), instances)


@register_learner("mann")
def mann(backbone: nn.Module, ways: int = 5, feature_dim: int | None = None, hidden: int = 200,
         memory_slots: int = 128, memory_width: int = 40, read_heads: int = 4, gamma: float = 0.95,
         shuffle: bool = True, eval_order_seed: int | None = 0) -> MANN:
    """MANN around the encoder ``backbone`` (see :class:`MANN`)."""
    return MANN(backbone, ways=ways, feature_dim=feature_dim, hidden=hidden, memory_slots=memory_slots,
                memory_width=memory_width, read_heads=read_heads, gamma=gamma, shuffle=shuffle,
                eval_order_seed=eval_order_seed)
