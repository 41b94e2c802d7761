"""bench/store_scale: a training run's set-up (study cache) and its reads, on a store of 10,000 studies.

Issue 16 item 5. The store is made without DICOM: `--distinct` synthetic studies are rendered once
(synth.make_study: Poisson counts, label maps, lesions; their DICOM headers give the kept attributes
a real ingest stores) and turned into the `StudyData` ingest would make of them; each is then written
many times through the store's batch writer (the real write, as ingest's: training level, compression,
batches of 64 studies, fsync, atomic publish) under distinct study keys and patient pseudonyms, keyed hashes as ingest derives them
(deid.keyed_hash) under a fixed throwaway secret: one patient per study. Then the lesion table is rebuilt
and 5 folds made (`wbs-dist folds`'s code, k 5, seed 0). Reported: build time, files and folders per
study, bytes per study (apparent and allocated).

Then, each in a fresh process after the page cache is dropped (`sync; echo 3 > drop_caches`; when
that is refused, or with --no-drop, the figures say that the page cache was warm), side by side:
  open         `Store.open` + `lesion_table()` + `read_folds` (what every run and every scorer pays)
  index        `lesion_index` of folds 0-3 (a fold's training lesions: opens every study's attrs)
  cache        `StudyCache.build(index)`: every training study's level read once into memory maps in
               /dev/shm, a batch's studies in one read of its shard (a training run's set-up)
  plain        the same studies' training level read study by study (`Store.training_level`) in one
               thread (what a user would otherwise write)
  epoch cache  one epoch of per-sample reads (the sample's study image and label map, copied) from
               the cache, in a shuffled order
  epoch store  the same epoch read from the store, per sample (`LesionIndex.study_arrays`, what
               `LesionDataset` does for every sample)
Reads only: the network input (make_input), augmentation and batching are bench/loader's. bench/store
is the cheaper relative (hand-drawn studies, fsync off for the build, no side-by-side reads).

It refuses to start (exit 2) when the output folder's filesystem has less free space than 1.5x the
store's estimate, or the cache's (/dev/shm) less than 1.5x the cache's; --check prints the estimate
and that check's outcome, and does nothing else. The store is removed at the end unless --keep (a run
killed before its end leaves it: the next run of the same --studies and --out removes it).

    .venv/bin/python bench/store_scale.py [--studies 10000] [--distinct 32] [--workers 2]
                                          [--out bench/out/store_scale] [--json bench/results/store_scale.json] [--check]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from machine import machine  # bench/machine.py (bench scripts run from bench/ on sys.path)

TRAIN_SIZE = (512, 256)
TRAIN_FOLDS = [0, 1, 2, 3]        # fold 4's training folds
# Measured at 10,000 studies in batches (2-core AMD EPYC VM, quiet): 0.232 MB allocated a study on ext4
# (0.3 files and folders), rounded up; wall seconds a study for the whole bench (build with 2
# processes, table, folds, every measurement: the store epoch and the build are most of it, 4.9 min in
# all) and the fixed part (rendering, fresh processes). The preflight sizes a run with them.
EST_BYTES_PER_STUDY = 0.25e6
EST_SECONDS_PER_STUDY = 0.03
EST_SECONDS_FIXED = 60
ANNOTATED = 0.95                  # synth.ANNOTATED_FRACTION: studies with lesions, the index's share
HEADROOM = 1.5


# -- the distinct studies ------------------------------------------------------------------------------
def study_data(seed: int, index: int):
    """A synthetic study as ingest's `assemble_study` would hand it to the store (key and patient are
    set per copy), or None for a study whose masks ingest would refuse."""
    from wbs_dist.data.deid import DEVICE_ATTRIBUTES, KEPT_ATTRIBUTES, device_fields
    from wbs_dist.data.dicom import _plain
    from wbs_dist.data.studies import StudyData
    from wbs_dist.synth import make_study, study_datasets

    study = make_study(seed, index)
    plan = study.plan
    sources = []
    for ds in study_datasets(study):       # what decode() keeps of each object (deid's allow-list)
        meta = {k: _plain(ds.get(k)) for k in KEPT_ATTRIBUTES if k in ds}
        if any(k in ds for k in DEVICE_ATTRIBUTES):
            meta.update(device_fields(ds.get("Manufacturer"), ds.get("ManufacturerModelName")))
        meta["TransferSyntaxUID"] = str(ds.file_meta.TransferSyntaxUID)
        sources.append(meta)
    labels, lesions = {}, []
    if plan.annotated:
        for view in sorted({les.view for les in plan.lesions}):
            areas = np.bincount(study.labels[view].ravel())
            mine = [les for les in plan.lesions if les.view == view]
            if any(les.lesion_id >= len(areas) or not areas[les.lesion_id] for les in mine):
                return None                # "lesion N has no pixels in the mask": ingest skips it
            labels[view] = study.labels[view]
            lesions += [{"lesion_id": les.lesion_id, "view": view, "label": les.label,
                         "area": int(areas[les.lesion_id])} for les in mine]
        lesions.sort(key=lambda les: les["lesion_id"])
    attrs = {"patient": "", "annotated": plan.annotated, "tumor_type": plan.tumor_type if plan.annotated else None,
             "views": list(study.views), "lesions": lesions, "sources": sources,
             "dtypes": {v: str(a.dtype) for v, a in study.views.items()}}
    return StudyData("", attrs, study.views, labels), plan


# -- the build (worker processes) ------------------------------------------------------------------------
_W: dict = {}


def _init(path: str, bases: list) -> None:
    from wbs_dist.data.store import Store

    _W["store"], _W["bases"] = Store.open(Path(path)), bases


def _write(chunk: list[tuple[int, str, str]]) -> int:
    from dataclasses import replace

    from wbs_dist.data.batches import prepare

    written = 0
    with _W["store"].writer() as w:
        for i, key, patient in chunk:
            base = _W["bases"][i % len(_W["bases"])]
            written += w.add(prepare(replace(base, key=key, attrs=dict(base.attrs, patient=patient)), TRAIN_SIZE))
    return written


def build(path: Path, n: int, distinct: int, workers: int, seed: int) -> dict:
    from wbs_dist.data.deid import keyed_hash, secret_check
    from wbs_dist.data.folds import write_folds
    from wbs_dist.data.store import Store

    t0 = time.perf_counter()
    made = [study_data(seed, j) for j in range(distinct)]
    bases = [m[0] for m in made if m is not None]
    uids = [m[1].study_uid for m in made if m is not None]
    ids = [m[1].patient.patient_id for m in made if m is not None]
    render_s = time.perf_counter() - t0

    # A throwaway secret, fixed so that every run makes the same keys and the same folds (a random one
    # gave another training set each run); it is no site's secret.
    secret = hashlib.sha256(b"wbs-dist bench/store_scale: not a site secret").hexdigest().encode()
    st = Store.create_or_open(path, TRAIN_SIZE)
    st.claim_secret(secret_check(secret))
    # Copy i of distinct study j = i % D: its Study Instance UID and Patient ID suffixed with i, so
    # keys and pseudonyms differ as a real archive's do (one patient per study).
    jobs = [(i, keyed_hash(secret, "study", f"{uids[i % len(bases)]}.{i}"),
             keyed_hash(secret, "patient", f"{ids[i % len(bases)]}-{i}")) for i in range(n)]
    step = 256                   # 4 full batches a task: as ingest's one writer fills them
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, initializer=_init, initargs=(str(path), bases)) as pool:
        written = sum(pool.map(_write, [jobs[s:s + step] for s in range(0, n, step)]))
    write_s = time.perf_counter() - t0
    st.clear_staging()
    assert written == n, f"{written} studies written of {n} (a key collided?)"
    t0 = time.perf_counter()
    counts = st.rebuild_lesion_table()
    table_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = write_folds(st, k=5, seed=0)
    folds_s = time.perf_counter() - t0
    return {"distinct": len(bases), "render_s": render_s, "write_s": write_s, "table_s": table_s,
            "folds_s": folds_s, "build_s": write_s + table_s + folds_s, "counts": counts,
            "fold_lesions": [c["lesions"] for c in info["counts"]], "stratified_on": info["stratified_on"]}


def tree_counts(path: Path) -> dict:
    """Files, folders, apparent and allocated bytes of the store, and of its studies/ alone."""
    out = {"files": 0, "folders": 0, "bytes": 0, "allocated": 0}
    studies = dict(out)
    for dirpath, dirnames, filenames in os.walk(path):
        inside = Path(dirpath).is_relative_to(path / "studies") and Path(dirpath) != path / "studies"
        for tgt in (out, studies) if inside else (out,):
            tgt["folders"] += 1
            tgt["files"] += len(filenames)
        for name in filenames:
            s = os.stat(os.path.join(dirpath, name))
            for tgt in (out, studies) if inside else (out,):
                tgt["bytes"] += s.st_size
                tgt["allocated"] += s.st_blocks * 512
    return {"store": out, "studies": studies}


# -- measurements (each in a fresh process) --------------------------------------------------------------
def drop_caches() -> str:
    """'dropped', or why not."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return "dropped"
    except OSError as exc:
        return f"not dropped ({exc.strerror or exc})"


