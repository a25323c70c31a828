"""Pure tensor maths: prototypes, distances, functional inner loops."""

from metaxfer.functional.distances import prototypes, squared_euclidean
from metaxfer.functional.inner_loop import (
    InnerLoopResult,
    UpdateRule,
    clip_grad_norm,
    inner_loop,
    sgd_step,
    support_batch_norm,
    without_running_stats,
)

__all__ = [
    "InnerLoopResult",
    "UpdateRule",
    "clip_grad_norm",
    "inner_loop",
    "prototypes",
    "sgd_step",
    "squared_euclidean",
    "support_batch_norm",
    "without_running_stats",
]
