"""`metaxfer finetune`: fine-tune a saved / zoo-style model or a backbone on an image folder, save, load, predict."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import metaxfer
from metaxfer.build import build_learner
from metaxfer.cli.main import main
from metaxfer.cli.predict import predict_folder
from metaxfer.transfer import Baseline, BaselinePlusPlus

SHAPES = ("circle", "cross", "square")
TINY = {"in_channels": 3, "hidden": 4, "image_size": 16}
RGB16 = {"size": 16, "mode": "RGB", "invert": False}


def draw(shape: str, rng: random.Random, size: int = 16) -> Image.Image:
    """A black outline shape on white, jittered by a pixel."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(image)
    o = rng.randint(-1, 1)
    a, b = 3 + o, 12 + o
    if shape == "circle":
        d.ellipse([a, a, b, b], outline=(0, 0, 0), width=2)
    elif shape == "square":
        d.rectangle([a, a, b, b], outline=(0, 0, 0), width=2)
    else:
        d.line([a, a, b, b], fill=(0, 0, 0), width=2)
        d.line([a, b, b, a], fill=(0, 0, 0), width=2)
    return image


def make_folder(root: Path, per_class: int, seed: int, shapes: tuple[str, ...] = SHAPES) -> Path:
    rng = random.Random(seed)
    for shape in shapes:
        (root / shape).mkdir(parents=True)
        for i in range(per_class):
            draw(shape, rng).save(root / shape / f"{i}.png")
    return root


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Path]:
    """train/ 3 classes x 4 PNGs of 16x16, test/ 3 x 2, and a tiny saved ProtoNet (RGB 16x16) to start from."""
    torch.manual_seed(0)
    source = tmp_path / "source"
    metaxfer.save(build_learner({"learner": "protonet", "backbone": "conv4", "backbone_args": TINY}, preprocess=RGB16),
                  source)
    return {"train": make_folder(tmp_path / "train", 4, 0), "test": make_folder(tmp_path / "test", 2, 1),
            "source": source, "out": tmp_path / "out"}


def run(data: dict[str, Path], *extra: str, model: str | None = None) -> int:
    return main(["finetune", "--model", model or str(data["source"]), "--train", str(data["train"]),
                 "--out", str(data["out"]), *extra])


def test_end_to_end_then_load_and_predict(data, capsys):
    assert run(data, "--val", str(data["test"]), "--test", str(data["test"]), "--epochs", "3", "-b", "4") == 0
    out = capsys.readouterr().out
    assert "fine-tuned" in out and "on 12 images of 3 classes (circle, cross, square): 18 steps of batch 4" in out
    assert "val accuracy:" in out and "best epoch:" in out and "test accuracy:" in out and "(95% CI, 6 images)" in out
    learner = metaxfer.load(data["out"])
    assert isinstance(learner, Baseline) and learner.card["class_names"] == list(SHAPES)
    card = learner.card["card"]
    assert card["finetune"]["mode"] == "lpft" and card["finetune"]["lp_steps"] == 9 and card["finetune"]["steps"] == 9
    assert card["results"]["test"]["n"] == 6 and card["results"]["selected"]["stage"] in ("linear_probe", "finetune")
    assert card["command"].startswith("metaxfer finetune --model ") and "--epochs 3" in card["command"]
    assert learner.build_spec["learner_args"] == {"num_base_classes": 3, "feature_dim": 4}
    # The fine-tuned classifier over the user's classes, on the user's images.
    images = [Image.open(p) for p in sorted((data["test"] / "cross").iterdir())]
    logits = learner.head(learner.backbone(learner.preprocess(images)))
    assert logits.shape == (2, 3)
    # ... and the few-shot path (what `metaxfer predict` runs).
    classes, files, probs, _ = predict_folder(learner, data["train"], data["test"])
    assert classes == list(SHAPES) and probs.shape == (6, 3) and len(files) == 6
    assert main(["predict", "--model", str(data["out"]), "--support", str(data["train"]), "--query",
                 str(data["test"]), "--out", "-"]) == 0
    assert capsys.readouterr().out.startswith("file,predicted_class,confidence,circle,cross,square")
    leftovers = [p.name for p in data["out"].parent.iterdir() if p.name.startswith(".")]
    assert not leftovers  # written atomically: no temporary folder left behind


