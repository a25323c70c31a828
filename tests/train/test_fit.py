import json

import pytest
import torch

import metaxfer
from metaxfer.errors import NonFiniteLossError
from metaxfer.tasks import EpisodeSampler
from metaxfer.train import Checkpoints, fit

SPEC = {"learner": "protonet", "backbone": "conv4", "backbone_args": {"hidden": 8, "image_size": 16}}


def make(clusters, lr_decay=True):
    torch.manual_seed(0)
    learner = metaxfer.build_learner(SPEC)
    opt = torch.optim.Adam(learner.parameters(), 1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5) if lr_decay else None
    return learner, EpisodeSampler(clusters, 5, 1, 3, seed=0), opt, sched


def losses(result):
    return [(r["step"], r["loss"]) for r in result.history if r.get("loss") is not None]


def test_resume_gives_identical_losses(clusters, tmp_path):
    learner, sampler, opt, sched = make(clusters)
    full = fit(learner, sampler, opt, 12, 2, scheduler=sched, run_dir=tmp_path / "a", checkpoint_every=4, log_every=1)
    learner, sampler, opt, sched = make(clusters)
    fit(learner, sampler, opt, 8, 2, scheduler=sched, run_dir=tmp_path / "b", checkpoint_every=4, log_every=1)
    torch.manual_seed(1234)  # a resumed process starts with other global RNG state
    learner, sampler, opt, sched = make(clusters)
    resumed = fit(learner, sampler, opt, 12, 2, scheduler=sched, run_dir=tmp_path / "b", checkpoint_every=4, log_every=1)
    assert losses(resumed) == losses(full)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**4)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 13))
    seconds = [json.loads(x)["seconds"] for x in lines]
    assert seconds == sorted(seconds)  # training time adds up across the resume


def test_resume_follows_a_changed_schedule(clusters, tmp_path):
    # Extending a run with a new decay interval or base rate must not be silently ignored
    # (StepLR's saved state holds the old step size, the optimiser's the old rate).
    learner, sampler, opt, sched = make(clusters)
    fit(learner, sampler, opt, 6, 2, scheduler=sched, run_dir=tmp_path, checkpoint_every=6, log_every=1)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**2)  # decayed at steps 3 and 6
    learner, sampler, opt, _ = make(clusters, lr_decay=False)
    for group in opt.param_groups:
        group["lr"] = 4e-2
    sched = torch.optim.lr_scheduler.StepLR(opt, 4, 0.5)
    resumed = fit(learner, sampler, opt, 8, 2, scheduler=sched, run_dir=tmp_path, checkpoint_every=6, log_every=1)
    lrs = {r["step"]: r["lr"] for r in resumed.history if r.get("lr") is not None}
    assert lrs[7] == pytest.approx(4e-2 * 0.5)  # the new schedule at step 6 (one decay by then)
    assert opt.param_groups[0]["lr"] == pytest.approx(4e-2 * 0.5**2)  # and its decay at step 8
    assert sched.get_last_lr() == [pytest.approx(4e-2 * 0.5**2)]


def test_resume_without_a_schedule_takes_the_configured_rate(clusters, tmp_path):
    learner, sampler, opt, _ = make(clusters, lr_decay=False)
    fit(learner, sampler, opt, 4, 2, run_dir=tmp_path, checkpoint_every=4, log_every=1)
    learner, sampler, opt, _ = make(clusters, lr_decay=False)
    for group in opt.param_groups:
        group["lr"] = 3e-3
    fit(learner, sampler, opt, 6, 2, run_dir=tmp_path, checkpoint_every=4, log_every=1)
    assert opt.param_groups[0]["lr"] == 3e-3


class Crash(Exception):
    pass


def on_call(learner, n, change):
    """Make the ``n``-th call of ``learner.loss`` return ``change(loss)`` (or raise inside ``change``)."""
    real_loss = learner.loss
    calls = {"n": 0}

    def loss(batch):
        calls["n"] += 1
        value = real_loss(batch)
        return change(value) if calls["n"] == n else value

    learner.loss = loss


def crash(_):
    raise Crash("killed")


def test_killed_run_resumes_to_identical_curve(clusters, tmp_path):
    learner, sampler, opt, sched = make(clusters)
    full = fit(learner, sampler, opt, 10, 1, scheduler=sched, run_dir=tmp_path / "a", checkpoint_every=2, log_every=1)

    learner, sampler, opt, sched = make(clusters)
    on_call(learner, 7, crash)
    with pytest.raises(Crash):
        fit(learner, sampler, opt, 10, 1, scheduler=sched, run_dir=tmp_path / "b", checkpoint_every=2, log_every=1)
    learner, sampler, opt, sched = make(clusters)
    resumed = fit(learner, sampler, opt, 10, 1, scheduler=sched, run_dir=tmp_path / "b", checkpoint_every=2, log_every=1)
    assert losses(resumed) == losses(full)


