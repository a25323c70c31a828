"""Conv4: the four-block CNN of Vinyals et al. 2016, Snell et al. 2017 and Finn et al. 2017."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metaxfer.backbones.registry import register_backbone
from metaxfer.functional.inner_loop import batch_norm_scale_shift, replayed_batch_norm_statistics


class ChannelAffine(nn.Module):
    """Per-channel scale and shift, ``x * weight + bias`` over ``[N, C, H, W]``.

    BatchNorm without affine followed by this layer computes exactly what an
    affine BatchNorm computes; it exists because second-order gradients of an
    affine ``batch_norm`` under ``torch.func.vmap`` are slightly wrong
    (functorch issue #534), while this split form is exact.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        # One fused kernel (bias + x * weight) instead of a multiply and an add over the full activation.
        return torch.addcmul(self.bias[:, None, None], x, self.weight[:, None, None])


class _Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same ``state_dict``) that adds its bias after the convolution on CPU.

    oneDNN's channels-last convolution handles the bias slowly when the layer
    has few input channels: on a 60-way 5-shot 5-query episode the first
    Conv4 layer's backward took 72 ms with the bias inside the convolution and
    14 ms + 5 ms with it added (and reduced) separately. The result is the
    same sum, in another order.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            return self._forward_eager(x)
        return self._conv_forward(x, self.weight, self.bias)  # what nn.Conv2d.forward does

    @torch.jit.unused
    def _forward_eager(self, x: Tensor) -> Tensor:
        return self.conv_with(x, self.weight, self.bias)

    @torch.jit.unused
    def conv_with(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """This layer's convolution (stride, padding, CPU fast path) with other weights ``[out, in, k, k]`` and bias ``[out]``."""
        if bias is not None and _channels_last_ok(x):
            # In place is safe: the convolution's backward saves its input and weight, not its output.
            return self._conv_forward(x, weight, None).add_(bias[:, None, None])
        return self._conv_forward(x, weight, bias)


class ConvBlock(nn.Sequential):
    """A Conv4 block, ``nn.Sequential(conv, [BatchNorm, [ChannelAffine]], [max-pool], ReLU)``, same ``state_dict``.

    One difference from ``nn.Sequential``: in the query pass of
    :func:`metaxfer.functional.support_then_query` (MAML-family learners
    normalising queries with the support set's statistics) the statistics are
    known before the convolution runs, so the block folds the normalisation
    and the affine into the convolution (``W' = W * s``, ``b' = b * s + t``
    per output channel, the inference-time folding of BatchNorm) instead of
    normalising its output: the same function, without the full-size
    multiply-add over the query activations in the forward pass and its
    multiply and reductions in the backward pass; gradients reach the
    support statistics through ``s`` and ``t``. Everywhere else, and with
    ``fold_support_statistics = False``, it is ``nn.Sequential``.
    """

    fold_support_statistics: bool = True

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            folded = self._forward_folded(x)
            if folded is not None:
                return folded
        for module in self:
            x = module(x)
        return x

    @torch.jit.unused
    def _forward_folded(self, x: Tensor) -> Tensor | None:
        """The block with the replayed support statistics folded into the convolution; None where that does not apply."""
        if not self.fold_support_statistics or len(self) < 2 or torch.compiler.is_compiling():
            return None  # (torch.compile: no support-statistics pass to fold; keep its graph free of the lookup)
        conv, norm = self[0], self[1]
        # A training-mode layer with running statistics counts its batches in forward(); keep that path as it is.
        if not isinstance(conv, _Conv2d) or not isinstance(norm, nn.BatchNorm2d) or (
                norm.training and norm.num_batches_tracked is not None):
            return None
        stats = replayed_batch_norm_statistics()
        if stats is None:
            return None
        mean, var = stats
        scale, shift = batch_norm_scale_shift(mean.reshape(-1), var.reshape(-1), norm.weight, norm.bias, norm.eps)
        rest = list(self)[2:]
        if rest and isinstance(rest[0], ChannelAffine):
            affine = rest.pop(0)
            scale = scale * affine.weight
            shift = torch.addcmul(affine.bias, shift, affine.weight)
        bias = shift if conv.bias is None else torch.addcmul(shift, conv.bias, scale)
        x = conv.conv_with(x, conv.weight * scale[:, None, None, None], bias)
        for module in rest:
            x = module(x)
        return x


def conv_block(in_channels: int, out_channels: int, norm: str, downsample: str, track_running_stats: bool) -> ConvBlock:
    """3x3 conv -> BatchNorm -> ReLU -> 2x2 max-pool (or a stride-2 conv when ``downsample="stride"``).

    The modules run as conv -> BatchNorm -> max-pool -> ReLU: ReLU is monotone,
    so ``relu(maxpool(x)) == maxpool(relu(x))`` exactly, gradients included
    (both send the gradient to the window's maximum, times ``relu'`` of it),
    and the ReLU then touches a quarter of the elements. ReLU and max-pool have
    no parameters, so the ``state_dict`` keys are those of the paper's order.
    """
    stride = 2 if downsample == "stride" else 1
    layers: list[nn.Module] = [_Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)]
    if norm == "batchnorm":
        layers.append(nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats))
    elif norm == "batchnorm_split":
        layers += [nn.BatchNorm2d(out_channels, affine=False, track_running_stats=track_running_stats), ChannelAffine(out_channels)]
    elif norm != "none":
        raise ValueError(f"norm must be 'batchnorm', 'batchnorm_split' or 'none', got {norm!r}")
    if downsample == "maxpool":
        layers.append(nn.MaxPool2d(2))
    elif downsample != "stride":
        raise ValueError(f"downsample must be 'maxpool' or 'stride', got {downsample!r}")
    layers.append(nn.ReLU())
    return ConvBlock(*layers)


