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


def test_exponent_numbers_are_numbers_everywhere(tmp_path):
    # PyYAML (YAML 1.1) reads "3e-5" as a string; that reached torch.optim.Adam(lr="3e-5") as a TypeError.
    cfg = load_config("omniglot/protonet_5w1s", ["train.lr=3e-5", "train.steps=1e4",
                                                   "model.learner_args={inner_lr: 4E-1}"])
    assert cfg.train.lr == 3e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 10000 and isinstance(cfg.train.steps, int)
    assert cfg.model.learner_args == {"inner_lr": 0.4}
    f = tmp_path / "c.yaml"
    f.write_text("train: {lr: 1e-3, lr_decay: 5e-1}\n")
    assert load_config(str(f)).train.lr_decay == 0.5


@pytest.mark.parametrize("override, message", [
    ("train.lr=fast", r"train.lr must be a number, got 'fast' \(str\)"),
    ("train.steps=2.5", r"train.steps must be an integer, got 2.5 \(float\)"),
    ("eval.ways=true", r"eval.ways must be an integer, got True \(bool\)"),
    ("train.grad_clip=off", r"train.grad_clip must be a number or null, got False \(bool\)"),  # YAML: off is false
    ("train.grad_clip=high", r"train.grad_clip must be a number or null, got .high."),
    ("model.learner_args=5", r"model.learner_args must be a mapping \({key: value, ...}\), got 5 \(int\)"),
])
def test_value_of_the_wrong_type_names_key_and_type(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("omniglot/protonet_5w1s", [override])


def test_optional_and_text_fields_accept_their_values():
    cfg = load_config("omniglot/protonet_5w1s", ["train.grad_clip=null", "data.root=2024", "train.grad_clip=1"])
    assert cfg.train.grad_clip == 1.0 and cfg.data.root == "2024"
