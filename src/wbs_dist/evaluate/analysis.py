"""One run's statistics: the threshold per fold, then every metrics.json block (DESIGN 3.3).

A lesion is predicted malignant when its score is >= the threshold: 0.5, a given number, or per
validation fold the Youden threshold of the other folds (the training folds), so no threshold is ever
tuned on the data it is reported on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wbs_dist.errors import InputError, UsageError
from wbs_dist.evaluate.clustered import (DEFAULT_B, DEFAULT_SEED, cluster_test, patient_bootstrap,
                                         patient_counts)
from wbs_dist.evaluate.metrics import RATES, chi_square, fold_mean_std, summarize, youden_threshold
from wbs_dist.evaluate.predictions import Predictions
from wbs_dist.schema import BURDEN_GROUPS, BURDEN_TEXT, STUDY_TUMOR_TYPES, TUMOR_TYPES

YOUDEN = "youden"

METHODS = {
    "prediction": "malignant when score >= threshold",
    "ci": "95 %: Wilson score interval for rates, DeLong (fast, midranks) for the AUC",
    "chi2": "Pearson, no continuity correction, 2 x k table of each rate's numerator and complement "
            "across subgroups; subgroups where the rate is undefined are left out",
    "fold_summary": "mean and sample std (ddof=1) over folds of each key, counts included",
    "patient": "score = highest lesion score, label = malignant if any lesion is, "
               "predicted malignant if any lesion is",
    "burden": BURDEN_TEXT,
    "independence": "'ci' (Wilson, DeLong) and chi2's chi2/p/df (Pearson) assume independent lesions, "
                    "as the study did; they stay for its reproduction. Lesions cluster within patients, "
                    "so those intervals are too narrow and those tests reject too often. "
                    "'ci_patient_bootstrap' and chi2[rate]['cluster'] take the patient as the unit",
    "ci_auc_degenerate": "where DeLong's variance is 0 (perfect separation) 'ci' of the AUC is "
                         "Newcombe's (2006) score interval instead, with a note",
    "chi2_expected": "a note where a Pearson table has expected counts below 5 (as SPSS warns)",
}


def _methods(bootstrap: int, seed: int) -> dict[str, str]:
    if bootstrap:
        boot = (f"95 % percentile interval over B = {bootstrap} patient-cluster bootstrap replicates "
                f"(seed {seed}): patients drawn with replacement, each with all its lesions, a patient "
                "drawn twice counted twice; in lesion.pooled and every subgroup. A replicate where a "
                "value is undefined is skipped for it ('ci_patient_bootstrap_replicates' says how many "
                "were used where fewer than B)")
        p = f"p from {bootstrap} permutations of the clusters' subgroup labels (seed {seed})"
    else:
        boot = "off (--bootstrap 0)"
        p = "p from chi-square(k - 1) (--bootstrap 0: no permutations)"
    return {**METHODS, "ci_patient_bootstrap": boot,
            "chi2_cluster": "chi2[rate]['cluster']: Rao-Scott (1992) adjusted chi-square with patients "
                            "as clusters (each subgroup's numerator and denominator divided by its "
                            f"design effect 'deff'); {p}; 'p_chi2' is its chi-square(k - 1) p. The "
                            "permutation keeps it honest where groups differ in lesions per patient "
                            "(burden) or have few patients (clustered.cluster_test has the measurements)"}


def parse_threshold(text: str) -> float | str:
    """``--threshold``: a number in [0, 1] or ``"youden"``."""
    if text.strip().lower() == YOUDEN:
        return YOUDEN
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"--threshold: expected a number in [0, 1] or 'youden', got {text!r}")
    return value


def fold_thresholds(pred: Predictions, threshold: float | str) -> dict[int, float]:
    """The threshold applied to each validation fold ({} without folds, where one fixed value applies).

    For Youden, fold k's threshold is chosen on the rows of every other fold only.
    """
    if threshold != YOUDEN:
        return {k: float(threshold) for k in pred.folds}
    if len(pred.folds) < 2:
        raise InputError(
            f"{pred.path}, column 'fold': --threshold youden picks each fold's threshold on the other "
            f"(training) folds, but this file has {'one fold' if pred.folds else 'no folds'}; "
            "use a fixed threshold such as 0.5")
    out = {}
    for k in pred.folds:
        train = pred.fold != k
        try:
            out[k] = youden_threshold(pred.label[train], pred.score[train])
        except ValueError:
            raise InputError(f"{pred.path}, column 'label': --threshold youden: the folds other "
                             f"than {k} do not have both malignant and benign lesions") from None
    return out


@dataclass
class Run:
    """One CSV's predictions and its metrics (a metrics.json body)."""

    name: str
    pred: Predictions
    metrics: dict


