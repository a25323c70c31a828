import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaxfer import ProtoNet, build_learner
from metaxfer.errors import ConfigError, EpisodeError
from metaxfer.learners import LEARNERS, HallucinationNet
from metaxfer.learners.hallucination import CVAEHallucinator, Hallucinator, draw_members
from metaxfer.tasks import Episode, EpisodeSampler


def twin_learners(backbone: nn.Module, **kwargs) -> tuple[ProtoNet, HallucinationNet]:
    """A ProtoNet and a HallucinationNet sharing nothing but identical backbone weights."""
    return ProtoNet(copy.deepcopy(backbone)), HallucinationNet(copy.deepcopy(backbone), **kwargs)


def test_registered_and_built_from_a_config() -> None:
    assert "hallucination" in LEARNERS
    learner = build_learner({"learner": "hallucination", "learner_args": {"n_hallucinated": 3, "noise_dim": 8},
                             "backbone": "conv4", "backbone_args": {"in_channels": 1, "hidden": 4, "image_size": 16}})
    assert isinstance(learner, HallucinationNet)
    assert learner.generator.feature_dim == 4 and learner.generator.noise_dim == 8
    assert learner.transductive is False and learner.order is None


def test_generator_shapes_and_identity_initialisation() -> None:
    g = Hallucinator(6, noise_dim=3)
    seeds = torch.rand(10, 6)  # non-negative, like post-ReLU features
    out = g(seeds, torch.randn(10, 3))
    assert out.shape == (10, 6)
    assert torch.equal(out, seeds)  # hallucinations start as copies of their seeds
    assert torch.allclose(Hallucinator(6, 3, hidden=9)(seeds, torch.randn(10, 3)), seeds)
    assert len(g.layers) == 3  # the paper's three-layer MLP


def test_hallucinate_and_augment_shapes(clusters, small_conv4) -> None:
    learner = HallucinationNet(small_conv4, n_hallucinated=3, noise_dim=5)
    ep = EpisodeSampler(clusters, 4, 2, 3, seed=0).sample()
    z = learner.backbone(ep.support_x)  # [8, 8]
    fake = learner.hallucinate(z, ep.support_y, 4)
    assert fake.shape == (12, 8)
    feats, labels = learner.augment(z, ep.support_y, 4)
    assert feats.shape == (8 + 12, 8)
    assert torch.equal(labels, torch.cat([ep.support_y, torch.arange(4).repeat_interleave(3)]))
    logits = learner.task_logits(ep.support_x, ep.support_y, ep.query_x)
    assert logits.shape == (12, 4)
    assert learner.adapt(ep.support_x, ep.support_y)(ep.query_x).shape == (12, 4)


def test_zero_hallucinations_is_exactly_protonet(clusters, small_conv4) -> None:
    proto, hall = twin_learners(small_conv4, n_hallucinated=0)
    batch = EpisodeSampler(clusters, 5, 2, 3, seed=0).sample_batch(2)
    state = torch.get_rng_state()
    loss_p = proto.loss(batch)
    loss_h = hall.loss(batch)
    assert torch.equal(loss_p, loss_h)
    assert torch.equal(torch.get_rng_state(), state)  # neither drew a random number
    loss_p.backward()
    loss_h.backward()
    for (name, a), b in zip(proto.backbone.named_parameters(), hall.backbone.parameters()):
        assert torch.equal(a.grad, b.grad), name
    assert all(p.grad is None for p in hall.generator.parameters())
    ep = batch.task(0)
    assert torch.equal(proto.task_logits(ep.support_x, ep.support_y, ep.query_x),
                       hall.task_logits(ep.support_x, ep.support_y, ep.query_x))
    assert torch.equal(proto.adapt(ep.support_x, ep.support_y)(ep.query_x),
                       hall.adapt(ep.support_x, ep.support_y, seed=3)(ep.query_x))


