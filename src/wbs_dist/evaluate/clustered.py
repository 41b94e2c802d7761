"""Statistics that respect patients: lesions cluster within patients (issue 14, item 4).

The study's Wilson and DeLong intervals and its Pearson chi-square (metrics.py) treat every lesion as
an independent observation. Lesions of one patient share the patient's disease, anatomy and scan, so
they are correlated, and a patient with 20 lesions carries far less than 20 lesions' worth of
information. In a simulation with equal accuracy across burden groups and a patient random effect,
Pearson rejected 8-27 % of the time instead of 5 %, and the "extensive" group's Wilson interval
covered 70-89 % instead of 95 % (issue 14). This module adds, beside those:

* a patient-cluster percentile bootstrap: patients are resampled with replacement, each drawn
  patient brings all of its lesions, and every rate and the AUC is recomputed per replicate;
* a test across subgroups: the Rao-Scott adjusted chi-square (Rao & Scott 1992, "A simple method
  for the analysis of clustered binary data", Biometrics 48:577-585) with its p from a permutation
  of patients' subgroup labels; ``cluster_test`` says why this one.

Both treat the patient as the independent unit: a patient's lesions stay together.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from scipy.sparse import csr_matrix
from scipy.stats import chi2 as chi2_dist

from wbs_dist.evaluate.metrics import RATE_PARTS, RATES

DEFAULT_B = 2000
DEFAULT_SEED = 0
BOOT_KEYS = RATES + ("auc",)
# Confusion-count columns of the per-patient count matrix.
CELLS = ("tp", "fp", "tn", "fn")
# Replicates drawn and evaluated per block: bounds memory at about 30 MB for the study's size
# (a block's per-score-level weights are levels x block floats: 15,000 x 200 x 8 B = 24 MB), and
# fixes the random stream, so the draws do not depend on anything but (n_patients, B, seed).
BLOCK = 200
# The permutation test's random stream, apart from the bootstrap's (both start from --seed).
_PERMUTATION_STREAM = 1


def patient_counts(patient: Sequence, y_true: Sequence[int],
                   y_pred: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """(index, counts): each lesion's patient index (0 .. P-1, patients in sorted order) and the
    (P, 4) matrix of per-patient confusion counts in ``CELLS`` order."""
    _, index = np.unique(np.asarray(patient).astype(str), return_inverse=True)
    index = index.reshape(-1)
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(y_pred).astype(bool)
    cell = np.where(y, np.where(p, 0, 3), np.where(p, 1, 2))  # tp, fp, tn, fn
    n_patients = int(index.max()) + 1 if index.size else 0
    counts = np.bincount(index * 4 + cell, minlength=4 * n_patients).reshape(n_patients, 4)
    return index, counts


def _parts(counts: np.ndarray, rate: str) -> tuple[np.ndarray, np.ndarray]:
    """Numerator and denominator of ``rate`` along the last axis of a (..., 4) count array."""
    num, comp = RATE_PARTS[rate]
    k = sum(counts[..., CELLS.index(c)] for c in num)
    return k, k + sum(counts[..., CELLS.index(c)] for c in comp)


def patient_draws(n_patients: int, replicates: int, seed: int) -> Iterator[np.ndarray]:
    """The bootstrap's draws, ``BLOCK`` replicates at a time: (block, n_patients) arrays of patient
    indices drawn with replacement. Row b of the concatenation is replicate b."""
    rng = np.random.default_rng(seed)
    for start in range(0, replicates, BLOCK):
        yield rng.integers(0, n_patients, size=(min(BLOCK, replicates - start), n_patients))


def _merged_levels(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Each lesion's score level (0 = lowest), with neighbouring levels that hold one class only
    merged: within a run of malignant-only levels the benign weight below is constant, and a run of
    benign-only levels only adds to it, so the weighted Mann-Whitney sum is unchanged while the
    (levels x replicates) arrays shrink (6,774 levels -> 1,280 on bench/stats.py's data)."""
    if not s.size:
        return np.zeros(0, dtype=int)
    _, level = np.unique(s, return_inverse=True)
    level = level.reshape(-1)
    kind = np.zeros(int(level.max()) + 1, dtype=int)
    np.bitwise_or.at(kind, level, np.where(y, 1, 2))  # 1 malignant only, 2 benign only, 3 both
    new_run = np.r_[True, (kind[1:] != kind[:-1]) | (kind[1:] == 3)]
    return (np.cumsum(new_run) - 1)[level]


