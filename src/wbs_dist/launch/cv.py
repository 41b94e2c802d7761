"""Cross-validation: the study's k folds through a launcher, then their report.

The folds run through a launcher (launch/local.py in this process, launch/slurm.py as SLURM jobs);
this module only prepares the split, hands the folds over and aggregates what they wrote:
RUN_DIR/predictions.csv (every fold's validation predictions) and RUN_DIR/report/. Rerunning skips
finished folds, so a driver that died can simply be started again.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from wbs_dist.atomic import write_csv
from wbs_dist.config import Config
from wbs_dist.data.folds import ensure_folds
from wbs_dist.data.store import Store
from wbs_dist.errors import WbsError
from wbs_dist.schema import PREDICTION_COLUMNS
from wbs_dist.train.rundir import FoldDir

LAUNCHERS = ("local", "slurm")


@dataclass
class CvResult:
    predictions: Path                 # RUN_DIR/predictions.csv
    report_dir: Path                  # RUN_DIR/report/
    runs: list                        # evaluate.analysis.Run of the report (one)


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


def cross_validate(cfg: Config, launcher: str = "local") -> CvResult:
    from wbs_dist.evaluate.report import write_report

    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    # The split is made once, here, before any fold starts: folds running at once must not race for it.
    ensure_folds(Store.open(cfg.store), cfg.folds, cfg.fold_seed)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    if launcher == "local":
        from wbs_dist.launch.local import run_folds_local

        run_folds_local(cfg)
    else:
        from wbs_dist.launch.slurm import run_folds_slurm

        run_folds_slurm(cfg)
    predictions = collect_predictions(cfg)
    report_dir = Path(cfg.run_dir) / "report"
    runs = write_report([predictions], out=report_dir, threshold=0.5)
    return CvResult(predictions, report_dir, runs)
