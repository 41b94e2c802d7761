"""Patient-grouped, stratified k-fold split, kept in the store (results depend on it).

A patient's lesions all land in one fold, so no patient is both trained and validated on (the leak
nnU-Net users hand-write their splits to avoid). Folds are stratified on patient malignancy (any
malignant lesion) and, where every joint stratum has at least k patients, on tumour type as well,
with scikit-learn's StratifiedGroupKFold. The split is a function of the patients and the seed only.

Store layout: `folds/patient` (uint64 pseudonyms, sorted) and `folds/fold` (int8), attrs k, seed,
stratified_on, counts per fold, fingerprint.

A run is pinned to its split by the split's fingerprint (`split_fingerprint`): every fold records it,
and a fold made on another split is refused rather than resumed or aggregated, since `folds --force`
after new patients were ingested reshuffles patients between folds even with the same k and seed.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import zarr
from sklearn.model_selection import StratifiedGroupKFold

from wbs_dist.data.store import Store, StoreError, int_to_key
from wbs_dist.errors import ConfigError, UsageError
from wbs_dist.schema import TUMOR_TYPES


def assign_folds(patient: np.ndarray, label: np.ndarray, tumor_type: np.ndarray, k: int, seed: int
                 ) -> tuple[np.ndarray, np.ndarray, str]:
    """Per-lesion arrays → (patients sorted, their fold, what was stratified on)."""
    patients, inverse = np.unique(patient, return_inverse=True)
    if len(patients) < k:
        raise UsageError(f"{len(patients)} annotated patients cannot fill {k} folds")
    malignant = np.zeros(len(patients), np.int64)
    np.maximum.at(malignant, inverse, label.astype(np.int64))
    tumor = np.zeros(len(patients), np.int64)
    tumor[inverse] = tumor_type
    joint = malignant * len(TUMOR_TYPES) + tumor
    _, joint_counts = np.unique(joint, return_counts=True)
    if joint_counts.min() >= k:
        strata, on = joint, "patient malignancy x tumour type"
    else:
        strata, on = malignant, "patient malignancy"
    # One row per patient: the group is the patient itself, so the split is exactly a patient split;
    # StratifiedGroupKFold (not StratifiedKFold) keeps that explicit if rows ever become lesions.
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold = np.full(len(patients), -1, np.int8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # "least populated class" is handled above
        for f, (_, val) in enumerate(splitter.split(np.zeros(len(patients)), strata, groups=np.arange(len(patients)))):
            fold[val] = f
    return patients, fold, on


def write_folds(store: Store, k: int, seed: int, force: bool = False) -> dict:
    with store.lock(f"wbs-dist folds --k {k} --seed {seed}"):
        return _write_folds(store, k, seed, force)


def _write_folds(store: Store, k: int, seed: int, force: bool) -> dict:
    if has_folds(store) and not force:
        have = store.root["folds"].attrs
        raise UsageError(f"store {store.path} already has {have['k']} folds (seed {have['seed']}); results depend "
                         f"on them, so they are not replaced: pass --force to make new ones")
    table = store.lesion_table()
    if len(table["patient"]) == 0:
        raise StoreError(f"store {store.path} has no annotated lesions to split")
    patients, fold, on = assign_folds(table["patient"], table["label"], table["tumor_type"], k, seed)
    counts = fold_summary(table, patients, fold, k)
    fingerprint = fingerprint_of(patients, fold, k, seed)
    g = store.staged_group("folds")
    g.attrs.update({"k": k, "seed": seed, "stratified_on": on, "method": "sklearn StratifiedGroupKFold, groups = patients",
                    "counts": counts, "fingerprint": fingerprint})
    g.create_array("patient", data=patients.astype(np.uint64), chunks=(max(len(patients), 1),))
    g.create_array("fold", data=fold, chunks=(max(len(fold), 1),))
    store.swap_in("folds")
    return {"k": k, "seed": seed, "stratified_on": on, "counts": counts, "fingerprint": fingerprint}


def fingerprint_of(patients: np.ndarray, fold: np.ndarray, k: int, seed: int) -> str:
    """16 hex digits of SHA-256 over k, seed and every (patient, fold) in patient order: the same on
    any machine and whatever order the arrays come in (fixed byte order and widths)."""
    patients, fold = np.asarray(patients), np.asarray(fold)
    order = np.argsort(patients, kind="stable")
    digest = hashlib.sha256(f"wbs-dist split v1\nk={int(k)}\nseed={int(seed)}\n".encode())
    digest.update(patients[order].astype("<u8").tobytes())
    digest.update(fold[order].astype("i1").tobytes())
    return digest.hexdigest()[:16]


def split_fingerprint(store: Store) -> str:
    """The fingerprint of the store's split, computed from its arrays (so stores written before it was
    recorded in the attrs have one too, and a hand-edited attr cannot lie)."""
    patients, fold, attrs = read_folds(store)
    return fingerprint_of(patients, fold, attrs["k"], attrs["seed"])


def check_split(what: str, was: str, store: Store, now: str, was_k_seed: tuple | None = None) -> None:
    """Refuse `what`, recorded on split `was` ('' = not recorded: nothing to check), unless it is `now`."""
    if was and was != now:
        raise split_changed(what, was, store, now, was_k_seed)


class SplitChanged(UsageError):
    """A run (or a fold of it) was made on another split than the store's (exit 2)."""


