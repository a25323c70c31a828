"""MANN (Santoro et al. 2016): offset labels, LRUA writes, cosine reads, the contract, learning, per-instance accuracy, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import metaxfer
from metaxfer.config import load_config
from metaxfer.data.synthetic import ClusterImages
from metaxfer.errors import ConfigError, EpisodeError
from metaxfer.learners import MANN
from metaxfer.learners.memory import (
    MemoryState,
    PixelEncoder,
    cosine_read_weights,
    instance_accuracy,
    least_used_weights,
    offset_labels,
    per_instance_accuracy,
)
from metaxfer.tasks import Episode, EpisodeSampler


def small(ways: int = 5, size: int = 16, **kwargs) -> MANN:
    """A small MANN over raw pixels of 1 x size x size images."""
    args = {"hidden": 32, "memory_slots": 24, "memory_width": 8, "read_heads": 2, **kwargs}
    return MANN(PixelEncoder(1, size), ways=ways, **args)


def test_offset_labels_are_the_previous_steps_label():
    y = torch.tensor([[2, 0, 1, 1], [0, 0, 2, 1]])
    off = offset_labels(y, 3)
    assert off.shape == (2, 4, 3)
    assert torch.equal(off[:, 0], torch.zeros(2, 3))  # t = 0: no label yet
    assert torch.equal(off[:, 1:], F.one_hot(y[:, :-1], 3).float())  # t: the label of t - 1


def test_the_controller_sees_x_t_and_the_label_of_t_minus_1():
    learner = small(ways=3, size=4)
    seen = []
    learner.controller.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    x, y = torch.randn(2, 5, 1, 4, 4), torch.tensor([[2, 0, 1, 1, 0], [1, 1, 0, 2, 2]])
    learner.sequence_logits(x, y)
    inputs = torch.stack(seen, 1)  # [B, L, D + ways + heads * width]
    assert torch.equal(inputs[..., :16], x.flatten(2))
    assert torch.equal(inputs[..., 16:19], offset_labels(y, 3))
    assert torch.equal(inputs[:, 0, 19:], torch.zeros(2, 2 * 8))  # no read vector before the first step


def test_cosine_read_weights_by_hand():
    keys = torch.tensor([[[1.0, 0.0], [1.0, 2.0]]])  # [B=1, heads=2, width=2]
    memory = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])  # [B=1, slots=3, width=2]
    w = cosine_read_weights(keys, memory)
    s2, s5 = 2**-0.5, 5**-0.5
    for head, cos in enumerate([[1.0, 0.0, s2], [s5, 2 * s5, 3 * s2 * s5]]):
        e = [math.exp(c) for c in cos]
        assert torch.allclose(w[0, head], torch.tensor([v / sum(e) for v in e]), atol=1e-6)
    # A read is the weighted sum of the rows: r = sum_i w(i) M(i).
    r = w @ memory
    assert torch.allclose(r[0, 0], w[0, 0, 0] * memory[0, 0] + w[0, 0, 1] * memory[0, 1] + w[0, 0, 2] * memory[0, 2])


def test_least_used_weights_pick_distinct_least_used_slots_with_deterministic_ties():
    usage = torch.tensor([[3.0, 0.5, 2.0, 0.1, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]])
    lu = least_used_weights(usage, 3)
    assert lu.shape == (2, 3, 5)
    assert lu[0].argmax(-1).tolist() == [3, 1, 4]  # ascending usage; the 0.5 tie goes to the lower index
    assert lu[1].argmax(-1).tolist() == [0, 1, 2]


def _forced_gate(learner: MANN, value: float) -> None:
    """Make sigmoid(alpha) = 0 (write to the least-used slot) or 1 (write to the previously read slot)."""
    with torch.no_grad():
        learner.gate.weight.zero_()
        learner.gate.bias.fill_(value)


def _state(learner: MANN, usage: torch.Tensor, read_weights: torch.Tensor | None = None) -> MemoryState:
    state = learner.initial_state(1)
    memory = torch.randn(1, learner.memory_slots, learner.memory_width)
    rw = read_weights if read_weights is not None else torch.zeros(1, learner.read_heads, learner.memory_slots)
    return state._replace(memory=memory, usage=usage, read_weights=rw)


def test_lrua_write_zeroes_and_fills_the_least_used_slot():
    torch.manual_seed(0)
    learner = MANN(PixelEncoder(1, 2), ways=2, hidden=8, memory_slots=6, memory_width=3, read_heads=1, gamma=0.9)
    _forced_gate(learner, -50.0)  # sigmoid(alpha) ~ 0: w^w = w^lu_{t-1}
    usage = torch.tensor([[3.0, 0.5, 2.0, 0.1, 4.0, 1.0]])
    state = _state(learner, usage)
    new, out = learner.step(state, torch.randn(1, 4 + 2))
    keys = torch.tanh(learner.key(new.h)).view(1, 1, 3)
    # Slot 3 (usage 0.1) was cleared, then received the key: its old content is gone.
    assert torch.allclose(new.memory[0, 3], keys[0, 0], atol=1e-6)
    others = [0, 1, 2, 4, 5]
    assert torch.allclose(new.memory[0, others], state.memory[0, others], atol=1e-6)  # untouched
    # The read is cosine-addressed on the memory after the write (eqs. 2-4 on M_t) ...
    w = cosine_read_weights(keys, new.memory)
    assert torch.allclose(new.read_weights, w, atol=1e-6)
    assert torch.allclose(new.reads, w @ new.memory, atol=1e-6)
    assert torch.allclose(out, torch.cat([new.h, new.reads.flatten(1)], -1))
    # ... and usage decays and adds this step's read and write weights (eq. 5).
    write = F.one_hot(torch.tensor([3]), 6).float()
    assert torch.allclose(new.usage, 0.9 * usage + w[:, 0] + write, atol=1e-5)


def test_lrua_write_with_an_open_gate_updates_the_previously_read_slot():
    torch.manual_seed(0)
    learner = MANN(PixelEncoder(1, 2), ways=2, hidden=8, memory_slots=6, memory_width=3, read_heads=2)
    _forced_gate(learner, 50.0)  # sigmoid(alpha) ~ 1: w^w = w^r_{t-1}
    usage = torch.tensor([[3.0, 0.5, 2.0, 0.1, 4.0, 1.0]])
    read = torch.zeros(1, 2, 6)
    read[0, 0, 5] = read[0, 1, 2] = 1.0  # head 0 last read slot 5, head 1 slot 2
    state = _state(learner, usage, read)
    new, _ = learner.step(state, torch.randn(1, 4 + 2))
    keys = torch.tanh(learner.key(new.h)).view(1, 2, 3)
    assert torch.allclose(new.memory[0, 5], state.memory[0, 5] + keys[0, 0], atol=1e-6)
    assert torch.allclose(new.memory[0, 2], state.memory[0, 2] + keys[0, 1], atol=1e-6)
    # The least-used slots of the two heads (3, then 1) are still cleared before the write, per the paper.
    assert torch.allclose(new.memory[0, [1, 3]], torch.zeros(2, 3), atol=1e-6)
    assert torch.allclose(new.memory[0, [0, 4]], state.memory[0, [0, 4]])


def test_the_first_writes_go_to_fresh_slots():
    learner = small(ways=3, size=4)
    _forced_gate(learner, -50.0)
    x, y = torch.randn(1, 3, 1, 4, 4), torch.tensor([[0, 1, 2]])
    feats = learner.encode(x[0]).unsqueeze(0)
    _, state = learner.run(feats, y)
    # Two heads, three steps, least-used writing: six distinct slots were written, the rest keep their 1e-6.
    written = (state.memory[0].abs() > 1e-4).any(-1)
    assert int(written.sum()) == 6


@pytest.mark.parametrize("encoder", ["pixels", "conv4"])
def test_shapes_batched_and_adapt(clusters, small_conv4, encoder):
    backbone = PixelEncoder(1, 16) if encoder == "pixels" else small_conv4
    learner = MANN(backbone, ways=5, hidden=32, memory_slots=32, memory_width=8, read_heads=2)
    batch = EpisodeSampler(clusters, 5, 2, 3, seed=0).sample_batch(3)
    loss = learner.loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and 0.0 <= learner.last_metrics["accuracy"] <= 1.0
    x = torch.cat([batch.support_x, batch.query_x], 1)
    y = torch.cat([batch.support_y, batch.query_y], 1)
    assert learner.sequence_logits(x, y).shape == (3, 25, 5)
    logits = learner.adapt(batch.support_x[0], batch.support_y[0])(batch.query_x[0])
    assert logits.shape == (15, 5) and torch.isfinite(logits).all()
    loss.backward()
    for name, p in learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_tasks_run_together_as_the_batch_dimension(clusters):
    learner = small(shuffle=False)
    batch = EpisodeSampler(clusters, 5, 2, 2, seed=0).sample_batch(3)
    together = learner.loss(batch)
    alone = torch.stack([learner.loss(batch.task(t)) for t in range(3)]).mean()
    assert torch.allclose(together, alone, atol=1e-5)


def test_loss_shuffles_support_and_query_into_one_sequence(clusters):
    learner = small()
    batch = EpisodeSampler(clusters, 5, 2, 2, seed=0).sample_batch(2)
    captured = {}
    original = learner.sequence_logits

    def spy(x, y):
        captured["x"], captured["y"] = x, y
        return original(x, y)

    learner.sequence_logits = spy  # an instance attribute: the class is untouched
    learner.loss(batch)
    y = captured["y"]
    assert y.shape == (2, 20)
    for t in range(2):  # every task keeps its examples (and each example its label), in a new order
        assert sorted(y[t].tolist()) == sorted(torch.cat([batch.support_y[t], batch.query_y[t]]).tolist())
        pool = torch.cat([batch.support_x[t], batch.query_x[t]]).flatten(1)
        labels = torch.cat([batch.support_y[t], batch.query_y[t]])
        for x_i, y_i in zip(captured["x"][t].flatten(1), y[t]):
            assert labels[(pool == x_i).all(1)].item() == y_i.item()
    assert not torch.equal(y[0], torch.cat([batch.support_y[0], batch.query_y[0]]))


def test_predictor_is_the_next_step_of_the_support_sequence(clusters):
    learner = small(eval_order_seed=None)
    ep = EpisodeSampler(clusters, 5, 2, 3, seed=2).sample()
    logits = learner.adapt(ep.support_x, ep.support_y)(ep.query_x)
    for i in range(len(ep.query_y)):
        x = torch.cat([ep.support_x, ep.query_x[i : i + 1]]).unsqueeze(0)
        y = torch.cat([ep.support_y, ep.query_y[i : i + 1]]).unsqueeze(0)
        with torch.no_grad():
            seq = learner.sequence_logits(x, y)
        assert torch.allclose(logits[i], seq[0, -1], atol=1e-5)


def test_adapt_shuffles_the_support_with_its_own_seed(clusters):
    ep = EpisodeSampler(clusters, 5, 2, 3, seed=2).sample()
    learner = small(eval_order_seed=3)
    state = torch.get_rng_state()
    a = learner.adapt(ep.support_x, ep.support_y)(ep.query_x)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is not consumed
    assert torch.equal(learner.adapt(ep.support_x, ep.support_y)(ep.query_x), a)
    perm = torch.randperm(len(ep.support_y), generator=torch.Generator().manual_seed(3))
    learner.eval_order_seed = None
    assert torch.allclose(learner.adapt(ep.support_x[perm], ep.support_y[perm])(ep.query_x), a, atol=1e-6)


def test_not_transductive_and_adapt_does_not_mutate(clusters, small_conv4):
    learner = MANN(small_conv4, ways=5, hidden=32, memory_slots=32, memory_width=8, read_heads=2)
    learner.train()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    ep = EpisodeSampler(clusters, 5, 1, 4, seed=1).sample()
    predict = learner.adapt(ep.support_x, ep.support_y)
    full = predict(ep.query_x)
    perm = torch.randperm(len(ep.query_x))
    assert torch.allclose(predict(ep.query_x[perm]), full[perm], atol=1e-5)
    other = predict(torch.cat([ep.query_x[:1], torch.randn(7, 1, 16, 16) * 5]))
    assert torch.allclose(other[:1], full[:1], atol=1e-5)  # one query's memory write never reaches another
    assert torch.allclose(predict(ep.query_x), full)  # the predictor keeps no state between calls
    assert learner.training and all(torch.equal(before[k], v) for k, v in learner.state_dict().items())
    assert learner.transductive is False and learner.order is None


def test_per_instance_accuracy_on_a_constructed_example():
    labels = torch.tensor([[0, 1, 0, 2, 1, 0], [1, 1, 1, 0, 0, 0]])
    preds = torch.tensor([[0, 2, 0, 2, 0, 1], [1, 0, 1, 0, 0, 0]])
    acc = per_instance_accuracy(preds, labels, instances=(1, 2, 3, 4))
    # Row 0: first instances at steps 0, 1, 3 (right, wrong, right); second at 2, 4 (right, wrong); third at 5 (wrong).
    assert torch.allclose(acc[1], torch.tensor([2 / 3, 1.0]))  # row 1: first instances at 0 and 3, both right
    assert torch.allclose(acc[2], torch.tensor([0.5, 0.5]))  # row 1: steps 1 (wrong) and 4 (right)
    assert torch.allclose(acc[3], torch.tensor([0.0, 1.0]))
    assert torch.isnan(acc[4]).all()  # no class appears four times
    with pytest.raises(ValueError, match="1-based"):
        per_instance_accuracy(preds, labels, instances=(0,))


def test_instance_accuracy_is_seeded_and_matches_sequence_logits(clusters):
    learner = small()
    episodes = EpisodeSampler(clusters, 5, 2, 1, seed=0).fixed_episodes(7, seed=0)
    a = instance_accuracy(learner, episodes, instances=(1, 2, 3), seed=4, batch_size=3)
    b = instance_accuracy(learner, episodes, instances=(1, 2, 3), seed=4)
    assert set(a) == {1, 2, 3} and all(v.shape == (7,) for v in a.values())
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # the batching does not matter
    g = torch.Generator().manual_seed(4)
    x, y = [], []
    for ep in episodes:  # the documented protocol, by hand
        perm = torch.randperm(15, generator=g)
        x.append(torch.cat([ep.support_x, ep.query_x])[perm])
        y.append(torch.cat([ep.support_y, ep.query_y])[perm])
    with torch.no_grad():
        preds = learner.sequence_logits(torch.stack(x), torch.stack(y)).argmax(-1)
    by_hand = per_instance_accuracy(preds, torch.stack(y), (1, 2, 3))
    assert all(torch.allclose(a[k], by_hand[k]) for k in a)
    # Sequences of different lengths run in separate batches; results stay in episode order.
    longer = EpisodeSampler(clusters, 5, 3, 1, seed=0).fixed_episodes(2, seed=0)
    mixed = instance_accuracy(learner, [*episodes, *longer], instances=(1, 4), seed=4)
    assert mixed[1].shape == (9,) and torch.allclose(mixed[1][:7], instance_accuracy(learner, episodes, (1,), seed=4)[1])
    assert torch.isnan(mixed[4][:7]).all() and not torch.isnan(mixed[4][7:]).any()  # only the longer have a 4th


def test_learns_to_recall_labels_on_gaussian_clusters():
    """Instance-2 accuracy (a class seen once before, chance 1/3) rises well above chance."""
    torch.manual_seed(0)
    train = ClusterImages("train", num_classes=1000, per_class=10, image_size=4, noise=0.5)
    test = ClusterImages("test", num_classes=50, per_class=10, image_size=4, noise=0.5)
    learner = MANN(PixelEncoder(1, 4), ways=3, hidden=64, memory_slots=32, memory_width=16, read_heads=1)
    episodes = EpisodeSampler(test, 3, 3, 1, seed=0).fixed_episodes(100, seed=0)  # 3 classes x 4 instances
    before = instance_accuracy(learner, episodes, instances=(2,))[2].mean()
    sampler = EpisodeSampler(train, 3, 3, 1, seed=0)
    opt = torch.optim.Adam(learner.parameters(), lr=2e-2)
    for _ in range(400):
        opt.zero_grad()
        learner.loss(sampler.sample_batch(16)).backward()
        opt.step()
    after = instance_accuracy(learner, episodes, instances=(2,))[2].mean()
    assert after > 0.55 and after > before + 0.15, (before, after)


def test_bad_inputs_say_what_to_change(clusters):
    learner = small(ways=5, memory_slots=8)
    big = EpisodeSampler(clusters, 5, 1, 2, seed=0).sample_batch(1)  # 10 queries per task, 8 slots
    with pytest.raises(EpisodeError, match=r"query set of 10 examples per task is larger than the memory \(8 slots\)"):
        learner.loss(big)
    wide = EpisodeSampler(clusters, 6, 1, 1, seed=0).sample_batch(1)
    with pytest.raises(EpisodeError, match=r"labels 0\.\.5 but this MANN was built for ways=5.*ways=6"):
        small(ways=5).loss(wide)
    with pytest.raises(EpisodeError, match="built for ways=5"):
        small(ways=5).adapt(wide.support_x[0], wide.support_y[0])
    with pytest.raises(EpisodeError, match=r"to 64 features but the controller was built for feature_dim=256"):
        small().adapt(torch.randn(5, 1, 8, 8), torch.arange(5))
    ep = EpisodeSampler(clusters, 5, 1, 1, seed=0).sample()
    with pytest.raises(EpisodeError, match="same x_shape"):
        small().loss(Episode(ep.support_x, ep.support_y, torch.randn(5, 1, 8, 8), ep.query_y))
    with pytest.raises(EpisodeError, match="adapt takes ONE task"):
        small().adapt(ep.support_x.unsqueeze(0), ep.support_y.unsqueeze(0))
    with pytest.raises(EpisodeError, match="integer class indices"):
        small().adapt(ep.support_x, ep.support_y.float())
    with pytest.raises(ConfigError, match="read_heads=9 exceeds memory_slots=8"):
        small(memory_slots=8, read_heads=9)
    with pytest.raises(ConfigError, match="feature_dim"):
        MANN(torch.nn.Flatten())
    with pytest.raises(ConfigError, match="gamma"):
        small(gamma=1.5)


def test_preset_builds_and_save_load(tmp_path, clusters):
    cfg = load_config("omniglot/mann_5w")
    assert (cfg.train.ways, cfg.train.shots + cfg.train.queries) == (5, 10)  # the paper's 5 classes x 10 instances
    learner = metaxfer.build_learner(cfg.model)
    assert isinstance(learner, MANN) and learner.feature_dim == 400 and learner.memory_slots == 128
    spec = {"learner": "mann", "learner_args": {"ways": 5, "hidden": 16, "memory_slots": 16, "memory_width": 4},
            "backbone": "pixels", "backbone_args": {"image_size": 16}}
    learner = metaxfer.build_learner(spec)
    learner.loss(EpisodeSampler(clusters, 5, 1, 1, seed=0).sample_batch(2)).backward()
    metaxfer.save(learner, tmp_path / "m")
    loaded = metaxfer.load(tmp_path / "m")
    ep = EpisodeSampler(clusters, 5, 1, 3, seed=3).sample()
    a = learner.adapt(ep.support_x, ep.support_y)(ep.query_x)
    assert torch.allclose(a, loaded.adapt(ep.support_x, ep.support_y)(ep.query_x), atol=1e-6)
