"""The local SLURM cluster (hpc/slurm-up.sh, two nodes on this host) behaves like the real clusters
wbs-dist targets.

These tests run real SLURM daemons (root needed). They must run in CI: when the cluster cannot start
they fail with the start script's output, they never skip.
"""
import os
import sys
import time
from pathlib import Path

import pytest

from helpers import SLURM_NODES, sacct, sbatch, slurm, slurm_up, wait_done, wait_for

pytestmark = pytest.mark.slurm


def _stamp(value):
    return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))


def test_sbatch_wrap_completes_and_is_accounted(slurm_cluster, tmp_path):
    out = tmp_path / "hello.out"
    jobid = sbatch("-o", out, "--wrap", "echo hello from $SLURM_JOB_ID")
    (row,) = wait_done(jobid)
    assert row["State"] == "COMPLETED", row
    assert row["ExitCode"] == "0:0"
    assert out.read_text().strip() == f"hello from {jobid}"


def test_submitit_runs_a_python_function(slurm_cluster, tmp_path):
    import submitit

    # Defined here, not at module level: cloudpickle then ships it by value, since the job's Python
    # cannot import this test module.
    def square_in_job(x):
        import os
        import sys
        return x * x, os.environ["SLURM_JOB_ID"], sys.executable

    executor = submitit.AutoExecutor(folder=tmp_path / "slurm" / "%j")
    assert executor.cluster == "slurm"
    executor.update_parameters(slurm_partition="debug", timeout_min=5, nodes=1, tasks_per_node=1,
                               cpus_per_task=1)
    job = executor.submit(square_in_job, 12)
    # job.result() has no time-out of its own: bound the wait so a broken cluster fails, not hangs.
    wait_for(job.done, f"submitit job {job.job_id}", timeout=90)
    value, jobid, python = job.result()
    assert value == 144
    assert jobid == job.job_id
    assert python == sys.executable
    # submitit follows job states through sacct (hence slurmdbd): it must see the job finish.
    wait_for(lambda: job.watcher.get_state(job.job_id, mode="force") == "COMPLETED",
              "submitit to read COMPLETED from sacct", timeout=30)


def test_job_array_packs_one_cpu_tasks_onto_the_cpus(slurm_cluster, tmp_path):
    # Every node's CPUs: the array spreads over the nodes.
    per_node = dict(line.split() for line in slurm("sinfo", "-h", "-N", "-p", "debug", "-o", "%N %c").splitlines())
    cpus = sum(int(c) for c in per_node.values())
    jobid = sbatch("-a", "0-4", "-c", "1", "-o", tmp_path / "%A_%a.out", "--wrap", "sleep 3")
    rows = wait_done(jobid, count=5)
    assert [r["State"] for r in rows] == ["COMPLETED"] * 5, rows
    spans = [(_stamp(r["Start"]), _stamp(r["End"])) for r in rows]
    # Most tasks running at one time (sacct has 1 s resolution; an end and a start in the same second
    # do not overlap).
    most = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert most == min(cpus, 5), f"{most} tasks ran at once on {cpus} CPUs: {rows}"


def test_scontrol_requeue_runs_the_job_again(slurm_cluster, tmp_path):
    marker = tmp_path / "starts"
    script = tmp_path / "job.sh"
    # Records every start; the first run waits to be requeued, the rerun finishes.
    script.write_text(f"""#!/bin/bash
echo "restart=${{SLURM_RESTART_COUNT:-0}}" >> {marker}
if [[ "${{SLURM_RESTART_COUNT:-0}}" == 0 ]]; then
    for i in $(seq 120); do sleep 0.5; done
fi
""")
    jobid = sbatch("-o", tmp_path / "%j.out", script)
    wait_for(lambda: marker.exists() and marker.read_text().strip(), "the first start")
    slurm("scontrol", "requeue", jobid)
    (row,) = wait_done(jobid, timeout=90)
    assert row["State"] == "COMPLETED", row
    assert marker.read_text().split() == ["restart=0", "restart=1"]
    assert [r["State"] for r in sacct(jobid, duplicates=True)] == ["REQUEUED", "COMPLETED"]


def test_slurm_up_again_is_a_quick_no_op(slurm_cluster):
    state = Path(os.environ.get("WBS_SLURM_STATE", "/tmp/wbs-slurm"))
    pids = sorted(p.read_text() for p in state.rglob("*.pid"))
    started = time.monotonic()
    r = slurm_up(SLURM_NODES, timeout=120)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - started < 10
    assert sorted(p.read_text() for p in state.rglob("*.pid")) == pids, "a healthy cluster was restarted"


def _nodes() -> list[str]:
    return sorted(set(slurm("sinfo", "-h", "-N", "-p", "debug", "-o", "%N").split()))


def test_a_two_node_job_runs_srun_tasks_on_both_nodes(slurm_cluster, tmp_path):
    nodes = _nodes()
    assert len(nodes) == SLURM_NODES == 2, nodes
    out = tmp_path / "n2.out"
    jobid = sbatch("-N", "2", "--ntasks-per-node", "1", "-o", out, "--wrap",
                   "srun bash -c 'echo $SLURM_PROCID $SLURMD_NODENAME $SLURM_JOB_NODELIST'")
    (row,) = wait_done(jobid)
    assert row["State"] == "COMPLETED", out.read_text()
    lines = sorted(out.read_text().split("\n")[:-1])
    assert [line.split()[:2] for line in lines] == [["0", nodes[0]], ["1", nodes[1]]], lines


def test_slurm_up_with_another_node_count_reconfigures_and_back(slurm_cluster):
    try:
        r = slurm_up(1, timeout=300)
        assert r.returncode == 0, r.stderr
        assert "restarting them" in r.stderr
        assert len(_nodes()) == 1
    finally:
        r = slurm_up(SLURM_NODES, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(_nodes()) == SLURM_NODES
