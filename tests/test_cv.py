"""`wbs-dist cv`: locally, and on a real SLURM cluster through submitit (`sbatch slurm/cv.sh`)."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from wbs_dist.config import load_config
from wbs_dist.launch.slurm import slurm_parameters

from helpers import ROOT, WBS, build_store, run_cli

GOLDEN = ROOT / "tests" / "golden"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")


@pytest.fixture(scope="session")
def cv_store(tmp_path_factory):
    """40 patients with five folds: the study's k on a store small enough for CPUs."""
    return build_store(tmp_path_factory.mktemp("cv"), patients=40, seed=5, k=5)


def tiny_config(path: Path, store: Path, run_dir: Path, **extra) -> Path:
    cfg = {"store": str(store), "run_dir": str(run_dir), "train_size": "64x32",
           "model": "resnet18", "weights": "none", "epochs": 1, "folds": 5, "num_workers": 0,
           "deterministic": True, "slurm_tasks_per_node": 2, "slurm_cpus_per_task": 1, "slurm_mem_gb": 2,
           "slurm_time_min": 30, "slurm_signal_delay_s": 30}
    cfg.update(extra)
    path.write_text(yaml.safe_dump(cfg))
    load_config(path)  # the tests' configs are valid configs
    return path


@pytest.mark.parametrize("name", ["baseline", "local"])
def test_sbatch_parameters_match_golden_file(name):
    """The sbatch text submitit generates for a fold job, pinned: resources come from the config."""
    from submitit.slurm.slurm import _make_sbatch_string

    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    text = _make_sbatch_string(command="python -u -m submitit.core._submit /RUN/slurm/%j", folder="/RUN/slurm/%j",
                               map_count=cfg.folds, **slurm_parameters(cfg))
    golden = GOLDEN / f"cv_{name}.sbatch"
    if os.environ.get("WBS_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"sbatch text changed; review and rerun with WBS_UPDATE_GOLDEN=1\n{text}"


@pytest.mark.slow
def test_local_cv_runs_every_fold_and_writes_the_report(cv_store, tmp_path):
    cfg = tiny_config(tmp_path / "cv.yaml", cv_store, tmp_path / "runs")
    res = run_cli("cv", cfg, "--launcher", "local")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "report" / "metrics.json").read_text())
    assert sorted(metrics["lesion"]["folds"]) == ["0", "1", "2", "3", "4"]
    assert (tmp_path / "runs" / "report" / "report.html").exists()
    check_against_the_store(tmp_path / "runs" / "predictions.csv", cv_store, metrics)
    # A rerun finds every fold finished and only rebuilds the report.
    res = run_cli("cv", cfg, "--launcher", "local")
    assert res.returncode == 0 and res.stderr.count("already finished") == 5


def check_against_the_store(predictions: Path, store_path: Path, metrics: dict) -> None:
    """The CV predictions hold every lesion of the store's lesion table once, each fold's rows are
    the patients of that fold of the store's split, and the report counted them all."""
    import csv

    from wbs_dist.data.folds import read_folds
    from wbs_dist.data.store import Store, int_to_key

    with predictions.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    store = Store.open(store_path)
    table = store.lesion_table()
    got = [(r["study_uid"], int(r["lesion_id"])) for r in rows]
    want = {(int_to_key(s), int(le)) for s, le in zip(table["study"], table["lesion_id"])}
    assert len(got) == len(set(got)), "a lesion predicted twice"
    assert set(got) == want, f"missing {len(want - set(got))}, not in the store {len(set(got) - want)}"
    patients, fold, _ = read_folds(store)
    for k in range(5):
        in_store = {int_to_key(p) for p in patients[fold == k]}
        in_rows = {r["patient_id"] for r in rows if r["fold"] == str(k)}
        assert in_rows == in_store, f"fold {k}: its predictions are not its patients"
        assert metrics["lesion"]["folds"][str(k)]["n"] == sum(r["fold"] == str(k) for r in rows)
    assert metrics["lesion"]["pooled"]["n"] == len(want)


