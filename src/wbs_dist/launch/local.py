"""The folds in turn, in this process: one GPU or the CPU. Finished folds are skipped."""

from __future__ import annotations

from wbs_dist.config import Config
from wbs_dist.train.rundir import FoldResult
from wbs_dist.train.trainer import train_fold


def run_folds_local(cfg: Config) -> list[FoldResult]:
    results = []
    for fold in range(cfg.folds):
        print(f"[cv] fold {fold + 1}/{cfg.folds}", flush=True)
        results.append(train_fold(cfg, fold))
    return results
