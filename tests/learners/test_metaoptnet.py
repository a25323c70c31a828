"""MetaOptNet: ridge (R2-D2) and Crammer-Singer SVM heads, their optimality, the contract, learning, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaxfer
from metaxfer.errors import ConfigError, EpisodeError
from metaxfer.functional.convex import (
    crammer_singer_duality_gap,
    crammer_singer_svm,
    gram,
    project_simplex,
    ridge_dual,
)
from metaxfer.learners.metaoptnet import MetaOptNet
from metaxfer.tasks import EpisodeSampler


def mlp(out: int = 16) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, out))


def test_ridge_woodbury_equals_primal_closed_form():
    torch.manual_seed(0)
    x, y = torch.randn(6, 10, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    onehot = F.one_hot(y, 3).double()
    lam = 0.7
    primal = torch.linalg.solve(x.T @ x + lam * torch.eye(10, dtype=torch.float64), x.T @ onehot)  # [D, ways]
    assert torch.allclose(x.T @ ridge_dual(gram(x, x), onehot, lam), primal, atol=1e-10)
    # The learner's adapted weights and logits are the same closed form (scale 1, bias 0 at init).
    learner = MetaOptNet(nn.Identity(), head="ridge", ridge_lambda=lam).double()
    predict = learner.adapt(x, y)
    assert torch.allclose(predict.weight, primal, atol=1e-10)
    q = torch.randn(4, 10, dtype=torch.float64)
    assert torch.allclose(predict(q), q @ primal, atol=1e-10)


def test_project_simplex():
    p = project_simplex(torch.tensor([[0.5, 0.5, 0.5], [2.0, 0.0, -1.0], [0.2, 0.3, 0.5]]))
    assert torch.allclose(p, torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]), atol=1e-6)


def _kkt(kernel, onehot, alpha, c):
    """Largest violations of the Crammer-Singer dual's KKT conditions (feasibility, complementary slackness)."""
    off = alpha.masked_fill(onehot.bool(), 0.0)
    feasibility = max(off.max().item(), ((alpha * onehot).sum(-1) - c).max().item(), alpha.sum(-1).abs().max().item())
    # p_n = e_y - alpha_n / C lies in the simplex; p_nk > 0 only where class k attains the loss-augmented
    # maximum max_j (w_j.x_n + 1 - [j = y_n]) (a margin constraint is active there).
    p = onehot - alpha / c
    augmented = kernel @ alpha + 1.0 - onehot
    slack = augmented.amax(-1, keepdim=True) - augmented
    slackness = (slack * p).max().item()
    return feasibility, slackness


@pytest.mark.parametrize("ways,shots,c", [(3, 2, 0.1), (5, 1, 1.0), (5, 3, 0.5)])
def test_svm_solution_meets_kkt(ways, shots, c):
    torch.manual_seed(0)
    x = torch.randn(2, ways * shots, 8, dtype=torch.float64)
    onehot = F.one_hot(torch.arange(ways).repeat_interleave(shots), ways).double().expand(2, -1, -1)
    kernel = gram(x, x)
    alpha = crammer_singer_svm(kernel, onehot, c, iterations=3000, tol=1e-9)
    feasibility, slackness = _kkt(kernel, onehot, alpha, c)
    primal, gap = crammer_singer_duality_gap(kernel, onehot, alpha, c)
    assert feasibility < 1e-9 and slackness < 1e-4
    assert (gap / primal.clamp_min(1.0)).max() < 1e-6
    # The default (training) budget stops at the documented tolerance on a small problem.
    alpha = crammer_singer_svm(kernel.float(), onehot.float(), c, iterations=200, tol=1e-4)
    primal, gap = crammer_singer_duality_gap(kernel.float(), onehot.float(), alpha, c)
    assert (gap / primal.clamp_min(1.0)).max() < 1e-3


def test_svm_separates_separable_clusters():
    torch.manual_seed(0)
    centres = 4.0 * torch.randn(5, 16)
    x = centres.repeat_interleave(4, 0) + 0.3 * torch.randn(20, 16)
    y = torch.arange(5).repeat_interleave(4)
    alpha = crammer_singer_svm(gram(x, x), F.one_hot(y, 5).float(), c=1.0, iterations=500)
    assert torch.equal((gram(x, x) @ alpha).argmax(-1), y)
    predict = MetaOptNet(nn.Identity(), head="svm", svm_c=1.0).adapt(x, y)
    assert torch.equal(predict(x).argmax(-1), y)