def bootstrap_replicates(patient: Sequence, y_true: Sequence[int], scores: Sequence[float],
                         y_pred: Sequence[bool], replicates: int = DEFAULT_B,
                         seed: int = DEFAULT_SEED) -> dict[str, np.ndarray]:
    """Every rate and the AUC in each patient-bootstrap replicate: ``{key: (replicates,) array}``,
    NaN where the replicate leaves the value undefined (a zero denominator, one class only).

    Vectorised: a replicate is a vector of patient multiplicities w (how often each patient was
    drawn). Its confusion counts are w @ (per-patient counts); its AUC is a weighted Mann-Whitney
    statistic over the score levels (scores sorted once): with P_l and N_l the drawn malignant and
    benign weights at level l, AUC = sum_l P_l (N_<l + N_l / 2) / (sum P)(sum N), and (P_l), (N_l)
    are w @ (patients x levels) sparse count matrices. Weights are integers, so every sum is exact
    and the result equals recomputing each replicate on its concatenated lesions (the tests check).
    """
    index, counts = patient_counts(patient, y_true, y_pred)
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=float)
    n_patients = counts.shape[0]
    out = {k: np.full(replicates, np.nan) for k in BOOT_KEYS}
    if not n_patients:
        return out
    level = _merged_levels(y, s)

    def by_level(mask):  # (levels, patients): lesions of each patient at each score level
        ones = np.ones(int(mask.sum()))
        return csr_matrix((ones, (level[mask], index[mask])), shape=(int(level.max()) + 1, n_patients))

    pos, neg = by_level(y), by_level(~y)
    done = 0
    for draws in patient_draws(n_patients, replicates, seed):
        block = draws.shape[0]
        rows = np.repeat(np.arange(block) * n_patients, n_patients)
        w = np.bincount(rows + draws.ravel(), minlength=block * n_patients)
        w = w.reshape(block, n_patients).astype(float)
        sl = slice(done, done + block)
        c = w @ counts
        with np.errstate(invalid="ignore", divide="ignore"):
            for rate in RATES:
                k, d = _parts(c, rate)
                out[rate][sl] = np.where(d > 0, k / np.where(d > 0, d, 1), np.nan)
            p_l = pos @ w.T  # (levels, block)
            n_l = neg @ w.T
            below = np.cumsum(n_l, axis=0) - n_l
            num = np.einsum("lb,lb->b", p_l, below + 0.5 * n_l)
            den = p_l.sum(axis=0) * n_l.sum(axis=0)
            out["auc"][sl] = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
        done += block
    return out


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[list[float] | None, int]:
    """([lo, hi], replicates used): the percentile interval over the replicates where the value is
    defined (NaN replicates are skipped); ``None`` when none is."""
    ok = values[~np.isnan(values)]
    if not ok.size:
        return None, 0
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(ok, [tail, 100 - tail])
    return [float(lo), float(hi)], int(ok.size)


