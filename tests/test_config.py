"""Configs: the shipped YAML files validate; overrides are typed; unknown keys fail naming the key."""

from pathlib import Path

import pytest

from wbs_dist.config import Config, config_from_dict, load_config
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


# -- values that reach a job script (submitit's #SBATCH lines, the setup lines, the log folder) ------
@pytest.mark.parametrize("key, value", [
    ("slurm_partition", "debug\n#SBATCH --time=1"),
    ("slurm_partition", "debug partition"),
    ("slurm_partition", "debug;touch /tmp/x"),
    ("slurm_partition", "$(id)"),
    ("slurm_partition", "gpu,"),
    ("slurm_account", "proj\n"),
    ("slurm_account", "proj,other"),        # one account, not a list
    ("slurm_account", "`id`"),
    ("slurm_setup", "module load cuda\r\n"),
    ("slurm_setup", "module load cuda\0"),
    ("slurm_setup", "module load\x1bcuda"),
    ("slurm_setup", "#SBATCH --time=1"),
    ("slurm_setup", "module load cuda\n  #SBATCH --partition=other"),
    ("slurm_setup", "module load cuda; #SBATCH --time=1"),
    ("slurm_setup", "#PBS -l walltime=1"),
    ("run_dir", "runs/a\n#SBATCH --time=1"),
    ("run_dir", "runs/a\tb"),
    ("run_dir", "runs/a\rb"),
    ("store", "data/store\n.zarr"),
])
def test_values_that_reach_the_job_script_are_checked_when_read(key, value):
    """In code, in a YAML file and on the command line alike, naming the key."""
    with pytest.raises(ConfigError, match=key):
        config_from_dict({key: value})
    with pytest.raises(ConfigError, match=key):
        load_config(None, [f"{key}={value}"])


def test_a_newline_in_an_override_is_not_cut_off_as_a_yaml_comment():
    # YAML alone reads 'debug\n#SBATCH --time=1' as 'debug' and a comment: the value would pass unseen.
    with pytest.raises(ConfigError, match="slurm_partition.*SLURM name"):
        load_config(None, ["slurm_partition=debug\n#SBATCH --time=1"])


def test_a_yaml_block_in_slurm_partition_names_the_key_and_file(tmp_path):
    (tmp_path / "cv.yaml").write_text("slurm_partition: |\n  debug\n  #SBATCH --time=1\n")
    with pytest.raises(ConfigError, match="'slurm_partition'"):
        load_config(tmp_path / "cv.yaml")


@pytest.mark.parametrize("key, value", [
    ("slurm_partition", "gpu"), ("slurm_partition", "gpu,debug"), ("slurm_partition", "a100-80g_x.1"),
    ("slurm_account", "proj-123_a.b"), ("slurm_account", ""),
    ("slurm_setup", "module load cuda/12.4; source /shared/wbs/.venv/bin/activate"),
    ("slurm_setup", "module load cuda/12.4\nsource \"$HOME/venv/bin/activate\"\n# a comment\n"),
    ("slurm_setup", "echo 'module: command not found' >&2; exit 3"),
    ("run_dir", "/scratch/my runs/baseline"),
])
def test_ordinary_values_still_load(key, value):
    assert getattr(config_from_dict({key: value}), key) == value


@pytest.mark.parametrize("override, key", [
    ("name=..", "name"),
    ("name=.", "name"),
    ("name=lr\nbatch", "name"),
    ("ray_temp_dir=/tmp/ray\n-wbs", "ray_temp_dir"),
    ("storage_path=runs/\0tune", "storage_path"),
    ("base=baseline.yaml\0", "base"),
])
def test_tune_keys_that_name_paths_are_checked(override, key):
    from wbs_dist.launch.tune import load_tune

    with pytest.raises(ConfigError, match=f"tune key '{key}'"):
        load_tune(CONFIGS / "tune.yaml", [override])
