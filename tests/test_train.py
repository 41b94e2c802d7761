"""`wbs-dist train`: exact resume after a signal or a kill, DDP under torchrun, bad configs named."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import ROOT, WBS, kill_point_rng, run_cli

pytestmark = pytest.mark.slow

CONFIG = ROOT / "configs" / "local.yaml"


def overrides(store, run_dir, **extra):
    base = {"store": store, "run_dir": run_dir, "train_size": "64x32", "folds": 3, "epochs": 3,
            "model": "resnet18",
            "checkpoint_every": 2, "deterministic": "true"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def final_state(run_dir: Path, fold=0):
    return torch.load(run_dir / f"fold{fold}" / "last.pt", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(loader_store, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("train") / "runs"
    res = run_cli("train", CONFIG, "--fold", 0, *overrides(loader_store, run_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


def test_run_directory_holds_what_a_user_needs(uninterrupted):
    d = uninterrupted / "fold0"
    for name in ("config.yaml", "metrics.csv", "last.pt", "best.pt", "predictions.csv", "train.log", "done.json"):
        assert (d / name).exists(), name
    assert list(d.glob("events.out.tfevents.*"))
    rows = (d / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,val_loss,val_auc") and len(rows) == 4
    pred = (d / "predictions.csv").read_text().splitlines()
    assert pred[0] == "patient_id,study_uid,lesion_id,view,fold,label,score,tumor_type,lesion_count"
    assert len(pred) > 10 and all(line.split(",")[4] == "0" for line in pred[1:])
    state = torch.load(d / "last.pt", weights_only=True)       # loads without pickle
    assert state["epoch"] == 3


def test_predictions_are_the_final_epochs(uninterrupted):
    """predictions.csv, done.json and metrics.csv's last row describe one validation: the final
    epoch's (not the best one's: choosing the epoch on the validation fold would flatter it)."""
    import json
    import math

    from sklearn.metrics import roc_auc_score

    d = uninterrupted / "fold0"
    rows = prediction_rows(d / "predictions.csv")
    y = [int(r["label"]) for r in rows]
    p = [float(r["score"]) for r in rows]
    auc = roc_auc_score(y, p)
    done = json.loads((d / "done.json").read_text())
    epochs = prediction_rows(d / "metrics.csv")
    assert done["epochs"] == len(epochs) == 3 and int(epochs[-1]["epoch"]) == 2
    # The epochs differ from one another, so agreeing with the last one means something.
    assert len({e["val_loss"] for e in epochs}) == len(epochs)
    # Scores are written with 6 decimals, metrics.csv rounds to 6: agreement to 1e-5.
    assert auc == pytest.approx(done["val_auc"], abs=1e-5)
    assert auc == pytest.approx(float(epochs[-1]["val_auc"]), abs=1e-5)
    loss = -sum(math.log(q) if t else math.log(1 - q) for t, q in zip(y, p)) / len(y)
    assert loss == pytest.approx(done["val_loss"], abs=1e-4)
    assert loss == pytest.approx(float(epochs[-1]["val_loss"]), abs=1e-4)
    assert done["lesions"] == len(rows)


def test_lesion_count_is_the_studys_on_every_row(loader_store, uninterrupted):
    from collections import Counter

    from wbs_dist.data.store import Store, int_to_key

    table = Store.open(loader_store).lesion_table()
    in_store = Counter(int_to_key(s) for s in table["study"])
    rows = prediction_rows(uninterrupted / "fold0" / "predictions.csv")
    per_study = Counter(r["study_uid"] for r in rows)
    counts = {}
    for r in rows:
        counts.setdefault(r["study_uid"], set()).add(int(r["lesion_count"]))
    for study, values in counts.items():
        # One count per study, equal to its lesions: those in the store and, as a validation fold
        # holds whole patients, those in the file.
        assert values == {in_store[study]} == {per_study[study]}, study
    assert len({in_store[s] for s in counts}) > 1       # studies of several sizes: a constant would fail


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGKILL])
def test_interrupted_run_resumes_to_the_same_weights_bit_for_bit(loader_store, uninterrupted, tmp_path, sig):
    run_dir = tmp_path / "runs"
    args = ["train", str(CONFIG), "--fold", "0", *overrides(loader_store, run_dir)]
    log = run_dir / "fold0" / "train.log"
    proc = subprocess.Popen(WBS + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    # After the first checkpoint (so a SIGKILL has something to resume from), at a random step.
    while time.time() < deadline and not (run_dir / "fold0" / "last.pt").exists():
        time.sleep(0.02)
    time.sleep(kill_point_rng(f"train {sig.name}").uniform(0.0, 1.5))
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=120)
    assert not (run_dir / "fold0" / "done.json").exists(), "the signal came after the run finished"
    if sig == signal.SIGUSR2:
        assert proc.returncode == 75, out[-2000:]                 # saved, asks to be requeued
        assert "preempted: saved" in log.read_text()
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in log.read_text()
    a, b = final_state(uninterrupted), final_state(run_dir)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert (uninterrupted / "fold0" / "predictions.csv").read_bytes() == (run_dir / "fold0" / "predictions.csv").read_bytes()


def test_finished_fold_is_not_redone(loader_store, uninterrupted):
    res = run_cli("train", CONFIG, "--fold", 0, *overrides(loader_store, uninterrupted))
    assert res.returncode == 0
    assert "already finished" in res.stderr


def prediction_rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.ddp
def test_ddp_two_ranks_under_torchrun_with_uneven_shards(loader_store, tmp_path):
    from wbs_dist.data.store import Store
    from wbs_dist.config import Config, Size
    from wbs_dist.train.dataset import LesionDataset, fold_indices
    from wbs_dist.train.models import build_model

    # A global batch (2 ranks) that neither the training folds' lesions nor the validation fold's are a
    # multiple of: both are padded, unevenly. (The split depends on the pseudonyms, hence on the
    # session's secret, so the batch is chosen here.)
    train, val = fold_indices(Store.open(loader_store), Config(folds=3, train_size=Size(64, 32)), 0)
    # Some even batch (two ranks) below 64 always qualifies: one larger than both sets, if none smaller.
    batch = next(b for b in range(4, 64, 2) if len(train) % b and len(val) % b)
    run_dir = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "ddp_train_rank.py"), str(CONFIG), str(tmp_path),
           *overrides(loader_store, run_dir, epochs=2, batch_size=batch, dist_timeout_s=120)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    assert "2 rank(s)" in (run_dir / "fold0" / "train.log").read_text()

    # Every validation lesion exactly once: the (study, lesion) pairs as a set, and no row twice.
    rows = prediction_rows(run_dir / "fold0" / "predictions.csv")
    got = [(r["study_uid"], int(r["lesion_id"])) for r in rows]
    want = {(val.study_keys[s], int(le)) for s, le in zip(val.study, val.lesion_id)}
    assert len(got) == len(set(got)), "a validation lesion written twice (padding reached the predictions)"
    assert set(got) == want
    # Each score is this lesion's: one process (the plain Dataset, no sharding, no padding) scoring
    # the same weights gives the same numbers, lesion by lesion.
    model = build_model("resnet18", val.channels)
    model.load_state_dict(r0)
    model.eval()
    ref, label = {}, {}
    loader = torch.utils.data.DataLoader(LesionDataset(val), batch_size=16)
    with torch.no_grad():
        for b in loader:
            for i, p in zip(b["index"].tolist(), torch.sigmoid(model(b["x"]).view(-1)).tolist()):
                key = (val.study_keys[val.study[i]], int(val.lesion_id[i]))
                ref[key], label[key] = p, int(val.label[i])
    for r, key in zip(rows, got):
        assert float(r["score"]) == pytest.approx(ref[key], abs=2e-6), key
        assert int(r["label"]) == label[key], key


@pytest.mark.parametrize("override, needle", [
    ("lr=-0.1", "'lr'"),
    ("model=resnet101", "'model'"),
    ("epochs=0", "'epochs'"),
    ("batch_size=two", "'batch_size'"),
])
def test_bad_config_values_exit_2_naming_the_key(loader_store, tmp_path, override, needle):
    res = run_cli("train", CONFIG, "--fold", 0, *overrides(loader_store, tmp_path), override)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr


def test_fold_out_of_range_exits_2(loader_store, tmp_path):
    res = run_cli("train", CONFIG, "--fold", 5, *overrides(loader_store, tmp_path))
    assert res.returncode == 2 and "--fold 5 out of range" in res.stderr


def test_rerun_with_other_resources_resumes_but_another_lr_is_refused(loader_store, tmp_path):
    """The most common recovery on a cluster: rerun a fold with more time, another partition, more
    epochs. Keys that do not affect results may change on resume; lr may not (exit 2, named)."""
    run_dir = tmp_path / "runs"
    res = run_cli("train", CONFIG, "--fold", 0, *overrides(loader_store, run_dir, epochs=1))
    assert res.returncode == 0, res.stderr[-3000:]
    fold = run_dir / "fold0"
    first_epoch = (fold / "metrics.csv").read_text().splitlines()[1]
    # As if killed after the last checkpoint, before done.json: a rerun resumes from last.pt.
    (fold / "done.json").unlink()
    res = run_cli("train", CONFIG, "--fold", 0, *overrides(
        loader_store, run_dir, epochs=2, slurm_time_min=999, slurm_partition="long", slurm_nodes=2,
        num_workers=1, checkpoint_every=5))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = (fold / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1] == first_epoch      # resumed: epoch 0 kept as it was, epoch 1 trained
    assert "resumed from" in (fold / "train.log").read_text()
    (fold / "done.json").unlink()
    res = run_cli("train", CONFIG, "--fold", 0, *overrides(loader_store, run_dir, epochs=3, lr=0.01))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "lr: 0.001 -> 0.01" in res.stderr and "Traceback" not in res.stderr


def test_two_trainers_on_one_fold_the_second_is_refused(loader_store, tmp_path):
    run_dir = tmp_path / "runs"
    first = subprocess.Popen(WBS + ["train", str(CONFIG), "--fold", "0", *overrides(loader_store, run_dir)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "fold0" / ".lock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = run_cli("train", CONFIG, "--fold", 0, *overrides(loader_store, run_dir))
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 1 and "fold 0 of" in second.stderr and "is in use by pid" in second.stderr
    assert not (run_dir / "fold0" / ".lock").exists()


@pytest.fixture(scope="module")
def resplit(loader_store, tmp_path_factory):
    """Fold 0 trained (1 epoch) on a copy of the session's store, then the copy re-split with another
    seed: (store, run_dir with the finished fold, old fingerprint, new fingerprint)."""
    import shutil

    from wbs_dist.data.folds import split_fingerprint
    from wbs_dist.data.store import Store

    base = tmp_path_factory.mktemp("resplit")
    store = base / "store.zarr"
    shutil.copytree(loader_store, store)          # never re-split the shared store
    run_dir = base / "runs"
    res = run_cli("train", CONFIG, "--fold", 0, *overrides(store, run_dir, epochs=1))
    assert res.returncode == 0, res.stderr[-3000:]
    old = split_fingerprint(Store.open(store))
    res = run_cli("folds", store, "--k", 3, "--seed", 1, "--force")
    assert res.returncode == 0, res.stderr
    new = split_fingerprint(Store.open(store))
    assert new != old
    return store, run_dir, old, new


def test_every_fold_file_records_its_split(resplit):
    import json

    import yaml

    _, run_dir, old, _ = resplit
    d = run_dir / "fold0"
    assert yaml.safe_load((d / "config.yaml").read_text())["split"] == old
    assert json.loads((d / "done.json").read_text())["split"] == old
    assert torch.load(d / "last.pt", weights_only=True)["extra"]["split"] == old
    assert (d / "predictions.csv").read_text().splitlines()[0].split(",")[-1] == "lesion_count"  # columns unchanged


def test_resume_on_a_re_split_store_is_refused(resplit, tmp_path):
    import shutil

    store, finished, old, new = resplit
    run_dir = tmp_path / "runs"
    shutil.copytree(finished, run_dir)
    (run_dir / "fold0" / "done.json").unlink()           # killed before done.json: last.pt remains
    # The user follows the store's new split in the config; the half-trained fold must not resume.
    res = run_cli("train", CONFIG, "--fold", 0, *overrides(store, run_dir, epochs=1, fold_seed=1))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "split changed" in res.stderr and old in res.stderr and new in res.stderr, res.stderr[-3000:]
    assert "new run_dir" in res.stderr
    assert not (run_dir / "fold0" / "done.json").exists()
    # A finished fold of the old split is not "already finished" for the new one either.
    shutil.copy(finished / "fold0" / "done.json", run_dir / "fold0" / "done.json")
    res = run_cli("train", CONFIG, "--fold", 0, *overrides(store, run_dir, epochs=1, fold_seed=1))
    assert res.returncode == 2 and "split changed" in res.stderr, res.stderr[-3000:]


def test_cv_never_aggregates_a_fold_of_the_old_split(resplit, tmp_path):
    import shutil

    store, finished, old, new = resplit
    run_dir = tmp_path / "runs"
    shutil.copytree(finished, run_dir)
    res = run_cli("cv", CONFIG, *overrides(store, run_dir, epochs=1, fold_seed=1))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "split changed" in res.stderr and old in res.stderr and new in res.stderr
    assert not (run_dir / "fold1").exists() and not (run_dir / "predictions.csv").exists()   # nothing launched
