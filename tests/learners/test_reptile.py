"""Reptile (Nichol et al. 2018): the surrogate loss makes one SGD step the interpolation toward the
adapted weights; vmapped = per-task loop; batched = mean of serial; adaptation leaves the learner
untouched; it learns synthetic tasks through fit(); configs, presets and save/load."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import metaxfer
from metaxfer.config import load_config
from metaxfer.errors import ConfigError
from metaxfer.evaluate import evaluate
from metaxfer.functional.inner_loop import inner_loop
from metaxfer.functional.update_rules import AdamUpdate
from metaxfer.learners.registry import create_learner
from metaxfer.learners.reptile import Reptile
from metaxfer.tasks import EpisodeSampler
from metaxfer.tasks.episode import Episode
from metaxfer.train import fit

WAYS = 5


def cluster_batch(tasks: int, shots: int, queries: int, dim: int = 16, noise: float = 0.3, seed: int = 0) -> Episode:
    """Gaussian class clusters in ``R^dim``, new random centres for every task (float64)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(tasks, WAYS, 1, dim, generator=gen, dtype=torch.float64) * 1.5

    def draw(per_class: int) -> tuple[Tensor, Tensor]:
        x = centres + noise * torch.randn(tasks, WAYS, per_class, dim, generator=gen, dtype=torch.float64)
        return x.reshape(tasks, WAYS * per_class, dim), torch.arange(WAYS).repeat_interleave(per_class).repeat(tasks, 1)

    return Episode(*draw(shots), *draw(queries))


def mlp(dim: int = 16, hidden: int = 32) -> nn.Module:
    # No bias before BatchNorm: its gradient is zero up to rounding, which Adam would blow up to +-lr steps.
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, WAYS)).double()


def flat_grads(learner: Reptile, batch: Episode) -> list[Tensor]:
    return list(torch.autograd.grad(learner.loss(batch), list(learner.parameters())))


# --- the outer step --------------------------------------------------------------------------


@pytest.mark.parametrize("inner_optimizer,inner_lr", [("sgd", 0.3), ("adam", 0.05)])
def test_one_sgd_step_with_lr_eps_is_the_reptile_interpolation(inner_optimizer: str, inner_lr: float) -> None:
    eps = 0.3
    learner = Reptile(mlp(), inner_lr=inner_lr, inner_steps=3, inner_optimizer=inner_optimizer)
    batch = cluster_batch(tasks=3, shots=2, queries=3)
    theta = {k: p.detach().clone() for k, p in learner.model.named_parameters()}
    # phi_t computed independently, one task at a time, through the public adapt().
    phis = [learner.adapt(*batch.task(t)[:2]).params for t in range(batch.num_tasks)]
    expected = {k: theta[k] + eps * (torch.stack([phi[k] for phi in phis]).mean(0) - theta[k]) for k in theta}

    optimiser = torch.optim.SGD(learner.parameters(), lr=eps)
    learner.loss(batch).backward()
    optimiser.step()
    for k, p in learner.model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[k], rtol=1e-10, atol=1e-12, msg=k)
        assert not torch.equal(p.detach(), theta[k]), f"{k} did not move"


def test_surrogate_value_is_half_the_squared_step() -> None:
    learner = Reptile(mlp(), inner_lr=0.3, inner_steps=2, inner_optimizer="sgd")
    batch = cluster_batch(tasks=2, shots=2, queries=1, seed=1)
    loss = learner.loss(batch)
    grads = flat_grads(learner, batch)
    assert loss.item() == pytest.approx(0.5 * sum((g**2).sum().item() for g in grads), rel=1e-10)


