"""Nested cross-validation of the search: `wbs-dist tune CONFIG nested=true`.

The plain sweep chooses lr and batch size by the mean validation AUC over the k folds, and `cv
best.yaml` then reports on those same folds: the choice has seen the validation patients, so its
figures are optimistic (the more trials, the more), and its report says so (tune_results.py).

Nested: for each outer fold o, a sweep runs on the inner folds, the other k-1 folds of the store's
split, each in turn validation while the rest train (config key outer_fold = o: fold o is neither
trained nor validated on). Its best configuration is retrained on all k-1 folds, which is fold o of
the study (`train_fold(cfg, o)` at the base config's full epochs), and graded on fold o. No patient of
fold o shaped its model or chose its hyperparameters, so the k outer folds' predictions make an
unbiased report; its metrics.json carries "provenance" with each outer fold's choice.

Layout: EXP/outer<o>/ a sweep per outer fold (restored like any sweep when the command is rerun),
EXP/nested/fold<o>/ the retrained folds (exact resume), EXP/nested/predictions.csv and
EXP/nested/report/, EXP/nested.json (the choices).

Cost: k sweeps of k-1 folds each, that is k-1 times the fold trainings of the plain sweep (k folds a
trial), plus k folds at full length, where the plain path adds k (`cv best.yaml`). The README has
the figures.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from wbs_dist.atomic import write_json
from wbs_dist.config import Config
from wbs_dist.errors import WbsError
from wbs_dist.launch.cv import collect_predictions
from wbs_dist.launch.tune import METRIC, TuneSpec, pin_split, run_sweep
from wbs_dist.launch.tune_results import write_results

log = logging.getLogger("wbs_dist.tune")


@dataclass
class NestedResult:
    experiment: Path
    outer: list[dict]                # per outer fold: its choice (lr, batch_size, trial, inner mean AUC, trials)
    predictions: Path                # EXP/nested/predictions.csv: the outer folds' predictions
    report_dir: Path                 # EXP/nested/report/
    runs: list                       # evaluate.analysis.Run of the report (one)


def outer_spec(spec: TuneSpec, outer: int) -> TuneSpec:
    """The sweep of one outer fold: an experiment of its own under the nested one."""
    return dataclasses.replace(spec, storage_path=str(spec.experiment_dir), name=f"outer{outer}", nested=False)


def provenance(spec: TuneSpec, outer: list[dict]) -> dict:
    return {"text": f"nested cross-validation: for each of the {len(outer)} outer folds, lr and batch_size were "
                    f"chosen by a search ({spec.num_samples} trials, mean validation AUC over the inner folds after "
                    f"up to {spec.max_epochs} epochs) on that fold's training patients only, retrained on all of "
                    "them and graded on the outer fold: no patient graded here trained its model or chose its "
                    "hyperparameters",
            "selected_on_these_folds": False, "outer_folds": outer}


def nested_tune(spec: TuneSpec, base: Config) -> NestedResult:
    """Every outer fold's sweep, its choice retrained and graded on the outer fold, and the report."""
    from wbs_dist.evaluate.report import write_report
    from wbs_dist.train.trainer import train_fold

    base = pin_split(base)
    exp = spec.experiment_dir
    outer = []
    for o in range(base.folds):
        sub, inner = outer_spec(spec, o), dataclasses.replace(base, outer_fold=o)
        log.info("outer fold %d/%d: searching on folds %s", o + 1, base.folds,
                 [k for k in range(base.folds) if k != o])
        rows = run_sweep(sub, inner)
        best = write_results(rows, sub, inner, best_yaml=False)
        if best is None:
            raise WbsError(f"outer fold {o}: no trial ran its {spec.max_epochs} epochs (see "
                           f"{sub.experiment_dir / 'results.md'}); rerun the same command to resume")
        outer.append({"outer_fold": o, "lr": float(best["lr"]), "batch_size": int(best["batch_size"]),
                      "inner_mean_val_auc": round(float(best[METRIC]), 4), "trial": best["trial"],
                      "trials": len(rows), "errored": sum(r["status"] == "error" for r in rows)})
    write_json(exp / "nested.json", outer, indent=2)
    run = dataclasses.replace(base, run_dir=str(exp / "nested"))
    for choice in outer:
        log.info("outer fold %d: training lr %.3g, batch %d on the other folds", choice["outer_fold"],
                 choice["lr"], choice["batch_size"])
        train_fold(dataclasses.replace(run, lr=choice["lr"], batch_size=choice["batch_size"]), choice["outer_fold"])
    predictions = collect_predictions(run)
    report_dir = Path(run.run_dir) / "report"
    runs = write_report([predictions], out=report_dir, threshold=0.5, provenance=provenance(spec, outer))
    return NestedResult(exp, outer, predictions, report_dir, runs)
