"""metaxfer: few-shot learning in PyTorch — meta-learning and transfer learning with honest evaluation.

The names a user touches first::

    import metaxfer
    learner = metaxfer.load("protonet-omniglot-5w1s")            # or build_learner(...)
    result = metaxfer.evaluate(learner, sampler.fixed_episodes(600))
    print(result)   # accuracy: 98.xx ± 0.xx % (95% CI, 600 episodes, ...)
"""

__version__ = "0.1.0"

from metaxfer.backbones import create as create_backbone
from metaxfer.build import build_learner
from metaxfer.evaluate import EvalResult, evaluate
from metaxfer.hub import list_zoo, load, save
from metaxfer.learners import (
    ANIL,
    MAML,
    Learner,
    LSTMMetaLearner,
    MatchingNet,
    MetaOptNet,
    MetaSGD,
    ProtoNet,
    RelationNet,
    Reptile,
)
from metaxfer.tasks import Episode, EpisodeSampler
from metaxfer.train import FitResult, fit
from metaxfer.transfer import (
    Baseline,
    BaselinePlusPlus,
    ClassBatchSampler,
    FineTune,
    finetune,
)

__all__ = [
    "ANIL",
    "MAML",
    "Baseline",
    "BaselinePlusPlus",
    "ClassBatchSampler",
    "Episode",
    "EpisodeSampler",
    "EvalResult",
    "FineTune",
    "FitResult",
    "LSTMMetaLearner",
    "Learner",
    "MatchingNet",
    "MetaOptNet",
    "MetaSGD",
    "ProtoNet",
    "RelationNet",
    "Reptile",
    "__version__",
    "build_learner",
    "create_backbone",
    "evaluate",
    "finetune",
    "fit",
    "list_zoo",
    "load",
    "save",
]