def test_vmapped_tasks_equal_the_per_task_loop() -> None:
    model = mlp()
    batch = cluster_batch(tasks=4, shots=2, queries=3, seed=2)
    vmapped = Reptile(model, inner_lr=0.05, inner_steps=3, vectorize=True, task_chunk=3)  # chunks of 3 + 1 tasks
    looped = Reptile(model, inner_lr=0.05, inner_steps=3, vectorize=False)
    for a, b in zip(flat_grads(vmapped, batch), flat_grads(looped, batch)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert vmapped.last_metrics == looped.last_metrics and set(vmapped.last_metrics) == {"accuracy"}


def test_batched_step_is_the_mean_of_serial_steps() -> None:
    learner = Reptile(mlp(), inner_lr=0.05, inner_steps=3)
    batch = cluster_batch(tasks=3, shots=2, queries=2, seed=3)
    batched = flat_grads(learner, batch)
    serial = [flat_grads(learner, batch.task(t)) for t in range(batch.num_tasks)]  # tasks_per_step = 1
    for i, g in enumerate(batched):
        torch.testing.assert_close(g, torch.stack([s[i] for s in serial]).mean(0), rtol=1e-9, atol=1e-12)


def test_support_plus_query_adapts_on_the_union() -> None:
    model = mlp()
    batch = cluster_batch(tasks=1, shots=1, queries=3, seed=4)
    union = Reptile(model, inner_lr=0.3, inner_steps=2, inner_optimizer="sgd", inner_data="support+query")
    support = Reptile(model, inner_lr=0.3, inner_steps=2, inner_optimizer="sgd")
    task = batch.task(0)
    phi = union.adapt(torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])).params
    theta = dict(model.named_parameters())
    expected = [theta[k].detach() - phi[k] for k, _ in model.named_parameters()]
    for g, e in zip(flat_grads(union, batch), expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(flat_grads(support, batch)[0], expected[0])


def test_inner_minibatches_take_each_support_example_once_per_epoch() -> None:
    model = mlp()
    batch = cluster_batch(tasks=2, shots=4, queries=2, seed=6)  # 20 support examples per task, class by class
    # 4 SGD steps of 5 = one epoch; checked against a per-step reference on the order the learner drew
    # (same seed), and against the full batch, which must differ.
    learner = Reptile(model, inner_lr=0.3, inner_steps=4, inner_optimizer="sgd", inner_batch_size=5)
    torch.manual_seed(0)
    grads = flat_grads(learner, batch)
    torch.manual_seed(0)
    from metaxfer.learners.reptile import _shuffle_support

    shuffled = _shuffle_support(batch.batch())
    for t in range(2):
        order_y = shuffled.support_y[t]
        assert sorted(order_y.tolist()) == sorted(batch.support_y[t].tolist())
        assert any(len(set(order_y[i : i + 5].tolist())) > 1 for i in range(0, 20, 5)), "minibatches of one class"
    theta = {k: p.detach() for k, p in model.named_parameters()}
    phis = []
    for t in range(2):
        phi = theta
        for step in range(4):
            window = slice(5 * step, 5 * step + 5)
            phi, _ = learner._adapt_params(phi, {}, shuffled.support_x[t, window], shuffled.support_y[t, window], 1)
        phis.append(phi)
    for g, (k, _) in zip(grads, model.named_parameters()):
        torch.testing.assert_close(g, theta[k] - torch.stack([phi[k] for phi in phis]).mean(0), rtol=1e-9, atol=1e-12)
    full = Reptile(model, inner_lr=0.3, inner_steps=4, inner_optimizer="sgd")
    assert not torch.allclose(flat_grads(full, batch)[0], grads[0])
    # adapt() (evaluation) always uses the whole support set.
    task = batch.task(0)
    for k, v in learner.adapt(task.support_x, task.support_y).params.items():
        torch.testing.assert_close(v, full.adapt(task.support_x, task.support_y).params[k], rtol=0, atol=0)


def test_frozen_parameters_get_no_gradient_and_stay() -> None:
    model = mlp()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    learner = Reptile(model, inner_lr=0.3, inner_steps=2, inner_optimizer="sgd")
    learner.loss(cluster_batch(tasks=2, shots=1, queries=1)).backward()
    assert model[0].weight.grad is None and model[3].weight.grad is not None
    assert model[3].weight.grad.abs().sum() > 0 and torch.equal(model[0].weight, frozen)


# --- adaptation -----------------------------------------------------------------------------


def test_adapt_and_predict_do_not_mutate_the_learner() -> None:
    learner = Reptile(mlp(), inner_lr=0.05, inner_steps=2, eval_inner_steps=7)
    learner.train()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    task = cluster_batch(tasks=1, shots=2, queries=4, seed=5).task(0)
    predictor = learner.adapt(task.support_x, task.support_y)
    logits = predictor(task.query_x)
    assert logits.shape == (task.query_x.shape[0], WAYS) and not logits.requires_grad
    for k, v in learner.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in learner.parameters())
    # The predictor owns its weights: training the learner afterwards does not change its predictions.
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(1.0)
    torch.testing.assert_close(predictor(task.query_x), logits)
    # Queries are normalised with support statistics: one query alone gets the same logits.
    torch.testing.assert_close(predictor(task.query_x[:1]), logits[:1])


