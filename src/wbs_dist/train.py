"""One fold's training: train on the other folds, validate on fold K every epoch. Imports no launcher.

The same function runs as one process (CPU or one GPU) or as one rank of a DDP job: `dist.detect()`
reads torchrun's or SLURM's environment, so `wbs-dist train`, `torchrun ... -m wbs_dist.cli train`,
`srun wbs-dist train` and the submitit / Ray launchers all end up here unchanged.

Run directory RUN_DIR/fold<K>/:
    config.yaml        the resolved config          train.log        the log (rank 0)
    metrics.csv        one row per epoch            events.*         TensorBoard scalars
    last.pt (+.prev)   newest checkpoint            best.pt          weights of the best validation AUC
    predictions.csv    validation predictions of the final epoch (DESIGN 3.3)
    done.json          written last: the fold is finished (a rerun does nothing)

The predictions are those of the final epoch, not the best one: picking the epoch on the validation
fold would report an optimistic AUC. best.pt is kept for inspection.

Checkpoints hold model, optimiser, scheduler, every RNG state and the loader position, and are
written atomically every `checkpoint_every` steps and at each epoch end. A run directory with a
checkpoint resumes from it. SIGUSR2/SIGTERM set a flag; every rank stops after the same step, rank 0
saves, and the process exits with PREEMPTED_EXIT_CODE (75) so the launcher requeues it.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F

from . import dist
from .checkpoint import (PREEMPTED_EXIT_CODE, PreemptionFlag, apply_state, capture_rng_state, load_checkpoint,
                         make_state, restore_rng_state, save_checkpoint)
from .atomic import write_csv
from .config import Config, dump_config
from .dataset import LesionIndex, lesion_index
from .errors import ConfigError, UsageError
from .folds import write_folds
from .loader import LesionLoader
from .models import AUX_LOSS_WEIGHT, build_model, split_logits
from .store import TUMOR_TYPES, VIEWS, Store, int_to_key

log = logging.getLogger("wbs_dist.train")

# The FoldTrainer at work in this thread. Several trainers can share a process (tune interleaves a
# trial's folds, Ray runs trials in threads), while logging handlers are process-wide: each fold's
# train.log takes only the records logged while its own trainer works.
_working: contextvars.ContextVar = contextvars.ContextVar("wbs_dist_fold_trainer", default=None)


class _OwnRecords(logging.Filter):
    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer

    def filter(self, record) -> bool:
        return _working.get() is self.trainer


def _at_work(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        token = _working.set(self)
        try:
            return method(self, *args, **kwargs)
        finally:
            _working.reset(token)

    return wrapper

PREDICTION_COLUMNS = ("patient_id", "study_uid", "lesion_id", "view", "fold", "label", "score", "tumor_type",
                      "lesion_count")
# Config keys that do not change the arithmetic of a run: a resumed run may differ in these only.
RESUMABLE_DIFFERENCES = {"epochs", "num_workers", "checkpoint_every", "dist_timeout_s", "run_dir"}


class Preempted(SystemExit):
    def __init__(self):
        super().__init__(PREEMPTED_EXIT_CODE)


@dataclass
class FoldResult:
    fold: int
    run_dir: Path
    epochs: int
    val_auc: float | None
    val_loss: float
    predictions: Path


def fold_dir(cfg: Config, fold: int) -> Path:
    return Path(cfg.run_dir) / f"fold{fold}"


def ensure_folds(store: Store, cfg: Config, env: dist.DistEnv) -> None:
    """Training creates the split when the store has none; an existing split must match the config."""
    if not (store.path / "folds" / "zarr.json").exists():
        if env.is_main:
            write_folds(store, cfg.folds, cfg.fold_seed)
        dist.barrier()
    attrs = json.loads((store.path / "folds" / "zarr.json").read_text())["attributes"]
    if (attrs["k"], attrs["seed"]) != (cfg.folds, cfg.fold_seed):
        raise ConfigError(f"config keys 'folds'/'fold_seed' ({cfg.folds}, {cfg.fold_seed}) differ from the store's "
                          f"split ({attrs['k']}, {attrs['seed']}); results depend on the split: match the config "
                          f"or run `wbs-dist folds {store.path} --k {cfg.folds} --seed {cfg.fold_seed} --force`")


def _lr_factor(cfg: Config, epoch_progress: float) -> float:
    """Multiplier of lr at a (fractional) epoch: linear warm-up, then constant or cosine."""
    if cfg.warmup_epochs and epoch_progress < cfg.warmup_epochs:
        return (epoch_progress + 1e-9) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        span = max(cfg.epochs - cfg.warmup_epochs, 1e-9)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (epoch_progress - cfg.warmup_epochs) / span)))
    return 1.0


def _gather_objects(obj) -> list:
    boxes = [None] * tdist.get_world_size()
    tdist.all_gather_object(boxes, obj)
    return boxes


def _gather(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Concatenate per-rank arrays on every rank (validation predictions are small)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return arrays
    boxes = [None] * tdist.get_world_size()
    tdist.all_gather_object(boxes, arrays)
    return [np.concatenate([b[i] for b in boxes]) for i in range(len(arrays))]


class FoldTrainer:
    def __init__(self, cfg: Config, fold: int, require_resume: bool = False):
        self.cfg, self.fold = cfg, fold
        self.env = dist.detect()
        self.dir = fold_dir(cfg, fold)
        self.require_resume = require_resume

    # -- set-up ------------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg, env = self.cfg, self.env
        dist.init_process_group(env, timeout_s=cfg.dist_timeout_s)
        self.rank_seed = dist.seed_everything(cfg.seed, env.rank)
        # Use the CPUs SLURM gave this task, not every core of the node (ranks would oversubscribe it).
        if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
            torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
        self.device = torch.device(env.device)
        self.cuda = self.device.type == "cuda"
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        store = Store.open(cfg.store)
        ensure_folds(store, cfg, env)
        if not 0 <= self.fold < cfg.folds:
            raise ConfigError(f"--fold {self.fold} out of range: config key 'folds' is {cfg.folds} (0..{cfg.folds - 1})")
        others = [f for f in range(cfg.folds) if f != self.fold]
        self.train_index = lesion_index(store, others, cfg.image_height, cfg.image_width, cfg.other_lesions_channel)
        self.val_index = lesion_index(store, [self.fold], cfg.image_height, cfg.image_width, cfg.other_lesions_channel)

        model = build_model(cfg.model, self.train_index.channels, cfg.weights,
                            input_size=(cfg.image_height, cfg.image_width)).to(self.device)
        if self.cuda and env.world_size > 1:
            # The study's batch 8 spread over GPUs leaves 1-2 samples a GPU: batch statistics must be
            # the global batch's. (SyncBatchNorm is CUDA-only; on CPUs see _sync_buffers.)
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if self.cuda and cfg.bf16:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = math.ceil(len(self.train_index) / cfg.batch_size)
        self.steps_per_epoch = max(1, steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: _lr_factor(cfg, step / self.steps_per_epoch))
        pos = self.train_index.label.sum()
        neg = len(self.train_index) - pos
        self.pos_weight = torch.tensor(neg / max(pos, 1.0) if cfg.class_weighting else 1.0, device=self.device)

        # Resume: everything above is built first, the state applied last (checkpoint.apply_state).
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history: list[dict] = []
        self.best_auc = -1.0
        state = load_checkpoint(self.dir / "last.pt")
        if state is None and self.require_resume:
            raise UsageError(f"--resume: no checkpoint in {self.dir}")
        if state is not None:
            self._check_resumable(state["config"])
            info = apply_state(state, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
            pos = info["loader_position"]
            self.epoch, self.step_in_epoch = int(pos["epoch"]), int(pos["step"])
            self.global_step = int(info["step"])
            extra = state.get("extra") or {}
            self.history = list(extra.get("history", []))[: self.epoch]
            self.best_auc = float(extra.get("best_auc", -1.0))
            # apply_state restored rank 0's RNGs; every rank takes back its own (dropout differs by rank).
            ranks = extra.get("rng_ranks")
            if ranks:
                if len(ranks) != env.world_size:
                    raise UsageError(f"{self.dir / 'last.pt'} was written by {len(ranks)} ranks; resume it with "
                                     f"{len(ranks)}, not {env.world_size}")
                restore_rng_state(ranks[env.rank])
            log.info("resumed from %s at epoch %d step %d", self.dir / "last.pt", self.epoch, self.step_in_epoch)
        if env.world_size > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.cuda else None)
        else:
            self.ddp = self.model
        self.step_model = torch.compile(self.ddp) if (self.cuda and cfg.compile) else self.ddp

        device_id = self.device.index if self.cuda else None
        self.train_loader = LesionLoader(
            self.train_index, global_batch=cfg.batch_size, train=True, flip_p=cfg.flip_p, seed=cfg.seed,
            world=env.world_size, rank=env.rank, device_id=device_id, workers=cfg.num_workers,
            start_epoch=self.epoch, start_step=self.step_in_epoch)
        self.val_loader = LesionLoader(
            self.val_index, global_batch=cfg.batch_size, train=False, seed=cfg.seed, world=env.world_size,
            rank=env.rank, device_id=device_id, workers=cfg.num_workers)

    def _check_resumable(self, saved: dict) -> None:
        now = self.cfg.to_dict()
        diff = sorted(k for k in set(now) | set(saved) if k not in RESUMABLE_DIFFERENCES and now.get(k) != saved.get(k))
        if diff:
            raise UsageError(f"{self.dir} holds a run with another config ({', '.join(f'{k}: {saved.get(k)!r} -> {now.get(k)!r}' for k in diff)}); "
                             f"use another run_dir or restore those values")

    # -- steps --------------------------------------------------------------------------------------
    def _loss(self, logits: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
        per = F.binary_cross_entropy_with_logits(logits.float().view(-1), y, pos_weight=self.pos_weight,
                                                 reduction="none")
        # Sum over this rank's real samples, divided by the real samples of the whole global batch (x
        # world, as DDP averages gradients over ranks): padding never counts, every real sample
        # weighs the same whatever rank it landed on.
        return (per * valid).sum() * self.env.world_size / n_valid.clamp(min=1)

    def _train_step(self, batch) -> float:
        x = batch.x.to(self.device, non_blocking=True)
        if self.cuda and self.cfg.bf16:
            x = x.contiguous(memory_format=torch.channels_last)
        y, valid = batch.y.to(self.device), batch.valid.to(self.device)
        n_valid = valid.sum().detach()
        if self.env.world_size > 1:
            tdist.all_reduce(n_valid)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda and self.cfg.bf16):
            main, aux = split_logits(self.step_model(x))
            loss = self._loss(main, y, valid, n_valid)
            if aux is not None:
                loss = loss + AUX_LOSS_WEIGHT * self._loss(aux, y, valid, n_valid)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach()) * float(n_valid) / self.env.world_size

    @torch.no_grad()
    def _sync_buffers(self) -> None:
        """Give every rank rank 0's BatchNorm statistics. DDP broadcasts them before each forward, so
        rank 0's are the run's; without this, each rank would validate with its own last update."""
        if self.env.world_size > 1:
            for buf in self.model.buffers():
                tdist.broadcast(buf, 0)

    @torch.no_grad()
    def _validate(self) -> dict:
        self._sync_buffers()
        self.model.eval()
        idx, scores, losses = [], [], []
        for batch in self.val_loader.epoch():
            x = batch.x.to(self.device)
            if self.cuda and self.cfg.bf16:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda and self.cfg.bf16):
                main, _ = split_logits(self.model(x))
            main = main.float().view(-1).cpu()
            keep = batch.valid.bool()
            idx.append(batch.index[keep].numpy())
            scores.append(torch.sigmoid(main[keep]).numpy())
            losses.append(F.binary_cross_entropy_with_logits(main[keep], batch.y[keep], reduction="none").numpy())
        self.model.train()
        idx, scores, losses = _gather([np.concatenate(idx), np.concatenate(scores), np.concatenate(losses)])
        order = np.argsort(idx, kind="stable")
        idx, scores, losses = idx[order], scores[order], losses[order]
        labels = self.val_index.label[idx]
        from sklearn.metrics import roc_auc_score

        auc = float(roc_auc_score(labels, scores)) if len(set(labels.tolist())) == 2 else None
        acc = float(((scores >= 0.5) == (labels == 1)).mean())
        return {"index": idx, "scores": scores, "val_loss": float(losses.mean()), "val_auc": auc, "val_accuracy": acc}

    # -- files --------------------------------------------------------------------------------------
    def _save_best(self) -> None:
        """The weights of the best validation epoch, for inspection: no optimiser, no fallback copy
        (nothing resumes from it), a third of last.pt's size."""
        if self.env.is_main:
            from .checkpoint import unwrap_model

            save_checkpoint(self.dir / "best.pt", {"model": unwrap_model(self.model).state_dict(), "epoch": self.epoch,
                                                   "val_auc": self.best_auc, "config": self.cfg.to_dict()},
                            keep_previous=False)

    def _save(self, name: str) -> None:
        """Called on every rank at the same step (it gathers each rank's RNG state); rank 0 writes."""
        ranks = _gather_objects(capture_rng_state()) if self.env.world_size > 1 else None
        if not self.env.is_main:
            return
        state = make_state(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                           epoch=self.epoch, step=self.global_step, config=self.cfg.to_dict(),
                           loader_position={"epoch": self.epoch, "step": self.step_in_epoch})
        state["extra"] = {"history": self.history, "best_auc": self.best_auc, "rng_ranks": ranks}
        save_checkpoint(self.dir / name, state)

    def _write_predictions(self, val: dict) -> Path:
        ix: LesionIndex = self.val_index
        rows = []
        for i, score in zip(val["index"], val["scores"]):
            rows.append([int_to_key(ix.patient[i]), ix.study_keys[ix.study[i]], int(ix.lesion_id[i]),
                         VIEWS[ix.view[i]], self.fold, int(ix.label[i]), f"{float(score):.6f}",
                         TUMOR_TYPES[ix.tumor_type[i]], int(ix.burden[i])])
        path = self.dir / "predictions.csv"
        write_csv(path, PREDICTION_COLUMNS, rows)
        return path

    def _write_metrics(self) -> None:
        cols = ["epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "lr", "seconds", "samples_per_s"]
        write_csv(self.dir / "metrics.csv", cols, [[h.get(c) for c in cols] for h in self.history])

    # -- the loop -----------------------------------------------------------------------------------
    # -- the loop, in pieces a scheduler can interleave (tune trains five folds epoch by epoch) --------
    def finished(self) -> FoldResult | None:
        done = self.dir / "done.json"
        if not done.exists():
            return None
        info = json.loads(done.read_text())
        return FoldResult(self.fold, self.dir, info["epochs"], info["val_auc"], info["val_loss"],
                          self.dir / "predictions.csv")

    @_at_work
    def open(self, preemption: bool = True) -> None:
        """Build everything and resume from the run directory. `preemption` installs the signal flag
        (main thread only: Ray runs trials in threads, and handles stopping itself)."""
        self.flag = PreemptionFlag().install() if preemption else PreemptionFlag()
        self.writer = None
        self.last_val = None
        if self.env.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._log_handler = logging.FileHandler(self.dir / "train.log")
            self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            self._log_handler.addFilter(_OwnRecords(self))
            root = logging.getLogger("wbs_dist")
            root.addHandler(self._log_handler)
            if root.getEffectiveLevel() > logging.INFO:   # launched without the CLI (torchrun script, Ray)
                root.setLevel(logging.INFO)
        self._setup()
        if self.env.is_main:
            dump_config(self.cfg, self.dir / "config.yaml")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.dir), purge_step=self.global_step)
            log.info("fold %d: %d training lesions, %d validation lesions, %d steps an epoch, %s x %d rank(s)",
                     self.fold, len(self.train_index), len(self.val_index), self.steps_per_epoch,
                     self.device.type, self.env.world_size)

    @_at_work
    def train_epoch(self) -> dict:
        """One epoch (the rest of it after a mid-epoch resume), validation, checkpoint; its metrics row."""
        main = self.env.is_main
        t0, loss_sum, n_seen = time.perf_counter(), 0.0, 0
        for batch in self.train_loader.epoch():
            loss_sum += self._train_step(batch)
            n_seen += int(batch.valid.sum())
            self.global_step += 1
            self.step_in_epoch += 1
            if self.flag.sync():
                self._save("last.pt")
                if main:
                    log.info("preempted: saved at epoch %d step %d, exiting %d for requeue",
                             self.epoch, self.step_in_epoch, PREEMPTED_EXIT_CODE)
                dist.barrier()
                raise Preempted()
            if self.cfg.checkpoint_every and self.global_step % self.cfg.checkpoint_every == 0:
                self._save("last.pt")
        seconds = time.perf_counter() - t0
        val = self.last_val = self._validate()
        train_loss = loss_sum / max(n_seen, 1)
        if self.env.world_size > 1:
            train_loss = dist.all_reduce_mean(train_loss)
        row = {"epoch": self.epoch, "train_loss": round(train_loss, 6), "val_loss": round(val["val_loss"], 6),
               "val_auc": None if val["val_auc"] is None else round(val["val_auc"], 6),
               "val_accuracy": round(val["val_accuracy"], 6), "lr": self.scheduler.get_last_lr()[0],
               "seconds": round(seconds, 3), "samples_per_s": round(n_seen * self.env.world_size / seconds, 2)}
        self.history.append(row)
        self.epoch += 1
        self.step_in_epoch = 0
        if main:
            for key in ("train_loss", "val_loss", "val_auc", "val_accuracy", "lr", "samples_per_s"):
                if row[key] is not None:
                    self.writer.add_scalar(key, row[key], self.global_step)
            self.writer.flush()
            self._write_metrics()
        if val["val_auc"] is not None and val["val_auc"] > self.best_auc:
            self.best_auc = val["val_auc"]
            self._save_best()
        self._save("last.pt")
        if main:
            log.info("fold %d epoch %d/%d: train loss %.4f, val loss %.4f, val AUC %s, %.1f samples/s",
                     self.fold, self.epoch, self.cfg.epochs, row["train_loss"], row["val_loss"],
                     "n/a" if row["val_auc"] is None else f"{row['val_auc']:.4f}", row["samples_per_s"])
        dist.barrier()
        return row

    @_at_work
    def finish(self) -> FoldResult:
        """Final predictions and done.json (the fold counts as finished from then on)."""
        val = self.last_val or self._validate()    # None when resumed after the last epoch's checkpoint
        if self.env.is_main:
            predictions = self._write_predictions(val)
            info = {"fold": self.fold, "epochs": self.epoch, "val_auc": val["val_auc"],
                    "val_loss": val["val_loss"], "lesions": len(self.val_index)}
            done = self.dir / "done.json"
            tmp = done.with_name(".done.json.tmp")
            tmp.write_text(json.dumps(info, indent=1))
            os.replace(tmp, done)
            log.info("fold %d finished: val AUC %s (final epoch), predictions %s", self.fold,
                     val["val_auc"], predictions)
        dist.barrier()
        return FoldResult(self.fold, self.dir, self.epoch, val["val_auc"], val["val_loss"], self.dir / "predictions.csv")

    def close(self) -> None:
        if getattr(self, "flag", None) is not None:
            self.flag.uninstall()
        if getattr(self, "writer", None) is not None:
            self.writer.close()
        for loader in ("train_loader", "val_loader"):
            if hasattr(self, loader):
                getattr(self, loader).close()
        if getattr(self, "_log_handler", None) is not None:
            logging.getLogger("wbs_dist").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        dist.cleanup()

    def run(self) -> FoldResult:
        done = self.finished()
        if done is not None:
            log.info("fold %d already finished (%s)", self.fold, self.dir / "done.json")
            return done
        try:
            self.open()
            while self.epoch < self.cfg.epochs:
                self.train_epoch()
            return self.finish()
        finally:
            self.close()


def train_fold(cfg: Config, fold: int, require_resume: bool = False) -> FoldResult:
    return FoldTrainer(cfg, fold, require_resume).run()


def run_train(config_path, overrides, fold: int, resume: bool) -> int:
    from .config import load_config

    cfg = load_config(config_path, overrides)
    result = train_fold(cfg, fold, require_resume=resume)
    if dist.detect().is_main:
        auc = "n/a" if result.val_auc is None else f"{result.val_auc:.4f}"
        print(f"fold {fold}: {result.epochs} epochs, validation AUC {auc}; predictions {result.predictions}")
    return 0
