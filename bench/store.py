"""bench/store: a store of many studies, as a parallel filesystem sees it, and the loader's set-up on it.

The store is made cheaply (issue 16 item 5): synthetic studies written straight through
`Store.write_study` (no DICOM), two views of 1024 x 256 int16 with three lesions each, in 2 processes,
with the per-study fsync switched off for the build only (it is set-up, not what is measured). Then:
  files/study    files and folders per study (each is a metadata object on Lustre/GPFS)
  table s        `rebuild_lesion_table` (what the finalize of an ingest pays)
  index s        `lesion_index` over all folds (the run's lesions, each study's count scale)
  cache s        `StudyCache.build` (every study's training level read once into memory maps)
  view ms        one whole native view read (`Store.native_views`), mean over 200 studies

    .venv/bin/python bench/store.py [--studies 10000] [--out bench/out/store]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from machine import machine  # bench/machine.py (bench scripts run from bench/ on sys.path)

TRAIN_SIZE = (512, 256)
_BASE: list = []


def _study(i: int):
    from wbs_dist.data.studies import StudyData
    from wbs_dist.schema import ANTERIOR, BENIGN, MALIGNANT, POSTERIOR, STUDY_TUMOR_TYPES

    rng = np.random.default_rng(i)
    if not _BASE:                                  # one noisy body per process, rolled per study: cheap
        yy, xx = np.mgrid[0:1024, 0:256]
        body = ((np.abs(xx - 128) < 60) & (yy > 40) & (yy < 1000)).astype(np.float32)
        _BASE.append(rng.poisson(body * 20 + 1).astype(np.int16))
    views, labels, lesions = {}, {}, []
    for v in (ANTERIOR, POSTERIOR):
        views[v] = np.roll(_BASE[0], int(rng.integers(0, 1024)), axis=0)
        lab = np.zeros((1024, 256), np.uint16)
        for lid in range(1, 4):
            y, x = rng.integers(100, 900), rng.integers(80, 170)
            lab[y:y + 12, x:x + 12] = lid
            views[v][y:y + 12, x:x + 12] += 80
        labels[v] = lab
    lesions = [{"lesion_id": lid, "view": ANTERIOR, "label": (MALIGNANT, BENIGN)[lid % 2], "area": 144}
               for lid in range(1, 4)]
    attrs = {"patient": f"{i // 2:016x}", "annotated": True, "tumor_type": STUDY_TUMOR_TYPES[i % 3],
             "views": [ANTERIOR, POSTERIOR], "lesions": lesions, "sources": [], "dtypes": {}}
    labels[POSTERIOR][:] = 0                       # the lesions are annotated on the anterior view
    return StudyData(f"{i:016x}", attrs, views, labels)


def _write(args) -> int:
    path, start, stop = args
    from wbs_dist.data import store as store_mod

    store_mod.sync_tree = lambda folder: None      # build only: the fsync is not what is measured here
    st = store_mod.Store.open(path)
    for i in range(start, stop):
        st.write_study(_study(i))
    return stop - start


def build(path: Path, n: int, workers: int) -> float:
    from wbs_dist.data.store import Store

    Store.create_or_open(path, TRAIN_SIZE)
    have = len(list((path / "studies").iterdir()))
    t0 = time.perf_counter()
    step = 250
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write, [(path, s, min(s + step, n)) for s in range(have, n, step)]))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/out/store"))
    args = ap.parse_args()
    from wbs_dist.data.folds import write_folds
    from wbs_dist.data.store import Store
    from wbs_dist.train.dataset import lesion_index
    from wbs_dist.train.loader import StudyCache

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"store-{args.studies}.zarr"
    built = build(path, args.studies, args.workers)
    st = Store.open(path)
    one = path / "studies" / st.study_keys()[0]
    objects = sum(1 for _ in one.rglob("*")) + 1
    files = sum(1 for p in one.rglob("*") if p.is_file())
    t0 = time.perf_counter()
    st.rebuild_lesion_table()
    table_s = time.perf_counter() - t0
    if not (path / "folds").exists():
        write_folds(st, k=5, seed=0)
    os.system("sync")
    t0 = time.perf_counter()
    index = lesion_index(st, [0, 1, 2, 3, 4], TRAIN_SIZE)
    index_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache = StudyCache.build(index)
    cache_s = time.perf_counter() - t0
    cache.remove()
    keys = st.study_keys()[:: max(1, args.studies // 200)][:200]
    t0 = time.perf_counter()
    for k in keys:
        st.native_views(k)
    view_ms = 1e3 * (time.perf_counter() - t0) / (2 * len(keys))
    r = {"studies": args.studies, "files_per_study": files, "objects_per_study": objects, "build_s": built,
         "table_s": table_s, "index_s": index_s, "cache_s": cache_s, "view_ms": view_ms,
         "store_mb": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6}
    print(f"# bench/store on {machine()}: {args.studies} studies (page cache warm: the store was just written)")
    print(" ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    (args.out / f"store-{args.studies}.json").write_text(json.dumps({"machine": machine(), **r}, indent=1))


if __name__ == "__main__":
    main()
