"""finetune(): works on a copy, freezes by pattern, layer-wise learning rates, LP-FT; the FineTune learner."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import metaxfer
from metaxfer import EpisodeSampler, FineTune, evaluate, finetune
from metaxfer.build import build_learner
from metaxfer.errors import ConfigError
from metaxfer.transfer import BodyHead, match_parameters, param_groups


def _model() -> BodyHead:
    torch.manual_seed(0)
    return BodyHead(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.BatchNorm1d(6)), nn.Linear(6, 3))


def _support() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(9, 4, generator=g), torch.arange(3).repeat_interleave(3)


def _changed(before: nn.Module, after: nn.Module) -> set[str]:
    old = dict(before.named_parameters())
    return {n for n, p in after.named_parameters() if not torch.equal(old[n], p)}


ALL = {"backbone.0.weight", "backbone.0.bias", "backbone.2.weight", "backbone.2.bias", "backbone.3.weight",
       "backbone.3.bias", "head.weight", "head.bias"}


def test_never_mutates_the_callers_model():
    model = _model().train()
    model.backbone[0].bias.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    tuned = finetune(model, *_support(), steps=5, lp_ft=True, lp_steps=3)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BatchNorm buffers too
    assert not model.backbone[0].bias.requires_grad and model.head.weight.requires_grad
    assert model.training and all(p.grad is None for p in model.parameters())
    assert tuned is not model and not tuned.training
    assert not tuned.backbone[0].bias.requires_grad  # the copy keeps the caller's flags
    assert _changed(model, tuned)
    assert torch.equal(rng, torch.get_rng_state())


def test_deterministic_and_fits_the_support():
    x, y = _support()
    a = finetune(_model(), x, y, steps=200, lr=0.1, batch_size=4, seed=3)
    b = finetune(_model(), x, y, steps=200, lr=0.1, batch_size=4, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert torch.equal(a(x).argmax(-1), y)


def test_freeze_patterns_freeze_exactly_the_matching_parameters():
    model = _model()
    tuned = finetune(model, *_support(), steps=5, freeze=["backbone.0", "backbone.3.*"])
    assert _changed(model, tuned) == ALL - {"backbone.0.weight", "backbone.0.bias", "backbone.3.weight", "backbone.3.bias"}
    tuned = finetune(model, *_support(), steps=5, freeze="backbone")  # a lone string is one pattern
    assert _changed(model, tuned) == {"head.weight", "head.bias"}


def test_unmatched_pattern_lists_the_prefixes():
    with pytest.raises(ConfigError, match=r"'backbone\.9'.*available prefixes: backbone, backbone\.0, .*head"):
        finetune(_model(), *_support(), steps=1, freeze=["backbone.9"])
    with pytest.raises(ConfigError, match="layer_lrs pattern"):
        finetune(_model(), *_support(), steps=1, layer_lrs={"body": 0.1})
    with pytest.raises(ConfigError, match="head pattern"):
        finetune(_model(), *_support(), steps=1, lp_ft=True, head="classifier")
    assert match_parameters(_model(), ["head"]) == {"head": ["head.weight", "head.bias"]}


def test_layer_lrs_become_param_groups():
    model = _model()
    groups = param_groups(model, 0.01, {"backbone": 1e-4, "backbone.3": 1e-3}, frozen=["backbone.0.bias"])
    by_name = {g["name"]: g for g in groups}
    assert {k: g["lr"] for k, g in by_name.items()} == {"backbone": 1e-4, "backbone.3": 1e-3, "default": 0.01}
    ids = {k: {id(p) for p in g["params"]} for k, g in by_name.items()}
    b, h = model.backbone, model.head
    assert ids["backbone.3"] == {id(b[3].weight), id(b[3].bias)}  # the longest pattern wins
    assert ids["backbone"] == {id(b[0].weight), id(b[2].weight), id(b[2].bias)}  # frozen bias left out
    assert ids["default"] == {id(h.weight), id(h.bias)}
    torch.optim.SGD(groups, lr=0.01)  # ready for torch.optim
    with pytest.raises(ConfigError, match="only frozen"):
        param_groups(model, 0.01, {"backbone.0.bias": 1.0}, frozen=["backbone.0.bias"])
    # The groups are what finetune optimises with: a zero rate leaves the backbone as it was.
    tuned = finetune(model, *_support(), steps=5, layer_lrs={"backbone": 0.0})
    assert _changed(model, tuned) == {"head.weight", "head.bias"}


def test_lp_ft_first_trains_only_the_head():
    model = _model()
    probe_only = finetune(model, *_support(), steps=0, lp_ft=True, lp_steps=5)
    assert _changed(model, probe_only) == {"head.weight", "head.bias"}
    full = finetune(model, *_support(), steps=5, lp_ft=True, lp_steps=5)
    assert _changed(model, full) == ALL
    # The fine-tuning stage starts from the probed head: same head after the probe, then it moves on.
    assert not torch.equal(full.head.weight, probe_only.head.weight)
    with pytest.raises(ConfigError, match="steps"):
        finetune(model, *_support(), steps=-1)


def test_finetune_learner_adapts_without_mutating(clusters, small_conv4):
    learner = FineTune(small_conv4, num_base_classes=20, finetune_steps=10, lp_steps=10,
                       freeze=["backbone.features.0"], layer_lrs={"backbone": 1e-3})
    learner.train()
    state = {k: v.clone() for k, v in learner.state_dict().items()}
    episodes = EpisodeSampler(clusters, 5, 1, 3, seed=0).fixed_episodes(6)
    ep = episodes[0]
    first = learner.adapt(ep.support_x, ep.support_y)(ep.query_x)
    assert first.shape == (15, 5) and torch.equal(first, learner.adapt(ep.support_x, ep.support_y)(ep.query_x))
    assert all(torch.equal(state[k], v) for k, v in learner.state_dict().items())
    assert learner.training and all(p.requires_grad for p in learner.parameters())
    assert evaluate(learner, episodes).mean > 20.0  # random init, clusters: the new head alone already separates them


def test_finetune_learner_without_pretraining(small_conv4):
    learner = build_learner({"learner": "finetune", "backbone": "conv4",
                             "backbone_args": {"in_channels": 1, "hidden": 8, "image_size": 16},
                             "learner_args": {"finetune_steps": 2, "freeze": ["backbone.nothing"]}})
    assert learner.head is None and "head.weight" not in learner.state_dict()
    x = torch.randn(4, 1, 16, 16)
    with pytest.raises(ConfigError, match="num_base_classes"):
        learner.loss(metaxfer.Episode(x[None], torch.arange(4)[None], x[None, :0], torch.zeros(1, 0, dtype=torch.long)))
    with pytest.raises(ConfigError, match="available prefixes: backbone, backbone.features"):
        learner.adapt(x, torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ConfigError, match="'linear' or 'cosine'"):
        FineTune(small_conv4, adapt_head="centroid")


# --- augmentation, BatchNorm recalibration, batched feature extraction -----------------------------


def test_flip_and_shift_is_seeded_and_moves_pixels_within_bounds():
    from metaxfer.transfer.finetune import flip_and_shift

    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    aug = flip_and_shift(2)
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    # Each output is a (possibly mirrored) crop of the replicate-padded input: every value comes from its own image.
    for i in range(2):
        assert set(a[i].flatten().tolist()) <= set(x[i].flatten().tolist())
    # Over many draws every shift and both orientations occur; the identity is among them.
    g = torch.Generator().manual_seed(1)
    outs = [aug(x[:1], g) for _ in range(200)]
    assert any(torch.equal(o, x[:1]) for o in outs) and any(torch.equal(o, x[:1].flip(-1)) for o in outs)
    assert torch.equal(flip_and_shift(0, flip=False)(x, g), x)
    rng = torch.get_rng_state()
    aug(x, g)
    assert torch.equal(rng, torch.get_rng_state())
    with pytest.raises(ConfigError, match="max_shift"):
        flip_and_shift(-1)


def test_finetune_applies_augment_to_every_batch_deterministically():
    from metaxfer.transfer.finetune import flip_and_shift

    seen = []

    def record(xb, g):
        seen.append(xb.shape[0])
        return xb + 0.01 * torch.randn(xb.shape, generator=g)

    x, y = _support()
    tuned = finetune(_model(), x, y, steps=4, lp_ft=True, lp_steps=3, batch_size=4, augment=record)
    assert seen == [4] * 7  # both stages
    again = finetune(_model(), x, y, steps=4, lp_ft=True, lp_steps=3, batch_size=4, augment=record)
    plain = finetune(_model(), x, y, steps=4, lp_ft=True, lp_steps=3, batch_size=4)
    assert all(torch.equal(p, q) for p, q in zip(tuned.parameters(), again.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(tuned.parameters(), plain.parameters()))
    images = torch.randn(6, 1, 8, 8)
    conv = BodyHead(nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(4, 3))
    finetune(conv, images, torch.arange(3).repeat(2), steps=2, augment=flip_and_shift(1))  # images [N, C, H, W]


def test_recalibrate_batchnorm_replaces_stale_running_statistics():
    from metaxfer.transfer.finetune import recalibrate_batchnorm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.01))
    x = torch.randn(64, 3) * 5 + 2
    before = net[1].running_mean.clone()
    out = recalibrate_batchnorm(net.eval(), x, batch_size=16)
    assert out is net and not net.training and net[1].momentum == 0.01
    with torch.no_grad():
        h = net[0](x)
    assert not torch.allclose(before, net[1].running_mean)
    torch.testing.assert_close(net[1].running_mean, h.mean(0), rtol=1e-5, atol=1e-5)  # equal batches: exact mean
    # Eval-mode outputs now match train-mode (batch-statistics) outputs on the same data.
    torch.testing.assert_close(net(x), net.train()(x).detach(), rtol=0.2, atol=0.2)
    with pytest.raises(ConfigError, match="batch_size"):
        recalibrate_batchnorm(net, x, batch_size=1)
    plain = nn.Linear(3, 2)
    assert recalibrate_batchnorm(plain, x) is plain


def test_extract_features_batches_without_gradient_in_eval_mode():
    from metaxfer.transfer.heads import extract_features

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).train()
    x = torch.randint(0, 255, (10, 3), dtype=torch.uint8)
    feats = extract_features(net, x, batch_size=3, transform=lambda b: b.float() / 255)
    assert net.training  # mode restored
    assert feats.shape == (10, 4) and not feats.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(feats, net.eval()(x.float() / 255))
    with pytest.raises(ConfigError, match="batch_size"):
        extract_features(net, x, batch_size=0)
