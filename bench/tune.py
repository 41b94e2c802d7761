"""bench/tune: what ASHA saves against the full grid over the same points, and what each finds.

Both sweeps run the same lr x batch grid with the same training seed (`wbs_dist.tune.run_sweep`, one
trial per point, every fold interleaved): the grid trains every point for all epochs, ASHA (grace 1,
reduction factor 2 by default) stops the poor ones early. Reported: trials, trial-epochs (one
trial-epoch = one epoch of every fold), wall time, and the best mean validation AUC of each with its
point. Training is deterministic, so a point's AUC at an epoch is the same in both sweeps (checked).

Tiny by default (a 30-patient synthetic store at 64 x 32, 3 folds, resnet18, 3 x 2 points, 4 epochs,
2 CPUs: a few minutes here). Writes bench/out/tune/tune.json.

    .venv/bin/python bench/tune.py [--lrs 1e-4 1e-3 1e-2] [--batches 8 16] [--epochs 4] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY_TMP = f"/tmp/ray-bench-{os.getpid()}"       # short: Ray's socket paths live under it


def make_store(out: Path, patients: int) -> Path:
    from wbs_dist.data.folds import write_folds
    from wbs_dist.data.ingest import ingest
    from wbs_dist.data.store import Store
    from wbs_dist.synth import write_archive

    store = out / f"store-{patients}.zarr"
    if not (store / "lesions").exists():
        shutil.rmtree(store, ignore_errors=True)
        write_archive(out / f"archive-{patients}", patients, seed=21, form="dir")
        assert not ingest(out / f"archive-{patients}", store=store, workers=2, train_size=(64, 32)).errors
        write_folds(Store.open(store), k=3, seed=0)
    return store


def sweep(name: str, args, store: Path, early_stopping: bool) -> dict:
    from ray import tune

    from wbs_dist.launch.tune import METRIC, load_tune, run_sweep

    spec, base = load_tune(ROOT / "configs" / "tune.yaml", [
        f"base={ROOT / 'configs' / 'local.yaml'}", f"storage_path={args.out}", f"name={name}", "num_samples=1",
        f"max_epochs={args.epochs}", f"grace_period={args.grace}", f"reduction_factor={args.reduction}",
        "cpus_per_trial=1", "gpus_per_trial=0", f"cpus={args.cpus}", f"ray_temp_dir={RAY_TMP}",
        f"train.store={store}", "train.train_size=64x32", "train.folds=3",
        "train.model=resnet18", "train.num_workers=0", "train.deterministic=true"])
    shutil.rmtree(spec.experiment_dir, ignore_errors=True)      # a measurement, not a restore
    grid = {"lr": tune.grid_search(args.lrs), "batch_size": tune.grid_search(args.batches)}
    t0 = time.perf_counter()
    rows = run_sweep(spec, base, param_space=grid, early_stopping=early_stopping)
    seconds = time.perf_counter() - t0
    best = max(rows, key=lambda r: (r["epochs"], r[METRIC]))
    return {"sweep": name, "trials": len(rows), "trial_epochs": sum(r["epochs"] for r in rows),
            "fold_epochs": sum(r["epochs"] for r in rows) * base.folds, "seconds": round(seconds, 1),
            "best_mean_val_auc": best[METRIC], "best_lr": best["lr"], "best_batch_size": best["batch_size"],
            "rows": rows, "experiment": str(spec.experiment_dir)}


def curves(result: dict) -> dict:
    """(lr, batch) -> mean val AUC per epoch, from each trial's progress.csv."""
    import csv

    out = {}
    for r in result["rows"]:
        with open(Path(result["experiment"]) / r["trial"] / "progress.csv") as fh:
            out[(r["lr"], r["batch_size"])] = {int(p["epochs"]): float(p["mean_val_auc"]) for p in csv.DictReader(fh)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--epochs", type=int, default=4, help="max epochs a trial may run")
    ap.add_argument("--grace", type=int, default=1)
    ap.add_argument("--reduction", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance (1 per trial)")
    ap.add_argument("--patients", type=int, default=30)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "tune")
    args = ap.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WBS_DIST_SECRET_FILE", str(args.out / "secret"))
    store = make_store(args.out, args.patients)

    grid = sweep("grid", args, store, early_stopping=False)
    asha = sweep("asha", args, store, early_stopping=True)
    shutil.rmtree(RAY_TMP, ignore_errors=True)
    g, a = curves(grid), curves(asha)
    agree = all(g[p][e] == auc for p in a for e, auc in a[p].items())

    print(f"\n{len(args.lrs)} lr x {len(args.batches)} batch, {args.epochs} epochs, 3 folds, "
          f"{args.patients} patients at 64 x 32, resnet18, {args.cpus} CPUs\n")
    print("| sweep | trials | trial-epochs | fold-epochs | seconds | best mean val AUC | best lr | best batch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in (grid, asha):
        print(f"| {r['sweep']} | {r['trials']} | {r['trial_epochs']} | {r['fold_epochs']} | {r['seconds']:.0f} | "
              f"{r['best_mean_val_auc']:.4f} | {r['best_lr']:.0e} | {r['best_batch_size']} |")
    print("\n| lr | batch | grid: epochs | grid: mean val AUC | ASHA: epochs | ASHA: mean val AUC |")
    print("|---:|---:|---:|---:|---:|---:|")
    for p in sorted(g):
        print(f"| {p[0]:.0e} | {p[1]} | {max(g[p])} | {g[p][max(g[p])]:.4f} | {max(a[p])} | {a[p][max(a[p])]:.4f} |")
    saved = 1 - asha["trial_epochs"] / grid["trial_epochs"]
    print(f"\nASHA spent {asha['trial_epochs']} of the grid's {grid['trial_epochs']} trial-epochs ({saved:.0%} saved); "
          f"found the grid's best point: {(asha['best_lr'], asha['best_batch_size']) == (grid['best_lr'], grid['best_batch_size'])}; "
          f"per-epoch AUCs identical to the grid's: {agree}")
    report = {"setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "grid": grid, "asha": asha, "trial_epochs_saved": saved, "curves_agree": agree}
    (args.out / "tune.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out / 'tune.json'}")


if __name__ == "__main__":
    main()
