"""FOMAML, ANIL, Meta-SGD and MAML's inner-loop options: each checked against the plain MAML
computation it must reduce to, plus the bad inputs the family must reject with a fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaxfer.backbones import Conv4
from metaxfer.errors import ConfigError, EpisodeError, NonFiniteLossError
from metaxfer.functional import clip_grad_norm, inner_loop
from metaxfer.learners import ANIL, MAML, MetaSGD
from metaxfer.learners.anil import BodyHead
from metaxfer.learners.registry import create_learner
from metaxfer.tasks.episode import Episode

WAYS = 5


def cluster_batch(tasks: int = 3, shots: int = 2, queries: int = 3, dim: int = 8, seed: int = 0,
                  dtype: torch.dtype = torch.float64) -> Episode:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(tasks, WAYS, 1, dim, generator=gen, dtype=dtype) * 1.5

    def draw(per_class: int) -> tuple[Tensor, Tensor]:
        x = centres + 0.3 * torch.randn(tasks, WAYS, per_class, dim, generator=gen, dtype=dtype)
        return x.reshape(tasks, WAYS * per_class, dim), torch.arange(WAYS).repeat_interleave(per_class).repeat(tasks, 1)

    return Episode(*draw(shots), *draw(queries))


def body(dim: int = 8, hidden: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU()).double()


def head(hidden: int = 16) -> nn.Module:
    torch.manual_seed(1)
    return nn.Linear(hidden, WAYS).double()


def grads(learner: nn.Module, batch: Episode, params: list[Tensor] | None = None) -> list[Tensor]:
    return list(torch.autograd.grad(learner.loss(batch), params or list(learner.parameters())))


# --- ANIL --------------------------------------------------------------------------------------


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("vectorize", [True, False])
def test_anil_equals_maml_adapting_only_the_head(first_order: bool, vectorize: bool) -> None:
    """ANIL caches body features; MAML(adapt=["head"]) recomputes the whole model every step.
    Same loss, same meta-gradient for body and head, to float64 precision."""
    batch = cluster_batch()
    anil = ANIL(body(), head(), inner_lr=0.3, inner_steps=2, first_order=first_order, vectorize=vectorize)
    maml = MAML(BodyHead(body(), head()), inner_lr=0.3, inner_steps=2, first_order=first_order, adapt=["head"],
                vectorize=vectorize)
    assert anil.adapted_names == maml.adapted_names == ["head.weight", "head.bias"]
    torch.testing.assert_close(anil.loss(batch), maml.loss(batch), rtol=1e-12, atol=1e-12)
    for a, m in zip(grads(anil, batch), grads(maml, batch)):
        torch.testing.assert_close(a, m, rtol=1e-10, atol=1e-12)
    assert anil.last_metrics.keys() == {"accuracy"}


def test_anil_adapt_changes_only_the_head_and_predicts_like_maml() -> None:
    batch = cluster_batch().task(0)
    anil = ANIL(body(), head(), inner_lr=0.3, inner_steps=1, eval_inner_steps=4)
    maml = MAML(BodyHead(body(), head()), inner_lr=0.3, inner_steps=1, eval_inner_steps=4, adapt=["head"])
    before = {k: v.clone() for k, v in anil.state_dict().items()}
    predict = anil.adapt(batch.support_x, batch.support_y)
    for name, value in anil.model.body.named_parameters():
        torch.testing.assert_close(predict.params["body." + name], value)
    assert not torch.equal(predict.params["head.weight"], anil.model.head.weight)
    torch.testing.assert_close(predict(batch.query_x), maml.adapt(batch.support_x, batch.support_y)(batch.query_x))
    for k, v in anil.state_dict().items():
        assert torch.equal(v, before[k])


def test_anil_from_registry_infers_the_feature_size() -> None:
    learner = create_learner("anil", Conv4(norm="batchnorm_split", image_size=28), ways=5, inner_lr=0.1)
    assert isinstance(learner, ANIL) and learner.model.head.in_features == 64
    with pytest.raises(ConfigError, match="feature_dim"):
        create_learner("anil", nn.Sequential(nn.Linear(4, 4)), ways=5)
    with pytest.raises(ConfigError, match="adapts the head only"):
        ANIL(body(), head(), adapt=["body"])


# --- Meta-SGD ------------------------------------------------------------------------------------


@pytest.mark.parametrize("vectorize", [True, False])
def test_meta_sgd_with_constant_rates_is_maml_and_learns_its_rates(vectorize: bool) -> None:
    batch = cluster_batch()
    model = BodyHead(body(), head())
    meta_sgd = MetaSGD(model, inner_lr=0.3, inner_steps=2, vectorize=vectorize)
    maml = MAML(model, inner_lr=0.3, inner_steps=2, vectorize=vectorize)
    torch.testing.assert_close(meta_sgd.loss(batch), maml.loss(batch), rtol=1e-12, atol=1e-12)
    g = grads(meta_sgd, batch)
    n = len(list(model.parameters()))
    for a, m in zip(g[:n], grads(maml, batch)):  # same meta-gradient for theta
        torch.testing.assert_close(a, m, rtol=1e-10, atol=1e-12)
    alpha_grads = g[n:]
    assert [a.shape for a in alpha_grads] == [p.shape for p in model.parameters()]
    assert all(a.abs().sum() > 0 for a in alpha_grads[:2])

    # d loss / d alpha by central finite differences on one coordinate.
    alpha = meta_sgd.alphas[0]
    eps = 1e-6
    with torch.no_grad():
        alpha[0, 0] += eps
        up = meta_sgd.loss(batch).item()
        alpha[0, 0] -= 2 * eps
        down = meta_sgd.loss(batch).item()
        alpha[0, 0] += eps
    assert alpha_grads[0][0, 0].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9)


def test_meta_sgd_random_init_range_and_bad_input() -> None:
    torch.manual_seed(0)
    learner = MetaSGD(BodyHead(body(), head()), alpha_init_range=(0.005, 0.1))
    values = torch.cat([a.detach().flatten() for a in learner.alphas])
    assert 0.005 <= values.min() and values.max() <= 0.1 and values.std() > 0.01
    with pytest.raises(ConfigError, match="low < high"):
        MetaSGD(BodyHead(body(), head()), alpha_init_range=(0.1, 0.01))
    frozen = BodyHead(body(), head())
    frozen.head.requires_grad_(False)
    with pytest.raises(ConfigError, match="requires_grad=False"):
        MetaSGD(frozen, adapt=["head"])
    with pytest.raises(ConfigError, match="learn_inner_lr"):
        MetaSGD(BodyHead(body(), head()), learn_inner_lr=True)


# --- MAML options -------------------------------------------------------------------------------


def test_learned_per_step_inner_rates_start_as_maml_and_get_gradients() -> None:
    batch = cluster_batch()
    model = BodyHead(body(), head())
    lslr = MAML(model, inner_lr=0.3, inner_steps=2, eval_inner_steps=5, learn_inner_lr=True)
    maml = MAML(model, inner_lr=0.3, inner_steps=2)
    assert lslr.inner_lrs is not None and lslr.inner_lrs.shape == (2, len(list(model.parameters())))
    torch.testing.assert_close(lslr.loss(batch), maml.loss(batch), rtol=1e-12, atol=1e-12)
    rate_grad = torch.autograd.grad(lslr.loss(batch), [lslr.inner_lrs])[0]
    assert rate_grad.shape == (2, 6) and (rate_grad != 0).all()
    # Test-time steps beyond the trained ones reuse the last step's rates.
    with torch.no_grad():
        lslr.inner_lrs[1].fill_(0.0)
    task = batch.task(0)
    start = lslr.adapt(task.support_x, task.support_y).params
    one_step = MAML(model, inner_lr=0.3, inner_steps=1).adapt(task.support_x, task.support_y).params
    for name in start:
        torch.testing.assert_close(start[name], one_step[name])


def test_inner_gradient_clipping_bounds_each_step() -> None:
    batch = cluster_batch().task(0)
    model = BodyHead(body(), head())
    lr, clip = 0.5, 1e-3
    learner = MAML(model, inner_lr=lr, inner_steps=1, inner_grad_clip=clip)
    adapted = learner.adapt(batch.support_x, batch.support_y).params
    moved = torch.sqrt(sum(((adapted[n] - p) ** 2).sum() for n, p in model.named_parameters()))
    assert moved.item() == pytest.approx(lr * clip, rel=1e-4)  # the raw gradient norm is far above clip
    unclipped = MAML(model, inner_lr=lr, inner_steps=1).adapt(batch.support_x, batch.support_y).params
    assert torch.sqrt(sum(((unclipped[n] - p) ** 2).sum() for n, p in model.named_parameters())) > 100 * moved


def test_clip_grad_norm_works_per_task_under_vmap() -> None:
    g = {"a": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}  # norms 5 and 0.5
    out = torch.func.vmap(lambda x: clip_grad_norm({"a": x}, 1.0)["a"])(g["a"])
    torch.testing.assert_close(out.norm(dim=1), torch.tensor([1.0, 0.5]), rtol=1e-5, atol=1e-6)


def test_inner_loop_per_step_rates_and_custom_update_rule() -> None:
    model = nn.Linear(3, 2).double()
    params = dict(model.named_parameters())
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 0, 1])

    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    two = inner_loop(loss, params, x, y, [0.1, 0.2], 2)
    manual = inner_loop(loss, inner_loop(loss, params, x, y, 0.1, 1), x, y, 0.2, 1)
    for k in two:
        torch.testing.assert_close(two[k], manual[k])

    calls = []

    def halve(p, g, value, step, state):
        calls.append((step, state))
        return {k: v - 0.05 * g[k] for k, v in p.items()}, step

    by_rule = inner_loop(loss, params, x, y, None, 2, update=halve)
    by_sgd = inner_loop(loss, params, x, y, 0.05, 2)
    for k in by_rule:
        torch.testing.assert_close(by_rule[k], by_sgd[k])
    assert calls == [(0, None), (1, 0)]
    with pytest.raises(ValueError, match="one per step"):
        inner_loop(loss, params, x, y, [0.1], 2)
    with pytest.raises(ValueError, match="lr"):
        inner_loop(loss, params, x, y, None, 1)


def test_fomaml_registry_name_is_first_order() -> None:
    model = BodyHead(body(), head())
    learner = create_learner("fomaml", model, inner_lr=0.3)
    assert learner.first_order and learner.order == "first"
    with pytest.raises(ConfigError, match="second order"):
        create_learner("fomaml", model, first_order=False)


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["maml", "fomaml", "meta_sgd"])
def test_negative_inner_steps_are_rejected(name: str) -> None:
    with pytest.raises(ConfigError, match="inner_steps"):
        create_learner(name, BodyHead(body(), head()), inner_steps=-1)
    with pytest.raises(ConfigError, match="inner_steps"):
        create_learner("anil", nn.Linear(4, 4), feature_dim=4, inner_steps=2, eval_inner_steps=-3)


def test_integer_parameter_is_rejected_with_the_fix() -> None:
    model = BodyHead(body(), head())
    model.register_parameter("counter", nn.Parameter(torch.zeros(1, dtype=torch.long), requires_grad=False))
    with pytest.raises(ConfigError, match="register_buffer"):
        MAML(model)


def test_nothing_to_adapt_and_unknown_adapt_names() -> None:
    model = BodyHead(body(), head()).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameter"):
        MAML(model)
    with pytest.raises(ConfigError, match="no parameter has that name"):
        MAML(BodyHead(body(), head()), adapt=["classifier"])
    # Every trainable module is named, the head included (the list used to stop after 8 parameters).
    with pytest.raises(ConfigError, match=r"trainable ones are under \['features.0.0', .*'features.3.1', 'head'\]"):
        MAML(Conv4(num_classes=5), adapt=["classifier"])


@pytest.mark.parametrize("logits", [3, 10])
def test_model_output_not_matching_ways(logits: int) -> None:
    torch.manual_seed(0)
    learner = MAML(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, logits)).double())
    with pytest.raises(EpisodeError, match=r"5-way.*\[N, 5\]"):
        learner.loss(cluster_batch())


@pytest.mark.parametrize("vectorize", [True, False])
def test_nan_in_the_inner_loop_names_task_and_step(vectorize: bool) -> None:
    batch = cluster_batch(tasks=4)
    support_x = batch.support_x.clone()
    support_x[2, 0, 0] = float("nan")
    bad = Episode(support_x, *batch[1:])
    learner = MAML(BodyHead(body(), head()), inner_lr=0.3, inner_steps=2, vectorize=vectorize)
    with pytest.raises(NonFiniteLossError, match="task 2 is nan at inner step 0"):
        learner.loss(bad)
    # A step size that makes the loss blow up at step 1 (not 0) is named as such.
    # (Regression: MSE grows without bound, where cross-entropy would saturate.)
    x = batch.support_x
    regression = Episode(x, x.sum(-1, keepdim=True), x, x.sum(-1, keepdim=True))
    big = MAML(nn.Linear(8, 1).double(), inner_lr=1e200, inner_steps=3, vectorize=vectorize, loss_fn=F.mse_loss)
    with pytest.raises(NonFiniteLossError, match=r"task 0 is (nan|inf) at inner step 1"):
        big.loss(regression)
    with pytest.raises(NonFiniteLossError, match="inner step 0"):
        learner.adapt(bad.support_x[2], bad.support_y[2])


@pytest.mark.parametrize("preset", ["omniglot/fomaml_5w1s", "omniglot/anil_5w1s", "omniglot/meta_sgd_5w1s"])
def test_presets_build_and_round_trip_through_save_and_load(preset: str, tmp_path) -> None:
    import metaxfer
    from metaxfer.config import load_config

    cfg = load_config(preset, ["model.backbone_args.hidden=4"])
    learner = metaxfer.build_learner(cfg.model)
    batch = Episode(torch.randn(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1),
                    torch.randn(2, 10, 1, 28, 28), torch.arange(5).repeat(2, 2))
    learner.loss(batch).backward()
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.01 * torch.randn_like(p))  # differ from a fresh build
    loaded = metaxfer.load(metaxfer.save(learner, tmp_path / "model"))
    assert type(loaded) is type(learner)
    for (name, a), (_, b) in zip(learner.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    task = batch.task(0)
    torch.testing.assert_close(loaded.adapt(task.support_x, task.support_y)(task.query_x),
                               learner.adapt(task.support_x, task.support_y)(task.query_x))


def test_default_vectorize_on_cpu_loops_over_wide_convolutions_and_vmaps_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = cluster_batch()
    mlp = MAML(BodyHead(body(), head()), inner_lr=0.3)
    assert mlp.vectorize is None and "vectorize=auto" in repr(mlp)
    conv_batch = Episode(torch.randn(2, 5, 1, 16, 16), torch.arange(5).repeat(2, 1), torch.randn(2, 5, 1, 16, 16),
                         torch.arange(5).repeat(2, 1))
    torch.manual_seed(0)
    wide = MAML(Conv4(hidden=32, num_classes=5, norm="batchnorm_split", image_size=16), inner_lr=0.3)
    want = {"mlp": MAML(mlp.model, inner_lr=0.3, vectorize=True).loss(batch),
            "wide": MAML(wide.model, inner_lr=0.3, vectorize=False).loss(conv_batch)}
    real_vmap, calls = torch.func.vmap, []

    def counting_vmap(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real_vmap(*args, **kwargs)

    monkeypatch.setattr(torch.func, "vmap", counting_vmap)
    torch.testing.assert_close(wide.loss(conv_batch), want["wide"])
    assert not calls, "vmap used on CPU for a model with 32-channel convolutions"
    torch.testing.assert_close(mlp.loss(batch), want["mlp"])
    assert calls, "the per-task loop used on CPU for a model without convolutions"


def test_set_transductive_switches_the_query_batch_norm_policy_or_names_the_learner():
    """ANIL and Meta-SGD take `transductive` through MAML's keyword arguments; set_transductive reaches them and
    changes their predictions. Learners without the choice refuse with a message naming them."""
    from metaxfer.learners.metric import ProtoNet

    batch = cluster_batch(tasks=1).task(0)
    for learner in (ANIL(body(), head(), inner_lr=0.5), MetaSGD(nn.Sequential(body(), head()), inner_lr=0.5)):
        inductive = learner.adapt(batch.support_x, batch.support_y)(batch.query_x)
        learner.set_transductive(True)
        assert learner.transductive
        transductive = learner.adapt(batch.support_x, batch.support_y)(batch.query_x)
        assert not torch.allclose(inductive, transductive)
        learner.set_transductive(False)
        torch.testing.assert_close(learner.adapt(batch.support_x, batch.support_y)(batch.query_x), inductive)
    with pytest.raises(ConfigError, match="ProtoNet has no transductive mode"):
        ProtoNet(body()).set_transductive(True)
