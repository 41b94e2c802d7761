"""Atomic checkpoints, exact resume and the preemption flag.

Checkpoints hold everything a resumed run needs to continue bit for bit (torchvision's, nnU-Net's and
nanoGPT's do not save RNG state, so their resumed runs diverge): model, optimizer, scheduler and
GradScaler state, epoch, global step, the loader's position, the config, and every RNG state
(Python, NumPy's global and named Generators, torch CPU and CUDA). Every value is a tensor or plain
Python data, so `torch.load(path, weights_only=True)` loads them.

Writes are atomic: a temp file in the same directory, flushed and fsynced, the current file rotated to
`<name>.prev`, the temp file renamed into place and the directory fsynced. A reader, or a rerun after a
crash at any point, finds a complete newest file or falls back to the complete previous one.

Preemption: a signal handler that writes a file can run in the middle of a step or of another write
and corrupt it, so `PreemptionFlag`'s handlers only set a flag; the loop checks it (all ranks
together, via `sync`) at a step boundary, saves, and exits with PREEMPTED_EXIT_CODE.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from wbs_dist import atomic
from wbs_dist.train import ddp
from wbs_dist.errors import InputError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LAST_NAME = "last.pt"
# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry"; a launcher that sees it
# requeues the job, which resumes from the checkpoint saved just before exiting.
PREEMPTED_EXIT_CODE = 75

RngGenerators = dict[str, "np.random.Generator | torch.Generator"]


# --- RNG state ----------------------------------------------------------------------------------


def capture_rng_state(generators: RngGenerators | None = None) -> dict[str, Any]:
    """Every RNG state as plain data: Python, NumPy global, torch CPU/CUDA, and `generators` by name.

    `generators` maps names to numpy Generators or torch Generators (e.g. a DataLoader's).
    """
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": _encode(np_state),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {},
    }
    for name, gen in (generators or {}).items():
        if isinstance(gen, torch.Generator):
            state["generators"][name] = {"torch": gen.get_state()}
        else:
            state["generators"][name] = {"numpy": _encode(gen.bit_generator.state)}
    return state


def restore_rng_state(state: dict[str, Any], generators: RngGenerators | None = None) -> None:
    """Put back what `capture_rng_state` took; each of `generators` must be in `state` by name."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    np.random.set_state(_decode(state["numpy"]))
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            log.warning("checkpoint has CUDA RNG states for %d devices, this process sees %d: "
                        "restoring the first ones only", len(cuda), torch.cuda.device_count())
        for device, rng in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng, device)
    for name, gen in (generators or {}).items():
        if name not in state["generators"]:
            raise KeyError(f"no RNG state for generator {name!r} in the checkpoint "
                           f"(it has {sorted(state['generators'])})")
        saved = state["generators"][name]
        if isinstance(gen, torch.Generator):
            gen.set_state(saved["torch"])
        else:
            gen.bit_generator.state = _decode(saved["numpy"])


# weights_only accepts dicts, lists, str, int (of any size: PCG64's 128-bit state survives) and
# tensors, but not numpy arrays; NumPy bit generators keep their keys in uint32/uint64 arrays.
def _encode(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.dtype.str, "values": value.tolist()}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.array(value["values"], dtype=np.dtype(value["__ndarray__"]))
        return {k: _decode(v) for k, v in value.items()}
    return value


# --- whole training state -------------------------------------------------------------------------


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose state_dict keys do not depend on DDP or torch.compile wrapping."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def make_state(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    step: int,
    config: dict[str, Any],
    loader_position: dict[str, Any] | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    generators: RngGenerators | None = None,
) -> dict[str, Any]:
    """The checkpoint dict. `loader_position` and `config` must be plain data (dicts, lists, str,
    numbers, tensors); `epoch` and `step` are those of the next step to run."""
    return {
        "format": FORMAT_VERSION,
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "step": step,
        "loader_position": loader_position or {},
        "config": config,
        "rng": capture_rng_state(generators),
    }


def apply_state(
    state: dict[str, Any],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    generators: RngGenerators | None = None,
) -> dict[str, Any]:
    """Load `state` into the given objects and the RNGs; returns epoch, step, loader_position, config.

    Call it after building model, optimizer, scheduler and scaler, and last before the first step, so
    nothing draws random numbers between the restore and the step the checkpoint was taken before.
    """
    if state.get("format") != FORMAT_VERSION:
        raise InputError(f"checkpoint format {state.get('format')!r} is not {FORMAT_VERSION}")
    unwrap_model(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
        if obj is None:
            continue
        if state[name] is None:
            raise InputError(f"checkpoint has no {name} state but this run uses one")
        obj.load_state_dict(state[name])
    restore_rng_state(state["rng"], generators)
    return {k: state[k] for k in ("epoch", "step", "loader_position", "config")}


# --- files ------------------------------------------------------------------------------------------


def prev_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".prev")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], keep_previous: bool = True) -> None:
    """Write `state` atomically to `path`, keeping the file it replaces as `<path>.prev` (the fallback
    for a corrupt newest file; `keep_previous=False` for files nothing resumes from)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One writer per path (rank 0), so any temp file already there is a crashed write's leftover.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    with atomic.replace(path, previous=prev_path(path) if keep_previous else None) as f:
        torch.save(state, f)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any] | None:
    """The newest loadable of `path` and `<path>.prev`; None when neither exists.

    A missing, truncated or corrupt newest file is reported as a warning naming it and the reason,
    and the previous one is used. When files exist but none loads, InputError: starting afresh
    would silently overwrite a run's progress, so the user decides.
    """
    candidates = [Path(path), prev_path(path)]
    problems = []
    for candidate in candidates:
        if not candidate.exists():
            continue
        try:
            state = torch.load(candidate, map_location=map_location, weights_only=True)
            if not isinstance(state, dict):
                raise ValueError(f"holds a {type(state).__name__}, not a checkpoint dict")
        except Exception as exc:  # truncation and corruption surface as many exception types
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.warning("checkpoint %s cannot be loaded (%s)", candidate, reason)
            problems.append(f"{candidate}: {reason}")
            continue
        if candidate != candidates[0]:
            log.warning("resuming from the previous checkpoint %s instead of %s",
                        candidate, candidates[0])
        return state
    if problems:
        raise InputError("no usable checkpoint: " + "; ".join(problems)
                         + ". Move these files away to start the run afresh")
    return None


def find_resume_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """`run_dir/last.pt` when it or its `.prev` exists (pass it to load_checkpoint), else None."""
    path = Path(run_dir) / LAST_NAME
    return path if path.exists() or prev_path(path).exists() else None


# --- preemption -------------------------------------------------------------------------------------


class PreemptionFlag:
    """Signals set a flag and do nothing else; the loop saves at the next step boundary.

    SIGUSR2 (submitit's and our sbatch scripts' warning signal; NCCL claims SIGUSR1) and SIGTERM
    (what SLURM sends at preemption and cancellation). `install()` must run in the main thread.
    Under DDP, call `sync()` at every step boundary on every rank: only rank 0 may have received the
    signal, and all ranks must stop after the same step.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGUSR2, signal.SIGTERM)):
        self.signals = tuple(signals)
        self._requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self._requested

    def _handle(self, signum, frame) -> None:
        # No logging or I/O here: the handler can interrupt a logging call or a write holding a lock.
        self._requested = True
        self.signum = signum

    def install(self) -> PreemptionFlag:
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> PreemptionFlag:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def sync(self) -> bool:
        """True on every rank when any rank was signalled; local only without a process group."""
        if ddp.any_rank(self._requested):
            self._requested = True
        return self._requested
