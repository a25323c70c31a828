"""Transfer learning: pretrain on all base classes, then adapt a head (or the whole network) per task.

* :class:`Baseline` / :class:`BaselinePlusPlus` (Chen et al. 2019): registry names
  ``"baseline"`` and ``"baseline_pp"``;
* :class:`FineTune` and :func:`finetune` (freeze patterns, layer-wise learning
  rates, LP-FT of Kumar et al. 2022): registry name ``"finetune"``;
* heads on frozen features: :class:`CosineClassifier`, :func:`nearest_centroid`,
  :func:`logistic_regression`, :func:`fit_head`;
* :class:`~metaxfer.tasks.supervised.ClassBatchSampler`: the supervised
  pretraining batches, re-exported here.
"""

from metaxfer.tasks.supervised import ClassBatchSampler
from metaxfer.transfer.baseline import Baseline, BaselinePlusPlus, HeadPredictor
from metaxfer.transfer.finetune import (
    BodyHead,
    FineTune,
    finetune,
    match_parameters,
    param_groups,
)
from metaxfer.transfer.heads import (
    CentroidHead,
    CosineClassifier,
    fit_head,
    logistic_regression,
    nearest_centroid,
)

__all__ = [
    "Baseline",
    "BaselinePlusPlus",
    "BodyHead",
    "CentroidHead",
    "ClassBatchSampler",
    "CosineClassifier",
    "FineTune",
    "HeadPredictor",
    "finetune",
    "fit_head",
    "logistic_regression",
    "match_parameters",
    "nearest_centroid",
    "param_groups",
]
