"""`wbs-dist cv`: the study's k-fold cross-validation, then its report.

The folds run through a launcher (launch/local.py in this process, launch/slurm.py as SLURM jobs);
this module only prepares the split, hands the folds over and aggregates what they wrote:
RUN_DIR/predictions.csv (every fold's validation predictions) and RUN_DIR/report/ (wbs-dist report).
Rerunning skips finished folds, so a driver that died can simply be started again.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .atomic import write_csv
from .config import Config, load_config
from .errors import WbsError
from .folds import write_folds
from .store import Store
from .train import PREDICTION_COLUMNS, ensure_folds, fold_dir


def collect_predictions(cfg: Config) -> Path:
    out = Path(cfg.run_dir) / "predictions.csv"
    rows = []
    for k in range(cfg.folds):
        path = fold_dir(cfg, k) / "predictions.csv"
        if not (fold_dir(cfg, k) / "done.json").exists():
            raise WbsError(f"fold {k} has not finished ({fold_dir(cfg, k)}): nothing to report yet")
        with open(path, newline="") as fh:
            reader = csv.reader(fh)
            if tuple(next(reader)) != PREDICTION_COLUMNS:
                raise WbsError(f"{path}: unexpected columns")
            rows.extend(reader)
    write_csv(out, PREDICTION_COLUMNS, rows)
    return out


def run_cv(config_path, overrides, launcher: str) -> int:
    from .report import run_report

    cfg = load_config(config_path, overrides)
    store = Store.open(cfg.store)
    # The split is made once, here, before any fold starts: folds running at once must not race for it.
    if not (store.path / "folds" / "zarr.json").exists():
        write_folds(store, cfg.folds, cfg.fold_seed)
    from .dist import detect

    ensure_folds(store, cfg, detect())
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    if launcher == "local":
        from .launch.local import run_folds_local

        run_folds_local(cfg)
    else:
        from .launch.slurm import run_folds_slurm

        run_folds_slurm(cfg)
    predictions = collect_predictions(cfg)
    report_dir = Path(cfg.run_dir) / "report"
    rc = run_report([predictions], out=report_dir, threshold="0.5")
    print(f"[cv] report: {report_dir / 'report.html'} (metrics: {report_dir / 'metrics.json'})")
    return rc
