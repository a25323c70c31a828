"""Combining trained models: prediction ensembles of any learners, and weight-space model soups.

* :class:`Ensemble` keeps the learner contract: ``adapt`` adapts every member
  (any mix: ProtoNet, MAML, Baseline++, ...) to the same support set, and the
  predictor averages the members' class probabilities (Lakshminarayanan et al.
  2017, "Simple and Scalable Predictive Uncertainty Estimation using Deep
  Ensembles", NeurIPS; Dvornik et al. 2019, "Diversity with Cooperation:
  Ensemble Methods for Few-Shot Classification", ICCV). It runs through
  :func:`metaxfer.evaluate` on fixed episodes like a single learner.
* :func:`uniform_soup` and :func:`greedy_soup` (Wortsman et al. 2022, "Model
  soups: averaging weights of multiple fine-tuned models improves accuracy
  without increasing inference time", ICML) average the *weights* of models
  fine-tuned from one pretrained start: one model's inference cost instead of
  an ensemble's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from metaxfer.errors import CheckpointError, ConfigError, EpisodeError
from metaxfer.learners.base import Learner, Predictor
from metaxfer.tasks.episode import Episode

__all__ = [
    "COMBINE",
    "Ensemble",
    "EnsemblePredictor",
    "GreedySoup",
    "combine_logits",
    "greedy_soup",
    "uniform_soup",
]

#: How :class:`Ensemble` combines its members' outputs.
COMBINE = ("probs", "logits")


def _name(member: object, index: int) -> str:
    return f"member {index} ({type(member).__name__})"


def _normalised_weights(weights: Sequence[float] | None, n: int) -> tuple[float, ...]:
    if weights is None:
        return (1.0 / n,) * n
    values = [float(w) for w in weights]
    if len(values) != n:
        raise ConfigError(f"got {len(values)} weights for {n} ensemble members; give one weight per member (or none "
                          "for a uniform average)")
    bad = [i for i, w in enumerate(values) if not math.isfinite(w) or w < 0]
    if bad:
        raise ConfigError(f"ensemble weights must be finite and >= 0, got {[values[i] for i in bad]} for member(s) "
                          f"{bad}; drop a member instead of giving it a negative weight")
    total = sum(values)
    if total <= 0:
        raise ConfigError("the ensemble weights sum to 0; give at least one member a positive weight")
    return tuple(w / total for w in values)


def combine_logits(logits: Sequence[Tensor], weights: Sequence[float], combine: str = "probs") -> Tensor:
    """Combine the members' logits of one task into the ensemble's log-probabilities.

    * ``"probs"``: ``log(sum_m w_m * softmax(logits_m))``, the log of the
      weighted average of the members' class probabilities (computed as a
      ``logsumexp`` of ``log w_m + log_softmax(logits_m)``, so no probability
      underflows to ``log 0``).
    * ``"logits"``: ``log_softmax(sum_m w_m * logits_m)``, the weighted average of
      the logits, which is the same as normalising the weighted geometric mean of
      the probabilities (a product of experts). It depends on each member's logit
      scale: ProtoNet's logits are squared distances in the hundreds, a linear
      head's are a few units, so the largest-scale member dominates; ``"probs"``
      has no such problem, which is why it is the default.

    Either way ``softmax`` of the result gives the ensemble's probabilities and
    its ``argmax`` the predicted class.

    Args:
        logits: one ``[Q, ways]`` tensor per member (same shape).
        weights: one non-negative weight per member, summing to 1.
        combine: ``"probs"`` or ``"logits"``.

    Returns:
        ``float32`` (or wider) log-probabilities ``[Q, ways]``.

    Raises:
        ConfigError: unknown ``combine``, or logits of different shapes.

    Example:
        >>> a, b = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
        >>> combine_logits([a, b], [0.5, 0.5]).exp()
        tensor([[0.5000, 0.5000]])
    """
    if combine not in COMBINE:
        raise ConfigError(f"unknown combine {combine!r}; choose 'probs' (average the probabilities) or 'logits'")
    if not logits or len(logits) != len(weights):
        raise ConfigError(f"combine_logits needs one weight per logits tensor, got {len(logits)} logits and "
                          f"{len(weights)} weights")
    shapes = {tuple(z.shape) for z in logits}
    if len(shapes) != 1:
        raise ConfigError(f"the members' logits have different shapes {sorted(shapes)}; every member must score "
                          "the same queries and classes")
    dtype = torch.promote_types(logits[0].dtype, torch.float32)
    used = [(z.to(dtype), w) for z, w in zip(logits, weights) if w > 0]  # zero weight: no say at all (not even a NaN)
    if not used:
        raise ConfigError("every combine_logits weight is 0; give at least one member a positive weight")
    if combine == "probs":
        terms = torch.stack([torch.log_softmax(z, dim=-1) + math.log(w) for z, w in used])
        return torch.logsumexp(terms, dim=0)
    mixed = sum(w * torch.log_softmax(z, dim=-1) for z, w in used)
    return torch.log_softmax(mixed, dim=-1)  # type: ignore[arg-type]


class EnsemblePredictor:
    """The ensemble adapted to one task: ``query_x [Q, *x_shape] -> log-probabilities [Q, ways]``.

    Attributes:
        predictors: the members' predictors (same order as the ensemble's members).
        weights: normalised member weights.
        combine: ``"probs"`` or ``"logits"`` (see :func:`combine_logits`).
        ways: classes of the task.
    """

    def __init__(self, predictors: Sequence[Predictor | None], names: Sequence[str], weights: Sequence[float],
                 combine: str, ways: int) -> None:
        self.predictors = list(predictors)
        self.names = list(names)
        self.weights = tuple(weights)
        self.combine = combine
        self.ways = ways

    def member_logits(self, query_x: Tensor) -> list[Tensor | None]:
        """Each member's logits ``[Q, ways]`` (``None`` for a member with weight 0, which is not run).

        Raises:
            ConfigError: a member fails on ``query_x`` or gives logits that are not ``[Q, ways]``.
        """
        outputs: list[Tensor | None] = []
        for predictor, name in zip(self.predictors, self.names):
            if predictor is None:
                outputs.append(None)
                continue
            try:
                with torch.no_grad():
                    z = predictor(query_x)
            except RuntimeError as e:
                raise ConfigError(f"ensemble {name} failed on query_x of shape {tuple(query_x.shape)}: {e}. Every "
                                  "member receives the same input tensors, so all must accept the same image size, "
                                  "channels and normalisation") from e
            expected = (query_x.shape[0], self.ways)
            if tuple(z.shape) != expected:
                raise ConfigError(
                    f"ensemble {name} gives logits of shape {tuple(z.shape)} for {query_x.shape[0]} queries of a "
                    f"{self.ways}-way task (expected {expected}); a member with a fixed number of outputs (e.g. "
                    "MAML's head) can only join ensembles on tasks of that many ways"
                )
            outputs.append(z)
        return outputs

    @torch.no_grad()
    def __call__(self, query_x: Tensor) -> Tensor:
        """``query_x [Q, *x_shape] -> log-probabilities [Q, ways]`` (see :func:`combine_logits`)."""
        outputs = self.member_logits(query_x)
        used = [(z, w) for z, w in zip(outputs, self.weights) if z is not None]
        return combine_logits([z for z, _ in used], [w for _, w in used], self.combine)


class Ensemble(Learner):
    """A prediction ensemble of trained learners of any kind (ProtoNet, MAML, Baseline++, ...).

    ``adapt(support_x, support_y)`` adapts every member to the same support set
    (each member with its own method: prototypes, inner gradient steps, a new
    head on frozen features); the predictor combines the members' outputs per
    query: by default the weighted average of their softmax probabilities
    (Lakshminarayanan et al. 2017, NeurIPS; for few-shot classification Dvornik
    et al. 2019, "Diversity with Cooperation", ICCV), returned as
    log-probabilities so that ``argmax`` and :func:`metaxfer.evaluate`'s
    accuracy work unchanged and ``softmax`` recovers the averaged probabilities.
    See :func:`combine_logits` for ``combine="logits"``.

    Inputs: every member receives the SAME tensors, so the members must have
    been trained on the same preprocessing (image size, channels, inversion,
    normalisation). Members that carry an
    :class:`~metaxfer.data.images.ImagePreprocess` are checked at construction
    and a mismatch is an error; the common preprocessing becomes the ensemble's
    :meth:`preprocess`. A member that fails on the inputs, or returns a
    different number of classes, raises a :class:`ConfigError` naming it.

    Not trainable as a whole: :meth:`loss` raises; train the members
    separately (``metaxfer train`` / :func:`metaxfer.fit`) and ensemble the
    trained learners. Transductive when any member is. The members are
    registered as sub-modules (``members.0...``), so ``.to(device)``,
    ``.eval()`` and ``state_dict`` reach them; the ensemble never changes them.

    Args:
        learners: the members (at least one), each with ``adapt(support_x,
            support_y) -> predictor`` returning logits ``[Q, ways]``.
        weights: one non-negative weight per member, normalised to sum to 1;
            ``None``: uniform. A member with weight 0 is not run.
        combine: ``"probs"`` (average probabilities) or ``"logits"`` (average logits).

    Shapes:
        ``adapt(support_x [S, *x_shape], support_y [S])`` returns
        ``query_x [Q, *x_shape] -> log-probabilities [Q, ways]``.

    Raises:
        ConfigError: no members, a member without ``adapt``, bad weights, an
            unknown ``combine``, or members with different preprocessing.

    Example:
        >>> members = [metaxfer.load("protonet-omniglot-5w1s"), metaxfer.load("runs/maml_omniglot_5w1s")]
        >>> ensemble = Ensemble(members)
        >>> metaxfer.evaluate(ensemble, sampler.fixed_episodes(600))
        >>> ensemble.adapt(support_x, support_y)(query_x).exp()   # averaged probabilities [Q, ways]
    """

    def __init__(self, learners: Sequence[Any], weights: Sequence[float] | None = None,
                 combine: str = "probs") -> None:
        super().__init__()
        learners = list(learners)
        if not learners:
            raise ConfigError("an Ensemble needs at least one member; pass a list of trained learners")
        for i, member in enumerate(learners):
            if not callable(getattr(member, "adapt", None)):
                raise ConfigError(f"ensemble {_name(member, i)} has no adapt(support_x, support_y) method; members "
                                  "must be learners (e.g. metaxfer.load(...))")
        if combine not in COMBINE:
            raise ConfigError(f"unknown combine {combine!r}; choose 'probs' (average the probabilities) or 'logits'")
        self.weights = _normalised_weights(weights, len(learners))
        self.combine = combine
        # Registered so that .to/.eval/state_dict reach the members; the plain list keeps the order when some
        # members are not nn.Modules (any object with adapt() may join).
        self.members = nn.ModuleList([m for m in learners if isinstance(m, nn.Module)])
        self._learners = learners
        self.preprocessor = _common_preprocessor(learners)

    @property
    def learners(self) -> list[Any]:
        """The members, in order."""
        return list(self._learners)

    @property
    def transductive(self) -> bool:  # type: ignore[override]
        """True when any member's predictions depend on the other queries."""
        return any(bool(getattr(m, "transductive", False)) for m in self._learners)

    def loss(self, batch: Episode) -> Tensor:
        """Not defined: an ensemble is not trained as a whole.

        Raises:
            ConfigError: always; train the members separately.
        """
        raise ConfigError("an Ensemble is not trained as a whole: train each member separately (metaxfer train / "
                          "metaxfer.fit) and build the Ensemble from the trained learners")

    def adapt(self, support_x: Tensor, support_y: Tensor) -> EnsemblePredictor:
        """Adapt every member (with non-zero weight) to one task's support set; never mutates a member.

        Args:
            support_x: ``[S, *x_shape]``.
            support_y: ``[S]`` class indices ``0 .. ways-1``.

        Returns:
            An :class:`EnsemblePredictor`: ``query_x [Q, *x_shape] -> log-probabilities [Q, ways]``.

        Raises:
            EpisodeError: floating-point (regression) targets.
            ConfigError: a member fails on ``support_x`` (its name and the input shape are given).
        """
        if support_y.is_floating_point():
            raise EpisodeError("Ensemble averages class probabilities, so it needs integer class labels; for "
                               "regression average the members' predictions yourself")
        ways = int(support_y.max().item()) + 1 if support_y.numel() else 0
        predictors: list[Predictor | None] = []
        names = [_name(m, i) for i, m in enumerate(self._learners)]
        for member, name, w in zip(self._learners, names, self.weights):
            if w == 0:
                predictors.append(None)
                continue
            try:
                predictors.append(member.adapt(support_x, support_y))
            except RuntimeError as e:
                raise ConfigError(f"ensemble {name} failed to adapt to support_x of shape {tuple(support_x.shape)}: "
                                  f"{e}. Every member receives the same input tensors, so all must accept the same "
                                  "image size, channels and normalisation") from e
        return EnsemblePredictor(predictors, names, self.weights, self.combine, ways)

    def extra_repr(self) -> str:
        return f"weights={[round(w, 4) for w in self.weights]}, combine={self.combine!r}"


