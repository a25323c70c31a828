"""The training loop, checkpoints and metrics."""

from metaxfer.train.checkpoints import Checkpoints
from metaxfer.train.fit import FitResult, fit

__all__ = ["Checkpoints", "FitResult", "fit"]