def test_nan_loss_stops_naming_step_and_keeps_good_checkpoint(clusters, tmp_path):
    learner, sampler, opt, _ = make(clusters, lr_decay=False)
    on_call(learner, 6, lambda loss: loss * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 6; the last good checkpoint is .*step-00000004"):
        fit(learner, sampler, opt, 10, 1, run_dir=tmp_path, checkpoint_every=2)
    good = metaxfer.load(tmp_path)
    assert good.card["trained_steps"] == 4
    assert all(torch.isfinite(v).all() for v in good.state_dict().values() if v.is_floating_point())


def test_nan_loss_can_be_skipped(clusters):
    learner, sampler, opt, _ = make(clusters, lr_decay=False)
    on_call(learner, 3, lambda loss: loss + float("inf"))
    with pytest.warns(RuntimeWarning, match="non-finite loss inf at step 3"):
        result = fit(learner, sampler, opt, 5, 1, on_nonfinite="skip")
    assert result.skipped_steps == [3]
    assert all(torch.isfinite(p).all() for p in learner.parameters())


def test_interrupted_checkpoint_write_keeps_previous(clusters, tmp_path, monkeypatch):
    learner, sampler, opt, _ = make(clusters, lr_decay=False)
    fit(learner, sampler, opt, 4, 1, run_dir=tmp_path, checkpoint_every=4)
    import importlib

    fit_module = importlib.import_module("metaxfer.train.fit")

    def broken(directory, name, state):
        (directory / "trainer.json").write_text("{half")
        raise OSError("disk full")

    monkeypatch.setattr(fit_module, "save_state", broken)
    with pytest.raises(OSError, match="disk full"):
        fit(learner, sampler, opt, 8, 1, run_dir=tmp_path, checkpoint_every=4)
    ckpts = Checkpoints(tmp_path)
    assert ckpts.pointer("latest").name == "step-00000004"
    _directory, state = ckpts.latest_state()
    assert state["step"] == 4
    assert metaxfer.load(tmp_path).card["trained_steps"] == 4
    assert not list(ckpts.root.glob(".step-*"))  # the half-written directory was removed


def test_validation_best_checkpoint_and_run_files(clusters, tmp_path):
    from metaxfer.data.synthetic import ClusterImages

    val = EpisodeSampler(ClusterImages("val", 10, 10, 16), 5, 1, 3).fixed_episodes(6, seed=1)
    learner, sampler, opt, _ = make(clusters, lr_decay=False)
    result = fit(learner, sampler, opt, 6, 1, run_dir=tmp_path, val_episodes=val, val_every=3, checkpoint_every=3, log_every=2)
    assert result.best_val is not None and result.best_step in (3, 6)
    vals = [r for r in result.history if r.get("val_accuracy") is not None]
    assert [r["step"] for r in vals] == [3, 6]
    assert Checkpoints(tmp_path).pointer("best").name == f"step-{result.best_step:08d}"
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0].startswith("step,loss,accuracy")
    assert (tmp_path / "curve.png").stat().st_size > 1000
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert len(kept) <= 2


def test_bad_arguments(clusters):
    learner, sampler, opt, _ = make(clusters)
    with pytest.raises(metaxfer.errors.ConfigError, match="on_nonfinite"):
        fit(learner, sampler, opt, 1, on_nonfinite="ignore")


def test_tasks_per_backward_gives_the_same_gradient_and_metrics(clusters):
    from metaxfer.train.fit import forward_backward

    torch.manual_seed(0)
    spec = {"learner": "maml", "backbone": "conv4",
            "backbone_args": {"hidden": 4, "image_size": 16, "num_classes": 5, "norm": "batchnorm_split"},
            "learner_args": {"inner_lr": 0.4, "inner_steps": 1}}
    learner = metaxfer.build_learner(spec).double()
    batch = EpisodeSampler(clusters, 5, 1, 3, seed=0).sample_batch(5)
    batch = type(batch)(batch.support_x.double(), batch.support_y, batch.query_x.double(), batch.query_y)
    grads = {}
    for chunk in (None, 2, 1):
        learner.zero_grad(set_to_none=True)
        loss, detail, metrics = forward_backward(learner, batch, chunk)
        grads[chunk] = [p.grad.clone() for p in learner.parameters()]
        if chunk is None:
            reference = (loss, metrics)
        else:
            assert loss.item() == pytest.approx(reference[0].item(), rel=1e-12)
            assert metrics["accuracy"] == pytest.approx(reference[1]["accuracy"], rel=1e-6)  # float32 means
        assert detail == ""
    for a, b, c in zip(grads[None], grads[2], grads[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-13)


def test_nan_in_a_later_chunk_discards_the_whole_step(clusters):
    learner, sampler, opt, _ = make(clusters, lr_decay=False)
    fit(learner, sampler, opt, 2, 4, tasks_per_backward=2)  # warm up Adam's state
    on_call(learner, 2, lambda loss: loss * float("nan"))  # the 2nd chunk of the next step
    before = [p.detach().clone() for p in learner.parameters()]
    with pytest.warns(RuntimeWarning, match="at step 1; step skipped"):
        result = fit(learner, sampler, opt, 1, 4, tasks_per_backward=2, on_nonfinite="skip")
    assert result.skipped_steps == [1]
    for a, b in zip(before, learner.parameters()):
        assert torch.equal(a, b)  # the first chunk's gradient was not applied
    with pytest.raises(metaxfer.errors.ConfigError, match="tasks_per_backward"):
        fit(learner, sampler, opt, 1, 4, tasks_per_backward=0)
