"""The functional inner loop and support-statistics BatchNorm, checked against closed forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from metaxfer.functional import (
    inner_loop,
    sgd_step,
    support_batch_norm,
    without_running_stats,
)

D = 3  # input dimension of the linear-regression tasks


def _regression_task(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, D, generator=generator, dtype=torch.float64)
    y = torch.randn(n, generator=generator, dtype=torch.float64)
    return x, y


def _mse(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Linear regression ``mean((x @ w + b - y)^2)``."""
    return F.mse_loss(x @ params["w"] + params["b"], y)


def _normal_equations(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(A, c)`` with ``grad L(theta) = A theta - c`` for theta = [w; b] (A is the constant Hessian)."""
    xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    return 2 * xt.T @ xt / len(x), 2 * xt.T @ y / len(x)


def _closed_form_meta_grad(theta: Tensor, support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor], lr: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Second- and first-order meta-gradients of ``L_query(theta_K)`` for linear regression.

    With a diagonal step ``Lambda = diag(lr)``, ``theta_{j+1} = theta_j - Lambda (A_s theta_j - c_s)``,
    so ``d theta_K / d theta = (I - Lambda A_s)^K`` and the meta-gradient is
    ``((I - Lambda A_s)^K)^T (A_q theta_K - c_q)``; first order drops the Jacobian.
    """
    a_s, c_s = _normal_equations(*support)
    a_q, c_q = _normal_equations(*query)
    lam = torch.diag(lr)
    for _ in range(steps):
        theta = theta - lam @ (a_s @ theta - c_s)
    query_grad = a_q @ theta - c_q
    jac = torch.linalg.matrix_power(torch.eye(D + 1, dtype=theta.dtype) - lam @ a_s, steps)
    return jac.T @ query_grad, query_grad


def _autograd_meta_grad(params: dict[str, Tensor], support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor], lr, steps: int, first_order: bool) -> Tensor:
    adapted = inner_loop(_mse, params, *support, lr=lr, steps=steps, first_order=first_order)
    grads = torch.autograd.grad(_mse(adapted, *query), [params["w"], params["b"]])
    return torch.cat([grads[0], grads[1].reshape(1)])


@pytest.mark.parametrize("per_parameter_lr", [False, True])
def test_meta_gradient_of_linear_regression_matches_closed_form(per_parameter_lr: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(D, dtype=torch.float64, generator=gen).requires_grad_(), "b": torch.tensor(0.3, dtype=torch.float64, requires_grad=True)}
    support, query = _regression_task(6, gen), _regression_task(8, gen)
    if per_parameter_lr:
        lr = {"w": torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64), "b": torch.tensor(0.15, dtype=torch.float64)}
        lr_vec = torch.cat([lr["w"], lr["b"].reshape(1)])
    else:
        lr, lr_vec = 0.1, torch.full((D + 1,), 0.1, dtype=torch.float64)
    theta = torch.cat([params["w"], params["b"].reshape(1)]).detach()
    second, first = _closed_form_meta_grad(theta, support, query, lr_vec, steps=2)

    got_second = _autograd_meta_grad(params, support, query, lr, steps=2, first_order=False)
    got_first = _autograd_meta_grad(params, support, query, lr, steps=2, first_order=True)

    torch.testing.assert_close(got_second, second, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_first, first, rtol=1e-12, atol=1e-12)
    # The Hessian term is not negligible here, so the two orders must differ clearly.
    assert (got_second - got_first).norm() > 0.05 * got_second.norm()