@pytest.mark.parametrize("head", ["ridge", "svm"])
def test_shapes_not_transductive_and_gradients(clusters, head):
    learner = MetaOptNet(mlp(), head=head, learn_lambda=True)
    batch = EpisodeSampler(clusters, 5, 2, 3, seed=0).sample_batch(3)
    loss = learner.loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in learner.named_parameters():
        if head == "svm" and name == "log_lambda":
            continue  # the SVM head does not use the ridge penalty
        if name == "bias":
            assert p.grad is not None and p.grad.abs().item() < 1e-6  # softmax is shift-invariant: no gradient
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    ep = batch.task(0)
    predict = learner.adapt(ep.support_x, ep.support_y)
    full = predict(ep.query_x)
    assert full.shape == (15, 5)
    perm = torch.randperm(15)
    assert torch.allclose(predict(ep.query_x[perm]), full[perm], atol=1e-5)
    assert torch.allclose(predict(torch.cat([ep.query_x[:1], 5 * torch.randn(4, 1, 16, 16)]))[:1], full[:1], atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in learner.state_dict().items())


def test_svm_gradient_matches_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    onehot = F.one_hot(torch.tensor([0, 0, 1, 1, 2, 2]), 3).double()
    q = torch.randn(3, 4, dtype=torch.float64)

    def f(x):
        alpha = crammer_singer_svm(gram(x, x), onehot, 0.5, iterations=2000, tol=None)
        return ((q @ x.T @ alpha) ** 2).sum()

    (grad,) = torch.autograd.grad(f(x), x)
    eps, direction = 1e-5, torch.randn(6, 4, dtype=torch.float64)
    with torch.no_grad():
        numeric = (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)
    assert torch.allclose((grad * direction).sum(), numeric, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("head", ["ridge", "svm"])
def test_learns_gaussian_clusters(clusters, head, meta_train):
    torch.manual_seed(0)
    learner = MetaOptNet(mlp(), head=head, ridge_lambda=1.0, label_smoothing=0.1)
    sampler = EpisodeSampler(clusters, 5, 1, 5, seed=0)
    losses = meta_train(learner, sampler)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5  # label smoothing keeps the loss above ~0.5
    test = EpisodeSampler(clusters, 5, 1, 5, seed=99).sample()
    acc = (learner.adapt(test.support_x, test.support_y)(test.query_x).argmax(-1) == test.query_y).float().mean()
    assert acc > 0.5  # chance is 0.2


def test_errors():
    with pytest.raises(EpisodeError, match=r"no example of class\(es\) \[0\]"):
        MetaOptNet(mlp()).adapt(torch.randn(3, 1, 16, 16), torch.tensor([1, 2, 2]))
    with pytest.raises(ConfigError, match="unknown MetaOptNet head 'lasso'"):
        MetaOptNet(mlp(), head="lasso")
    with pytest.raises(ConfigError, match="svm_c"):
        MetaOptNet(mlp(), svm_c=0.0)


@pytest.mark.parametrize("head", ["ridge", "svm"])
def test_build_from_config_and_save_load(tmp_path, clusters, head):
    spec = {"learner": "metaoptnet", "learner_args": {"head": head, "learn_lambda": True}, "backbone": "conv4",
            "backbone_args": {"hidden": 8, "image_size": 16}}
    learner = metaxfer.build_learner(spec)
    assert isinstance(learner, MetaOptNet) and learner.head == head
    opt = torch.optim.SGD(learner.parameters(), 0.1)
    learner.loss(EpisodeSampler(clusters, 5, 1, 2, seed=0).sample_batch(2)).backward()
    opt.step()
    metaxfer.save(learner, tmp_path / "m")
    loaded = metaxfer.load(tmp_path / "m")
    assert torch.equal(loaded.scale, learner.scale) and torch.equal(loaded.log_lambda, learner.log_lambda)
    ep = EpisodeSampler(clusters, 5, 1, 3, seed=3).sample()
    a = learner.adapt(ep.support_x, ep.support_y)(ep.query_x)
    b = loaded.adapt(ep.support_x, ep.support_y)(ep.query_x)
    assert torch.allclose(a, b, atol=1e-5)