def test_zero_hallucinations_trains_exactly_like_protonet(clusters, small_conv4) -> None:
    proto = ProtoNet(copy.deepcopy(small_conv4))
    state = torch.get_rng_state()
    hall = HallucinationNet(copy.deepcopy(small_conv4), n_hallucinated=0)  # the generator's init draws no numbers
    assert torch.equal(torch.get_rng_state(), state)
    weights = []
    for learner in (proto, hall):
        sampler = EpisodeSampler(clusters, 5, 1, 3, seed=0)
        opt = torch.optim.Adam(learner.parameters(), 1e-2)
        for _ in range(3):
            opt.zero_grad()
            learner.loss(sampler.sample_batch(1)).backward()
            opt.step()
        weights.append(learner.backbone.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


class ShiftGenerator(nn.Module):
    """``G(x, z) = x + 10 + z[:, :1]``: easy to check by hand."""

    def forward(self, seed: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return seed + 10.0 + noise[:, :1]


def test_hallucinated_features_enter_the_prototypes_by_hand() -> None:
    torch.manual_seed(0)
    backbone = nn.Linear(4, 3)
    learner = HallucinationNet(backbone, n_hallucinated=2, noise_dim=2, noise_std=0.5, generator=ShiftGenerator())
    sx, sy = torch.randn(4, 4), torch.tensor([0, 0, 1, 1])
    qx, qy = torch.randn(3, 4), torch.tensor([0, 1, 1])
    # Replay the generator draws of hallucinate(): uniform seed ranks, then the noise.
    g = torch.Generator().manual_seed(7)
    u = torch.rand(2, 2, generator=g)
    noise = 0.5 * torch.randn(4, 2, generator=g)
    zs, zq = backbone(sx).detach(), backbone(qx).detach()
    members = [[0, 1], [2, 3]]
    protos = []
    for c in range(2):
        fakes = [zs[members[c][int(u[c, j] * 2)]] + 10.0 + noise[c * 2 + j, 0] for j in range(2)]
        protos.append((zs[members[c]].sum(0) + sum(fakes)) / 4)  # 2 real + 2 hallucinated
    protos = torch.stack(protos)
    expected = -((zq[:, None, :] - protos[None]) ** 2).sum(-1)
    logits = learner.adapt(sx, sy, seed=7)(qx)
    assert torch.allclose(logits, expected, atol=1e-4)
    # Without the hallucinations the prototypes (and logits) differ: they were really used.
    plain = ProtoNet(backbone).adapt(sx, sy)(qx)
    assert not torch.allclose(plain, logits, atol=1e-2)
    # The training loss uses the same augmented prototypes (global generator, replayed).
    torch.manual_seed(11)
    loss = learner.loss(Episode(sx, sy, qx, qy).batch())
    torch.manual_seed(11)
    u = torch.rand(2, 2)
    noise = 0.5 * torch.randn(4, 2)
    zs, zq = backbone(sx), backbone(qx)
    protos = torch.stack([
        (zs[members[c]].sum(0) + sum(zs[members[c][int(u[c, j] * 2)]] + 10.0 + noise[c * 2 + j, 0] for j in range(2))) / 4
        for c in range(2)
    ])
    assert torch.allclose(loss, F.cross_entropy(-((zq[:, None, :] - protos[None]) ** 2).sum(-1), qy), atol=1e-5)


def test_seeds_come_from_their_own_class() -> None:
    learner = HallucinationNet(nn.Identity(), n_hallucinated=50, noise_dim=1, noise_std=0.0, feature_dim=2,
                               output_relu=False)
    support = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 5.0], [0.0, 7.0], [0.0, 9.0]])
    y = torch.tensor([0, 0, 1, 1, 1])
    fake = learner.hallucinate(support, y, 2, torch.Generator().manual_seed(0))  # identity G, no noise: the seeds
    assert set(map(tuple, fake[:50].tolist())) == {(1.0, 0.0), (2.0, 0.0)}  # every class-0 example used
    assert set(map(tuple, fake[50:].tolist())) == {(0.0, 5.0), (0.0, 7.0), (0.0, 9.0)}


