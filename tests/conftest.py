"""Fixtures shared by the test modules; helpers they share are in helpers.py."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import ROOT, SLURM_NODES, build_store, slurm_up


@pytest.fixture(scope="session", autouse=True)
def _secret(tmp_path_factory):
    # Every test (and every fixture, whatever its scope) uses one throwaway HMAC secret, never the
    # user's own: session-scoped and set before anything else runs.
    path = tmp_path_factory.getbasetemp() / "secret"
    old = os.environ.get("WBS_DIST_SECRET_FILE")
    os.environ["WBS_DIST_SECRET_FILE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("WBS_DIST_SECRET_FILE", None)
    else:
        os.environ["WBS_DIST_SECRET_FILE"] = old


@pytest.fixture(scope="session")
def synth_archive(tmp_path_factory):
    """A 12-patient synthetic archive (every form a converter meets), shared read-only."""
    from wbs_dist.synth import write_archive

    out = tmp_path_factory.mktemp("synth") / "archive"
    write_archive(out, 12, seed=7, form="dir", progress=False)
    return out


@pytest.fixture
def archive_copy(synth_archive, tmp_path):
    dst = tmp_path / "archive"
    shutil.copytree(synth_archive, dst)
    return dst


@pytest.fixture(scope="session")
def loader_store(tmp_path_factory):
    """A 30-patient store with 3 folds, shared read-only."""
    return build_store(tmp_path_factory.mktemp("loader"), patients=30, seed=21, k=3)


@pytest.fixture(scope="session")
def detector_dir(loader_store, tmp_path_factory):
    """A detector run of loader_store at its own level (96 x 48; the classifier's is 64 x 32): fold0
    trained for one epoch; fold1 a copy (the ensemble's mean and median are then its own).
    Read-only: copy it to change it."""
    from wbs_dist.config import load_config
    from wbs_dist.train.trainer import train_fold

    run = tmp_path_factory.mktemp("detector") / "run"
    cfg = load_config(ROOT / "configs" / "local.yaml",
                      [f"store={loader_store}", f"run_dir={run}", "train_size=96x48", "folds=3", "epochs=1",
                       "task=detect", "model=unet_small", "weights=none", "batch_size=4", "lr=3e-3",
                       "num_workers=0", "checkpoint_every=0"])
    train_fold(cfg, 0)
    shutil.copytree(run / "fold0", run / "fold1", ignore=shutil.ignore_patterns("*.lock", "events.*"))
    return run


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start (or reuse) the local cluster of SLURM_NODES nodes; yield the client environment, also set in
    os.environ.

    Set in os.environ because submitit and other code under test call sbatch/sacct themselves; sbatch
    passes it on to the jobs. The cluster is left running afterwards: the next session reuses it in
    well under a second, and `bash hpc/slurm-down.sh` stops it.
    """
    try:
        r = slurm_up(SLURM_NODES)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hpc/slurm-up.sh did not finish in {e.timeout} s:\n{e.stderr or ''}", pytrace=False)
    if r.returncode != 0:
        pytest.fail(f"hpc/slurm-up.sh --nodes {SLURM_NODES} could not start the SLURM cluster (exit {r.returncode}):\n"
                    f"{r.stderr}\n{r.stdout}", pytrace=False)
    state = Path(os.environ.get("WBS_SLURM_STATE", "/tmp/wbs-slurm"))
    env = dict(line.split("=", 1) for line in (state / "env").read_text().splitlines() if "=" in line)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def pytest_collection_modifyitems(items):
    # Every test that needs the SLURM cluster is a `slurm` test, whatever module it lives in.
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)
