"""bench/ingest: `wbs-dist ingest` vs pydicom decoding the same files, and store size vs DICOM size.

One run, same files, same number of processes (2 by default, this machine's cores):
  decode  what pydicom alone needs: dcmread + pixel_array for every object, in a process pool
  ingest  the whole `wbs-dist ingest`: header pass, decode, view identification, masks, resampling
          to the training level, compression, atomic batch writes (64 studies), lesion table
Target (issue 2): ingest within 1.3x of decode; store no larger than the DICOM files.

    .venv/bin/python bench/ingest.py [--patients 100] [--workers 2] [--jpegls] [--out bench/out/ingest]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pydicom
from machine import machine  # bench/machine.py (bench scripts run from bench/ on sys.path)


def _decode(path: str) -> tuple[str, int]:
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    return str(ds.file_meta.TransferSyntaxUID.name), arr.nbytes


def _warm(path: str) -> int:
    import numpy  # noqa: F401  (import cost paid before timing, as ingest's workers do in their initializer)

    return len(Path(path).read_bytes())


def recompress(src: Path, dst: Path) -> None:
    """A copy of the archive with its objects JPEG-LS lossless, as many PACS exports store them."""
    from pydicom.uid import JPEGLSLossless

    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    for p in sorted((tmp / "DICOM").rglob("*")):
        if p.is_file():
            ds = pydicom.dcmread(p)
            if ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRBigEndian:
                continue  # pydicom will not re-encode big endian in place; 1 study in 8 stays as it is
            arr = ds.pixel_array
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.decompress()
            ds.compress(JPEGLSLossless, arr.astype(arr.dtype.newbyteorder("=")), encoding_plugin="pyjpegls")
            ds.save_as(p, enforce_file_format=True)
    tmp.rename(dst)


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/out/ingest"))
    ap.add_argument("--repeats", type=int, default=2, help="best of N for each side")
    ap.add_argument("--jpegls", action="store_true",
                    help="also measure a copy of the archive recompressed to JPEG-LS lossless")
    args = ap.parse_args()

    from wbs_dist.synth import write_archive

    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WBS_DIST_SECRET_FILE", str(args.out / "secret"))
    archive = args.out / f"archive-{args.patients}-{args.seed}"
    if not archive.exists():
        write_archive(archive, args.patients, seed=args.seed, form="dir")
    results = {"mixed (synth as written)": measure(args, archive)}
    if args.jpegls:
        compressed = args.out / f"archive-{args.patients}-{args.seed}-jpegls"
        if not compressed.exists():
            recompress(archive, compressed)
        results["all JPEG-LS lossless"] = measure(args, compressed)
    host = f"{machine()}, {platform.system()} {platform.release()}"
    print(f"\n# bench/ingest on {host}; {args.workers} processes, best of {args.repeats}")
    print(f"{'archive':<26}{'studies':>8}{'decode s':>10}{'ingest s':>10}{'ratio':>7}{'DICOM MB':>10}{'store MB':>10}"
          f"{'ratio':>7}{'files/study':>12}")
    for name, r in results.items():
        print(f"{name:<26}{r['studies']:>8}{r['decode_s']:>10.2f}{r['ingest_s']:>10.2f}{r['ingest_over_decode']:>7.2f}"
              f"{r['dicom_mb']:>10.1f}{r['store_mb']:>10.1f}{r['store_over_dicom']:>7.2f}{r['files_per_study']:>12.2f}")
    print("# targets: ingest <= 1.3x decode; store <= DICOM size")
    (args.out / "ingest.json").write_text(json.dumps({"machine": host, "results": results}, indent=1))
    print(f"# wrote {args.out / 'ingest.json'}")


def measure(args, archive: Path) -> dict:
    from wbs_dist.data.ingest import ingest
    files = sorted(str(p) for p in (archive / "DICOM").rglob("*") if p.is_file())
    dicom_bytes = sum(Path(f).stat().st_size for f in files)
    ctx = multiprocessing.get_context("spawn")
    decode_times, ingest_times = [], []
    forms: Counter = Counter()
    store = args.out / "store.zarr"
    for _ in range(args.repeats):
        # Same pool set-up cost on both sides: a spawned pool that has imported pydicom and numpy.
        with ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
            list(pool.map(_warm, files, chunksize=8))
            t0 = time.perf_counter()
            results = list(pool.map(_decode, files, chunksize=1))
            decode_times.append(time.perf_counter() - t0)
        forms = Counter(ts for ts, _ in results)
        shutil.rmtree(store, ignore_errors=True)
        t0 = time.perf_counter()
        result = ingest(archive, store=store, workers=args.workers)
        ingest_times.append(time.perf_counter() - t0)
        assert not result.errors, f"ingest skipped inputs: {result.errors[:3]}"
    store_bytes = tree_size(store)
    from wbs_dist.data.store import Store
    n_studies = len(Store.open(store).study_keys())
    store_files = sum(len(f) for _, _, f in os.walk(store / "studies"))
    decode_t, ingest_t = min(decode_times), min(ingest_times)
    return {"studies": n_studies, "dicom_files": len(files), "transfer_syntaxes": dict(forms),
            "decode_s": decode_t, "ingest_s": ingest_t, "ingest_over_decode": ingest_t / decode_t,
            "studies_per_s": n_studies / ingest_t, "dicom_mb": dicom_bytes / 1e6, "store_mb": store_bytes / 1e6,
            "store_over_dicom": store_bytes / dicom_bytes, "files_per_study": store_files / n_studies}


if __name__ == "__main__":
    main()
