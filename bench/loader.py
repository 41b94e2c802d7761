"""bench/loader: samples/s of the DALI loader vs the loaders a user would otherwise write.

One run, one store, the study's input (3 x 512 x 256), batch 8, this machine's cores:
  naive       a torch DataLoader that, per sample, opens the study's DICOM files with pydicom and its
              PNG masks with Pillow and resizes with torch (what a first script does)
  dataset     a torch DataLoader over wbs_dist's LesionDataset (reads the Zarr store per sample)
  dali w=N    wbs_dist's LesionLoader (DALI pipeline over the study cache), training mode (shuffle+flip),
              external source in-process (w=0) or in N worker processes; the CPU graph (one fused
              operator, lesion_op.py)
  portable    the same loader with the GPU graph's stock operators run on CPU cores (what a CPU user
              of the portable graph would get)
Targets (issue 3): dali >= 10x naive, and >= 2,000 samples/s (about what one H100 consumes here).

    .venv/bin/python bench/loader.py [--patients 100] [--workers 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image

from wbs_dist.data.dicom import identify_views
from machine import machine  # bench/machine.py (bench scripts run from bench/ on sys.path)


class NaiveDicomDataset(torch.utils.data.Dataset):
    """Per sample: decode the study's DICOM, read the PNG mask, resize, stack. No store, no cache."""

    def __init__(self, archive: Path, height: int, width: int):
        self.archive, self.h, self.w = archive, height, width
        files: dict[str, list[Path]] = {}
        for p in sorted((archive / "DICOM").rglob("*")):
            if p.is_file():
                files.setdefault(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID, []).append(p)
        self.files = files
        self.rows = [r for r in csv.DictReader(open(archive / "annotations.csv"))]
        self.ids = {}
        for r in self.rows:
            self.ids.setdefault(r["study_uid"], set()).add(int(r["lesion_id"]))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        uid, lid = row["study_uid"], int(row["lesion_id"])
        views, masks = {}, {}
        for p in self.files[uid]:
            ds = pydicom.dcmread(p)
            frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
            for name, frame in zip(identify_views(ds, len(frames)), frames):
                views[name] = torch.from_numpy(frame.astype(np.float32))
        for name in ("anterior", "posterior"):
            mp = self.archive / "masks" / uid / f"{name}.png"
            masks[name] = torch.from_numpy(np.asarray(Image.open(mp)).astype(np.float32)) if mp.exists() \
                else torch.zeros_like(views[name])
        size = (self.h, self.w // 2)
        img = torch.cat([F.interpolate(views[v][None, None], size=size, mode="area")[0, 0] for v in ("anterior", "posterior")], 1)
        lab = torch.cat([F.interpolate(masks[v][None, None], size=size, mode="nearest")[0, 0] for v in ("anterior", "posterior")], 1)
        img = img / torch.quantile(img[img > 0], 0.99)
        x = torch.stack([img, (lab == lid).float(), ((lab > 0) & (lab != lid)).float()])
        return x, torch.tensor(float(row["label"] == "malignant"))


def time_loader(batches, limit_samples: int) -> tuple[float, int]:
    n, t0 = 0, time.perf_counter()
    for b in batches:
        n += (b[0] if isinstance(b, (list, tuple)) else b["x"] if isinstance(b, dict) else b.x).shape[0]
        if n >= limit_samples:
            break
    return n / (time.perf_counter() - t0), n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("bench/out/loader"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    from wbs_dist.data.folds import write_folds
    from wbs_dist.data.ingest import ingest
    from wbs_dist.data.store import Store
    from wbs_dist.synth import write_archive
    from wbs_dist.train.dataset import LesionDataset, lesion_index
    from wbs_dist.train.loader import LesionLoader

    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WBS_DIST_SECRET_FILE", str(args.out / "secret"))
    archive, store_path = args.out / f"archive-{args.patients}", args.out / f"store-{args.patients}.zarr"
    if not archive.exists():
        write_archive(archive, args.patients, seed=0, form="dir")
    if not (store_path / "folds").exists():
        ingest(archive, store=store_path, workers=args.workers)
        write_folds(Store.open(store_path), k=5, seed=0)
    store = Store.open(store_path)
    h, w = store.train_size
    index = lesion_index(store, [0, 1, 2, 3, 4], (h, w))
    results = {}

    naive = torch.utils.data.DataLoader(NaiveDicomDataset(archive, h, w), batch_size=args.batch, shuffle=True,
                                        num_workers=args.workers, persistent_workers=True)
    time_loader(naive, args.batch * 2)                     # workers up
    results["naive"] = time_loader(naive, 160)
    dsl = torch.utils.data.DataLoader(LesionDataset(index), batch_size=args.batch, shuffle=True,
                                      num_workers=args.workers, persistent_workers=True)
    time_loader(dsl, args.batch * 2)
    results["dataset"] = time_loader(dsl, 400)
    builds = {}
    for name, fused, workers in [(f"dali w={w}", True, w) for w in sorted({0, args.workers})] + [("portable", False, 0)]:
        t0 = time.perf_counter()
        with LesionLoader(index, global_batch=args.batch, train=True, workers=workers, fused=fused) as loader:
            builds[name] = time.perf_counter() - t0
            # Whole epochs (a loader left mid-epoch would resume there); the first warms the workers up.
            time_loader(loader.epoch(), 10**9)
            rates = [time_loader(loader.epoch(), 10**9) for _ in range(3)]
        results[name] = (float(np.median([r for r, _ in rates])), sum(n for _, n in rates))
    build = max(builds.values())

    host = machine()
    print(f"\n# bench/loader on {host}; {len(index)} lesions of {len(index.study_keys)} studies, "
          f"input {index.channels} x {h} x {w}, batch {args.batch}, {args.workers} workers")
    print(f"{'loader':<12}{'samples/s':>12}{'vs naive':>10}{'samples':>9}")
    for name, (rate, n) in results.items():
        print(f"{name:<12}{rate:12.1f}{rate / results['naive'][0]:10.1f}{n:9d}")
    print(f"# dali set-up (study cache + pipeline): {build:.1f} s; targets: dali >= 10x naive and >= 2000 samples/s")
    (args.out / "loader.json").write_text(json.dumps({
        "machine": host, "lesions": len(index), "studies": len(index.study_keys), "input": [index.channels, h, w],
        "batch": args.batch, "workers": args.workers, "dali_setup_s": build,
        "samples_per_s": {k: v[0] for k, v in results.items()},
        "ratio_vs_naive": {k: v[0] / results["naive"][0] for k, v in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
