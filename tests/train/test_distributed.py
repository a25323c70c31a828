"""Data-parallel training gives the single-process result (gloo on CPU; tiny models, synthetic clusters).

The multi-process tests start real process groups: two workers with
``torch.multiprocessing`` (file rendezvous, no port), and one ``torchrun``
job whose rank 1 is killed once to check the elastic restart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import metaxfer
from metaxfer.data.synthetic import ClusterImages
from metaxfer.errors import ConfigError
from metaxfer.evaluate import evaluate
from metaxfer.tasks import EpisodeSampler
from metaxfer.train import fit
from metaxfer.train.distributed import RunningStatsSync, check_tasks_per_step, shard, task_slice

HERE = Path(__file__).resolve().parent
TINY = {"in_channels": 1, "hidden": 4, "image_size": 16}
SPECS: dict[str, dict[str, Any]] = {
    # ProtoNet with BatchNorm running statistics (what its adapt() uses): merged across ranks.
    "protonet": {"learner": "protonet", "backbone": "conv4", "backbone_args": TINY},
    "maml": {"learner": "maml", "backbone": "conv4", "learner_args": {"inner_lr": 0.4, "inner_steps": 1},
             "backbone_args": {**TINY, "num_classes": 5, "norm": "batchnorm_split"}},
    "reptile": {"learner": "reptile", "backbone": "conv4",
                "learner_args": {"inner_optimizer": "sgd", "inner_lr": 0.1, "inner_steps": 2},
                "backbone_args": {**TINY, "num_classes": 5}},
    # Reptile with its inner Adam's moments kept across tasks: the moments are averaged over the ranks' tasks.
    # No BatchNorm: Adam would normalise the ~1e-17 gradients of biases in front of it into full-size steps.
    "reptile_adam": {"learner": "reptile", "backbone": "conv4",
                     "learner_args": {"inner_optimizer": "adam", "inner_lr": 0.01, "inner_steps": 2,
                                      "persistent_inner_state": True},
                     "backbone_args": {**TINY, "num_classes": 5, "norm": "none"}},
}
STEPS, TASKS = 20, 4


def clusters(split: str) -> ClusterImages:
    data = ClusterImages(split, num_classes=10, per_class=6, image_size=16, noise=0.5)
    data.images = data.images.double()  # float64: 20 Adam steps stay equal to ~1e-10, not only ~1e-5
    return data


def train(name: str, init_seed: int = 0) -> dict[str, Any]:
    """Meta-train ``SPECS[name]`` with :func:`fit` in this process (one rank of a group, or alone)."""
    torch.manual_seed(init_seed)
    learner = metaxfer.build_learner(SPECS[name]).double()
    sampler = EpisodeSampler(clusters("train"), 5, 1, 2, seed=3)
    val = EpisodeSampler(clusters("val"), 5, 1, 2, seed=4).fixed_episodes(5, seed=5)
    # SGD, not Adam: the conv biases in front of BatchNorm get gradients of ~1e-17 (BatchNorm cancels them),
    # whose summation-order noise Adam would normalise into full-size steps of random sign.
    opt = torch.optim.SGD(learner.parameters(), 1.0) if name.startswith("reptile") else torch.optim.SGD(
        learner.parameters(), 0.1, momentum=0.9)
    first: dict[str, torch.Tensor] = {}
    real_step = opt.step

    def step(*args: Any, **kwargs: Any) -> Any:
        if not first:  # the (reduced) meta-gradient of step 1
            first.update({n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None})
        return real_step(*args, **kwargs)

    opt.step = step  # type: ignore[method-assign]
    result = fit(learner, sampler, opt, STEPS, TASKS, val_episodes=val, val_every=10, log_every=1)
    return {"grad": first, "state": {k: v.clone() for k, v in learner.state_dict().items()},
            "history": result.history, "sampler": sampler.state_dict()["episodes_drawn"]}


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Rank 1 initialises other weights: fit must start every rank from rank 0's.
        results: dict[str, Any] = {name: train(name, init_seed=rank) for name in SPECS}
        torch.manual_seed(7)
        learner = metaxfer.build_learner(SPECS["protonet"]).double()
        episodes = EpisodeSampler(clusters("test"), 5, 1, 2, seed=6).fixed_episodes(7, seed=7)
        results["eval"] = evaluate(learner, episodes, distributed=True).to_dict(with_accuracies=True)
        results["eval_shard"] = list(shard(7))
        try:
            fit(learner, EpisodeSampler(clusters("train"), 5, 1, 2), torch.optim.SGD(learner.parameters(), 0.1), 1, 3)
        except ConfigError as e:
            results["config_error"] = str(e)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ranks")
    torch.multiprocessing.spawn(_worker, args=(2, str(out / "rendezvous"), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(SPECS))
def test_two_processes_train_like_one(two_ranks: list[dict[str, Any]], name: str) -> None:
    one = train(name)
    for rank, got in enumerate(two_ranks):
        mine = got[name]
        assert mine["sampler"] == one["sampler"] == STEPS * TASKS  # every rank drew the whole meta-batches
        assert mine["grad"].keys() == one["grad"].keys()
        for key, g in one["grad"].items():
            torch.testing.assert_close(mine["grad"][key], g, rtol=1e-9, atol=1e-12, msg=f"rank {rank} grad {key}")
        # Parameters and buffers (ProtoNet's BatchNorm running statistics, Reptile's inner Adam moments) after 20 steps.
        for key, value in one["state"].items():
            torch.testing.assert_close(mine["state"][key], value, rtol=1e-8, atol=1e-10, msg=f"rank {rank} {key}")
        assert [r["step"] for r in mine["history"]] == [r["step"] for r in one["history"]]
        for want, rec in zip(one["history"], mine["history"]):
            assert rec["accuracy"] == pytest.approx(want["accuracy"], rel=1e-6)  # learners report float32 means
            # Reptile's surrogate 0.5 ||theta - mean phi||^2 is not a mean over tasks: its value on 2 ranks
            # is the mean of the ranks' surrogates (its gradient, hence training, is exact).
            if not name.startswith("reptile"):
                assert rec["loss"] == pytest.approx(want["loss"], rel=1e-9)
        val_one = [r.get(f"val_{m}") for r in one["history"] for m in ("accuracy", "mse") if f"val_{m}" in r]
        val_two = [r.get(f"val_{m}") for r in mine["history"] for m in ("accuracy", "mse") if f"val_{m}" in r]
        assert val_two == val_one and len(val_one) == 2


@pytest.mark.distributed
def test_evaluation_split_over_two_ranks_equals_one_process(two_ranks: list[dict[str, Any]]) -> None:
    assert [r["eval_shard"] for r in two_ranks] == [[0, 1, 2], [3, 4, 5, 6]]
    torch.manual_seed(7)
    learner = metaxfer.build_learner(SPECS["protonet"]).double()
    episodes = EpisodeSampler(clusters("test"), 5, 1, 2, seed=6).fixed_episodes(7, seed=7)
    one = evaluate(learner, episodes).to_dict(with_accuracies=True)
    for got in two_ranks:
        assert got["eval"]["accuracies"] == one["accuracies"]
        assert (got["eval"]["mean"], got["eval"]["ci95"], got["eval"]["n"]) == (one["mean"], one["ci95"], one["n"])


@pytest.mark.distributed
def test_tasks_not_divisible_by_processes_is_a_config_error(two_ranks: list[dict[str, Any]]) -> None:
    for got in two_ranks:
        assert "train.tasks_per_step=3 cannot be split evenly over 2 processes" in got["config_error"]
        assert "multiple of 2" in got["config_error"]


def test_task_shares_and_divisibility_on_one_process() -> None:
    assert task_slice(6) == slice(0, 6) and list(shard(5)) == [0, 1, 2, 3, 4]
    assert check_tasks_per_step(32, 4) == 8
    with pytest.raises(ConfigError, match=r"tasks_per_step=30 cannot be split evenly over 4 .* multiple of 4 "
                                          r"\(e.g. 28 or 32\).*divisor of 30 \(e.g. 3\)"):
        check_tasks_per_step(30, 4)


def test_running_stats_sync_is_inert_on_one_process() -> None:
    bn = torch.nn.BatchNorm1d(3)
    sync = RunningStatsSync(bn)
    sync.snapshot()
    bn(torch.randn(8, 3))
    before = bn.running_mean.clone()
    sync.merge()
    assert torch.equal(bn.running_mean, before) and int(bn.num_batches_tracked) == 1


# --- torchrun: the CLI on 2 processes, rank 1 killed once, elastic restart from the checkpoint ------------

CLI = [
    "--config", "omniglot/protonet_5w1s", "--no-test",
    "model.backbone_args={in_channels: 1, hidden: 4, image_size: 16}",
    "data.dataset=clusters", "data.args={num_classes: 10, per_class: 6, image_size: 16}",
    "train.ways=5", "train.shots=1", "train.queries=2", "train.tasks_per_step=2", "train.steps=8",
    "train.checkpoint_every=3", "train.val_every=4", "train.val_episodes=4", "train.lr_decay_every=0",
    # SGD, not the preset's Adam: Adam turns the ~1e-17 summation-order noise in the gradients of the conv
    # biases in front of BatchNorm into full-size steps of random sign (this failed CI once).
    "train.optimizer=sgd", "train.lr=0.05", "train.momentum=0.9",
    "eval.ways=5", "eval.queries=2",
]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-00000008"
    return load_file(str(run / "checkpoints" / latest / "model.safetensors"))


@pytest.mark.distributed
def test_torchrun_restarts_a_killed_rank_from_the_last_checkpoint(tmp_path: Path) -> None:
    from metaxfer.cli.main import main

    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT_STEP": "7", "KILL_MARKER": str(tmp_path / "killed")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "1",
           str(HERE / "_torchrun_kill_worker.py"), "-v", "train", "--run-dir", str(tmp_path / "two"), *CLI]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "killed").read_text() == "rank 1 killed at step 7"  # the first attempt really died
    assert "resumed from" in proc.stderr and "step-00000006 at step 6" in proc.stderr  # checkpoint_every=3
    assert "trained 8 steps" in proc.stdout and proc.stdout.count("trained") == 1  # printed by rank 0 only

    assert main(["train", "--run-dir", str(tmp_path / "one"), *CLI]) == 0  # uninterrupted, one process
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert one.keys() == two.keys()
    # Two processes all-reduce half-batch gradients, one process sums all tasks: float32 summation orders differ,
    # and after 8 momentum steps through BatchNorm that shows as up to ~3e-6 on O(1) weights (measured on an AMD
    # EPYC; an Intel Xeon gave less). One step more or less moves the weights by ~4e-2 (median over tensors), far above atol.
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=2e-5, msg=lambda m, key=key: f"{key}: {m}")
    steps = [json.loads(line)["step"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # one history despite the restart
    config = json.loads((tmp_path / "two" / "checkpoints" / "step-00000008" / "config.json").read_text())
    assert config["processes"] == 2