def test_unreadable_image_is_named_and_skipped(data, capsys):
    (data["train"] / "cross" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut off")
    assert run(data, "--epochs", "1") == 0
    captured = capsys.readouterr()
    assert "metaxfer finetune: warning: skipped 1 unreadable images" in captured.err and "broken.png" in captured.err
    assert "on 12 images of 3 classes" in captured.out


def test_full_fine_tuning_learns_the_shapes(data, capsys):
    assert run(data, "--mode", "full", "--epochs", "20", "-b", "4", "--lr", "0.1", "--train-mode",
               "--test", str(data["train"])) == 0
    result = json.loads((data["out"] / "config.json").read_text())["card"]["results"]["test"]
    assert result["accuracy"] > 50.0  # chance is 33 %: the random tiny Conv4 did learn (train images)


def test_linear_mode_keeps_the_backbone_and_drops_a_fixed_head(data, tmp_path, capsys):
    """A MAML model's Conv4 ends in a 5-way classifier: that head goes, its features are fine-tuned (here: kept)."""
    maml = build_learner({"learner": "maml", "backbone": "conv4", "learner_args": {"inner_steps": 1},
                          "backbone_args": {**TINY, "num_classes": 5}}, preprocess=RGB16)
    metaxfer.save(maml, tmp_path / "maml")
    assert run(data, "--mode", "linear", "--epochs", "2", "-b", "4", model=str(tmp_path / "maml")) == 0
    tuned = metaxfer.load(data["out"])
    assert tuned.build_spec["backbone_args"]["num_classes"] is None
    source = maml.model.state_dict()
    for key, value in tuned.backbone.state_dict().items():
        assert torch.equal(value, source[key]), key  # frozen backbone, BatchNorm statistics included
    assert tuned.head.weight.shape == (3, 4)


def test_backbone_by_name_with_cosine_head(data, capsys):
    assert run(data, "--backbone-arg", "hidden=4", "--image-size", "16", "--head", "cosine", "--mode", "full",
               "--epochs", "1", "--freeze", "backbone.features.0", "--layer-lr", "backbone=0.001",
               "--shift", "1", "--hflip", model="conv4") == 0
    learner = metaxfer.load(data["out"])
    assert isinstance(learner, BaselinePlusPlus)
    assert learner.preprocess_spec["size"] == 16 and learner.preprocess_spec["mode"] == "RGB"
    assert learner.build_spec["backbone_args"] == {"hidden": 4, "in_channels": 3}
    assert learner.card["card"]["finetune"]["layer_lrs"] == {"backbone": 0.001}


def test_out_folder_is_not_clobbered(data, capsys):
    assert run(data, "--epochs", "0") == 0
    assert run(data, "--epochs", "0") == 2
    assert "already holds a model; pass --overwrite" in capsys.readouterr().err
    assert run(data, "--epochs", "0", "--overwrite") == 0
    other = data["out"].parent / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["finetune", "--model", str(data["source"]), "--train", str(data["train"]), "--out", str(other),
                 "--overwrite"]) == 2
    assert "not a metaxfer model" in capsys.readouterr().err and (other / "keep.txt").read_text() == "mine"


def test_freeze_pattern_that_matches_nothing(data, capsys):
    assert run(data, "--freeze", "backbone.layer9") == 2
    err = capsys.readouterr().err
    assert "metaxfer finetune: error: --freeze pattern(s) 'backbone.layer9' match no parameter" in err
    assert "available prefixes: backbone, backbone.features" in err and "head" in err
    assert not data["out"].exists()


def test_folder_with_one_class(data, tmp_path, capsys):
    one = make_folder(tmp_path / "one", 2, 0, shapes=("circle",))
    assert main(["finetune", "--model", str(data["source"]), "--train", str(one), "--out", str(data["out"])]) == 2
    assert "1 class folder(s) (circle) but at least 2 are needed to classify; add a folder per class" in \
        capsys.readouterr().err
    assert not data["out"].exists()


def test_class_without_images(data, capsys):
    (data["train"] / "triangle").mkdir()
    assert run(data) == 2
    err = capsys.readouterr().err
    assert "class folder(s) with no images: " in err and "triangle" in err and "or remove the folder" in err


def test_held_out_class_the_model_does_not_know(data, tmp_path, capsys):
    test = make_folder(tmp_path / "other", 1, 2, shapes=("circle", "star"))
    assert run(data, "--test", str(test)) == 2
    assert "has class folder(s) star that the training folder does not" in capsys.readouterr().err


def test_options_that_do_not_apply(data, capsys):
    assert run(data, "--image-size", "32") == 2
    assert "carries the preprocessing it was trained with; drop --image-size" in capsys.readouterr().err
    assert run(data, model="conv4") == 2
    assert "pass --image-size" in capsys.readouterr().err
    assert run(data, model="no-such-model") == 2
    err = capsys.readouterr().err
    assert "is neither a model" in err and "nor a backbone name (conv4, " in err
    assert run(data, "--mode", "full", "--lp-epochs", "3") == 2
    assert "--lp-epochs applies to --mode lpft only" in capsys.readouterr().err


