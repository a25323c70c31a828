"""MAML meta-gradients against an independent reference and against per-coordinate finite differences.

``test_maml.py`` checks the vmapped learner against its own per-task loop (both
run the same ``torch.func`` inner loop), a closed form for a linear model, and
finite differences along random directions for a smooth MLP. This file adds:

* a reference that shares no code with metaxfer's inner loop: it deep-copies
  the module, writes the adapted tensors into the copy's parameter slots and
  takes inner gradients with plain ``torch.autograd.grad(create_graph=True)``;
  BatchNorm is re-implemented by hand (support or batch statistics), so the
  learner's ``support_batch_norm`` policy is checked too. It runs on Conv4 in
  its stride-2 variant (MAML's Omniglot network, not covered elsewhere), for
  every normalisation, both BatchNorm policies and both orders;
* central finite differences of the meta-loss for single parameter
  coordinates of a ReLU Conv4 (the existing finite-difference test uses tanh
  and random directions), together with a check that the first-order gradient
  is far from them at the same tolerance, so the comparison can fail.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from metaxfer.backbones import Conv4
from metaxfer.learners.gradient import MAML
from metaxfer.tasks.episode import Episode

WAYS, SIZE, INNER_LR, INNER_STEPS = 5, 8, 0.4, 2


def tiny_conv4(norm: str) -> nn.Module:
    """Conv4 with 4 channels and stride-2 downsampling on 8x8 inputs (8 -> 4 -> 2 -> 1 -> 1), float64."""
    torch.manual_seed(1)
    return Conv4(in_channels=1, hidden=4, num_classes=WAYS, norm=norm, downsample="stride", image_size=SIZE).double()


def episodes(tasks: int = 2, queries: int = 2, seed: int = 0) -> Episode:
    """5-way 1-shot float64 tasks ``[T, 5, 1, 8, 8]`` with ``queries`` queries per class."""
    gen = torch.Generator().manual_seed(seed)
    return Episode(
        torch.randn(tasks, WAYS, 1, SIZE, SIZE, generator=gen, dtype=torch.float64),
        torch.arange(WAYS).repeat(tasks, 1),
        torch.randn(tasks, WAYS * queries, 1, SIZE, SIZE, generator=gen, dtype=torch.float64),
        torch.arange(WAYS).repeat_interleave(queries).repeat(tasks, 1),
    )


# --- the reference ------------------------------------------------------------------------------


class HandBatchNorm(nn.Module):
    """BatchNorm written out: biased statistics of the first ``num_support`` rows (all rows if None).

    Replaces every ``nn.BatchNorm*`` of the reference's copy, under the same
    parameter names, so the reference does not go through ``F.batch_norm``
    (which metaxfer intercepts) at all.
    """

    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        self.eps = bn.eps
        self.num_support: int | None = None
        if bn.affine:
            self.weight = nn.Parameter(bn.weight.detach().clone())
            self.bias = nn.Parameter(bn.bias.detach().clone())
        else:
            self.weight = self.bias = None

    def forward(self, x: Tensor) -> Tensor:
        rows = x if self.num_support is None else x[: self.num_support]
        dims = [0, *range(2, x.dim())]
        mean = rows.mean(dims, keepdim=True)
        var = ((rows - mean) ** 2).mean(dims, keepdim=True)
        y = (x - mean) / torch.sqrt(var + self.eps)
        if self.weight is not None:
            shape = [1, -1] + [1] * (x.dim() - 2)
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y


class Reference:
    """MAML by hand on a deep copy of ``model``: adapted tensors are written into the copy's parameter slots.

    This is the clone-and-write style metaxfer avoids in library code; here it
    is the point: nothing is shared with ``torch.func`` or metaxfer's inner loop.
    """

    def __init__(self, model: nn.Module) -> None:
        self.copy = copy.deepcopy(model)
        for name, module in list(self.copy.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, _BatchNorm):
                    setattr(module, child_name, HandBatchNorm(child))
        self.names = [name for name, _ in model.named_parameters()]
        assert self.names == [name for name, _ in self.copy.named_parameters()]
        self.norms = [m for m in self.copy.modules() if isinstance(m, HandBatchNorm)]

    def _load(self, tensors: list[Tensor]) -> None:
        for name, tensor in zip(self.names, tensors):
            owner, _, leaf = name.rpartition(".")
            self.copy.get_submodule(owner)._parameters[leaf] = tensor  # a non-leaf tensor, on purpose

    def _forward(self, tensors: list[Tensor], x: Tensor, num_support: int | None) -> Tensor:
        self._load(tensors)
        for norm in self.norms:
            norm.num_support = num_support
        return self.copy(x)

    def meta_loss(self, theta: list[Tensor], batch: Episode, first_order: bool, transductive: bool) -> Tensor:
        """Mean over tasks of the query loss after ``INNER_STEPS`` SGD steps from ``theta``."""
        losses = []
        for sx, sy, qx, qy in zip(*batch):
            fast = list(theta)
            for _ in range(INNER_STEPS):
                support_loss = F.cross_entropy(self._forward(fast, sx, None), sy)
                grads = torch.autograd.grad(support_loss, fast, create_graph=not first_order)
                fast = [p - INNER_LR * g for p, g in zip(fast, grads)]
            if transductive:
                logits = self._forward(fast, qx, None)
            else:
                logits = self._forward(fast, torch.cat([sx, qx]), len(sx))[len(sx):]
            losses.append(F.cross_entropy(logits, qy))
        return torch.stack(losses).mean()

    def meta_gradient(self, model: nn.Module, batch: Episode, first_order: bool, transductive: bool) -> list[Tensor]:
        theta = list(model.parameters())
        return list(torch.autograd.grad(self.meta_loss(theta, batch, first_order, transductive), theta))


def learner_gradient(model: nn.Module, batch: Episode, first_order: bool, transductive: bool, vectorize: bool) -> list[Tensor]:
    learner = MAML(model, inner_lr=INNER_LR, inner_steps=INNER_STEPS, first_order=first_order,
                   vectorize=vectorize, transductive=transductive)
    return list(torch.autograd.grad(learner.loss(batch), list(model.parameters())))


CASES = [
    pytest.param(norm, transductive, id=f"{norm}-{'transductive' if transductive else 'support_stats'}")
    for norm in ("batchnorm", "batchnorm_split")
    for transductive in (False, True)
] + [pytest.param("none", False, id="none")]


# --- tests --------------------------------------------------------------------------------------


def test_reference_batchnorm_matches_torch_in_train_mode() -> None:
    """The hand-written BatchNorm equals torch's train-mode BatchNorm (so the reference is a reference)."""
    bn = nn.BatchNorm2d(3, affine=True).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(7, 3, 4, 4, dtype=torch.float64)
    hand = HandBatchNorm(bn)
    torch.testing.assert_close(hand(x), bn.train()(x), rtol=1e-12, atol=1e-12)
    hand.num_support = 4
    torch.testing.assert_close(hand(x)[:4], bn(x[:4]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize(("norm", "transductive"), CASES)
def test_meta_gradient_matches_autograd_reference(norm: str, transductive: bool, first_order: bool) -> None:
    model, batch = tiny_conv4(norm), episodes()
    expected = Reference(model).meta_gradient(model, batch, first_order, transductive)
    assert max(g.abs().max().item() for g in expected) > 1e-3  # not a vacuous comparison of zeros
    for vectorize in (True, False):
        got = learner_gradient(model, batch, first_order, transductive, vectorize)
        for name, g, ref in zip(Reference(model).names, got, expected):
            torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-11, msg=lambda m, where=f"{name} (vectorize={vectorize})": f"{where}: {m}")


def test_batchnorm_policies_and_orders_give_different_meta_gradients() -> None:
    """The cases above are distinguishable: support vs query statistics and first vs second order
    change the meta-gradient by far more than the tolerance, so matching the wrong one would fail."""
    model, batch = tiny_conv4("batchnorm_split"), episodes()

    def flat(first_order: bool, transductive: bool) -> Tensor:
        return torch.cat([g.flatten() for g in learner_gradient(model, batch, first_order, transductive, vectorize=True)])

    base = flat(False, False)
    for other in (flat(False, True), flat(True, False)):
        assert (base - other).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("norm", "names"),
    [
        # Conv biases in front of BatchNorm have zero gradient (the mean is subtracted), so the
        # BatchNorm model is probed at the affine parameters instead.
        ("batchnorm_split", ("features.0.0.weight", "features.1.2.weight", "features.2.2.bias", "head.weight")),
        ("none", ("features.0.0.weight", "features.2.0.bias", "features.3.0.weight", "head.bias")),
    ],
    ids=["batchnorm_split", "none"],
)
def test_second_order_meta_gradient_matches_coordinate_finite_differences(norm: str, names: tuple[str, ...]) -> None:
    """d(meta-loss)/d(theta_i) by central differences for single coordinates of a ReLU Conv4.

    ReLU makes the meta-loss piecewise smooth; with float64 and eps = 1e-6 a
    pre-activation would have to lie within ~1e-6 of zero to cross a kink, so
    on this fixed seed the differences are exact to truncation (~eps^2) and
    round-off (~1e-16 / eps) error, far below the tolerance (relative 1e-6,
    absolute 1e-9: without BatchNorm this small network's gradients are ~1e-3).
    """
    model, batch = tiny_conv4(norm), episodes(seed=3)
    learner = MAML(model, inner_lr=INNER_LR, inner_steps=INNER_STEPS, vectorize=True)
    params = dict(model.named_parameters())
    analytic = dict(zip(params, torch.autograd.grad(learner.loss(batch), list(params.values()))))
    first_order = dict(zip(params, learner_gradient(model, batch, True, False, vectorize=True)))
    gen = torch.Generator().manual_seed(4)
    eps = 1e-6
    checked = separated = 0
    for name in names:
        p = params[name]
        # Two coordinates per tensor, random (fixed by the seed) among those with a non-zero gradient:
        # a ReLU channel that is off for every example has an exactly zero one, which tests nothing.
        live = (analytic[name].view(-1).abs() > 1e-5).nonzero().flatten()
        for index in live[torch.randperm(len(live), generator=gen)[:2]].tolist():
            flat = p.data.view(-1)
            original = flat[index].item()
            losses = []
            for shift in (eps, -eps):
                flat[index] = original + shift
                losses.append(learner.loss(batch).item())
            flat[index] = original
            numeric = (losses[0] - losses[1]) / (2 * eps)
            exact = analytic[name].view(-1)[index].item()
            tol = 1e-6 * abs(exact) + 1e-9
            assert abs(numeric - exact) < tol, f"{name}[{index}]: finite difference {numeric:.12g}, meta-gradient {exact:.12g}"
            checked += 1
            separated += abs(first_order[name].view(-1)[index].item() - exact) > 100 * tol
    assert checked == 2 * len(names)
    # At most of these coordinates the first-order gradient misses by over 100x the tolerance, so
    # the check above would notice a learner that silently dropped the second-order term. (Not at
    # all: where a unit's ReLU is off for every support example the support loss does not depend
    # on its weights, and both orders agree exactly. The differences here are accurate to ~1e-10.)
    assert separated >= 3 * checked // 4
