"""Ensemble: adapts every member, averages their probabilities, works with evaluate; error paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import metaxfer
from metaxfer import EpisodeSampler, ProtoNet, evaluate
from metaxfer.backbones import create
from metaxfer.data.images import ImagePreprocess
from metaxfer.data.synthetic import ClusterImages
from metaxfer.errors import ConfigError, EpisodeError
from metaxfer.tasks import Episode
from metaxfer.transfer import Ensemble, EnsemblePredictor
from metaxfer.transfer.ensemble import combine_logits


def _protonet(seed: int) -> ProtoNet:
    torch.manual_seed(seed)
    return ProtoNet(create("conv4", in_channels=1, hidden=4, image_size=16)).eval()


@pytest.fixture(scope="module")
def episodes() -> metaxfer.tasks.EpisodeSet:
    data = ClusterImages("test", num_classes=10, per_class=8, image_size=16, noise=0.5)
    return EpisodeSampler(data, 5, 2, 3, seed=0).fixed_episodes(6, seed=0)


def test_probability_average_matches_manual(episodes):
    a, b = _protonet(1), _protonet(2)
    ep = episodes[0]
    out = Ensemble([a, b]).adapt(ep.support_x, ep.support_y)(ep.query_x)
    pa = F.softmax(a.adapt(ep.support_x, ep.support_y)(ep.query_x), -1)
    pb = F.softmax(b.adapt(ep.support_x, ep.support_y)(ep.query_x), -1)
    assert out.shape == (15, 5)
    torch.testing.assert_close(out.exp(), (pa + pb) / 2)  # log of the averaged probabilities
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(15))

    weighted = Ensemble([a, b], weights=[3, 1]).adapt(ep.support_x, ep.support_y)(ep.query_x)
    torch.testing.assert_close(weighted.exp(), 0.75 * pa + 0.25 * pb)

    za, zb = a.adapt(ep.support_x, ep.support_y)(ep.query_x), b.adapt(ep.support_x, ep.support_y)(ep.query_x)
    by_logits = Ensemble([a, b], weights=[3, 1], combine="logits").adapt(ep.support_x, ep.support_y)(ep.query_x)
    torch.testing.assert_close(by_logits, F.log_softmax(0.75 * za + 0.25 * zb, -1))


def test_identical_members_equal_the_member(episodes):
    a = _protonet(1)
    single = evaluate(a, episodes)
    for members in ([a], [a, a, a]):
        ensemble = Ensemble(members)
        result = evaluate(ensemble, episodes)
        assert result.accuracies == single.accuracies and result.n == 6
        ep = episodes[1]
        probs = ensemble.adapt(ep.support_x, ep.support_y)(ep.query_x).exp()
        torch.testing.assert_close(probs, F.softmax(a.adapt(ep.support_x, ep.support_y)(ep.query_x), -1))


def test_weights_are_normalised_and_zero_weight_members_are_not_run(episodes):
    a, b = _protonet(1), _protonet(2)
    assert Ensemble([a, b]).weights == (0.5, 0.5)
    assert Ensemble([a, b], weights=[2, 6]).weights == (0.25, 0.75)
    ep = episodes[0]
    calls = []

    class Spy(ProtoNet):
        def adapt(self, support_x, support_y):
            calls.append(1)
            return super().adapt(support_x, support_y)

    spy = Spy(create("conv4", in_channels=1, hidden=4, image_size=16)).eval()
    only_a = Ensemble([a, spy], weights=[1, 0]).adapt(ep.support_x, ep.support_y)
    assert not calls and only_a.predictors[1] is None
    torch.testing.assert_close(only_a(ep.query_x).exp(), F.softmax(a.adapt(ep.support_x, ep.support_y)(ep.query_x), -1))


def test_never_mutates_members_and_keeps_the_contract(episodes):
    a, b = _protonet(1), _protonet(2)
    a.train()
    state = {k: v.clone() for k, v in a.state_dict().items()}
    ensemble = Ensemble([a, b])
    assert isinstance(ensemble, metaxfer.Learner) and not ensemble.transductive
    assert len(list(ensemble.parameters())) == len(list(a.parameters())) * 2  # .to / .eval reach the members
    predictor = ensemble.adapt(episodes[0].support_x, episodes[0].support_y)
    assert isinstance(predictor, EnsemblePredictor)
    predictor(episodes[0].query_x)
    assert a.training and all(torch.equal(state[k], v) for k, v in a.state_dict().items())
    assert "weights=[0.5, 0.5]" in repr(ensemble)


def test_common_preprocessing_and_mismatch_error():
    a, b = _protonet(1), _protonet(2)
    pre = ImagePreprocess(size=16)
    a.preprocessor = pre
    b.preprocessor = ImagePreprocess(size=16)  # equal by value
    assert Ensemble([a, b]).preprocessor == pre
    b.preprocessor = ImagePreprocess(size=28)
    with pytest.raises(ConfigError, match=r"preprocess images differently: member 0 \(ProtoNet\) uses .*'size': 16.*"
                                          r"member 1 \(ProtoNet\) uses .*'size': 28"):
        Ensemble([a, b])


def test_error_paths(episodes):
    a = _protonet(1)
    ep = episodes[0]
    with pytest.raises(ConfigError, match="at least one member"):
        Ensemble([])
    with pytest.raises(ConfigError, match="2 weights for 1 ensemble members"):
        Ensemble([a], weights=[1, 1])
    with pytest.raises(ConfigError, match=">= 0"):
        Ensemble([a, a], weights=[1, -1])
    with pytest.raises(ConfigError, match="sum to 0"):
        Ensemble([a, a], weights=[0, 0])
    with pytest.raises(ConfigError, match="unknown combine 'mean'"):
        Ensemble([a], combine="mean")
    with pytest.raises(ConfigError, match=r"member 1 \(str\) has no adapt"):
        Ensemble([a, "protonet"])
    with pytest.raises(ConfigError, match="train each member separately"):
        Ensemble([a]).loss(ep.batch())
    with pytest.raises(EpisodeError, match="integer class labels"):
        Ensemble([a]).adapt(ep.support_x, ep.support_y.float())


def test_member_with_other_inputs_or_ways_is_named(episodes):
    proto = _protonet(1)
    rgb = ProtoNet(create("conv4", in_channels=3, hidden=4, image_size=16)).eval()
    ep = episodes[0]
    with pytest.raises(ConfigError, match=r"member 1 \(ProtoNet\) failed to adapt to support_x of shape "
                                          r"\(10, 1, 16, 16\).*same input tensors"):
        Ensemble([proto, rgb]).adapt(ep.support_x, ep.support_y)

    class ThreeWay:
        """A member with a fixed 3-output head (like MAML's), whatever the task."""

        def adapt(self, support_x, support_y):
            return lambda query_x: torch.zeros(query_x.shape[0], 3)

    three = ep.support_y < 3
    Ensemble([proto, ThreeWay()]).adapt(ep.support_x[three], ep.support_y[three])(ep.query_x)  # a 3-way task: fine
    with pytest.raises(ConfigError, match=r"member 1 \(ThreeWay\) gives logits of shape \(15, 3\) for 15 queries "
                                          r"of a 5-way task"):
        Ensemble([proto, ThreeWay()]).adapt(ep.support_x, ep.support_y)(ep.query_x)


def test_mixed_members_evaluate(episodes):
    """ProtoNet + MAML (a fixed 5-way head) + Baseline++ in one ensemble, through evaluate."""
    conv = {"in_channels": 1, "hidden": 4, "image_size": 16}
    maml = metaxfer.build_learner({"learner": "maml", "backbone": "conv4", "learner_args": {"inner_steps": 1},
                                   "backbone_args": {**conv, "num_classes": 5}})
    bpp = metaxfer.build_learner({"learner": "baseline_pp", "backbone": "conv4", "backbone_args": conv,
                                  "learner_args": {"num_base_classes": 10, "finetune_epochs": 2}})
    members = [_protonet(1), maml, bpp]
    ensemble = Ensemble(members)
    result = evaluate(ensemble, episodes)
    assert result.n == 6 and 0.0 <= result.mean <= 100.0
    ep = episodes[2]
    manual = sum(F.softmax(m.adapt(ep.support_x, ep.support_y)(ep.query_x), -1) for m in members) / 3
    torch.testing.assert_close(ensemble.adapt(ep.support_x, ep.support_y)(ep.query_x).exp(), manual)


def test_combine_logits_is_stable_and_checks_shapes():
    huge = torch.tensor([[0.0, -1e4], [-1e4, 0.0]])  # ProtoNet-sized distances: naive probabilities underflow
    out = combine_logits([huge, huge.flip(-1)], [0.5, 0.5])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.exp(), torch.full((2, 2), 0.5))
    with pytest.raises(ConfigError, match="different shapes"):
        combine_logits([torch.zeros(2, 3), torch.zeros(2, 4)], [0.5, 0.5])
    with pytest.raises(ConfigError, match="unknown combine"):
        combine_logits([huge], [1.0], "vote")


def test_episode_type_roundtrip(episodes):
    """evaluate() moves episodes to the ensemble's device and reports the protocol fields."""
    result = evaluate(Ensemble([_protonet(1), _protonet(2)]), episodes, protocol="clusters test")
    assert result.ways == 5 and result.shots == 2 and result.queries == 3 and not result.transductive
    assert isinstance(episodes[0], Episode)
