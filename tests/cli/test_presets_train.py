"""Every packaged preset trains on its real data through the CLI (two steps, then a tiny evaluation).

Catches presets whose keys, learner arguments or episode sizes no longer fit the code. Slow: the
Omniglot presets need the real files (skipped where the machine has none) and some learners are
heavy per step (MAML's 32 second-order tasks), so meta-batches are cut to 2 tasks.
"""

from __future__ import annotations

import json

import pytest

from metaxfer.cli.main import main
from metaxfer.config import list_presets, load_config

PRESETS = list_presets()


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_two_steps_and_evaluates(preset: str, tmp_path, capsys, request) -> None:
    cfg = load_config(preset)
    overrides = ["train.steps=2", "train.val_every=2", "train.val_episodes=2", "train.checkpoint_every=2",
                 "eval.episodes=3", f"train.tasks_per_step={min(cfg.train.tasks_per_step, 2)}"]
    if cfg.data.dataset == "omniglot":
        overrides.append(f"data.root={request.getfixturevalue('omniglot_root')}")
    run = tmp_path / "run"
    command = ["train", "--config", preset, "--run-dir", str(run)]
    if cfg.model.learner == "distill":  # needs a teacher: its preset, trained for two steps first
        teacher = tmp_path / "teacher"
        assert main(["train", "--config", "omniglot/baseline_pp_resnet12_5w1s", "--run-dir", str(teacher),
                     "--no-test", *overrides]) == 0, capsys.readouterr().err
        command = ["distill", "--config", preset, "--teacher", str(teacher), "--run-dir", str(run)]
    assert main([*command, *overrides]) == 0, capsys.readouterr().err
    result = json.loads((run / "test_result.json").read_text())
    assert result["n"] == 3
    assert "95% CI, 3 " in capsys.readouterr().out
