import pytest

from metaxfer.config import list_presets, load_config
from metaxfer.errors import ConfigError


def test_presets_exist_and_load():
    names = list_presets()
    for required in ["omniglot/protonet_5w1s", "omniglot/protonet_20w1s", "omniglot/protonet_5w5s",
                     "omniglot/protonet_20w5s", "omniglot/maml_5w1s", "omniglot/maml_20w1s",
                     "omniglot/maml_5w5s", "omniglot/maml_20w5s", "omniglot/protonet_lake_20w1s"]:
        assert required in names
        cfg = load_config(required)
        assert cfg.description and cfg.eval.episodes == 600


def test_overrides_are_typed():
    cfg = load_config("omniglot/protonet_5w1s", ["train.steps=7", "train.lr=0.01", "data.root=/x", "eval.ways=20"])
    assert cfg.train.steps == 7 and cfg.train.lr == 0.01 and cfg.data.root == "/x" and cfg.eval.ways == 20


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) train.stepz; valid keys under train: .*steps"):
        load_config("omniglot/protonet_5w1s", ["train.stepz=7"])
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) optimiser; valid keys: data, description, device"):
        load_config("omniglot/protonet_5w1s", ["optimiser=adam"])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="unknown preset or config file 'omniglot/protonet_3w1s'; presets: .*omniglot/protonet_5w1s"):
        load_config("omniglot/protonet_3w1s")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("omniglot/protonet_5w1s", ["train.steps"])


def test_yaml_file_path(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: mine\ntrain: {steps: 3}\n")
    assert load_config(str(f)).train.steps == 3
