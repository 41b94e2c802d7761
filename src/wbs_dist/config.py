"""Typed run configuration: one flat dataclass, YAML files, `key=value` overrides, checked loudly.

The YAML files under configs/ are runnable documentation; every key is declared here with its type,
default and a check, so an unknown key or a wrong type fails before any work starts, naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from .errors import ConfigError

# Mirrors models.MODELS (tested) so reading a config does not import torch.
MODELS = ("resnet50", "inception_v3", "vgg16", "densenet169", "resnet18")


@dataclass
class Config:
    # --- data -----------------------------------------------------------------------------------
    store: str = "data/store.zarr"            # Zarr store written by `wbs-dist ingest`
    image_height: int = 512                   # training input height (rows), the study's 512
    image_width: int = 256                    # training input width: anterior | posterior side by side
    other_lesions_channel: bool = True        # third channel: mask of the study's other lesions
    # --- folds ----------------------------------------------------------------------------------
    folds: int = 5                            # k of the patient-grouped cross-validation
    fold_seed: int = 0                        # seed of the split; results depend on it
    # --- model ----------------------------------------------------------------------------------
    model: str = "resnet50"                   # resnet50 | inception_v3 | vgg16 | densenet169 (| resnet18: tests)
    weights: str = "imagenet"                 # imagenet (from the torch hub cache) | none
    # --- optimisation (the study: Adam, lr 1e-3, batch 8, 300 epochs, flip 0.5) -------------------
    epochs: int = 300
    batch_size: int = 8                       # per step, summed over all ranks
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"                # constant (the study) | cosine (decays to 0 after warm-up)
    warmup_epochs: int = 0                    # linear warm-up epochs before the schedule
    grad_clip: float = 0.0                    # max gradient norm; 0 = no clipping
    class_weighting: bool = False             # weight malignant by benign/malignant count of the training folds
    flip_p: float = 0.5                       # random horizontal flip, training only
    seed: int = 0                             # every RNG (Python, NumPy, torch, DALI) derives from it
    # --- speed (CUDA only; ignored on CPUs) --------------------------------------------------------
    bf16: bool = True                         # bf16 autocast + channels_last
    compile: bool = False                     # torch.compile the model (slow start, faster steps)
    deterministic: bool = False               # torch deterministic algorithms (bitwise-reproducible GPU runs)
    # --- run --------------------------------------------------------------------------------------
    run_dir: str = "runs/baseline"            # checkpoints, logs, predictions: RUN_DIR/fold<K>/
    num_workers: int = 2                      # loader worker processes per rank (0 = in-process)
    checkpoint_every: int = 200               # steps between mid-epoch checkpoints (0 = epoch ends only)
    dist_timeout_s: float = 600.0             # bound on every DDP collective: a dead rank fails the job
    # --- SLURM (`wbs-dist cv --launcher slurm`): one DDP job per fold, submitted as a job array ---------
    slurm_partition: str = ""                 # empty: the cluster's default partition
    slurm_account: str = ""                   # empty: your default account
    slurm_nodes: int = 1                      # nodes per fold
    slurm_gpus_per_node: int = 0              # 0 on CPU-only clusters
    slurm_tasks_per_node: int = 1             # DDP ranks per node (one per GPU)
    slurm_cpus_per_task: int = 8              # loader workers + the rank itself
    slurm_mem_gb: int = 64                    # per node
    slurm_time_min: int = 2880                # per fold job; a timed-out or preempted fold requeues and resumes
    slurm_signal_delay_s: int = 120           # SIGUSR2 this long before the time limit: time to checkpoint
    slurm_max_retries: int = 2                # resubmissions of a failed fold (requeues do not count)
    slurm_setup: str = ""                     # shell lines run first in each fold job (module load, venv)

    # Checks per key: return an error string or None.
    _CHECKS = {
        "image_height": lambda v: None if v >= 32 else "must be >= 32",
        "image_width": lambda v: None if v >= 32 and v % 2 == 0 else "must be an even number >= 32",
        "folds": lambda v: None if v >= 2 else "must be >= 2",
        "model": lambda v: None if v in MODELS else f"must be one of {', '.join(MODELS)}",
        "weights": lambda v: None if v in ("imagenet", "none") else "must be imagenet or none",
        "epochs": lambda v: None if v >= 1 else "must be >= 1",
        "batch_size": lambda v: None if v >= 1 else "must be >= 1",
        "lr": lambda v: None if v > 0 else "must be > 0",
        "weight_decay": lambda v: None if v >= 0 else "must be >= 0",
        "flip_p": lambda v: None if 0 <= v <= 1 else "must be in [0, 1]",
        "schedule": lambda v: None if v in ("constant", "cosine") else "must be constant or cosine",
        "warmup_epochs": lambda v: None if v >= 0 else "must be >= 0",
        "grad_clip": lambda v: None if v >= 0 else "must be >= 0",
        "checkpoint_every": lambda v: None if v >= 0 else "must be >= 0",
        "dist_timeout_s": lambda v: None if v > 0 else "must be > 0",
        "slurm_nodes": lambda v: None if v >= 1 else "must be >= 1",
        "slurm_gpus_per_node": lambda v: None if v >= 0 else "must be >= 0",
        "slurm_tasks_per_node": lambda v: None if v >= 1 else "must be >= 1",
        "slurm_cpus_per_task": lambda v: None if v >= 1 else "must be >= 1",
        "slurm_mem_gb": lambda v: None if v >= 1 else "must be >= 1",
        "slurm_time_min": lambda v: None if v >= 1 else "must be >= 1",
        "slurm_signal_delay_s": lambda v: None if v >= 0 else "must be >= 0",
        "slurm_max_retries": lambda v: None if v >= 0 else "must be >= 0",
        "num_workers": lambda v: None if v >= 0 else "must be >= 0",
    }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(key: str, value: Any, typ: type) -> Any:
    """Convert a YAML or command-line value to the declared type, or fail naming the key."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"config key {key!r}: expected {typ.__name__}, got {value!r}")


def _apply(cfg: Config, key: str, value: Any, where: str) -> None:
    types = get_type_hints(Config)
    names = {f.name for f in fields(Config)}
    if key not in names:
        raise ConfigError(f"unknown config key {key!r} ({where})")
    setattr(cfg, key, _coerce(key, value, types[key]))


def read_mapping(path: Path, what: str = "config file") -> dict:
    """A YAML file of `key: value`, or a ConfigError naming the file."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}")
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path}: expected a mapping of key: value")
    return raw


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` from the command line. The value is read as a YAML scalar, so `lr=1e-3` and
    `flag=true` mean what they say."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def load_config(path: Path | None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then `key=value` overrides; all checked."""
    cfg = Config()
    if path is not None:
        for key, value in read_mapping(path).items():
            _apply(cfg, str(key), value, f"in {path}")
    for item in overrides:
        _apply(cfg, *parse_override(item), "command-line override")
    for key, check in Config._CHECKS.items():
        problem = check(getattr(cfg, key))
        if problem:
            raise ConfigError(f"config key {key!r}: {problem} (got {getattr(cfg, key)!r})")
    return cfg


def dump_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