def test_reptile_learns_synthetic_classes_through_fit(clusters) -> None:
    """A few Reptile steps (plain SGD, eps = 1) give an initialisation that adapts better to unseen classes."""
    from metaxfer.data.synthetic import ClusterImages

    spec = {"learner": "reptile", "backbone": "conv4",
            "backbone_args": {"in_channels": 1, "hidden": 8, "image_size": 16, "num_classes": WAYS},
            "learner_args": {"inner_lr": 0.1, "inner_steps": 5, "eval_inner_steps": 10, "inner_optimizer": "sgd"}}
    learner = metaxfer.build_learner(spec)
    val = ClusterImages("val", num_classes=20, per_class=10, image_size=16, noise=0.5)
    episodes = EpisodeSampler(val, WAYS, 1, 5, seed=1).fixed_episodes(20, seed=1)
    before = evaluate(learner, episodes).mean
    optimiser = torch.optim.SGD(learner.parameters(), lr=1.0)
    result = fit(learner, EpisodeSampler(clusters, WAYS, 5, 5, seed=0), optimiser, 25, 4, log_every=5)
    after = evaluate(learner, episodes).mean
    assert result.history[-1]["accuracy"] is not None
    assert after > 90.0 and after > before + 8.0, (before, after)


# --- the inner Adam ---------------------------------------------------------------------------


def test_inner_adam_rule_matches_torch_adam() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    target = torch.randn(6, generator=gen, dtype=torch.float64)
    w0 = torch.randn(3, dtype=torch.float64, generator=gen)

    def loss(w: Tensor) -> Tensor:
        return ((a @ w - target) ** 2).mean()

    rule, params, state = AdamUpdate(0.1, betas=(0.0, 0.999), eps=1e-8), {"w": w0.clone()}, None
    w = w0.clone().requires_grad_(True)
    reference = torch.optim.Adam([w], lr=0.1, betas=(0.0, 0.999), eps=1e-8)
    for step in range(4):
        g = torch.func.grad(lambda p: loss(p["w"]))(params)
        params, state = rule(params, g, loss(params["w"]), step, state)
        reference.zero_grad()
        loss(w).backward()
        reference.step()
        torch.testing.assert_close(params["w"], w.detach(), rtol=1e-12, atol=1e-12)


def test_inner_adam_continued_from_its_state_equals_one_longer_run() -> None:
    gen = torch.Generator().manual_seed(1)
    a, target = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    rule, w0 = AdamUpdate(0.1, betas=(0.5, 0.9)), {"w": torch.randn(3, generator=gen, dtype=torch.float64)}

    def loss(p: dict, x: Tensor, y: Tensor) -> Tensor:
        return ((x @ p["w"] - y) ** 2).mean()

    straight, state5 = inner_loop(loss, w0, a, target, None, 5, update=rule, return_state=True)
    part, state3 = inner_loop(loss, w0, a, target, None, 3, update=rule, return_state=True)
    resumed, state = inner_loop(loss, part, a, target, None, 2, update=rule, update_state=state3, return_state=True)
    torch.testing.assert_close(resumed["w"], straight["w"], rtol=1e-12, atol=1e-12)
    assert int(state["t"]) == int(state5["t"]) == 5
    fresh = inner_loop(loss, part, a, target, None, 2, update=rule)  # a fresh state restarts the bias correction
    assert not torch.allclose(fresh["w"], straight["w"])


