"""Folds: grouped by patient, stratified, stable for a seed, kept in the store, never silently replaced."""

from collections import Counter, defaultdict

import numpy as np
import pytest

from wbs_dist.data.folds import assign_folds
from wbs_dist.schema import TUMOR_TYPES
from wbs_dist.synth import plan_study

from helpers import run_cli

FOLLOWUP_SEED = 4


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


def test_folds_are_balanced_in_patients_malignancy_and_tumour_types(table):
    # Leakage is tested through the real path below (test_no_patient_is_trained_and_validated_on...);
    # this one is about balance only.
    patients, fold, on = assign_folds(table["patient"], table["label"], table["tumor_type"], 5, seed=3)
    assert set(fold) == set(range(5))
    lesion_fold = fold[np.searchsorted(patients, table["patient"])]
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


@pytest.mark.slow             # CLI processes (4-5 s): out of the fast subset (CI runs it)
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


# --- leakage, through the path training takes ------------------------------------------------------


@pytest.fixture(scope="module")
def followup_store(tmp_path_factory):
    """A store whose archive has patients with two and three studies (synth follow-ups), 3 folds:
    (store, the synth summary)."""
    from wbs_dist.data.folds import write_folds
    from wbs_dist.data.ingest import ingest
    from wbs_dist.data.store import Store
    from wbs_dist.synth import write_archive

    base = tmp_path_factory.mktemp("followups")
    summary = write_archive(base / "archive", 15, seed=FOLLOWUP_SEED, form="dir", progress=False, followups=0.6)
    assert not ingest(base / "archive", store=base / "store.zarr", workers=2, train_size=(64, 32)).errors
    store = Store.open(base / "store.zarr")
    write_folds(store, k=3, seed=0)
    return store, summary


def test_no_patient_is_trained_and_validated_on_through_the_trainers_indices(followup_store):
    """Store lesion table -> folds -> the (training, validation) indices the trainer takes
    (dataset.fold_indices), for every fold. Patients are known from the generator's plans, not from
    the store, so a pseudonym that split one patient in two (per study, say) is caught too."""
    from wbs_dist.data.deid import keyed_hash, load_or_create_secret
    from wbs_dist.data.store import key_to_int
    from wbs_dist.config import Config, Size
    from wbs_dist.train.dataset import fold_indices

    store, summary = followup_store
    secret = load_or_create_secret()            # the session's throwaway secret (conftest)
    truth = {}                                  # study key -> the generator's Patient ID
    for i in range(summary["studies"]):
        plan = plan_study(FOLLOWUP_SEED, i, summary["followups"].get(i))
        truth[keyed_hash(secret, "study", plan.study_uid)] = plan.patient.patient_id
    table = store.lesion_table()
    all_pairs = {(int(s), int(le)) for s, le in zip(table["study"], table["lesion_id"])}
    studies_of = defaultdict(set)
    for s in table["study"]:
        studies_of[truth[f"{int(s):016x}"]].add(int(s))
    # The point of the fixture: annotated patients with several studies in the lesion table.
    assert sum(len(v) >= 2 for v in studies_of.values()) >= 2, dict(studies_of)

    k = 3
    validated = Counter()
    fold_of_study = {}
    for f in range(k):
        train, val = fold_indices(store, Config(folds=k, train_size=Size(64, 32)), f)

        def pairs(ix):
            return {(key_to_int(ix.study_keys[s]), int(le)) for s, le in zip(ix.study, ix.lesion_id)}

        def patients(ix):
            return {truth[ix.study_keys[s]] for s in ix.study}

        assert not pairs(train) & pairs(val)
        leaked = patients(train) & patients(val)
        assert not leaked, f"fold {f}: patients both trained and validated on: {sorted(leaked)}"
        assert pairs(train) | pairs(val) == all_pairs          # every lesion is used, once per fold
        assert set(val.fold.tolist()) == {f} and set(train.fold.tolist()) == set(range(k)) - {f}
        validated.update(pairs(val))
        for s in val.study_keys:
            fold_of_study[key_to_int(s)] = f
        # The store's pseudonym groups lesions as the true patients do (one pseudonym per patient).
        for ix in (train, val):
            by_truth = defaultdict(set)
            for s, p in zip(ix.study, ix.patient):
                by_truth[truth[ix.study_keys[s]]].add(int(p))
            assert all(len(ps) == 1 for ps in by_truth.values())
            assert len({next(iter(ps)) for ps in by_truth.values()}) == len(by_truth)
    assert set(validated) == all_pairs and set(validated.values()) == {1}   # each lesion validated once
    for patient, studies in studies_of.items():
        assert len({fold_of_study[s] for s in studies}) == 1, f"patient {patient}: studies in several folds"
