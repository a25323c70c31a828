import pytest
import torch
import torch.nn.functional as F

from metaxfer import ProtoNet
from metaxfer.functional import prototypes, squared_euclidean
from metaxfer.tasks import Episode, EpisodeSampler


def test_prototypes_and_distances_by_hand():
    feats = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    protos = prototypes(feats, torch.tensor([0, 0, 1]))
    assert torch.equal(protos, torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    d = squared_euclidean(torch.tensor([[1.0, 1.0]]), protos)
    assert torch.allclose(d, torch.tensor([[1.0, 10.0]]))


def test_missing_support_class_is_an_error():
    with pytest.raises(ValueError, match=r"no example of class\(es\) \[1\]"):
        prototypes(torch.zeros(3, 2), torch.tensor([0, 0, 2]), ways=3)


def test_loss_matches_paper_formula():
    torch.manual_seed(0)
    learner = ProtoNet(torch.nn.Linear(4, 3))
    sx, qx = torch.randn(6, 4), torch.randn(4, 4)
    sy, qy = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 2, 2])
    loss = learner.loss(Episode(sx, sy, qx, qy).batch())
    z_s, z_q = learner.backbone(sx), learner.backbone(qx)
    c = torch.stack([z_s[sy == k].mean(0) for k in range(3)])
    logits = -((z_q[:, None, :] - c[None]) ** 2).sum(-1)
    assert torch.allclose(loss, F.cross_entropy(logits, qy), atol=1e-6)


def test_adapt_does_not_mutate_and_is_not_transductive(clusters, small_conv4):
    learner = ProtoNet(small_conv4)
    learner.train()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    ep = EpisodeSampler(clusters, 5, 1, 4, seed=0).sample()
    predict = learner.adapt(ep.support_x, ep.support_y)
    full = predict(ep.query_x)
    alone = predict(ep.query_x[:1])
    other = predict(torch.cat([ep.query_x[:1], torch.randn(7, 1, 16, 16) * 5]))
    assert torch.allclose(full[:1], alone, atol=1e-5) and torch.allclose(alone, other[:1], atol=1e-5)
    after = learner.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats untouched too
    assert learner.training  # mode restored


def test_protonet_learns_gaussian_clusters(clusters, small_conv4, meta_train):
    torch.manual_seed(0)
    learner = ProtoNet(small_conv4)
    sampler = EpisodeSampler(clusters, 5, 1, 5, seed=0)
    losses = meta_train(learner, sampler)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert 0.0 <= learner.last_metrics["accuracy"] <= 1.0


def test_learner_rejects_a_support_set_missing_a_class():
    from metaxfer.errors import EpisodeError
    from metaxfer.tasks.episode import Episode

    learner = ProtoNet(torch.nn.Linear(4, 3))
    support_y = torch.tensor([[0, 0, 2]])  # class 1 has no support example
    batch = Episode(torch.randn(1, 3, 4), support_y, torch.randn(1, 3, 4), torch.tensor([[0, 1, 2]]))
    with pytest.raises(EpisodeError, match=r"no example of class\(es\) \[1\]"):
        learner.loss(batch)
    with pytest.raises(EpisodeError, match=r"no example of class\(es\) \[1\]"):
        learner.adapt(torch.randn(3, 4), torch.tensor([0, 2, 2]))