@pytest.mark.parametrize("vectorize", [True, False])
def test_persistent_inner_adam_state_is_the_mean_of_the_tasks_final_moments(vectorize: bool) -> None:
    model = mlp()
    learner = Reptile(model, inner_lr=0.05, inner_steps=2, persistent_inner_state=True, vectorize=vectorize,
                      adam_betas=(0.0, 0.99)).double()
    theta = {k: p.detach().clone() for k, p in model.named_parameters()}
    state = AdamUpdate.initial_state(theta)
    for call, seed in enumerate((7, 8)):
        batch = cluster_batch(tasks=3, shots=2, queries=2, seed=seed)
        grads = flat_grads(learner, batch)
        finals, phis = [], []
        for t in range(3):  # reference: each task from the stored state, by the rule itself
            task = batch.task(t)
            phi, final = learner._adapt_params(theta, {}, task.support_x, task.support_y, 2, state=state)
            phis.append(phi)
            finals.append(final)
        for g, (k, _) in zip(grads, model.named_parameters()):
            torch.testing.assert_close(g, theta[k] - torch.stack([phi[k] for phi in phis]).mean(0), rtol=1e-9, atol=1e-12)
        state = {m: {k: torch.stack([f[m][k] for f in finals]).mean(0) for k in theta} for m in ("m", "v")}
        state["t"] = torch.tensor(2.0 * (call + 1), dtype=torch.float64)
        stored = learner.inner_state.get()
        assert float(stored["t"]) == 2 * (call + 1)
        for m in ("m", "v"):
            for k in theta:
                torch.testing.assert_close(stored[m][k], state[m][k], rtol=1e-12, atol=1e-15)
    assert float(state["v"]["0.weight"].abs().sum()) > 0


def test_persistent_state_is_used_but_not_changed_by_adapt_and_is_saved(tmp_path) -> None:
    model = mlp()
    learner = Reptile(model, inner_lr=0.05, inner_steps=2, eval_inner_steps=3, persistent_inner_state=True).double()
    reset = Reptile(model, inner_lr=0.05, inner_steps=2, eval_inner_steps=3).double()
    learner.loss(cluster_batch(tasks=2, shots=2, queries=2, seed=3))
    before = {k: v.clone() for k, v in learner.inner_state.state_dict().items()}
    task = cluster_batch(tasks=1, shots=2, queries=2, seed=4).task(0)
    adapted = learner.adapt(task.support_x, task.support_y).params
    for k, v in learner.inner_state.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert float(before["t"]) == 2.0
    assert not torch.allclose(adapted["0.weight"], reset.adapt(task.support_x, task.support_y).params["0.weight"])
    assert any(k.startswith("inner_state.v__") for k in learner.state_dict())
    spec = {"learner": "reptile", "backbone": "conv4", "backbone_args": {"hidden": 8, "image_size": 16, "num_classes": WAYS},
            "learner_args": {"persistent_inner_state": True}}
    built = metaxfer.build_learner(spec)
    built.loss(Episode(torch.randn(2, 5, 1, 16, 16), torch.arange(5).repeat(2, 1),
                       torch.randn(2, 5, 1, 16, 16), torch.arange(5).repeat(2, 1)))
    metaxfer.save(built, tmp_path / "m")
    loaded = metaxfer.load(tmp_path / "m")
    assert loaded.persistent_inner_state and float(loaded.inner_state.t) == float(built.inner_state.t) == 5.0
    for k, v in built.inner_state.state_dict().items():
        assert torch.equal(v, loaded.inner_state.state_dict()[k]), k


