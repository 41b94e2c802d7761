"""The study's diagnostic-accuracy statistics (DESIGN 1 and 3.3).

Confusion counts and the five rates, ROC AUC, 95 % confidence intervals (Wilson score for rates,
DeLong for the AUC; Newcombe's score interval where DeLong's variance is 0), Pearson chi-square
across subgroups (with SPSS's warning on expected counts below 5), fold mean and standard
deviation, and the Youden threshold. All of them treat lesions as independent; clustered.py has
the patient-level counterparts.

A quantity that is undefined (a rate with a zero denominator, an AUC without both classes, a
chi-square with fewer than two usable subgroups) is ``None`` together with a note saying why, never
NaN: metrics.json must stay strict JSON and a reader must see why a value is missing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist

import numpy as np
from scipy.optimize import brentq
from scipy.stats import chi2_contingency, rankdata
from sklearn.metrics import roc_auc_score

Z95 = NormalDist().inv_cdf(0.975)

COUNTS = ("n", "tp", "fp", "tn", "fn")
RATES = ("sensitivity", "specificity", "accuracy", "ppv", "npv")
METRIC_KEYS = COUNTS + RATES + ("auc",)

# Each rate is numerator / (numerator + complement); the same two rows form its 2 x k chi-square table.
RATE_PARTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "sensitivity": (("tp",), ("fn",)),
    "specificity": (("tn",), ("fp",)),
    "accuracy": (("tp", "tn"), ("fp", "fn")),
    "ppv": (("tp",), ("fp",)),
    "npv": (("tn",), ("fn",)),
}

_EMPTY_DENOMINATOR = {
    "sensitivity": "no malignant cases",
    "specificity": "no benign cases",
    "accuracy": "no cases",
    "ppv": "no positive predictions",
    "npv": "no negative predictions",
}


def confusion_counts(y_true: Sequence[int], y_pred: Sequence[bool]) -> dict[str, int]:
    """``{"n", "tp", "fp", "tn", "fn"}`` for binary truth (1 = malignant) and predictions."""
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(y_pred).astype(bool)
    return {
        "n": int(y.size),
        "tp": int(np.sum(y & p)),
        "fp": int(np.sum(~y & p)),
        "tn": int(np.sum(~y & ~p)),
        "fn": int(np.sum(y & ~p)),
    }


def rate_parts(counts: Mapping[str, int], rate: str) -> tuple[int, int]:
    """(numerator, denominator) of ``rate`` from confusion counts."""
    num, comp = RATE_PARTS[rate]
    k = sum(counts[c] for c in num)
    return k, k + sum(counts[c] for c in comp)


def rates(counts: Mapping[str, int]) -> dict[str, float | None]:
    """The five rates as fractions; ``None`` where the denominator is zero."""
    out: dict[str, float | None] = {}
    for rate in RATES:
        k, d = rate_parts(counts, rate)
        out[rate] = k / d if d else None
    return out


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for k successes in n trials (95 % by default); ``None`` when n == 0."""
    if n == 0:
        return None
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # The bounds are exactly 0 at k = 0 and 1 at k = n; the formula leaves rounding noise there.
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)


