"""metrics.py against hand-computed values."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from wbs_dist.evaluate.clustered import (
    BOOT_KEYS,
    bootstrap_replicates,
    cluster_test,
    patient_bootstrap,
    patient_draws,
)
from wbs_dist.evaluate.metrics import (
    METRIC_KEYS,
    RATES,
    auc_interval,
    auc_score_interval,
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
    # Nothing left out or undefined; every table is tiny, so each carries SPSS's expected-count warning.
    assert len(notes) == 5 and all("expected count below 5" in n for n in notes)


def _pearson(table):
    """Pearson chi-square of a 2 x G table of counts by plain arithmetic: (chi2, df)."""
    rows = [sum(r) for r in table]
    cols = [sum(c) for c in zip(*table)]
    n = sum(rows)
    chi2 = sum((table[i][j] - rows[i] * cols[j] / n) ** 2 / (rows[i] * cols[j] / n)
               for i in range(len(rows)) for j in range(len(cols)))
    return chi2, (len(rows) - 1) * (len(cols) - 1)


def test_chi_square_all_five_rates_by_hand():
    from scipy.stats import chi2 as chi2_dist

    groups = {"few": _counts(30, 10, 40, 20), "medium": _counts(25, 15, 20, 5), "extensive": _counts(12, 3, 30, 18)}
    g = list(groups.values())
    # Each rate's 2 x 3 table, built by hand from its definition: numerator row, complement row.
    tables = {
        "sensitivity": [[c["tp"] for c in g], [c["fn"] for c in g]],            # TP / (TP + FN)
        "specificity": [[c["tn"] for c in g], [c["fp"] for c in g]],            # TN / (TN + FP)
        "accuracy": [[c["tp"] + c["tn"] for c in g], [c["fp"] + c["fn"] for c in g]],
        "ppv": [[c["tp"] for c in g], [c["fp"] for c in g]],                    # TP / (TP + FP)
        "npv": [[c["tn"] for c in g], [c["fn"] for c in g]],                    # TN / (TN + FN)
    }
    c, _ = chi_square(groups)
    assert set(c) == set(tables) == set(RATES)
    want = {}
    for rate, table in tables.items():
        stat, df = _pearson(table)
        want[rate] = stat
        assert c[rate]["df"] == df == 2, rate
        assert c[rate]["chi2"] == pytest.approx(stat, rel=1e-12), rate
        assert c[rate]["p"] == pytest.approx(chi2_dist.sf(stat, df), rel=1e-9), rate
    # The five statistics differ, so a rate computed from another rate's table cannot pass.
    assert len({round(v, 6) for v in want.values()}) == 5, want


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


# --- SPSS's expected-count warning, degenerate AUC intervals -------------------------------------


def test_chi_square_notes_expected_counts_below_5_as_spss():
    # Sensitivity TP/FN [[20, 20], [5, 2]]: expected FN 7 * 25 / 47 = 3.72 and 7 * 22 / 47 = 3.28.
    c, notes = chi_square({"a": _counts(20, 0, 0, 5), "b": _counts(20, 0, 0, 2)})
    assert c["sensitivity"]["df"] == 1
    assert ("sensitivity chi-square: 2 of 4 cells (50.0 %) have an expected count below 5 "
            "(minimum 3.28); the chi-square approximation may not hold") in notes
    _, notes = chi_square({"a": _counts(20, 0, 0, 10), "b": _counts(20, 0, 0, 12)})
    assert not any("expected count" in n for n in notes)


def test_perfect_separation_gets_a_score_interval_not_a_zero_width_one():
    y = [1] * 6 + [0] * 5
    s = [0.9, 0.8, 0.85, 0.7, 0.95, 0.6, 0.1, 0.3, 0.2, 0.4, 0.5]
    assert delong(y, s) == (1.0, 0.0)  # DeLong's Wald interval would be [1, 1]
    m, notes = summarize(y, s, [v >= 0.5 for v in s])
    lo, hi = m["ci"]["auc"]
    assert hi == 1.0 and 0.5 < lo < 0.95
    assert any("DeLong variance 0 (perfect separation)" in n and "Newcombe" in n for n in notes)
    # lo solves (1 - lo)^2 = z^2 V(lo), V the Hanley-McNeil variance with N = (m + n) / 2.
    big_n, z = 5.5, 1.959964
    v = lo * (1 - lo) / 30 * (1 + (big_n - 1) * ((1 - lo) / (2 - lo) + lo / (1 + lo)))
    assert (1 - lo) ** 2 == pytest.approx(z * z * v, rel=1e-6)
    assert auc_score_interval(0.0, 6, 5) == (0.0, pytest.approx(1 - lo))  # mirror image
    wider = auc_score_interval(1.0, 3, 3)[0]
    assert wider < lo < auc_score_interval(1.0, 60, 50)[0] < 1.0  # tightens with the sample size


# --- patient-cluster bootstrap (clustered.py) -------------------------------------------------


def _clustered_data(seed=3, patients=25):
    """Lesions of `patients` patients (1-8 each) with a patient effect; scores rounded (ties)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 9, patients)
    pid = np.repeat(np.arange(patients), sizes)
    effect = rng.normal(0, 1, patients)[pid]
    y = (rng.random(pid.size) < 1 / (1 + np.exp(-effect))).astype(int)
    s = np.round(1 / (1 + np.exp(-(1.5 * (2 * y - 1) + effect + rng.normal(0, 1, pid.size)))), 1)
    return np.array([f"P{i:03d}" for i in pid], dtype=object), y, s, s >= 0.5


