"""`metaxfer predict`: adapt a zoo/trained model to a labelled support folder, write query predictions as CSV."""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import metaxfer
from metaxfer.build import build_learner
from metaxfer.cli.main import main
from metaxfer.cli.predict import predict_folder

ZOO = "protonet-omniglot-5w1s"
SHAPES = ("circle", "cross", "square")


def draw(shape: str, rng: random.Random, size: int = 64, jitter: int = 0) -> Image.Image:
    """Black outline shape on white paper, like a character on Omniglot's paper."""
    image = Image.new("L", (size, size), 255)
    d = ImageDraw.Draw(image)
    o, s = rng.randint(-jitter, jitter), rng.randint(-jitter, jitter)
    a, b = size * (14 + o) // 64, size * (50 + o + s) // 64
    w = max(2, size * 5 // 64)
    if shape == "circle":
        d.ellipse([a, a, b, b], outline=0, width=w)
    elif shape == "square":
        d.rectangle([a, a, b, b], outline=0, width=w)
    else:
        d.line([a, a, b, b], fill=0, width=w)
        d.line([a, b, b, a], fill=0, width=w)
    return image


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """support/{circle,cross,square}/ (2 each) and a nested query folder of 3 per class, mixed sizes and modes."""
    rng = random.Random(0)
    support, query = tmp_path / "support", tmp_path / "query"
    for shape in SHAPES:
        (support / shape).mkdir(parents=True)
        for i in range(2):
            draw(shape, rng, jitter=2).save(support / shape / f"{i}.png")
    (query / "batch2").mkdir(parents=True)
    modes, sizes = ["L", "RGB", "RGBA"], [48, 64, 90]
    for shape in SHAPES:
        for k in range(3):
            image = draw(shape, rng, size=sizes[k], jitter=3).convert(modes[k])
            folder = query / "batch2" if k == 2 else query
            image.save(folder / f"{shape}_{k}.{'jpg' if modes[k] == 'RGB' else 'png'}")
    return support, query


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_predicts_separable_shapes_with_the_zoo_protonet(folders, tmp_path, capsys):
    support, query = folders
    (query / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut off")
    out = tmp_path / "predictions.csv"
    assert main(["predict", "--model", ZOO, "--support", str(support), "--query", str(query), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 unreadable query images" in err and str(query / "broken.png") in err
    assert "predicted 9 image(s) into 3 classes (circle, cross, square)" in err
    header = out.read_text().splitlines()[0]
    assert header == "file,predicted_class,confidence,circle,cross,square"
    rows = read_csv(out)
    assert [r["file"] for r in rows] == sorted(r["file"] for r in rows) and len(rows) == 9
    assert "batch2/circle_2.png" in {r["file"] for r in rows}  # nested, relative to --query
    for r in rows:
        truth = Path(r["file"]).name.split("_")[0]
        assert r["predicted_class"] == truth, r
        probs = [float(r[c]) for c in SHAPES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert float(r["confidence"]) == max(probs) == float(r[truth])


def test_stdout_and_single_query_file(folders, capsys):
    support, query = folders
    assert main(["predict", "--model", ZOO, "--support", str(support), "--query", str(query / "cross_0.png"), "--out", "-"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("file,predicted_class,confidence") and lines[1].startswith("cross_0.png,cross,")


def test_support_with_one_class(folders, tmp_path, capsys):
    _, query = folders
    one = tmp_path / "one"
    (one / "circle").mkdir(parents=True)
    draw("circle", random.Random(0)).save(one / "circle" / "a.png")
    assert main(["predict", "--model", ZOO, "--support", str(one), "--query", str(query), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert "metaxfer predict: error:" in err and "1 class folder(s) (circle) but at least 2 are needed" in err
    assert not (tmp_path / "p.csv").exists()


def test_support_class_without_images(folders, tmp_path, capsys):
    support, query = folders
    (support / "triangle").mkdir()
    assert main(["predict", "--model", ZOO, "--support", str(support), "--query", str(query), "--out", str(tmp_path / "p.csv")]) == 2
    assert "class folder(s) with no images: " in capsys.readouterr().err


def test_unreadable_support_image_is_named_and_rest_used(folders, tmp_path, capsys):
    support, query = folders
    (support / "square" / "bad.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", ZOO, "--support", str(support), "--query", str(query), "--out", str(out)]) == 0
    assert str(support / "square" / "bad.jpg") in capsys.readouterr().err
    assert len(read_csv(out)) == 9


def test_query_folder_without_readable_images(folders, tmp_path, capsys):
    support, _ = folders
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"x")
    assert main(["predict", "--model", ZOO, "--support", str(support), "--query", str(bad), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert "none of the 1 query images" in err and str(bad / "a.png") in err
    assert main(["predict", "--model", ZOO, "--support", str(support), "--query", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_fresh_learner_saved_then_predicted(folders, tmp_path):
    """A tiny freshly built RGB learner (not the zoo) goes through save -> predict with its own preprocessing."""
    support, query = folders
    spec = {"learner": "protonet", "backbone": "conv4", "backbone_args": {"in_channels": 3, "hidden": 4, "image_size": 16}}
    learner = build_learner(spec, preprocess={"size": 16, "mode": "RGB", "invert": False})
    metaxfer.save(learner, tmp_path / "model")
    classes, files, probs, skipped = predict_folder(metaxfer.load(tmp_path / "model"), support, query)
    assert classes == list(SHAPES) and probs.shape == (9, 3) and not skipped and len(files) == 9


def test_model_without_preprocessing(folders, tmp_path, capsys):
    support, query = folders
    spec = {"learner": "protonet", "backbone": "conv4", "backbone_args": {"in_channels": 1, "hidden": 4, "image_size": 16}}
    metaxfer.save(build_learner(spec), tmp_path / "bare")
    assert main(["predict", "--model", str(tmp_path / "bare"), "--support", str(support), "--query", str(query)]) == 2
    assert "carries no image preprocessing" in capsys.readouterr().err


def test_regression_model_cannot_classify_images(folders, tmp_path, capsys):
    """A sinusoid model trained with `metaxfer train` is a regression model, not one missing its preprocessing."""
    support, query = folders
    run = tmp_path / "sin"
    assert main(["train", "--config", "sinusoid/maml_k5", "train.steps=3", "train.val_every=3",
                 "train.val_episodes=3", "eval.episodes=3", "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["predict", "--model", str(run), "--support", str(support), "--query", str(query),
                 "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert "metaxfer predict: error: this model is a regression model (trained on sinusoid tasks)" in err
    assert "cannot classify images" in err and "carries no image preprocessing" not in err
    assert not (tmp_path / "p.csv").exists()
