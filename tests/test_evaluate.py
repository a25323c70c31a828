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


def test_one_query_per_class_indices():
    from metaxfer.evaluate import one_query_per_class

    y = torch.tensor([2, 0, 1, 1, 0, 2, 0, 2, 1])
    groups = one_query_per_class(y)
    assert groups.shape == (3, 3)
    for g in groups:  # each batch holds one query of every class, and the batches cover every query once
        assert sorted(y[g].tolist()) == [0, 1, 2]
    assert sorted(groups.flatten().tolist()) == list(range(9))
    with pytest.raises(ValueError, match=r"same number of queries in every class, got \[2, 1\]"):
        one_query_per_class(torch.tensor([0, 0, 1]))


def test_query_batches_one_per_class(clusters):
    """Transductive MAML: each batch of one query per class is normalised on its own, as in the reference code;
    non-transductive prediction does not depend on the batching."""
    from metaxfer import MAML
    from metaxfer.backbones import create
    from metaxfer.evaluate import one_query_per_class
    from metaxfer.evaluate.evaluate import episode_accuracy
    from metaxfer.tasks import Episode

    torch.manual_seed(0)
    learner = MAML(create("conv4", in_channels=1, hidden=8, image_size=16, num_classes=5), inner_lr=0.4, inner_steps=1)
    episodes = EpisodeSampler(clusters, 5, 1, 4, seed=0).fixed_episodes(6, seed=0)
    plain = evaluate(learner, episodes)
    assert evaluate(learner, episodes, query_batches="one_per_class").accuracies == plain.accuracies
    learner.set_transductive(True)
    whole = evaluate(learner, episodes)
    grouped = evaluate(learner, episodes, query_batches="one_per_class")
    assert grouped.query_batches == "one_per_class" and "one query per class per batch" in grouped.line()
    expected = []  # each batch as an episode of its own (same support, so the same adapted weights)
    for ep in episodes:
        parts = [episode_accuracy(learner, Episode(ep.support_x, ep.support_y, ep.query_x[g], ep.query_y[g]))
                 for g in one_query_per_class(ep.query_y)]
        expected.append(100.0 * sum(parts) / len(parts))
    assert grouped.accuracies == pytest.approx(expected)
    assert grouped.accuracies != whole.accuracies  # the batch statistics differ from the 20-query batch's
    with pytest.raises(ValueError, match="query_batches must be one of"):
        evaluate(learner, episodes, query_batches="per_class")
