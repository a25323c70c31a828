"""The packaged model zoo loads offline by name and carries its model card."""

import pytest
import torch
from PIL import Image

import metaxfer

ZOO = metaxfer.list_zoo()
# Episodes re-checked per model in the slow test: 100, fewer where an episode is costly (eight learned
# update steps; 20-way relation scores over 300 x 20 pairs; Reptile's 50 inner Adam steps: 100 episodes took
# 324 s beside two training jobs), so that the suite stays within CI's budget.
CHECK_EPISODES = {"lstm-meta-omniglot-5w5s": 30, "relation-omniglot-20w1s": 40, "reptile-omniglot-5w1s": 20}


def test_zoo_lists_packaged_models():
    assert all(name.count("-") >= 2 for name in ZOO)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_loads_by_name_with_card(name):
    learner = metaxfer.load(name)
    card = learner.card["card"]
    for key in ("accuracy", "train_command", "commit", "machine", "date", "result"):
        assert card[key], key
    assert "95% CI" in card["accuracy"] and card["train_command"].startswith("metaxfer train")
    x = learner.preprocess([Image.new("L", (105, 105), 255)])
    assert x.shape == (1, 1, 28, 28)
    predict = learner.adapt(torch.rand(5, 1, 28, 28), torch.arange(5))
    assert predict(torch.rand(3, 1, 28, 28)).shape == (3, 5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_accuracy_on_real_omniglot(name, omniglot_root):
    """A cheap re-check of the card: the first n of its fixed test episodes, within 4 standard errors of its mean."""
    from metaxfer.build import build_dataset
    from metaxfer.config import config_from_dict
    from metaxfer.tasks import EpisodeSampler

    learner = metaxfer.load(name)
    card = learner.card["card"]["result"]
    cfg = config_from_dict(learner.card["run_config"])
    cfg.data.root = str(omniglot_root)
    test = build_dataset(cfg.data, cfg.data.test_split)
    episodes = EpisodeSampler(test, card["ways"], card["shots"], card["queries"], seed=card["seed"]).fixed_episodes(
        card["n"], seed=card["seed"])
    assert episodes.fingerprint == card["fingerprint"]  # the very episodes the card was measured on
    n = CHECK_EPISODES.get(name, 100)
    res = metaxfer.evaluate(learner, episodes[:n])
    assert abs(res.mean - card["mean"]) < 4 * card["std"] / n**0.5 + 1e-6