def _common_preprocessor(learners: Sequence[Any]) -> Any:
    """The members' shared preprocessing (``None`` when none carries one); a mismatch is an error.

    Preprocessors that describe themselves (``to_dict``, as
    :class:`~metaxfer.data.images.ImagePreprocess`) are compared by value;
    other callables cannot be compared and are trusted.
    """
    found = [(i, m, getattr(m, "preprocessor", None)) for i, m in enumerate(learners)]
    found = [(i, m, p) for i, m, p in found if p is not None]
    if not found:
        return None
    images = [(i, m, p) for i, m, p in found if callable(getattr(p, "to_dict", None))]
    if images:
        i0, m0, p0 = images[0]
        for i, m, p in images[1:]:
            if p.to_dict() != p0.to_dict():
                raise ConfigError(
                    f"the ensemble members preprocess images differently: {_name(m0, i0)} uses {p0.to_dict()}, "
                    f"{_name(m, i)} uses {p.to_dict()}. An ensemble feeds the same input tensors to every member, "
                    "so combine models trained on the same preprocessing (or, if you know the inputs are "
                    "compatible, set member.preprocessor = None before building the Ensemble)"
                )
        return p0
    return found[0][2]


# --- model soups ----------------------------------------------------------------------------------

StateLike = nn.Module | Mapping[str, Tensor]


