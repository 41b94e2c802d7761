"""Rank detection, host lists, seeds, and real 2-process gloo groups.

Run as a script, this file is the worker those groups run (`python tests/test_dist.py OUT MODE`).
"""

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from wbs_dist.train import ddp as wdist
from wbs_dist.train.checkpoint import PreemptionFlag
from wbs_dist.errors import ConfigError, UsageError

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_USE_AGENT_STORE")


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name in LAUNCH_VARS or name.startswith("SLURM_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_single_process(clean_env):
    env = wdist.detect()
    assert (env.rank, env.local_rank, env.world_size, env.source) == (0, 0, 1, "single")
    assert (env.backend, env.device) == ("gloo", "cpu")
    wdist.init_process_group(env)  # world 1: nothing to join
    assert not torch.distributed.is_initialized()


def test_torchrun_env(clean_env):
    for name, value in {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                        "MASTER_ADDR": "node07", "MASTER_PORT": "29400"}.items():
        clean_env.setenv(name, value)
    clean_env.setenv("SLURM_PROCID", "0")  # torchrun inside an srun step: torchrun's ranks win
    env = wdist.detect()
    assert (env.rank, env.local_rank, env.world_size) == (5, 1, 8)
    assert (env.master_addr, env.master_port, env.source) == ("node07", 29400, "torchrun")


def test_torchrun_env_errors_name_the_variable(clean_env):
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("LOCAL_RANK", "zero")
    with pytest.raises(UsageError, match="LOCAL_RANK"):
        wdist.detect()
    clean_env.setenv("LOCAL_RANK", "0")
    with pytest.raises(UsageError, match="MASTER_ADDR"):
        wdist.detect()


def slurm(monkeypatch, **extra):
    values = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
              "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    values.update(extra)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_slurm_env(clean_env):
    slurm(clean_env)
    env = wdist.detect()
    assert (env.rank, env.local_rank, env.world_size, env.source) == (3, 1, 4, "slurm")
    # No port from the environment: rank 0 gets one from the system and publishes it (init_process_group).
    assert (env.master_addr, env.master_port, env.rendezvous) == ("gpu07", None, "123456-0-0")
    clean_env.setenv("SLURM_RESTART_COUNT", "2")        # a requeued job's next attempt meets anew
    assert wdist.detect().rendezvous == "123456-2-0"


def test_slurm_env_overrides(clean_env):
    slurm(clean_env, SLURM_STEP_NODELIST="gpu08", SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="1",
          MASTER_PORT="23456")
    env = wdist.detect()
    assert (env.rank, env.world_size, env.master_addr, env.master_port) == (1, 2, "gpu08", 23456)
    clean_env.setenv("MASTER_ADDR", "10.0.0.1")
    assert wdist.detect().master_addr == "10.0.0.1"


def test_slurm_batch_script_without_srun_is_one_process(clean_env, caplog):
    slurm(clean_env, SLURM_PROCID="0")
    clean_env.delenv("SLURM_STEP_ID")
    with caplog.at_level(logging.WARNING, logger="wbs_dist.train.ddp"):
        env = wdist.detect()
    assert (env.rank, env.world_size, env.source) == (0, 1, "single")
    assert "srun" in caplog.text


def test_slurm_rank_outside_world(clean_env):
    slurm(clean_env, SLURM_PROCID="4")
    with pytest.raises(UsageError, match="rank 4"):
        wdist.detect()


@pytest.mark.parametrize("nodelist,hosts", [
    ("node01", ["node01"]),
    ("node[01-03]", ["node01", "node02", "node03"]),
    ("gpu[1,3-4],cpu7", ["gpu1", "gpu3", "gpu4", "cpu7"]),
    ("a-b[001-002]", ["a-b001", "a-b002"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("node[7],x-1.cluster", ["node7", "x-1.cluster"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert wdist.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-03", "node01]", "node[a-b]", "node[3-1]", ""])
def test_expand_nodelist_rejects(bad):
    with pytest.raises(ValueError):
        wdist.expand_nodelist(bad)


def test_bad_nodelist_names_the_variable(clean_env):
    slurm(clean_env, SLURM_JOB_NODELIST="gpu[1-")
    with pytest.raises(UsageError, match="SLURM_JOB_NODELIST"):
        wdist.detect()


def test_seed_everything_per_rank():
    s0 = wdist.seed_everything(42, 0)
    draws0 = (random.random(), np.random.rand(), torch.rand(1).item())
    assert wdist.seed_everything(42, 0) == s0
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws0
    s1 = wdist.seed_everything(42, 1)
    assert s1 != s0 and 0 <= s1 < 2**31
    assert wdist.seed_everything(43, 0) not in (s0, s1)
    with pytest.raises(ConfigError, match="'seed'"):
        wdist.seed_everything(-1, 0)


def test_helpers_without_a_group():
    t = torch.tensor([1.0, 2.0])
    assert wdist.all_reduce_mean(t) is t and wdist.all_reduce_mean(2.5) == 2.5
    assert wdist.broadcast_object({"a": 1}) == {"a": 1}
    assert wdist.is_main()
    wdist.barrier()
    wdist.cleanup()


# --- real process groups -----------------------------------------------------------------------

WORKER = [sys.executable, str(Path(__file__).resolve())]


def worker_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def check_results(out, mode):
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, res in enumerate(results):
        assert res["rank"] == rank and res["world"] == 2 and res["source"] == mode
        assert res["mean_tensor"] == [0.5, 1.5] and res["mean_float"] == 5.0
        assert res["broadcast"] == {"from": 0}
        assert res["preempt"] is True  # only rank 1 was signalled
        assert res["is_main"] == (rank == 0)


@pytest.mark.ddp
def test_two_process_gloo_under_torchrun(tmp_path):
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *WORKER[1:], str(tmp_path), "torchrun"],
        env=worker_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_results(tmp_path, "torchrun")
    assert time.monotonic() - start < 120


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_workers(out, mode, job="1", port=True, nodelist="localhost"):
    common = {"SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": job, "SLURM_JOB_NODELIST": nodelist}
    if port:
        common["MASTER_PORT"] = str(free_port())
    return [subprocess.Popen(WORKER + [str(out), mode], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env=worker_env(SLURM_PROCID=str(r), SLURM_LOCALID=str(r), **common))
            for r in range(2)]


@pytest.mark.ddp
def test_two_process_gloo_under_slurm_env(tmp_path):
    procs = slurm_workers(tmp_path, "slurm")
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    check_results(tmp_path, "slurm")


@pytest.mark.ddp
def test_two_jobs_on_one_node_never_share_a_rendezvous_port(tmp_path):
    """Job ids 20,000 apart mapped to one port before (10000 + id % 20000): the second job could not
    start, or joined the first. Ports now come from the system, published in each run directory."""
    outs = [tmp_path / "job1", tmp_path / "job20001"]
    for out in outs:
        out.mkdir()
    procs = slurm_workers(outs[0], "slurm", job="1", port=False) + \
        slurm_workers(outs[1], "slurm", job="20001", port=False)
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
    for out in outs:
        check_results(out, "slurm")
        assert not list(out.glob(".rendezvous-*"))     # served its turn, removed


@pytest.mark.ddp
def test_a_node_name_that_does_not_resolve_still_meets(tmp_path):
    """Nodes sharing a host (hpc/slurm-up.sh --nodes 2: vm, vm2) have names only slurm.conf maps to an
    address: a job on vm2 alone failed to resolve its rendezvous host. Rank 0 now publishes a name it
    can be reached by."""
    name = "wbs-no-such-node9.invalid"
    with pytest.raises(OSError):
        socket.getaddrinfo(name, None)
    procs = slurm_workers(tmp_path, "slurm", port=False, nodelist=name)
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    check_results(tmp_path, "slurm")


@pytest.mark.ddp
def test_collective_times_out_instead_of_hanging(tmp_path):
    procs = slurm_workers(tmp_path, "hang")
    start = time.monotonic()
    output = procs[0].communicate(timeout=60)[0]
    elapsed = time.monotonic() - start
    procs[1].kill()
    procs[1].communicate()
    assert procs[0].returncode == 0, output
    assert "collective failed" in output and elapsed < 40


def worker(out: Path, mode: str) -> None:
    if mode == "hang":
        env = wdist.detect()
        wdist.init_process_group(env, timeout_s=3, rendezvous_dir=out)
        if env.rank == 1:
            time.sleep(60)  # never joins: rank 0's all_reduce must give up after 3 s
        try:
            wdist.all_reduce_mean(1.0)
        except Exception as exc:  # gloo reports a timeout as a RuntimeError (or DistBackendError)
            print("collective failed:", type(exc).__name__, flush=True)
            os._exit(0)  # skip destroying a group whose peer is gone
        os._exit(1)
    env = wdist.detect()
    wdist.init_process_group(env, timeout_s=30, rendezvous_dir=out)
    wdist.init_process_group(env, timeout_s=30, rendezvous_dir=out)  # idempotent
    flag = PreemptionFlag().install()
    if env.rank == 1:
        os.kill(os.getpid(), signal.SIGUSR2)  # as under submitit: one rank gets the signal
    result = {
        "rank": env.rank,
        "world": env.world_size,
        "source": env.source,
        "mean_tensor": wdist.all_reduce_mean(torch.tensor([env.rank, env.rank + 1.0])).tolist(),
        "mean_float": wdist.all_reduce_mean(float(4 + 2 * env.rank)),
        "broadcast": wdist.broadcast_object({"from": env.rank}),
        "preempt": flag.sync(),
        "is_main": wdist.is_main(),
    }
    wdist.barrier()
    (out / f"rank{env.rank}.json").write_text(json.dumps(result))
    wdist.cleanup()
    wdist.cleanup()  # idempotent


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