def _reference_bootstrap(patient, y, s, p, replicates, seed):
    """One replicate at a time on its concatenated lesions (the slow, obvious way), same draws."""
    ids = np.unique(patient.astype(str))
    members = [np.flatnonzero(patient == i) for i in ids]
    values = {k: [] for k in BOOT_KEYS}
    for draws in patient_draws(ids.size, replicates, seed):
        for row in draws:
            sel = np.concatenate([members[i] for i in row])
            r = rates(confusion_counts(y[sel], p[sel]))
            for k in RATES:
                if r[k] is not None:
                    values[k].append(r[k])
            if 0 < y[sel].sum() < sel.size:
                values["auc"].append(roc_auc_score(y[sel], s[sel]))
    return {k: list(np.percentile(v, [2.5, 97.5])) for k, v in values.items()}, \
        {k: len(v) for k, v in values.items()}


def test_patient_bootstrap_matches_a_slow_reference_and_contains_the_estimate():
    patient, y, s, p = _clustered_data()
    ci, used, _ = patient_bootstrap(patient, y, s, p, replicates=300, seed=11)
    ref, ref_used = _reference_bootstrap(patient, y, s, p, 300, 11)
    m, _ = summarize(y, s, p)
    for key in BOOT_KEYS:
        assert ci[key] == pytest.approx(ref[key], abs=1e-12), key
        assert ci[key][0] <= m[key] <= ci[key][1], key
        assert used.get(key, 300) == ref_used[key]


def test_patient_bootstrap_resamples_patients_not_lesions():
    # 40 patients of 10 lesions each; a patient's lesions are all right or all wrong (half and half).
    # Lesions are then worth one observation per patient: the honest interval is sqrt(10) times
    # wider than one that resamples lesions (here: the same data with every lesion its own patient).
    y = np.ones(400, int)
    p = np.repeat(np.arange(40) % 2 == 0, 10)
    patient = np.repeat([f"P{i}" for i in range(40)], 10)
    by_patient, _, _ = patient_bootstrap(patient, y, p * 0.9, p, replicates=1000, seed=0)
    by_lesion, _, _ = patient_bootstrap(np.arange(400), y, p * 0.9, p, replicates=1000, seed=0)
    width = {name: ci["accuracy"][1] - ci["accuracy"][0]
             for name, ci in (("patient", by_patient), ("lesion", by_lesion))}
    assert width["lesion"] == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 400), rel=0.15)  # ~ Wilson's
    assert width["patient"] == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 40), rel=0.15)
    assert width["patient"] > 2.5 * width["lesion"]


def test_patient_bootstrap_is_reproducible_and_records_skipped_replicates():
    patient, y, s, p = _clustered_data(seed=4, patients=12)
    y = np.where(patient == "P000", 1, 0)  # only one patient has malignant lesions
    a = patient_bootstrap(patient, y, s, p, replicates=400, seed=7)
    assert a == patient_bootstrap(patient, y, s, p, replicates=400, seed=7)
    assert a[0] != patient_bootstrap(patient, y, s, p, replicates=400, seed=8)[0]
    # Sensitivity exists only in replicates that drew P000 (patient index 0).
    drew = sum(int(np.sum((d == 0).any(axis=1))) for d in patient_draws(12, 400, 7))
    ci, used, notes = a
    assert used["sensitivity"] == drew < 400
    assert f"sensitivity patient bootstrap over the {drew} of 400 replicates where sensitivity is defined" in notes
    assert "specificity" not in used and ci["specificity"] is not None