def _state(model: StateLike, index: int) -> dict[str, Tensor]:
    if isinstance(model, nn.Module):
        return dict(model.state_dict())
    if isinstance(model, Mapping):
        bad = [k for k, v in model.items() if not isinstance(v, Tensor)]
        if bad:
            raise ConfigError(f"model {index} is a mapping whose entry {bad[0]!r} is a {type(model[bad[0]]).__name__}, "
                              "not a tensor; pass state dicts (model.state_dict()) or modules")
        return dict(model)
    raise ConfigError(f"model {index} is a {type(model).__name__}; pass nn.Modules or state dicts (model.state_dict())")


def _averaged(tensor: Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


def _check_same_layout(states: Sequence[Mapping[str, Tensor]]) -> None:
    """Every state has the keys, shapes and dtypes of the first; errors name the first offending key."""
    hint = ("a soup averages the weights of models fine-tuned from one pretrained start, which share every key, "
            "shape and dtype")
    ref = states[0]
    for i, state in enumerate(states[1:], start=1):
        missing = [k for k in ref if k not in state]
        if missing:
            raise CheckpointError(f"model {i} has no key {missing[0]!r} that model 0 has"
                                  f"{f' ({len(missing)} keys missing)' if len(missing) > 1 else ''}; {hint}")
        extra = [k for k in state if k not in ref]
        if extra:
            raise CheckpointError(f"model {i} has key {extra[0]!r} that model 0 does not"
                                  f"{f' ({len(extra)} extra keys)' if len(extra) > 1 else ''}; {hint}")
        for key, value in ref.items():
            other = state[key]
            if other.shape != value.shape:
                raise CheckpointError(f"key {key!r} has shape {tuple(other.shape)} in model {i} but "
                                      f"{tuple(value.shape)} in model 0; {hint}")
            if other.dtype != value.dtype:
                raise CheckpointError(f"key {key!r} is {other.dtype} in model {i} but {value.dtype} in model 0; "
                                      f"cast the models to one dtype first ({hint})")


def _uniform(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    soup: dict[str, Tensor] = {}
    n = len(states)
    for key, first in states[0].items():
        if _averaged(first):
            # Accumulate in at least float32: a half-precision running sum of many models loses digits.
            acc_dtype = torch.promote_types(first.dtype, torch.float32)
            total = torch.zeros(first.shape, dtype=acc_dtype, device=first.device)
            for state in states:
                total += state[key].detach().to(device=first.device, dtype=acc_dtype)
            soup[key] = (total / n).to(first.dtype)
            continue
        # Integer / bool entries are counters, indices or masks: averaging them means nothing.
        if not key.endswith("num_batches_tracked"):
            for i, state in enumerate(states[1:], start=1):
                if not torch.equal(state[key].to(first.device), first):
                    raise CheckpointError(
                        f"key {key!r} is a {first.dtype} entry that differs between model 0 and model {i}; integer "
                        "entries cannot be averaged, so a soup needs them equal in every model"
                    )
        # BatchNorm's num_batches_tracked only counts training steps (it may differ): keep the first model's.
        soup[key] = first.detach().clone()
    return soup


def uniform_soup(models: Sequence[StateLike]) -> dict[str, Tensor]:
    """The uniform model soup: the average of the weights of fine-tuned models (Wortsman et al. 2022, ICML).

    Averages every floating-point entry of the state dicts, BatchNorm running
    statistics included (as the paper's recipe does; the result is not the
    exact statistics of the averaged network, but close when the models are).
    Integer and bool entries are not averaged: they are taken from the first
    model, and must be equal in every model, except BatchNorm's
    ``num_batches_tracked`` step counters, which may differ (the first model's
    is kept; it only matters for ``momentum=None`` BatchNorm training).
    Accumulates in at least float32 and returns each entry in its own dtype,
    on the first model's device. The inputs are not modified.

    Averaging weights only makes sense for models fine-tuned from ONE
    pretrained start (they lie in one basin of the loss); independently trained
    networks average to garbage, whatever their keys.

    Args:
        models: at least one ``nn.Module`` or state dict (``{name: tensor}``), all
            with the same keys, shapes and dtypes.

    Returns:
        The averaged state dict (new tensors), ready for ``model.load_state_dict``.

    Raises:
        ConfigError: no models, or an input that is neither a module nor a state dict.
        CheckpointError: keys, shapes or dtypes that differ between models, or
            integer entries (other than ``num_batches_tracked``) that differ;
            the message names the key and the models.

    Example:
        >>> soup = uniform_soup([finetune(model, x, y, seed=s) for s in range(3)])
        >>> model.load_state_dict(soup)
    """
    models = list(models)
    if not models:
        raise ConfigError("uniform_soup needs at least one model, got none")
    states = [_state(m, i) for i, m in enumerate(models)]
    _check_same_layout(states)
    return _uniform(states)


@dataclass
class GreedySoup:
    """The result of :func:`greedy_soup`.

    Attributes:
        state_dict: the soup's weights (the uniform average of the kept ingredients).
        ingredients: indices into the candidates of the kept models, in the order they were added
            (the best single model first).
        score: held-out score of the soup.
        scores: held-out score of every candidate alone, in input order.
    """

    state_dict: dict[str, Tensor]
    ingredients: list[int]
    score: float
    scores: list[float] = field(default_factory=list)


def greedy_soup(candidates: Sequence[StateLike], evaluate_fn: Callable[[dict[str, Tensor]], float], *,
                scores: Sequence[float] | None = None) -> GreedySoup:
    """The greedy model soup (Wortsman et al. 2022, ICML, Recipe 1).

    Sort the candidates by their held-out score, best first; start the soup
    with the best one; then try each next candidate in that order: it stays in
    the soup when the held-out score of the uniform average of the soup's
    ingredients plus it is not lower than the soup's score so far (``>=``), and
    is left out otherwise. The result is never worse on the held-out data than
    the best single model. A candidate whose trial score is NaN is left out.

    ``evaluate_fn`` scores a state dict on HELD-OUT data (validation episodes,
    never the test set), higher is better: e.g. load it into a model and return
    :func:`metaxfer.evaluate`'s mean accuracy (for a loss, return minus the loss).

    Args:
        candidates: at least one ``nn.Module`` or state dict, fine-tuned from one
            pretrained start (same keys, shapes and dtypes).
        evaluate_fn: ``state_dict -> score`` (a float, higher is better).
        scores: the candidates' own held-out scores when already known (e.g.
            from fine-tuning logs); computed with ``evaluate_fn`` when ``None``.

    Returns:
        :class:`GreedySoup` with the weights, the kept ingredients and the scores.

    Raises:
        ConfigError: no candidates, ``scores`` of the wrong length, or a
            candidate whose own score is NaN.
        CheckpointError: mismatched keys, shapes or dtypes (see :func:`uniform_soup`).

    Example:
        >>> def val_accuracy(state):
        ...     model.load_state_dict(state)
        ...     return metaxfer.evaluate(learner, val_episodes).mean
        >>> soup = greedy_soup(finetuned_models, val_accuracy)
        >>> model.load_state_dict(soup.state_dict); soup.ingredients
    """
    candidates = list(candidates)
    if not candidates:
        raise ConfigError("greedy_soup needs at least one candidate model, got none")
    states = [_state(m, i) for i, m in enumerate(candidates)]
    _check_same_layout(states)  # before any (possibly long) evaluation
    if scores is None:
        own = [float(evaluate_fn(s)) for s in states]
    else:
        own = [float(s) for s in scores]
        if len(own) != len(states):
            raise ConfigError(f"got {len(own)} scores for {len(states)} candidates; give one held-out score per "
                              "candidate, or none to compute them with evaluate_fn")
    nan = [i for i, s in enumerate(own) if math.isnan(s)]
    if nan:
        raise ConfigError(f"the held-out score of candidate(s) {nan} is NaN; evaluate_fn must return a number "
                          "(higher is better)")
    order = sorted(range(len(states)), key=lambda i: -own[i])  # stable: ties keep the input order
    kept = [order[0]]
    best = own[order[0]]
    soup = _uniform([states[order[0]]])
    for i in order[1:]:
        trial = _uniform([states[j] for j in [*kept, i]])
        score = float(evaluate_fn(trial))
        if score >= best:
            kept.append(i)
            best, soup = score, trial
    return GreedySoup(state_dict=soup, ingredients=kept, score=best, scores=own)
