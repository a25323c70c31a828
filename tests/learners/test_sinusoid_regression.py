"""MAML on sinusoid regression (Finn et al. 2017, section 5.1), MSE evaluation, lowest-MSE best
checkpoint in fit, exact resume with the sinusoid sampler, and the sinusoid presets through the CLI."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F

from metaxfer.backbones import MLP
from metaxfer.cli.main import main
from metaxfer.evaluate import EvalResult, evaluate, mean_ci95
from metaxfer.learners.gradient import MAML
from metaxfer.tasks import SinusoidTasks
from metaxfer.train import Checkpoints, fit

fit_module = importlib.import_module("metaxfer.train.fit")  # the module (metaxfer.train.fit is the function)


def maml(hidden=(40, 40), steps=10, inner_steps=1) -> MAML:
    torch.manual_seed(0)
    return MAML(MLP(1, list(hidden), 1), inner_lr=0.01, inner_steps=inner_steps, eval_inner_steps=steps, loss_fn=F.mse_loss)


def test_meta_training_reduces_mse():
    learner = maml()
    val = SinusoidTasks(shots=5, queries=20, split="val").fixed_episodes(40, seed=0)
    before = evaluate(learner, val).mean
    # A tiny budget (about 1.5 s): a larger meta learning rate than the paper's 1e-3, 10 tasks per step.
    opt = torch.optim.Adam(learner.parameters(), 1e-2)
    fit(learner, SinusoidTasks(shots=5, queries=10, seed=0), opt, steps=300, tasks_per_step=10)
    after = evaluate(learner, val)
    assert after.metric == "mse" and after.adapt_steps == 10
    # Untrained: about E[A^2]/2 ~ 4 (4.9 on these tasks); 300 meta-steps bring it to about 1.1.
    assert after.mean < 0.5 * before, (before, after.mean)
    # ... and the meta-learned initialisation gains from its gradient steps.
    no_steps = evaluate(MAML(learner.model, inner_lr=0.01, eval_inner_steps=0, loss_fn=F.mse_loss), val)
    assert after.mean < no_steps.mean


def test_evaluate_reports_mse_for_float_targets():
    learner = maml(hidden=(), steps=0)
    with torch.no_grad():
        for p in learner.parameters():
            p.zero_()  # predicts 0 everywhere: each task's MSE is mean(query_y ** 2)
    episodes = SinusoidTasks(shots=5, queries=6, split="test").fixed_episodes(20, seed=0)
    result = evaluate(learner, episodes, protocol="sinusoid test")
    want = [float((ep.query_y ** 2).mean()) for ep in episodes]
    mean, ci, std = mean_ci95(want)
    assert result.metric == "mse" and not result.higher_is_better and result.score() == pytest.approx(-mean)
    assert result.mean == pytest.approx(mean) and result.ci95 == pytest.approx(ci) and result.std == pytest.approx(std)
    assert result.mses == pytest.approx(want) and result.accuracies == []
    assert (result.n, result.ways, result.shots, result.queries) == (20, None, 5, 6)
    assert result.fingerprint == episodes.fingerprint and result.seed == 0
    assert result.line() == f"mse: {mean:.3f} ± {ci:.3f} (95% CI, 20 tasks, sinusoid test, K=5, 0 steps)"
    record = result.to_dict()
    assert record["metric"] == "mse" and "mses" not in record and "accuracies" not in record
    assert len(result.to_dict(with_accuracies=True)["mses"]) == 20


def fake_validation(monkeypatch, means):
    """Make fit's validation return these MSEs in turn."""
    values = iter(means)

    def fake(learner, episodes, device=None, **_):
        m = next(values)
        return EvalResult(mean=m, ci95=0.1, std=1.0, n=len(episodes), ways=None, shots=5, queries=10,
                          transductive=False, metric="mse", adapt_steps=10)

    monkeypatch.setattr(fit_module, "evaluate", fake)


def test_fit_keeps_the_lowest_mse_checkpoint_across_resume(tmp_path, monkeypatch):
    val = SinusoidTasks(shots=5, queries=10, split="val").fixed_episodes(3)
    learner = maml(hidden=(8,))
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    fake_validation(monkeypatch, [3.0, 1.0, 2.0])
    result = fit(learner, SinusoidTasks(5, 10), opt, 6, 2, val_episodes=val, val_every=2, run_dir=tmp_path,
                 checkpoint_every=2)
    assert result.best_step == 4 and result.best_val.mean == 1.0
    assert Checkpoints(tmp_path).pointer("best").name == "step-00000004"
    assert [r["val_mse"] for r in result.history if "val_mse" in r] == [3.0, 1.0, 2.0]
    # Resumed: 1.5 is worse than the stored best (1.0), 0.5 is better.
    fake_validation(monkeypatch, [1.5, 0.5])
    learner = maml(hidden=(8,))
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    result = fit(learner, SinusoidTasks(5, 10), opt, 10, 2, val_episodes=val, val_every=2, run_dir=tmp_path,
                 checkpoint_every=2)
    assert result.best_step == 10
    fake_validation(monkeypatch, [1.5])
    learner = maml(hidden=(8,))
    fit(learner, SinusoidTasks(5, 10), torch.optim.Adam(learner.parameters(), 1e-3), 12, 2, val_episodes=val,
        val_every=2, run_dir=tmp_path, checkpoint_every=2)
    assert Checkpoints(tmp_path).pointer("best").name == "step-00000010"


def test_fit_resumes_sinusoid_training_exactly(tmp_path):
    def run(steps, where):
        learner = maml(hidden=(8,))
        opt = torch.optim.Adam(learner.parameters(), 1e-2)
        result = fit(learner, SinusoidTasks(5, 10, seed=1), opt, steps, 4, run_dir=where, checkpoint_every=3, log_every=1)
        return [(r["step"], r["loss"]) for r in result.history]

    full = run(9, tmp_path / "a")
    run(6, tmp_path / "b")
    torch.manual_seed(99)
    assert run(9, tmp_path / "b") == full


@pytest.mark.parametrize("preset", ["sinusoid/maml_k5", "sinusoid/pretrained_k10"])
def test_cli_trains_and_evaluates_a_sinusoid_preset(preset, tmp_path, capsys):
    run = tmp_path / "run"
    k = 5 if preset.endswith("k5") else 10
    args = ["train.steps=20", "train.val_every=10", "train.checkpoint_every=10", "train.val_episodes=5",
            "eval.episodes=10", "eval.queries=20"]
    assert main(["train", "--config", preset, "--run-dir", str(run), *args]) == 0
    out = capsys.readouterr().out
    assert f"(95% CI, 10 tasks, sinusoid test, K={k}, 10 steps)" in out and "mse: " in out
    result = json.loads((run / "test_result.json").read_text())
    assert result["metric"] == "mse" and result["n"] == 10 and result["queries"] == 20 and result["ways"] is None
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("val_mse") is not None] == [10, 20]
    assert main(["eval", "--checkpoint", str(run), "--episodes", "7", "--queries", "5", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["metric"] == "mse" and record["n"] == 7 and record["shots"] == k and record["queries"] == 5


def test_cli_lists_sinusoid_presets_and_rejects_ways(tmp_path, capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert all(f"sinusoid/{p}" in out for p in ("maml_k5", "maml_k10", "pretrained_k5", "pretrained_k10"))
    assert main(["train", "--config", "sinusoid/maml_k5", "--run-dir", str(tmp_path), "train.ways=5"]) == 2
    assert "set train.ways=1 and eval.ways=1" in capsys.readouterr().err