def patient_bootstrap(patient: Sequence, y_true: Sequence[int], scores: Sequence[float],
                      y_pred: Sequence[bool], replicates: int = DEFAULT_B,
                      seed: int = DEFAULT_SEED) -> tuple[dict, dict[str, int], list[str]]:
    """95 % patient-cluster percentile bootstrap intervals of the five rates and the AUC.

    Returns ``(ci, used, notes)``: ``ci = {key: [lo, hi] or None}``; ``used = {key: replicates}``
    only for keys defined in fewer than all replicates (they are skipped for that key, not
    redrawn); notes say so, and say when an interval cannot be formed.
    """
    values = bootstrap_replicates(patient, y_true, scores, y_pred, replicates, seed)
    n_patients = np.unique(np.asarray(patient).astype(str)).size
    ci: dict[str, list[float] | None] = {}
    used: dict[str, int] = {}
    notes: list[str] = []
    for key in BOOT_KEYS:
        ci[key], n = percentile_interval(values[key])
        if ci[key] is None:
            continue
        if n < replicates:
            used[key] = n
            notes.append(f"{key} patient bootstrap over the {n} of {replicates} replicates where "
                         f"{key} is defined")
    if n_patients == 1:
        notes.append("patient bootstrap with a single patient: every replicate is that patient, "
                     "so the intervals have width 0 and say nothing")
    elif ci["auc"] is not None and ci["auc"][0] == ci["auc"][1]:
        value = ci["auc"][0]
        why = ": perfect separation, quote 'ci' (a score interval)" if value in (0.0, 1.0) else ""
        notes.append(f"AUC patient bootstrap interval has width 0 (every replicate gives {value:g}{why})")
    return ci, used, notes