def test_gradients_reach_the_generator(clusters, small_conv4) -> None:
    learner = HallucinationNet(small_conv4, n_hallucinated=3, noise_dim=4)
    learner.loss(EpisodeSampler(clusters, 5, 1, 3, seed=0).sample_batch(2)).backward()
    for name, p in learner.generator.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    first = learner.generator.layers[0].weight.grad
    assert first[:, 8:].abs().sum() > 0  # the noise weights (zero at init) get a gradient
    assert sum(p.grad.abs().sum() for p in learner.generator.parameters()) > 0
    assert all(p.grad is not None for p in learner.backbone.parameters())


def test_adapt_is_deterministic_given_seed_and_pure(clusters, small_conv4) -> None:
    learner = HallucinationNet(small_conv4, n_hallucinated=4, noise_dim=4, noise_std=1.0)
    with torch.no_grad():  # make the noise matter (it has zero weight at initialisation)
        learner.generator.layers[0].weight[:, 8:].normal_()
    learner.train()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    ep = EpisodeSampler(clusters, 5, 1, 4, seed=0).sample()
    rng = torch.get_rng_state()
    a = learner.adapt(ep.support_x, ep.support_y, seed=1)
    b = learner.adapt(ep.support_x, ep.support_y, seed=1)
    c = learner.adapt(ep.support_x, ep.support_y, seed=2)
    assert torch.equal(torch.get_rng_state(), rng)  # the global generator is untouched
    assert torch.equal(a.prototypes, b.prototypes)
    assert not torch.allclose(a.prototypes, c.prototypes)
    assert torch.equal(learner.adapt(ep.support_x, ep.support_y).prototypes,
                       learner.adapt(ep.support_x, ep.support_y, seed=0).prototypes)
    # Not transductive: a query's logits do not depend on the other queries.
    alone = a(ep.query_x[:1])
    other = a(torch.cat([ep.query_x[:1], torch.randn(7, 1, 16, 16) * 5]))
    assert torch.allclose(a(ep.query_x)[:1], alone, atol=1e-5) and torch.allclose(alone, other[:1], atol=1e-5)
    after = learner.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats untouched too
    assert learner.training and learner.backbone.training and learner.generator.training


def test_learns_gaussian_clusters(clusters, small_conv4, meta_train) -> None:
    torch.manual_seed(0)
    learner = HallucinationNet(small_conv4, n_hallucinated=3, noise_dim=4)
    sampler = EpisodeSampler(clusters, 5, 1, 5, seed=0)
    losses = meta_train(learner, sampler)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert 0.0 <= learner.last_metrics["accuracy"] <= 1.0
    test = EpisodeSampler(clusters, 5, 1, 5, seed=1).fixed_episodes(10, seed=1)
    from metaxfer import evaluate

    assert evaluate(learner, test).mean > 60.0  # chance is 20 %


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_n_hallucinated(bad) -> None:
    with pytest.raises(ConfigError, match=r"n_hallucinated must be an integer >= 0.*learner_args.n_hallucinated"):
        HallucinationNet(nn.Linear(4, 3), n_hallucinated=bad)


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_noise_dim(bad) -> None:
    with pytest.raises(ConfigError, match=r"noise_dim must be a positive integer.*learner_args.noise_dim"):
        HallucinationNet(nn.Linear(4, 3), noise_dim=bad)


def test_bad_noise_std_and_unknown_width() -> None:
    with pytest.raises(ConfigError, match=r"noise_std must be a finite number >= 0"):
        HallucinationNet(nn.Linear(4, 3), noise_std=-1.0)
    with pytest.raises(ConfigError, match=r"pass learner_args.feature_dim"):
        HallucinationNet(nn.Identity())