def test_bootstrap_replicates_are_nan_where_undefined():
    values = bootstrap_replicates(["a", "b"], [0, 0], [0.2, 0.3], [False, False], replicates=50, seed=0)
    assert np.isnan(values["sensitivity"]).all() and np.isnan(values["auc"]).all()
    assert (values["specificity"] == 1.0).all()


# --- the cluster-aware test beside Pearson's (clustered.py) -----------------------------------


def _groups(*clusters):
    """Subgroups of (correct, lesions) clusters as per-patient counts: right = TP, wrong = FN."""
    return {f"g{i}": np.array([[x, 0, 0, m - x] for x, m in c]) for i, c in enumerate(clusters)}


def test_rao_scott_hand_computed():
    # g0: (2/2, 0/2, 1/2): p .5, M 6, residuals 1, -1, 0: v = 3/2 * 2/36 = 1/12, d = (1/12)/(.25/6) = 2.
    # g1: 3 of 4 single lesions: p .75, residuals .25 x 3, -.75: v = 4/3 * .75/16 = 1/16,
    #     d = (1/16)/(.1875/4) = 4/3. Adjusted: g0 (1.5, 1.5), g1 (2.25, .75): chi2 = .4, df 1.
    c, notes = cluster_test(_groups([(2, 2), (0, 2), (1, 2)], [(1, 1), (1, 1), (1, 1), (0, 1)]),
                            permutations=0)
    acc = c["accuracy"]
    assert acc["deff"] == pytest.approx({"g0": 2.0, "g1": 4 / 3})
    assert acc["chi2"] == pytest.approx(0.4) and acc["df"] == 1
    assert acc["p"] == acc["p_chi2"] == pytest.approx(math.erfc(math.sqrt(0.2)))
    assert acc["method"] == "rao_scott"
    assert c["specificity"]["chi2"] is None  # no benign lesions: undefined, as Pearson's
    # Patients that agree exactly give v = 0: the design effect is floored at 1, never below.
    c, _ = cluster_test(_groups([(1, 2), (1, 2)], [(1, 1), (0, 1)]), permutations=0)
    assert c["accuracy"]["deff"]["g0"] == 1.0


def test_cluster_test_permutation_p_is_seeded():
    groups = _groups(*[[(k % 3, 3), (k % 2 + 1, 2), (1, 1), (4, 5)] for k in range(3)])
    a, _ = cluster_test(groups, permutations=199, seed=1)
    assert a == cluster_test(groups, permutations=199, seed=1)[0]
    p = a["accuracy"]["p"]
    assert a["accuracy"]["method"] == "rao_scott_permutation"
    assert 0 < p <= 1 and round(p * 200) == pytest.approx(p * 200)  # (1 + count) / (1 + 199)


def _null_datasets(n, rng, mus=(1.5, 1.5, 1.5)):
    """Burden-shaped subgroups (1-3, 4-6, 7-20 lesions a patient, 60 patients each), accuracy
    equal across groups unless `mus` differ, and a strong patient random effect (sd 1.5, logit)."""
    for _ in range(n):
        clusters = []
        for (lo, hi), mu in zip(((1, 3), (4, 6), (7, 20)), mus):
            size = rng.integers(lo, hi + 1, 60)
            right = rng.binomial(size, 1 / (1 + np.exp(-(mu + rng.normal(0, 1.5, 60)))))
            clusters.append(list(zip(right, size)))
        yield _groups(*clusters)


def test_cluster_test_holds_its_size_where_pearson_does_not():
    # 200 datasets with equal accuracy across groups. Pearson treats lesions as independent and
    # rejects far more than 5 % (measured: 26 % over 400 datasets); the cluster test stays near 5 %.
    rng = np.random.default_rng(2024)
    pearson = cluster = 0
    for i, groups in enumerate(_null_datasets(200, rng)):
        totals = {g: dict(zip(("tp", "fp", "tn", "fn"), c.sum(axis=0).tolist()), n=int(c.sum()))
                  for g, c in groups.items()}
        pearson += chi_square(totals)[0]["accuracy"]["p"] < 0.05
        cluster += cluster_test(groups, permutations=200, seed=i)[0]["accuracy"]["p"] < 0.05
    assert pearson / 200 > 0.15
    assert cluster / 200 < 0.10
    # And it is a test, not a refusal: a real difference (one group at logit 0 instead of 2.5).
    found = sum(cluster_test(g, permutations=200, seed=i)[0]["accuracy"]["p"] < 0.05
                for i, g in enumerate(_null_datasets(20, rng, mus=(2.5, 2.5, 0.0))))
    assert found >= 15