def rao_scott_statistic(x: np.ndarray, m: np.ndarray, labels: np.ndarray,
                        k: int) -> tuple[np.ndarray, np.ndarray]:
    """The Rao-Scott adjusted chi-square for each row of ``labels``: ``(stat (R,), deff (R, k))``.

    ``x``, ``m``: each cluster's numerator and denominator (successes and trials of the rate);
    ``labels``: (R, clusters) subgroup index 0 .. k-1 of each cluster, one labelling per row.
    For subgroup i with n_i clusters (m_j > 0), M_i trials and p_i = X_i / M_i, the ratio estimator's
    variance is v_i = n_i / (n_i - 1) * sum_j (x_j - p_i m_j)^2 / M_i^2 and the design effect
    d_i = v_i / (p_i (1 - p_i) / M_i). X_i and M_i are divided by d_i, and Pearson's statistic is
    computed on that 2 x k table (Rao & Scott 1992). d_i is floored at 1: patients are never taken to
    carry more than their lesions do, so a group whose few patients happen to agree is not inflated.
    Where d_i cannot be estimated (one patient, or p_i = 0 or 1: no variance to measure), it is
    sum_j m_j^2 / M_i, its value when a patient's lesions are all alike: each patient one observation.
    A subgroup without trials (M_i = 0) is an empty column and drops out of the statistic.
    """
    reps, n = labels.shape
    rows = (labels + np.arange(reps)[:, None] * k).ravel()

    def total(v):
        w = np.broadcast_to(np.asarray(v, dtype=float), (reps, n)).ravel()
        return np.bincount(rows, weights=w, minlength=reps * k).reshape(reps, k)

    big_x, big_m, clusters, mm = total(x), total(m), total(m > 0), total(m * m)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = big_x / big_m
        ss = np.maximum(total(x * x) - 2 * p * total(x * m) + p * p * mm, 0.0)  # sum (x - p m)^2
        v = clusters / (clusters - 1) * ss / big_m ** 2
        deff = np.maximum(1.0, v / (p * (1 - p) / big_m))
        alike = mm / big_m
    unknown = (clusters == 1) | (p == 0) | (p == 1)
    deff = np.where(big_m == 0, 1.0, np.where(unknown, alike, deff))
    table = np.stack([big_x / deff, (big_m - big_x) / deff], axis=1)  # (R, 2, k)
    expected = (table.sum(axis=2, keepdims=True) * table.sum(axis=1, keepdims=True)
                / table.sum(axis=(1, 2), keepdims=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(expected > 0, (table - expected) ** 2 / expected, 0.0)
    return terms.sum(axis=(1, 2)), deff


def cluster_test(groups: Mapping[str, np.ndarray], permutations: int = DEFAULT_B,
                 seed: int = DEFAULT_SEED) -> tuple[dict, list[str]]:
    """A test of each rate across subgroups that keeps a patient's lesions together.

    ``groups``: subgroup -> (patients, 4) per-patient confusion counts of that subgroup's lesions
    (``patient_counts``); a patient with studies in two burden groups is a cluster in each. The
    statistic is the Rao-Scott adjusted chi-square (``rao_scott_statistic``); its p is the share of
    ``permutations`` random re-assignments of the clusters' subgroup labels (group sizes kept) whose
    statistic reaches the observed one, (1 + count) / (1 + permutations), or with ``permutations`` = 0
    the chi-square(k - 1) tail. Subgroups where the rate is undefined are left out, as in Pearson's.
    Returns ``({rate: {"method", "chi2", "df", "p", "p_chi2", "deff"}}, notes)``.

    Why this test (measured on burden-shaped null data: 60 patients a group with 1-3, 4-6 and 7-20
    lesions, equal accuracy, a patient random effect of sd 1.5 on the logit; 400 datasets, 200
    permutations each; share rejected at 5 %):

                          Pearson   Rao-Scott, chi2 p   label permutation, Pearson   this test
        60 / 60 / 60       26 %          6.3 %                  1.0 %                  4.0 %
        30 / 30 / 30       26 %          7.3 %                  2.3 %                  3.3 %
        120 / 60 / 20      36 %          9.0 %                  6.8 %                  3.3 %
        power (one group's accuracy lower: logit 0.9 instead of 1.5):
        60 / 60 / 60       76 %           39 %                   21 %                   35 %

    Burden groups are defined by a study's lesion count, so group and cluster size go together and
    the groups' design effects differ several-fold: patients are not exchangeable between groups even
    when the rates are equal. Permuting labels under Pearson's statistic then pools the groups'
    variances (too conservative here, anti-conservative when a small group has the large variance);
    Rao-Scott's chi-square reference is anti-conservative with few patients in a group. Permuting
    labels under the Rao-Scott statistic, which is studentised by each group's own design effect,
    held its size in every case: a studentised statistic's permutation distribution tends to the
    same chi-square(k - 1) law whether or not the groups are exchangeable (Chung & Romano 2013,
    "Exact and asymptotically robust permutation tests", Ann. Stat. 41:484-507), and the permutation
    makes the test exact where they are.
    """
    rng = np.random.default_rng([seed, _PERMUTATION_STREAM])
    method = "rao_scott_permutation" if permutations else "rao_scott"
    out: dict[str, dict] = {}
    notes: list[str] = []
    for rate in RATES:
        entry = out[rate] = {"method": method, "chi2": None, "df": None, "p": None, "p_chi2": None,
                             "deff": {}}
        xs, ms, used = [], [], []
        for name, c in groups.items():
            x, m = _parts(np.asarray(c).reshape(-1, 4), rate)
            if m.sum():
                xs.append(x[m > 0])
                ms.append(m[m > 0])
                used.append(name)
        labels = np.concatenate([np.full(x.size, i) for i, x in enumerate(xs)]) if xs else None
        if len(used) < 2:
            continue
        x, m = np.concatenate(xs), np.concatenate(ms)
        stat, deff = rao_scott_statistic(x, m, labels[None], len(used))
        entry["deff"] = dict(zip(used, deff[0].tolist()))
        for name, xi, mi in zip(used, xs, ms):
            if xi.size == 1 or xi.sum() in (0, mi.sum()):
                why = "1 patient" if xi.size == 1 else f"{rate} {int(xi.sum() > 0)} there: no variance"
                notes.append(f"{rate} cluster test: {name}: design effect not estimable ({why}), "
                             "taken as if each patient were one observation")
        if not 0 < x.sum() < m.sum():
            continue  # every subgroup on one side: undefined, as Pearson's (whose note says so)
        observed = float(stat[0])
        df = len(used) - 1
        entry.update(chi2=observed, df=df, p_chi2=float(chi2_dist.sf(observed, df)))
        if not permutations:
            entry["p"] = entry["p_chi2"]
            continue
        reached = 0
        for start in range(0, permutations, BLOCK):
            block = np.tile(labels, (min(BLOCK, permutations - start), 1))
            perm, _ = rao_scott_statistic(x, m, rng.permuted(block, axis=1), len(used))
            # A permutation equal to the observed labelling may differ in the last bits (sums in
            # another order); it must count as reaching the observed value.
            reached += int(np.sum(perm >= observed * (1 - 1e-9)))
        entry["p"] = (1 + reached) / (1 + permutations)
    return out, notes