@pytest.mark.parametrize("mode, freeze, message", [
    ("full", ["backbone", "head"], ("nothing left to train: --freeze backbone head covers every parameter that "
                                   "--mode full trains (all of backbone.* and head.*)")),
    # Linear probing trains the head: freezing it leaves nothing, whatever the backbone patterns.
    ("linear", ["head"], ("nothing left to train: --freeze head covers every parameter that --mode linear trains "
                         "(the head, head.*")),
    ("lpft", ["head.*", "backbone"], ("nothing left to train: --freeze head.* backbone covers every parameter that "
                                     "--mode lpft trains")),
    ("lpft", ["head"], "--freeze head covers the whole head, so the linear probe of --mode lpft would train nothing"),
])
def test_freeze_that_leaves_nothing_to_train(data, capsys, mode, freeze, message):
    assert run(data, "--mode", mode, "--freeze", *freeze, "--test", str(data["test"]), "--epochs", "3") == 2
    err = capsys.readouterr().err
    assert f"metaxfer finetune: error: {message}" in err
    assert not data["out"].exists()  # refused before training: no model with untrained weights saved


def test_freeze_that_leaves_part_of_the_head_trains(data, capsys):
    assert run(data, "--mode", "linear", "--freeze", "head.bias", "--epochs", "1") == 0
    assert metaxfer.load(data["out"]).card["card"]["finetune"]["freeze"] == ["head.bias", "backbone"]


def test_layer_lr_on_parameters_that_do_not_train(data, capsys):
    assert run(data, "--mode", "linear", "--layer-lr", "backbone=0.001") == 2
    assert "--layer-lr pattern(s) 'backbone' match only parameters that do not train" in capsys.readouterr().err
    assert not data["out"].exists()


@pytest.mark.parametrize("option, value, message", [
    ("--lr", "-1", "--lr must be > 0 (a learning rate such as 0.01), got -1.0"),
    ("--lr", "0", "--lr must be > 0"),  # trains nothing
    ("--lr", "nan", "--lr must be > 0"),  # turns every weight into nan
    ("--lp-lr", "-0.5", "--lp-lr must be > 0"),
    ("--momentum", "-1", "--momentum must be >= 0 and < 1"),
    ("--momentum", "1", "--momentum must be >= 0 and < 1"),
    ("--weight-decay", "-0.0001", "--weight-decay must be >= 0"),
])
def test_numeric_option_out_of_range(data, capsys, option, value, message):
    assert run(data, option, value) == 2
    err = capsys.readouterr().err
    assert f"metaxfer finetune: error: {message}" in err and "Traceback" not in err
    assert not data["out"].exists()


@pytest.mark.parametrize("value, message", [
    ("backbone=abc", "--layer-lr backbone=abc needs a learning rate, a number > 0, e.g. --layer-lr backbone=0.001"),
    ("backbone=-0.1", "--layer-lr backbone=-0.1 needs a learning rate, a number > 0"),
    ("backbone=true", "--layer-lr backbone=true needs a learning rate"),
    ("backbone", "--layer-lr 'backbone' must look like KEY=VALUE, e.g. --layer-lr backbone=0.001"),
])
def test_bad_layer_lr(data, capsys, value, message):
    assert run(data, "--layer-lr", value) == 2
    err = capsys.readouterr().err
    assert f"metaxfer finetune: error: {message}" in err and "hidden" not in err


def test_backbone_arg_without_value_has_its_own_example(data, capsys):
    assert run(data, "--backbone-arg", "hidden", "--image-size", "16", model="conv4") == 2
    assert "--backbone-arg 'hidden' must look like KEY=VALUE, e.g. --backbone-arg hidden=64" in capsys.readouterr().err


@pytest.mark.parametrize("value, message", [
    ("hidden=abc", ("--backbone-arg hidden=abc: backbone 'conv4' expects an integer for 'hidden', got 'abc' (str) "
                   "(its default: --backbone-arg hidden=64)")),
    ("num_classes=x", ("--backbone-arg num_classes=x: backbone 'conv4' expects an integer or null for "
                      "'num_classes', got 'x'")),
    ("foo=1", "backbone 'conv4' has no argument 'foo' (--backbone-arg foo=1); it takes: in_channels, hidden, "),
    # Values of the right kind that the constructor refuses: its reason, with the arguments it was given.
    ("norm=abc", "backbone 'conv4' cannot be built with norm='abc', in_channels=3: norm must be 'batchnorm'"),
    ("hidden=-1", "backbone 'conv4' cannot be built with hidden=-1, in_channels=3: "),
])
def test_bad_backbone_arg_is_named(data, capsys, value, message):
    assert run(data, "--backbone-arg", value, "--image-size", "16", model="conv4") == 2
    err = capsys.readouterr().err
    assert f"metaxfer finetune: error: {message}" in err and "Traceback" not in err


def test_pretrained_for_a_backbone_without_weights(data, capsys):
    assert run(data, "--pretrained", "--image-size", "32", model="conv4") == 2
    err = capsys.readouterr().err
    assert ("backbone 'conv4' has no pretrained weights, so --pretrained does not apply: drop it to train from "
            "random weights, or use a backbone that has them (efficientnet_lite0)") in err
    assert "unexpected keyword" not in err and "--backbone-arg" not in err
