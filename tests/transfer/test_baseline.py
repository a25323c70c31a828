"""Baseline and Baseline++ (Chen et al. 2019): pretraining, frozen-feature adaptation, heads, fit and save/load."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import metaxfer
from metaxfer import (
    Baseline,
    BaselinePlusPlus,
    ClassBatchSampler,
    EpisodeSampler,
    evaluate,
)
from metaxfer.build import build_learner
from metaxfer.data.synthetic import ClusterImages
from metaxfer.errors import ConfigError, EpisodeError
from metaxfer.tasks import Episode
from metaxfer.transfer.heads import (
    HEADS,
    CosineClassifier,
    fit_head,
    logistic_regression,
    nearest_centroid,
    paper_scale,
)

BACKBONE = {"in_channels": 1, "hidden": 8, "image_size": 16}


def _model(learner: str, **learner_args: object) -> dict:
    return {"learner": learner, "backbone": "conv4", "backbone_args": BACKBONE,
            "learner_args": {"num_base_classes": 20, **learner_args}}


@pytest.fixture(scope="module")
def held_out() -> metaxfer.tasks.EpisodeSet:
    """Fixed 5-way 1-shot episodes over classes never seen in pretraining."""
    test = ClusterImages("test", num_classes=20, per_class=10, image_size=16, noise=0.5)
    return EpisodeSampler(test, 5, 1, 5, seed=0).fixed_episodes(20, seed=0)


@pytest.fixture(scope="module")
def pretrained(pretrain) -> Baseline:
    torch.manual_seed(0)
    learner = build_learner(_model("baseline"))
    pretrain(learner, ClusterImages("train", num_classes=20, per_class=10, image_size=16, noise=0.5))
    return learner


def test_paper_scale_and_cosine_head_by_hand():
    assert paper_scale(5) == 2.0 and paper_scale(200) == 2.0 and paper_scale(4112) == 10.0
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 6, generator=g), torch.randn(3, 6, generator=g)
    plain = CosineClassifier(6, 3, scale=2.0, class_gain=False)
    gained = CosineClassifier(6, 3, scale=2.0, class_gain=True)
    with torch.no_grad():
        plain.weight.copy_(w)
        gained.weight.copy_(w)
        gained.gain.copy_(torch.tensor([1.0, 0.5, 2.0]))
    cos = torch.tensor([[float(x[n] @ w[c] / (x[n].norm() * w[c].norm())) for c in range(3)] for n in range(4)])
    assert torch.allclose(plain(x), 2.0 * cos, atol=1e-5)
    assert torch.allclose(gained(x), 2.0 * cos * torch.tensor([1.0, 0.5, 2.0]), atol=1e-5)
    assert plain(torch.zeros(1, 6)).abs().max() == 0  # a dead feature vector gives zero logits, not NaN
    assert CosineClassifier(6, 4112).scale.item() == 10.0
    learnable = CosineClassifier(6, 3, learn_scale=True)
    assert any(p is learnable.scale for p in learnable.parameters())
    assert torch.allclose(learnable.gain, learnable.weight.norm(dim=1))  # weight-norm start: g = |v|


def test_pretraining_loss_is_cross_entropy_over_base_classes():
    learner = Baseline(torch.nn.Linear(3, 4), num_base_classes=5, feature_dim=4)
    x, y = torch.randn(1, 6, 3), torch.tensor([[0, 4, 2, 1, 3, 0]])
    batch = Episode(x, y, x[:, :0], y[:, :0])
    expected = F.cross_entropy(learner.head(learner.backbone(x[0])), y[0])
    assert torch.allclose(learner.loss(batch), expected)
    pp = BaselinePlusPlus(torch.nn.Linear(3, 4), num_base_classes=300, feature_dim=4)
    assert isinstance(pp.head, CosineClassifier) and pp.adapt_head == "cosine" and pp.head.scale == 10.0
    sx, sy = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    assert pp.adapt(sx, sy).head.scale == 2.0  # the adaptation head follows the rule for its own ways
    tuned = BaselinePlusPlus(torch.nn.Linear(3, 4), num_base_classes=5, feature_dim=4, adapt_scale=5.0)
    assert tuned.adapt(sx, sy).head.scale == 5.0


@pytest.mark.parametrize("name", ["baseline", "baseline_pp"])
def test_pretraining_learns_and_adaptation_beats_chance(name, clusters, held_out, pretrain):
    torch.manual_seed(0)
    learner = build_learner(_model(name))
    losses = pretrain(learner, clusters, steps=60)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    result = evaluate(learner, held_out)
    assert result.mean > 35.0, result  # chance is 20 %


@pytest.mark.parametrize("head", HEADS)
def test_every_adapt_head_beats_chance_and_is_deterministic(pretrained, held_out, head):
    learner = Baseline(pretrained.backbone, num_base_classes=20, adapt_head=head, feature_dim=pretrained.head.in_features)
    assert evaluate(learner, held_out).mean > 35.0
    ep = held_out[0]
    a = learner.adapt(ep.support_x, ep.support_y)(ep.query_x)
    b = learner.adapt(ep.support_x, ep.support_y)(ep.query_x)
    assert a.shape == (25, 5) and torch.equal(a, b)


def test_adapt_is_deterministic_and_does_not_mutate(pretrained, held_out):
    learner = pretrained
    learner.train()
    learner.zero_grad(set_to_none=True)  # left over from pretraining
    learner.head.weight.requires_grad_(False)  # an unusual flag must survive too
    flags = {n: p.requires_grad for n, p in learner.named_parameters()}
    state = {k: v.clone() for k, v in learner.state_dict().items()}
    rng = torch.get_rng_state()
    ep = held_out[1]
    with torch.no_grad():  # evaluate calls adapt under no_grad: the head must still train
        first = learner.adapt(ep.support_x, ep.support_y)(ep.query_x)
    second = learner.adapt(ep.support_x, ep.support_y)(ep.query_x)
    assert torch.equal(first, second)
    assert all(torch.equal(state[k], v) for k, v in learner.state_dict().items())  # running stats included
    assert flags == {n: p.requires_grad for n, p in learner.named_parameters()}
    assert all(p.grad is None for p in learner.parameters())
    assert learner.training and torch.equal(rng, torch.get_rng_state())
    learner.head.weight.requires_grad_(True)
    other = Baseline(pretrained.backbone, num_base_classes=20, feature_dim=8, adapt_seed=1)
    assert not torch.equal(other.adapt(ep.support_x, ep.support_y)(ep.query_x), first)  # the seed matters


def test_predictor_is_not_transductive(pretrained, held_out):
    ep = held_out[2]
    predict = pretrained.adapt(ep.support_x, ep.support_y)
    alone = predict(ep.query_x[:1])
    assert torch.allclose(predict(ep.query_x)[:1], alone, atol=1e-5)
    assert torch.allclose(predict(torch.cat([ep.query_x[:1], 5 * torch.randn(6, 1, 16, 16)]))[:1], alone, atol=1e-5)


def test_head_fitting_helpers():
    g = torch.Generator().manual_seed(0)
    feats = torch.cat([torch.randn(3, 4, generator=g) + 4 * torch.eye(4)[c] for c in range(3)])
    labels = torch.arange(3).repeat_interleave(3)
    centroids = nearest_centroid(feats, labels, 3).centroids
    assert torch.allclose(centroids[1], F.normalize(feats[3:6], dim=1).mean(0))
    for head in (nearest_centroid(feats, labels, 3), fit_head("logreg", feats, labels, 3),
                 fit_head("linear", feats, labels, 3), fit_head("cosine", feats, labels, 3)):
        assert torch.equal(head(feats).argmax(-1), labels)
    assert logistic_regression(feats, labels, 3).weight.shape == (3, 4)
    with pytest.raises(ConfigError, match="choose one of"):
        fit_head("svm", feats, labels, 3)


def test_errors_say_what_to_change(clusters):
    with pytest.raises(ConfigError, match="num_base_classes"):
        build_learner(_model("baseline", num_base_classes=None))
    with pytest.raises(ConfigError, match="adapt_head"):
        build_learner(_model("baseline", adapt_head="knn"))
    with pytest.raises(ConfigError, match="classifier"):
        build_learner(_model("baseline_pp", classifier="linear"))
    with pytest.raises(ConfigError, match="learn_scale"):
        build_learner(_model("baseline", learn_scale=True))
    learner = build_learner(_model("baseline"))
    with pytest.raises(ConfigError, match="train.sampler: classes"):
        learner.loss(EpisodeSampler(clusters, 5, 1, 2).sample_batch(1))
    small = build_learner(_model("baseline", num_base_classes=10))
    with pytest.raises(EpisodeError, match="num_base_classes"):
        small.loss(ClassBatchSampler(clusters, 200).sample_batch(1))


def test_fit_resume_and_save_load_round_trip(clusters, held_out, tmp_path):
    def run(steps: int, run_dir, seed_model: int = 0):
        torch.manual_seed(seed_model)
        learner = build_learner(_model("baseline"))
        sampler = ClassBatchSampler(clusters, batch_size=16, seed=0)
        opt = torch.optim.Adam(learner.parameters(), 1e-2)
        val = held_out[:4]
        result = metaxfer.fit(learner, sampler, opt, steps, val_episodes=val, val_every=3, run_dir=run_dir,
                              checkpoint_every=3, log_every=1, progress=False)
        return learner, result

    _, straight = run(6, tmp_path / "straight")
    run(3, tmp_path / "resumed")
    learner, resumed = run(6, tmp_path / "resumed", seed_model=123)  # weights come from the checkpoint
    losses = [r["loss"] for r in straight.history if r.get("loss") is not None]
    assert losses == [r["loss"] for r in resumed.history if r.get("loss") is not None]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)

    metaxfer.save(learner, tmp_path / "model")
    loaded = metaxfer.load(tmp_path / "model")
    assert isinstance(loaded, Baseline) and loaded.num_base_classes == 20
    ep = held_out[3]
    assert torch.allclose(loaded.adapt(ep.support_x, ep.support_y)(ep.query_x),
                          learner.adapt(ep.support_x, ep.support_y)(ep.query_x), atol=1e-5)
    best = metaxfer.load(tmp_path / "straight")  # a run directory: its best checkpoint
    assert isinstance(best, Baseline)
