"""Who am I in the job: rank and world from the environment, the process group, per-rank seeds.

`detect()` reads, in this order:
- torchrun (also `srun torchrun ...`): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
- SLURM inside an `srun` step: SLURM_PROCID, SLURM_STEP_NUM_TASKS (else SLURM_NTASKS), SLURM_LOCALID;
  the rendezvous host is the first node of the step's (else the job's) node list, expanded here from
  SLURM's compressed syntax; the port is MASTER_PORT when set, else one that rank 0 is given by the
  system and publishes in the run directory (`rendezvous_dir`), so two jobs sharing a node never
  meet on one port (a port derived from the job id collided for ids 20,000 apart);
- otherwise one process.
NCCL on CUDA, gloo on CPU; each process uses cuda:(local rank mod visible devices), which is right
both when every task sees all the node's GPUs and when SLURM binds one GPU per task.

The training loop receives a DistEnv and calls the helpers below; it never reads the environment or
imports a launcher, nor torch.distributed itself: every collective the trainer, the checkpoint and
the preemption flag use lives here. Every helper is a no-op (or the identity) without an initialised
process group, so one code path serves a laptop, one GPU, torchrun and srun.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from datetime import timedelta
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as tdist

from wbs_dist.atomic import write_json
from wbs_dist.errors import ConfigError, UsageError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str | None     # None for a single process
    master_port: int | None
    backend: str                # "nccl" | "gloo"
    device: str                 # "cuda:<i>" | "cpu"
    source: str                 # "torchrun" | "slurm" | "single"
    rendezvous: str | None = None   # names this job step when the port is agreed at run time (no MASTER_PORT)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The DistEnv of this process from `environ` (default: os.environ)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return _make(env, "torchrun", _int(env, "RANK"), _int(env, "LOCAL_RANK"),
                     _int(env, "WORLD_SIZE"), _required(env, "MASTER_ADDR"), _int(env, "MASTER_PORT"))
    tasks_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    if "SLURM_PROCID" in env and tasks_var in env:
        world = _int(env, tasks_var)
        if "SLURM_STEP_ID" not in env:
            # A batch script or salloc shell, not a task of an srun step: no peers will ever join.
            if world > 1:
                log.warning("%s=%d but this process was not started by srun: running as one "
                            "process; launch with srun (or torchrun) for distributed training",
                            tasks_var, world)
            return _single()
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None
        # A requeued job keeps its id and counts its restarts: each attempt's steps meet anew.
        key = None if port is not None else \
            f"{_int(env, 'SLURM_JOB_ID')}-{env.get('SLURM_RESTART_COUNT', '0')}-{env.get('SLURM_STEP_ID', '0')}"
        return _make(env, "slurm", _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID"), world,
                     env.get("MASTER_ADDR") or _slurm_master(env), port, key)
    return _single()


def _single() -> DistEnv:
    backend, device = _backend_device(0)
    return DistEnv(0, 0, 1, None, None, backend, device, "single")


def _make(env, source, rank, local_rank, world, addr, port, rendezvous=None) -> DistEnv:
    if not 0 <= rank < world:
        raise UsageError(f"{source}: rank {rank} is outside a world of size {world}")
    backend, device = _backend_device(local_rank)
    return DistEnv(rank, local_rank, world, addr, port, backend, device, source, rendezvous)


def _backend_device(local_rank: int) -> tuple[str, str]:
    if torch.cuda.is_available():
        return "nccl", f"cuda:{local_rank % torch.cuda.device_count()}"
    return "gloo", "cpu"


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name)
    if not value:
        raise UsageError(f"environment variable {name} is not set (needed for distributed training)")
    return value


def _int(env: Mapping[str, str], name: str) -> int:
    value = _required(env, name)
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer") from None


def _slurm_master(env: Mapping[str, str]) -> str:
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if env.get(name):
            try:
                return expand_nodelist(env[name])[0]
            except ValueError as exc:
                raise UsageError(f"environment variable {name}: {exc}") from None
    raise UsageError("SLURM_JOB_NODELIST is not set and neither is MASTER_ADDR: "
                     "cannot find the rendezvous host")


# --- SLURM host lists ---------------------------------------------------------------------------
# Parsed here rather than with `scontrol show hostnames`: every rank of every step would run a
# subprocess that talks to slurmctld at start-up (hundreds at once on a large job), and scontrol is
# often missing inside containers (Apptainer images carry Python, not the site's SLURM client).


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list as names: 'gpu[1,3-4],cpu7' -> ['gpu1','gpu3','gpu4','cpu7'].

    Zero padding follows the range start ('n[08-10]' -> n08 n09 n10); several bracket groups in one
    name expand as a product ('r[1-2]n[1-2]' -> r1n1 r1n2 r2n1 r2n2).
    """
    hosts = []
    for item in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_item(item))
    if not hosts:
        raise ValueError(f"empty node list {nodelist!r}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in node list {text!r}")
    items.append(text[start:])
    return [item for item in items if item]


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _expand_item(item: str) -> list[str]:
    open_ = item.find("[")
    if open_ < 0:
        return [item]
    close = item.index("]", open_)
    prefix, body, rest = item[:open_], item[open_ + 1:close], item[close + 1:]
    numbers = []
    for part in body.split(","):
        match = _RANGE.match(part.strip())
        if not match:
            raise ValueError(f"bad range {part!r} in node list item {item!r}")
        lo, hi = match.group(1), match.group(2) or match.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {part!r} in node list item {item!r}")
        numbers.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return [prefix + n + tail for n in numbers for tail in _expand_item(rest)]


