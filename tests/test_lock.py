"""One writer at a time: the lock file, and the store, fold and ingest runs that take it."""

import json
import os
import shutil
import socket
import subprocess
import time

import pytest

from helpers import WBS, run_cli
from wbs_dist.data.store import Store
from wbs_dist.lock import Lock, Locked


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    with Lock(tmp_path / "s.lock", "wbs-dist ingest A", subject="store s"):
        with pytest.raises(Locked, match=rf"store s is in use by pid {os.getpid()} on {socket.gethostname()}.*"
                                         r"wbs-dist ingest A"):
            Lock(tmp_path / "s.lock", "wbs-dist ingest B", subject="store s").acquire()
    with Lock(tmp_path / "s.lock", "B"):          # released: free again
        pass
    assert not (tmp_path / "s.lock").exists()


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path):
    stale = {"host": socket.gethostname(), "pid": _dead_pid(), "start": "1", "job": None, "since": "then",
             "what": "killed"}
    (tmp_path / "s.lock").write_text(json.dumps(stale))
    with Lock(tmp_path / "s.lock", "new") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_a_lock_of_another_host_expires_with_its_heartbeat(tmp_path):
    other = {"host": "node-that-died", "pid": 1, "start": "1", "job": None, "since": "then", "what": "x"}
    (tmp_path / "s.lock").write_text(json.dumps(other))
    with pytest.raises(Locked, match="node-that-died"):
        Lock(tmp_path / "s.lock", "new", stale_after_s=60).acquire()
    old = time.time() - 120
    os.utime(tmp_path / "s.lock", (old, old))
    Lock(tmp_path / "s.lock", "new", stale_after_s=60).acquire().release()


def test_the_heartbeat_keeps_a_held_lock_fresh(tmp_path):
    lock = Lock(tmp_path / "s.lock", "long", heartbeat_s=0.05).acquire()
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    time.sleep(0.3)
    assert time.time() - lock.path.stat().st_mtime < 10
    lock.release()


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (tmp_path / "s.lock").write_text(json.dumps({"host": "other-node", "pid": 77, "start": "1", "job": "4242",
                                                "since": "then", "what": "fold 0 before the requeue"}))
    Lock(tmp_path / "s.lock", "fold 0 after the requeue").acquire().release()


def test_shared_holders_coexist_but_exclude_an_exclusive_one(tmp_path):
    path = tmp_path / "s.lock"
    a = Lock(path, "shard 0", mode="shared").acquire()
    with pytest.raises(Locked, match="shard 0"):
        Lock(path, "finalize").acquire()
    assert not path.exists()                       # the refused exclusive taker left nothing behind
    a.release()
    with Lock(path, "finalize"):
        with pytest.raises(Locked, match="finalize"):
            Lock(path, "shard 1", mode="shared").acquire()


def test_an_ingest_into_a_store_in_use_is_refused_naming_the_holder(synth_archive, tmp_path):
    store = tmp_path / "store.zarr"
    with Lock(store.with_name("store.zarr.lock"), "wbs-dist ingest /elsewhere.zip"):
        res = run_cli("ingest", synth_archive, "--store", store)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"store {store} is in use by pid {os.getpid()}" in res.stderr and "/elsewhere.zip" in res.stderr
    assert not store.exists()                     # refused before anything was written


@pytest.mark.slow
def test_staggered_concurrent_ingests_leave_a_whole_store_or_a_clear_refusal(synth_archive, tmp_path):
    """Before the lock, 7 of 9 such pairs crashed or left a torn store with both runs exiting 0."""
    store = tmp_path / "store.zarr"
    cmd = WBS + ["ingest", str(synth_archive), "--store", str(store), "--workers", "2"]
    procs = []
    for delay in (0.0, 0.4, 0.9):
        time.sleep(delay)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for code, err in results:
        assert code == 0 or (code == 1 and "is in use by pid" in err), err[-2000:]
        assert "Traceback" not in err
    assert any(code == 0 for code, _ in results)
    again = run_cli("ingest", synth_archive, "--store", store)
    assert again.returncode == 0 and "(0 new, 12 already there)" in again.stdout, again.stdout + again.stderr
    clean = run_cli("ingest", synth_archive, "--store", tmp_path / "clean.zarr")
    assert again.stdout.split("already there)")[1] == clean.stdout.split("already there)")[1]   # same lesion table
    assert not store.with_name("store.zarr.lock").exists()


@pytest.mark.slow
def test_a_torn_batch_is_written_again(synth_archive, tmp_path):
    store = tmp_path / "store.zarr"
    assert run_cli("ingest", synth_archive, "--store", store, "--batch-studies", "5").returncode == 0
    batch = sorted((store / "studies").iterdir())[0]
    n = len(json.loads((batch / "zarr.json").read_text())["attributes"]["studies"])
    shutil.rmtree(batch / "train_image")          # as a crash or an old concurrent writer left it
    res = run_cli("ingest", synth_archive, "--store", store)
    assert res.returncode == 0 and f"({n} new, {12 - n} already there)" in res.stdout, res.stdout + res.stderr
    assert not batch.exists() and len(Store.open(store).study_keys()) == 12


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(tmp_path):
    from wbs_dist import scratch

    mine = scratch.make("cache", tmp_path)
    assert mine.stat().st_mode & 0o777 == 0o700
    # What a SIGKILLed process of this user on this host left: same name, a pid that is gone.
    dead = tmp_path / mine.name.replace(f"-{os.getpid()}-", f"-{_dead_pid()}-", 1)
    dead.mkdir()
    (dead / "image.npy").write_bytes(b"x" * 1000)
    other_kind = tmp_path / "wbs-dist-ray-0-abc-1-1-x"
    other_kind.mkdir()
    second = scratch.make("cache", tmp_path)
    assert not dead.exists()                        # stale: removed
    assert mine.exists() and second.exists()        # this process's own folders: alive, kept
    assert other_kind.exists()
