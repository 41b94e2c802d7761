"""The demo: the pipeline end to end on the built-in synthetic archive, local mode.

synth → ingest → cv (five folds in this process, configs/local.yaml) → report → score (a second,
held-out synthetic archive scored by the five fold models, lesions found by the hot-spot finder
where a study has no annotations). Each step is skipped when its output is already there, so
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


@dataclass
class DemoResult:
    folds: int
    report: Path                    # the HTML report
    metrics: dict                   # its metrics.json
    scores: Path                    # the held-out archive's predictions


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
        print(f"[demo] 1/5 synthesising {patients} patients into {archive}", flush=True)
        s = write_archive(archive, patients, seed, "dir")
        print(f"[demo]     {s['studies']} studies ({s['annotated_studies']} annotated), {s['lesions']} lesions, "
              f"{s['bytes'] / 1e6:.1f} MB of DICOM", flush=True)
    else:
        print(f"[demo] 1/5 archive {archive} already there", flush=True)
    print(f"[demo] 2/5 ingesting into {store}", flush=True)
    ingested = ingest(archive, store=store, workers=workers, train_size=cfg.train_size)
    c = ingested.counts
    print(f"[demo]     {c['studies']} studies ({ingested.written} new), {c['lesions']} lesions "
          f"({c['malignant_lesions']} malignant)", flush=True)
    if ingested.errors:
        raise UsageError(f"ingest of the synthetic archive skipped {len(ingested.errors)} input(s); see "
                         f"{ingested.errors_path}")
    print(f"[demo] 3/5 five-fold cross-validation ({CONFIG.name}: {cfg.model}, {cfg.train_size}, "
          f"{cfg.epochs} epochs) in {runs}", flush=True)
    cv = cross_validate(cfg, launcher="local")
    held_out = out / "held_out_archive"
    if not held_out.exists():
        write_archive(held_out, 20, seed + 1, "dir")
    scores = out / "scores.csv"
    print(f"[demo] 4/5 scoring a held-out archive ({held_out}) with the {cfg.folds} fold models", flush=True)
    score_archive(held_out, run=runs, out=scores, workers=1)
    metrics = json.loads((cv.report_dir / "metrics.json").read_text())
    return DemoResult(cfg.folds, cv.report_dir / "report.html", metrics, scores)
