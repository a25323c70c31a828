"""LSTM meta-learner (Ravi & Larochelle 2017): the preprocessing formula, the cell update reducing
to SGD, coordinate-wise sharing, meta-gradients reaching the meta-learner, vmap = loop, adaptation
that leaves the learner untouched, learning a synthetic task; configs, presets, save/load."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import metaxfer
from metaxfer.config import load_config
from metaxfer.errors import ConfigError
from metaxfer.functional.update_rules import log_sign_preprocess
from metaxfer.learners.gradient import MAML
from metaxfer.learners.lstm_meta import LSTMMetaLearner, MetaLSTMUpdate
from metaxfer.learners.registry import create_learner
from metaxfer.tasks.episode import Episode

WAYS = 5


def cluster_batch(tasks: int, shots: int, queries: int, dim: int = 16, noise: float = 0.3, seed: int = 0,
                  dtype: torch.dtype = torch.float64) -> Episode:
    """Gaussian class clusters in ``R^dim``, new random centres for every task."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(tasks, WAYS, 1, dim, generator=gen, dtype=dtype) * 1.5

    def draw(per_class: int) -> tuple[Tensor, Tensor]:
        x = centres + noise * torch.randn(tasks, WAYS, per_class, dim, generator=gen, dtype=dtype)
        return x.reshape(tasks, WAYS * per_class, dim), torch.arange(WAYS).repeat_interleave(per_class).repeat(tasks, 1)

    return Episode(*draw(shots), *draw(queries))


def mlp(dim: int = 16, hidden: int = 32, dtype: torch.dtype = torch.float64) -> nn.Module:
    model = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, WAYS))
    return model.to(dtype)


def meta_params(learner: LSTMMetaLearner) -> int:
    return sum(p.numel() for p in learner.meta_optimizer.parameters())


# --- the update rule -------------------------------------------------------------------------


def test_preprocessing_follows_the_formula_on_both_branches() -> None:
    p = 10.0
    threshold = math.exp(-p)
    x = torch.tensor([3.0, -0.5, 1e-3, threshold, -2 * threshold, 0.5 * threshold, -1e-7, 0.0], dtype=torch.float64)
    out = log_sign_preprocess(x, p)
    assert out.shape == (8, 2)
    for value, (a, b) in zip(x.tolist(), out.tolist()):
        if abs(value) >= threshold:
            assert a == pytest.approx(math.log(abs(value)) / p) and b == math.copysign(1.0, value), value
        else:
            assert a == -1.0 and b == pytest.approx(math.exp(p) * value), value
    # Scalars (the loss) give [2]; gradients stay finite at 0, where the log branch is discarded.
    assert log_sign_preprocess(torch.tensor(2.0)).shape == (2,)
    z = torch.zeros(3, requires_grad=True)
    log_sign_preprocess(z).sum().backward()
    assert torch.isfinite(z.grad).all()


def test_forget_gate_one_and_constant_input_gate_is_sgd() -> None:
    lr, steps = 0.1, 4
    model = mlp()
    learner = LSTMMetaLearner(model, inner_steps=steps).double()
    rule = learner.meta_optimizer
    with torch.no_grad():
        rule.w_forget.zero_()
        rule.b_forget.fill_(60.0)  # sigmoid(60) == 1.0 in float64
        rule.w_input.zero_()
        rule.b_input.fill_(math.log(lr / (1 - lr)))  # sigmoid(b) == lr
    task = cluster_batch(tasks=1, shots=3, queries=2, seed=1).task(0)
    adapted = learner.adapt(task.support_x, task.support_y).params
    sgd = MAML(model, inner_lr=lr, inner_steps=steps, first_order=True).adapt(task.support_x, task.support_y).params
    for k in sgd:
        torch.testing.assert_close(adapted[k], sgd[k], rtol=1e-12, atol=1e-12, msg=k)
    assert (adapted["3.weight"] - model[3].weight).abs().max() > 1e-3  # the steps did move the weights


def test_gates_are_shared_across_coordinates() -> None:
    small = LSTMMetaLearner(mlp(hidden=4))
    large = LSTMMetaLearner(mlp(hidden=256))
    # 4*20*(4 + 20 + 1) first-layer LSTM weights, 2 * (20 + 2) gate weights and 2 gate biases.
    assert meta_params(small) == meta_params(large) == 4 * 20 * (4 + 20 + 1) + 2 * 22 + 2
    assert sum(p.numel() for p in large.parameters()) - meta_params(large) == sum(p.numel() for p in large.model.parameters())


def test_initial_gates_are_near_one_and_small() -> None:
    rule = MetaLSTMUpdate()
    assert 4.0 <= rule.b_forget.item() <= 6.0 and -5.0 <= rule.b_input.item() <= -4.0
    params, state = rule({"w": torch.randn(50)}, {"w": torch.randn(50)}, torch.tensor(1.5), 0, None)
    assert params["w"].shape == (50,)
    assert (state.forget > 0.97).all() and (state.input < 0.03).all() and (state.input > 0).all()


# --- meta-gradients --------------------------------------------------------------------------


