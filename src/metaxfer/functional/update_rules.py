"""Inner-loop update rules for :func:`metaxfer.functional.inner_loop` (its ``update`` argument).

An update rule is a pure function ``(params, grads, loss, step, state) ->
(params, state)`` (:class:`metaxfer.functional.inner_loop.UpdateRule`). Being
pure tensor code without data-dependent control flow, the rules here run per
task, under ``torch.func.vmap`` over the tasks of a meta-batch, and under
outer autograd.

* :class:`AdamUpdate`: Adam (Kingma & Ba 2015) with its moments kept in the
  rule's ``state``, reset for every task; with ``beta1 = 0`` it is the inner
  optimiser of Reptile on Omniglot and miniImageNet (Nichol, Achiam &
  Schulman 2018, "On First-Order Meta-Learning Algorithms", appendix A).
* :func:`log_sign_preprocess`: the gradient / loss preprocessing of learned
  optimisers (Andrychowicz et al. 2016, "Learning to learn by gradient descent
  by gradient descent", appendix A), used by the LSTM meta-learner (Ravi &
  Larochelle 2017).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from metaxfer.errors import ConfigError
from metaxfer.functional.inner_loop import Params

__all__ = ["AdamUpdate", "flatten_params", "log_sign_preprocess", "unflatten_params"]


class AdamUpdate:
    """Adam as an inner-loop update rule; the moment estimates live in ``state`` (``None`` at step 0).

    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``theta <- theta - lr * m_hat / (sqrt(v_hat) + eps)`` with the usual bias
    corrections ``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 - b2^t)``.

    The state is ``{"m": moments, "v": moments, "t": steps taken}``. It
    starts at zero for every task unless ``inner_loop`` is given an initial
    ``update_state``: the Reptile reference code (openai/supervised-reptile)
    keeps TensorFlow's Adam slots across training tasks and starts every
    evaluation task from them, which :class:`metaxfer.learners.Reptile`
    reproduces with ``persistent_inner_state=True``. ``t`` carries on from
    the initial state, so the bias correction is Adam's own.

    Args:
        lr: step size (Reptile: 1e-3 on Omniglot 5-way).
        betas: ``(b1, b2)``; Reptile uses ``b1 = 0`` ("we found it helpful to
            use Adam with beta1 = 0", so the step is ``g / sqrt(v_hat)``).
        eps: added to ``sqrt(v_hat)``.

    Example:
        >>> rule = AdamUpdate(lr=0.1, betas=(0.0, 0.999))
        >>> params, state = rule({"w": torch.ones(2)}, {"w": torch.tensor([2.0, -3.0])}, torch.tensor(0.0), 0, None)
        >>> params["w"]  # the first Adam step moves every coordinate by ~lr against its gradient's sign
        tensor([0.9000, 1.1000])
    """

    def __init__(self, lr: float, betas: tuple[float, float] = (0.0, 0.999), eps: float = 1e-8) -> None:
        b1, b2 = (float(b) for b in betas)
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ConfigError(f"Adam betas must lie in [0, 1), got {tuple(betas)}")
        if lr <= 0 or eps <= 0:
            raise ConfigError(f"Adam lr and eps must be positive, got lr={lr}, eps={eps}")
        self.lr, self.betas, self.eps = float(lr), (b1, b2), float(eps)

    def __call__(self, params: Params, grads: Params, loss: Tensor, step: int, state: Any) -> tuple[Params, Any]:
        b1, b2 = self.betas
        if state is None:
            state = self.initial_state(grads)
        # A tensor step count (not ``step``) so that it can continue across tasks; Adam counts from 1.
        t = state["t"] + 1
        # All parameters as one flat vector: a dozen kernels per step instead of a dozen per parameter tensor.
        # Reptile's inner loop (Conv4, 5 images) spent more time in these small per-tensor ops than in its
        # convolutions. The moment updates are torch.optim.Adam's (lerp, then addcmul).
        names = list(params)
        g = flatten_params(grads, names)
        m = torch.lerp(flatten_params(state["m"], names), g, 1 - b1)
        v = torch.addcmul(flatten_params(state["v"], names) * b2, g, g, value=1 - b2)
        c1, c2 = 1 - torch.pow(b1, t), 1 - torch.pow(b2, t)
        delta = unflatten_params((m / c1) / (torch.sqrt(v / c2) + self.eps) * self.lr, params, names)
        new = {k: params[k] - delta[k] for k in names}
        return new, {"m": unflatten_params(m, params, names), "v": unflatten_params(v, params, names), "t": t}

    @staticmethod
    def initial_state(params: Params) -> dict[str, Any]:
        """Zero moments shaped like ``params`` and a step count of 0 (the state before any step)."""
        anchor = next(iter(params.values()))
        return {"m": {k: torch.zeros_like(p) for k, p in params.items()},
                "v": {k: torch.zeros_like(p) for k, p in params.items()},
                "t": anchor.new_zeros(())}

    def __repr__(self) -> str:
        return f"AdamUpdate(lr={self.lr}, betas={self.betas}, eps={self.eps})"


def flatten_params(tensors: Params, names: list[str]) -> Tensor:
    """The tensors named by ``names``, flattened and concatenated in that order ``[sum of numels]``.

    Update rules that work coordinate-wise run on this one vector (Adam's moments, the LSTM meta-learner's
    cell state) instead of one small kernel per parameter tensor.
    """
    return torch.cat([tensors[k].reshape(-1) for k in names])


def unflatten_params(flat: Tensor, like: Params, names: list[str]) -> Params:
    """Split ``flat`` back into tensors shaped like ``like[k]`` for ``k`` in ``names`` (views of ``flat``)."""
    pieces = torch.split(flat, [like[k].numel() for k in names])
    return {k: piece.view_as(like[k]) for k, piece in zip(names, pieces)}


def log_sign_preprocess(x: Tensor, p: float = 10.0) -> Tensor:
    """Andrychowicz et al. (2016) preprocessing of gradients and losses for a learned optimiser.

    Each coordinate ``x`` becomes two numbers of comparable scale whatever the
    magnitude of ``x``:

    * ``(log|x| / p, sign(x))`` if ``|x| >= e^-p``;
    * ``(-1, e^p * x)`` otherwise.

    Ravi & Larochelle (2017, section 3.2) feed the learner's gradient and loss
    through it (``p = 10``) before the meta-learner's LSTM.

    Args:
        x: any shape ``[*]`` (e.g. a flattened gradient ``[n]`` or a scalar loss).
        p: the scale parameter (> 0).

    Returns:
        ``[*, 2]`` preprocessed values.

    Example:
        >>> log_sign_preprocess(torch.tensor([-1.0, 0.0]))
        tensor([[ 0., -1.],
                [-1.,  0.]])
    """
    if p <= 0:
        raise ConfigError(f"the preprocessing scale p must be positive, got {p}")
    big = x.abs() >= math.exp(-p)
    # clamp keeps log finite on the small branch, whose value torch.where discards anyway
    # (otherwise log(0) = -inf would leak NaN into gradients through where).
    log_part = torch.where(big, torch.log(x.abs().clamp_min(math.exp(-p))) / p, torch.full_like(x, -1.0))
    sign_part = torch.where(big, torch.sign(x), x * math.exp(p))
    return torch.stack([log_part, sign_part], dim=-1)
