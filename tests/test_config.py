"""Configs: the shipped YAML files validate; overrides are typed; unknown keys fail naming the key."""

from pathlib import Path

import pytest

from wbs_dist.config import Config, load_config
from wbs_dist.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_baseline_is_the_study_protocol():
    cfg = load_config(CONFIGS / "baseline.yaml")
    assert (cfg.model, cfg.weights, cfg.lr, cfg.batch_size, cfg.epochs, cfg.flip_p, cfg.folds) == \
        ("resnet50", "imagenet", 1e-3, 8, 300, 0.5, 5)
    assert cfg.train_size == (512, 256) and str(cfg.train_size) == "512x256"


def test_every_shipped_config_validates():
    from wbs_dist.launch.tune import load_tune

    for path in CONFIGS.glob("*.yaml"):
        if path.name == "tune.yaml":      # a search over a training config, with its own schema
            load_tune(path)
        else:
            load_config(path)


def test_overrides_are_parsed_as_typed_values():
    cfg = load_config(CONFIGS / "baseline.yaml", ["lr=5e-4", "batch_size=16", "other_lesions_channel=false"])
    assert cfg.lr == 5e-4 and cfg.batch_size == 16 and cfg.other_lesions_channel is False


@pytest.mark.parametrize("override, key", [
    ("learning_rate=0.1", "learning_rate"),
    ("lr=fast", "lr"),
    ("lr=-1", "lr"),
    ("model=resnet101", "model"),
    ("batch_size=2.5", "batch_size"),
    ("flip_p=2", "flip_p"),
    ("epochs", "epochs"),
])
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(CONFIGS / "baseline.yaml", [override])


def test_bad_yaml_files(tmp_path):
    (tmp_path / "a.yaml").write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match="'epoch'"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    assert load_config(None) == Config()


def test_config_knows_every_model():
    from wbs_dist import config
    from wbs_dist.train import models

    assert config.MODELS == models.MODELS
