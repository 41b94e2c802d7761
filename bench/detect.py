"""bench/detect: the learned lesion detector against the classical hot-spot finder, side by side, on
the demo's held-out synthetic archive (run `wbs-dist demo` first; this reads its folders).

One run, the same studies for both:
  detection     lesion sensitivity and false positives per study (detection.py's criterion: overlap
                coefficient > 0.3, a component at most 10 x the lesion, a component on a lesion's
                other-view appearance neither found nor false): the detector ensemble's components
                (infer/learned.py, the folds' median training-chosen threshold) and the finder's
                regions, both as native label maps brought to the detector's level, against the
                delineations at that level
  patient AUC   from the delineated lesions, the learned candidates and the classical candidates
                (demo.compare_candidates: the scorer end to end, a patient's highest lesion)
  throughput    detector training samples/s on this machine (from the demo's folds' metrics.csv),
                and scoring studies/s with learned candidates against annotated lesions
Targets (issue 15, on a GPU-sized run; the demo's CPU detector is small): >= 95 % sensitivity at
<= 3 false positives a study; patient AUC from learned candidates within 0.03 of annotated; scoring
with the detector >= 0.8 x scoring with annotations.

    .venv/bin/python bench/detect.py [--demo demo]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
from machine import machine  # bench/machine.py (bench scripts run from bench/ on sys.path)


def decoded_studies(archive: Path) -> dict:
    """uid -> StudyData (views, label maps) of an annotated archive, decoded in this process."""
    from wbs_dist.data.studies import StudySource, group_studies, patient_id_of
    from wbs_dist.data.workers import StudyPool, assemble

    out = {}
    with StudySource.open(archive, None) as source, StudyPool(source, 0, {}) as pool:
        for uid, objs in group_studies(pool.headers(source.members), []).items():
            data, _ = pool.submit(assemble, source.job(uid, patient_id_of(objs), uid, objs)).result()
            if data is not None:
                out[uid] = data
    return out


def detection_figures(studies: dict, detector_run: Path, size: tuple[int, int]) -> dict:
    """Both proposers on the same studies, matched alike: their native-size label maps and the
    delineations (with their other-view copies) at the detector's level (detection.py)."""
    from types import SimpleNamespace

    from wbs_dist.detection import match, point
    from wbs_dist.finder import finder_match
    from wbs_dist.infer import learned
    from wbs_dist.infer.ensemble import Ensemble
    from wbs_dist.preprocess import detection_level
    from wbs_dist.schema import VIEWS

    det = Ensemble(detector_run, task="detect")
    learned_m, classical_m = [], []
    t_learned = t_classical = 0.0
    for data in studies.values():
        views = {v: a.astype(np.float32) for v, a in data.views.items() if v in VIEWS}
        if not views:
            continue
        labels = {v: a for v, a in data.labels.items() if v in views}
        t0 = time.perf_counter()
        image, truth = detection_level(views, labels, *size)
        # scan.image at the detector's level: propose brings its components there
        scan = SimpleNamespace(image=np.zeros(size, np.float32), detect=image, labels=None,
                               slots={v: v for v in views}, shapes={v: a.shape for v, a in views.items()})
        learned.propose(det, [scan], -1)
        t_learned += time.perf_counter() - t0
        learned_m.append(match(scan.labels, truth))
        t0 = time.perf_counter()
        classical_m.append(finder_match(views, labels, *size))
        t_classical += time.perf_counter() - t0
    n = len(learned_m)
    return {"studies": n, "learned": {**point(None, learned_m), "seconds_per_study": t_learned / n},
            "classical": {**point(None, classical_m), "seconds_per_study": t_classical / n}}


def training_speed(detector_run: Path) -> float:
    """Mean samples/s over the detector folds' epochs (metrics.csv)."""
    rates = []
    for f in sorted(detector_run.glob("fold*/metrics.csv")):
        with open(f) as fh:
            rates += [float(r["samples_per_s"]) for r in csv.DictReader(fh)]
    return float(np.mean(rates)) if rates else float("nan")


def scoring_speed(archive: Path, run: Path, detector: Path, out: Path) -> dict:
    """Studies/s of the scorer end to end: annotated lesions vs the same archive's DICOM with learned
    candidates (a fresh output each, 1 worker, as the demo scores)."""
    import shutil

    from wbs_dist.infer.score import score_archive

    bare = out / "bench_dicom_only"
    if not bare.exists():
        shutil.copytree(archive, bare, ignore=shutil.ignore_patterns("annotations.csv", "masks"))
    rates = {}
    for name, src, det in (("annotated", archive, None), ("learned", bare, detector)):
        target = out / f"bench_{name}.csv"
        shutil.rmtree(target.with_name(target.name + ".parts"), ignore_errors=True)
        r = score_archive(src, run=run, out=target, workers=1, detector=det,
                          candidates_from="learned" if det else None)
        rates[name] = r.scored / r.seconds
    rates["ratio_learned_to_annotated"] = rates["learned"] / rates["annotated"]
    return rates


def main() -> None:
    from wbs_dist.config import load_config
    from wbs_dist.demo import compare_candidates

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", type=Path, default=Path("demo"), help="the demo's output folder")
    args = ap.parse_args()
    demo = args.demo.resolve()
    # The demo's pseudonym secret, as the demo itself uses it: the scorings below then recognise its
    # patients alike and reuse the demo's own outputs.
    os.environ.setdefault("WBS_DIST_SECRET_FILE", str(demo / "secret"))
    archive, run, detector = demo / "held_out_archive", demo / "runs", demo / "runs" / "detector"
    if not (detector / "report" / "metrics.json").exists():
        raise SystemExit(f"{detector}: no detector report; run `wbs-dist demo --out {args.demo}` first")
    size = tuple(load_config(detector / "fold0" / "config.yaml").train_size)
    studies = decoded_studies(archive)
    figures = {"machine": machine(), "archive": str(archive), "train_size": list(size),
               "cv": json.loads((detector / "report" / "metrics.json").read_text())["detection"]["pooled"],
               "held_out": detection_figures(studies, detector, size),
               "patient_auc": compare_candidates(archive, demo / "scores.csv", run, detector, demo),
               "detector_training_samples_per_s": training_speed(detector),
               "scoring_studies_per_s": scoring_speed(archive, run, detector, demo)}
    h = figures["held_out"]
    print(f"{figures['machine']}; held-out archive: {h['studies']} studies at {size[0]}x{size[1]}")
    print("| proposals | sensitivity | FP / study | s / study |\n|---|---:|---:|---:|")
    for name in ("learned", "classical"):
        p = h[name]
        print(f"| {name} | {100 * p['sensitivity']:.1f} % ({p['found']}/{p['lesions']}) | {p['fp_per_study']:.2f} | "
              f"{p['seconds_per_study']:.3f} |")
    print("patient-level AUC: " + ", ".join(f"{k} {v['auc']:.3f}" for k, v in figures["patient_auc"].items()))
    s = figures["scoring_studies_per_s"]
    print(f"scoring: annotated {s['annotated']:.2f} studies/s, learned {s['learned']:.2f} studies/s "
          f"({s['ratio_learned_to_annotated']:.2f}x); detector training {figures['detector_training_samples_per_s']:.1f} "
          "samples/s")
    out = Path(__file__).parent / "results" / "detect_cpu.json"
    out.write_text(json.dumps(figures, indent=1, default=str) + "\n")
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
