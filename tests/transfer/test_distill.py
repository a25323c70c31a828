"""Knowledge distillation (Hinton et al. 2015) and born-again self-distillation (Tian et al. 2020).

The loss against its closed form and its limits; a frozen, untouched teacher through fit; a student that
learns; checkpoints that are the student's; the CLI end to end; errors that say what to change.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaxfer
from metaxfer import BaselinePlusPlus, ClassBatchSampler, EpisodeSampler, evaluate
from metaxfer.build import build_learner
from metaxfer.cli.main import main
from metaxfer.data.synthetic import ClusterImages
from metaxfer.errors import CheckpointError, ConfigError, EpisodeError
from metaxfer.transfer import Baseline, Distill, distillation_loss, soft_target_loss
from metaxfer.transfer.distill import student_spec

BACKBONE = {"in_channels": 1, "hidden": 8, "image_size": 16}


def _model(learner: str, classes: int = 20, **learner_args: object) -> dict:
    return {"learner": learner, "backbone": "conv4", "backbone_args": BACKBONE,
            "learner_args": {"num_base_classes": classes, **learner_args}}


@pytest.fixture(scope="module")
def train_set() -> ClusterImages:
    return ClusterImages("train", num_classes=20, per_class=10, image_size=16, noise=0.5)


@pytest.fixture(scope="module")
def held_out() -> metaxfer.tasks.EpisodeSet:
    """Fixed 5-way 1-shot episodes over classes never seen in training."""
    test = ClusterImages("test", num_classes=20, per_class=10, image_size=16, noise=0.5)
    return EpisodeSampler(test, 5, 1, 5, seed=0).fixed_episodes(20, seed=0)


@pytest.fixture(scope="module")
def teacher(train_set, pretrain) -> Baseline:
    """A Baseline pretrained on the 20 cluster classes (the teacher of every test here)."""
    torch.manual_seed(1)
    learner = build_learner(_model("baseline"))
    pretrain(learner, train_set, 40)
    return learner.eval()


# --- the loss ------------------------------------------------------------------------------------


def test_loss_equals_the_closed_form():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 1])
    temp, alpha = 2.0, 0.3
    p_t = [[math.exp(t[n, c] / temp) for c in range(4)] for n in range(3)]
    p_t = [[v / sum(row) for v in row] for row in p_t]
    p_s = [[math.exp(s.detach()[n, c] / temp) for c in range(4)] for n in range(3)]
    p_s = [[v / sum(row) for v in row] for row in p_s]
    kl = sum(p_t[n][c] * math.log(p_t[n][c] / p_s[n][c]) for n in range(3) for c in range(4)) / 3
    sd = s.detach()
    ce = -sum(float(sd[n, y[n]]) - math.log(sum(math.exp(float(sd[n, c])) for c in range(4))) for n in range(3)) / 3
    expected = alpha * temp**2 * kl + (1 - alpha) * ce
    loss = distillation_loss(s, t, y, temperature=temp, alpha=alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # Gradient of the soft term (Hinton et al. 2015, eq. 2 times T^2): T * (softmax(s/T) - softmax(t/T)) / N.
    (grad,) = torch.autograd.grad(soft_target_loss(s, t, temp), s)
    assert torch.allclose(grad, temp * (torch.softmax(s / temp, -1) - torch.softmax(t / temp, -1)) / 3)


def test_alpha_and_temperature_extremes():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (5,), generator=g)
    # alpha = 0: exactly the cross-entropy (the teacher does not matter); alpha = 1: exactly the soft term.
    assert torch.equal(distillation_loss(s, t, y, 4.0, alpha=0.0), F.cross_entropy(s, y))
    assert torch.equal(distillation_loss(s, 100 * t, y, 4.0, alpha=0.0), F.cross_entropy(s, y))
    assert torch.equal(distillation_loss(s, t, y, 4.0, alpha=1.0), soft_target_loss(s, t, 4.0))
    assert torch.equal(distillation_loss(s, t, None, 4.0, alpha=1.0), soft_target_loss(s, t, 4.0))
    assert distillation_loss(s, s.clone(), y, 4.0, alpha=1.0).item() == pytest.approx(0.0, abs=1e-12)
    # T = 1: the plain KL divergence between the two softmax distributions.
    kl = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1).mean()
    assert soft_target_loss(s, t, 1.0).item() == pytest.approx(kl.item(), rel=1e-10)
    # T -> infinity with zero-mean logits: matching logits, sum_c (s_c - t_c)^2 / (2 C) (Hinton et al., 2.1).
    s0, t0 = s - s.mean(-1, keepdim=True), t - t.mean(-1, keepdim=True)
    limit = ((s0 - t0) ** 2).sum(-1).mean() / (2 * 6)
    assert soft_target_loss(s0, t0, 1e4).item() == pytest.approx(limit.item(), rel=1e-3)
    # The weights interpolate linearly between the two ends.
    mid = distillation_loss(s, t, y, 4.0, alpha=0.25)
    assert mid.item() == pytest.approx(0.25 * soft_target_loss(s, t, 4.0).item() + 0.75 * F.cross_entropy(s, y).item())


def test_teacher_logits_are_detached():
    teacher = nn.Linear(3, 4)
    x, y = torch.randn(6, 3), torch.randint(0, 4, (6,))
    student = nn.Linear(3, 4)
    distillation_loss(student(x), teacher(x), y).backward()  # the teacher's output still carries a graph
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


# --- the learner ---------------------------------------------------------------------------------


def test_learner_loss_is_distillation_loss_of_student_and_teacher(teacher, train_set):
    learner = Distill(build_learner(_model("baseline_pp")), teacher, temperature=3.0, alpha=0.7)
    batch = ClassBatchSampler(train_set, 16, seed=0).sample_batch(2)
    learner.eval()  # BatchNorm on running statistics, so the two forward passes below agree
    x, y = batch.support_x.reshape(-1, 1, 16, 16), batch.support_y.reshape(-1)
    with torch.no_grad():
        expected = distillation_loss(learner.logits(x), teacher.head(teacher.backbone(x)), y, 3.0, 0.7)
        assert torch.allclose(learner.loss(batch), expected)
    assert set(learner.last_metrics) == {"accuracy", "teacher_accuracy", "soft", "hard"}
    assert learner.last_metrics["teacher_accuracy"] > 0.5


def test_teacher_is_frozen_untouched_and_out_of_the_checkpoint(teacher, train_set, held_out, tmp_path):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    flags = {n: p.requires_grad for n, p in teacher.named_parameters()}
    teacher.train()  # the caller's mode must survive too
    torch.manual_seed(0)
    learner = Distill(build_learner(_model("baseline_pp")), teacher)
    frozen = learner.teacher.model
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert not {id(p) for p in frozen.parameters()} & {id(p) for p in learner.parameters()}
    assert list(learner.state_dict()) == list(learner.student.state_dict())  # the student's keys only
    sampler = ClassBatchSampler(train_set, batch_size=16, seed=0)
    opt = torch.optim.Adam(learner.parameters(), 1e-2)
    result = metaxfer.fit(learner, sampler, opt, 4, val_episodes=held_out[:2], val_every=2, run_dir=tmp_path / "run",
                          checkpoint_every=2, log_every=1, progress=False)
    assert result.steps == 4 and all(math.isfinite(r["loss"]) for r in result.history if r.get("loss") is not None)
    # The caller's teacher: same weights and running statistics, flags and mode.
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in teacher.named_parameters()} and teacher.training
    # The private copy: never trained, never switched to train mode by fit.
    assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    assert not frozen.training
    copy_state = frozen.state_dict()
    assert all(torch.equal(before[k], copy_state[k]) for k in before)
    # The checkpoint is a Baseline++ checkpoint: it loads without the teacher and adapts like the learner.
    loaded = metaxfer.load(tmp_path / "run")
    assert type(loaded) is BaselinePlusPlus
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step-00000004" / "config.json").read_text())
    assert saved["model"]["learner"] == "baseline_pp" and "teacher" not in saved["model"]["learner_args"]
    ep = held_out[3]
    loaded4 = metaxfer.load(tmp_path / "run" / "checkpoints" / "step-00000004")
    assert torch.allclose(loaded4.adapt(ep.support_x, ep.support_y)(ep.query_x),
                          learner.adapt(ep.support_x, ep.support_y)(ep.query_x), atol=1e-5)
    teacher.eval()


def test_fit_resumes_a_distillation_run_exactly(teacher, train_set, tmp_path):
    def run(steps: int, run_dir, seed: int = 0) -> list[float]:
        torch.manual_seed(seed)
        learner = Distill(build_learner(_model("baseline_pp")), teacher)
        opt = torch.optim.Adam(learner.parameters(), 1e-2)
        result = metaxfer.fit(learner, ClassBatchSampler(train_set, 16, seed=0), opt, steps, run_dir=run_dir,
                              checkpoint_every=2, log_every=1, progress=False)
        return [r["loss"] for r in result.history]

    straight = run(4, tmp_path / "straight")
    run(2, tmp_path / "resumed")
    assert run(4, tmp_path / "resumed", seed=123) == straight  # student weights and optimiser from the checkpoint


def test_student_learns_from_the_teacher(teacher, train_set, held_out, pretrain):
    torch.manual_seed(0)
    learner = Distill(build_learner(_model("baseline")), teacher, temperature=4.0, alpha=0.5)
    losses = pretrain(learner, train_set, 60)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert learner.last_metrics["accuracy"] > 0.5  # base-class accuracy on the last batch (chance: 5 %)
    assert evaluate(learner, held_out).mean > 35.0  # novel classes, 5-way: chance is 20 %


def test_born_again_generations(teacher, train_set, tmp_path, pretrain):
    torch.manual_seed(2)
    first = Distill.born_again(teacher, temperature=2.0)
    assert type(first.student) is type(teacher) and first.temperature == 2.0
    shapes = {k: v.shape for k, v in teacher.state_dict().items()}
    assert {k: v.shape for k, v in first.state_dict().items()} == shapes  # same architecture ...
    assert not torch.equal(first.student.head.weight, teacher.head.weight)  # ... initialised afresh
    pretrain(first, train_set, 3)
    second = Distill.born_again(first)  # generation 2 learns from generation 1's student
    x = train_set.gather(torch.arange(8))
    first.student.eval()
    with torch.no_grad():
        assert torch.allclose(second.teacher(x), first.logits(x), atol=1e-6)
    metaxfer.save(first, tmp_path / "gen1")
    third = Distill.born_again(tmp_path / "gen1")  # or from a saved generation
    assert type(third.student) is Baseline
    with torch.no_grad():
        assert torch.allclose(third.teacher(x), first.logits(x), atol=1e-6)
    assert student_spec(None) is None


def test_registry_builds_the_student_and_records_its_spec(teacher, tmp_path):
    metaxfer.save(teacher, tmp_path / "teacher")
    spec = _model("distill", student="baseline_pp", teacher=str(tmp_path / "teacher"), temperature=2.0, alpha=0.25)
    learner = build_learner(spec)
    assert isinstance(learner, Distill) and type(learner.student) is BaselinePlusPlus
    assert (learner.temperature, learner.alpha) == (2.0, 0.25)
    assert learner.build_spec == _model("baseline_pp")  # what checkpoints record
    assert learner.distill_spec["learner_args"]["teacher"] == str(tmp_path / "teacher")
    assert learner.teacher.source == str(tmp_path / "teacher")


# --- errors that say what to change --------------------------------------------------------------


def test_teacher_and_student_output_sizes_must_agree(teacher, train_set):
    with pytest.raises(ConfigError, match=r"teacher classifies 20 base classes but the student 12.*num_base_classes"):
        Distill(build_learner(_model("baseline", classes=12)), teacher)
    # A bare module's size is only known when it runs.
    odd = nn.Sequential(nn.Flatten(), nn.Linear(256, 7))
    learner = Distill(build_learner(_model("baseline")), odd)
    with pytest.raises(ConfigError, match=r"teacher outputs 7 classes but the student 20.*num_base_classes"):
        learner.loss(ClassBatchSampler(train_set, 8).sample_batch(1))
    with pytest.raises(ConfigError, match="logits for 3 examples but the teacher for 2"):
        distillation_loss(torch.zeros(3, 4), torch.zeros(2, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"\[N, classes\]"):
        distillation_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), float("inf"), "4", True])
def test_temperature_must_be_positive(teacher, temperature):
    with pytest.raises(ConfigError, match="temperature must be a finite number > 0.*e.g. 4"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long),
                          temperature=temperature)
    with pytest.raises(ConfigError, match="temperature must be a finite number > 0"):
        Distill(build_learner(_model("baseline")), teacher, temperature=temperature)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), None])
def test_alpha_must_lie_in_unit_interval(teacher, alpha):
    with pytest.raises(ConfigError, match=r"alpha must lie in \[0, 1\].*0 trains on the labels alone"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), alpha=alpha)
    with pytest.raises(ConfigError, match=r"alpha must lie in \[0, 1\]"):
        build_learner(_model("distill", teacher=teacher, alpha=alpha))


def test_missing_or_unusable_teacher(tmp_path, teacher, train_set):
    with pytest.raises(CheckpointError, match="teacher .*no model at.*train a teacher first"):
        Distill(build_learner(_model("baseline")), tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="needs a teacher: run `metaxfer distill"):
        build_learner(_model("distill"))
    protonet = build_learner({"learner": "protonet", "backbone": "conv4", "backbone_args": BACKBONE})
    with pytest.raises(ConfigError, match="no classifier over the base classes.*baseline, baseline_pp or finetune"):
        Distill(build_learner(_model("baseline")), protonet)
    with pytest.raises(ConfigError, match="student must be a transfer learner"):
        Distill(protonet, teacher)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not 'distill'"):
        build_learner(_model("distill", teacher=teacher, student="distill"))
    with pytest.raises(ConfigError, match="born_again rebuilds .*build_spec"):
        Distill.born_again(Baseline(nn.Sequential(nn.Flatten(), nn.Linear(256, 4)), 20, feature_dim=4))
    with pytest.raises(CheckpointError, match="train a teacher first"):
        Distill.born_again(tmp_path / "nowhere")
    learner = Distill(build_learner(_model("baseline")), teacher)
    with pytest.raises(ConfigError, match="train.sampler: classes"):
        learner.loss(EpisodeSampler(train_set, 5, 1, 2).sample_batch(1))
    few = Distill(build_learner(_model("baseline", classes=10)), nn.Sequential(nn.Flatten(), nn.Linear(256, 10)))
    with pytest.raises(EpisodeError, match="num_base_classes=10"):
        few.loss(ClassBatchSampler(train_set, 200).sample_batch(1))
    with pytest.raises(ConfigError, match="targets are needed"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), None, alpha=0.5)


# --- the CLI -------------------------------------------------------------------------------------

CLUSTERS = [
    "data.dataset=clusters", "data.args={num_classes: 12, per_class: 10, image_size: 16}",
    "model.learner_args.num_base_classes=12", "train.steps=2", "train.batch_size=16", "train.val_every=2",
    "train.val_episodes=2", "train.checkpoint_every=1", "eval.episodes=3", "eval.queries=3",
]
TINY_RESNET = "model.backbone_args={in_channels: 1, channels: [4, 4, 4, 8]}"
TINY_CONV4 = "model.backbone_args={in_channels: 1, hidden: 8, image_size: 16}"


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> str:
    run = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["train", "--config", "omniglot/baseline_pp_resnet12_5w1s", "--run-dir", str(run), "--no-test",
                 TINY_RESNET, *CLUSTERS]) == 0
    return str(run)


def test_cli_distill_end_to_end(teacher_run, tmp_path, capsys):
    run = tmp_path / "student"
    assert main(["distill", "--config", "omniglot/distill_conv4_from_resnet12_5w1s", "--teacher", teacher_run,
                 "--run-dir", str(run), TINY_CONV4, *CLUSTERS]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and "(95% CI, 3 episodes, clusters test, 5-way 1-shot)" in out
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert (run / "checkpoints" / "step-00000002" / "model.safetensors").is_file()
    assert json.loads((run / "test_result.json").read_text())["n"] == 3
    card = json.loads((run / "checkpoints" / "step-00000002" / "config.json").read_text())
    teacher_dir = str(metaxfer.hub.resolve(teacher_run).resolve())
    assert card["model"]["learner"] == "baseline_pp" and card["model"]["backbone"] == "conv4"
    assert card["run_config"]["model"]["learner_args"]["teacher"] == teacher_dir
    assert card["command"].startswith("metaxfer train --config omniglot/distill_conv4_from_resnet12_5w1s")
    assert type(metaxfer.load(run)) is BaselinePlusPlus  # evaluated like any Baseline++ checkpoint
    assert main(["eval", "--checkpoint", str(run), "--episodes", "2", "--queries", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 2
    # Running the same command again resumes: nothing left to train.
    assert main(["distill", "--config", "omniglot/distill_conv4_from_resnet12_5w1s", "--teacher", teacher_run,
                 "--run-dir", str(run), "--no-test", TINY_CONV4, *CLUSTERS]) == 0
    assert "trained 2 steps" in capsys.readouterr().out


def test_cli_born_again_from_a_transfer_preset(teacher_run, tmp_path, capsys):
    run = tmp_path / "gen1"
    assert main(["distill", "--config", "omniglot/baseline_pp_resnet12_5w1s", "--teacher", teacher_run,
                 "--run-dir", str(run), "--no-test", TINY_RESNET, *CLUSTERS, "model.learner_args.alpha=1"]) == 0
    card = json.loads((run / "checkpoints" / "step-00000002" / "config.json").read_text())
    assert card["model"]["backbone"] == "resnet12" and card["model"]["learner"] == "baseline_pp"
    assert card["run_config"]["model"]["learner_args"]["alpha"] == 1
    assert card["run_config"]["name"] == "baseline_pp_omniglot_resnet12_5w1s_distilled"
    # Distilling into the teacher's own run directory would overwrite it.
    assert main(["distill", "--config", "omniglot/baseline_pp_resnet12_5w1s", "--teacher", teacher_run,
                 "--run-dir", teacher_run, TINY_RESNET, *CLUSTERS]) == 2
    assert "holds the teacher's checkpoint" in capsys.readouterr().err


def test_cli_errors_say_what_to_change(teacher_run, tmp_path, capsys):
    preset = ["distill", "--config", "omniglot/distill_conv4_from_resnet12_5w1s", "--run-dir", str(tmp_path / "s")]
    assert main([*preset, "--teacher", str(tmp_path / "missing"), TINY_CONV4, *CLUSTERS]) == 2
    err = capsys.readouterr().err
    assert "--teacher" in err and "no model at" in err and "train the teacher first" in err
    assert main(["train", "--config", "omniglot/distill_conv4_from_resnet12_5w1s", "--run-dir", str(tmp_path / "t"),
                 TINY_CONV4, *CLUSTERS]) == 2
    assert "needs a teacher: run `metaxfer distill" in capsys.readouterr().err
    other_data = [a.replace("num_classes: 12", "num_classes: 14") for a in CLUSTERS]
    assert main([*preset, "--teacher", teacher_run, TINY_CONV4, *other_data]) == 2
    assert "the teacher was trained on" in capsys.readouterr().err
    more_classes = "model.learner_args.num_base_classes=13"
    assert main([*preset, "--teacher", teacher_run, TINY_CONV4, *CLUSTERS, more_classes]) == 2
    assert "set model.learner_args.num_base_classes=12" in capsys.readouterr().err
    assert main([*preset, "--teacher", teacher_run, TINY_CONV4, *CLUSTERS, "model.learner_args.temperature=0"]) == 2
    assert "temperature must be a finite number > 0" in capsys.readouterr().err
    assert main([*preset, "--teacher", "protonet-omniglot-5w1s", TINY_CONV4, *CLUSTERS]) == 2
    assert "no classifier over the base classes" in capsys.readouterr().err
    assert main(["distill", "--config", "omniglot/protonet_5w1s", "--teacher", teacher_run, *CLUSTERS]) == 2
    assert "cannot be a student" in capsys.readouterr().err