def _sacct_state(jobid: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", jobid, "-o", "State"], capture_output=True, text=True).stdout
    return out.split()[0].split()[0] if out.split() else "UNKNOWN"


def _wait(predicate, what: str, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_sbatch_cv_sh_runs_five_ddp_folds_and_writes_the_report(slurm_cluster, cv_store, tmp_path):
    cfg = tiny_config(tmp_path / "cv.yaml", cv_store, tmp_path / "runs")
    out = tmp_path / "driver.out"
    jobid = subprocess.run(["sbatch", "--parsable", "-o", str(out), str(ROOT / "slurm" / "cv.sh"), str(cfg)],
                           capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    _wait(lambda: _sacct_state(jobid) in TERMINAL, "the cv driver job", timeout=900)
    log = out.read_text()
    assert _sacct_state(jobid) == "COMPLETED", log[-3000:]
    assert "[cv] report:" in log
    for k in range(5):
        assert "cpu x 2 rank(s)" in (tmp_path / "runs" / f"fold{k}" / "train.log").read_text()
        assert (tmp_path / "runs" / f"fold{k}" / "done.json").exists()
    metrics = json.loads((tmp_path / "runs" / "report" / "metrics.json").read_text())
    assert sorted(metrics["lesion"]["folds"]) == ["0", "1", "2", "3", "4"]


def test_requeued_fold_resumes_and_ends_like_an_uninterrupted_run(slurm_cluster, cv_store, tmp_path):
    import dataclasses

    from wbs_dist.launch.slurm import FoldJob, _executor

    extra = {"epochs": 3, "checkpoint_every": 2, "slurm_tasks_per_node": 1}
    cfg = load_config(tiny_config(tmp_path / "cv.yaml", cv_store, tmp_path / "runs", **extra))
    executor = _executor(cfg)
    job = executor.submit(FoldJob(dataclasses.asdict(cfg)), 1)
    last = tmp_path / "runs" / "fold1" / "last.pt"
    _wait(last.exists, "the fold's first checkpoint", timeout=300)
    subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    _wait(lambda: _sacct_state(job.job_id) in TERMINAL, "the requeued fold", timeout=600)
    assert _sacct_state(job.job_id) == "COMPLETED"
    states = subprocess.run(["sacct", "-n", "-X", "-P", "-D", "-j", job.job_id, "-o", "State"],
                            capture_output=True, text=True).stdout.split()
    assert states[0] == "REQUEUED", states
    assert "resumed from" in (tmp_path / "runs" / "fold1" / "train.log").read_text()
    # The same fold, uninterrupted, in this machine's own process.
    ref_cfg = tiny_config(tmp_path / "ref.yaml", cv_store, tmp_path / "ref", **extra)
    # As many threads as the job's task had (slurm_cpus_per_task): CPU kernels sum in another order
    # with another thread count, and the comparison is bit for bit.
    res = run_cli("train", ref_cfg, "--fold", 1, env={"SLURM_CPUS_PER_TASK": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "runs" / "fold1" / "predictions.csv").read_bytes() == \
        (tmp_path / "ref" / "fold1" / "predictions.csv").read_bytes()


# -- one fold across two nodes ------------------------------------------------------------------------
# Two ranks either way, one CPU (thread) each: on CPU, 2-rank gloo all-reduces sum two numbers, which
# is the same in any order, so where the ranks run must not change a bit of the result.
MULTI = {"epochs": 2, "checkpoint_every": 2, "slurm_cpus_per_task": 1}
MULTI_FOLD = 2


def _submit_fold(cfg_path: Path, fold: int = MULTI_FOLD):
    from wbs_dist.launch.slurm import FoldJob, _executor

    cfg = load_config(cfg_path)
    return _executor(cfg).submit(FoldJob(cfg.to_dict()), fold)


def _finished(job, what: str) -> None:
    _wait(lambda: _sacct_state(job.job_id) in TERMINAL, what, timeout=900)
    assert _sacct_state(job.job_id) == "COMPLETED", _fold_log(job)


def _fold_log(job) -> str:
    try:
        return (job.stderr() or "")[-3000:]
    except Exception:
        return "(no log)"


def _nodes_of(jobid: str) -> str:
    return subprocess.run(["sacct", "-n", "-X", "-P", "-j", jobid, "-o", "NodeList"], capture_output=True,
                          text=True).stdout.split()[-1]


def _same_weights(run_a: Path, run_b: Path) -> None:
    import torch

    a, b = (torch.load(r / f"fold{MULTI_FOLD}" / "last.pt", weights_only=True)["model"] for r in (run_a, run_b))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"
    assert (run_a / f"fold{MULTI_FOLD}" / "predictions.csv").read_bytes() == \
        (run_b / f"fold{MULTI_FOLD}" / "predictions.csv").read_bytes()


@pytest.fixture(scope="module")
def two_ranks_one_node(slurm_cluster, cv_store, tmp_path_factory):
    """The reference: the fold as 2 DDP ranks on one node, submitted once (running beside the test
    that first needs it); yields (job, run directory)."""
    tmp = tmp_path_factory.mktemp("one-node")
    cfg = tiny_config(tmp / "cv.yaml", cv_store, tmp / "runs", slurm_nodes=1, slurm_tasks_per_node=2, **MULTI)
    return _submit_fold(cfg), tmp / "runs"


@pytest.mark.ddp
def test_a_fold_across_two_nodes_ends_with_the_weights_of_two_ranks_on_one(two_ranks_one_node, cv_store, tmp_path):
    cfg = tiny_config(tmp_path / "cv.yaml", cv_store, tmp_path / "runs", slurm_nodes=2, slurm_tasks_per_node=1,
                      **MULTI)
    job = _submit_fold(cfg)
    _finished(job, "the two-node fold")
    assert "," in _nodes_of(job.job_id), _nodes_of(job.job_id)       # both nodes
    assert "cpu x 2 rank(s)" in (tmp_path / "runs" / f"fold{MULTI_FOLD}" / "train.log").read_text()
    ref_job, ref_runs = two_ranks_one_node
    _finished(ref_job, "the one-node reference fold")
    assert "," not in _nodes_of(ref_job.job_id)
    _same_weights(tmp_path / "runs", ref_runs)


@pytest.mark.ddp
def test_a_requeued_two_node_fold_resumes_exactly(two_ranks_one_node, cv_store, tmp_path):
    cfg = tiny_config(tmp_path / "cv.yaml", cv_store, tmp_path / "runs", slurm_nodes=2, slurm_tasks_per_node=1,
                      **MULTI)
    job = _submit_fold(cfg)
    fold_dir = tmp_path / "runs" / f"fold{MULTI_FOLD}"
    _wait((fold_dir / "last.pt").exists, "the two-node fold's first checkpoint", timeout=600)
    subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    _finished(job, "the requeued two-node fold")
    states = subprocess.run(["sacct", "-n", "-X", "-P", "-D", "-j", job.job_id, "-o", "State"],
                            capture_output=True, text=True).stdout.split()
    assert states[0] == "REQUEUED", states
    assert "," in _nodes_of(job.job_id)
    assert "resumed from" in (fold_dir / "train.log").read_text()
    ref_job, ref_runs = two_ranks_one_node
    _finished(ref_job, "the one-node reference fold")
    _same_weights(tmp_path / "runs", ref_runs)


def test_failing_folds_are_retried_and_reported(slurm_cluster, cv_store, tmp_path):
    cfg = tiny_config(tmp_path / "cv.yaml", cv_store, tmp_path / "runs", slurm_max_retries=1,
                      slurm_setup="echo 'module: command not found' >&2; exit 3")
    res = run_cli("cv", cfg, "--launcher", "slurm", timeout=600)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "failed after all retries" in res.stderr and "module: command not found" in res.stderr
    assert res.stdout.count("resubmitted") == 5                  # each fold tried twice
    assert res.stderr.count("(attempt 2,") == 5


def test_sbatch_train_folds_sh_then_cv_local_reports(slurm_cluster, cv_store, tmp_path):
    """The driverless path: the array script trains the folds (2 DDP ranks each under srun), then a
    local `cv` finds them finished and only writes the report. The command line overrides the
    script's GPU-node resources for this CPU cluster."""
    cfg = tiny_config(tmp_path / "cv.yaml", cv_store, tmp_path / "runs")
    jobid = subprocess.run(
        ["sbatch", "--parsable", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem=2G",
         "--time=30", "-o", str(tmp_path / "fold-%a.out"), str(ROOT / "slurm" / "train_folds.sh"), str(cfg)],
        capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()

    def states():
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", jobid, "-o", "JobID,State"], capture_output=True,
                             text=True).stdout.split()
        return dict(line.split("|") for line in out if "[" not in line)

    _wait(lambda: len(states()) == 5 and all(s in TERMINAL for s in states().values()), "the fold array", 900)
    logs = {k: (tmp_path / f"fold-{k}.out").read_text() for k in range(5)}
    assert set(states().values()) == {"COMPLETED"}, {k: v[-1500:] for k, v in logs.items()}
    for k in range(5):
        assert "cpu x 2 rank(s)" in (tmp_path / "runs" / f"fold{k}" / "train.log").read_text()
    res = run_cli("cv", cfg, "--launcher", "local")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("already finished") == 5
    metrics = json.loads((tmp_path / "runs" / "report" / "metrics.json").read_text())
    assert sorted(metrics["lesion"]["folds"]) == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("how, key", [
    ("override", "slurm_partition"),
    ("yaml_block", "slurm_partition"),
    ("setup_directive", "slurm_setup"),
    ("account_shell", "slurm_account"),
    ("run_dir_newline", "run_dir"),
])
def test_injection_into_the_job_script_exits_2_and_submits_nothing(tmp_path, how, key):
    """A newline in slurm_partition (say from a YAML `|` block) would end its #SBATCH line: the next
    line becomes a directive of its own (here a 1-minute limit) and shell after it runs. Refused
    when the config is read, naming the key: no job script, no RUN_DIR/slurm. No cluster needed."""
    run = tmp_path / "runs"
    cfg = tiny_config(tmp_path / "cv.yaml", tmp_path / "no-store.zarr", run)
    extra = []
    if how == "override":
        extra = ["slurm_partition=debug\n#SBATCH --time=1"]
    elif how == "yaml_block":
        cfg.write_text(cfg.read_text() + "slurm_partition: |\n  debug\n  #SBATCH --time=1\n")
    elif how == "setup_directive":
        cfg.write_text(cfg.read_text() + "slurm_setup: |\n  module load cuda\n  #SBATCH --partition=other\n")
    elif how == "account_shell":
        extra = ["slurm_account=proj;touch " + str(tmp_path / "pwned")]
    else:
        extra = [f"run_dir={run}\n#SBATCH --time=1"]
    res = run_cli("cv", cfg, "--launcher", "slurm", *extra)
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"config key '{key}'" in res.stderr and "Traceback" not in res.stderr
    assert not run.exists() and not list(tmp_path.glob("runs*")) and not (tmp_path / "pwned").exists()


def test_a_config_built_in_code_is_checked_before_it_reaches_the_job_script():
    from wbs_dist.config import Config
    from wbs_dist.errors import ConfigError

    with pytest.raises(ConfigError, match="slurm_partition"):
        slurm_parameters(Config(slurm_partition="debug\n#SBATCH --time=1"))


def test_a_restarted_driver_waits_for_its_fold_jobs_instead_of_submitting_them_again(slurm_cluster, cv_store,
                                                                                    tmp_path):
    # Epochs enough that the folds still run (or wait) when the driver is killed and started again.
    cfg = tiny_config(tmp_path / "cv.yaml", cv_store, tmp_path / "runs", slurm_tasks_per_node=1, epochs=8)
    jobs_file = tmp_path / "runs" / "slurm" / "jobs.json"
    driver = subprocess.Popen(WBS + ["cv", str(cfg), "--launcher", "slurm"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _wait(jobs_file.exists, "the driver's record of its fold jobs", timeout=120)
    submitted = json.loads(jobs_file.read_text())
    assert sorted(submitted) == ["0", "1", "2", "3", "4"]
    # A second driver on the same run directory is refused while the first lives.
    second = run_cli("cv", cfg, "--launcher", "slurm", timeout=120)
    assert second.returncode == 1 and "is in use by pid" in second.stderr, second.stderr[-2000:]
    os.killpg(driver.pid, signal.SIGKILL)          # the driver dies; its fold jobs go on
    driver.communicate()
    again = run_cli("cv", cfg, "--launcher", "slurm", timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "not submitting again" in again.stdout and "submitted folds" not in again.stdout, again.stdout[-3000:]
    assert json.loads(jobs_file.read_text()) == submitted
    # Every fold ran exactly once: sacct knows only the jobs the first driver submitted.
    array = submitted["0"].split("_")[0]
    states = subprocess.run(["sacct", "-n", "-X", "-P", "-j", array, "-o", "JobID,State"],
                            capture_output=True, text=True).stdout.split()
    assert len(states) == 5 and all(s.endswith("|COMPLETED") for s in states), states
    metrics = json.loads((tmp_path / "runs" / "report" / "metrics.json").read_text())
    assert sorted(metrics["lesion"]["folds"]) == ["0", "1", "2", "3", "4"]
