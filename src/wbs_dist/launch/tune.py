"""`wbs-dist tune`: Ray Tune over learning rate x batch size around the study's Adam 1e-3 / batch 8.

The objective is the mean validation AUC over all folds. A trial trains every fold, interleaved epoch
by epoch (FoldTrainer's open / train_epoch / finish), and reports the running mean after each epoch,
so ASHA stops a poor configuration on all folds at once. Everything a trial trains lives in its own
directory, EXPERIMENT/<trial id>/run/fold<K>/ (FoldTrainer's checkpoints, metrics, predictions), so a
paused or restored trial resumes exactly where it was; the Ray checkpoint reported with each epoch is
only a small JSON (run directory, epochs reported) for Tune's bookkeeping.

Rerunning the same command after an interruption restores the experiment (`Tuner.restore`): finished
trials are kept, unfinished and errored ones continue from their checkpoints. The end: results.csv and
results.md (every trial: lr, batch, epochs run, mean and per-fold AUC), printed too, and best.yaml, a
complete training config for `wbs-dist train` / `cv`.

The tune YAML (configs/tune.yaml) holds the search and names the training config as `base`; overrides
address tune keys by name and the base config's keys as `train.<key>` (e.g. `train.epochs=3`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from wbs_dist.atomic import write_text
from wbs_dist.scratch import default_ray_dir, private_ray_dir
from wbs_dist.config import (Config, at_least, check, coerce, control_chars, key, load_config, no_control_chars,
                             parse_override, read_mapping, result_keys)
from wbs_dist.errors import ConfigError, UsageError, WbsError
from wbs_dist.launch.tune_results import (METRIC, OBJECTIVES, fold_column, metric,  # noqa: F401 (the API)
                                         results_markdown, write_results)

log = logging.getLogger("wbs_dist.tune")

TRAIN_PREFIX = "train."
PROGRESS_FILE = "progress.json"
# A Ray worker started by `srun` (SLURM) or torchrun inherits its rank variables; a trial is one
# process, never a rank of that step.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "SLURM_PROCID")


@dataclass
class TuneSpec:
    base: str = key("baseline.yaml", "training config; in the YAML relative to it, on the command line to the cwd",
                    no_control_chars("a path to read"), affects_results=False)
    # --- the search --------------------------------------------------------------------------------
    lr_min: float = key(1e-4, "lr ~ log-uniform [lr_min, lr_max]", at_least(0, strict=True))
    lr_max: float = key(1e-2, "upper end of the lr range (>= lr_min)")
    batch_sizes: list = key([4, 8, 16, 32], "batch size ~ uniform choice among these",
                            lambda v: None if v and all(b >= 1 for b in v) else "must be a non-empty list of integers >= 1")
    scale_lr_with_batch: bool = key(False, "trial lr = sampled lr x batch / the base config's batch_size")
    num_samples: int = key(16, "trials", at_least(1))
    seed: int = key(0, "the search's draws; training seeds come from train.seed", at_least(0))
    nested: bool = key(False, "nested cross-validation: for each outer fold a search on the inner folds of its "
                       "training patients, the choice retrained on all of them and graded on the outer fold "
                       "(an unbiased estimate; about k-1 times the plain sweep's training)")
    # --- ASHA ---------------------------------------------------------------------------------------
    max_epochs: int = key(0, "epochs a trial may run (0 = the base config's epochs)")
    grace_period: int = key(1, "epochs every trial runs before it can be stopped", at_least(1))
    reduction_factor: int = key(3, "keep the top 1/reduction_factor at each rung", at_least(2))
    # --- resources: where and how fast, not what; a restored sweep may change them ---------------------
    cpus_per_trial: float = key(1.0, "CPUs per trial", at_least(0, strict=True), affects_results=False)
    gpus_per_trial: float = key(0.0, "GPUs per trial; fractions share a GPU between trials", at_least(0),
                                affects_results=False)
    cpus: int = key(0, "CPUs of a local Ray instance (0 = all); ignored with RAY_ADDRESS", at_least(0),
                    affects_results=False)
    ray_temp_dir: str = key("", "a folder of yours (made 0700) for local Ray's session files, which go in its r/ "
                            "(empty: /tmp/ray-wbs-<your uid>); short: socket paths must fit 107 bytes",
                            no_control_chars("Ray builds its session and socket paths from it"),
                            affects_results=False)
    # --- where --------------------------------------------------------------------------------------
    storage_path: str = key("runs/tune", "experiments go to STORAGE_PATH/NAME/ (relative to the cwd)",
                            no_control_chars("the trials' run directories and logs are under it"))
    # One folder under storage_path: no '/', and not '.' or '..', which would name storage_path or its parent.
    name: str = key("lr_batch", "the experiment's name",
                    lambda v: None if v not in ("", ".", "..") and "/" not in v and not control_chars(v)
                    else "must be a non-empty name without '/' or control characters, not '.' or '..'")

    def check_together(self) -> None:
        """The checks that relate two keys."""
        if self.lr_max < self.lr_min:
            raise ConfigError(f"tune key 'lr_max': must be >= lr_min (got {self.lr_max!r})")
        if not 1 <= self.grace_period <= self.max_epochs:
            raise ConfigError(f"tune key 'grace_period': must be in [1, max_epochs] (got {self.grace_period!r})")

    @property
    def experiment_dir(self) -> Path:
        return Path(self.storage_path) / self.name


def restorable_keys() -> set[str]:
    """What may change when an interrupted sweep is restored: the keys that do not affect results,
    the sweep's and the training config's (as train.<key>)."""
    return ({f.name for f in fields(TuneSpec)} - result_keys(TuneSpec)) | \
        {TRAIN_PREFIX + k for k in {f.name for f in fields(Config)} - result_keys(Config)}


def _set(spec: TuneSpec, key_: str, value: Any, where: str) -> None:
    types = {f.name: f.type for f in fields(TuneSpec)}
    if key_ not in types:
        raise ConfigError(f"unknown tune key {key_!r} ({where}); training config keys are given as "
                          f"'{TRAIN_PREFIX}<key>' on the command line")
    if key_ == "batch_sizes":
        if not isinstance(value, list):
            raise ConfigError(f"tune key 'batch_sizes': expected a list such as [4, 8, 16, 32], got {value!r}")
        value = [coerce("batch_sizes", v, int, "tune key") for v in value]
    else:
        value = coerce(key_, value, {"float": float, "int": int, "bool": bool, "str": str}[types[key_]], "tune key")
    setattr(spec, key_, value)


def load_tune(path: Path, overrides: list[str] = ()) -> tuple[TuneSpec, Config]:
    """The tune YAML, then `key=value` / `train.key=value` overrides; the base config loaded and both checked.

    Paths come back absolute (trials run in Ray workers with another working directory)."""
    spec = TuneSpec()
    for k, value in read_mapping(path, "tune config file").items():
        _set(spec, str(k), value, f"in {path}")
    spec.base = str(Path(path).parent / spec.base)
    train_overrides = []
    for item in overrides:
        k, value = parse_override(item)
        if k.startswith(TRAIN_PREFIX):
            train_overrides.append(item[len(TRAIN_PREFIX):])
        else:
            _set(spec, k, value, "command-line override")
    check(spec, "tune key")     # before the paths are used: a NUL in one fails the OS calls with a traceback
    base = load_config(Path(spec.base), train_overrides)
    if base.task == "detect" and spec.nested:
        raise ConfigError("nested=true grades each outer fold with the classifier's report; a detector's sweep "
                          "(train.task=detect) is a plain one: leave nested out")
    base.store = str(Path(base.store).resolve())
    spec.base = str(Path(spec.base).resolve())
    spec.storage_path = str(Path(spec.storage_path).resolve())
    spec.max_epochs = spec.max_epochs or base.epochs
    check(spec, "tune key")
    spec.check_together()
    return spec, base


# -- one trial ---------------------------------------------------------------------------------------
def trial_lr(spec: TuneSpec, base: Config, params: dict) -> float:
    scale = params["batch_size"] / base.batch_size if spec.scale_lr_with_batch else 1.0
    return float(params["lr"]) * scale


def trial_config(spec: TuneSpec, base: Config, params: dict, run_dir: Path) -> Config:
    # Checkpoints at epoch ends only: each fold's epoch is then seeded afresh (_seed_fold_epoch), so
    # interleaving folds and restoring in the middle of a round leave the arithmetic unchanged.
    return dataclasses.replace(base, lr=trial_lr(spec, base, params), batch_size=int(params["batch_size"]),
                               epochs=spec.max_epochs, run_dir=str(run_dir), checkpoint_every=0)


def _seed_fold_epoch(seed: int, fold: int, epoch: int) -> None:
    """The folds of a trial share the process's global RNGs (dropout); seed each fold's epoch from
    (seed, fold, epoch) so that it does not depend on what ran before it in this process."""
    import numpy as np
    import torch

    value = int(np.random.SeedSequence(entropy=seed, spawn_key=(fold, epoch)).generate_state(1)[0]) & 0x7FFFFFFF
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def _trial(params: dict, spec: TuneSpec, base: Config) -> None:
    import ray
    import torch
    from ray import tune

    from wbs_dist.train.trainer import FoldTrainer

    for var in RANK_VARIABLES:
        os.environ.pop(var, None)
    cfg = trial_config(spec, base, params, spec.experiment_dir / tune.get_context().get_trial_id() / "run")
    reported = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            reported = json.loads((Path(d) / PROGRESS_FILE).read_text())["epochs"]
    # A nested search's run never sees its outer fold: the trial's folds are the inner ones.
    trainers = [FoldTrainer(cfg, k) for k in range(cfg.folds) if k != cfg.outer_fold]
    try:
        for t in trainers:
            t.open(preemption=False)
        # After open(), which sizes torch's threads for a SLURM task: a trial has only its own CPUs.
        torch.set_num_threads(max(1, int(spec.cpus_per_trial)))
        key = OBJECTIVES[cfg.task][0]          # the task's validation metric: its metrics.csv column
        for epoch in range(reported, cfg.epochs):
            aucs = []
            for t in trainers:
                # A fold may already be past `epoch` (it trained before an interruption that came
                # before the report): its row is in its history, nothing is trained twice.
                while t.epoch <= epoch:
                    _seed_fold_epoch(cfg.seed, t.fold, t.epoch)
                    t.train_epoch()
                aucs.append(t.history[epoch][key])
            if None in aucs:
                raise UsageError(f"fold {trainers[aucs.index(None)].fold}: {key} undefined (validation lesions of one "
                                 "class only, or none); use fewer folds (train.folds) or more annotated patients")
            # The node id: trials of a sweep over several nodes (slurm/tune.sh -N2) say where they ran.
            metrics = {"epochs": epoch + 1, metric(cfg.task): sum(aucs) / len(aucs),
                       "node": ray.get_runtime_context().get_node_id(),
                       **{fold_column(t.fold, cfg.task): a for t, a in zip(trainers, aucs)}}
            if epoch + 1 == cfg.epochs:
                # Before the last report: Tune ends the trial there (ASHA's max_t) without returning.
                for t in trainers:
                    t.finish()
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / PROGRESS_FILE).write_text(json.dumps({"run_dir": cfg.run_dir, "epochs": epoch + 1}))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
    finally:
        for t in trainers:
            t.close()


# -- the sweep ---------------------------------------------------------------------------------------
def search_space(spec: TuneSpec) -> dict:
    from ray import tune

    return {"lr": tune.loguniform(spec.lr_min, spec.lr_max), "batch_size": tune.choice(spec.batch_sizes)}


def _sweep_record(spec: TuneSpec, base: Config) -> dict:
    return {**dataclasses.asdict(spec), **{TRAIN_PREFIX + k: v for k, v in base.to_dict().items()}}


def pin_split(base: Config) -> Config:
    """The base config pinned to the store's split (made here when missing, before any trial: trials
    would otherwise race to write it). Every trial's folds, sweep.yaml and best.yaml carry it, and a
    trial's fold refuses a store re-split meanwhile: a sweep never compares trials of two splits."""
    from wbs_dist.data.folds import check_split, ensure_folds, split_fingerprint
    from wbs_dist.data.store import Store

    store = Store.open(base.store)
    ensure_folds(store, base.folds, base.fold_seed)
    now = split_fingerprint(store)
    check_split("the config (key 'split')", base.split, store, now, (base.folds, base.fold_seed))
    return dataclasses.replace(base, split=now)


