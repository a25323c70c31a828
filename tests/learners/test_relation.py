"""Relation Networks: the paper's architecture, shape errors, contract, learning, losses."""

import copy

import pytest
import torch
import torch.nn.functional as F

import metaxfer
from metaxfer.backbones.relation_conv4 import RelationConv4
from metaxfer.data.synthetic import ClusterImages
from metaxfer.errors import ConfigError, EpisodeError
from metaxfer.learners.relation import RelationModule, RelationNet, class_features
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
    assert len(pools) == 2 and all(isinstance(b[2], torch.nn.MaxPool2d) for b in emb.features[:2])
    # The paper's state_dict keys (conv = .0, BatchNorm = .1 of each block), whatever order ReLU and pool run in.
    assert sorted({k.rsplit(".", 1)[0] for k in emb.state_dict()}) == [f"features.{i}.{j}" for i in range(4) for j in (0, 1)]
    learner = RelationNet(emb)
    convs = [m for m in learner.relation.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.in_channels for c in convs] == [128, 64]  # concatenated (class, query) maps
    assert [(m.in_features, m.out_features) for m in learner.relation.fc if isinstance(m, torch.nn.Linear)] == [(64, 8), (8, 1)]


def test_fast_embedding_and_relation_module_equal_the_papers_layer_order():
    """Pool before ReLU, channels-last activations and the bias added after the first convolution: the same
    outputs and parameter gradients as plain nn layers in the paper's order (conv, BatchNorm, ReLU, pool)."""
    torch.manual_seed(0)
    learner = RelationNet(RelationConv4(in_channels=1, hidden=8), hidden=8, fc_hidden=4).double().train()

    def papers_order(seq: torch.nn.Sequential) -> torch.nn.Sequential:
        layers, convs = [], [m for m in seq if isinstance(m, torch.nn.Conv2d)]
        for conv, bn, pools in zip(convs, [m for m in seq if isinstance(m, torch.nn.BatchNorm2d)],
                                   [isinstance(seq[i + 2], torch.nn.MaxPool2d) for i, m in enumerate(seq) if m in convs]):
            plain = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=conv.padding).double()
            plain.load_state_dict(conv.state_dict())
            layers += [plain, copy.deepcopy(bn), torch.nn.ReLU()] + ([torch.nn.MaxPool2d(2)] if pools else [])
        return torch.nn.Sequential(*layers)

    embedding = torch.nn.Sequential(*[papers_order(b) for b in learner.backbone.features])
    blocks = papers_order(learner.relation.blocks)
    x = torch.randn(9, 1, 28, 28, dtype=torch.float64)
    z, z_ref = learner.backbone(x), embedding(x)
    torch.testing.assert_close(z, z_ref, rtol=1e-10, atol=1e-10)
    classes, query = z[:4], z[4:]
    logits = learner.relation(classes, query)
    pairs = torch.cat([z_ref[:4].unsqueeze(0).expand(5, 4, 8, 5, 5), z_ref[4:].unsqueeze(1).expand(5, 4, 8, 5, 5)], 2)
    ref = learner.relation.fc(blocks(pairs.flatten(0, 1)).flatten(1)).view(5, 4)
    torch.testing.assert_close(logits, ref, rtol=1e-10, atol=1e-10)
    ours = torch.autograd.grad(logits.square().sum(), [p for n, p in learner.named_parameters() if "fc" not in n])
    theirs = torch.autograd.grad(ref.square().sum(), [*embedding.parameters(), *blocks.parameters()])
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_class_features_sum_over_shots():
    z = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 1, 1)
    c = class_features(z, torch.tensor([1, 0, 1, 0]), 2)
    assert torch.equal(c[:, 0, 0, 0], torch.tensor([1.0 + 3.0, 0.0 + 2.0]))


@pytest.mark.parametrize("padding", [1, 0])
def test_factored_first_conv_equals_the_concatenated_pairs(padding):
    """forward() adds per-class and per-query convolutions; pairs() convolves each concatenated pair: same logits,
    same gradients, same BatchNorm running statistics (the batch is the same set of pairs, in the same order)."""
    torch.manual_seed(0)
    size = 5 if padding == 1 else 12
    module = RelationModule((6, size, size), hidden=8, fc_hidden=4, padding=padding).double().train()
    twin = copy.deepcopy(module)
    classes = torch.randn(4, 6, size, size, dtype=torch.float64, requires_grad=True)
    query = torch.randn(7, 6, size, size, dtype=torch.float64, requires_grad=True)
    logits = module(classes, query)
    q, ways = query.shape[0], classes.shape[0]
    pairs = torch.cat([classes.unsqueeze(0).expand(q, ways, 6, size, size),
                       query.unsqueeze(1).expand(q, ways, 6, size, size)], 2).flatten(0, 1)
    reference = twin.pairs(pairs).view(q, ways)
    assert logits.shape == (7, 4)
    torch.testing.assert_close(logits, reference, rtol=1e-10, atol=1e-10)
    target = torch.rand(7, 4, dtype=torch.float64)
    grads = torch.autograd.grad(((logits - target) ** 2).sum(), [classes, query, *module.parameters()])
    ref_grads = torch.autograd.grad(((reference - target) ** 2).sum(), [classes, query, *twin.parameters()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)
    for a, b in zip(module.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


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


def test_transductive_prediction_is_the_training_computation(clusters28):
    """transductive=True: the logits of a training episode (batch statistics of support and query together),
    no buffer written, and a query's logits depend on the other queries (they do not without the flag)."""
    torch.manual_seed(0)
    learner = small()
    learner.loss(EpisodeSampler(clusters28, 5, 1, 3, seed=1).sample_batch(2))  # running statistics away from 0/1
    learner.transductive = True
    learner.eval()
    ep = EpisodeSampler(clusters28, 5, 1, 3, seed=0).sample()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    predict = learner.adapt(ep.support_x, ep.support_y)
    logits = predict(ep.query_x)
    assert all(torch.equal(before[k], v) for k, v in learner.state_dict().items()) and not learner.training
    reference = copy.deepcopy(learner).train()
    torch.testing.assert_close(logits, reference.task_logits(ep.support_x, ep.support_y, ep.query_x, 5))
    assert not torch.allclose(predict(ep.query_x[:4]), logits[:4], atol=1e-4)
    learner.transductive = False
    inductive = learner.adapt(ep.support_x, ep.support_y)
    assert not torch.allclose(inductive(ep.query_x), logits, atol=1e-4)
    torch.testing.assert_close(inductive(ep.query_x[:4]), inductive(ep.query_x)[:4])


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
