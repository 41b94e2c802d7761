"""Tuning that does not grade itself: nested cross-validation (`wbs-dist tune ... nested=true`), the
inner folds that never see the outer fold, and the provenance note of the plain path.

Tiny: the 30-patient store at 64 x 32 with 3 folds, resnet18, 2 trials of 1 epoch per outer fold.
"""

import csv
import json
import os
import subprocess
import uuid

import numpy as np
import pytest

from wbs_dist.config import load_config

from helpers import ROOT, WBS

RAY_TMP = f"/tmp/rn-{uuid.uuid4().hex[:8]}"      # short: Ray's socket paths live under it


def local_config(store, run_dir, **extra):
    keys = {"store": store, "run_dir": run_dir, "train_size": "64x32", "folds": 3, "model": "resnet18",
            "epochs": 1, "num_workers": 0, "checkpoint_every": 0, **extra}
    return load_config(ROOT / "configs" / "local.yaml", [f"{k}={v}" for k, v in keys.items()])


def test_inner_folds_never_train_or_validate_on_the_outer_fold(loader_store):
    from wbs_dist.data.store import Store
    from wbs_dist.errors import ConfigError
    from wbs_dist.train.dataset import fold_indices

    store = Store.open(loader_store)
    cfg = local_config(loader_store, "unused", outer_fold=2)
    train, val = fold_indices(store, cfg, 0)
    assert set(train.fold.tolist()) == {1} and set(val.fold.tolist()) == {0}
    assert not set(train.patient.tolist()) & set(val.patient.tolist())
    plain_train, _ = fold_indices(store, local_config(loader_store, "unused"), 0)
    assert set(plain_train.fold.tolist()) == {1, 2}
    for bad in (0, 3):                                 # the validation fold itself; out of range
        with pytest.raises(ConfigError, match="outer_fold"):
            fold_indices(store, local_config(loader_store, "unused", outer_fold=bad), 0)


@pytest.mark.slow
def test_nested_tune_grades_each_outer_fold_with_a_choice_made_without_it(loader_store, tmp_path):
    from wbs_dist.data.folds import read_folds
    from wbs_dist.data.store import Store, key_to_int

    args = {"base": ROOT / "configs" / "local.yaml", "num_samples": 2, "max_epochs": 1, "grace_period": 1,
            "cpus_per_trial": 1, "gpus_per_trial": 0, "cpus": 2, "seed": 0, "ray_temp_dir": RAY_TMP,
            "storage_path": tmp_path, "name": "nest", "nested": "true", "train.store": loader_store,
            "train.train_size": "64x32", "train.folds": 3, "train.model": "resnet18", "train.num_workers": 0,
            "train.epochs": 2, "train.deterministic": "true"}
    r = subprocess.run(WBS + ["tune", str(ROOT / "configs" / "tune.yaml")] + [f"{k}={v}" for k, v in args.items()],
                       capture_output=True, text=True, start_new_session=True, timeout=1200,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exp = tmp_path / "nest"
    choices = json.loads((exp / "nested.json").read_text())
    assert [c["outer_fold"] for c in choices] == [0, 1, 2]
    patients, folds, _ = read_folds(Store.open(loader_store))
    fold_of = dict(zip(patients.tolist(), folds.tolist()))
    for c in choices:
        o = c["outer_fold"]
        with open(exp / f"outer{o}" / "results.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 2 and all(row[f"fold{o}_val_auc"] == "" for row in rows)
        best = max(rows, key=lambda row: float(row["mean_val_auc"]))
        assert (c["trial"], c["batch_size"]) == (best["trial"], int(best["batch_size"]))
        assert c["lr"] == pytest.approx(float(best["lr"]))
        for row in rows:
            # The outer fold is no fold of its search: neither trained (outer_fold in every fold's
            # config) nor validated on (no fold<o> folder, no prediction of its patients).
            run = exp / f"outer{o}" / row["trial"] / "run"
            assert sorted(p.name for p in run.glob("fold*")) == [f"fold{k}" for k in range(3) if k != o]
            for fold_dir in run.glob("fold*"):
                assert load_config(fold_dir / "config.yaml").outer_fold == o
                with open(fold_dir / "predictions.csv") as fh:
                    seen = {fold_of[key_to_int(p["patient_id"])] for p in csv.DictReader(fh)}
                assert o not in seen
        # The choice, retrained on every other fold at the base config's epochs, graded on fold o.
        cfg = load_config(exp / "nested" / f"fold{o}" / "config.yaml")
        assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.outer_fold) == (pytest.approx(c["lr"]), c["batch_size"], 2, -1)
    with open(exp / "nested" / "predictions.csv") as fh:
        pred = list(csv.DictReader(fh))
    assert {(int(p["fold"]), fold_of[key_to_int(p["patient_id"])]) for p in pred} == {(k, k) for k in range(3)}
    metrics = json.loads((exp / "nested" / "report" / "metrics.json").read_text())
    prov = metrics["provenance"]
    assert prov["selected_on_these_folds"] is False and "nested" in prov["text"]
    assert [(c["outer_fold"], c["batch_size"]) for c in prov["outer_folds"]] == \
        [(c["outer_fold"], c["batch_size"]) for c in choices]
    assert "Provenance" in (exp / "nested" / "report" / "report.html").read_text()
    assert metrics["lesion"]["pooled"]["n"] == len(pred)
    assert "outer fold 2: lr" in r.stdout and "nested" in r.stdout


@pytest.mark.slow             # several CLI processes: out of the fast subset
def test_a_config_chosen_on_these_folds_says_so_in_its_report(loader_store, tmp_path):
    """The plain path (tune, then `cv best.yaml`) stays, and its metrics.json and report say that its
    figures were graded on the folds that chose lr and batch size."""
    from wbs_dist.launch.cv import cross_validate

    note = "lr 0.001 and batch_size 8 were selected by the sweep /x on these same 3 folds"
    r = cross_validate(local_config(loader_store, tmp_path / "run", selected_on=note), launcher="local")
    metrics = json.loads((r.report_dir / "metrics.json").read_text())
    assert metrics["provenance"] == {"text": note, "selected_on_these_folds": True}
    assert note in (r.report_dir / "report.html").read_text()
    assert np.isfinite(metrics["lesion"]["pooled"]["auc"])