def _epoch_order(n: int, limit: int) -> np.ndarray:
    order = np.random.default_rng([0, 1]).permutation(n)
    return order[:limit] if limit else order


def measure(phase: str, path: Path, drop: bool, epoch_limit: int) -> dict:
    from wbs_dist.data.folds import read_folds
    from wbs_dist.data.store import Store
    from wbs_dist.train.dataset import lesion_index
    from wbs_dist.train.loader import StudyCache

    r = {"cache_state": drop_caches() if drop else "not dropped (--no-drop)"}
    t0 = time.perf_counter()
    st = Store.open(path)
    r["open_s"] = time.perf_counter() - t0
    if phase == "open":
        t0 = time.perf_counter()
        table = st.lesion_table()
        r["table_read_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        patients, _, _ = read_folds(st)
        r["folds_read_s"] = time.perf_counter() - t0
        r["lesions"], r["patients"] = len(table["study"]), len(patients)
        r["total_s"] = r["open_s"] + r["table_read_s"] + r["folds_read_s"]
        return r
    t0 = time.perf_counter()
    index = lesion_index(st, TRAIN_FOLDS, TRAIN_SIZE)
    r["index_s"] = time.perf_counter() - t0
    r["studies"], r["samples"] = len(index.study_keys), len(index)
    if phase == "index":
        return r
    order = _epoch_order(len(index), epoch_limit)
    r["epoch_samples"] = len(order)
    if phase == "cache":
        t0 = time.perf_counter()
        cache = StudyCache.build(index)
        r["build_s"] = time.perf_counter() - t0
        try:
            r["cache_bytes"] = sum(f.stat().st_size for f in Path(cache.folder).iterdir())
            images, labels = cache.arrays()
            t0 = time.perf_counter()
            for i in order:
                s = int(index.study[i])
                np.array(images[s]), np.array(labels[s])
            r["epoch_s"] = time.perf_counter() - t0
        finally:
            cache.remove()
    elif phase == "plain":
        t0 = time.perf_counter()
        for key in index.study_keys:
            st.training_level(key)
        r["build_s"] = time.perf_counter() - t0
    elif phase == "store":
        t0 = time.perf_counter()
        for i in order:
            index.study_arrays(st, int(index.study[i]))
        r["epoch_s"] = time.perf_counter() - t0
    return r


def in_fresh_process(phase: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", phase, "--store", str(args.store_path),
           "--epoch-limit", str(args.epoch_limit)] + (["--no-drop"] if args.no_drop else [])
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# -- preflight ---------------------------------------------------------------------------------------------
def free_bytes(path: Path) -> int:
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def mem_available() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def preflight(args) -> dict:
    """The run's estimated disk, cache and time; exit 2 when there is not room enough for it."""
    h, w = TRAIN_SIZE
    est = {"store_bytes": args.studies * EST_BYTES_PER_STUDY,
           # the cache holds 4/5 of the annotated studies: float32 image + uint16 labels a study
           "cache_bytes": args.studies * ANNOTATED * len(TRAIN_FOLDS) / 5 * h * w * 6,
           "seconds": EST_SECONDS_FIXED + args.studies * EST_SECONDS_PER_STUDY}
    free = free_bytes(args.out)
    if free < HEADROOM * est["store_bytes"]:
        refuse(f"the store of {args.studies} studies needs about {est['store_bytes'] / 1e9:.1f} GB "
               f"({EST_BYTES_PER_STUDY / 1e6:.2f} MB a study) and the filesystem of {args.out} has "
               f"{free / 1e9:.1f} GB free, under {HEADROOM}x that: free space there, or pass --out on a larger one")
    shm = Path("/dev/shm")                       # where StudyCache.build puts the cache (RAM), else the temp dir
    where = shm if shm.is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))
    free = min(free_bytes(where), mem_available()) if where == shm else free_bytes(where)
    if free < HEADROOM * est["cache_bytes"]:
        refuse(f"the study cache of {args.studies} studies needs about {est['cache_bytes'] / 1e9:.1f} GB "
               f"({h * w * 6 / 1e6:.2f} MB a training study) in {where}, and it has {free / 1e9:.1f} GB "
               f"{'(free, and memory available)' if where == shm else 'free'}, under {HEADROOM}x that: "
               "use fewer --studies, or free memory")
    return est