# --- process group --------------------------------------------------------------------------------


def init_process_group(env: DistEnv, timeout_s: float = DEFAULT_TIMEOUT_S,
                       rendezvous_dir: str | os.PathLike | None = None) -> None:
    """Join the job's process group; no-op for one process or when already joined.

    `timeout_s` bounds every collective (gloo and NCCL), so a rank that died or fell out of step
    makes the others fail with an error instead of hanging the job; it must exceed the longest gap
    between collectives (e.g. rank 0 writing a checkpoint while the others wait).
    `rendezvous_dir`: a folder every rank sees (the fold's run directory), where rank 0 publishes
    its port when the environment gives none.
    """
    if env.world_size == 1 or tdist.is_initialized():
        return
    kwargs: dict[str, Any] = {}
    if env.backend == "nccl":
        torch.cuda.set_device(env.device)
        kwargs["device_id"] = torch.device(env.device)
    timeout = timedelta(seconds=timeout_s)
    if env.master_port is None:
        kwargs["store"] = _published_store(env, rendezvous_dir, timeout)
    else:
        # tcp:// with the detected address, so SLURM runs need not export MASTER_ADDR; under torchrun
        # the agent's store is used either way.
        kwargs["init_method"] = f"tcp://{_host_for_url(env.master_addr)}:{env.master_port}"
    tdist.init_process_group(backend=env.backend, rank=env.rank, world_size=env.world_size, timeout=timeout,
                             **kwargs)
    if env.master_port is None and env.is_main:
        # Every rank has joined (the group's creation waits for all): the address served its turn.
        Path(rendezvous_dir, f".rendezvous-{env.rendezvous}.json").unlink(missing_ok=True)


def _published_store(env: DistEnv, rendezvous_dir, timeout: timedelta) -> "tdist.TCPStore":
    """Rank 0 listens on a port the system picks and writes it to RENDEZVOUS_DIR; the others wait for
    the file and connect. No two jobs on a node can pick the same port."""
    if rendezvous_dir is None:
        raise UsageError("no MASTER_PORT in the environment and no run directory to agree on a port in: "
                         "set MASTER_PORT, or start ranks through `wbs-dist train`")
    path = Path(rendezvous_dir) / f".rendezvous-{env.rendezvous}.json"
    if env.is_main:
        host = _own_address(env.master_addr)
        store = tdist.TCPStore(host, 0, env.world_size, is_master=True, timeout=timeout,
                               wait_for_workers=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"host": host, "port": store.port})
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        try:
            published = json.loads(path.read_text())
            break
        except (FileNotFoundError, ValueError):
            if time.monotonic() > deadline:
                raise UsageError(f"rank {env.rank}: rank 0 published no rendezvous in {path} within "
                                 f"{timeout.total_seconds():.0f} s (dist_timeout_s)") from None
            time.sleep(0.1)
    return tdist.TCPStore(published["host"], int(published["port"]), env.world_size, is_master=False,
                          timeout=timeout)


