import json

import pytest

from metaxfer.cli.main import main

CLUSTERS = [
    "model.backbone_args={in_channels: 1, hidden: 8, image_size: 16}",
    "data.dataset=clusters",
    "data.args={num_classes: 12, per_class: 10, image_size: 16}",
    "train.ways=5", "train.shots=1", "train.queries=3", "train.steps=6", "train.val_every=3",
    "train.val_episodes=4", "train.checkpoint_every=3", "train.lr_decay_every=0",
    "eval.ways=5", "eval.episodes=10", "eval.queries=3",
]


def test_configs_lists_presets(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "omniglot/protonet_5w1s" in out and "omniglot/maml_5w1s" in out
    assert main(["configs", "--show", "omniglot/maml_5w1s"]) == 0
    assert "learner: maml" in capsys.readouterr().out


def test_train_then_eval(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", "omniglot/protonet_5w1s", "--run-dir", str(run), *CLUSTERS]) == 0
    out = capsys.readouterr().out
    assert "accuracy:" in out and "(95% CI, 10 episodes, clusters test, 5-way 1-shot)" in out
    result = json.loads((run / "test_result.json").read_text())
    assert result["n"] == 10
    assert main(["eval", "--checkpoint", str(run), "--episodes", "7", "--ways", "4", "--queries", "2", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["n"] == 7 and record["ways"] == 4


def test_unknown_key_and_preset_exit_2(tmp_path, capsys):
    assert main(["train", "--config", "omniglot/protonet_5w1s", "--run-dir", str(tmp_path), "train.wayz=5"]) == 2
    assert "unknown config key(s) train.wayz; valid keys under train:" in capsys.readouterr().err
    assert main(["train", "--config", "omniglot/nope"]) == 2
    assert "unknown preset or config file 'omniglot/nope'" in capsys.readouterr().err


def test_eval_of_missing_checkpoint(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "none")]) == 2
    assert "no model at" in capsys.readouterr().err


def test_impossible_episode_sizes_exit_2(tmp_path, capsys):
    args = [a for a in CLUSTERS if not a.startswith("train.ways")] + ["train.ways=20"]
    assert main(["train", "--config", "omniglot/protonet_5w1s", "--run-dir", str(tmp_path), *args]) == 2
    assert "ways=20 but the dataset has only 12 classes" in capsys.readouterr().err


@pytest.mark.slow
def test_python_m_entry_point():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "metaxfer", "configs"], capture_output=True, text=True, check=True).stdout
    assert "omniglot/protonet_20w1s" in out


def test_eval_inner_steps_override(tmp_path, capsys):
    run = tmp_path / "maml"
    maml = ["model.learner=maml", "model.learner_args={inner_lr: 0.4, inner_steps: 1}",
            "model.backbone_args={in_channels: 1, hidden: 8, image_size: 16, num_classes: 5}", *CLUSTERS[1:]]
    assert main(["train", "--config", "omniglot/protonet_5w1s", "--run-dir", str(run), *maml]) == 0
    capsys.readouterr()
    results = {}
    for steps in ("0", "5"):
        assert main(["eval", "--checkpoint", str(run), "--episodes", "6", "--queries", "2", "--json", "--inner-steps", steps]) == 0
        results[steps] = json.loads(capsys.readouterr().out)["mean"]
    assert results["0"] != results["5"]  # the override reached the learner
    assert main(["eval", "--checkpoint", str(run), "--inner-steps", "-1"]) == 2
    assert "--inner-steps must be >= 0" in capsys.readouterr().err
    proto = tmp_path / "proto"
    assert main(["train", "--config", "omniglot/protonet_5w1s", "--run-dir", str(proto), *CLUSTERS]) == 0
    assert main(["eval", "--checkpoint", str(proto), "--inner-steps", "3"]) == 2
    assert "no inner loop" in capsys.readouterr().err
    # --transductive: the query batch's own BatchNorm statistics, recorded in the result; refused where meaningless.
    assert main(["eval", "--checkpoint", str(run), "--episodes", "6", "--queries", "2", "--json", "--transductive"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["transductive"] is True and record["n"] == 6
    assert main(["eval", "--checkpoint", str(proto), "--transductive"]) == 2
    assert "ProtoNet has no transductive mode" in capsys.readouterr().err


def test_resume_from_run_dir_keeps_saved_config_and_warns_on_changes(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", "omniglot/protonet_5w1s", "--run-dir", str(run), "--no-test", *CLUSTERS]) == 0
    capsys.readouterr()
    # Without --config the saved configuration (here: the overrides above) is continued, to a new step count.
    assert main(["train", "--run-dir", str(run), "--no-test", "train.steps=9"]) == 0
    cap = capsys.readouterr()
    assert "warning" not in cap.err
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["data"]["dataset"] == "clusters" and saved["train"]["steps"] == 9
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 9 and steps.count(6) == 1  # continued from the step-6 checkpoint, not retrained
    # Resuming with the preset drops the saved overrides: each difference is named, and the way to keep them.
    assert main(["train", "--config", "omniglot/protonet_5w1s", "--run-dir", str(run), "--no-test",
                 *[a for a in CLUSTERS if not a.startswith("train.queries")], "train.queries=4", "train.steps=10"]) == 0
    err = capsys.readouterr().err
    assert "train.queries: 3 -> 4" in err and "train.steps: 9 -> 10" in err
    assert f"metaxfer train --run-dir {run}" in err


def test_train_without_config_needs_a_saved_run(tmp_path, capsys):
    assert main(["train"]) == 2
    assert "give --config" in capsys.readouterr().err
    assert main(["train", "--run-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "run_config.json does not exist" in err and "give --config" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run_config.json").write_text("{not json")
    assert main(["train", "--run-dir", str(tmp_path / "bad")]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