def _check_restorable(exp: Path, spec: TuneSpec, base: Config) -> None:
    from wbs_dist.data.folds import check_split
    from wbs_dist.data.store import Store

    saved = yaml.safe_load((exp / "sweep.yaml").read_text())
    now = _sweep_record(spec, base)
    split = TRAIN_PREFIX + "split"
    # A sweep from before splits were recorded: its trials' folds still check their checkpoints.
    saved.setdefault(split, now[split])
    check_split(f"the sweep in {exp}", saved[split], Store.open(base.store), now[split],
                (saved.get(TRAIN_PREFIX + "folds"), saved.get(TRAIN_PREFIX + "fold_seed")))
    restorable = restorable_keys()
    diff = sorted(k for k in set(saved) | set(now) if k not in restorable and saved.get(k) != now.get(k))
    if diff:
        raise ConfigError(f"{exp} holds a sweep with other settings ("
                          + ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
                          + "); restore those values or choose another name/storage_path")


def _ray_init(spec: TuneSpec) -> None:
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])      # a head started by slurm/tune.sh (or any cluster)
    else:
        ray.init(num_cpus=spec.cpus or None, include_dashboard=False,
                 _temp_dir=private_ray_dir(spec.ray_temp_dir or str(default_ray_dir())))


def run_sweep(spec: TuneSpec, base: Config, param_space: dict | None = None, early_stopping: bool = True) -> list[dict]:
    """Run (or restore and finish) the experiment; one row per trial. `param_space` replaces the
    random search (bench/tune.py passes a grid); `early_stopping=False` runs every trial to the end."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    exp = spec.experiment_dir
    base = pin_split(base)
    restore = tune.Tuner.can_restore(exp)
    if restore:
        _check_restorable(exp, spec, base)
    # Frequent experiment-state snapshots are intended here (see num_to_keep below): no warning.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    trainable = tune.with_resources(tune.with_parameters(_trial, spec=spec, base=base),
                                    {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial})
    _ray_init(spec)
    try:
        if restore:
            log.info("restoring the sweep in %s: finished trials are kept, the others continue", exp)
            tuner = tune.Tuner.restore(str(exp), trainable, resume_errored=True)
        else:
            exp.mkdir(parents=True, exist_ok=True)
            write_text(exp / "sweep.yaml", yaml.safe_dump(_sweep_record(spec, base), sort_keys=False))
            scheduler = ASHAScheduler(time_attr="epochs", max_t=spec.max_epochs, grace_period=spec.grace_period,
                                      reduction_factor=spec.reduction_factor) if early_stopping else None
            tuner = tune.Tuner(
                trainable,
                param_space=param_space or search_space(spec),
                tune_config=tune.TuneConfig(
                    metric=metric(base.task), mode="max", scheduler=scheduler, num_samples=spec.num_samples,
                    search_alg=BasicVariantGenerator(random_state=spec.seed),
                    # The trial directory is named by the trial id, which the trial knows: its run
                    # directory is found again after a restore.
                    trial_dirname_creator=lambda trial: trial.trial_id,
                    # A fresh process per trial: a stopped trial's loaders and threads go with it.
                    reuse_actors=False),
                # num_to_keep=1 also makes Tune save its experiment state with every trial checkpoint
                # (every epoch), not only every 10 s: a kill loses no reported epoch.
                run_config=tune.RunConfig(name=spec.name, storage_path=spec.storage_path,
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                          verbose=1))
        grid = tuner.fit()
    finally:
        ray.shutdown()
    if grid.num_terminated + grid.num_errors < len(grid):     # SIGINT/SIGUSR1: Tune saved its state and stopped
        raise WbsError(f"the sweep was interrupted with trials still running; rerun the same command to resume it "
                       f"from {exp}")
    return _rows(grid, spec, base)


def _rows(grid, spec: TuneSpec, base: Config) -> list[dict]:
    rows = []
    for res in grid:
        metrics = res.metrics or {}
        epochs = int(metrics.get("epochs", 0))
        status = "error" if res.error else "completed" if epochs >= spec.max_epochs else "stopped"
        row = {"trial": Path(res.path).name, "status": status, "lr": trial_lr(spec, base, res.config),
               "batch_size": int(res.config["batch_size"]), "epochs": epochs,
               metric(base.task): metrics.get(metric(base.task)), "node": metrics.get("node")}
        row.update({fold_column(k, base.task): metrics.get(fold_column(k, base.task)) for k in range(base.folds)})
        if res.error:
            row["error"] = str(res.error).strip().splitlines()[-1]
        rows.append(row)
    m = metric(base.task)
    rows.sort(key=lambda r: (r["status"] != "completed", -r["epochs"], -(r[m] if r[m] is not None else -math.inf)))
    return rows


@dataclass
class TuneResult:
    experiment: Path
    rows: list[dict]                 # every trial, best first among the completed
    best: dict | None                # the completed trial with the highest mean AUC; None if none completed

    @property
    def errored(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "error"]


def tune(spec: TuneSpec, base: Config) -> TuneResult:
    """Run (or restore and finish) the sweep and write its results; raises WbsError when no trial
    ran to the end."""
    base = pin_split(base)          # best.yaml names the split its lr and batch size were chosen on
    rows = run_sweep(spec, base)
    best = write_results(rows, spec, base)
    result = TuneResult(spec.experiment_dir, rows, best)
    for r in result.errored:
        log.error("trial %s failed: %s (log: %s)", r["trial"], r["error"], result.experiment / r["trial"] / "error.txt")
    return result
