"""MAML (Finn et al. 2017): meta-gradients against a per-task loop, a closed form and finite
differences; adaptation that leaves the learner untouched; non-transductive BatchNorm."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaxfer.backbones import Conv4
from metaxfer.learners.gradient import MAML
from metaxfer.learners.registry import create_learner
from metaxfer.tasks.episode import Episode

WAYS = 5


def image_batch(tasks: int, shots: int = 1, queries: int = 2, size: int = 16, dtype: torch.dtype = torch.float64, seed: int = 0) -> Episode:
    """Random images with labels grouped by class: ``[T, ways*shots, 1, size, size]`` etc."""
    gen = torch.Generator().manual_seed(seed)

    def images(n: int) -> Tensor:
        return torch.randn(tasks, n, 1, size, size, generator=gen, dtype=dtype)

    def labels(per_class: int) -> Tensor:
        return torch.arange(WAYS).repeat_interleave(per_class).repeat(tasks, 1)

    return Episode(images(WAYS * shots), labels(shots), images(WAYS * queries), labels(queries))


def cluster_batch(tasks: int, shots: int, queries: int, dim: int = 16, noise: float = 0.3, seed: int = 0) -> Episode:
    """Gaussian class clusters: each task draws ``WAYS`` random centres in ``R^dim``."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(tasks, WAYS, 1, dim, generator=gen) * 1.5

    def draw(per_class: int) -> tuple[Tensor, Tensor]:
        x = centres + noise * torch.randn(tasks, WAYS, per_class, dim, generator=gen)
        return x.reshape(tasks, WAYS * per_class, dim), torch.arange(WAYS).repeat_interleave(per_class).repeat(tasks, 1)

    return Episode(*draw(shots), *draw(queries))


def mlp(dim: int = 16, hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, WAYS))


def meta_grads(learner: MAML, batch: Episode) -> list[Tensor]:
    return list(torch.autograd.grad(learner.loss(batch), list(learner.parameters())))


def small_conv4(norm: str = "batchnorm_split", hidden: int = 8) -> nn.Module:
    return Conv4(in_channels=1, hidden=hidden, num_classes=WAYS, norm=norm, image_size=16).double()


# --- meta-gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_vmapped_meta_gradient_equals_per_task_loop(first_order: bool) -> None:
    model, batch = small_conv4(), image_batch(tasks=4)
    kwargs = {"inner_lr": 0.4, "inner_steps": 2, "first_order": first_order}
    loop = meta_grads(MAML(model, vectorize=False, **kwargs), batch)
    for task_chunk in (None, 3):
        vmapped = meta_grads(MAML(model, vectorize=True, task_chunk=task_chunk, **kwargs), batch)
        for g_vmap, g_loop in zip(vmapped, loop):
            torch.testing.assert_close(g_vmap, g_loop, rtol=1e-10, atol=1e-12)


def test_affine_batchnorm_is_exact_under_vmap_and_needs_no_warning() -> None:
    """Native ``batch_norm`` gets affine second-order gradients wrong under vmap (functorch #534);
    MAML normalises with its own ops, so ``norm="batchnorm"`` matches the loop too."""
    model, batch = small_conv4(norm="batchnorm"), image_batch(tasks=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vmapped = meta_grads(MAML(model, inner_steps=2, vectorize=True), batch)
    loop = meta_grads(MAML(model, inner_steps=2, vectorize=False), batch)
    for g_vmap, g_loop in zip(vmapped, loop):
        torch.testing.assert_close(g_vmap, g_loop, rtol=1e-10, atol=1e-12)


def _regression_tasks(tasks: int, dim: int, gen: torch.Generator) -> Episode:
    def part(n: int) -> tuple[Tensor, Tensor]:
        # Regression targets carry an output dimension: [T, n, 1].
        return torch.randn(tasks, n, dim, generator=gen, dtype=torch.float64), torch.randn(tasks, n, 1, generator=gen, dtype=torch.float64)

    return Episode(*part(4), *part(6))


@pytest.mark.parametrize("vectorize", [True, False])
def test_linear_regression_meta_gradient_matches_closed_form(vectorize: bool) -> None:
    """For ``f(x) = x @ w + b`` with MSE, the support gradient is ``A theta - c`` (A constant), so
    K steps give ``theta_K`` affine in theta with Jacobian ``(I - lr A_s)^K`` (A_s symmetric)."""
    dim, steps, lr = 3, 2, 0.15
    gen = torch.Generator().manual_seed(3)
    model = nn.Linear(dim, 1).double()
    batch = _regression_tasks(3, dim, gen)

    def normal_equations(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        return 2 * xt.T @ xt / len(x), 2 * xt.T @ y[:, 0] / len(x)

    theta0 = torch.cat([model.weight.detach()[0], model.bias.detach()])
    second, first = torch.zeros_like(theta0), torch.zeros_like(theta0)
    for t in range(batch.num_tasks):
        (a_s, c_s), (a_q, c_q) = normal_equations(batch.support_x[t], batch.support_y[t]), normal_equations(batch.query_x[t], batch.query_y[t])
        theta = theta0
        for _ in range(steps):
            theta = theta - lr * (a_s @ theta - c_s)
        query_grad = a_q @ theta - c_q
        second += torch.linalg.matrix_power(torch.eye(dim + 1, dtype=torch.float64) - lr * a_s, steps) @ query_grad / batch.num_tasks
        first += query_grad / batch.num_tasks

    got = {}
    for first_order in (False, True):
        learner = MAML(model, inner_lr=lr, inner_steps=steps, first_order=first_order, vectorize=vectorize, loss_fn=F.mse_loss)
        gw, gb = torch.autograd.grad(learner.loss(batch), [model.weight, model.bias])
        got[first_order] = torch.cat([gw[0], gb])
        assert set(learner.last_metrics) == {"mse"}  # regression: no accuracy
    torch.testing.assert_close(got[False], second, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[True], first, rtol=1e-12, atol=1e-12)
    assert (got[False] - got[True]).norm() > 0.05 * got[False].norm()


def test_second_order_meta_gradient_matches_finite_differences() -> None:
    """Central differences of the meta-loss along random directions, for a smooth model (tanh) whose
    BatchNorm uses support statistics in the inner and the outer loop. (ReLU/max-pool kinks make
    finite differences of Conv4 unreliable; the loop-equivalence test above covers Conv4.)"""
    model = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, WAYS)).double()
    learner = MAML(model, inner_lr=0.3, inner_steps=2)
    clusters = cluster_batch(tasks=2, shots=2, queries=3, seed=4)
    batch = Episode(clusters.support_x.double(), clusters.support_y, clusters.query_x.double(), clusters.query_y)
    params = list(model.parameters())
    grads = torch.autograd.grad(learner.loss(batch), params)
    gen = torch.Generator().manual_seed(5)
    eps = 1e-6
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        analytic = sum((g * d).sum() for g, d in zip(grads, direction))
        losses = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.add_(sign * eps * d)
            losses.append(learner.loss(batch).item())
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.sub_(sign * eps * d)
        numeric = (losses[0] - losses[1]) / (2 * eps)
        assert numeric == pytest.approx(analytic.item(), rel=1e-6, abs=1e-9)


