"""Few-shot learners keeping the contract in :mod:`metaxfer.learners.base`."""

from metaxfer.learners.base import Learner, Predictor
from metaxfer.learners.gradient import MAML
from metaxfer.learners.metric import ProtoNet
from metaxfer.learners.registry import LEARNERS, create_learner, register_learner

__all__ = ["LEARNERS", "MAML", "Learner", "Predictor", "ProtoNet", "create_learner", "register_learner"]
