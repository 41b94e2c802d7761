"""One fold's training: train on the other folds, validate on fold K every epoch. Imports no launcher.

The same function runs as one process (CPU or one GPU) or as one rank of a DDP job: `ddp.detect()`
reads torchrun's or SLURM's environment, so `wbs-dist train`, `torchrun ... -m wbs_dist.cli train`,
`srun wbs-dist train` and the submitit / Ray launchers all end up here unchanged.

The trainer delegates: the run directory's files to rundir.FoldDir, checkpoints and RNG state to
checkpoint, collectives to ddp, batches to the DALI loader, the network to models. The predictions
it writes are those of the final epoch, not the best one: picking the epoch on the validation fold
would report an optimistic AUC (best.pt is kept for inspection).

Checkpoints hold model, optimiser, scheduler, every RNG state and the loader position, and are
written atomically every `checkpoint_every` steps and at each epoch end. A run directory with a
checkpoint resumes from it, provided the keys that affect results are unchanged
(config.resume_differences). SIGUSR2/SIGTERM set a flag; every rank stops after the same step, rank 0
saves, and the process exits with PREEMPTED_EXIT_CODE (75) so the launcher requeues it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time

import torch

from wbs_dist.config import Config, resume_differences
from wbs_dist.data.folds import check_folds, check_split, has_folds, split_fingerprint, write_folds
from wbs_dist.data.store import Store
from wbs_dist.errors import ConfigError, UsageError
from wbs_dist.lock import Locked
from wbs_dist.train import ddp
from wbs_dist.train.checkpoint import (PREEMPTED_EXIT_CODE, PreemptionFlag, apply_state, capture_rng_state,
                                       load_checkpoint, make_state, restore_rng_state, save_checkpoint,
                                       unwrap_model)
from wbs_dist.train.rundir import FoldDir, FoldResult, OwnRecords, at_work
from wbs_dist.train.tasks import make_task

log = logging.getLogger("wbs_dist.train")


class Preempted(SystemExit):
    def __init__(self):
        super().__init__(PREEMPTED_EXIT_CODE)


def prepare_folds(store: Store, cfg: Config, env: ddp.DistEnv) -> Config:
    """Training creates the split when the store has none (rank 0, the others wait); an existing split
    must match the config. Returns the config pinned to that split (key 'split': the fingerprint that
    config.yaml, last.pt and done.json record)."""
    if not has_folds(store) and env.is_main:
        write_folds(store, cfg.folds, cfg.fold_seed)
    ddp.barrier()
    check_folds(store, cfg.folds, cfg.fold_seed)
    split = split_fingerprint(store)
    check_split("the config (key 'split')", cfg.split, store, split, (cfg.folds, cfg.fold_seed))
    return dataclasses.replace(cfg, split=split)


def _lr_factor(cfg: Config, epoch_progress: float) -> float:
    """Multiplier of lr at a (fractional) epoch: linear warm-up, then constant or cosine."""
    if cfg.warmup_epochs and epoch_progress < cfg.warmup_epochs:
        return (epoch_progress + 1e-9) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        span = max(cfg.epochs - cfg.warmup_epochs, 1e-9)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (epoch_progress - cfg.warmup_epochs) / span)))
    return 1.0


class FoldTrainer:
    def __init__(self, cfg: Config, fold: int, require_resume: bool = False):
        self.cfg, self.fold = cfg, fold
        self.env = ddp.detect()
        self.files = FoldDir.of(cfg, fold)
        self.dir = self.files.path
        self.require_resume = require_resume

    # -- set-up ------------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg, env = self.cfg, self.env
        ddp.init_process_group(env, timeout_s=cfg.dist_timeout_s, rendezvous_dir=self.dir)
        # One trainer per fold: rank 0 takes the run directory's lock, every rank learns whether it did.
        refused = None
        if env.is_main:
            try:
                self._lock = self.files.lock(f"wbs-dist train --fold {self.fold}").acquire()
            except Locked as exc:
                refused = str(exc)
        refused = ddp.broadcast_object(refused)
        if refused:
            raise Locked(refused)
        self.rank_seed = ddp.seed_everything(cfg.seed, env.rank)
        # Use the CPUs SLURM gave this task, not every core of the node (ranks would oversubscribe it).
        if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
            torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
        self.device = torch.device(env.device)
        self.cuda = self.device.type == "cuda"
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        store = Store.open(cfg.store)
        self.cfg = cfg = prepare_folds(store, cfg, env)
        self.task = make_task(cfg, store, self.fold, self.device, env.world_size, env.rank)
        self.train_index, self.val_index = self.task.train_index, self.task.val_index

        model = self.task.model().to(self.device)
        if self.cuda and env.world_size > 1:
            # The study's batch 8 spread over GPUs leaves 1-2 samples a GPU: batch statistics must be
            # the global batch's. (SyncBatchNorm is CUDA-only; on CPUs see _sync_buffers.)
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if self.cuda and cfg.bf16:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = math.ceil(self.task.samples / cfg.batch_size)
        self.steps_per_epoch = max(1, steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: _lr_factor(cfg, step / self.steps_per_epoch))

        # Resume: everything above is built first, the state applied last (checkpoint.apply_state).
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history: list[dict] = []
        self.best_auc = -1.0
        state = load_checkpoint(self.files.last)
        if state is None and self.require_resume:
            raise UsageError(f"--resume: no checkpoint in {self.dir}")
        if state is not None:
            self._check_resumable(state, store)
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
                    raise UsageError(f"{self.files.last} was written by {len(ranks)} ranks; resume it with "
                                     f"{len(ranks)}, not {env.world_size}")
                restore_rng_state(ranks[env.rank])
            log.info("resumed from %s at epoch %d step %d", self.files.last, self.epoch, self.step_in_epoch)
        if env.world_size > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.cuda else None)
        else:
            self.ddp = self.model
        self.step_model = torch.compile(self.ddp) if (self.cuda and cfg.compile) else self.ddp

        self.train_loader, self.val_loader = self.task.loaders(self.device.index if self.cuda else None, self.epoch,
                                                               self.step_in_epoch)

    def _check_resumable(self, state: dict, store: Store) -> None:
        saved = dict(state["config"])
        was = (state.get("extra") or {}).get("split") or saved.get("split") or ""
        if not was:
            log.warning("%s predates recorded splits: resumed unchecked (after a re-split its validation fold "
                        "may hold patients it trained on)", self.files.last)
        # Before the other keys: fold_seed may differ too, but the split is what makes the run unusable.
        check_split(str(self.files.last), was, store, self.cfg.split, (saved.get("folds"), saved.get("fold_seed")))
        saved["split"] = self.cfg.split
        diff = resume_differences(saved, self.cfg)
        if diff:
            raise ConfigError(f"{self.dir} holds a run with another config ({', '.join(diff)}); these keys affect "
                              f"results, so the run cannot resume with them changed: use another run_dir or restore "
                              f"those values")

    # -- steps --------------------------------------------------------------------------------------
    def _train_step(self, batch) -> float:
        x = self.task.inputs(batch).to(self.device, non_blocking=True)
        if self.cuda and self.cfg.bf16:
            x = x.contiguous(memory_format=torch.channels_last)
        valid = batch.valid.to(self.device)
        n_valid = ddp.all_reduce_sum_(valid.sum().detach())
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda and self.cfg.bf16):
            loss = self.task.loss(self.step_model(x), batch, valid, n_valid)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach()) * float(n_valid) / self.env.world_size

    def _forward(self, x: torch.Tensor):
        """The model on a validation batch, as in training (device, memory format, autocast)."""
        x = x.to(self.device)
        if self.cuda and self.cfg.bf16:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda and self.cfg.bf16):
            return self.model(x)

    @torch.no_grad()
    def _validate(self, final: dict | None = None) -> dict:
        """The task's validation (or, given the final epoch's, its final outputs: the detector's
        threshold on the training folds) on every rank, in eval mode."""
        # Every rank validates with rank 0's BatchNorm statistics: DDP broadcasts them before each
        # forward, so rank 0's are the run's; without this, each rank would use its own last update.
        ddp.broadcast_buffers(self.model)
        self.model.eval()
        try:
            return self.task.final(self._forward, final) if final else self.task.validate(self._forward, self.val_loader)
        finally:
            self.model.train()

    # -- files --------------------------------------------------------------------------------------
    def _save_best(self) -> None:
        """The weights of the best validation epoch, for inspection: no optimiser, no fallback copy
        (nothing resumes from it), a third of last.pt's size."""
        if self.env.is_main:
            save_checkpoint(self.files.best, {"model": unwrap_model(self.model).state_dict(), "epoch": self.epoch,
                                                   "val_auc": self.best_auc, "config": self.cfg.to_dict()},
                            keep_previous=False)

    def _save(self, name: str) -> None:
        """Called on every rank at the same step (it gathers each rank's RNG state); rank 0 writes."""
        ranks = ddp.all_gather_objects(capture_rng_state())
        if not self.env.is_main:
            return
        state = make_state(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                           epoch=self.epoch, step=self.global_step, config=self.cfg.to_dict(),
                           loader_position={"epoch": self.epoch, "step": self.step_in_epoch})
        state["extra"] = {"history": self.history, "best_auc": self.best_auc, "rng_ranks": ranks, "split": self.cfg.split}
        save_checkpoint(self.files.path / name, state)

    # -- the loop -----------------------------------------------------------------------------------
    # -- the loop, in pieces a scheduler can interleave (tune trains five folds epoch by epoch) --------
    def finished(self) -> FoldResult | None:
        return self.files.result()

    @at_work
    def open(self, preemption: bool = True) -> None:
        """Build everything and resume from the run directory. `preemption` installs the signal flag
        (main thread only: Ray runs trials in threads, and handles stopping itself)."""
        self.flag = PreemptionFlag().install() if preemption else PreemptionFlag()
        self.writer = None
        self.last_val = None
        if self.env.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._log_handler = self.files.log_handler(OwnRecords(self))
            root = logging.getLogger("wbs_dist")
            root.addHandler(self._log_handler)
            if root.getEffectiveLevel() > logging.INFO:   # launched without the CLI (torchrun script, Ray)
                root.setLevel(logging.INFO)
        self._setup()
        if self.env.is_main:
            self.files.write_config(self.cfg)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.dir), purge_step=self.global_step)
            log.info("fold %d: %d training %s, %d validation %s, %d steps an epoch, %s x %d rank(s)",
                     self.fold, len(self.train_index), self.task.unit, len(self.val_index), self.task.unit,
                     self.steps_per_epoch,
                     self.device.type, self.env.world_size)

    @at_work
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
                ddp.barrier()
                raise Preempted()
            if self.cfg.checkpoint_every and self.global_step % self.cfg.checkpoint_every == 0:
                self._save("last.pt")
        seconds = time.perf_counter() - t0
        val = self.last_val = self._validate()
        train_loss = loss_sum / max(n_seen, 1)
        if self.env.world_size > 1:
            train_loss = ddp.all_reduce_mean(train_loss)
        row = {"epoch": self.epoch, "train_loss": round(train_loss, 6), "val_loss": round(val["val_loss"], 6),
               **{k: None if v is None else round(v, 6) for k, v in val["row"].items()},
               "lr": self.scheduler.get_last_lr()[0],
               "seconds": round(seconds, 3), "samples_per_s": round(n_seen * self.env.world_size / seconds, 2)}
        self.history.append(row)
        self.epoch += 1
        self.step_in_epoch = 0
        if main:
            for key in ("train_loss", "val_loss", *val["row"], "lr", "samples_per_s"):
                if row[key] is not None:
                    self.writer.add_scalar(key, row[key], self.global_step)
            self.writer.flush()
            self.files.write_metrics(self.history)
        metric = row[self.task.metric]
        if metric is not None and metric > self.best_auc:
            self.best_auc = metric
            self._save_best()
        self._save("last.pt")
        if main:
            log.info("fold %d epoch %d/%d: train loss %.4f, val loss %.4f, %s %s, %.1f samples/s",
                     self.fold, self.epoch, self.cfg.epochs, row["train_loss"], row["val_loss"], self.task.metric,
                     "n/a" if metric is None else f"{metric:.4f}", row["samples_per_s"])
        ddp.barrier()
        return row

    @at_work
    def finish(self) -> FoldResult:
        """Final predictions and done.json (the fold counts as finished from then on)."""
        val = self.last_val or self._validate()    # None when resumed after the last epoch's checkpoint
        val = self._validate(final=val)
        if self.env.is_main:
            outputs = self.task.write_outputs(val, self.files)
            self.files.write_done(self.epoch, val["val_auc"], val["val_loss"], len(self.val_index), self.cfg.split)
            log.info("fold %d finished: %s %s (final epoch), %s", self.fold, self.task.metric,
                     val["row"][self.task.metric], outputs)
        ddp.barrier()
        return FoldResult(self.fold, self.dir, self.epoch, val["val_auc"], val["val_loss"], self.files.predictions)

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
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
            self._lock = None
        ddp.cleanup()

    def run(self) -> FoldResult:
        done = self.finished()
        if done is not None:
            store = Store.open(self.cfg.store)     # a finished fold of another split is no result of this one
            if has_folds(store):
                check_split(str(self.files.done), self.files.split(), store, split_fingerprint(store))
            log.info("fold %d already finished (%s)", self.fold, self.files.done)
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
