"""Conv4's CPU fast paths compute what the paper's block computes.

The fast paths: max-pool before ReLU, channels-last activations on CPU, the
convolution bias added after the convolution, and ``addcmul`` in
ChannelAffine. The reference is the plain block (conv -> BatchNorm -> ReLU ->
max-pool, NCHW, ``nn.Conv2d`` with its bias), built from the same weights.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from metaxfer.backbones import ChannelAffine, Conv4
from metaxfer.backbones.conv4 import ConvBlock

NORMS = ["batchnorm", "batchnorm_split", "none"]


def reference_like(net: Conv4) -> nn.Module:
    """The paper-order NCHW network with ``net``'s parameters and buffers (same state_dict keys)."""

    class Reference(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            blocks = []
            for block in net.features:
                conv = block[0]
                layers: list[nn.Module] = [nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=conv.stride, padding=1)]
                rest = list(block)[1:]
                layers += [_PlainAffine(m) if isinstance(m, ChannelAffine) else m for m in rest if not isinstance(m, (nn.ReLU, nn.MaxPool2d))]
                layers.append(nn.ReLU())
                layers += [nn.MaxPool2d(2) for m in rest if isinstance(m, nn.MaxPool2d)]
                blocks.append(nn.Sequential(*[_copy(m) for m in layers]))
            self.features = nn.Sequential(*blocks)
            self.head = _copy(net.head) if net.head is not None else None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.features(x).flatten(1)
            return self.head(z) if self.head is not None else z

    ref = Reference()
    ref.load_state_dict(net.state_dict())
    return ref


