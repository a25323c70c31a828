"""Differentiable convex base learners on support features: ridge regression and the Crammer-Singer SVM.

Both work in the ``S x S`` kernel space of the support set (``S`` support
examples, ``D`` features): with ``S << D`` (25 examples of 64 to 16 000
features) that is the cheap side, and the query logits only need the
query-support kernel.

* Ridge regression (R2-D2, Bertinetto, Henriques, Torr & Vedaldi, ICLR 2019,
  "Meta-learning with differentiable closed-form solvers"): the Woodbury form
  ``W = X^T (X X^T + lambda I)^-1 Y`` of ``(X^T X + lambda I)^-1 X^T Y``.
* Crammer-Singer multi-class SVM (Crammer & Singer, JMLR 2001), the MetaOptNet
  head (Lee, Maji, Ravichandran & Soatto, CVPR 2019), solved in the dual by
  accelerated projected gradient (FISTA, Beck & Teboulle 2009) with adaptive
  restart (O'Donoghue & Candes 2015). The dual's feasible set is a product of
  scaled simplices, whose projection is closed-form (sort + cumulative sum,
  Duchi et al. 2008), so every iteration is a few batched tensor ops and
  autograd differentiates through the unrolled iterations: no QP library.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "crammer_singer_duality_gap",
    "crammer_singer_svm",
    "gram",
    "project_simplex",
    "ridge_dual",
]


def gram(x: Tensor, y: Tensor) -> Tensor:
    """Linear kernel ``x @ y^T``: ``[..., N, D], [..., M, D] -> [..., N, M]``."""
    return x @ y.transpose(-1, -2)


def ridge_dual(kernel: Tensor, targets: Tensor, lam: Tensor | float) -> Tensor:
    """Dual coefficients ``A = (K + lambda I)^-1 Y`` of ridge regression (Woodbury identity).

    The primal weights are ``W = X^T A``, equal to ``(X^T X + lambda I)^-1 X^T Y``
    (Bertinetto et al. 2019, eq. 5); solving the ``S x S`` system costs
    ``O(S^3)`` instead of ``O(D^3)``.

    Args:
        kernel: ``[..., S, S]`` support Gram matrix ``X X^T``.
        targets: ``[..., S, ways]`` regression targets (one-hot labels).
        lam: ridge penalty ``lambda > 0`` (a float or a scalar tensor, e.g. a learnt one).

    Returns:
        ``[..., S, ways]`` dual coefficients ``A``.
    """
    eye = torch.eye(kernel.shape[-1], dtype=kernel.dtype, device=kernel.device)
    return torch.linalg.solve(kernel + lam * eye, targets)


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v [..., K]`` onto the probability simplex.

    Duchi, Shalev-Shwartz, Singer & Chandra (ICML 2008), algorithm 1: sort,
    find the largest ``rho`` with ``u_rho > (sum_{j<=rho} u_j - 1) / rho``,
    shift by that threshold and clip at 0. Differentiable almost everywhere.
    """
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1.0
    k = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype, device=v.device)
    rho = ((u - css / k) > 0).sum(-1, keepdim=True).clamp_min(1)  # >= 1: the largest entry always qualifies
    theta = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp_min(0.0)


def _project_dual(v: Tensor, onehot: Tensor, c: float) -> Tensor:
    """Project ``v [..., S, ways]`` onto ``{alpha_n <= C e_{y_n}, sum_k alpha_nk = 0}`` for every example ``n``.

    With ``alpha_n = C (e_{y_n} - p_n)`` the set is ``p_n`` in the simplex, so
    the projection is ``C (e_y - proj_simplex(e_y - v / C))``.
    """
    return c * (onehot - project_simplex(onehot - v / c))


