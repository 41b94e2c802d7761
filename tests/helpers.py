"""What several test modules share: the command as a user runs it, a small store, the SLURM client
calls, and random kill points whose seed is printed (so a failure can be replayed). Fixtures live in
conftest.py; test modules import only from here, never from each other."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WBS = [sys.executable, "-m", "wbs_dist.cli"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def run_cli(*args, cwd=None, timeout=600, env=None):
    """Run `wbs-dist` as a user would: a subprocess, its exit status, stdout and stderr. `env`: extra
    environment variables."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(WBS + [str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def build_store(base: Path, patients: int, seed: int, k: int) -> Path:
    """A synthetic archive ingested at a tiny training size (64 x 32) with k folds: base/store.zarr."""
    from wbs_dist.data.folds import write_folds
    from wbs_dist.data.ingest import ingest
    from wbs_dist.data.store import Store
    from wbs_dist.synth import write_archive

    write_archive(base / "archive", patients, seed=seed, form="dir", progress=False)
    assert not ingest(base / "archive", store=base / "store.zarr", workers=2, train_size=(64, 32)).errors
    write_folds(Store.open(base / "store.zarr"), k=k, seed=0)
    return base / "store.zarr"


def store_snapshot(path: Path) -> dict:
    """Every study (attributes, native views, label maps, training level), every other array and every
    attribute of a store, for equality checks. Studies are compared one by one, not as the batches
    that hold them: which studies share a batch depends on who wrote them (shards, workers, kills)."""
    import zarr

    from wbs_dist.data.store import Store

    root = zarr.open_group(str(path), mode="r")
    st = Store.open(path)
    snap = {}
    for key in st.study_keys():
        views, labels = st.native_study(key)
        image, label = st.training_level(key)
        snap[f"study {key}"] = (json.dumps(st.study_attrs(key), sort_keys=True),
                                {v: (a.dtype.str, a.shape, a.tobytes()) for v, a in views.items()},
                                {v: (a.dtype.str, a.shape, a.tobytes()) for v, a in labels.items()},
                                image.tobytes(), label.tobytes())

    def walk(g, prefix):
        snap[prefix + "@attrs"] = json.dumps(dict(g.attrs), sort_keys=True)
        for name, node in g.members():
            if prefix == "" and name == "studies":
                continue
            if isinstance(node, zarr.Group):
                walk(node, f"{prefix}/{name}")
            else:
                snap[f"{prefix}/{name}"] = (node.dtype.str, node[...].tobytes())
                snap[f"{prefix}/{name}@attrs"] = json.dumps(dict(node.attrs), sort_keys=True)

    walk(root, "")
    return snap


def stored_keys(path: Path) -> list[str]:
    """The studies a store holds now (published batches), [] before it exists: for watching a run."""
    from wbs_dist.data.store import Store, StoreError

    try:
        return Store.open(path).study_keys()
    except StoreError:
        return []


def kill_point_rng(name: str) -> random.Random:
    """A random source for a kill point, seeded from WBS_TEST_SEED or fresh; the seed is printed
    (pytest shows it with a failure) so that the same point can be replayed."""
    seed = int(os.environ.get("WBS_TEST_SEED") or random.SystemRandom().randrange(2**32))
    print(f"[{name}] random kill point: WBS_TEST_SEED={seed}")
    return random.Random(seed)


# -- the SLURM client, for the tests that run against hpc/slurm-up.sh's cluster ---------------------
# The suite's cluster: two nodes on this host (hpc/slurm-up.sh --nodes 2), so that the multi-node tests
# (DDP across nodes, Ray across an allocation) run beside the one-node ones without a restart.
SLURM_NODES = 2


def slurm_up(nodes: int = SLURM_NODES, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "hpc" / "slurm-up.sh"), "--nodes", str(nodes)], capture_output=True,
                          text=True, timeout=timeout)


def slurm(*cmd, timeout=30) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stderr}{r.stdout}"
    return r.stdout


def sbatch(*args) -> str:
    return slurm("sbatch", "--parsable", *args).strip().split(";")[0]


def sacct(jobid, duplicates=False) -> list[dict]:
    """Allocation rows (not steps) of a job or array as dicts, oldest first."""
    fields = ["JobID", "State", "Start", "End", "ExitCode"]
    out = slurm("sacct", "-j", jobid, "-X", "-P", "-n", *(["-D"] if duplicates else []), "-o", ",".join(fields))
    rows = [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]
    for row in rows:
        row["State"] = row["State"].split()[0]  # "CANCELLED by 0" -> "CANCELLED"
    return rows


def wait_done(jobid, count=1, timeout=90) -> list[dict]:
    """Poll sacct (sbatch --wait polls far more slowly) until `count` rows are all finished."""
    deadline = time.monotonic() + timeout
    while True:
        rows = sacct(jobid)
        if len(rows) == count and all(r["State"] in TERMINAL for r in rows):
            return rows
        if time.monotonic() > deadline:
            squeue = subprocess.run(["squeue", "-a"], capture_output=True, text=True).stdout
            pytest.fail(f"job {jobid} not finished after {timeout} s: {rows}\nsqueue:\n{squeue}")
        time.sleep(0.5)


def wait_for(predicate, what, timeout=60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)