# --- configuration, registry, presets, save / load --------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"inner_steps": -1}, "inner_steps and eval_inner_steps must be >= 0"),
        ({"eval_inner_steps": -2}, "inner_steps and eval_inner_steps must be >= 0"),
        ({"inner_optimizer": "rmsprop"}, "inner_optimizer must be one of"),
        ({"inner_data": "query"}, "inner_data must be one of"),
        ({"inner_lr": 0.0}, "inner_lr must be positive"),
        ({"adam_betas": (1.0, 0.999)}, "Adam betas must lie in"),
        ({"task_chunk": 0}, "task_chunk must be a positive"),
        ({"inner_batch_size": 0}, "inner_batch_size must be a positive integer"),
        ({"inner_batch_size": 2.5}, "inner_batch_size must be a positive integer"),
        ({"inner_batch_size": 10, "inner_data": "support+query"}, "use inner_data='support'"),
        ({"persistent_inner_state": True, "inner_optimizer": "sgd"}, "use inner_optimizer='adam'"),
    ],
)
def test_bad_configuration_raises_config_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Reptile(mlp(), **kwargs)


def test_build_from_config_dict_and_save_load_roundtrip(tmp_path) -> None:
    spec = {"learner": "reptile", "backbone": "conv4", "backbone_args": {"hidden": 8, "image_size": 16, "num_classes": WAYS},
            "learner_args": {"inner_lr": 0.002, "inner_steps": 4, "eval_inner_steps": 9, "adam_betas": [0.0, 0.99]}}
    learner = metaxfer.build_learner(spec)
    assert isinstance(learner, Reptile) and learner.order == "first" and not learner.transductive
    assert (learner.inner_steps, learner.eval_inner_steps, learner.adam_betas) == (4, 9, (0.0, 0.99))
    with torch.no_grad():
        next(learner.parameters()).add_(1.0)
    metaxfer.save(learner, tmp_path / "m")
    loaded = metaxfer.load(tmp_path / "m")
    assert isinstance(loaded, Reptile) and loaded.eval_inner_steps == 9 and loaded.inner_lr == 0.002
    for (k, a), (_, b) in zip(learner.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ConfigError, match="bad learner_args {'inner_stepz': 3} for 'reptile': learner 'reptile' takes no argument 'inner_stepz'"):
        metaxfer.build_learner({**spec, "learner_args": {"inner_stepz": 3}})
    assert isinstance(create_learner("reptile", mlp(), loss="mse"), Reptile)


def test_omniglot_preset_builds_with_the_paper_settings() -> None:
    cfg = load_config("omniglot/reptile_5w1s")
    learner = metaxfer.build_learner(cfg.model)
    assert isinstance(learner, Reptile)
    assert (learner.inner_steps, learner.eval_inner_steps, learner.inner_optimizer, learner.inner_lr) == (5, 50, "adam", 1e-3)
    assert learner.persistent_inner_state and learner.inner_batch_size == 10
    assert learner.adam_betas[0] == 0.0 and cfg.train.tasks_per_step == 5 and cfg.train.steps == 100000
    assert learner.inner_batch_size == 10 and cfg.train.shots == 10  # 5 steps of 10 = one epoch of 50
    assert (cfg.eval.ways, cfg.eval.shots) == (5, 1)


def test_preset_outer_step_is_plain_sgd_annealed_linearly_to_zero() -> None:
    from metaxfer.build import build_optimizer, build_scheduler

    cfg = load_config("omniglot/reptile_5w1s", ["train.steps=4"])
    param = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([param], cfg.train)
    sched = build_scheduler(opt, cfg.train)
    assert opt.param_groups[0]["momentum"] == 0.0
    rates = []
    for _ in range(4):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates == pytest.approx([1.0, 0.75, 0.5, 0.25]) and opt.param_groups[0]["lr"] == 0.0
    with pytest.raises(ConfigError, match="lr_schedule"):
        build_scheduler(opt, load_config("omniglot/reptile_5w1s", ["train.lr_schedule=cosine"]).train)
