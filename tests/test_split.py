"""A run is pinned to its split: the split's fingerprint is stable, and `cv` and `score` refuse a run
directory whose folds were made on another split (exit 2, before anything is trained or scored).
The end-to-end path (train, re-split, resume refused) is in test_train.py."""

import json
import shutil

import numpy as np
import pytest
import zarr

from wbs_dist.config import Config, dump_config
from wbs_dist.data.folds import fingerprint_of, read_folds, split_fingerprint
from wbs_dist.data.store import Store
from wbs_dist.train.rundir import FoldDir

from helpers import ROOT, run_cli

CONFIG = ROOT / "configs" / "local.yaml"
OLD = "0123456789abcdef"          # a split this store never had


def finished_fold(run_dir, fold, split, store="data/store.zarr"):
    files = FoldDir(run_dir, fold)
    files.path.mkdir(parents=True, exist_ok=True)
    dump_config(Config(store=str(store), run_dir=str(run_dir), folds=3, model="resnet18", train_size="64x32",
                       split=split), files.config)
    (files.path / "predictions.csv").write_text("patient_id,study_uid,lesion_id,view,fold,label,score,tumor_type,"
                                                "lesion_count\n")
    files.write_done(1, 0.5, 0.7, 0, split)
    return files


def test_fingerprint_is_stable_recorded_and_changes_with_the_split(loader_store, tmp_path):
    store_path = tmp_path / "store.zarr"
    shutil.copytree(loader_store, store_path)          # the session's store is shared: re-split a copy
    store = Store.open(store_path)
    fp = split_fingerprint(store)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert split_fingerprint(store) == fp == read_folds(store)[2]["fingerprint"]
    patients, fold, attrs = read_folds(store)
    order = np.random.default_rng(0).permutation(len(patients))     # whatever order the arrays come in
    assert fingerprint_of(patients[order], fold[order], attrs["k"], attrs["seed"]) == fp
    # A store written before the fingerprint was recorded still has one: computed from the arrays.
    group = zarr.open_group(str(store_path / "folds"), mode="r+", zarr_format=3)
    del group.attrs["fingerprint"]
    assert split_fingerprint(Store.open(store_path)) == fp
    # The same patients, k and seed give the same split back; another seed another one.
    res = run_cli("folds", store_path, "--k", 3, "--seed", 0, "--force")
    assert res.returncode == 0, res.stderr
    assert fp in res.stdout and split_fingerprint(Store.open(store_path)) == fp
    res = run_cli("folds", store_path, "--k", 3, "--seed", 1, "--force")
    assert res.returncode == 0, res.stderr
    assert split_fingerprint(Store.open(store_path)) not in (fp, "")


def test_cv_refuses_a_finished_fold_of_another_split_before_training(loader_store, tmp_path):
    run_dir = tmp_path / "runs"
    finished_fold(run_dir, 0, OLD, loader_store)
    res = run_cli("cv", CONFIG, f"store={loader_store}", f"run_dir={run_dir}", "folds=3", "model=resnet18",
                  "train_size=64x32", "epochs=1", timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    now = split_fingerprint(Store.open(loader_store))
    assert "split changed" in res.stderr and OLD in res.stderr and now in res.stderr
    assert "new run_dir" in res.stderr
    assert not (run_dir / "fold1").exists() and not (run_dir / "predictions.csv").exists()   # nothing launched


def test_cv_refuses_a_config_pinned_to_another_split(loader_store, tmp_path):
    res = run_cli("cv", CONFIG, f"store={loader_store}", f"run_dir={tmp_path / 'runs'}", "folds=3",
                  f"split={OLD}", "epochs=1", timeout=120)
    assert res.returncode == 2 and "split changed" in res.stderr and OLD in res.stderr, res.stderr[-3000:]
    assert not (tmp_path / "runs" / "fold0").exists()


@pytest.mark.slow             # several CLI processes: out of the fast subset
def test_score_refuses_a_run_whose_folds_disagree_about_their_split(tmp_path):
    run_dir = tmp_path / "runs"
    finished_fold(run_dir, 0, OLD)
    finished_fold(run_dir, 1, "fedcba9876543210")
    res = run_cli("score", tmp_path, "--run", run_dir, "--out", tmp_path / "scores.csv", timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "split changed" in res.stderr and OLD in res.stderr and "fedcba9876543210" in res.stderr
    assert not (tmp_path / "scores.csv").exists()


def test_split_key_is_set_by_training_and_checked():
    from wbs_dist.config import load_config
    from wbs_dist.errors import ConfigError

    assert load_config(None).split == ""
    with pytest.raises(ConfigError, match="'split'"):
        load_config(None, ["split=not-a-fingerprint"])
    assert json.loads(json.dumps(Config(split=OLD).to_dict()))["split"] == OLD


@pytest.mark.slow             # several CLI processes: out of the fast subset
def test_train_refuses_a_config_pinned_to_another_split(loader_store, tmp_path):
    # What each tune trial's folds get: the sweep's pinned config, against a store re-split meanwhile.
    res = run_cli("train", CONFIG, "--fold", 0, f"store={loader_store}", f"run_dir={tmp_path / 'runs'}", "folds=3",
                  "model=resnet18", "train_size=64x32", f"split={OLD}", timeout=120)
    assert res.returncode == 2 and "split changed" in res.stderr and OLD in res.stderr, res.stderr[-3000:]
    assert not (tmp_path / "runs" / "fold0" / "last.pt").exists()


def test_tune_refuses_to_restore_a_sweep_of_another_split(loader_store, tmp_path):
    import yaml

    from wbs_dist.data.folds import SplitChanged
    from wbs_dist.launch.tune import _check_restorable, _sweep_record, load_tune, pin_split

    spec, base = load_tune(ROOT / "configs" / "tune.yaml", [f"train.store={loader_store}", "train.folds=3",
                                                           f"storage_path={tmp_path}", "name=sweep"])
    base = pin_split(base)
    assert base.split == split_fingerprint(Store.open(loader_store))
    exp = spec.experiment_dir
    exp.mkdir(parents=True)
    record = _sweep_record(spec, base)
    (exp / "sweep.yaml").write_text(yaml.safe_dump(record))
    _check_restorable(exp, spec, base)                               # the same split: restorable
    (exp / "sweep.yaml").write_text(yaml.safe_dump({**record, "train.split": OLD}))
    with pytest.raises(SplitChanged, match="split changed"):
        _check_restorable(exp, spec, base)