def analyse(name: str, pred: Predictions, threshold: float | str, bootstrap: int = DEFAULT_B,
            seed: int = DEFAULT_SEED) -> Run:
    """All metrics of one run: DESIGN 3.3 plus "thresholds", "notes", "methods", "input" and
    "bootstrap"; lesion.pooled and each subgroup's M carry "ci_patient_bootstrap" (unless
    ``bootstrap`` = 0) and each chi-square rate a patient-level "cluster" test."""
    notes: list[str] = []

    def block(where: str, y, s, p, patients=None) -> dict:
        m, why = summarize(y, s, p)
        notes.extend(f"{where}: {n}" for n in why)
        if patients is not None and bootstrap:
            ci, used, why = patient_bootstrap(patients, y, s, p, bootstrap, seed)
            m["ci_patient_bootstrap"] = ci
            if used:
                m["ci_patient_bootstrap_replicates"] = used
            notes.extend(f"{where}: {n}" for n in why)
        return m

    if pred.n_unlabelled:
        notes.append(f"{pred.n_unlabelled} rows with an empty label (unknown) left out of every metric")
    per_fold = fold_thresholds(pred, threshold)
    cut = (np.array([per_fold[f] for f in pred.fold]) if per_fold
           else np.full(pred.score.size, float(threshold)))
    y_pred = pred.score >= cut
    y, s = pred.label, pred.score

    folds = {}
    for k in pred.folds:
        sel = pred.fold == k
        folds[str(k)] = block(f"lesion.folds.{k}", y[sel], s[sel], y_pred[sel])
    mean, std, why = fold_mean_std(list(folds.values()))
    if folds:
        notes.extend(f"lesion.mean/std: {n}" for n in why)
    else:
        notes.append("lesion.mean/std: no folds in the input (fold column empty), so only pooled")
    lesion = {"folds": folds, "mean": mean, "std": std, "pooled": block("lesion.pooled", y, s, y_pred, pred.patient_id)}

    patients, index = np.unique(pred.patient_id.astype(str), return_inverse=True)
    p_label = np.zeros(patients.size, dtype=int)
    p_score = np.zeros(patients.size)
    p_pred = np.zeros(patients.size, dtype=bool)
    np.maximum.at(p_label, index, y)
    np.maximum.at(p_score, index, s)
    # Any lesion over its fold's threshold; a patient lives in one fold, so this is the same as
    # its highest score against that threshold.
    np.logical_or.at(p_pred, index, y_pred)
    patient = {"pooled": block("patient.pooled", p_label, p_score, p_pred)}

    subgroups = {}
    # The study's subgroups always appear (null where empty); "other" tumours only when present,
    # and never in the chi-square.
    for dim, names, study, values in (
        ("burden", BURDEN_GROUPS, BURDEN_GROUPS, pred.burden),
        ("tumor_type", TUMOR_TYPES, STUDY_TUMOR_TYPES, pred.tumor_type),
    ):
        groups = {}
        for g in names:
            sel = values == g
            if g in study or sel.any():
                groups[g] = block(f"subgroups.{dim}.{g}", y[sel], s[sel], y_pred[sel],
                                  pred.patient_id[sel])
        c, why = chi_square({g: groups[g] for g in study})
        notes.extend(f"subgroups.{dim}.chi2: {n}" for n in why)
        clusters = {g: patient_counts(pred.patient_id[values == g], y[values == g],
                                      y_pred[values == g])[1] for g in study}
        cluster, why = cluster_test(clusters, bootstrap, seed)
        notes.extend(f"subgroups.{dim}.chi2: {n}" for n in why)
        for rate in RATES:
            c[rate]["cluster"] = cluster[rate]
        notes.extend(f"subgroups.{dim}.chi2: {n}" for n in _split_patients(pred, values, study, dim))
        subgroups[dim] = {**groups, "chi2": c}
    unknown_tumor = int(np.sum(pred.tumor_type == ""))
    if unknown_tumor:
        notes.append(f"subgroups.tumor_type: {unknown_tumor} labelled lesions with an empty "
                     "tumor_type are in no tumour subgroup")

    metrics = {
        "threshold": threshold,
        "thresholds": {str(k): t for k, t in per_fold.items()},
        "lesion": lesion,
        "patient": patient,
        "subgroups": subgroups,
        "notes": notes,
        "methods": _methods(bootstrap, seed),
        "input": str(pred.path),
        "bootstrap": {"replicates": bootstrap, "seed": seed},
    }
    return Run(name=name, pred=pred, metrics=metrics)


def _split_patients(pred: Predictions, values: np.ndarray, study: Sequence[str], dim: str) -> list[str]:
    """A note when patients have lesions in several subgroups (studies in two burden groups)."""
    inside = np.isin(values, list(study))
    if not inside.any():
        return []
    pairs = np.unique(np.stack([pred.patient_id[inside].astype(str), values[inside].astype(str)]), axis=1)
    _, per_patient = np.unique(pairs[0], return_counts=True)
    split = int(np.sum(per_patient > 1))
    if not split:
        return []
    return [f"{split} patients have lesions in more than one {dim} subgroup (studies in different "
            "groups); the cluster test takes each patient's lesions within a subgroup as one cluster"]


def run_names(paths: Sequence[Path]) -> list[str]:
    """Run names: CSV stems, else parent folder names when stems collide, else parent/stem."""
    for naming in (lambda p: p.stem, lambda p: p.parent.name, lambda p: f"{p.parent.name}/{p.stem}"):
        names = [naming(Path(p)) for p in paths]
        if len(set(names)) == len(names) and all(names):
            return names
    return [f"{Path(p).stem}#{i + 1}" for i, p in enumerate(paths)]