# --- adaptation and BatchNorm ----------------------------------------------------------------


def test_adapt_and_predict_do_not_mutate_the_learner() -> None:
    learner = MAML(small_conv4(norm="batchnorm"), eval_inner_steps=3).train()
    batch = image_batch(tasks=1).task(0)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    predict = learner.adapt(batch.support_x, batch.support_y)
    logits = predict(batch.query_x)
    assert logits.shape == (len(batch.query_x), WAYS) and not logits.requires_grad
    after = learner.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "adapt/predict changed parameters or buffers"
    assert all(p.grad is None for p in learner.parameters())
    # The predictor owns its parameters: a later change of the learner does not reach it.
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(1.0)
    assert torch.equal(predict(batch.query_x), logits)


def test_predictions_are_not_transductive_and_ignore_train_eval_mode() -> None:
    learner = MAML(small_conv4(norm="batchnorm"))
    batch = image_batch(tasks=1, queries=3).task(0)
    predict = learner.adapt(batch.support_x, batch.support_y)
    logits = predict(batch.query_x)
    others = torch.cat([batch.query_x[:1], 5 * torch.randn_like(batch.query_x[1:]) + 2])
    assert torch.equal(predict(others)[0], logits[0])
    torch.testing.assert_close(predict(batch.query_x[:1])[0], logits[0], rtol=1e-12, atol=1e-12)
    assert not learner.transductive and not predict.transductive
    learner.eval()
    torch.testing.assert_close(learner.adapt(batch.support_x, batch.support_y)(batch.query_x), logits, rtol=1e-12, atol=1e-12)

    transductive = MAML(learner.model, transductive=True)
    assert transductive.transductive
    tpredict = transductive.adapt(batch.support_x, batch.support_y)
    assert not torch.allclose(tpredict(others)[0], tpredict(batch.query_x)[0])


def test_adapt_improves_query_accuracy_on_easy_tasks() -> None:
    model = mlp()
    learner = MAML(model, inner_lr=0.4, eval_inner_steps=10)
    unadapted = MAML(model, eval_inner_steps=0)
    batch = cluster_batch(tasks=8, shots=5, queries=5, seed=6)
    acc = {"adapted": 0.0, "unadapted": 0.0}
    for t in range(batch.num_tasks):
        task = batch.task(t)
        for name, lrn in (("adapted", learner), ("unadapted", unadapted)):
            pred = lrn.adapt(task.support_x, task.support_y)(task.query_x).argmax(-1)
            acc[name] += (pred == task.query_y).float().mean().item() / batch.num_tasks
    assert acc["adapted"] > 0.9
    assert acc["adapted"] > acc["unadapted"] + 0.4


# --- training --------------------------------------------------------------------------------


def test_a_few_adam_steps_reduce_the_meta_loss() -> None:
    learner = create_learner("maml", mlp(), inner_lr=0.4, inner_steps=1)
    assert isinstance(learner, MAML) and learner.order == "second"
    optimiser = torch.optim.Adam(learner.parameters(), lr=3e-3)
    held_out = cluster_batch(tasks=16, shots=1, queries=5, seed=100)
    with torch.no_grad():
        start = learner.loss(held_out).item()
    for step in range(25):
        optimiser.zero_grad()
        loss = learner.loss(cluster_batch(tasks=8, shots=1, queries=5, seed=step))
        loss.backward()
        optimiser.step()
        metrics = learner.last_metrics
        assert set(metrics) == {"accuracy"} and isinstance(metrics["accuracy"], float) and 0.0 <= metrics["accuracy"] <= 1.0
    with torch.no_grad():
        end = learner.loss(held_out).item()
    assert end < 0.8 * start
