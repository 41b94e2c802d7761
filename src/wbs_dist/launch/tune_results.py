"""A sweep's results: results.csv and results.md (every trial: lr, batch, epochs, mean and per-fold
validation AUC), and best.yaml, the chosen configuration as a complete training config that says
where its lr and batch size were chosen (config key `selected_on`: cv's report then says its figures
were graded on the folds that chose them)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import yaml

from wbs_dist.atomic import write_csv, write_text
from wbs_dist.config import Config

if TYPE_CHECKING:
    from wbs_dist.launch.tune import TuneSpec

# The sweep's objective, per task: each fold's validation metric (its metrics.csv column, the task's
# `metric`) and their mean over the folds at the trial's epoch.
OBJECTIVES = {"classify": ("val_auc", "mean validation AUC"),
              "detect": ("val_sensitivity_at_3fp", "mean validation lesion sensitivity at 3 false positives a study")}
METRIC = "mean_val_auc"               # the classifier's (task classify)


def metric(task: str = "classify") -> str:
    return "mean_" + OBJECTIVES[task][0]


def fold_column(k: int, task: str = "classify") -> str:
    return f"fold{k}_{OBJECTIVES[task][0]}"


def best_row(rows: list[dict], task: str = "classify") -> dict | None:
    """The completed trial with the highest mean validation metric at its final epoch; None if none completed."""
    m = metric(task)
    completed = [r for r in rows if r["status"] == "completed" and r[m] is not None]
    return max(completed, key=lambda r: r[m]) if completed else None


def _columns(folds: int, task: str = "classify") -> list[str]:
    # node: the Ray node id the trial ran on (its last report), which shows a sweep used every node.
    return ["trial", "status", "lr", "batch_size", "epochs", metric(task)] + [fold_column(k, task) for k in range(folds)] \
        + ["node"]


def _cell(col: str, value) -> str:
    if value is None:
        return "-"
    if col == "node":
        return value[:8]
    if col == "lr":
        return f"{value:.2e}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def results_markdown(rows: list[dict], folds: int, task: str = "classify") -> str:
    cols = _columns(folds, task)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if c in ("trial", "status") else "---:" for c in cols) + "|"]
    lines += ["| " + " | ".join(_cell(c, r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], spec: TuneSpec, base: Config, best_yaml: bool = True) -> dict | None:
    """results.csv, results.md and (unless not `best_yaml`) best.yaml from the best completed trial, in
    the experiment directory; the best row, or None when no trial completed."""
    exp = spec.experiment_dir
    cols = _columns(base.folds, base.task)
    write_csv(exp / "results.csv", cols, [[r.get(c) for c in cols] for r in rows])
    write_text(exp / "results.md", results_markdown(rows, base.folds, base.task))
    best = best_row(rows, base.task)
    m, described = metric(base.task), OBJECTIVES[base.task][1]
    if best is None or not best_yaml:
        return best
    # The full protocol (the base config's epochs) with the sweep's lr and batch; its own run
    # directory, so that it never meets another run's checkpoints.
    selected = (f"lr {best['lr']:.3g} and batch_size {best['batch_size']} were selected by the sweep {exp} (trial "
                f"{best['trial']}, {described} {best[m]:.4f}) on these same {base.folds} folds (split "
                f"{base.split}): figures graded on them are optimistic; `wbs-dist tune ... nested=true` gives an "
                "unbiased estimate")
    cfg = dataclasses.replace(base, lr=best["lr"], batch_size=best["batch_size"], run_dir=str(exp / "best"),
                              selected_on=selected)
    header = (f"# Best of the sweep {exp}: trial {best['trial']}, {described} {best[m]:.4f} over "
              f"{base.folds} folds after {best['epochs']} epochs.\n# lr and batch_size from the sweep, run_dir its own; "
              f"everything else (epochs included) from {spec.base} and the train.* overrides.\n")
    write_text(exp / "best.yaml", header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return best
