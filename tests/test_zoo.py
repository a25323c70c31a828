"""The packaged model zoo loads offline by name and carries its model card."""

import pytest
import torch
from PIL import Image

import metaxfer

ZOO = metaxfer.list_zoo()


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
    """A cheap re-check of the card: 100 of the fixed test episodes, within the card's CI widened by sampling."""
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
    res = metaxfer.evaluate(learner, episodes[:100])
    # The first 100 of the card's episodes: their mean must lie within 4 standard errors of the card's mean.
    assert abs(res.mean - card["mean"]) < 4 * card["std"] / 10 + 1e-6
