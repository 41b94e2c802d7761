"""metrics.py against hand-computed values."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from wbs_dist.evaluate.metrics import (
    METRIC_KEYS,
    auc_interval,
    chi_square,
    confusion_counts,
    delong,
    fold_mean_std,
    rates,
    summarize,
    wilson_interval,
    youden_threshold,
)


def test_confusion_counts_and_rates():
    y = [1, 1, 1, 0, 0, 0, 0]
    p = [1, 1, 0, 1, 0, 0, 0]
    c = confusion_counts(y, p)
    assert c == {"n": 7, "tp": 2, "fp": 1, "tn": 3, "fn": 1}
    r = rates(c)
    assert r["sensitivity"] == pytest.approx(2 / 3)
    assert r["specificity"] == pytest.approx(3 / 4)
    assert r["accuracy"] == pytest.approx(5 / 7)
    assert r["ppv"] == pytest.approx(2 / 3)
    assert r["npv"] == pytest.approx(3 / 4)


def test_rates_with_zero_denominator_are_none():
    r = rates({"n": 3, "tp": 0, "fp": 1, "tn": 2, "fn": 0})
    assert r["sensitivity"] is None and r["ppv"] == 0.0 and r["specificity"] == pytest.approx(2 / 3)


def test_wilson_known_values():
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) is None


def test_delong_hand_computed_with_a_tie():
    # Malignant 0.9, 0.7, 0.4; benign 0.7, 0.3, 0.2. Structural components by hand:
    # V10 = [1, 5/6, 2/3], V01 = [1/2, 1, 1]; AUC 5/6;
    # var = var(V10)/3 + var(V01)/3 = (1/36)/3 + (1/12)/3 = 1/27.
    y = [1, 1, 1, 0, 0, 0]
    s = [0.9, 0.7, 0.4, 0.7, 0.3, 0.2]
    auc, var = delong(y, s)
    assert auc == pytest.approx(5 / 6)
    assert var == pytest.approx(1 / 27)
    lo, hi = auc_interval(auc, var)
    assert lo == pytest.approx(5 / 6 - 1.959964 * math.sqrt(1 / 27), abs=1e-6)
    assert hi == 1.0


def test_delong_needs_two_of_each_class_for_a_variance():
    assert delong([1, 0, 0], [0.9, 0.1, 0.2]) == (1.0, None)
    with pytest.raises(ValueError):
        delong([0, 0], [0.1, 0.2])


def test_delong_matches_sklearn_and_bootstrap():
    rng = np.random.default_rng(7)
    y = np.r_[np.ones(40, int), np.zeros(50, int)]
    s = np.round(np.clip(rng.normal(0.5 + 0.15 * (2 * y - 1), 0.2), 0, 1), 2)  # rounding makes ties
    auc, var = delong(y, s)
    assert auc == pytest.approx(roc_auc_score(y, s))
    pos, neg = s[y == 1], s[y == 0]
    boot = []
    for _ in range(3000):  # stratified: DeLong conditions on the class sizes too
        bp = rng.choice(pos, pos.size)
        bn = rng.choice(neg, neg.size)
        boot.append(delong(np.r_[np.ones(bp.size), np.zeros(bn.size)], np.r_[bp, bn])[0])
    assert var == pytest.approx(np.var(boot), rel=0.2)


def test_summarize_hand_computed():
    y = [1, 0, 1, 0, 0, 1, 1, 0, 1, 0]
    s = [0.90, 0.40, 0.30, 0.60, 0.20, 0.80, 0.70, 0.10, 0.55, 0.45]
    m, notes = summarize(y, s, [v >= 0.5 for v in s])
    assert notes == []
    assert {k: m[k] for k in ("n", "tp", "fp", "tn", "fn")} == {"n": 10, "tp": 4, "fp": 1, "tn": 4, "fn": 1}
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["sensitivity"] == pytest.approx(0.8)
    assert m["auc"] == pytest.approx(21 / 25)  # 21 of 25 malignant-benign pairs ranked right
    assert [round(v, 4) for v in m["ci"]["accuracy"]] == [0.4902, 0.9433]
    assert set(m) == set(METRIC_KEYS) | {"ci"}


def test_summarize_without_positives_is_null_with_notes():
    m, notes = summarize([0, 0, 0], [0.2, 0.6, 0.1], [False, True, False])
    assert m["sensitivity"] is None and m["auc"] is None and m["npv"] == 1.0
    assert m["ci"]["sensitivity"] is None and m["ci"]["auc"] is None
    assert any("sensitivity undefined: no malignant" in n for n in notes)
    assert any("AUC undefined: no malignant" in n for n in notes)


def test_summarize_empty():
    m, notes = summarize([], [], [])
    assert m["n"] == 0 and all(m[k] is None for k in ("sensitivity", "accuracy", "auc"))
    assert notes == ["no cases: every rate and the AUC are undefined"]


def _counts(tp, fp, tn, fn):
    return {"n": tp + fp + tn + fn, "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def test_chi_square_hand_computed():
    # Accuracy table correct/wrong: [[3, 3, 2], [1, 1, 0]]; expected [[3.2, 3.2, 1.6], [.8, .8, .4]]:
    # chi2 = .0125 + .0125 + .1 + .05 + .05 + .4 = 0.625, df 2, p = exp(-0.625 / 2).
    groups = {"few": _counts(1, 0, 2, 1), "medium": _counts(2, 1, 1, 0), "extensive": _counts(1, 0, 1, 0)}
    c, notes = chi_square(groups)
    assert c["accuracy"]["chi2"] == pytest.approx(0.625)
    assert c["accuracy"]["df"] == 2
    assert c["accuracy"]["p"] == pytest.approx(math.exp(-0.3125))
    # Sensitivity TP/FN [[1, 2, 1], [1, 0, 0]] -> 1.875.
    assert c["sensitivity"]["chi2"] == pytest.approx(1.875)
    assert c["sensitivity"]["p"] == pytest.approx(math.exp(-0.9375))
    # PPV TP/FP [[1, 2, 1], [0, 1, 0]] is fine; specificity TN/FP [[2, 1, 1], [0, 1, 0]] too.
    assert set(c) == {"sensitivity", "specificity", "accuracy", "ppv", "npv"}
    assert notes == []


def test_chi_square_two_groups_no_continuity_correction():
    # 2 x 2 [[10, 20], [10, 5]]: Pearson without Yates = 45*(50-200)^2/(20*25*30*15) = 4.5.
    c, _ = chi_square({"a": _counts(10, 0, 0, 10), "b": _counts(20, 0, 0, 5)})
    assert c["sensitivity"]["chi2"] == pytest.approx(4.5)


def test_chi_square_leaves_out_undefined_subgroup_and_nulls_when_too_few():
    groups = {"lung": _counts(3, 1, 2, 1), "prostate": _counts(0, 1, 4, 0), "breast": _counts(2, 0, 3, 2)}
    c, notes = chi_square(groups)
    # prostate has no malignant lesions: sensitivity over lung and breast only, 1 df.
    assert c["sensitivity"]["df"] == 1
    assert any("sensitivity chi-square leaves out prostate" in n for n in notes)
    c, notes = chi_square({"lung": _counts(3, 1, 2, 1), "prostate": _counts(0, 1, 4, 0)})
    assert c["sensitivity"] == {"chi2": None, "p": None, "df": None}
    assert any("sensitivity chi-square undefined" in n for n in notes)


def test_chi_square_all_correct_is_undefined():
    c, notes = chi_square({"a": _counts(2, 0, 2, 0), "b": _counts(1, 0, 3, 0)})
    assert c["accuracy"]["chi2"] is None
    assert any("accuracy chi-square undefined: the complement is 0" in n for n in notes)


def test_fold_mean_std_skips_undefined_folds():
    folds = [summarize(y, s, p)[0] for y, s, p in (
        ([1, 0, 1, 0], [0.9, 0.4, 0.3, 0.6], [1, 0, 0, 1]),
        ([1, 1, 0, 0], [0.8, 0.7, 0.1, 0.2], [1, 1, 0, 0]),
        ([0, 0], [0.2, 0.3], [0, 0]),
    )]
    mean, std, notes = fold_mean_std(folds)
    assert mean["sensitivity"] == pytest.approx(0.75)
    assert std["sensitivity"] == pytest.approx(math.sqrt(0.125))
    assert mean["n"] == pytest.approx(10 / 3)
    assert mean["accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert any(n.startswith("sensitivity: mean and std over the 2 of 3 folds") for n in notes)


def test_youden_threshold():
    y = [1, 1, 1, 0, 0, 0]
    s = [0.9, 0.6, 0.35, 0.4, 0.3, 0.1]
    # Candidates: 0.6 -> tpr 2/3, fpr 0 (J .667); 0.35 -> 1, 1/3 (J .667): the higher one wins ties.
    assert youden_threshold(y, s) == 0.6
    # An inverted scorer: only "everything malignant" (the lowest score) reaches J = 0.
    assert youden_threshold([1, 0], [0.2, 0.7]) == 0.2
    with pytest.raises(ValueError):
        youden_threshold([1, 1], [0.3, 0.4])