def split_changed(what: str, was: str, store: Store, now: str, was_k_seed: tuple[int, int] | None = None
                  ) -> SplitChanged:
    """The refusal: which split it was, which it is now, and the two ways out."""
    attrs = read_folds(store)[2]
    back = (f"`wbs-dist folds {store.path} --k {was_k_seed[0]} --seed {was_k_seed[1]} --force` gives it back "
            "only if the store holds the same patients" if was_k_seed and None not in was_k_seed else
            "re-splitting gives it back only with the same patients, k and seed")
    return SplitChanged(
        f"the split changed: {what} was made on split {was}, the store {store.path} now holds split {now} "
        f"(k {attrs['k']}, seed {attrs['seed']}). Its validation fold would hold patients it trained on, so it is "
        f"neither resumed nor aggregated: train the new split in a new run_dir, or use the old split again "
        f"({back})")


def fold_summary(table: dict, patients: np.ndarray, fold: np.ndarray, k: int) -> list[dict]:
    lesion_fold = fold[np.searchsorted(patients, table["patient"])]
    out = []
    for f in range(k):
        sel = lesion_fold == f
        pats = np.unique(table["patient"][sel])
        mal_pat = np.unique(table["patient"][sel & (table["label"] == 1)])
        out.append({"fold": f, "patients": int(len(pats)), "malignant_patients": int(len(mal_pat)),
                    "lesions": int(sel.sum()), "malignant_lesions": int(table["label"][sel].sum()),
                    "tumor_types": {t: int(len(np.unique(table["patient"][sel & (table["tumor_type"] == i)])))
                                    for i, t in enumerate(TUMOR_TYPES)}})
    return out


def read_folds(store: Store) -> tuple[np.ndarray, np.ndarray, dict]:
    """(patients sorted, fold per patient, attrs). Raises StoreError when the store has none."""
    if not has_folds(store):
        raise StoreError(f"store {store.path} has no folds: run `wbs-dist folds {store.path}`")
    g = zarr.open_group(str(store.path / "folds"), mode="r", zarr_format=3)
    return g["patient"][...], g["fold"][...], dict(g.attrs)


def lesion_folds(store: Store, table: dict) -> np.ndarray:
    """The fold of every row of the lesion table; a patient ingested after the split is an error."""
    patients, fold, attrs = read_folds(store)
    pos = np.searchsorted(patients, table["patient"])
    pos = np.minimum(pos, len(patients) - 1)
    missing = patients[pos] != table["patient"]
    if missing.any():
        n = len(np.unique(table["patient"][missing]))
        raise StoreError(f"{n} patient(s) in the store have no fold (ingested after the split, e.g. "
                         f"{int_to_key(table['patient'][missing][0])}): rerun `wbs-dist folds --force` (this changes "
                         f"the split)")
    return fold[pos]


def has_folds(store: Store) -> bool:
    return (store.path / "folds" / "zarr.json").exists()


def check_folds(store: Store, k: int, seed: int) -> None:
    """The store's split must be the one a config asks for (config keys folds, fold_seed)."""
    attrs = read_folds(store)[2]
    if (attrs["k"], attrs["seed"]) != (k, seed):
        raise ConfigError(f"config keys 'folds'/'fold_seed' ({k}, {seed}) differ from the store's split "
                          f"({attrs['k']}, {attrs['seed']}); results depend on the split: match the config or run "
                          f"`wbs-dist folds {store.path} --k {k} --seed {seed} --force`")


def ensure_folds(store: Store, k: int, seed: int) -> None:
    """Make the split when the store has none (one process: drivers, before any fold starts; folds
    running at once must not race for it), then check it against the config."""
    if not has_folds(store):
        with store.lock(f"wbs-dist (making the split: --k {k} --seed {seed})"):
            if not has_folds(store):            # another driver may have made it meanwhile
                _write_folds(store, k, seed, force=False)
    check_folds(store, k, seed)