def _own_address(node: str) -> str:
    """What rank 0, which runs on `node` (the step's first node), publishes for the others to reach it:
    the SLURM node name when it resolves (a real cluster's node names are host names), else this
    host's name. Nodes that share a host (hpc/slurm-up.sh --nodes 2: vm and vm2) carry names that
    only slurm.conf maps to an address; a one-node fold placed on vm2 could not start without this."""
    try:
        socket.getaddrinfo(node, None)
        return node
    except (OSError, UnicodeError):
        return socket.gethostname()


def _host_for_url(host: str | None) -> str:
    return f"[{host}]" if host and ":" in host and not host.startswith("[") else str(host)


def _initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def _collective_device() -> torch.device:
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if not _initialized():
        return
    if tdist.get_backend() == "nccl":
        tdist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        tdist.barrier()


def all_reduce_mean(value: torch.Tensor | float) -> torch.Tensor | float:
    """The mean of `value` over all ranks, same kind as given (tensor on its device, or float)."""
    if not _initialized():
        return value
    if isinstance(value, torch.Tensor):
        t = value.detach().clone()
        if not t.is_floating_point():
            t = t.double()
    else:
        t = torch.tensor(float(value), dtype=torch.float64)
    reduced = t.to(_collective_device())
    tdist.all_reduce(reduced, op=tdist.ReduceOp.SUM)
    reduced /= tdist.get_world_size()
    if isinstance(value, torch.Tensor):
        return reduced.to(value.device)
    return reduced.item()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks in place (a tensor on this rank's collective device)."""
    if _initialized():
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank."""
    if not _initialized():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=_collective_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's `obj` (picklable), in rank order, on every rank; None without a process group."""
    if not _initialized():
        return None
    boxes = [None] * tdist.get_world_size()
    tdist.all_gather_object(boxes, obj)
    return boxes


def gather_arrays(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Each array concatenated over ranks in rank order, on every rank (small arrays: validation)."""
    boxes = all_gather_objects(arrays)
    if boxes is None:
        return arrays
    return [np.concatenate([b[i] for b in boxes]) for i in range(len(arrays))]


@torch.no_grad()
def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Give every rank `src`'s buffers (BatchNorm statistics)."""
    if _initialized():
        for buf in model.buffers():
            tdist.broadcast(buf, src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` has it (picklable objects), on every rank."""
    if not _initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def is_main() -> bool:
    return not _initialized() or tdist.get_rank() == 0


def cleanup() -> None:
    if _initialized():
        tdist.destroy_process_group()


# --- seeds ------------------------------------------------------------------------------------------


def seed_everything(seed: int, rank: int) -> int:
    """Seed Python, NumPy and torch (CPU and every CUDA device) from (seed, rank); return that seed.

    Ranks get different, deterministic streams (each draws its own augmentations); the returned
    31-bit seed is for the other RNGs of this rank, e.g. the DALI pipeline's `seed`.
    """
    if seed < 0:
        raise ConfigError(f"config key 'seed': must be >= 0 (got {seed})")
    sequence = np.random.SeedSequence(entropy=seed, spawn_key=(rank,))
    rank_seed = int(sequence.generate_state(1, dtype=np.uint32)[0]) & 0x7FFFFFFF
    random.seed(rank_seed)
    np.random.seed(rank_seed)
    torch.manual_seed(rank_seed)  # seeds every CUDA device too
    return rank_seed
