"""Typed run configuration: YAML files and `key=value` overrides, every key checked and documented.

Each key is a dataclass field that carries its own metadata (`key(...)`): help text, a check, and
whether it affects results. The YAML files under configs/ are runnable documentation; `wbs-dist train
--help` lists every key with its help. An unknown key or a wrong type fails before any work starts,
naming the key.

`affects_results` decides what a resumed run may change: a fold rerun with more wall time, another
partition or more epochs resumes; a changed lr is refused (`resume_differences`). It is derived from
the fields, so a new key cannot be forgotten: it must say which it is.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, NamedTuple, get_type_hints

import yaml

from wbs_dist.errors import ConfigError

# The study's network and its three comparisons, then resnet18: a small backbone for CPU tests,
# laptops and the demo. Defined here, not in train/models.py, so reading a config does not import torch.
MODELS = ("resnet50", "inception_v3", "vgg16", "densenet169", "resnet18")
DETECTORS = ("unet", "unet_small")        # task=detect: MONAI residual U-Nets (train/detector.py)


class Size(NamedTuple):
    """A training size HEIGHTxWIDTH: both views side by side, so the width is even."""

    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.height}x{self.width}"

    @classmethod
    def parse(cls, value: Any) -> "Size":
        """'512x256', [512, 256] or (512, 256); ValueError naming what was wrong."""
        if isinstance(value, str):
            parts = value.lower().replace(" ", "").split("x")
        elif isinstance(value, (list, tuple)):
            parts = list(value)
        else:
            raise ValueError(f"expected HEIGHTxWIDTH such as 512x256, got {value!r}")
        try:
            if len(parts) != 2 or any(isinstance(p, (bool, float)) for p in parts):
                raise ValueError
            h, w = (int(p) for p in parts)
        except (TypeError, ValueError):
            raise ValueError(f"expected HEIGHTxWIDTH such as 512x256, got {value!r}") from None
        if h < 8 or w < 8 or w % 2:
            raise ValueError(f"{value!r}: both sides >= 8 and an even width (two views side by side)")
        return cls(h, w)


def key(default: Any, help: str, check: Callable[[Any], str | None] | None = None,
        affects_results: bool = True) -> Any:
    """A config field: its default, one line of help, a check returning an error string or None,
    and whether a resumed run must keep its value."""
    meta = {"help": help, "check": check, "affects_results": affects_results}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def at_least(low, strict: bool = False) -> Callable[[Any], str | None]:
    if strict:
        return lambda v: None if v > low else f"must be > {low}"
    return lambda v: None if v >= low else f"must be >= {low}"


def split_check(v: str) -> str | None:
    return None if v == "" or re.fullmatch(r"[0-9a-f]{16}", v) else "must be empty or 16 hex digits (set by training)"


def one_of(*allowed) -> Callable[[Any], str | None]:
    return lambda v: None if v in allowed else f"must be one of {', '.join(map(str, allowed))}"


# -- values that reach a job script ------------------------------------------------------------------
# submitit writes the slurm_* values, and the log folder under run_dir, into `#SBATCH --key=value`
# lines (shell-quoted, but quoting does not stop a newline: `debug\n#SBATCH --time=1` becomes a
# directive of its own and shell lines after it). So these are checked when the config is read,
# before anything is submitted.
_SLURM_NAME = re.compile(r"[A-Za-z0-9_.-]+")     # ASCII only: partition and account names
# Lines sbatch reads as job directives while it scans the script's leading comments (#PBS and #BSUB:
# sbatch honours them unless --ignore-pbs).
DIRECTIVES = ("#SBATCH", "#PBS", "#BSUB")


def control_chars(text: str, allow: str = "") -> list[str]:
    """The control characters in `text` (C0, DEL, C1, and the Unicode line/paragraph separators,
    which str.splitlines breaks at), as repr()s, except those in `allow`."""
    return sorted({repr(c) for c in text
                   if c not in allow and (unicodedata.category(c) == "Cc" or c in "\u2028\u2029")})


def no_control_chars(where: str) -> Callable[[str], str | None]:
    """A path or name that ends up in a line of a job script or a file name: one line, printable."""
    def test(v: str) -> str | None:
        bad = control_chars(v)
        return f"must not contain control characters ({', '.join(bad)}): {where}" if bad else None
    return test


def slurm_name(several: bool = False) -> Callable[[str], str | None]:
    """Empty (SLURM's default) or a SLURM name; `several`: a comma-separated list of names."""
    def test(v: str) -> str | None:
        if v == "" or all(_SLURM_NAME.fullmatch(n) for n in (v.split(",") if several else [v])):
            return None
        return ("must be empty or " + ("comma-separated SLURM names" if several else "a SLURM name")
                + ": letters, digits, '_', '.', '-' (no spaces, newlines or shell syntax)")
    return test


def shell_lines(v: str) -> str | None:
    """slurm_setup: shell by design, but only lines of it: no control character but the newline,
    and no line that sbatch would take as a directive of the job."""
    bad = control_chars(v, allow="\n")
    if bad:
        return f"must not contain control characters other than newline ({', '.join(bad)})"
    for line in v.replace(";", "\n").splitlines():    # as launch/slurm.py splits it into lines
        if line.lstrip().upper().startswith(DIRECTIVES):
            return (f"line {line.strip()!r} would be read by sbatch as a job directive; "
                    "set resources with the slurm_* keys")
    return None


@dataclass
class Config:
    # --- data -----------------------------------------------------------------------------------
    store: str = key("data/store.zarr", "Zarr store written by `wbs-dist ingest`",
                     no_control_chars("a path, printed in logs and saved in run configs: one line"))
    train_size: Size = key(Size(512, 256), "network input HEIGHTxWIDTH, anterior | posterior side by side; "
                           "task=classify: the store's training level (ingest --train-size) must match; "
                           "task=detect: the detector's own level, made from the stored native views at any size",
                           lambda v: None if v.height >= 32 and v.width >= 32 else "both sides must be >= 32")
    other_lesions_channel: bool = key(True, "third input channel: the mask of the study's other lesions")
    # --- folds ----------------------------------------------------------------------------------
    folds: int = key(5, "k of the patient-grouped cross-validation", at_least(2))
    fold_seed: int = key(0, "seed of the split; results depend on it", at_least(0))
    split: str = key("", "fingerprint of the store's split the run trains on: set by training (leave empty); "
                     "a run made on another split is refused", split_check)
    outer_fold: int = key(-1, "nested cross-validation (set by `wbs-dist tune nested=true`): the outer fold this "
                          "run leaves out entirely, neither trained nor validated on; -1 = none", at_least(-1))
    selected_on: str = key("", "set by `wbs-dist tune` in best.yaml: the sweep that chose lr and batch_size on "
                           "these same folds; cv's metrics.json and report then say so (leave as written)",
                           no_control_chars("written into metrics.json and the report"), affects_results=False)
    # --- model ----------------------------------------------------------------------------------
    task: str = key("classify", "classify (the study: a lesion's malignancy) | detect (the learned lesion "
                    "detector: lesion vs background over the whole study, for scoring archives without delineations)",
                    one_of("classify", "detect"))
    model: str = key("resnet50", "task=classify: resnet50 | inception_v3 | vgg16 | densenet169 (| resnet18: small, "
                     "for tests); task=detect: unet (| unet_small: for tests)", one_of(*MODELS, *DETECTORS))
    target_sensitivity: float = key(0.95, "task=detect: the operating threshold is the highest whose lesion "
                                    "sensitivity on the training folds reaches this",
                                    lambda v: None if 0 < v <= 1 else "must be in (0, 1]")
    non_lesions: int = key(0, "task=classify: add up to this many of each training study's hot-spot finder "
                           "candidates that match no delineated lesion (nor its other-view appearance), hottest "
                           "first, as benign training lesions; they are painted into the study's label map, so "
                           "every training sample of the study also sees them as other lesions, as a scored "
                           "study shows the scorer's candidates. Validation stays the delineated lesions. "
                           "0 = the study's protocol (delineated lesions only)", at_least(0))
    patch_rows: int = key(0, "task=detect: train on patches of this many rows of the whole width (both views), a "
                          "third of them on a lesion (nnU-Net's foreground oversampling); 0 = whole studies; "
                          "validation and scoring always see whole studies", at_least(0))
    weights: str = key("imagenet", "task=classify: imagenet (read from the torch hub cache, never downloaded) | "
                       "none; a detector trains from scratch",
                       one_of("imagenet", "none"))
    # --- optimisation (the study: Adam, lr 1e-3, batch 8, 300 epochs, flip 0.5) -------------------
    epochs: int = key(300, "training epochs; a finished or running fold may be given more", at_least(1),
                      affects_results=False)
    batch_size: int = key(8, "samples per step, summed over all ranks", at_least(1))
    lr: float = key(1e-3, "Adam learning rate", at_least(0, strict=True))
    weight_decay: float = key(0.0, "Adam weight decay", at_least(0))
    schedule: str = key("constant", "constant (the study) | cosine (decays to 0 after warm-up)",
                        one_of("constant", "cosine"))
    warmup_epochs: int = key(0, "linear warm-up epochs before the schedule", at_least(0))
    grad_clip: float = key(0.0, "max gradient norm; 0 = no clipping", at_least(0))
    class_weighting: bool = key(False, "weight malignant by benign/malignant count of the training folds")
    flip_p: float = key(0.5, "random horizontal flip of each view, training only",
                        lambda v: None if 0 <= v <= 1 else "must be in [0, 1]")
    seed: int = key(0, "every RNG (Python, NumPy, torch, DALI) derives from it", at_least(0))
    # --- numerics (CUDA only; ignored on CPUs) -----------------------------------------------------
    bf16: bool = key(True, "CUDA: bf16 autocast + channels_last")
    compile: bool = key(False, "CUDA: torch.compile the model (slow start, faster steps)")
    deterministic: bool = key(False, "torch deterministic algorithms (bitwise-reproducible GPU runs)")
    # --- run: where and how fast; a resumed run may change these ---------------------------------------
    run_dir: str = key("runs/baseline", "checkpoints, logs, predictions: RUN_DIR/fold<K>/",
                       no_control_chars("RUN_DIR/slurm is written into the job script's #SBATCH --output line"),
                       affects_results=False)
    num_workers: int = key(2, "loader worker processes per rank (0 = in-process)", at_least(0),
                           affects_results=False)
    checkpoint_every: int = key(200, "steps between mid-epoch checkpoints (0 = epoch ends only)", at_least(0),
                                affects_results=False)
    dist_timeout_s: float = key(600.0, "bound on every DDP collective: a dead rank fails the job",
                                at_least(0, strict=True), affects_results=False)
    # --- SLURM (`wbs-dist cv --launcher slurm`): one DDP job per fold, submitted as a job array ---------
    slurm_partition: str = key("", "partition, or several comma-separated; empty: the cluster's default",
                               slurm_name(several=True), affects_results=False)
    slurm_account: str = key("", "account; empty: your default", slurm_name(), affects_results=False)
    slurm_nodes: int = key(1, "nodes per fold: one DDP job of slurm_nodes x slurm_tasks_per_node ranks across them",
                           at_least(1), affects_results=False)
    slurm_gpus_per_node: int = key(0, "GPUs per node; 0 on CPU-only clusters", at_least(0), affects_results=False)
    slurm_tasks_per_node: int = key(1, "DDP ranks per node (one per GPU)", at_least(1), affects_results=False)
    slurm_cpus_per_task: int = key(8, "CPUs per rank: loader workers + the rank itself", at_least(1),
                                   affects_results=False)
    slurm_mem_gb: int = key(64, "memory per node, GB", at_least(1), affects_results=False)
    slurm_time_min: int = key(2880, "time limit per fold job; a timed-out or preempted fold requeues and resumes",
                              at_least(1), affects_results=False)
    slurm_signal_delay_s: int = key(120, "SIGUSR2 this long before the time limit: time to checkpoint",
                                    at_least(0), affects_results=False)
    slurm_max_retries: int = key(2, "resubmissions of a failed fold (requeues do not count)", at_least(0),
                                 affects_results=False)
    slurm_setup: str = key("", "shell lines run first in each fold job (module load, venv); ';' or newline "
                           "between lines, no #SBATCH lines", shell_lines, affects_results=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON data (the training size as 'HxW')."""
        return {f.name: (str(v) if isinstance(v, Size) else v) for f in fields(self) for v in [getattr(self, f.name)]}


# Keys of earlier versions, read from old run directories and checkpoints: name -> what replaced it.
LEGACY_KEYS = {"image_height": "train_size", "image_width": "train_size"}


def coerce(key: str, value: Any, typ: Any, what: str = "config key") -> Any:
    """Convert a YAML or command-line value to the declared type, or fail naming the key."""
    if typ is Size:
        try:
            return Size.parse(value)
        except ValueError as exc:
            raise ConfigError(f"{what} {key!r}: {exc}") from None
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
    raise ConfigError(f"{what} {key!r}: expected {getattr(typ, '__name__', typ)}, got {value!r}")


def check(obj, what: str = "config key") -> None:
    """Run every field's own check; the first failure names its key."""
    for f in fields(obj):
        test = f.metadata.get("check")
        problem = test(getattr(obj, f.name)) if test else None
        if problem:
            value = getattr(obj, f.name)
            raise ConfigError(f"{what} {f.name!r}: {problem} (got {str(value) if isinstance(value, Size) else value!r})")


def describe(cls) -> list[dict]:
    """Every key of a config dataclass: name, type, default, help, affects_results."""
    hints = get_type_hints(cls)
    out = []
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append({"name": f.name, "type": getattr(hints[f.name], "__name__", str(hints[f.name])),
                    "default": str(default) if isinstance(default, Size) else default,
                    "help": f.metadata.get("help", ""), "affects_results": f.metadata.get("affects_results", True)})
    return out


def result_keys(cls=Config) -> set[str]:
    """The keys a resumed run must keep: those whose metadata says they affect results."""
    return {f.name for f in fields(cls) if f.metadata.get("affects_results", True)}


def _apply(cfg: Config, key: str, value: Any, where: str, legacy: dict) -> None:
    types = get_type_hints(Config)
    if key in LEGACY_KEYS:
        legacy[key] = value
        return
    if key not in types:
        raise ConfigError(f"unknown config key {key!r} ({where})")
    setattr(cfg, key, coerce(key, value, types[key]))


def _resolve_legacy(cfg: Config, legacy: dict, where: str) -> None:
    if not legacy:
        return
    if set(legacy) != {"image_height", "image_width"}:
        raise ConfigError(f"config keys 'image_height'/'image_width' ({where}) are replaced by "
                          f"'train_size' (HEIGHTxWIDTH, e.g. train_size=512x256)")
    cfg.train_size = coerce("train_size", [legacy["image_height"], legacy["image_width"]], Size)


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


_YAML_COMMENT = re.compile(r"(?:^|\s)#")


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` from the command line. The value is read as a YAML scalar, so `lr=1e-3` and
    `flag=true` mean what they say."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value")
    if control_chars(value) or _YAML_COMMENT.search(value):
        # YAML would drop a comment and read past a newline: `debug\n#SBATCH --time=1` would become
        # 'debug', `source x; #SBATCH ...` 'source x;', and the rest pass unseen. Kept as typed, the
        # key's own check sees all of it (the shell has removed its own comments already).
        return key.strip(), value
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def load_config(path: Path | None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then `key=value` overrides; all checked."""
    cfg = Config()
    legacy: dict = {}
    if path is not None:
        for k, value in read_mapping(path).items():
            _apply(cfg, str(k), value, f"in {path}", legacy)
        _resolve_legacy(cfg, legacy, f"in {path}")
    legacy = {}
    for item in overrides:
        _apply(cfg, *parse_override(item), "command-line override", legacy)
    _resolve_legacy(cfg, legacy, "command-line override")
    check(cfg)
    return cfg


def config_from_dict(data: dict, where: str = "saved config") -> Config:
    """A Config from plain data (`Config.to_dict()`, a checkpoint's or a queued job's), checked; keys of
    earlier versions are read too."""
    cfg = Config()
    legacy: dict = {}
    for k, value in data.items():
        _apply(cfg, str(k), value, where, legacy)
    _resolve_legacy(cfg, legacy, where)
    check(cfg)
    return cfg


def resume_differences(saved: dict, now: Config) -> list[str]:
    """'key: old -> new' for every key that affects results and differs from the saved run's."""
    before = config_from_dict(saved).to_dict()
    after = now.to_dict()
    return [f"{k}: {before[k]!r} -> {after[k]!r}" for k in sorted(result_keys()) if before[k] != after[k]]


def help_text(cls=Config) -> str:
    """Every key with its default and help, for `--help` epilogs."""
    lines = []
    for d in describe(cls):
        mark = "" if d["affects_results"] else "  [may change on resume]"
        default = repr(d["default"]) if isinstance(d["default"], str) and d["default"] == "" else d["default"]
        lines.append(f"  {d['name']} = {default}  ({d['type']}){mark}\n      {d['help']}")
    return "\n".join(lines)


def dump_config(cfg: Config, path: Path) -> None:
    from wbs_dist.atomic import write_text

    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