def test_generator_width_not_matching_the_backbone_names_both_shapes() -> None:
    learner = HallucinationNet(nn.Linear(4, 3), n_hallucinated=2, noise_dim=2, feature_dim=5)
    batch = Episode(torch.randn(2, 4), torch.tensor([0, 1]), torch.randn(2, 4), torch.tensor([0, 1])).batch()
    with pytest.raises(ConfigError, match=r"shape \(2, 3\).*feature_dim=5.*\[M, 5\].*feature_dim to 3"):
        learner.loss(batch)

    class Wide(nn.Module):
        def forward(self, seed: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
            return torch.cat([seed, noise], -1)

    learner = HallucinationNet(nn.Linear(4, 3), n_hallucinated=2, noise_dim=2, generator=Wide())
    with pytest.raises(ConfigError, match=r"shape \(4, 5\).*shape \(2, 3\).*output width of 3"):
        learner.adapt(torch.randn(2, 4), torch.tensor([0, 1]))


def test_rejects_a_support_set_missing_a_class() -> None:
    learner = HallucinationNet(nn.Linear(4, 3), n_hallucinated=2)
    batch = Episode(torch.randn(1, 3, 4), torch.tensor([[0, 0, 2]]), torch.randn(1, 3, 4), torch.tensor([[0, 1, 2]]))
    with pytest.raises(EpisodeError, match=r"no example of class\(es\) \[1\]"):
        learner.loss(batch)
    with pytest.raises(EpisodeError, match=r"no example of class\(es\) \[1\]"):
        learner.adapt(torch.randn(3, 4), torch.tensor([0, 2, 2]))


def test_save_and_load_roundtrip(tmp_path, clusters) -> None:
    import metaxfer

    learner = build_learner({"learner": "hallucination", "learner_args": {"n_hallucinated": 2, "noise_dim": 3},
                             "backbone": "conv4", "backbone_args": {"in_channels": 1, "hidden": 4, "image_size": 16}})
    with torch.no_grad():
        learner.generator.layers[0].weight.add_(0.1)
    metaxfer.save(learner, tmp_path / "m")
    loaded = metaxfer.load(tmp_path / "m")
    ep = EpisodeSampler(clusters, 3, 1, 2, seed=0).sample()
    assert torch.equal(learner.adapt(ep.support_x, ep.support_y, seed=5)(ep.query_x),
                       loaded.adapt(ep.support_x, ep.support_y, seed=5)(ep.query_x))


def test_draw_members_picks_each_class_uniformly() -> None:
    labels = torch.tensor([2, 0, 1, 0, 2, 2])
    classes = torch.tensor([0, 1, 2]).repeat(2000)
    idx = draw_members(labels, classes, 3, torch.Generator().manual_seed(0))
    assert torch.equal(labels[idx], classes)
    counts = torch.bincount(idx, minlength=6).float()
    # class 0 has members 1 and 3 (2000 draws), class 2 has 0, 4 and 5: every member gets its share
    assert torch.allclose(counts[[1, 3]], torch.full((2,), 1000.0), rtol=0.1)
    assert torch.allclose(counts[[0, 4, 5]], torch.full((3,), 2000 / 3), rtol=0.1)
    assert counts[2] == 2000


def test_cvae_starts_as_seed_copy_with_the_prior_as_posterior() -> None:
    g = CVAEHallucinator(6, latent_dim=3)
    seed, x = torch.rand(10, 6), torch.rand(10, 6)
    assert torch.equal(g(seed, torch.randn(10, 3)), seed)
    mu, logvar = g.encode(x, seed)
    assert mu.shape == logvar.shape == (10, 3)
    assert torch.equal(mu, torch.zeros(10, 3)) and torch.equal(logvar, torch.zeros(10, 3))
    # KL(N(0, I) || N(0, I)) = 0 and the decoder ignores z at first: the loss is the reconstruction alone
    assert torch.allclose(g.elbo_loss(x, seed), 0.5 * (seed - x).pow(2).sum(-1).mean())


def test_cvae_elbo_matches_torch_distributions() -> None:
    g = CVAEHallucinator(5, latent_dim=4, output_relu=False)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.3 * torch.randn_like(p))
    seed, x = torch.randn(7, 5), torch.randn(7, 5)
    torch.manual_seed(3)
    loss = g.elbo_loss(x, seed)
    torch.manual_seed(3)
    mu, logvar = g.encode(x, seed)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    z = q.rsample()
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(-1)
    reconstruction = 0.5 * (g(seed, z) - x).pow(2).sum(-1)
    assert torch.allclose(loss, (reconstruction + kl).mean(), atol=1e-6)


