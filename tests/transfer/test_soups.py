"""Model soups (Wortsman et al. 2022): uniform average of weights, greedy selection, layout errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaxfer.errors import CheckpointError, ConfigError
from metaxfer.transfer import GreedySoup, finetune, greedy_soup, uniform_soup
from metaxfer.transfer.finetune import BodyHead


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _trained(seed: int) -> nn.Module:
    """Run a few training steps so the BatchNorm buffers (and num_batches_tracked) differ between models."""
    net = _net(seed).train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(seed + 1):
        net(torch.randn(8, 3, generator=g))
    return net


def test_uniform_soup_is_the_mean_of_the_weights():
    nets = [_trained(s) for s in range(3)]
    before = [{k: v.clone() for k, v in n.state_dict().items()} for n in nets]
    soup = uniform_soup(nets)
    assert list(soup) == list(nets[0].state_dict())  # the first model's key order
    for key, value in soup.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, torch.stack([b[key] for b in before]).mean(0))
    # num_batches_tracked counts steps (1, 2, 3 here): not averaged, the first model's is kept.
    assert soup["1.num_batches_tracked"].dtype == torch.int64 and int(soup["1.num_batches_tracked"]) == 1
    # The inputs are untouched.
    assert all(torch.equal(b[k], v) for b, n in zip(before, nets) for k, v in n.state_dict().items())
    assert all(soup[k].data_ptr() != v.data_ptr() for k, v in nets[0].state_dict().items())  # new tensors
    model = _net(9)
    model.load_state_dict(soup)  # ready to load
    mixed = uniform_soup([nets[0], nets[1].state_dict()])  # modules and state dicts mix
    torch.testing.assert_close(mixed["0.weight"], (before[0]["0.weight"] + before[1]["0.weight"]) / 2)


def test_single_model_soup_is_a_copy_and_half_precision_keeps_its_dtype():
    net = _net(0)
    soup = uniform_soup([net])
    assert all(torch.equal(soup[k], v) for k, v in net.state_dict().items())
    halves = [{"w": torch.full((2,), v, dtype=torch.float16)} for v in (1.0, 2.0, 4.0)]
    out = uniform_soup(halves)["w"]
    assert out.dtype == torch.float16 and torch.allclose(out.float(), torch.full((2,), 7 / 3), atol=1e-3)


def test_soup_of_finetuned_copies():
    """The use the paper makes of it: models fine-tuned from ONE start with different seeds."""
    torch.manual_seed(0)
    start = BodyHead(nn.Sequential(nn.Linear(4, 6), nn.ReLU()), nn.Linear(6, 3))
    x, y = torch.randn(12, 4), torch.arange(3).repeat(4)
    tuned = [finetune(start, x, y, steps=5, lr=0.1, batch_size=4, seed=s) for s in range(3)]
    soup = uniform_soup(tuned)
    torch.testing.assert_close(soup["head.weight"], torch.stack([t.head.weight for t in tuned]).mean(0))


def test_mismatched_models_name_the_key():
    a, b = _net(0).state_dict(), _net(1).state_dict()
    with pytest.raises(CheckpointError, match=r"model 1 has no key '2\.bias' that model 0 has"):
        uniform_soup([a, {k: v for k, v in b.items() if k != "2.bias"}])
    with pytest.raises(CheckpointError, match=r"model 2 has key 'extra' that model 0 does not"):
        uniform_soup([a, b, {**b, "extra": torch.zeros(1)}])
    wider = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 5)).state_dict()
    with pytest.raises(CheckpointError, match=r"key '2\.weight' has shape \(5, 4\) in model 1 but \(2, 4\) in model 0"):
        uniform_soup([a, wider])
    with pytest.raises(CheckpointError, match=r"key '0\.weight' is torch.float64 in model 1"):
        uniform_soup([a, {**b, "0.weight": b["0.weight"].double()}])
    with pytest.raises(CheckpointError, match=r"key 'idx' is a torch.int64 entry that differs"):
        uniform_soup([{"idx": torch.tensor([0, 1])}, {"idx": torch.tensor([1, 0])}])
    with pytest.raises(ConfigError, match="at least one model"):
        uniform_soup([])
    with pytest.raises(ConfigError, match="model 1 is a str"):
        uniform_soup([a, "model.pt"])
    with pytest.raises(ConfigError, match="at least one candidate"):
        greedy_soup([], lambda s: 0.0)
    with pytest.raises(CheckpointError, match="'2.bias'"):  # checked before anything is evaluated
        greedy_soup([a, {k: v for k, v in b.items() if k != "2.bias"}], lambda s: pytest.fail("evaluated"))


def _scalar_models(values: list[float]) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.tensor([v])} for v in values]


def test_greedy_soup_keeps_and_rejects_by_held_out_score():
    # Held-out score: closeness of the single weight to 1.0 (a fake evaluate function).
    calls: list[float] = []

    def score(state: dict[str, torch.Tensor]) -> float:
        calls.append(float(state["w"]))
        return -abs(float(state["w"]) - 1.0)

    # Individual scores: 0.8 -> -0.2, 1.3 -> -0.3, 3.0 -> -2.0, 1.1 -> -0.1. Order: 1.1, 0.8, 1.3, 3.0.
    result = greedy_soup(_scalar_models([0.8, 1.3, 3.0, 1.1]), score)
    assert isinstance(result, GreedySoup)
    # 1.1 alone (-0.1); + 0.8 -> mean 0.95 (-0.05): kept; + 1.3 -> mean 1.0667 (-0.0667): dropped below -0.05,
    # rejected; + 3.0 -> mean 1.6333: rejected.
    assert result.ingredients == [3, 0]
    assert result.score == pytest.approx(-0.05)
    torch.testing.assert_close(result.state_dict["w"], torch.tensor([0.95]))
    assert result.scores == pytest.approx([-0.2, -0.3, -2.0, -0.1])
    assert calls[:4] == pytest.approx([0.8, 1.3, 3.0, 1.1])  # each candidate once, then the trial soups
    assert calls[4:] == pytest.approx([0.95, (1.1 + 0.8 + 1.3) / 3, (1.1 + 0.8 + 3.0) / 3])


def test_greedy_soup_keeps_an_equal_score_and_uses_given_scores():
    flat = greedy_soup(_scalar_models([1.0, 2.0, 3.0]), lambda s: 0.5, scores=[0.5, 0.5, 0.5])
    assert flat.ingredients == [0, 1, 2]  # "does not drop": ties are kept; stable order
    torch.testing.assert_close(flat.state_dict["w"], torch.tensor([2.0]))
    worse = greedy_soup(_scalar_models([1.0, 2.0]), lambda s: float("nan"), scores=[0.0, 1.0])
    assert worse.ingredients == [1] and worse.score == 1.0  # a NaN trial is rejected
    torch.testing.assert_close(worse.state_dict["w"], torch.tensor([2.0]))
    with pytest.raises(ConfigError, match="2 scores for 3 candidates"):
        greedy_soup(_scalar_models([1.0, 2.0, 3.0]), lambda s: 0.0, scores=[1.0, 2.0])
    with pytest.raises(ConfigError, match=r"candidate\(s\) \[1\] is NaN"):
        greedy_soup(_scalar_models([1.0, 2.0]), lambda s: 0.0, scores=[1.0, float("nan")])
