"""Few-shot learners keeping the contract in :mod:`metaxfer.learners.base`."""

from metaxfer.learners.anil import ANIL
from metaxfer.learners.base import Learner, Predictor
from metaxfer.learners.gradient import MAML
from metaxfer.learners.hallucination import HallucinationNet
from metaxfer.learners.lstm_meta import LSTMMetaLearner
from metaxfer.learners.matching import MatchingNet
from metaxfer.learners.memory import MANN
from metaxfer.learners.meta_sgd import MetaSGD
from metaxfer.learners.metaoptnet import MetaOptNet
from metaxfer.learners.metric import ProtoNet
from metaxfer.learners.registry import LEARNERS, create_learner, register_learner
from metaxfer.learners.relation import RelationNet
from metaxfer.learners.reptile import Reptile

__all__ = [
    "ANIL",
    "LEARNERS",
    "MAML",
    "MANN",
    "HallucinationNet",
    "LSTMMetaLearner",
    "Learner",
    "MatchingNet",
    "MetaOptNet",
    "MetaSGD",
    "Predictor",
    "ProtoNet",
    "RelationNet",
    "Reptile",
    "create_learner",
    "register_learner",
]