def test_cvae_learns_to_generate_features_of_the_seeds_class() -> None:
    torch.manual_seed(0)
    centres = 3.0 * torch.randn(4, 8)
    g = CVAEHallucinator(8, latent_dim=2, hidden=32, output_relu=False)
    opt = torch.optim.Adam(g.parameters(), 1e-2)

    def pairs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 4, (n,))
        return centres[y] + 0.3 * torch.randn(n, 8), centres[y] + 0.3 * torch.randn(n, 8), y

    first = None
    for _ in range(300):
        x, seed, _ = pairs(64)
        loss = g.elbo_loss(x, seed)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    _, seed, y = pairs(200)
    with torch.no_grad():
        fake = g(seed, torch.randn(200, 2))
    nearest = torch.cdist(fake, centres).argmin(-1)
    assert (nearest == y).float().mean() > 0.95  # samples land on their seed's class


def test_cvae_generator_from_a_config_adds_its_elbo_without_touching_the_backbone(clusters, small_conv4) -> None:
    learner = build_learner({"learner": "hallucination",
                             "learner_args": {"n_hallucinated": 2, "noise_dim": 3, "generator": "cvae"},
                             "backbone": "conv4", "backbone_args": {"in_channels": 1, "hidden": 8, "image_size": 16}})
    assert isinstance(learner.generator, CVAEHallucinator) and learner.generator.noise_dim == 3
    plain = copy.deepcopy(learner)
    plain.vae_weight = 0.0
    batch = EpisodeSampler(clusters, 4, 1, 3, seed=0).sample_batch(1)
    grads = []
    for model in (learner, plain):
        torch.manual_seed(1)
        model.loss(batch).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert learner.last_metrics["vae_loss"] > 0 and "vae_loss" not in plain.last_metrics
    for name, grad in grads[0].items():
        if name.startswith("backbone."):  # the ELBO's features are detached: the backbone sees the query loss alone
            assert torch.equal(grad, grads[1][name]), name
    encoder = [n for n in grads[0] if n.startswith("generator.encoder.")]
    assert encoder and all(grads[0][n] is not None and grads[1][n] is None for n in encoder)


def test_cvae_roundtrip_and_learning(tmp_path, clusters, small_conv4, meta_train) -> None:
    import metaxfer
    from metaxfer import evaluate

    torch.manual_seed(0)
    learner = HallucinationNet(small_conv4, n_hallucinated=3, noise_dim=4, generator="cvae")
    test = EpisodeSampler(clusters, 5, 1, 5, seed=1).fixed_episodes(10, seed=1)
    before = evaluate(learner, test).mean
    meta_train(learner, EpisodeSampler(clusters, 5, 1, 5, seed=0))  # the loss includes the ELBO, whose scale moves
    after = evaluate(learner, test).mean
    assert after > 60.0 and after > before + 10.0, (before, after)  # chance is 20 %
    learner_copy = build_learner({"learner": "hallucination",
                                  "learner_args": {"n_hallucinated": 3, "noise_dim": 4, "generator": "cvae"},
                                  "backbone": "conv4", "backbone_args": {"in_channels": 1, "hidden": 8,
                                                                         "image_size": 16}})
    learner_copy.load_state_dict(learner.state_dict())
    metaxfer.save(learner_copy, tmp_path / "m")
    loaded = metaxfer.load(tmp_path / "m")
    ep = test[0]
    assert torch.equal(learner.adapt(ep.support_x, ep.support_y, seed=2)(ep.query_x),
                       loaded.adapt(ep.support_x, ep.support_y, seed=2)(ep.query_x))


@pytest.mark.parametrize("kwargs, message", [
    ({"generator": "gan"}, r"unknown generator 'gan'.*'mlp'.*'cvae'"),
    ({"vae_weight": -1.0}, r"vae_weight must be a finite number >= 0.*learner_args.vae_weight"),
])
def test_bad_generator_options(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        HallucinationNet(nn.Linear(4, 3), feature_dim=3, **kwargs)
