"""The demo: the pipeline end to end on the built-in synthetic archive, local mode.

synth → ingest → cv (five folds in this process, configs/local.yaml) → report → the lesion detector's
cv (configs/detect_local.yaml) → score (a second,
held-out synthetic archive scored by the five fold models, lesions found by the hot-spot finder
where a study has no annotations) → score the training archive itself: the out-of-fold rule
(infer/known.py) scores each patient with the fold that held it out, so its patient-level numbers
must equal the cross-validation's (DemoResult.out_of_fold holds both) → the held-out archive again
without its delineations, lesions from the detector and from the hot-spot finder: patient-level AUC
of the three side by side (compare_candidates). Each step is skipped when its output is already there, so
rerunning the demo is cheap and an interrupted one continues. Progress goes to stdout as it runs;
`wbs-dist demo` prints the result.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from wbs_dist.errors import UsageError

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "local.yaml"
DETECTOR_CONFIG = CONFIG.with_name("detect_local.yaml")


@dataclass
class DemoResult:
    folds: int
    report: Path                    # the HTML report
    metrics: dict                   # its metrics.json
    scores: Path                    # the held-out archive's predictions
    out_of_fold: Path               # the training archive's predictions, scored out-of-fold
    patient_level: dict             # {"cv": ..., "scored": ..., "equal": bool}: patient-level numbers of both
    detection: dict                 # the detector's cv block (pooled sensitivity, FP per study)
    candidates: dict                # held-out patient-level AUC from annotated, learned, classical lesions


def run_demo(out: Path, patients: int = 60, seed: int = 0, workers: int = 2) -> DemoResult:
    from wbs_dist.config import load_config
    from wbs_dist.data.ingest import ingest
    from wbs_dist.infer.score import score_archive
    from wbs_dist.launch.cv import cross_validate
    from wbs_dist.synth import write_archive

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    archive, store, runs = out / "archive", out / "store.zarr", out / "runs"
    cfg = load_config(CONFIG, [f"store={store}", f"run_dir={runs}"])
    # The demo keeps its pseudonym secret beside its data: it holds no real patients.
    os.environ.setdefault("WBS_DIST_SECRET_FILE", str(out / "secret"))
    if not archive.exists():
        print(f"[demo] 1/7 synthesising {patients} patients into {archive}", flush=True)
        s = write_archive(archive, patients, seed, "dir")
        print(f"[demo]     {s['studies']} studies ({s['annotated_studies']} annotated), {s['lesions']} lesions, "
              f"{s['bytes'] / 1e6:.1f} MB of DICOM", flush=True)
    else:
        print(f"[demo] 1/7 archive {archive} already there", flush=True)
    print(f"[demo] 2/7 ingesting into {store}", flush=True)
    ingested = ingest(archive, store=store, workers=workers, train_size=cfg.train_size)
    c = ingested.counts
    print(f"[demo]     {c['studies']} studies ({ingested.written} new), {c['lesions']} lesions "
          f"({c['malignant_lesions']} malignant)", flush=True)
    if ingested.errors:
        raise UsageError(f"ingest of the synthetic archive skipped {len(ingested.errors)} input(s); see "
                         f"{ingested.errors_path}")
    print(f"[demo] 3/7 five-fold cross-validation ({CONFIG.name}: {cfg.model}, {cfg.train_size}, "
          f"{cfg.epochs} epochs) in {runs}", flush=True)
    cv = cross_validate(cfg, launcher="local")
    det_cfg = load_config(DETECTOR_CONFIG, [f"store={store}", f"run_dir={out / 'runs' / 'detector'}"])
    print(f"[demo] 4/7 five-fold cross-validation of the lesion detector ({DETECTOR_CONFIG.name}: {det_cfg.model}, "
          f"{det_cfg.epochs} epochs)", flush=True)
    detector = cross_validate(det_cfg, launcher="local")
    held_out = out / "held_out_archive"
    if not held_out.exists():
        write_archive(held_out, 20, seed + 1, "dir")
    scores = out / "scores.csv"
    print(f"[demo] 5/7 scoring a held-out archive ({held_out}) with the {cfg.folds} fold models", flush=True)
    score_archive(held_out, run=runs, out=scores, workers=1)
    metrics = json.loads((cv.report_dir / "metrics.json").read_text())
    oof = out / "training_archive_scores.csv"
    print(f"[demo] 6/7 scoring the training archive itself ({archive}): each known patient by the fold that "
          "held it out", flush=True)
    scored = score_archive(archive, run=runs, out=oof, workers=1)
    if scored.unrecognised or scored.errors:
        raise UsageError(f"scoring the training archive did not recognise its patients ({scored.unrecognised or ''}"
                         f"{len(scored.errors)} not scored, see {scored.errors_path})")
    print("[demo] 7/7 the held-out archive without its delineations: lesions from the detector and from the "
          "hot-spot finder", flush=True)
    compared = compare_candidates(held_out, scores, runs, Path(det_cfg.run_dir), out)
    return DemoResult(cfg.folds, cv.report_dir / "report.html", metrics, scores, oof,
                      patient_level(metrics, oof), detector.detection, compared)


def compare_candidates(archive: Path, annotated: Path, run: Path, detector: Path, out: Path,
                       workers: int = 1) -> dict:
    """Patient-level AUC on an annotated archive scored three ways: from its delineated lesions
    (`annotated`, PRED.csv already written), and from the DICOM alone with the detector's lesions
    and the hot-spot finder's. A patient's score is its highest lesion's; its truth, malignant when
    any delineated lesion is. Returns {source: {"auc", "lesions_per_study", "csv"}}."""
    import shutil

    import numpy as np
    from sklearn.metrics import roc_auc_score

    from wbs_dist.infer.score import score_archive

    bare = out / (archive.name + "_dicom_only")
    if not bare.exists():
        shutil.copytree(archive, bare, ignore=shutil.ignore_patterns("annotations.csv", "masks"))
    csvs = {"annotated": annotated}
    for source, detector_run in (("learned", detector), ("classical", None)):
        csvs[source] = out / f"held_out_{source}.csv"
        score_archive(bare, run=run, out=csvs[source], workers=workers, detector=detector_run,
                      candidates_from=source)
    rows = {k: _rows(v) for k, v in csvs.items()}
    truth = {}
    for r in rows["annotated"]:              # studies without delineations have no truth: left out
        if r["label"] != "":
            truth[r["patient_id"]] = max(truth.get(r["patient_id"], 0), int(r["label"]))
    patients = sorted(truth)
    result = {}
    for source, rs in rows.items():
        best = {}
        for r in rs:
            best[r["patient_id"]] = max(best.get(r["patient_id"], 0.0), float(r["score"]))
        y, s = np.array([truth[p] for p in patients]), np.array([best.get(p, 0.0) for p in patients])
        studies = len({r["study_uid"] for r in rs}) or 1
        result[source] = {"auc": float(roc_auc_score(y, s)) if len(set(y)) == 2 else None,
                          "lesions_per_study": len(rs) / studies, "csv": str(csvs[source])}
    return result


def _rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


PATIENT_KEYS = ("n", "auc", "sensitivity", "specificity", "accuracy")


def patient_level(metrics: dict, scored: Path) -> dict:
    """The patient-level figures of the cross-validation (its metrics.json) beside those of the scores
    of the training archive, at the same threshold (unlabelled candidate rows are left out by both)."""
    from wbs_dist.evaluate.analysis import analyse
    from wbs_dist.evaluate.predictions import read_predictions

    again = analyse("scored", read_predictions(scored), metrics["threshold"], bootstrap=0).metrics
    out = {name: {k: m["patient"]["pooled"][k] for k in PATIENT_KEYS} for name, m in (("cv", metrics),
                                                                                   ("scored", again))}
    # Scores are written with six decimals by both paths; CPU convolutions may round the sixth apart.
    out["equal"] = all(a == b or (a is not None and b is not None and abs(a - b) < 1e-6)
                       for a, b in zip(out["cv"].values(), out["scored"].values()))
    return out