def test_meta_gradient_reaches_the_lstm_and_the_initialisation() -> None:
    learner = LSTMMetaLearner(mlp(), inner_steps=3).double()
    learner.loss(cluster_batch(tasks=2, shots=2, queries=3, seed=2)).backward()
    for name, p in learner.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no meta-gradient reaches {name}"


def test_vmapped_tasks_equal_the_per_task_loop() -> None:
    model = mlp()
    torch.manual_seed(0)
    vmapped = LSTMMetaLearner(model, inner_steps=3, vectorize=True, task_chunk=2).double()
    looped = LSTMMetaLearner(model, inner_steps=3, vectorize=False).double()
    looped.meta_optimizer.load_state_dict(vmapped.meta_optimizer.state_dict())
    batch = cluster_batch(tasks=3, shots=2, queries=2, seed=3)
    ga = torch.autograd.grad(vmapped.loss(batch), list(vmapped.parameters()))
    gb = torch.autograd.grad(looped.loss(batch), list(looped.parameters()))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert vmapped.last_metrics == looped.last_metrics and set(vmapped.last_metrics) == {"accuracy"}


# --- adaptation and learning -----------------------------------------------------------------


def test_adapt_and_predict_do_not_mutate_the_learner() -> None:
    learner = LSTMMetaLearner(mlp(), inner_steps=2, eval_inner_steps=5).double()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    task = cluster_batch(tasks=1, shots=2, queries=4, seed=5).task(0)
    predictor = learner.adapt(task.support_x, task.support_y)
    logits = predictor(task.query_x)
    assert logits.shape == (task.query_x.shape[0], WAYS) and not logits.requires_grad
    for k, v in learner.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in learner.parameters())
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(1.0)
    torch.testing.assert_close(predictor(task.query_x), logits)
    torch.testing.assert_close(predictor(task.query_x[:1]), logits[:1])  # support statistics: not transductive


def test_meta_training_improves_held_out_tasks() -> None:
    learner = LSTMMetaLearner(mlp(dtype=torch.float32), inner_steps=5)
    optimiser = torch.optim.Adam(learner.parameters(), lr=1e-2)
    held_out = cluster_batch(tasks=16, shots=5, queries=5, seed=100, dtype=torch.float32)
    with torch.no_grad():
        start = learner.loss(held_out).item()
        start_acc = learner.last_metrics["accuracy"]
    for step in range(25):
        optimiser.zero_grad()
        learner.loss(cluster_batch(tasks=4, shots=5, queries=5, seed=step, dtype=torch.float32)).backward()
        optimiser.step()
    with torch.no_grad():
        end = learner.loss(held_out).item()
        end_acc = learner.last_metrics["accuracy"]
    assert end < 0.6 * start and end_acc > max(start_acc + 0.2, 0.8), (start, end, start_acc, end_acc)


# --- configuration, registry, presets, save / load --------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"inner_steps": -1}, "inner_steps and eval_inner_steps must be >= 0"),
        ({"eval_inner_steps": -1}, "inner_steps and eval_inner_steps must be >= 0"),
        ({"hidden": 0}, "hidden must be a positive"),
        ({"p": 0.0}, "preprocessing scale p must be positive"),
        ({"task_chunk": 0}, "task_chunk must be a positive"),
    ],
)
def test_bad_configuration_raises_config_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LSTMMetaLearner(mlp(), **kwargs)


def test_build_from_config_dict_and_save_load_roundtrip(tmp_path) -> None:
    spec = {"learner": "lstm_meta", "backbone": "conv4", "backbone_args": {"hidden": 8, "image_size": 16, "num_classes": WAYS},
            "learner_args": {"inner_steps": 3, "eval_inner_steps": 4, "hidden": 10}}
    learner = metaxfer.build_learner(spec)
    assert isinstance(learner, LSTMMetaLearner) and learner.order == "first" and not learner.transductive
    assert learner.meta_optimizer.hidden == 10 and learner.eval_inner_steps == 4
    with torch.no_grad():
        learner.meta_optimizer.b_input.add_(1.0)
    metaxfer.save(learner, tmp_path / "m")
    loaded = metaxfer.load(tmp_path / "m")
    assert isinstance(loaded, LSTMMetaLearner) and loaded.inner_steps == 3
    assert learner.state_dict().keys() == loaded.state_dict().keys()
    for (k, a), (_, b) in zip(learner.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ConfigError, match="inner_steps and eval_inner_steps must be >= 0"):
        metaxfer.build_learner({**spec, "learner_args": {"inner_steps": -1}})
    assert isinstance(create_learner("lstm_meta", mlp(), loss="mse"), LSTMMetaLearner)


def test_omniglot_preset_builds() -> None:
    cfg = load_config("omniglot/lstm_meta_5w5s")
    learner = metaxfer.build_learner(cfg.model)
    assert isinstance(learner, LSTMMetaLearner) and learner.meta_optimizer.hidden == 20
    assert (cfg.train.ways, cfg.train.shots, cfg.eval.ways, cfg.eval.shots) == (5, 5, 5, 5)
    x = torch.randn(25, 1, 28, 28)
    assert learner.adapt(x, torch.arange(WAYS).repeat_interleave(5))(x[:3]).shape == (3, WAYS)