class _PlainAffine(nn.Module):
    """ChannelAffine as first written: a multiply and an add."""

    def __init__(self, affine: ChannelAffine) -> None:
        super().__init__()
        self.weight = nn.Parameter(affine.weight.detach().clone())
        self.bias = nn.Parameter(affine.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def _copy(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m)


def _randomise(net: nn.Module) -> None:
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "weight" in name and p.dim() == 1:
                p.uniform_(-1.5, 1.5)  # negative scales too: max-pool must not commute with them by accident
            elif p.dim() == 1:
                p.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("downsample", ["maxpool", "stride"])
def test_matches_paper_block_forward_backward_and_running_stats(norm: str, downsample: str) -> None:
    net = Conv4(hidden=16, norm=norm, downsample=downsample, num_classes=5)
    _randomise(net)
    ref = reference_like(net)
    assert list(ref.state_dict()) == list(net.state_dict())
    x = torch.randn(12, 1, 28, 28)
    out, out_ref = net(x), ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    g = torch.autograd.grad(out.square().sum(), list(net.parameters()))
    g_ref = torch.autograd.grad(out_ref.square().sum(), list(ref.parameters()))
    scale = max(t.abs().max() for t in g_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=1e-4)
    for a, b in zip(net.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    net.eval()
    ref.eval()
    torch.testing.assert_close(net(x), ref(x), rtol=1e-4, atol=1e-4)


def test_three_channel_input_and_larger_images() -> None:
    net = Conv4(in_channels=3, hidden=8, image_size=84)
    _randomise(net)
    x = torch.randn(4, 3, 84, 84)
    torch.testing.assert_close(net(x), reference_like(net)(x), rtol=1e-4, atol=1e-4)


def test_parameters_stay_contiguous_for_safetensors() -> None:
    net = Conv4(hidden=8)
    net(torch.randn(2, 1, 28, 28)).sum().backward()
    assert all(t.is_contiguous() for t in net.state_dict().values())
    assert all(p.grad is not None and p.grad.is_contiguous() for p in net.parameters())


def test_vmapped_second_order_meta_gradient_matches_loop() -> None:
    """Under torch.func the fast paths are skipped; the vmapped meta-gradient equals the per-task loop."""
    torch.manual_seed(0)
    net = Conv4(hidden=8, norm="batchnorm_split", num_classes=3, track_running_stats=False).double()
    params = {k: v.detach() for k, v in net.named_parameters()}
    xs, ys = torch.randn(2, 3, 1, 28, 28, dtype=torch.double), torch.arange(3).repeat(2, 1)
    xq, yq = torch.randn(2, 6, 1, 28, 28, dtype=torch.double), torch.arange(3).repeat(2, 2)

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(net, p, (x,)), y)

    def task(p: dict[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
        g = grad(loss)(p, xs, ys)
        return loss({k: p[k] - 0.4 * g[k] for k in p}, xq, yq)

    vmapped = grad(lambda p: vmap(task, in_dims=(None, 0, 0, 0, 0))(p, xs, ys, xq, yq).mean())(params)
    looped = grad(lambda p: torch.stack([task(p, xs[i], ys[i], xq[i], yq[i]) for i in range(2)]).mean())(params)
    for k in params:
        torch.testing.assert_close(vmapped[k], looped[k], rtol=1e-8, atol=1e-10)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_fx_export_and_torchscript_still_work() -> None:
    net = Conv4(hidden=8, num_classes=5).eval()
    x = torch.randn(3, 1, 28, 28)
    expected = net(x)
    torch.testing.assert_close(torch.fx.symbolic_trace(net)(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.export.export(net, (x,)).module()(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.jit.script(net)(x), expected, rtol=1e-4, atol=1e-5)


def _meta_loss_and_grads(net: Conv4, vectorize: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from metaxfer.learners.gradient import MAML
    from metaxfer.tasks import Episode

    g = torch.Generator().manual_seed(1)
    batch = Episode(
        torch.randn(2, 3, 1, 28, 28, generator=g, dtype=torch.double), torch.arange(3).repeat(2, 1),
        torch.randn(2, 9, 1, 28, 28, generator=g, dtype=torch.double), torch.arange(3).repeat_interleave(3).repeat(2, 1),
    )
    learner = MAML(net, inner_lr=0.4, inner_steps=2, vectorize=vectorize)
    loss = learner.loss(batch)
    return loss.detach(), list(torch.autograd.grad(loss, list(learner.parameters())))


@pytest.mark.parametrize("norm", ["batchnorm", "batchnorm_split"])
@pytest.mark.parametrize("vectorize", [False, True])
def test_folding_support_statistics_into_the_convolution_is_exact(norm: str, vectorize: bool, monkeypatch) -> None:
    """MAML's query pass with the support statistics folded into the convolutions: same loss and meta-gradient."""
    torch.manual_seed(0)
    net = Conv4(hidden=8, norm=norm, num_classes=3, downsample="maxpool").double()
    _randomise(net)
    folded_calls = []
    original = ConvBlock._forward_folded

    def counting(self: ConvBlock, x: torch.Tensor) -> torch.Tensor | None:
        out = original(self, x)
        folded_calls.append(out is not None)
        return out

    monkeypatch.setattr(ConvBlock, "_forward_folded", counting)
    loss, grads = _meta_loss_and_grads(net, vectorize)
    # Every block of every query pass: once under vmap, once per task (2) in the loop; support passes never fold.
    assert sum(folded_calls) == (4 if vectorize else 2 * 4)
    for block in net.features:
        block.fold_support_statistics = False
    folded_calls.clear()
    loss_ref, grads_ref = _meta_loss_and_grads(net, vectorize)
    assert not any(folded_calls)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_folding_applies_only_to_the_query_pass() -> None:
    """A training-mode pass with running statistics stays unfolded (its batch counter runs); the folded query pass
    of support_then_query equals support_batch_norm over support + query."""
    from metaxfer.functional import support_batch_norm, without_running_stats
    from metaxfer.functional.inner_loop import support_then_query

    net = Conv4(hidden=8, norm="batchnorm_split", num_classes=3)
    _randomise(net)
    x = torch.randn(6, 1, 28, 28)
    before = net.features[0][1].num_batches_tracked.clone()
    net(x)
    assert net.features[0][1].num_batches_tracked == before + 1  # the training-mode counter still runs
    with support_batch_norm(3):
        joint = functional_call(net, without_running_stats(net), (x,), strict=False)

    def call(inp: torch.Tensor) -> torch.Tensor:
        return functional_call(net, without_running_stats(net), (inp,), strict=False)

    support_out, query_out = support_then_query(call, x[:3], x[3:])
    torch.testing.assert_close(torch.cat([support_out, query_out]), joint, rtol=1e-4, atol=1e-5)
