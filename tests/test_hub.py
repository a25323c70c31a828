import json

import pytest
import torch

import metaxfer
from metaxfer.errors import CheckpointError

SPEC = {"learner": "protonet", "backbone": "conv4", "backbone_args": {"hidden": 8, "image_size": 16}}


def test_save_load_roundtrip(tmp_path):
    learner = metaxfer.build_learner(SPEC)
    with torch.no_grad():
        next(learner.parameters()).add_(1.0)
    metaxfer.save(learner, tmp_path / "m", extra={"card": {"note": "x"}})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = metaxfer.load(tmp_path / "m")
    assert type(loaded) is type(learner) and not loaded.training
    for (k, a), (_, b) in zip(learner.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.card["card"] == {"note": "x"}


def test_checkpoint_of_another_model(tmp_path):
    metaxfer.save(metaxfer.build_learner(SPEC), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model"]["backbone_args"]["hidden"] = 16
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"holds the weights of another model: shape mismatches \['backbone"):
        metaxfer.load(tmp_path / "m")


def test_truncated_weights(tmp_path):
    metaxfer.save(metaxfer.build_learner(SPEC), tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupted"):
        metaxfer.load(tmp_path / "m")


def test_damaged_or_foreign_config(tmp_path):
    metaxfer.save(metaxfer.build_learner(SPEC), tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable metaxfer config"):
        metaxfer.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not a metaxfer learner config"):
        metaxfer.load(tmp_path / "m")


def test_nothing_there(tmp_path):
    with pytest.raises(CheckpointError, match="no model at"):
        metaxfer.load(tmp_path / "nothing")


def test_learner_without_spec_cannot_be_rebuilt(tmp_path):
    metaxfer.save(metaxfer.ProtoNet(torch.nn.Linear(2, 2)), tmp_path / "m")
    with pytest.raises(CheckpointError, match="does not say how to build the model"):
        metaxfer.load(tmp_path / "m")


def test_preprocess_travels_with_the_model(tmp_path):
    from PIL import Image

    from metaxfer.data import ImagePreprocess

    spec = ImagePreprocess(size=16).to_dict()
    learner = metaxfer.build_learner(SPEC, preprocess=spec)
    metaxfer.save(learner, tmp_path / "m")
    loaded = metaxfer.load(tmp_path / "m")
    img = Image.new("L", (105, 105), 255)
    x = loaded.preprocess([img, img])
    assert x.shape == (2, 1, 16, 16) and torch.equal(x, ImagePreprocess.from_dict(spec)([img, img]))
    with pytest.raises(RuntimeError, match="carries no preprocessing"):
        metaxfer.ProtoNet(torch.nn.Identity()).preprocess([img])