def test_inner_loop_under_vmap_matches_per_task_loop() -> None:
    gen = torch.Generator().manual_seed(2)
    params = {"w": torch.randn(D, dtype=torch.float64, generator=gen), "b": torch.tensor(0.0, dtype=torch.float64)}
    xs, ys = torch.randn(4, 5, D, dtype=torch.float64, generator=gen), torch.randn(4, 5, dtype=torch.float64, generator=gen)

    def adapt(x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return inner_loop(_mse, params, x, y, lr=0.1, steps=3)

    batched = torch.func.vmap(adapt)(xs, ys)
    for t in range(4):
        single = adapt(xs[t], ys[t])
        for name in params:
            torch.testing.assert_close(batched[name][t], single[name], rtol=1e-13, atol=1e-13)


def test_minibatches_cycle_through_the_support_set_in_order_and_compose_with_vmap() -> None:
    gen = torch.Generator().manual_seed(5)
    params = {"w": torch.randn(D, dtype=torch.float64, generator=gen), "b": torch.tensor(0.0, dtype=torch.float64)}
    xs, ys = torch.randn(2, 6, D, dtype=torch.float64, generator=gen), torch.randn(2, 6, dtype=torch.float64, generator=gen)
    # 4 steps of 4 over 6 examples: [0..3], [4, 5, 0, 1], [2..5], [0..3]: wraps around the set.
    windows = [[0, 1, 2, 3], [4, 5, 0, 1], [2, 3, 4, 5], [0, 1, 2, 3]]
    for t in range(2):
        expected = dict(params)
        for window in windows:
            expected = inner_loop(_mse, expected, xs[t, window], ys[t, window], lr=0.1, steps=1)
        got = inner_loop(_mse, params, xs[t], ys[t], lr=0.1, steps=4, batch_size=4)
        batched = torch.func.vmap(lambda x, y: inner_loop(_mse, params, x, y, lr=0.1, steps=4, batch_size=4))(xs, ys)
        for name in params:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-13, atol=1e-13)
            torch.testing.assert_close(batched[name][t], expected[name], rtol=1e-13, atol=1e-13)
    full = inner_loop(_mse, params, xs[0], ys[0], lr=0.1, steps=2)
    for size in (None, 6, 10):  # a batch as large as the set is the full batch
        same = inner_loop(_mse, params, xs[0], ys[0], lr=0.1, steps=2, batch_size=size)
        assert all(torch.equal(same[k], full[k]) for k in params)
    with pytest.raises(ValueError, match="batch_size must be a positive"):
        inner_loop(_mse, params, xs[0], ys[0], lr=0.1, steps=1, batch_size=0)


def test_zero_steps_returns_the_parameters_and_bad_inputs_raise() -> None:
    params = {"w": torch.randn(D), "b": torch.zeros(())}
    x, y = torch.randn(4, D), torch.randn(4)
    adapted = inner_loop(_mse, params, x, y, lr=0.1, steps=0)
    assert all(adapted[k] is params[k] for k in params)
    with pytest.raises(ValueError, match="steps"):
        inner_loop(_mse, params, x, y, lr=0.1, steps=-1)
    with pytest.raises(KeyError, match="'b'"):
        sgd_step(params, params, {"w": 0.1})


def test_support_batch_norm_uses_support_statistics_only() -> None:
    bn = torch.nn.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    support, query = torch.randn(5, 4, 3, 3, dtype=torch.float64), torch.randn(7, 4, 3, 3, dtype=torch.float64)
    before = {k: v.clone() for k, v in bn.state_dict().items()}

    def run(x: Tensor, num_support: int | None) -> Tensor:
        with support_batch_norm(num_support):
            return torch.func.functional_call(bn, without_running_stats(bn), (x,), strict=False)

    out = run(torch.cat([support, query]), 5)
    reference = F.batch_norm(support, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    torch.testing.assert_close(out[:5], reference, rtol=1e-12, atol=1e-12)
    # A query row sees only the support statistics: other queries do not matter.
    other = run(torch.cat([support, query[:1], -3 * query[1:]]), 5)
    assert torch.equal(out[5], other[5])
    # The whole batch when num_support is None, exactly training-mode BatchNorm.
    torch.testing.assert_close(run(query, None), F.batch_norm(query, None, None, bn.weight, bn.bias, training=True), rtol=1e-12, atol=1e-12)
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())
    with pytest.raises(ValueError, match="num_support"):
        support_batch_norm(0)


def test_support_batch_norm_gradients_are_exact() -> None:
    """Gradients flow through the support statistics (they depend on the parameters upstream)."""
    weight, bias = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    x = torch.randn(6, 3, dtype=torch.float64)
    inputs = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())

    def normalise(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        with support_batch_norm(4):
            return F.batch_norm(x, None, None, w, b, training=True)

    assert torch.autograd.gradcheck(normalise, inputs)
    assert torch.autograd.gradgradcheck(normalise, inputs)
