"""Transfer learning: pretrain on all base classes, then adapt a head (or the whole network) per task.

* :class:`Baseline` / :class:`BaselinePlusPlus` (Chen et al. 2019): registry names
  ``"baseline"`` and ``"baseline_pp"``;
* :class:`FineTune` and :func:`finetune` (freeze patterns, layer-wise learning
  rates, LP-FT of Kumar et al. 2022): registry name ``"finetune"``;
* :class:`Distill` and :func:`distillation_loss` (knowledge distillation,
  Hinton et al. 2015; born-again self-distillation, Tian et al. 2020):
  registry name ``"distill"``;
* heads on frozen features: :class:`CosineClassifier`, :func:`nearest_centroid`,
  :func:`logistic_regression`, :func:`fit_head`;
* :class:`Ensemble` (average the probabilities of any trained learners) and
  model soups :func:`uniform_soup` / :func:`greedy_soup` (Wortsman et al. 2022);
* :class:`~metaxfer.tasks.supervised.ClassBatchSampler`: the supervised
  pretraining batches, re-exported here.
"""

from metaxfer.tasks.supervised import ClassBatchSampler
from metaxfer.transfer.baseline import Baseline, BaselinePlusPlus, HeadPredictor
from metaxfer.transfer.distill import (
    Distill,
    FrozenTeacher,
    as_teacher,
    distillation_loss,
    soft_target_loss,
)
from metaxfer.transfer.ensemble import Ensemble, EnsemblePredictor, GreedySoup, greedy_soup, uniform_soup
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
    "Distill",
    "Ensemble",
    "EnsemblePredictor",
    "FineTune",
    "FrozenTeacher",
    "GreedySoup",
    "HeadPredictor",
    "as_teacher",
    "distillation_loss",
    "finetune",
    "fit_head",
    "greedy_soup",
    "logistic_regression",
    "match_parameters",
    "nearest_centroid",
    "param_groups",
    "soft_target_loss",
    "uniform_soup",
]
