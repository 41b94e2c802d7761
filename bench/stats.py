"""bench/stats: the patient-cluster bootstrap and cluster test at the study's size, vectorised vs naive.

Synthetic predictions shaped like the study (DESIGN 1): 3,352 patients, about 14,972 lesions (1-20 a
patient, a patient random effect on both the label and the score), three tumour types. Timed:
  bootstrap vectorised  clustered.patient_bootstrap, B replicates (best of 3): per-patient confusion counts,
                        (block, patients) multiplicity draws, matrix products, a weighted
                        Mann-Whitney AUC over score levels sorted once
  bootstrap naive       a Python loop over the same replicates (the same draws): concatenate the
                        drawn patients' lesions, confusion counts, sklearn's roc_auc_score; run on
                        --naive replicates and scaled to B (it is linear in B)
  cluster test          clustered.cluster_test over the tumour types, B permutations, 5 rates
                        (best of 3)
  analyse               the whole metrics.json of one run (pooled, 6 subgroups, 2 cluster tests)
The vectorised and the naive replicates are compared value by value (they must agree to rounding).

    .venv/bin/python bench/stats.py [--patients 3352] [--lesions 14972] [--B 2000] [--naive 200]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from machine import machine  # bench/machine.py (bench scripts run from bench/ on sys.path)
from sklearn.metrics import roc_auc_score

from wbs_dist.evaluate.analysis import analyse
from wbs_dist.evaluate.clustered import (BOOT_KEYS, bootstrap_replicates, cluster_test, patient_bootstrap,
                                         patient_counts, patient_draws)
from wbs_dist.evaluate.metrics import confusion_counts, rates
from wbs_dist.evaluate.predictions import Predictions
from wbs_dist.schema import STUDY_TUMOR_TYPES, burden_group


def synthetic(patients: int, lesions: int, seed: int) -> Predictions:
    rng = np.random.default_rng(seed)
    sizes = np.clip(rng.geometric(1 / (lesions / patients), patients), 1, 20)
    pid = np.repeat(np.arange(patients), sizes)
    effect = rng.normal(0, 1.0, patients)[pid]
    label = (rng.random(pid.size) < 1 / (1 + np.exp(-(0.3 + effect)))).astype(int)
    score = 1 / (1 + np.exp(-(1.6 * (2 * label - 1) + 0.8 * effect + rng.normal(0, 1, pid.size))))
    tumour = np.array(STUDY_TUMOR_TYPES, dtype=object)[rng.integers(0, 3, patients)][pid]
    return Predictions(path=Path("synthetic"), patient_id=np.array([f"P{i}" for i in pid], dtype=object),
                       fold=pid % 5, label=label, score=np.round(score, 4), tumor_type=tumour,
                       burden=np.array([burden_group(int(n)) for n in sizes[pid]], dtype=object),
                       n_unlabelled=0)


def naive(pred: Predictions, replicates: int, seed: int) -> dict[str, np.ndarray]:
    """The same replicates as bootstrap_replicates, one at a time in Python."""
    index, _ = patient_counts(pred.patient_id, pred.label, pred.score >= 0.5)
    members = np.split(np.argsort(index, kind="stable"), np.cumsum(np.bincount(index))[:-1])
    y, s = pred.label, pred.score
    out = {k: [] for k in BOOT_KEYS}
    for draws in patient_draws(len(members), replicates, seed):
        for row in draws:
            sel = np.concatenate([members[p] for p in row])
            r = rates(confusion_counts(y[sel], s[sel] >= 0.5))
            for k in BOOT_KEYS[:-1]:
                out[k].append(np.nan if r[k] is None else r[k])
            both = 0 < y[sel].sum() < sel.size
            out["auc"].append(roc_auc_score(y[sel], s[sel]) if both else np.nan)
    return {k: np.array(v) for k, v in out.items()}


def best_of(repeats: int, fn) -> float:
    """Seconds of the fastest of `repeats` calls (the machine may be shared)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=3352)
    ap.add_argument("--lesions", type=int, default=14972)
    ap.add_argument("--B", type=int, default=2000)
    ap.add_argument("--naive", type=int, default=200, help="naive replicates timed (scaled to B)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    pred = synthetic(args.patients, args.lesions, args.seed)
    y, s, p = pred.label, pred.score, pred.score >= 0.5
    print(f"{machine()}; {np.unique(pred.patient_id).size} patients, {y.size} lesions, B = {args.B}")

    fast = best_of(3, lambda: patient_bootstrap(pred.patient_id, y, s, p, args.B, args.seed))
    t = time.perf_counter()
    slow_values = naive(pred, args.naive, args.seed)
    slow = (time.perf_counter() - t) * args.B / args.naive
    fast_values = bootstrap_replicates(pred.patient_id, y, s, p, args.naive, args.seed)
    diff = max(float(np.nanmax(np.abs(fast_values[k] - slow_values[k]))) for k in BOOT_KEYS)

    tumour = pred.tumor_type
    groups = {g: patient_counts(pred.patient_id[tumour == g], y[tumour == g], p[tumour == g])[1]
              for g in STUDY_TUMOR_TYPES}
    test = best_of(3, lambda: cluster_test(groups, args.B, args.seed))
    t = time.perf_counter()
    analyse("bench", pred, 0.5, args.B, args.seed)
    whole = time.perf_counter() - t

    figures = {"machine": machine(), "patients": int(np.unique(pred.patient_id).size),
               "lesions": int(y.size), "B": args.B, "bootstrap_vectorised_s": fast,
               "bootstrap_naive_s_scaled": slow, "naive_replicates_timed": args.naive,
               "ratio": slow / fast, "max_abs_difference": diff, "cluster_test_s": test,
               "analyse_s": whole}
    print(f"patient bootstrap, vectorised: {fast:.2f} s (best of 3)")
    print(f"patient bootstrap, naive loop: {slow:.1f} s (timed on {args.naive} replicates, scaled to "
          f"{args.B}); ratio {slow / fast:.0f}x; largest difference on the same draws {diff:.1e}")
    print(f"cluster test (3 tumour types, {args.B} permutations, 5 rates): {test:.2f} s (best of 3)")
    print(f"analyse (whole metrics.json: pooled, 6 subgroups, 2 cluster tests): {whole:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
