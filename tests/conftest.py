"""Shared fixtures: tiny synthetic datasets and a fast Conv4."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from metaxfer.data.synthetic import ClusterImages

REPO = Path(__file__).resolve().parents[1]


def shared_omniglot() -> Path | None:
    """The real Omniglot folder, when this machine has it ($METAXFER_DATA or ../shared/data)."""
    for base in (os.environ.get("METAXFER_DATA"), str(REPO.parent / "shared" / "data")):
        if base and (Path(base) / "omniglot" / "images_background.zip").is_file():
            return Path(base) / "omniglot"
    return None


@pytest.fixture
def omniglot_root() -> Path:
    """The real Omniglot folder; skips the test where this machine has none."""
    root = shared_omniglot()
    if root is None:
        pytest.skip("real Omniglot not available (set METAXFER_DATA or put it in ../shared/data)")
    return root


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)


@pytest.fixture
def clusters() -> ClusterImages:
    """20 classes x 10 examples of 1x16x16 images (Gaussian clusters)."""
    return ClusterImages("train", num_classes=20, per_class=10, image_size=16, noise=0.5)


@pytest.fixture
def small_conv4() -> torch.nn.Module:
    """A narrow Conv4 (8 channels) for 16x16 inputs."""
    from metaxfer.backbones import create

    return create("conv4", in_channels=1, hidden=8, image_size=16)


def adam_steps(learner: torch.nn.Module, sampler, steps: int = 30, tasks: int = 2, lr: float = 1e-2) -> list[float]:
    """Meta-train ``learner`` with plain Adam on ``sampler.sample_batch(tasks)``; the loss of every step."""
    opt = torch.optim.Adam(learner.parameters(), lr)
    losses = []
    for _ in range(steps):
        loss = learner.loss(sampler.sample_batch(tasks))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def meta_train():
    """:func:`adam_steps`: the short training loop the learners' "it learns" tests share."""
    return adam_steps


def supervised_steps(learner: torch.nn.Module, data, steps: int = 40, lr: float = 1e-2) -> list[float]:
    """:func:`adam_steps` on supervised batches of 32 examples (``ClassBatchSampler``): transfer pretraining."""
    from metaxfer import ClassBatchSampler

    return adam_steps(learner, ClassBatchSampler(data, batch_size=32, seed=0), steps, tasks=1, lr=lr)


@pytest.fixture(scope="session")
def pretrain():
    """:func:`supervised_steps`, shared by the transfer tests (session scope: module fixtures use it too)."""
    return supervised_steps
