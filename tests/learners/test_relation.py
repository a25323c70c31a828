"""Relation Networks: the paper's architecture, shape errors, contract, learning, losses."""

import pytest
import torch
import torch.nn.functional as F

import metaxfer
from metaxfer.backbones.relation_conv4 import RelationConv4
from metaxfer.data.synthetic import ClusterImages
from metaxfer.errors import ConfigError, EpisodeError
from metaxfer.learners.relation import RelationNet, class_features
from metaxfer.tasks import EpisodeSampler


@pytest.fixture
def clusters28() -> ClusterImages:
    """Omniglot-sized 1x28x28 Gaussian clusters (the embedding gives 5x5 maps, as on Omniglot)."""
    return ClusterImages("train", num_classes=12, per_class=8, image_size=28, noise=0.5)


def small() -> RelationNet:
    return RelationNet(RelationConv4(in_channels=1, hidden=8), hidden=8, fc_hidden=4)


def test_paper_architecture_on_omniglot_size():
    emb = RelationConv4(in_channels=1)
    assert emb(torch.zeros(2, 1, 28, 28)).shape == (2, 64, 5, 5) and emb.feature_shape == (64, 5, 5)
    pools = [m for m in emb.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == 2 and all(isinstance(b[-1], torch.nn.MaxPool2d) for b in emb.features[:2])
    learner = RelationNet(emb)
    convs = [m for m in learner.relation.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.in_channels for c in convs] == [128, 64]  # concatenated (class, query) maps
    assert [(m.in_features, m.out_features) for m in learner.relation.fc if isinstance(m, torch.nn.Linear)] == [(64, 8), (8, 1)]


def test_class_features_sum_over_shots():
    z = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 1, 1)
    c = class_features(z, torch.tensor([1, 0, 1, 0]), 2)
    assert torch.equal(c[:, 0, 0, 0], torch.tensor([1.0 + 3.0, 0.0 + 2.0]))


def test_relation_module_shape_error_names_both_shapes():
    learner = RelationNet(RelationConv4(in_channels=1, hidden=8), feature_shape=(8, 4, 4), hidden=8)
    x = torch.randn(5, 1, 28, 28)
    with pytest.raises(ConfigError, match=r"feature maps of shape \(8, 5, 5\).*relation module expects \(8, 4, 4\)"):
        learner.adapt(x, torch.arange(5))
    with pytest.raises(ConfigError, match=r"\(8, 5, 5\).*\(8, 4, 4\)"):
        learner.loss(metaxfer.tasks.Episode(x, torch.arange(5), x, torch.arange(5)))
    # Images of another size than the embedding was built for: same error, both shapes named.
    with pytest.raises(ConfigError, match=r"\(8, 8, 8\).*\(8, 5, 5\)"):
        small().adapt(torch.randn(5, 1, 40, 40), torch.arange(5))


def test_shapes_batched_and_adapt_not_transductive(clusters28):
    learner = small()
    batch = EpisodeSampler(clusters28, 5, 2, 3, seed=0).sample_batch(3)
    loss = learner.loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    learner.train()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    ep = batch.task(0)
    predict = learner.adapt(ep.support_x, ep.support_y)
    full = predict(ep.query_x)
    assert full.shape == (15, 5)
    perm = torch.randperm(15)
    assert torch.allclose(predict(ep.query_x[perm]), full[perm], atol=1e-5)
    other = predict(torch.cat([ep.query_x[:2], torch.randn(6, 1, 28, 28) * 5]))
    assert torch.allclose(other[:2], full[:2], atol=1e-5)
    assert learner.training and all(torch.equal(before[k], v) for k, v in learner.state_dict().items())


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_losses_and_gradients_reach_backbone(clusters28, loss):
    learner = RelationNet(RelationConv4(in_channels=1, hidden=8), hidden=8, fc_hidden=4, loss=loss)
    batch = EpisodeSampler(clusters28, 3, 1, 2, seed=0).sample_batch(2)
    value = learner.loss(batch)
    logits = torch.stack([learner.task_logits(*batch.task(t)[:3], 3) for t in range(2)])
    if loss == "mse":
        expected = ((torch.sigmoid(logits) - F.one_hot(batch.query_y, 3)) ** 2).mean()
    else:
        expected = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
    assert torch.allclose(value, expected, atol=1e-6)
    value.backward()
    for name, p in learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_learns_gaussian_clusters(clusters28, meta_train):
    torch.manual_seed(0)
    learner = small()
    sampler = EpisodeSampler(clusters28, 5, 1, 3, seed=0)
    losses = meta_train(learner, sampler)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    test = EpisodeSampler(clusters28, 5, 1, 5, seed=99).sample()
    acc = (learner.adapt(test.support_x, test.support_y)(test.query_x).argmax(-1) == test.query_y).float().mean()
    assert acc > 0.5  # chance is 0.2


def test_missing_support_class_and_bad_loss():
    learner = small()
    with pytest.raises(EpisodeError, match=r"no example of class\(es\) \[1\]"):
        learner.adapt(torch.randn(3, 1, 28, 28), torch.tensor([0, 2, 2]))
    with pytest.raises(ConfigError, match="unknown loss 'l1'"):
        RelationNet(RelationConv4(), loss="l1")
    with pytest.raises(ConfigError, match="feature_shape"):
        RelationNet(torch.nn.Identity())


def test_build_from_config_and_save_load(tmp_path, clusters28):
    spec = {"learner": "relation", "learner_args": {"hidden": 8, "fc_hidden": 4, "loss": "cross_entropy"},
            "backbone": "relation_conv4", "backbone_args": {"in_channels": 1, "hidden": 8, "image_size": 28}}
    learner = metaxfer.build_learner(spec)
    assert isinstance(learner, RelationNet) and learner.loss_name == "cross_entropy"
    learner.loss(EpisodeSampler(clusters28, 5, 1, 2, seed=0).sample_batch(1)).backward()
    metaxfer.save(learner, tmp_path / "m")
    loaded = metaxfer.load(tmp_path / "m")
    ep = EpisodeSampler(clusters28, 5, 1, 3, seed=3).sample()
    a = learner.adapt(ep.support_x, ep.support_y)(ep.query_x)
    b = loaded.adapt(ep.support_x, ep.support_y)(ep.query_x)
    assert torch.allclose(a, b, atol=1e-6)
