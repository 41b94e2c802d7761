"""Folds: grouped by patient, stratified, stable for a seed, kept in the store, never silently replaced."""

import numpy as np
import pytest

from wbs_dist.data.folds import assign_folds
from wbs_dist.schema import TUMOR_TYPES
from wbs_dist.synth import plan_study

from helpers import run_cli


@pytest.fixture(scope="module")
def table():
    """The lesion table of a 400-patient synthetic archive, from the generator's plans (no pixels)."""
    cols = {"patient": [], "label": [], "tumor_type": []}
    for i in range(400):
        plan = plan_study(11, i)
        if not plan.annotated:
            continue
        for les in plan.lesions:
            cols["patient"].append(i + 1)
            cols["label"].append(int(les.label == "malignant"))
            cols["tumor_type"].append(TUMOR_TYPES.index(plan.tumor_type))
    return {k: np.asarray(v) for k, v in cols.items()}


def test_patients_never_span_folds_and_classes_stay_balanced(table):
    patients, fold, on = assign_folds(table["patient"], table["label"], table["tumor_type"], 5, seed=3)
    assert len(np.unique(patients)) == len(patients)          # one fold per patient, by construction
    assert set(fold) == set(range(5))
    lesion_fold = fold[np.searchsorted(patients, table["patient"])]
    # No patient's lesions are split: every lesion of a patient has the patient's fold.
    for p in np.unique(table["patient"]):
        assert len(set(lesion_fold[table["patient"] == p])) == 1
    malignant = np.zeros(len(patients))
    np.maximum.at(malignant, np.searchsorted(patients, table["patient"]), table["label"])
    overall = malignant.mean()
    sizes = np.bincount(fold)
    assert sizes.max() - sizes.min() <= 2
    for f in range(5):
        assert abs(malignant[fold == f].mean() - overall) < 0.04
        assert abs(table["label"][lesion_fold == f].mean() - table["label"].mean()) < 0.10
    assert "tumour type" in on
    tumor = np.zeros(len(patients), int)
    tumor[np.searchsorted(patients, table["patient"])] = table["tumor_type"]
    for t in np.unique(tumor):
        share = (tumor == t).mean()
        for f in range(5):
            assert abs((tumor[fold == f] == t).mean() - share) < 0.06


def test_stable_for_a_seed(table):
    a = assign_folds(table["patient"], table["label"], table["tumor_type"], 5, seed=1)
    b = assign_folds(table["patient"], table["label"], table["tumor_type"], 5, seed=1)
    c = assign_folds(table["patient"], table["label"], table["tumor_type"], 5, seed=2)
    assert np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_too_few_patients_is_a_usage_error():
    from wbs_dist.errors import UsageError

    with pytest.raises(UsageError, match="cannot fill 5 folds"):
        assign_folds(np.array([1, 2, 3]), np.array([0, 1, 0]), np.array([0, 0, 1]), 5, 0)


def test_cli_writes_folds_and_refuses_to_replace_them(loader_store, tmp_path):
    import shutil

    store = tmp_path / "s.zarr"
    shutil.copytree(loader_store, store)
    res = run_cli("folds", store, "--k", 3, "--seed", 5)
    assert res.returncode == 2 and "--force" in res.stderr      # the fixture's store has folds already
    res = run_cli("folds", store, "--k", 3, "--seed", 5, "--force")
    assert res.returncode == 0, res.stderr
    assert "3 folds (seed 5" in res.stdout
    import zarr
    g = zarr.open_group(str(store / "folds"), mode="r")
    assert g.attrs["k"] == 3 and g.attrs["seed"] == 5
    assert set(g["fold"][...]) == {0, 1, 2}