def refuse(why: str) -> None:
    print(f"bench/store_scale: refusing to start: {why}", file=sys.stderr)
    sys.exit(2)


# -- main ------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=10_000)
    ap.add_argument("--distinct", type=int, default=32, help="synthetic studies rendered, each written many times")
    ap.add_argument("--workers", type=int, default=2, help="processes writing the store")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epoch-limit", type=int, default=0, help="read at most this many samples an epoch (0: all)")
    ap.add_argument("--no-drop", action="store_true", help="do not drop the page cache before each measurement")
    ap.add_argument("--keep", action="store_true", help="keep the store (removed by default)")
    ap.add_argument("--check", action="store_true", help="print the estimate and check free space, nothing else")
    ap.add_argument("--out", type=Path, default=Path("bench/out/store_scale"))
    ap.add_argument("--json", type=Path, default=Path("bench/results/store_scale.json"))
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:                                # a measurement, in its own process
        print(json.dumps(measure(args.phase, args.store, not args.no_drop, args.epoch_limit)))
        return
    if args.studies < 25 or args.distinct < 1:
        refuse("--studies must be >= 25 (5 folds holding both classes) and --distinct >= 1")
    est = preflight(args)
    print(f"# bench/store_scale: {args.studies} studies; estimated {est['store_bytes'] / 1e9:.1f} GB of store, "
          f"{est['cache_bytes'] / 1e9:.1f} GB of study cache in /dev/shm, about {est['seconds'] / 60:.0f} min "
          "(rates measured at 10,000 studies on a quiet 2-core VM)", flush=True)
    if args.check:
        print("# --check: enough free space for it; nothing done")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    args.store_path = path = args.out / f"store-{args.studies}.zarr"
    lock = path.with_name(path.name + ".lock")
    if path.exists():
        marker = path / "zarr.json"
        if marker.exists() and json.loads(marker.read_text()).get("attributes", {}).get("format") == "wbs_dist.store":
            shutil.rmtree(path)                   # this bench's store of an earlier run: start afresh
        else:
            sys.exit(f"bench/store_scale: {path} exists and is not a wbs_dist store; not touching it")
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    try:
        b = build(path, args.studies, args.distinct, args.workers, args.seed)
        print(f"# built in {b['build_s']:.1f} s ({b['render_s']:.1f} s rendering {b['distinct']} studies before)",
              flush=True)
        tree = tree_counts(path)
        m = {phase: in_fresh_process(phase, args) for phase in ("open", "index", "cache", "plain", "store")}
    finally:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
            lock.unlink(missing_ok=True)
    wall = time.perf_counter() - t_all
    load1 = os.getloadavg()

    n, s_idx = args.studies, m["cache"]["studies"]
    per = {k: v / n for k, v in tree["studies"].items()}
    c, p, e = m["cache"], m["plain"], m["store"]
    rows = [  # what, count, seconds, rate unit, ratio
        (f"store build: batch writer, {n} studies ({args.workers} processes)", n, b["write_s"], "studies/s", None),
        ("lesion table rebuild", n, b["table_s"], "studies/s", None),
        ("folds (k 5, seed 0)", m["open"]["patients"], b["folds_s"], "patients/s", None),
        ("Store.open + lesion_table + folds read", m["open"]["lesions"], m["open"]["total_s"], "lesions/s", None),
        (f"lesion_index, folds {TRAIN_FOLDS[0]}-{TRAIN_FOLDS[-1]}", s_idx, m["index"]["index_s"], "studies/s", None),
        ("set-up: StudyCache.build (a batch's studies a read)", s_idx, c["build_s"], "studies/s", p["build_s"] / c["build_s"]),
        ("set-up: Store.training_level study by study, 1 thread", s_idx, p["build_s"], "studies/s", 1.0),
        ("epoch: per-sample reads from the cache", c["epoch_samples"], c["epoch_s"], "samples/s",
         e["epoch_s"] / c["epoch_s"]),
        ("epoch: per-sample reads from the store", e["epoch_samples"], e["epoch_s"], "samples/s", 1.0),
    ]
    host = machine()
    cache_state = sorted({v["cache_state"] for v in m.values()})
    warm = "page cache dropped before each measurement" if cache_state == ["dropped"] else \
        f"page cache WARM (drop: {'; '.join(cache_state)}): the store was just written"
    print(f"\n# bench/store_scale on {host}; {n} studies ({b['distinct']} distinct, rendered once), "
          f"{b['counts']['lesions']} lesions; training set {s_idx} studies, {c['samples']} lesions; "
          f"each measurement in a fresh process, {warm}; load average {load0[0]:.2f} at start, {load1[0]:.2f} at end")
    print(f"# per study: {per['files']:.1f} files + {per['folders']:.1f} folders = "
          f"{per['files'] + per['folders']:.1f} metadata objects, {per['bytes'] / 1e6:.3f} MB "
          f"({per['allocated'] / 1e6:.3f} MB allocated); store {tree['store']['allocated'] / 1e9:.2f} GB allocated; "
          f"study cache {c['cache_bytes'] / 1e9:.2f} GB; whole bench {wall / 60:.1f} min")
    print("\n| what | n | s | rate | ratio |\n|---|---:|---:|---:|---:|")
    for what, count, secs, unit, ratio in rows:
        print(f"| {what} | {count:,} | {secs:.2f} | {count / secs:,.0f} {unit} | "
              f"{'' if ratio is None else f'{ratio:.1f}x'} |")
    print("\nratios: set-up, study by study s / StudyCache s; epoch, store s / cache s (higher: the cache is faster)")
    result = {"machine": host, "studies": n, "distinct": b["distinct"], "workers": args.workers,
              "page_cache": cache_state, "loadavg_start": load0, "loadavg_end": load1, "wall_s": wall,
              "build": b, "per_study": per, "tree": tree, "measurements": m,
              "ratios": {"setup_plain_over_cache": p["build_s"] / c["build_s"],
                         "epoch_store_over_cache": e["epoch_s"] / c["epoch_s"]},
              "estimates_used": {"bytes_per_study": EST_BYTES_PER_STUDY, "seconds_per_study": EST_SECONDS_PER_STUDY,
                                 "seconds_fixed": EST_SECONDS_FIXED}, "estimate": est}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