def crammer_singer_duality_gap(kernel: Tensor, onehot: Tensor, alpha: Tensor, c: float) -> tuple[Tensor, Tensor]:
    """Primal objective and duality gap of the Crammer-Singer SVM at the dual point ``alpha``.

    With ``w_k = sum_n alpha_nk x_n`` and scores ``s = K alpha``:
    primal ``P = 1/2 ||W||^2 + C sum_n max_k (s_nk + 1 - Y_nk - s_{n,y_n})``,
    dual ``D = -1/2 ||W||^2 + sum_n alpha_{n,y_n}``; ``P - D >= 0`` for a
    feasible ``alpha``, with equality exactly at the optimum (strong duality).

    Args:
        kernel: ``[..., S, S]``; onehot: ``[..., S, ways]``; alpha: ``[..., S, ways]`` (feasible).
        c: the SVM's ``C``.

    Returns:
        ``(primal [...], gap [...])``.
    """
    scores = kernel @ alpha  # [..., S, ways]
    norm2 = (alpha * scores).sum((-1, -2))  # ||W||^2 = tr(alpha^T K alpha)
    true = (scores * onehot).sum(-1, keepdim=True)
    hinge = (scores + 1.0 - onehot - true).amax(-1).sum(-1)  # >= 0: the k = y_n term is 0
    primal = 0.5 * norm2 + c * hinge
    dual = -0.5 * norm2 + (alpha * onehot).sum((-1, -2))
    return primal, primal - dual


def crammer_singer_svm(kernel: Tensor, onehot: Tensor, c: float = 0.1, iterations: int = 100,
                       tol: float | None = 1e-4, check_every: int = 10) -> Tensor:
    """Dual solution ``alpha`` of the Crammer-Singer multi-class SVM, differentiable w.r.t. ``kernel``.

    Solves (Lee et al. 2019, eq. 9; Crammer & Singer 2001)

        min_alpha  1/2 sum_k alpha_k^T K alpha_k - sum_n alpha_{n,y_n}
        s.t.       alpha_n <= C e_{y_n},  sum_k alpha_nk = 0   for every support example n,

    whose primal is ``min_W 1/2 ||W||^2 + C sum_n max_k (1 - [k = y_n] + w_k.x_n - w_{y_n}.x_n)``
    (no bias). Solver: FISTA on the dual with step ``1 / lambda_max(K)``
    (the gradient's Lipschitz constant, computed without gradient), closed-form
    projection (:func:`_project_dual`) and adaptive restart whenever the
    momentum points uphill. Starts from the feasible ``alpha = 0``. The
    iterations are unrolled, so autograd gives the gradient of the returned
    ``alpha`` (exact for the iterate, approaching the implicit gradient of the
    optimum as it converges).

    Stopping: after ``iterations`` steps, or earlier when every task's
    relative duality gap ``(P - D) / max(P, 1)`` is at most ``tol`` (checked
    every ``check_every`` steps without gradient; ``tol=None`` always runs
    ``iterations`` steps, e.g. for a fixed compute graph).

    Args:
        kernel: ``[..., S, S]`` support Gram matrix ``X X^T``.
        onehot: ``[..., S, ways]`` one-hot support labels.
        c: the SVM's ``C`` (0.1 in MetaOptNet).
        iterations: maximum number of FISTA steps.
        tol: relative duality-gap tolerance for early stopping, or ``None``.
        check_every: steps between gap checks.

    Returns:
        ``[..., S, ways]`` dual coefficients; the primal weights are ``W = X^T alpha``
        and query scores ``K_qs @ alpha``.
    """
    onehot = onehot.to(kernel.dtype)
    with torch.no_grad():
        lipschitz = torch.linalg.eigvalsh(kernel.detach()).amax(-1).clamp_min(1e-12)[..., None, None]
    step = 1.0 / lipschitz
    alpha = torch.zeros(kernel.shape[:-2] + onehot.shape[-2:], dtype=kernel.dtype, device=kernel.device)
    z, t = alpha, torch.ones_like(lipschitz)
    for i in range(iterations):
        new = _project_dual(z - step * (kernel @ z - onehot), onehot, c)
        t_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
        with torch.no_grad():
            # Restart (drop the momentum) for tasks where the step went against the gradient mapping.
            restart = ((z - new) * (new - alpha)).sum((-1, -2), keepdim=True) > 0
        momentum = torch.where(restart, torch.zeros_like(t), (t - 1.0) / t_new)
        z = new + momentum * (new - alpha)
        t = torch.where(restart, torch.ones_like(t), t_new)
        alpha = new
        if tol is not None and (i + 1) % check_every == 0 and i + 1 < iterations:
            with torch.no_grad():
                primal, gap = crammer_singer_duality_gap(kernel, onehot, alpha, c)
                if bool((gap <= tol * primal.clamp_min(1.0)).all()):
                    break
    return alpha