# Private torch hooks, looked up once; where one is missing the fast paths are simply off.
_functorch_level = getattr(torch._C._functorch, "maybe_current_level", None)
_fx_trace = getattr(torch.fx, "_symbolic_trace", None)
_is_fx_tracing = getattr(_fx_trace, "is_fx_symbolic_tracing", None) or getattr(_fx_trace, "is_fx_tracing", None)


def _channels_last_ok(x: Tensor) -> bool:
    """Whether the CPU fast paths apply to ``x``: a plain 4-d CPU tensor, in eager mode.

    Off inside torch.func transforms (functorch cannot query or change memory
    formats under ``vmap``, e.g. in a vectorised MAML inner loop) and while
    torch.fx traces; TorchScript never calls it (its callers are
    ``@torch.jit.unused`` eager-only paths).
    """
    if _functorch_level is None or _is_fx_tracing is None or _is_fx_tracing():
        return False
    return x.dim() == 4 and x.device.type == "cpu" and _functorch_level() is None


class Conv4(nn.Module):
    """Four blocks of [3x3 conv (``hidden`` channels), BatchNorm, ReLU, 2x2 max-pool].

    Used by Prototypical Networks (Snell et al. 2017) as a feature extractor
    and by MAML (Finn et al. 2017) with a linear classifier on top.

    Args:
        in_channels: image channels (1 for Omniglot).
        hidden: channels of every conv layer (64 in the papers).
        num_classes: when given, a linear head maps the flattened features to
            ``num_classes`` logits; when ``None`` the output is the features.
        norm: ``"batchnorm"`` (affine BatchNorm), ``"batchnorm_split"``
            (BatchNorm without affine + :class:`ChannelAffine`; exact under
            ``vmap`` second-order gradients) or ``"none"``.
        downsample: ``"maxpool"`` (papers' ProtoNet/Omniglot) or ``"stride"``
            (stride-2 convolutions, MAML's Omniglot variant).
        track_running_stats: keep BatchNorm running statistics (used in
            ``eval()`` mode); ``False`` always normalises with batch statistics.
        image_size: input height = width, used to size the linear head.

    Shapes:
        input ``[N, in_channels, H, W]`` -> ``[N, hidden * (H // 16) ** 2]`` features
        (``[N, 64]`` for 28x28 inputs), or ``[N, num_classes]`` logits.

    Example:
        >>> Conv4(in_channels=1)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 64])
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        num_classes: int | None = None,
        norm: str = "batchnorm",
        downsample: str = "maxpool",
        track_running_stats: bool = True,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        channels = [in_channels, hidden, hidden, hidden, hidden]
        self.features = nn.Sequential(
            *(conv_block(channels[i], channels[i + 1], norm, downsample, track_running_stats) for i in range(4))
        )
        side = image_size
        for _ in range(4):
            side = side // 2 if downsample == "maxpool" else (side + 1) // 2
        self.out_features = hidden * side * side
        self.head = nn.Linear(self.out_features, num_classes) if num_classes is not None else None

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            x = self._fast_layout(x)
        z = self.features(x).flatten(1)
        return self.head(z) if self.head is not None else z

    @torch.jit.unused
    def _fast_layout(self, x: Tensor) -> Tensor:
        if _channels_last_ok(x):
            # oneDNN convolutions, BatchNorm and max-pool all have faster channels-last (NHWC) CPU kernels,
            # and NHWC saves the layout conversions oneDNN otherwise does around every convolution.
            # Only the activations change layout; parameters stay contiguous (safetensors needs that).
            # `.to` rather than `.contiguous`: a 1-channel input already counts as channels-last
            # contiguous, and `.contiguous` would keep its NCHW strides, so the convolutions would too.
            x = x.to(memory_format=torch.channels_last)
        return x


@register_backbone("conv4")
def conv4(**kwargs: object) -> Conv4:
    """Conv4 with 64 channels (see :class:`Conv4` for arguments)."""
    return Conv4(**kwargs)  # type: ignore[arg-type]
