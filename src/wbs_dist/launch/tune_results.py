"""The end of a sweep: results.csv, results.md and best.yaml in the experiment directory.

Apart from launch/tune.py, which runs the sweep: these only read its rows.
"""

from __future__ import annotations

import dataclasses

import yaml

from wbs_dist.atomic import write_csv, write_text

METRIC = "mean_val_auc"


def _columns(folds: int) -> list[str]:
    # node: the Ray node id the trial ran on (its last report), which shows a sweep used every node.
    return ["trial", "status", "lr", "batch_size", "epochs", METRIC] + [f"fold{k}_val_auc" for k in range(folds)] \
        + ["node"]


def _cell(col: str, value) -> str:
    if value is None:
        return "-"
    if col == "node":
        return value[:8]
    if col == "lr":
        return f"{value:.2e}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def results_markdown(rows: list[dict], folds: int) -> str:
    cols = _columns(folds)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if c in ("trial", "status") else "---:" for c in cols) + "|"]
    lines += ["| " + " | ".join(_cell(c, r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], spec, base) -> dict | None:
    """results.csv, results.md and best.yaml (from the completed trial with the highest mean AUC at
    its final epoch) in the experiment directory; the best row, or None when no trial completed."""
    exp = spec.experiment_dir
    cols = _columns(base.folds)
    write_csv(exp / "results.csv", cols, [[r.get(c) for c in cols] for r in rows])
    write_text(exp / "results.md", results_markdown(rows, base.folds))
    completed = [r for r in rows if r["status"] == "completed"]
    if not completed:
        return None
    best = max(completed, key=lambda r: r[METRIC])
    # The full protocol (the base config's epochs) with the sweep's lr and batch; its own run
    # directory, so that it never meets another run's checkpoints.
    cfg = dataclasses.replace(base, lr=best["lr"], batch_size=best["batch_size"], run_dir=str(exp / "best"))
    header = (f"# Best of the sweep {exp}: trial {best['trial']}, mean validation AUC {best[METRIC]:.4f} over "
              f"{base.folds} folds after {best['epochs']} epochs.\n# lr and batch_size from the sweep, run_dir its own; "
              f"everything else (epochs included) from {spec.base} and the train.* overrides.\n")
    write_text(exp / "best.yaml", header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return best
