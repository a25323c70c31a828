import math

import pytest
import torch

from metaxfer import ProtoNet, evaluate
from metaxfer.evaluate import mean_ci95
from metaxfer.tasks import EpisodeSampler


def test_mean_ci95_formula():
    values = [90.0, 100.0, 95.0, 85.0]
    mean, ci, std = mean_ci95(values)
    s = math.sqrt(sum((v - 92.5) ** 2 for v in values) / 3)
    assert mean == 92.5 and std == pytest.approx(s) and ci == pytest.approx(1.96 * s / 2)
    with pytest.raises(ValueError):
        mean_ci95([])


def test_evaluate_reports_record(clusters, small_conv4):
    episodes = EpisodeSampler(clusters, 5, 1, 3, seed=0).fixed_episodes(8, seed=0)
    res = evaluate(ProtoNet(small_conv4), episodes, protocol="clusters train")
    assert res.n == 8 and (res.ways, res.shots, res.queries) == (5, 1, 3)
    assert res.seed == 0 and res.fingerprint == episodes.fingerprint and not res.transductive
    assert 0 <= res.mean <= 100 and len(res.accuracies) == 8
    assert res.line().startswith(f"accuracy: {res.mean:.2f} ± {res.ci95:.2f} % (95% CI, 8 episodes, clusters train, 5-way 1-shot)")
    assert "accuracies" not in res.to_dict()
    again = evaluate(ProtoNet(small_conv4), episodes)
    assert again.accuracies == res.accuracies  # same episodes, same numbers


def test_query_replacement_does_not_change_other_predictions(clusters, small_conv4):
    """Non-transductive: swapping the rest of the query set leaves each prediction as it was."""
    learner = ProtoNet(small_conv4)
    # Give BatchNorm non-trivial running statistics first.
    learner.train()
    learner.loss(EpisodeSampler(clusters, 5, 1, 3, seed=1).sample_batch(2))
    ep = EpisodeSampler(clusters, 5, 1, 3, seed=0).sample()
    predict = learner.adapt(ep.support_x, ep.support_y)
    a = predict(ep.query_x)
    b = predict(torch.cat([ep.query_x[:5], torch.randn(10, 1, 16, 16)]))
    assert torch.allclose(a[:5], b[:5], atol=1e-5)


def test_evaluate_rejects_batched(clusters, small_conv4):
    batch = EpisodeSampler(clusters, 5, 1, 3).sample_batch(2)
    with pytest.raises(ValueError, match="unbatched"):
        evaluate(ProtoNet(small_conv4), [batch])
