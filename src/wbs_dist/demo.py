"""`wbs-dist demo`: the pipeline end to end on the built-in synthetic archive, local mode.

synth → ingest → cv (five folds in this process, configs/local.yaml) → report → score (a second,
held-out synthetic archive scored by the five fold models, lesions found by the hot-spot finder
where a study has no annotations). Each step is skipped
when its output is already there, so rerunning the demo is cheap and an interrupted one continues.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import EXIT_OK, UsageError

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "local.yaml"


def run_demo(out: Path, patients: int = 60, seed: int = 0, workers: int = 2) -> int:
    from .config import load_config
    from .cv import run_cv
    from .ingest import run_ingest
    from .score import run_score
    from .synth import run_synth

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    archive, store, runs = out / "archive", out / "store.zarr", out / "runs"
    overrides = [f"store={store}", f"run_dir={runs}"]
    cfg = load_config(CONFIG, overrides)
    # The demo keeps its pseudonym secret beside its data: it holds no real patients.
    os.environ.setdefault("WBS_DIST_SECRET_FILE", str(out / "secret"))
    if not archive.exists():
        print(f"[demo] 1/5 synthesising {patients} patients into {archive}", flush=True)
        run_synth(archive, patients=patients, seed=seed, form="dir")
    else:
        print(f"[demo] 1/5 archive {archive} already there", flush=True)
    print(f"[demo] 2/5 ingesting into {store}", flush=True)
    rc = run_ingest(archive, store=store, workers=workers, train_size=(cfg.image_height, cfg.image_width))
    if rc != EXIT_OK:
        raise UsageError(f"ingest of the synthetic archive reported skipped inputs (exit {rc}); see {store}.errors.csv")
    print(f"[demo] 3/5 five-fold cross-validation ({CONFIG.name}: {cfg.model}, {cfg.image_height}x{cfg.image_width}, "
          f"{cfg.epochs} epochs) in {runs}", flush=True)
    run_cv(CONFIG, overrides, launcher="local")
    held_out = out / "held_out_archive"
    if not held_out.exists():
        run_synth(held_out, patients=20, seed=seed + 1, form="dir")
    scores = out / "scores.csv"
    print(f"[demo] 4/5 scoring a held-out archive ({held_out}) with the {cfg.folds} fold models", flush=True)
    run_score(held_out, run=runs, out=scores, workers=1)
    metrics = json.loads((runs / "report" / "metrics.json").read_text())
    pooled, mean = metrics["lesion"]["pooled"], metrics["lesion"]["mean"]

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f} %"

    print(f"[demo] scores: {scores} (per study: {scores.with_name(scores.stem + '.summary.csv')})")
    print(f"[demo] 5/5 report: {runs / 'report' / 'report.html'}")
    print(f"[demo] lesion level, mean of {cfg.folds} folds: accuracy {pct(mean['accuracy'])}, sensitivity "
          f"{pct(mean['sensitivity'])}, specificity {pct(mean['specificity'])}, AUC "
          f"{'n/a' if mean['auc'] is None else format(mean['auc'], '.3f')}; pooled n = {pooled['n']}")
    return EXIT_OK
