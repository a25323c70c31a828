"""Matching Networks: attention maths, FCE, contract (shapes, non-transductive, no mutation), learning, errors."""

import pytest
import torch
from torch import nn

import metaxfer
from metaxfer.errors import ConfigError, EpisodeError
from metaxfer.learners.matching import MatchingNet, matching_log_probs
from metaxfer.tasks import Episode, EpisodeSampler


def mlp(out: int = 16) -> nn.Module:
    """A small MLP backbone for 1x16x16 cluster images (``out_features`` lets FCE size itself)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, out))
    net.out_features = out
    return net


def test_cosine_attention_by_hand():
    support = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    support_y = torch.tensor([0, 1, 1])
    query = torch.tensor([[3.0, 0.0], [1.0, 2.0]])
    log_p = matching_log_probs(query, support, support_y, 2)
    s2 = 2 ** -0.5
    for q, cos in zip(log_p.exp(), [[1.0, 0.0, s2], [1 / 5**0.5, 2 / 5**0.5, 3 / 10**0.5]]):
        a = torch.tensor(cos).softmax(0)  # attention over the three support examples
        assert torch.allclose(q, torch.stack([a[0], a[1] + a[2]]), atol=1e-6)


@pytest.mark.parametrize("fce", [False, True])
def test_shapes_batched_and_adapt(clusters, fce):
    learner = MatchingNet(mlp(), fce=fce)
    batch = EpisodeSampler(clusters, 5, 2, 3, seed=0).sample_batch(3)
    loss = learner.loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    predict = learner.adapt(batch.support_x[0], batch.support_y[0])
    logits = predict(batch.query_x[0])
    assert logits.shape == (15, 5)
    assert torch.allclose(logits.exp().sum(-1), torch.ones(15), atol=1e-5)  # log-probabilities


def test_fce_changes_embedding_and_keeps_shapes():
    torch.manual_seed(0)
    learner = MatchingNet(mlp(), fce=True, processing_steps=3)
    g, f = torch.randn(2, 6, 16), torch.randn(2, 4, 16)
    g2 = learner.fce.embed_support(g)
    f2 = learner.fce.embed_query(f, g2)
    assert g2.shape == g.shape and f2.shape == f.shape
    assert not torch.allclose(g2, g) and not torch.allclose(f2, f)
    # Support order matters to the bidirectional LSTM (as in the paper); context is per task.
    assert torch.allclose(learner.fce.embed_support(g[:1]), g2[:1], atol=1e-6)


@pytest.mark.parametrize("fce", [False, True])
def test_not_transductive_and_adapt_does_not_mutate(clusters, fce):
    learner = MatchingNet(mlp(), fce=fce)
    learner.train()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    ep = EpisodeSampler(clusters, 5, 1, 4, seed=1).sample()
    predict = learner.adapt(ep.support_x, ep.support_y)
    full = predict(ep.query_x)
    perm = torch.randperm(len(ep.query_x))
    assert torch.allclose(predict(ep.query_x[perm]), full[perm], atol=1e-5)
    other = predict(torch.cat([ep.query_x[:1], torch.randn(7, 1, 16, 16) * 5]))
    assert torch.allclose(other[:1], full[:1], atol=1e-5)
    assert learner.training and all(torch.equal(before[k], v) for k, v in learner.state_dict().items())
    assert learner.transductive is False


def test_gradients_reach_backbone_and_fce(clusters):
    learner = MatchingNet(mlp(), fce=True)
    learner.loss(EpisodeSampler(clusters, 5, 1, 2, seed=0).sample_batch(2)).backward()
    for name, p in learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("fce", [False, True])
def test_learns_gaussian_clusters(clusters, fce, meta_train):
    torch.manual_seed(0)
    learner = MatchingNet(mlp(), fce=fce)
    sampler = EpisodeSampler(clusters, 5, 1, 5, seed=0)
    losses = meta_train(learner, sampler)
    # Cosine attention without a temperature bounds the loss below (~0.43 for 5-way 1-shot), hence a modest drop.
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    test = EpisodeSampler(clusters, 5, 1, 5, seed=99).sample()
    acc = (learner.adapt(test.support_x, test.support_y)(test.query_x).argmax(-1) == test.query_y).float().mean()
    assert acc > 0.5  # chance is 0.2


def test_missing_support_class_is_an_episode_error():
    learner = MatchingNet(mlp())
    sx, qx = torch.randn(4, 1, 16, 16), torch.randn(3, 1, 16, 16)
    with pytest.raises(EpisodeError, match=r"no example of class\(es\) \[1\].*at least one shot"):
        learner.adapt(sx, torch.tensor([0, 0, 2, 2]))
    with pytest.raises(EpisodeError, match=r"task 1 has no example of class\(es\) \[2\]"):
        learner.loss(Episode(sx, torch.tensor([0, 1, 2, 2]), qx, torch.tensor([0, 1, 2])).batch()._replace(
            support_y=torch.tensor([[0, 1, 2, 2], [0, 1, 1, 0]]), support_x=torch.randn(2, 4, 1, 16, 16),
            query_x=torch.randn(2, 3, 1, 16, 16), query_y=torch.tensor([[0, 1, 2], [0, 1, 2]])))


def test_fce_needs_feature_dim():
    with pytest.raises(metaxfer.errors.ConfigError, match="feature_dim"):
        MatchingNet(nn.Flatten(), fce=True)


def test_build_from_config_and_save_load(tmp_path, clusters):
    spec = {"learner": "matching", "learner_args": {"fce": True}, "backbone": "conv4",
            "backbone_args": {"hidden": 8, "image_size": 16}}
    learner = metaxfer.build_learner(spec)
    assert isinstance(learner, MatchingNet) and learner.fce is not None
    learner.loss(EpisodeSampler(clusters, 5, 1, 2, seed=0).sample_batch(2)).backward()  # moves BN stats
    metaxfer.save(learner, tmp_path / "m")
    loaded = metaxfer.load(tmp_path / "m")
    ep = EpisodeSampler(clusters, 5, 1, 3, seed=3).sample()
    learner.eval()
    a = learner.adapt(ep.support_x, ep.support_y)(ep.query_x)
    b = loaded.adapt(ep.support_x, ep.support_y)(ep.query_x)
    assert torch.allclose(a, b, atol=1e-6)


def test_scale_sharpens_the_attention_and_can_be_learned(clusters):
    batch = EpisodeSampler(clusters, 5, 1, 2, seed=0).sample_batch(2)
    torch.manual_seed(0)
    plain = MatchingNet(mlp())
    torch.manual_seed(0)
    sharp = MatchingNet(mlp(), scale=10.0, learn_scale=True)
    zs, zq = torch.randn(1, 5, 8), torch.randn(1, 3, 8)
    y = torch.arange(5)[None]
    p1 = plain.task_logits(zs, y, zq, 5).exp().max(-1).values
    p10 = sharp.task_logits(zs, y, zq, 5).exp().max(-1).values
    assert (p10 > p1).all()  # a larger scale puts more attention mass on the best class
    sharp.loss(batch).backward()
    assert sharp.scale.grad is not None and sharp.scale.grad.abs() > 0
    assert "scale" not in dict(plain.named_parameters()) and "scale" in plain.state_dict()
    with pytest.raises(ConfigError, match="scale must be > 0"):
        MatchingNet(mlp(), scale=0.0)
