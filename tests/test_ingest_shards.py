"""Sharded ingest (`--shard I/N`, issue 16): shards write one store together, a finalize completes it,
and the result is the store a one-process ingest writes."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest

from helpers import ROOT, WBS, kill_point_rng, run_cli, store_snapshot, stored_keys, wait_done
from wbs_dist.data.deid import keyed_hash, load_or_create_secret
from wbs_dist.data.shards import shard_of
from wbs_dist.data.store import Store, StoreError
from wbs_dist.lock import Lock


@pytest.fixture(scope="module")
def reference(synth_archive, tmp_path_factory):
    """The archive ingested by one process: what every sharded run must end equal to."""
    store = tmp_path_factory.mktemp("one") / "store.zarr"
    res = run_cli("ingest", synth_archive, "--store", store, "--workers", 1)
    assert res.returncode == 0, res.stderr
    return store


def study_uids(archive: Path) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in sorted(archive.rglob("*"))
            if p.is_file() and p.name != "annotations.csv" and "masks" not in p.parts}


def shard_cmd(archive, store, shard, workers=1):
    # Batches of 2 studies: a killed shard has published some before it died.
    return WBS + ["ingest", str(archive), "--store", str(store), "--workers", str(workers), "--shard", shard,
                  "--batch-studies", "2"]


def written(stdout: str) -> int:
    return int(re.search(r"(\d+) studies written", stdout).group(1))


def test_shards_running_together_equal_a_one_process_ingest(synth_archive, reference, tmp_path):
    store = tmp_path / "store.zarr"
    procs = [subprocess.Popen(shard_cmd(synth_archive, store, f"{i}/3"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    outs = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    for code, out, err in outs:
        assert code == 0 and "Traceback" not in err, err[-2000:]
    # Disjoint and complete: each study written by exactly one shard.
    assert sum(written(out) for _, out, _ in outs) == 12
    with pytest.raises(StoreError, match="no lesion table"):     # not finalized yet: no partial table
        Store.open(store).lesion_table()
    res = run_cli("ingest", synth_archive, "--store", store, "--workers", 1)
    assert res.returncode == 0 and "(0 new, 12 already there)" in res.stdout, res.stdout + res.stderr
    assert store_snapshot(store) == store_snapshot(reference)
    assert not (store / ".staging").exists()
    assert not any(store.with_name("store.zarr.lock.shared").iterdir())


@pytest.mark.slow
def test_a_killed_shard_reruns_and_the_store_still_equals_a_one_process_ingest(synth_archive, reference, tmp_path):
    secret = load_or_create_secret()
    uids = study_uids(synth_archive)
    by_shard = {i: {keyed_hash(secret, "study", u) for u in uids if shard_of(u, 2) == i} for i in range(2)}
    victim = max(by_shard, key=lambda i: len(by_shard[i]))
    n = len(by_shard[victim])
    assert n >= 4
    store = tmp_path / "store.zarr"
    procs = {i: subprocess.Popen(shard_cmd(synth_archive, store, f"{i}/2", workers=2 if i == victim else 1),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
             for i in range(2)}

    def done() -> int:
        return len(set(stored_keys(store)) & by_shard[victim])

    at = kill_point_rng("ingest shard").randint(1, n - 2)        # studies of the victim written before the kill
    deadline = time.time() + 120
    while done() < at and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(procs[victim].pid, signal.SIGKILL)                 # the shard and its decoding workers
    procs[victim].wait()
    assert procs[1 - victim].wait(timeout=300) == 0
    before = done()
    assert at <= before < n, "the kill should land mid-shard"
    again = run_cli(*shard_cmd(synth_archive, store, f"{victim}/2")[3:])
    assert again.returncode == 0, again.stderr[-2000:]
    assert written(again.stdout) == n - before, again.stdout
    res = run_cli("ingest", synth_archive, "--store", store)
    assert res.returncode == 0 and "(0 new, 12 already there)" in res.stdout, res.stdout + res.stderr
    assert store_snapshot(store) == store_snapshot(reference)


@pytest.mark.slow             # several CLI processes: out of the fast subset
def test_the_lock_admits_shards_together_and_keeps_the_finalize_apart(synth_archive, tmp_path):
    store = tmp_path / "store.zarr"
    lock = store.with_name("store.zarr.lock")
    with Lock(lock, "wbs-dist ingest X --shard 1/2", mode="shared"):    # another shard, running
        res = run_cli("ingest", synth_archive, "--store", store, "--shard", "0/2")
        assert res.returncode == 0, res.stderr[-2000:]
        res = run_cli("ingest", synth_archive, "--store", store)
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert f"is in use by pid {os.getpid()}" in res.stderr and "--shard 1/2" in res.stderr
    with Lock(lock, "wbs-dist ingest X (finalize)"):
        res = run_cli("ingest", synth_archive, "--store", store, "--shard", "1/2")
        assert res.returncode == 1 and f"is in use by pid {os.getpid()}" in res.stderr, res.stderr[-2000:]
    # --wait-lock: the finalize waits for the shard to end instead of being refused.
    held = Lock(lock, "a slow shard", mode="shared").acquire()
    timer = threading.Timer(2.0, held.release)
    timer.start()
    t0 = time.monotonic()
    res = run_cli("ingest", synth_archive, "--store", store, "--wait-lock", 120)
    timer.join()
    assert res.returncode == 0 and "12 studies" in res.stdout, res.stderr[-2000:]
    assert time.monotonic() - t0 >= 2.0


def test_slurm_script_submits_the_shards_then_a_dependent_finalize(tmp_path):
    """Static check of slurm/ingest.sh with stand-ins for sbatch and wbs-dist (the live SLURM run is
    the next test)."""
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    log = tmp_path / "calls"
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\necho "sbatch $*" >> {log}\necho "$(( 100 + $(wc -l < {log}) ))"\n')
    (venv / "bin" / "wbs-dist").write_text(f'#!/bin/bash\necho "wbs-dist $*" >> {log}\n')
    (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')
    for f in (bin_dir / "sbatch", venv / "bin" / "wbs-dist"):
        f.chmod(0o755)
    script = ROOT / "slurm" / "ingest.sh"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", WBS_DIST_VENV=str(venv))
    r = subprocess.run(["bash", str(script), "/a/arc", "/s/store.zarr", "--shards", "3", "--max-views", "4"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert log.read_text().splitlines() == [
        f"sbatch --parsable --array=0-2 {script} /a/arc /s/store.zarr --max-views 4",
        f"sbatch --parsable --dependency=afterany:101 --output=slurm-ingest-%j.out {script} /a/arc /s/store.zarr --max-views 4"]
    log.unlink()
    task = dict(env, SLURM_JOB_ID="7", SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_TASK_COUNT="3", SLURM_CPUS_PER_TASK="4")
    assert subprocess.run(["bash", str(script), "/a/arc", "/s/store.zarr", "--max-views", "4"], env=task).returncode == 0
    final = dict(env, SLURM_JOB_ID="8", SLURM_CPUS_PER_TASK="4")
    assert subprocess.run(["bash", str(script), "/a/arc", "/s/store.zarr", "--max-views", "4"], env=final).returncode == 0
    assert log.read_text().splitlines() == [
        "wbs-dist ingest /a/arc --store /s/store.zarr --workers 4 --shard 2/3 --max-views 4",
        "wbs-dist ingest /a/arc --store /s/store.zarr --workers 4 --wait-lock 600 --max-views 4"]


def test_slurm_script_on_the_cluster_ingests_like_one_process(slurm_cluster, synth_archive, reference, tmp_path):
    """`bash slurm/ingest.sh ARCHIVE STORE --shards 3` for real: a 3-task array and a finalize after it,
    all COMPLETED, and the store a one-process ingest writes."""
    store = tmp_path / "store.zarr"
    # The jobs run this test's Python (and its PYTHONPATH, which sbatch passes on); the logs land in
    # the submit directory, here tmp_path, not the repository.
    env = dict(os.environ, WBS_DIST_VENV=sys.prefix)
    r = subprocess.run(["bash", str(ROOT / "slurm" / "ingest.sh"), str(synth_archive), str(store), "--shards", "3"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    array, final = re.search(r"job array (\d+) \(3 tasks\); finalize: job (\d+)", r.stdout).groups()
    try:
        tasks = wait_done(array, count=3, timeout=120)
        (fin,) = wait_done(final, timeout=120)
    finally:
        subprocess.run(["scancel", array, final], capture_output=True)
    logs = {p.name: p.read_text() for p in sorted(tmp_path.glob("slurm-ingest-*.out"))}
    shown = "\n".join(f"== {name}\n{text[-2000:]}" for name, text in logs.items())
    assert [(t["State"], t["ExitCode"]) for t in tasks + [fin]] == [("COMPLETED", "0:0")] * 4, f"{tasks} {fin}\n{shown}"
    # The finalize started once every shard had ended (afterany), and found nothing left to write.
    assert fin["Start"] >= max(t["End"] for t in tasks), (tasks, fin)
    names = [f"slurm-ingest-{array}_{i}.out" for i in range(3)] + [f"slurm-ingest-{final}.out"]
    assert sorted(logs) == sorted(names), shown
    *shard_logs, final_log = (logs[name] for name in names)
    assert sum(written(text) for text in shard_logs) == 12, shown
    assert sum(written(text) > 0 for text in shard_logs) >= 2, shown     # the work really was split
    assert "(0 new, 12 already there)" in final_log, shown
    assert store_snapshot(store) == store_snapshot(reference)
