import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WBS = [sys.executable, "-m", "wbs_dist.cli"]


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


def run_cli(*args, cwd=None, timeout=600):
    """Run `wbs-dist` as a user would: a subprocess, its exit status, stdout and stderr."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(WBS + [str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


@pytest.fixture(scope="session")
def synth_archive(tmp_path_factory):
    """A 12-patient synthetic archive (every form a converter meets), shared read-only."""
    from wbs_dist.synth import run_synth

    out = tmp_path_factory.mktemp("synth") / "archive"
    assert run_synth(out, patients=12, seed=7, form="dir") == 0
    return out


@pytest.fixture
def archive_copy(synth_archive, tmp_path):
    dst = tmp_path / "archive"
    shutil.copytree(synth_archive, dst)
    return dst


@pytest.fixture(scope="session")
def loader_store(tmp_path_factory):
    """A 30-patient store at a tiny training size (64 x 32) with 3 folds, shared read-only."""
    from wbs_dist.folds import write_folds
    from wbs_dist.ingest import run_ingest
    from wbs_dist.store import Store
    from wbs_dist.synth import run_synth

    base = tmp_path_factory.mktemp("loader")
    run_synth(base / "archive", patients=30, seed=21, form="dir")
    assert run_ingest(base / "archive", store=base / "store.zarr", workers=2, train_size=(64, 32)) == 0
    write_folds(Store.open(base / "store.zarr"), k=3, seed=0)
    return base / "store.zarr"
