"""Fixed-episode evaluation with 95% confidence intervals."""

from metaxfer.evaluate.evaluate import (
    EvalResult,
    episode_accuracy,
    episode_mse,
    evaluate,
    mean_ci95,
    one_query_per_class,
)

__all__ = ["EvalResult", "episode_accuracy", "episode_mse", "evaluate", "mean_ci95", "one_query_per_class"]
