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
# Second-order MAML with a fixed 5-way head, on the same clusters.
MAML_ON_CLUSTERS = ["model.learner=maml", "model.learner_args={inner_lr: 0.4, inner_steps: 1}",
                    "model.backbone_args={in_channels: 1, hidden: 8, image_size: 16, num_classes: 5}", *CLUSTERS[1:]]


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
    assert result["n"] == 10 and result["checkpoint_step"] in (3, 6)  # the best-on-validation checkpoint's step
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
    assert main(["train", "--config", "omniglot/protonet_5w1s", "--run-dir", str(run), *MAML_ON_CLUSTERS]) == 0
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


@pytest.fixture
def trained_run(tmp_path_factory, capsys):
    run = tmp_path_factory.mktemp("runs") / "proto"
    assert main(["train", "--config", "omniglot/protonet_5w1s", "--run-dir", str(run), *CLUSTERS]) == 0
    capsys.readouterr()
    return run


def test_eval_episode_sizes_default_to_the_models_and_zero_is_an_error(trained_run, capsys):
    # No --queries: the model's eval.queries (3 here), as at the end of training; the run's test result agrees.
    assert main(["eval", "--checkpoint", str(trained_run), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["mean"] == json.loads((trained_run / "test_result.json").read_text())["mean"]
    for flag in ("--ways", "--shots", "--queries"):  # 0 used to fall back to the default silently
        assert main(["eval", "--checkpoint", str(trained_run), flag, "0"]) == 2
        assert "must be a positive integer" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(trained_run), "--episodes", "0"]) == 2
    assert "--episodes must be >= 1, got 0" in capsys.readouterr().err


def test_checkpoint_pointer_files_load_and_dangling_ones_say_so(trained_run, capsys):
    # The README's `--init runs/.../checkpoints/best`: the pointer file stands for the checkpoint it names.
    assert main(["eval", "--checkpoint", str(trained_run / "checkpoints" / "best"), "--episodes", "2"]) == 0
    capsys.readouterr()
    (trained_run / "checkpoints" / "best").write_text("step-00000099\n")
    assert main(["eval", "--checkpoint", str(trained_run / "checkpoints" / "best")]) == 2
    err = capsys.readouterr().err
    assert "names 'step-00000099', which holds no model" in err and "step-00000006" in err


def test_resume_with_a_dangling_latest_pointer_refuses_and_keeps_the_checkpoints(trained_run, capsys):
    (trained_run / "checkpoints" / "latest").write_text("step-00000099\n")
    assert main(["train", "--run-dir", str(trained_run), "train.steps=9"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "names 'step-00000099', which is not there" in err and "--restart" in err
    assert (trained_run / "checkpoints" / "step-00000006").is_dir()  # nothing deleted
    (trained_run / "checkpoints" / "latest").unlink()
    assert main(["train", "--run-dir", str(trained_run), "train.steps=9"]) == 2
    assert "is missing, but the run has checkpoints ['step-00000006']" in capsys.readouterr().err
    (trained_run / "checkpoints" / "latest").write_text("step-00000006\n")
    assert main(["train", "--run-dir", str(trained_run), "train.steps=9"]) == 0  # fixed as the message says


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", "train.lr must be > 0, got -1.0"),
    ("train.weight_decay=-0.1", "train.weight_decay must be >= 0"),
    ("device=gpu", "unknown device 'gpu'; use cpu, cuda, cuda:N or mps"),
    ("train.steps=0", "train.steps must be >= 1, got 0"),
    ("eval.episodes=0", "eval.episodes must be >= 1, got 0"),
    ("train.val_every=0", r"val_every must be > 0, got 0 \(train.\* in a config\)"),
    ("data.args={foo: 1}", r"dataset 'clusters' takes no argument 'foo': check data.args {'foo': 1} \(a preset's"),
])
def test_bad_training_settings_are_named_before_training(tmp_path, capsys, override, message):
    import re

    assert main(["train", "--config", "omniglot/protonet_5w1s", "--run-dir", str(tmp_path / "r"), *CLUSTERS,
                 override]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_unavailable_cuda_is_a_clear_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["eval", "--checkpoint", "protonet-omniglot-5w1s", "--device", "cuda"]) == 2
    assert "has no CUDA GPU; use device=cpu" in capsys.readouterr().err


def test_eval_of_a_fixed_head_on_other_ways_and_transduction_without_batchnorm(tmp_path, capsys):
    run = tmp_path / "maml"
    assert main(["train", "--config", "omniglot/protonet_5w1s", "--run-dir", str(run), *MAML_ON_CLUSTERS]) == 0
    capsys.readouterr()
    for ways in ("8", "3"):  # 8 used to end in "IndexError: Target 5 is out of bounds"; 3 ran on 5 logits
        assert main(["eval", "--checkpoint", str(run), "--ways", ways, "--episodes", "2"]) == 2
        assert f"episodes are {ways}-way" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run), "--query-batches", "one-per-class"]) == 2
    assert "changes only transductive predictions" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run), "--transductive", "--query-batches", "one-per-class"]) == 0
    assert "transductive, one query per class per batch)" in capsys.readouterr().out
    sine = tmp_path / "sine"
    assert main(["train", "--config", "sinusoid/maml_k5", "--run-dir", str(sine), "train.steps=2", "train.val_every=2",
                 "train.val_episodes=2", "eval.episodes=2"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(sine), "--transductive", "--episodes", "2"]) == 2
    assert "has no BatchNorm layer" in capsys.readouterr().err


def test_overrides_on_both_sides_of_an_option(tmp_path, capsys):
    first, rest = CLUSTERS[:4], CLUSTERS[4:]
    assert main(["train", "--config", "omniglot/protonet_5w1s", *first, "--run-dir", str(tmp_path / "r"), *rest]) == 0
    assert "(95% CI, 10 episodes, clusters test, 5-way 1-shot)" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a stray non-override is still refused
        main(["train", "--config", "omniglot/protonet_5w1s", "--run-dir", str(tmp_path / "s"), *CLUSTERS, "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
