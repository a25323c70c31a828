"""A plain multi-layer perceptron, the regression network of MAML's sinusoid experiment."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from torch import Tensor, nn

from metaxfer.backbones.registry import register_backbone
from metaxfer.errors import ConfigError

__all__ = ["MLP", "mlp"]


class MLP(nn.Module):
    """Fully connected layers with ReLU between them: ``[N, in_features] -> [N, out_features]``.

    The default is the network of Finn et al. 2017, section 5.1 (sinusoid
    regression): 1 input, two hidden layers of 40 units with ReLU, 1 output
    (``1-40-40-1``). No normalisation layers, so MAML's inner loop runs the
    plain functional forward pass.

    Args:
        in_features: input width.
        hidden: widths of the hidden layers (may be empty: a linear model).
        out_features: output width (1 for scalar regression, ``ways`` for logits).

    Raises:
        ConfigError: for a non-positive width.

    Example:
        >>> net = MLP(1, [40, 40], 1)
        >>> net(torch.zeros(5, 1)).shape
        torch.Size([5, 1])
    """

    def __init__(self, in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1) -> None:
        super().__init__()
        widths = [in_features, *hidden, out_features]
        if any(not isinstance(w, int) or isinstance(w, bool) or w <= 0 for w in widths):
            raise ConfigError(
                f"MLP widths must be positive integers, got in_features={in_features!r}, hidden={list(hidden)!r}, "
                f"out_features={out_features!r}; e.g. in_features=1, hidden=[40, 40], out_features=1"
            )
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(pairwise(widths)):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:  # no activation after the output layer: it is a regression head / logits
                layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)
        self.in_features, self.hidden, self.out_features = in_features, list(hidden), out_features

    def forward(self, x: Tensor) -> Tensor:
        """``x [N, in_features] -> [N, out_features]``."""
        return self.layers(x)


@register_backbone("mlp")
def mlp(in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1) -> MLP:
    """The ``"mlp"`` backbone (see :class:`MLP`); defaults to MAML's 1-40-40-1 sinusoid network."""
    return MLP(in_features, hidden, out_features)
