"""Cross-validation: the study's k folds through a launcher, then their report.

The folds run through a launcher (launch/local.py in this process, launch/slurm.py as SLURM jobs);
this module only prepares the split, hands the folds over and aggregates what they wrote:
RUN_DIR/predictions.csv (every fold's validation predictions) and RUN_DIR/report/. Rerunning skips
finished folds, so a driver that died can simply be started again. Every fold already in the run
directory must have been made on the store's split (its fingerprint, data.folds): checked before any
fold is launched and again before aggregating, so one report never mixes two splits.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from wbs_dist.atomic import write_csv
from wbs_dist.config import Config, read_mapping
from wbs_dist.data.folds import check_split, ensure_folds, split_fingerprint
from wbs_dist.data.store import Store
from wbs_dist.errors import WbsError
from wbs_dist.schema import PREDICTION_COLUMNS
from wbs_dist.train.rundir import FoldDir

LAUNCHERS = ("local", "slurm")


@dataclass
class CvResult:
    predictions: Path | None          # RUN_DIR/predictions.csv (None for a detector: no lesion scores)
    report_dir: Path                  # RUN_DIR/report/
    runs: list                        # evaluate.analysis.Run of the report (one; none for a detector)
    detection: dict | None = None     # a detector's metrics.json block (evaluate.detection_report)


def collect_predictions(cfg: Config) -> Path:
    """Every fold's validation predictions in one CSV, RUN_DIR/predictions.csv."""
    out = Path(cfg.run_dir) / "predictions.csv"
    rows = []
    for k in range(cfg.folds):
        fold = FoldDir.of(cfg, k)
        if not fold.is_finished():
            raise WbsError(f"fold {k} has not finished ({fold.path}): nothing to report yet")
        with open(fold.predictions, newline="") as fh:
            reader = csv.reader(fh)
            if tuple(next(reader)) != PREDICTION_COLUMNS:
                raise WbsError(f"{fold.predictions}: unexpected columns")
            rows.extend(reader)
    write_csv(out, PREDICTION_COLUMNS, rows)
    return out


def check_run_split(cfg: Config, store: Store) -> str:
    """Refuse (SplitChanged, exit 2) a run directory holding a finished fold, or a checkpoint, made on
    another split than the store's; the store's fingerprint."""
    now = split_fingerprint(store)
    check_split("the config (key 'split')", cfg.split, store, now, (cfg.folds, cfg.fold_seed))
    for k in range(cfg.folds):
        fold = FoldDir.of(cfg, k)
        saved = read_mapping(fold.config) if fold.config.exists() else {}
        if fold.is_finished():
            was, what = fold.split(), f"finished fold {k} ({fold.done})"
        elif fold.last.exists():       # config.yaml is rewritten only once a checkpoint has resumed
            was, what = str(saved.get("split") or ""), f"fold {k}'s checkpoint ({fold.last})"
        else:
            continue
        check_split(what, was, store, now, (saved.get("folds"), saved.get("fold_seed")))
    return now


def cross_validate(cfg: Config, launcher: str = "local") -> CvResult:
    from wbs_dist.evaluate.report import write_report

    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    # The split is made once, here, before any fold starts: folds running at once must not race for it.
    store = Store.open(cfg.store)
    ensure_folds(store, cfg.folds, cfg.fold_seed)
    check_run_split(cfg, store)                  # before anything is launched
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    if launcher == "local":
        from wbs_dist.launch.local import run_folds_local

        run_folds_local(cfg)
    else:
        from wbs_dist.launch.slurm import run_folds_slurm

        run_folds_slurm(cfg)
    check_run_split(cfg, store)                  # a fold may have been trained elsewhere meanwhile
    if cfg.task == "detect":
        return _detection_report(cfg)
    predictions = collect_predictions(cfg)
    report_dir = Path(cfg.run_dir) / "report"
    # A config chosen by a sweep on these folds (tune's best.yaml) is graded on them: the report says so.
    provenance = {"text": cfg.selected_on, "selected_on_these_folds": True} if cfg.selected_on else None
    runs = write_report([predictions], out=report_dir, threshold=0.5, provenance=provenance)
    return CvResult(predictions, report_dir, runs)


def _detection_report(cfg: Config) -> CvResult:
    """A detector run's report: every fold's detection.json (its FROC and the threshold its training
    folds chose) pooled into RUN_DIR/report/."""
    from wbs_dist.data.store import Store
    from wbs_dist.evaluate.detection_report import write_detection_report
    from wbs_dist.finder import finder_point
    from wbs_dist.train.detector import study_index

    folds = {}
    for k in range(cfg.folds):
        fold = FoldDir.of(cfg, k)
        if not fold.is_finished():
            raise WbsError(f"fold {k} has not finished ({fold.path}): nothing to report yet")
        folds[k] = fold.read_detection()
    # The finder's point on the same studies (every validation fold's), at the detector's level.
    store = Store.open(Path(cfg.store))
    keys = study_index(store, range(cfg.folds), cfg.train_size).study_keys
    classical = finder_point(store, keys, *cfg.train_size)
    report_dir = Path(cfg.run_dir) / "report"
    return CvResult(None, report_dir, [], write_detection_report(folds, report_dir, classical))

