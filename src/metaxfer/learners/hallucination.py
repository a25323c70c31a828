"""Feature hallucination: ProtoNet on a support set augmented by a learned generator.

Wang, Girshick, Hebert & Hariharan, "Low-Shot Learning from Imaginary Data", CVPR 2018
(arXiv:1801.05401), the meta-learning variant with prototypical networks: a "hallucinator"
``G(x, z)`` maps a real seed example ``x`` and a noise vector ``z`` to an extra training
example; the meta-learner (here ProtoNet) is trained on the augmented support set and both
models are optimised jointly, end to end, through the meta-learner's query loss.

Details taken from the paper, as quoted by a public re-implementation
(ckghosted/disentangle-based-hallucination, ``model_hal.py``, class ``HAL_PN_GAN``):
"For our hallucinator G, we use a three layer MLP with ReLU as the activation function" and
"For each class, we use G to generate n_gen additional examples till there are exactly n_aug
examples per class"; that code feeds ``[x, z]`` (z Gaussian) to the MLP and initialises its
layers with identity matrices. The remaining choices here are ours and are said so where made.

The optional conditional-VAE generator (:class:`CVAEHallucinator`, ``generator="cvae"``) is the
"VAE-style generation of extra samples" variant: a CVAE (Sohn, Lee & Yan, NeurIPS 2015) over
backbone features, conditioned on a seed feature of the class, trained by its evidence lower
bound on pairs of same-class features as well as through the query loss; sampling the prior
``z ~ N(0, I)`` replaces the plain noise input.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaxfer.errors import ConfigError
from metaxfer.functional.distances import prototypes, squared_euclidean
from metaxfer.learners.metric import ProtoNet, PrototypePredictor
from metaxfer.learners.registry import register_learner
from metaxfer.learners.support import EvalModule, check_support_classes
from metaxfer.tasks.episode import Episode

__all__ = ["CVAEHallucinator", "HallucinationNet", "Hallucinator", "hallucination"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def draw_members(labels: Tensor, classes: Tensor, ways: int, generator: torch.Generator | None = None) -> Tensor:
    """For each entry of ``classes [M]``, the index of a uniformly drawn example of that class in ``labels [S]``.

    Every class in ``classes`` must occur in ``labels``. One uniform number per entry, from
    ``generator`` (CPU) or, when ``None``, torch's global generator on ``labels``' device.
    """
    device = labels.device
    counts = torch.bincount(labels, minlength=ways)  # [ways]
    u = torch.rand(classes.shape[0], generator=generator, device="cpu" if generator is not None else device)
    size = counts[classes]
    rank = (u.to(device) * size).long().clamp_max(size - 1)  # rank within the class
    order = torch.argsort(labels, stable=True)  # members of class 0, then class 1, ...
    start = torch.cumsum(counts, 0) - counts
    return order[start[classes] + rank]


class Hallucinator(nn.Module):
    """The generator ``G``: ``(seed [M, D], noise [M, noise_dim]) -> hallucinated features [M, D]``.

    A ``layers``-layer MLP on the concatenation ``[seed, noise]`` with ReLU after every
    hidden layer (Wang et al. 2018: three layers, ReLU) and, with ``output_relu``, after
    the last one too, which keeps hallucinations in the range of post-ReLU features
    such as Conv4's.

    Initialisation (our reading of the identity initialisation the re-implementations
    use): the seed block of the first layer and every later layer start as the
    identity, the noise block at zero, biases at zero. For non-negative seeds and
    ``hidden >= feature_dim``, ``G(x, z) = x`` at initialisation: hallucinations
    start as copies of their seeds, so meta-training starts from ProtoNet's
    prototypes, and the noise weights (whose gradient ``g z^T`` is not zero) grow from there.
    Units the identity leaves out (hidden units beyond ``feature_dim``, or
    output units beyond ``hidden``) keep PyTorch's default random
    initialisation so they are not dead ReLUs; with ``hidden >= feature_dim``
    they do not reach the output at initialisation (the next layer's identity drops them).

    Args:
        feature_dim: ``D``, the backbone's feature width.
        noise_dim: width of the Gaussian noise ``z``.
        hidden: width of the hidden layers; ``None`` means ``feature_dim``.
        layers: number of linear layers (>= 1).
        output_relu: apply ReLU to the output (as the paper's MLP); set ``False``
            for backbones whose features can be negative.

    Raises:
        ConfigError: for non-positive sizes.

    Example:
        >>> g = Hallucinator(64, noise_dim=16)
        >>> g(torch.rand(5, 64), torch.randn(5, 16)).shape
        torch.Size([5, 64])
    """

    def __init__(self, feature_dim: int, noise_dim: int, hidden: int | None = None, layers: int = 3,
                 output_relu: bool = True) -> None:
        super().__init__()
        hidden = feature_dim if hidden is None else hidden
        for name, value in (("feature_dim", feature_dim), ("noise_dim", noise_dim), ("hidden", hidden),
                            ("layers", layers)):
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}; set learner_args.{name} "
                                  "to 1 or more")
        self.feature_dim, self.noise_dim, self.hidden, self.output_relu = feature_dim, noise_dim, hidden, output_relu
        widths = [feature_dim + noise_dim] + [hidden] * (layers - 1) + [feature_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(widths))
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                out, fan_in = layer.weight.shape
                seed_in = feature_dim if i == 0 else fan_in
                keep = slice(min(out, seed_in), None)  # rows the identity leaves empty
                rows = layer.weight[keep].clone()
                layer.weight.zero_()
                layer.weight[:, :seed_in] = torch.eye(out, seed_in)
                layer.weight[keep] = rows  # units the identity leaves out stay alive (see docstring)
                layer.bias.zero_()

    def forward(self, seed: Tensor, noise: Tensor) -> Tensor:
        """``seed [M, D]``, ``noise [M, noise_dim]`` -> ``[M, D]``."""
        h = torch.cat([seed, noise], dim=-1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1 or self.output_relu:
                h = torch.relu(h)
        return h


class CVAEHallucinator(nn.Module):
    """A conditional VAE over features; ``G(seed, z)`` decodes a latent ``z ~ N(0, I)`` given a seed feature.

    The conditional variational auto-encoder of Sohn, Lee & Yan (NeurIPS 2015), over a
    backbone's features: the decoder ``p(x | seed, z)`` is a :class:`Hallucinator` MLP
    (identity-initialised on the seed, so it starts by copying it), the encoder
    ``q(z | x, seed)`` a two-layer MLP on ``[x, seed]`` whose output layer starts at zero,
    so that ``q`` starts as the prior ``N(0, I)``. It is trained on pairs ``(x, seed)`` of
    features of the same class by :meth:`elbo_loss`; sampling ``z`` from the prior and
    decoding produces new features of the seed's class (the CVAE view of hallucination;
    Schwartz et al. 2018's Delta-encoder is the same idea with a deterministic bottleneck).

    Args:
        feature_dim: ``D``, the backbone's feature width.
        latent_dim: width of ``z`` (the generator's ``noise_dim``).
        hidden: width of the hidden layers; ``None`` means ``feature_dim``.
        layers: linear layers of the decoder (>= 1).
        output_relu: ReLU on the decoder's output (post-ReLU features such as Conv4's).

    Raises:
        ConfigError: for non-positive sizes.

    Example:
        >>> g = CVAEHallucinator(64, latent_dim=16)
        >>> g(torch.rand(5, 64), torch.randn(5, 16)).shape
        torch.Size([5, 64])
        >>> g.elbo_loss(torch.rand(5, 64), torch.rand(5, 64)).shape
        torch.Size([])
    """

    def __init__(self, feature_dim: int, latent_dim: int, hidden: int | None = None, layers: int = 3,
                 output_relu: bool = True) -> None:
        super().__init__()
        self.decoder = Hallucinator(feature_dim, latent_dim, hidden=hidden, layers=layers, output_relu=output_relu)
        self.feature_dim, self.noise_dim = feature_dim, latent_dim
        width = self.decoder.hidden
        self.encoder = nn.Sequential(nn.Linear(2 * feature_dim, width), nn.ReLU(), nn.Linear(width, 2 * latent_dim))
        with torch.no_grad():
            self.encoder[-1].weight.zero_()
            self.encoder[-1].bias.zero_()

    def forward(self, seed: Tensor, noise: Tensor) -> Tensor:
        """Decode: ``seed [M, D]``, ``noise [M, latent_dim]`` (a draw of ``z``) -> ``[M, D]``."""
        return self.decoder(seed, noise)

    def encode(self, x: Tensor, seed: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior ``q(z | x, seed)``: mean and log-variance, each ``[M, latent_dim]``."""
        mu, logvar = self.encoder(torch.cat([x, seed], dim=-1)).chunk(2, dim=-1)
        return mu, logvar

    def elbo_loss(self, x: Tensor, seed: Tensor) -> Tensor:
        """Negative evidence lower bound per pair, averaged over the ``M`` pairs (a scalar).

        ``||decode(seed, z) - x||^2 / 2`` (unit-variance Gaussian likelihood, constants dropped)
        summed over features, plus ``KL(q(z | x, seed) || N(0, I))`` summed over latent units,
        with one reparameterised draw ``z = mu + sigma * eps`` (Kingma & Welling 2014) from
        torch's global generator.

        Args:
            x: ``[M, D]`` features to reconstruct.
            seed: ``[M, D]`` features of the same classes (the condition).
        """
        mu, logvar = self.encode(x, seed)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        reconstruction = 0.5 * (self.decoder(seed, z) - x).pow(2).sum(-1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)
        return (reconstruction + kl).mean()


class HallucinationNet(ProtoNet):
    """ProtoNet with feature hallucination (Wang, Girshick, Hebert & Hariharan, CVPR 2018).

    For each class of a task, ``n_hallucinated`` extra support features are
    generated: each from a real support feature of that class chosen uniformly
    at random (the seed) and Gaussian noise ``z ~ N(0, noise_std^2 I)``, by the
    generator ``G(seed, z)``. Prototypes are the means over the real and the
    hallucinated features of each class (Snell et al. 2017, eq. 1, on the
    augmented set), queries are classified by softmax over negative squared
    Euclidean distances, exactly as :class:`~metaxfer.learners.metric.ProtoNet`.
    The backbone and ``G`` are meta-trained jointly through the query
    cross-entropy (the paper's meta-learning variant with prototypical
    networks); gradients reach the backbone both directly and through the
    seeds. No adversarial or reconstruction loss: as in the paper, ``G`` is
    trained only to make the classifier better, not to make realistic features.

    With ``generator="cvae"`` (:class:`CVAEHallucinator`), ``G`` is a conditional VAE's
    decoder and the noise its latent ``z``; each task's loss adds ``vae_weight`` times
    the negative ELBO of pairs (query feature, a support feature of the query's
    class drawn uniformly), so ``G`` also learns to produce features distributed
    like the class's real ones. The pairs' features are detached: the ELBO
    trains the VAE only, because letting it reach the backbone would reward
    features that are easy to reconstruct (in the limit, all equal), which the
    classifier must not pay for.

    With ``n_hallucinated = 0`` the learner is ProtoNet: the same loss, logits,
    gradients and random-number use (``G`` is never called and its parameters
    get no gradients), so the preset with ``n_hallucinated = 0``, or the
    ProtoNet preset with the same backbone and budget, is the controlled comparison.

    Not transductive: hallucinations depend only on the support set and the
    noise, and each query is classified alone. No inner-loop gradients (``order = None``).

    Randomness: during training the seeds and noise are drawn from torch's
    global generator (on the features' device), which :func:`metaxfer.fit`
    checkpoints, so resumed runs repeat exactly. ``adapt`` draws them from a
    private CPU generator seeded by its ``seed`` argument: a predictor is a
    deterministic function of ``(support set, seed)``, the same on every device
    and every call, and adapting never touches the global generator nor
    mutates the learner. Different seeds give (slightly) different predictors;
    that is the only stochasticity of evaluation.

    Args:
        backbone: any module mapping ``[N, *x_shape]`` to ``[N, D]`` features.
        n_hallucinated: hallucinated features per class (the paper's
            ``n_gen``); 0 gives plain ProtoNet.
        noise_dim: width of the noise vector ``z``.
        noise_std: standard deviation of ``z``.
        feature_dim: ``D``; read from ``backbone.out_features`` when omitted.
        hidden: hidden width of the default generator (``None``: ``D``).
        layers: linear layers of the default generator (the paper's 3).
        output_relu: ReLU on the default generator's output (see :class:`Hallucinator`).
        generator: ``"mlp"`` (:class:`Hallucinator`, the paper's), ``"cvae"``
            (:class:`CVAEHallucinator`; keep ``noise_std = 1``, the prior's) or
            a module ``(seed [M, D], noise [M, noise_dim]) -> [M, D]`` (then
            ``hidden``, ``layers`` and ``output_relu`` are unused and
            ``metaxfer.load`` cannot rebuild it; a module with an
            ``elbo_loss(x, seed)`` method gets the VAE term).
        vae_weight: weight of the VAE term for generators that have one (>= 0; 0 trains
            a CVAE through the query loss alone).

    Shapes:
        ``loss(batch)``: ``support_x [T, ways*shots, *x_shape]``, ``query_x [T, ways*queries, *x_shape]``.
        ``adapt(support_x [S, *x_shape], support_y [S], seed)`` returns ``query_x [Q, *x_shape] -> logits [Q, ways]``.

    BatchNorm: as ProtoNet (training uses each task's support and query
    statistics; ``adapt`` and the predictor run the backbone in ``eval()`` mode).

    Raises:
        ConfigError: negative ``n_hallucinated``, ``noise_dim <= 0``, negative
            ``noise_std``, an unknown generator name, a negative ``vae_weight``, an
            unknown feature width, or (when called) a generator whose output
            width differs from the backbone's features.
        EpisodeError: a class ``0 .. ways-1`` without a support example.

    Example:
        >>> learner = HallucinationNet(metaxfer.backbones.create("conv4", in_channels=1), n_hallucinated=5)
        >>> loss = learner.loss(sampler.sample_batch(1))
        >>> predict = learner.adapt(support_x, support_y, seed=0)
        >>> predict(query_x).argmax(-1)
    """

    def __init__(self, backbone: nn.Module, n_hallucinated: int = 5, noise_dim: int = 64, noise_std: float = 1.0,
                 feature_dim: int | None = None, hidden: int | None = None, layers: int = 3,
                 output_relu: bool = True, generator: nn.Module | str | None = "mlp",
                 vae_weight: float = 1.0) -> None:
        super().__init__(backbone)
        if not _is_int(n_hallucinated) or n_hallucinated < 0:
            raise ConfigError(f"n_hallucinated must be an integer >= 0 (hallucinated features per class), got "
                              f"{n_hallucinated!r}; set learner_args.n_hallucinated to 0 (plain ProtoNet) or more")
        if not _is_int(noise_dim) or noise_dim <= 0:
            raise ConfigError(f"noise_dim must be a positive integer (width of the generator's noise input), got "
                              f"{noise_dim!r}; set learner_args.noise_dim to 1 or more, e.g. the feature width")
        if not isinstance(noise_std, (int, float)) or isinstance(noise_std, bool) or not noise_std >= 0 \
                or noise_std == float("inf"):
            raise ConfigError(f"noise_std must be a finite number >= 0, got {noise_std!r}; set learner_args.noise_std "
                              "to e.g. 1.0 (the paper's N(0, I))")
        if not isinstance(vae_weight, (int, float)) or isinstance(vae_weight, bool) or not vae_weight >= 0 \
                or vae_weight == float("inf"):
            raise ConfigError(f"vae_weight must be a finite number >= 0, got {vae_weight!r}; set learner_args.vae_weight "
                              "to e.g. 1.0")
        self.n_hallucinated, self.noise_dim, self.noise_std = n_hallucinated, noise_dim, float(noise_std)
        self.vae_weight = float(vae_weight)
        self._vae_losses: list[float] = []
        kinds = {None: Hallucinator, "mlp": Hallucinator, "cvae": CVAEHallucinator}
        if not isinstance(generator, nn.Module):
            if not isinstance(generator, str | None) or generator not in kinds:
                raise ConfigError(f"unknown generator {generator!r}; set learner_args.generator to 'mlp' (Wang et al. "
                                  "2018's MLP hallucinator) or 'cvae' (a conditional VAE)")
            dim = feature_dim if feature_dim is not None else getattr(backbone, "out_features", None)
            if not _is_int(dim) or dim <= 0:
                raise ConfigError(
                    "the hallucinator needs the feature width: pass learner_args.feature_dim (the backbone's output "
                    f"features, 64 for conv4 on 28x28 images); the backbone {type(backbone).__name__} has no out_features"
                )
            # Built under a forked RNG: the generator's initialisation consumes no global random numbers, so a
            # run with this learner draws exactly the numbers a ProtoNet run with the same seed draws
            # (identical when n_hallucinated = 0).
            with torch.random.fork_rng(devices=[]):
                generator = kinds[generator](dim, noise_dim, hidden=hidden, layers=layers, output_relu=output_relu)
        self.generator = generator

    def _check_width(self, features: Tensor) -> None:
        want = getattr(self.generator, "feature_dim", None)
        if isinstance(self.generator, Hallucinator | CVAEHallucinator) and features.shape[-1] != want:
            raise ConfigError(
                f"the backbone outputs features of shape {tuple(features.shape)} but the generator was built for "
                f"feature_dim={want} (it takes [M, {want}] seeds and returns [M, {want}] features); set "
                f"learner_args.feature_dim to {features.shape[-1]}"
            )

    def hallucinate(self, support: Tensor, support_y: Tensor, ways: int,
                    generator: torch.Generator | None = None) -> Tensor:
        """``n_hallucinated`` generated features per class, ``[ways * n_hallucinated, D]``, class-major.

        Row ``c * n + j`` is ``G(support[i], z)`` for a support example ``i`` of
        class ``c`` drawn uniformly (with replacement) and ``z ~ N(0, noise_std^2 I)``.

        Args:
            support: ``[S, D]`` real support features.
            support_y: ``[S]`` labels in ``0 .. ways-1`` (every class present).
            ways: number of classes.
            generator: where the seeds and noise come from; ``None`` uses
                torch's global generator on ``support``'s device, a
                :class:`torch.Generator` (CPU) makes the draw reproducible on any device.

        Raises:
            ConfigError: when the generator's output shape differs from ``[ways * n_hallucinated, D]``.
        """
        n, device = self.n_hallucinated, support.device
        self._check_width(support)
        where = "cpu" if generator is not None else device
        classes = torch.arange(ways, device=device).repeat_interleave(n)
        seeds = support[draw_members(support_y, classes, ways, generator)]  # [ways * n, D]
        noise = torch.randn(ways * n, self.noise_dim, generator=generator, device=where).to(device=device,
                                                                                        dtype=support.dtype)
        fake = self.generator(seeds, noise * self.noise_std)
        if fake.shape != seeds.shape:
            raise ConfigError(
                f"the generator returned features of shape {tuple(fake.shape)} but the backbone's support features "
                f"have shape {tuple(support.shape)}, so hallucinations must have shape {tuple(seeds.shape)}; give the "
                f"generator an output width of {support.shape[-1]} (or set learner_args.feature_dim to it)"
            )
        return fake

    def augment(self, support: Tensor, support_y: Tensor, ways: int,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The support set with the hallucinations appended: ``([S + ways*n, D], [S + ways*n])``.

        With ``n_hallucinated = 0`` returns ``(support, support_y)`` unchanged and draws no random numbers.
        """
        if self.n_hallucinated == 0:
            return support, support_y
        fake = self.hallucinate(support, support_y, ways, generator)
        fake_y = torch.arange(ways, device=support_y.device).repeat_interleave(self.n_hallucinated)
        return torch.cat([support, fake]), torch.cat([support_y, fake_y])

    def _features_and_logits(self, support_x: Tensor, support_y: Tensor,
                             query_x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s = support_x.shape[0]
        z = self.backbone(torch.cat([support_x, query_x]))
        ways = int(support_y.max().item()) + 1  # ProtoNet.loss has checked every class has a support example
        feats, labels = self.augment(z[:s], support_y, ways)
        return z[:s], z[s:], -squared_euclidean(z[s:], prototypes(feats, labels, ways))

    def task_logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Logits ``[Q, ways]`` of one task against the augmented prototypes, differentiable.

        One backbone pass over ``cat([support_x, query_x])`` (as ProtoNet); the
        hallucinations are generated from the support features in the same graph.
        """
        return self._features_and_logits(support_x, support_y, query_x)[2]

    def task_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                  query_y: Tensor) -> tuple[Tensor, Tensor]:
        """Query cross-entropy, plus ``vae_weight`` times the generator's ELBO loss when it has one.

        The ELBO's pairs are (each query feature, a support feature of its class
        drawn uniformly), both detached (see the class docstring).
        """
        support, query, logits = self._features_and_logits(support_x, support_y, query_x)
        loss = F.cross_entropy(logits, query_y)
        elbo = getattr(self.generator, "elbo_loss", None)
        if elbo is not None and self.n_hallucinated > 0 and self.vae_weight > 0:
            ways = logits.shape[-1]
            seeds = support[draw_members(support_y, query_y, ways)]
            vae = elbo(query.detach(), seeds.detach())
            self._vae_losses.append(vae.item())
            loss = loss + self.vae_weight * vae
        return loss, logits

    def loss(self, batch: Episode) -> Tensor:
        """Mean over tasks of :meth:`task_loss`; ``last_metrics`` adds ``vae_loss`` for a VAE generator."""
        self._vae_losses = []
        loss = super().loss(batch)
        if self._vae_losses:
            self.last_metrics["vae_loss"] = sum(self._vae_losses) / len(self._vae_losses)
        return loss

    @torch.no_grad()
    def adapt(self, support_x: Tensor, support_y: Tensor, seed: int = 0) -> PrototypePredictor:
        """Prototypes of one task's real + hallucinated support features; no parameter or global RNG changes.

        Args:
            support_x: ``[S, *x_shape]``.
            support_y: ``[S]`` labels ``0 .. ways-1``.
            seed: seeds the private generator of the hallucinations' seeds and
                noise; the same seed gives the same predictor on every call and device.

        Returns:
            A predictor ``query_x [Q, *x_shape] -> logits [Q, ways]``.
        """
        ways = check_support_classes(support_y)
        rng = torch.Generator().manual_seed(int(seed))
        modes = [(m, m.training) for m in (self.backbone, self.generator)]
        for module, _ in modes:
            module.eval()
        try:
            feats, labels = self.augment(self.backbone(support_x), support_y, ways, rng)
            protos = prototypes(feats, labels, ways)
        finally:
            for module, was_training in modes:
                module.train(was_training)
        return PrototypePredictor(EvalModule(self.backbone), protos)


@register_learner("hallucination")
def hallucination(backbone: nn.Module, n_hallucinated: int = 5, noise_dim: int = 64, noise_std: float = 1.0,
                  feature_dim: int | None = None, hidden: int | None = None, layers: int = 3,
                  output_relu: bool = True, generator: str = "mlp", vae_weight: float = 1.0) -> HallucinationNet:
    """ProtoNet with feature hallucination around ``backbone`` (see :class:`HallucinationNet`)."""
    return HallucinationNet(backbone, n_hallucinated=n_hallucinated, noise_dim=noise_dim, noise_std=noise_std,
                            feature_dim=feature_dim, hidden=hidden, layers=layers, output_relu=output_relu,
                            generator=generator, vae_weight=vae_weight)