def delong(y_true: Sequence[int], scores: Sequence[float]) -> tuple[float, float | None]:
    """ROC AUC and its DeLong variance, by midranks (Sun & Xu 2014, "fast DeLong").

    The variance needs at least two malignant and two benign cases (it is a sum of sample
    variances); with fewer it is ``None``. Raises ``ValueError`` without both classes.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=float)
    x, v = s[y], s[~y]
    m, n = x.size, v.size
    if m == 0 or n == 0:
        raise ValueError("AUC needs malignant and benign cases")
    tz = rankdata(np.concatenate([x, v]))
    # Structural components: for each malignant case the fraction of benign cases it outranks,
    # for each benign case the fraction of malignant cases that outrank it (ties count 1/2).
    v10 = (tz[:m] - rankdata(x)) / n
    v01 = 1.0 - (tz[m:] - rankdata(v)) / m
    auc = float(v10.mean())
    if m < 2 or n < 2:
        return auc, None
    return auc, float(v10.var(ddof=1) / m + v01.var(ddof=1) / n)


def auc_interval(auc: float, variance: float, z: float = Z95) -> tuple[float, float]:
    """Normal-approximation interval around the AUC, clipped to [0, 1]."""
    half = z * math.sqrt(variance)
    return max(0.0, auc - half), min(1.0, auc + half)


def auc_score_interval(auc: float, n_pos: int, n_neg: int, z: float = Z95) -> tuple[float, float]:
    """Score-type 95 % interval for the AUC (Newcombe 2006, Stat Med 25:559-573, method 5).

    The interval is every theta with (auc - theta)^2 <= z^2 V(theta), where
    V(theta) = theta (1 - theta) / (m n) * [1 + (N - 1) ((1 - theta) / (2 - theta) + theta / (1 + theta))],
    N = (m + n) / 2: the Hanley-McNeil variance with m - 1 and n - 1 both replaced by N - 1, taken at
    theta (as Wilson's interval takes p (1 - p) at p) rather than at the estimate. It is used where
    DeLong's variance is 0 (perfect separation): a Wald interval then has width 0, and so do a
    patient bootstrap (every replicate separates perfectly) and a logit interval (logit 1 is
    infinite), while this one keeps a lower bound that grows towards 1 with the sample size.
    """
    m, n = n_pos, n_neg
    big_n = (m + n) / 2

    def q(theta: float) -> float:  # ((auc - theta)^2 - z^2 V(theta)) / (theta (1 - theta))
        shape = 1 + (big_n - 1) * ((1 - theta) / (2 - theta) + theta / (1 + theta))
        return (auc - theta) ** 2 / (theta * (1 - theta)) - z * z * shape / (m * n)

    eps = 1e-12
    lo = 0.0 if auc <= eps else brentq(q, eps, min(auc, 1 - eps))
    hi = 1.0 if auc >= 1 - eps else brentq(q, max(auc, eps), 1 - eps)
    return lo, hi


def summarize(y_true: Sequence[int], scores: Sequence[float],
              y_pred: Sequence[bool]) -> tuple[dict, list[str]]:
    """The metrics block M of DESIGN 3.3 plus ``"ci"`` (95 %: Wilson for rates, DeLong for the AUC).

    Returns (M, notes); the notes say which values are undefined and why.
    """
    y = np.asarray(y_true).astype(int)
    s = np.asarray(scores, dtype=float)
    counts = confusion_counts(y, y_pred)
    m: dict = dict(counts)
    ci: dict[str, list[float] | None] = {}
    notes: list[str] = []
    if counts["n"] == 0:
        notes.append("no cases: every rate and the AUC are undefined")
    for rate in RATES:
        k, d = rate_parts(counts, rate)
        m[rate] = k / d if d else None
        interval = wilson_interval(k, d)
        ci[rate] = list(interval) if interval else None
        if not d and counts["n"]:
            notes.append(f"{rate} undefined: {_EMPTY_DENOMINATOR[rate]}")
    m["auc"] = None
    ci["auc"] = None
    positives = counts["tp"] + counts["fn"]
    if 0 < positives < counts["n"]:
        m["auc"] = float(roc_auc_score(y, s))
        _, variance = delong(y, s)
        if variance is None:
            notes.append("AUC confidence interval undefined: DeLong needs at least 2 malignant "
                         "and 2 benign cases")
        elif variance < 1e-20:
            # Exactly 0 up to rounding: otherwise it is at least ~1 / (4 n^2 m) (components are
            # multiples of 1 / 2n), about 1e-13 even at 15,000 lesions a class.
            ci["auc"] = list(auc_score_interval(m["auc"], positives, counts["n"] - positives))
            why = "perfect separation" if m["auc"] in (0.0, 1.0) else "every structural component equal"
            notes.append(f"AUC {m['auc']:.3f}: DeLong variance 0 ({why}), so its interval has width 0; "
                         "'ci' holds the score interval of Newcombe (2006) instead")
        else:
            ci["auc"] = list(auc_interval(m["auc"], variance))
    elif counts["n"]:
        notes.append("AUC undefined: " + ("no malignant cases" if not positives else "no benign cases"))
    m["ci"] = ci
    return m, notes


def chi_square(groups: Mapping[str, Mapping[str, int]]) -> tuple[dict, list[str]]:
    """Pearson chi-square (no continuity correction) of each rate across subgroups.

    For each rate the table is 2 x k: its numerator and complement counts in each subgroup (as SPSS
    reports a crosstab). A subgroup where the rate is undefined has an empty column; like SPSS, the
    test leaves it out (and says so) rather than failing. Returns ``({rate: {"chi2", "p", "df"}},
    notes)``; the entry is all ``None`` when fewer than two subgroups remain or one row is empty.
    """
    out: dict[str, dict] = {}
    notes: list[str] = []
    for rate in RATES:
        columns = {name: rate_parts(c, rate) for name, c in groups.items()}
        used = {name: (k, d - k) for name, (k, d) in columns.items() if d}
        dropped = [name for name in columns if name not in used]
        out[rate] = {"chi2": None, "p": None, "df": None}
        if dropped and len(used) >= 2:
            notes.append(f"{rate} chi-square leaves out {', '.join(dropped)} "
                         f"({rate} undefined there)")
        if len(used) < 2:
            notes.append(f"{rate} chi-square undefined: fewer than 2 subgroups where {rate} is defined")
            continue
        table = np.array(list(used.values())).T
        if not table.sum(axis=1).all():
            side = "numerator" if not table[0].sum() else "complement"
            notes.append(f"{rate} chi-square undefined: the {side} is 0 in every subgroup")
            continue
        stat, p, dof, expected = chi2_contingency(table, correction=False)
        out[rate] = {"chi2": float(stat), "p": float(p), "df": int(dof)}
        small = int(np.sum(expected < 5))
        if small:
            # SPSS's footnote under a crosstab: "n cells (x %) have expected count less than 5".
            notes.append(f"{rate} chi-square: {small} of {expected.size} cells "
                         f"({100 * small / expected.size:.1f} %) have an expected count below 5 "
                         f"(minimum {expected.min():.2f}); the chi-square approximation may not hold")
    return out, notes


def fold_mean_std(folds: Sequence[Mapping]) -> tuple[dict, dict, list[str]]:
    """Mean and sample standard deviation (ddof = 1) of every M key over folds.

    Counts are averaged like rates (mean n is the mean fold size). A key undefined in some folds
    is averaged over the folds where it is defined, with a note; std needs two such folds.
    """
    mean: dict = {}
    std: dict = {}
    notes: list[str] = []
    for key in METRIC_KEYS:
        values = [f[key] for f in folds if f[key] is not None]
        mean[key] = float(np.mean(values)) if values else None
        std[key] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        if folds and len(values) < len(folds):
            notes.append(f"{key}: mean and std over the {len(values)} of {len(folds)} folds "
                         "where it is defined")
    return mean, std, notes


def youden_threshold(y_true: Sequence[int], scores: Sequence[float]) -> float:
    """The score threshold (predict malignant when score >= it) maximising sensitivity +
    specificity - 1; the highest such threshold on ties. It is always an observed score, so in
    [0, 1]. Raises ``ValueError`` without both classes.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=float)
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    if not pos.size or not neg.size:
        raise ValueError("the Youden threshold needs malignant and benign cases")
    candidates = np.unique(s)[::-1]
    tp = pos.size - np.searchsorted(pos, candidates, side="left")
    fp = neg.size - np.searchsorted(neg, candidates, side="left")
    # J scaled by P*N stays an integer, so equal J values tie exactly instead of by rounding.
    j = tp * neg.size - fp * pos.size
    return float(candidates[int(np.argmax(j))])
