"""The folds as SLURM jobs through submitit: a job array, one DDP job per fold.

Each array task runs `FoldJob(cfg)(fold)` under `srun` with slurm_nodes x slurm_tasks_per_node tasks;
every task is one DDP rank (train/ddp.py reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID). The driver waits,
polling sacct, and then:

- preemption and time limits: SLURM sends SIGUSR2 `slurm_signal_delay_s` before the limit (and
  SIGTERM at preemption); the training loop saves at the next step boundary and exits 75, and the
  job asks `scontrol requeue` for itself. SLURM runs it again under the same id and it resumes from
  RUN_DIR/fold<K>/last.pt. A requeue is not a failure and is not counted.
- failures: a fold job that ends without its done.json is resubmitted up to slurm_max_retries times,
  each failure shown with the tail of its log; then the driver stops with the folds that failed.
- rerunning the driver skips finished folds, and waits for the fold jobs an earlier driver left
  running (their ids are in RUN_DIR/slurm/jobs.json) instead of submitting them a second time; two
  drivers never run on one run directory at once (RUN_DIR/.cv.lock).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import submitit

from wbs_dist.config import Config, check, config_from_dict
from wbs_dist.atomic import write_json
from wbs_dist.errors import WbsError
from wbs_dist.lock import Lock
from wbs_dist.train.rundir import FoldDir
from wbs_dist.train.trainer import Preempted, train_fold

# sacct states after which a job will not run again by itself (a requeued job goes back to PENDING).
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED")


class FoldJob(submitit.helpers.Checkpointable):
    """A checkpointable callable: submitit pickles it, each array task calls it with its fold.

    `checkpoint()` (inherited) resubmits the same call, which resumes from the fold's last.pt; it runs
    only when submitit's own handler sees the signal before training installs its flag.
    """

    def __init__(self, cfg: dict):
        self.cfg = cfg      # plain data (Config.to_dict()): a queued job unpickles whatever version runs it

    def __call__(self, fold: int) -> dict:
        cfg = config_from_dict(self.cfg, "the fold job's config")
        try:
            result = train_fold(cfg, fold)
        except Preempted:
            env = submitit.JobEnvironment()
            if env.global_rank == 0:
                # Our flag, not submitit's handler, caught the signal: ask for the requeue ourselves.
                # Under preemption SLURM requeues anyway, and this then fails harmlessly.
                subprocess.run(["scontrol", "requeue", env.job_id], timeout=60, check=False)
            raise
        return {"fold": fold, "val_auc": result.val_auc, "epochs": result.epochs}


def slurm_parameters(cfg: Config, job_name: str = "wbs-cv") -> dict:
    """submitit's SlurmExecutor parameters for one fold job (pinned by a golden file in the tests).

    The values go into the job script: the config's own checks run again here, so a Config built in
    code (not read through load_config) cannot put a newline or a directive into it either."""
    check(cfg)
    params = {
        "job_name": job_name,
        "nodes": cfg.slurm_nodes,
        "ntasks_per_node": cfg.slurm_tasks_per_node,
        "cpus_per_task": cfg.slurm_cpus_per_task,
        "mem": f"{cfg.slurm_mem_gb}GB",
        "time": cfg.slurm_time_min,
        "signal_delay_s": cfg.slurm_signal_delay_s,
        "array_parallelism": cfg.folds,
    }
    if cfg.slurm_gpus_per_node:
        params["gpus_per_node"] = cfg.slurm_gpus_per_node
    if cfg.slurm_partition:
        params["partition"] = cfg.slurm_partition
    if cfg.slurm_account:
        params["account"] = cfg.slurm_account
    if cfg.slurm_setup.strip():
        params["setup"] = [line for line in cfg.slurm_setup.replace(";", "\n").splitlines() if line.strip()]
    return params


def _executor(cfg: Config) -> submitit.SlurmExecutor:
    folder = Path(cfg.run_dir) / "slurm"
    # Quoted: submitit puts `python` into the job script's command line as it is (its own default is
    # quoted too), and a virtual environment's path may hold a space.
    executor = submitit.SlurmExecutor(folder=folder / "%j", python=shlex.quote(sys.executable))
    executor.update_parameters(**slurm_parameters(cfg))
    return executor


def _state(job) -> str:
    # mode="force": submitit otherwise re-reads sacct at a growing interval and may report stale states.
    return job.watcher.get_state(job.job_id, mode="force").split()[0].upper()


def _failure(job) -> str:
    text = ""
    try:
        text = (job.stderr() or "") + (job.stdout() or "")
    except Exception:  # the log may not exist if the job never started
        pass
    lines = [line for line in text.splitlines() if line.strip() and "submitit INFO" not in line]
    return "\n".join(lines[-15:]) or "(no log)"


def _jobs_file(cfg: Config) -> Path:
    return Path(cfg.run_dir) / "slurm" / "jobs.json"


def _record(cfg: Config, jobs: dict) -> None:
    """The fold jobs in flight, so that a restarted driver finds them instead of submitting again."""
    path = _jobs_file(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {str(k): job.job_id for k, job in jobs.items()})


def _reattach(cfg: Config, executor, todo: list[int]) -> dict:
    """Fold jobs an earlier driver submitted that SLURM still runs, queues or requeues."""
    try:
        recorded = json.loads(_jobs_file(cfg).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    jobs = {}
    for k in todo:
        job_id = recorded.get(str(k))
        if not job_id:
            continue
        job = submitit.SlurmJob(folder=executor.folder, job_id=job_id)
        state = _state(job)
        # UNKNOWN: SLURM no longer knows it (accounting purged); anything terminal ran its course.
        if state not in TERMINAL and state != "UNKNOWN":
            print(f"[cv] fold {k}: job {job_id} of an earlier driver is {state}; waiting for it, not "
                  f"submitting again", flush=True)
            jobs[k] = job
    return jobs


def run_folds_slurm(cfg: Config, poll_s: float = 5.0) -> None:
    # One driver per run directory: a second would submit every unfinished fold again.
    with Lock(Path(cfg.run_dir) / ".cv.lock", "wbs-dist cv --launcher slurm", subject=f"run {cfg.run_dir}"):
        _run_folds(cfg, poll_s)


def _run_folds(cfg: Config, poll_s: float) -> None:
    executor = _executor(cfg)
    todo = [k for k in range(cfg.folds) if not FoldDir.of(cfg, k).is_finished()]
    if not todo:
        print("[cv] every fold is finished already", flush=True)
        return
    payload = FoldJob(cfg.to_dict())
    jobs = _reattach(cfg, executor, todo)
    new = [k for k in todo if k not in jobs]
    if new:
        with executor.batch():
            submitted = {k: executor.submit(payload, k) for k in new}
        jobs.update(submitted)
        _record(cfg, jobs)
        print(f"[cv] submitted folds {new} as array job {next(iter(submitted.values())).job_id.split('_')[0]} "
              f"(logs: {Path(cfg.run_dir) / 'slurm'})", flush=True)
    attempts = {k: 1 for k in todo}
    failed: dict[int, str] = {}
    last_states: dict[int, str] = {}
    while jobs:
        time.sleep(poll_s)
        for k, job in list(jobs.items()):
            state = _state(job)
            if state != last_states.get(k):
                print(f"[cv] fold {k} (job {job.job_id}): {state}", flush=True)
                last_states[k] = state
            if state not in TERMINAL:
                continue
            del jobs[k]
            if FoldDir.of(cfg, k).is_finished():
                print(f"[cv] fold {k} finished", flush=True)
                continue
            why = _failure(job)
            print(f"[cv] fold {k} failed (attempt {attempts[k]}, job {job.job_id}, {state}):\n{why}",
                  file=sys.stderr, flush=True)
            if attempts[k] <= cfg.slurm_max_retries:
                attempts[k] += 1
                jobs[k] = executor.submit(payload, k)
                _record(cfg, jobs)
                print(f"[cv] fold {k} resubmitted as job {jobs[k].job_id} "
                      f"(attempt {attempts[k]} of {cfg.slurm_max_retries + 1})", flush=True)
            else:
                failed[k] = why.splitlines()[-1] if why else state
    if failed:
        raise WbsError("fold(s) failed after all retries: " + "; ".join(f"fold {k}: {w}" for k, w in failed.items())
                       + f" (logs under {Path(cfg.run_dir) / 'slurm'})")
