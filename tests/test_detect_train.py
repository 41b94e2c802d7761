"""The learned lesion detector through the classifier's machinery: `wbs-dist train --fold K` with
task=detect, its FROC validation, the threshold chosen on the training folds, exact resume.

Tiny: the 30-patient store at 64 x 32 with 3 folds, the small U-Net, 2 epochs on CPU.
"""

import csv
import json

import pytest
import torch

from wbs_dist.config import load_config

from helpers import ROOT, run_cli


def detect_config(store, run_dir, **extra):
    keys = {"store": store, "run_dir": run_dir, "train_size": "64x32", "folds": 3, "task": "detect",
            "model": "unet_small", "weights": "none", "epochs": 2, "batch_size": 4, "lr": 3e-3,
            "num_workers": 0, "checkpoint_every": 0, "deterministic": "true", **extra}
    return load_config(ROOT / "configs" / "local.yaml", [f"{k}={v}" for k, v in keys.items()])


@pytest.fixture(scope="module")
def detect_fold(loader_store, tmp_path_factory):
    from wbs_dist.train.trainer import train_fold

    run = tmp_path_factory.mktemp("detect") / "run"
    return run, train_fold(detect_config(loader_store, run), 1)


@pytest.mark.slow
def test_a_detect_fold_writes_its_froc_and_a_threshold_chosen_on_the_training_folds(detect_fold, loader_store):
    from wbs_dist.data.store import Store
    from wbs_dist.detection import THRESHOLDS, choose_threshold
    from wbs_dist.train.detector import study_index

    run, result = detect_fold
    assert result.epochs == 2 and (run / "fold1" / "done.json").exists()
    det = json.loads((run / "fold1" / "detection.json").read_text())
    store = Store.open(loader_store)
    val, train = study_index(store, [1]), study_index(store, [0, 2])
    assert det["studies"] == len(val) and det["froc"][0]["studies"] == len(val)
    assert det["train_froc"][0]["studies"] == len(train)
    lesions = store.lesion_table()
    assert det["froc"][0]["lesions"] + det["train_froc"][0]["lesions"] <= len(lesions["study"])
    assert [p["threshold"] for p in det["froc"]] == list(THRESHOLDS)
    # The threshold comes from the training folds' points, never the validation fold's.
    assert det["threshold"] == choose_threshold(det["train_froc"], 0.95)[0]
    assert det["at_threshold"] == next(p for p in det["froc"] if p["threshold"] == det["threshold"])
    for p in det["froc"]:
        assert p["sensitivity"] == pytest.approx(p["found"] / p["lesions"])
        assert p["fp_per_study"] == pytest.approx(p["false"] / p["studies"])
    # (Sensitivity need not fall as the threshold rises: a low threshold can merge a lesion into a
    # component over 10 times its size, which then finds nothing.)
    assert all(0 <= p["found"] <= p["lesions"] and p["false"] >= 0 for p in det["froc"])
    with open(run / "fold1" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and "val_sensitivity_at_3fp" in rows[0] and "val_auc" not in rows[0]
    assert not (run / "fold1" / "predictions.csv").exists()


@pytest.mark.slow
def test_a_detect_fold_resumes_exactly(detect_fold, loader_store, tmp_path):
    """Stopped after its first epoch (and a mid-epoch checkpoint), then run again: the same weights,
    bit for bit, as two epochs at once."""
    from wbs_dist.train.trainer import FoldTrainer, train_fold

    run, _ = detect_fold
    cfg = detect_config(loader_store, tmp_path / "run", checkpoint_every=3)
    first = FoldTrainer(cfg, 1)
    try:
        first.open(preemption=False)
        first.train_epoch()
    finally:
        first.close()
    assert not (tmp_path / "run" / "fold1" / "done.json").exists()
    train_fold(cfg, 1)
    a = torch.load(run / "fold1" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "run" / "fold1" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_detector_model_needs_task_detect_and_back(loader_store, tmp_path):
    r = run_cli("train", ROOT / "configs" / "local.yaml", "--fold", "0", f"store={loader_store}",
                f"run_dir={tmp_path}", "train_size=64x32", "folds=3", "model=unet_small")
    assert r.returncode == 2 and "set task=detect" in r.stderr, r.stderr
    r = run_cli("train", ROOT / "configs" / "local.yaml", "--fold", "0", f"store={loader_store}",
                f"run_dir={tmp_path}", "train_size=64x32", "folds=3", "task=detect", "model=resnet18")
    assert r.returncode == 2 and "set task=classify" in r.stderr, r.stderr


@pytest.mark.slow
def test_cv_of_a_detector_pools_the_folds_at_their_own_thresholds(loader_store, tmp_path):
    """`wbs-dist cv` with task=detect: three folds, the detection block of metrics.json summed by hand
    from the folds' detection.json, and the FROC plot."""
    r = run_cli("cv", ROOT / "configs" / "local.yaml", f"store={loader_store}", f"run_dir={tmp_path}",
                "train_size=64x32", "folds=3", "task=detect", "model=unet_small", "weights=none", "epochs=1",
                "batch_size=4", "num_workers=0", "checkpoint_every=0", timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "false positives per study" in r.stdout
    folds = [json.loads((tmp_path / f"fold{k}" / "detection.json").read_text()) for k in range(3)]
    det = json.loads((tmp_path / "report" / "metrics.json").read_text())["detection"]
    at = [f["at_threshold"] for f in folds]
    found, lesions = sum(a["found"] for a in at), sum(a["lesions"] for a in at)
    false, studies = sum(a["false"] for a in at), sum(a["studies"] for a in at)
    assert det["pooled"]["sensitivity"] == pytest.approx(found / lesions)
    assert det["pooled"]["fp_per_study"] == pytest.approx(false / studies)
    assert {k: f["threshold"] for k, f in det["folds"].items()} == {str(k): f["threshold"] for k, f in enumerate(folds)}
    first = det["froc"][0]
    assert first["studies"] == studies and first["found"] == sum(f["froc"][0]["found"] for f in folds)
    assert (tmp_path / "report" / "froc.png").stat().st_size > 1000
    assert "Detection report" in (tmp_path / "report" / "report.html").read_text()
