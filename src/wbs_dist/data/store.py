"""The Zarr v3 store: studies in atomically published batches, the store-wide lesion table, reads.

Layout (documented in the README; `zarr.open_group(path)` opens it):

    <store>/                      root group, attrs: format, version, train_size, counts
      studies/<batch>/            up to 64 studies a group, 4 arrays of one file each (data/batches.py):
                                  native views (source dtype, lossless), label maps, training level;
                                  attrs: each study's key (keyed hash of the Study Instance UID), patient
                                  pseudonym, views, lesions, tumour type, count scale, sources
      lesions/<column>            the lesion table, one 1-D array per column (codes in attrs)
      folds/                      the patient-grouped folds (data/folds.py)
      .staging/                   work in progress; never part of the store, cleared on start

A batch is written under .staging/ and renamed into studies/ when complete, so a reader (or a rerun
after a crash) sees its studies whole or not at all. The lesion table is rebuilt from the batches' attrs
at the end of every ingest and swapped in by rename, so it can never disagree with them for long.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import zarr

from wbs_dist.atomic import fsync_dir, sync_tree
from wbs_dist.data.batches import BATCH_STUDIES, CODEC, BatchWriter, batch_entries
from wbs_dist.errors import UsageError
from wbs_dist.lock import Lock, process_start_time
from wbs_dist.schema import BURDEN_GROUPS, BURDEN_TEXT, LABEL_CODES, TUMOR_TYPES, VIEWS, burden_group

log = logging.getLogger("wbs_dist.store")

FORMAT = "wbs_dist.store"
# 2: studies in batches (data/batches.py); 1 had a group a study. A version-1 store is refused with
# the advice to ingest again: the archive, not the store, is the source.
VERSION = 2

LESION_COLUMNS = {
    # name: (dtype, meaning)
    "study": ("uint64", "study key (keyed hash of the Study Instance UID), as an integer"),
    "patient": ("uint64", "patient pseudonym (keyed hash of the Patient ID), as an integer"),
    "lesion_id": ("int32", "lesion id within the study (the label-map value)"),
    "view": ("int8", "index into attrs.views"),
    "label": ("int8", "1 malignant, 0 benign"),
    "tumor_type": ("int8", "index into attrs.tumor_types"),
    "burden": ("int16", "number of lesions in the study"),
    "burden_group": ("int8", f"index into attrs.burden_groups ({BURDEN_TEXT})"),
    "area": ("int32", "lesion area in native pixels"),
    "area_train": ("int32", "lesion area at the training resolution"),
}


class StoreError(UsageError):
    """The store is missing, of another layout, or lacks what is asked of it."""


def key_to_int(key: str) -> int:
    return int(key, 16)


def int_to_key(value: int) -> str:
    return f"{int(value):016x}"


def store_lock(path: Path, what: str, mode: str = "exclusive") -> Lock:
    """One writer at a time: ingest and folds take STORE.lock exclusive; ingest shards (`--shard I/N`)
    take it shared, as they write disjoint studies and nothing store-wide. Beside the store, so that
    it can be taken before the store exists."""
    path = Path(path)
    return Lock(path.with_name(path.name + ".lock"), what, mode, subject=f"store {path}")


class _Batch:
    """A published batch's arrays, each opened once: a zarr group's `[name]` reads the array's zarr.json
    again every time, which per-study reads would pay twice a study."""

    def __init__(self, path: Path):
        self.path = path
        self._arrays: dict[str, zarr.Array] = {}

    def __getitem__(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = zarr.open_array(str(self.path / name), mode="r", zarr_format=3)
        return self._arrays[name]


class Store:
    def __init__(self, path: Path, root: zarr.Group):
        self.path = Path(path)
        self.root = root
        self._index: dict[str, tuple[str, int, dict]] | None = None     # key -> (batch, row, entry)
        self._batches: dict[str, _Batch] = {}

    # -- opening -----------------------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, path: Path, train_size: tuple[int, int]) -> "Store":
        path = Path(path)
        if path.exists() and (path / "zarr.json").exists():
            store = cls.open(path)
            have = tuple(store.root.attrs["train_size"])
            if have != tuple(train_size):
                raise StoreError(f"store {path} was made with train size {have[0]}x{have[1]}, "
                                 f"not {train_size[0]}x{train_size[1]}; use a new store")
            return store
        if path.exists() and any(path.iterdir()):
            raise StoreError(f"{path} exists and is not a wbs_dist store; refusing to write into it")
        # Made beside the store and renamed into place: shards starting together on a new store all
        # try to create it, one rename wins, and the others open the winner's (never a half-made root).
        tmp = path.with_name(f".{path.name}.new.{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        root.attrs.update({"format": FORMAT, "version": VERSION, "train_size": list(train_size),
                           "views": list(VIEWS), "normalisation": "train_image holds mean counts per pixel; loaders divide by the study's count_scale (99th percentile of body counts)"})
        root.create_group("studies")
        sync_tree(tmp)
        try:
            os.rename(tmp, path)               # onto nothing, or onto an empty folder
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if path.is_dir() and any(path.iterdir()):   # another process's store is there now
                return cls.create_or_open(path, train_size)
            raise StoreError(f"cannot create store {path}: {exc}") from None
        fsync_dir(path.parent)
        return cls.open(path)

    @classmethod
    def open(cls, path: Path) -> "Store":
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise StoreError(f"no store at {path} (run `wbs-dist ingest` first)")
        try:
            root = zarr.open_group(str(path), mode="r+", zarr_format=3)
        except Exception as exc:
            raise StoreError(f"{path}: not a readable Zarr v3 group ({exc})")
        fmt, ver = root.attrs.get("format"), root.attrs.get("version")
        if fmt != FORMAT:
            raise StoreError(f"{path} is a Zarr group but not a wbs_dist store (format {fmt!r})")
        if ver != VERSION:
            raise StoreError(f"store {path} has layout version {ver}; this wbs-dist reads version {VERSION}: "
                             "ingest the archive again into a new store")
        return cls(path, root)

    # -- studies -------------------------------------------------------------------------------------
    @property
    def train_size(self) -> tuple[int, int]:
        h, w = self.root.attrs["train_size"]
        return int(h), int(w)

    def staging(self) -> Path:
        """This process's own staging folder: concurrent writers (ingest shards) never share one."""
        p = self.path / ".staging" / f"{socket.gethostname()}-{os.getpid()}"
        p.mkdir(parents=True, exist_ok=True)
        return p

    def claim_secret(self, check: str) -> None:
        """Record which site secret the store's keys are made under (deid.secret_check), or refuse
        another: the same patient under two secrets is two patients, who could land in two folds."""
        have = self.root.attrs.get("secret_check")
        if have is None:
            self.root.attrs["secret_check"] = check
        elif have != check:
            raise StoreError(f"store {self.path} was ingested under another secret file: its pseudonyms would not "
                             "match these, and one patient would become two. Use the secret it was made with "
                             "(--secret-file or $WBS_DIST_SECRET_FILE), or a new store")

    def clear_staging(self) -> None:
        """Remove every run's leftovers; only under the store's exclusive lock (no other writer)."""
        shutil.rmtree(self.path / ".staging", ignore_errors=True)

    def clear_dead_staging(self) -> None:
        """Remove the staging folders of this host's processes that are gone (a killed shard's), under
        the shared lock: live writers' folders, and other hosts', are left to the finalize."""
        host = socket.gethostname()
        for folder in (self.path / ".staging").glob(f"{host}-*"):
            owner, _, pid = folder.name.rpartition("-")
            # The host exactly: a host named "<host>-2" is another machine, whose pids mean nothing here.
            if owner == host and pid.isdigit() and process_start_time(int(pid)) is None:
                shutil.rmtree(folder, ignore_errors=True)

    def retire_lesion_table(self) -> None:
        """Take the lesion table away before a shard adds studies: until the finalize rebuilds it, a
        reader is told the ingest did not finish rather than given a table that misses studies."""
        aside = self.staging() / f"lesions.retired.{os.getpid()}"
        try:
            os.rename(self.path / "lesions", aside)
        except FileNotFoundError:               # none yet, or another shard took it first
            return
        shutil.rmtree(aside, ignore_errors=True)

    # The index: which batch holds which study. Read from the batches' attrs (one small JSON file for up
    # to 64 studies) the first time it is needed, and kept up to date by this process's own writer.
    def refresh(self) -> None:
        """Read the index again (other processes may have published batches since)."""
        index: dict[str, tuple[str, int, dict]] = {}
        folder = self.path / "studies"
        for batch in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.exists() else []:
            entries = batch_entries(batch)
            if entries is None:
                log.warning("store %s: batch %s is not whole (a file missing); its studies are not read, and the "
                            "next ingest writes them again", self.path, batch.name)
            for row, entry in enumerate(entries or []):
                index.setdefault(entry["key"], (batch.name, row, entry))   # first batch wins a (rare) repeat
        self._index = index

    def _entries(self) -> dict[str, tuple[str, int, dict]]:
        if self._index is None:
            self.refresh()
        return self._index

    def indexed(self, batch: str, entries: list[dict]) -> None:
        """A batch this process has just published (BatchWriter); an index not read yet will read it."""
        if self._index is not None:
            for row, entry in enumerate(entries):
                self._index.setdefault(entry["key"], (batch, row, entry))

    def study_keys(self) -> list[str]:
        return sorted(self._entries())

    def has_study(self, key: str) -> bool:
        return key in self._entries()

    def clear_torn_batches(self) -> None:
        """Remove batches that are not whole; only under the store's exclusive lock (no other writer)."""
        folder = self.path / "studies"
        for batch in (p for p in folder.iterdir() if p.is_dir()) if folder.exists() else []:
            if batch_entries(batch) is None:
                torn = self.staging() / f"{batch.name}.torn"
                os.rename(batch, torn)
                shutil.rmtree(torn, ignore_errors=True)
        self._index = None

    def _place(self, key: str) -> tuple["_Batch", int, dict]:
        try:
            batch, row, entry = self._entries()[key]
        except KeyError:
            raise StoreError(f"store {self.path} has no study {key}") from None
        if batch not in self._batches:
            self._batches[batch] = _Batch(self.path / "studies" / batch)
        return self._batches[batch], row, entry

    def study_attrs(self, key: str) -> dict:
        """A study's attributes: patient, views, lesions, tumour type, count_scale, sources, ..."""
        return self._place(key)[2]["attrs"]

    def native_views(self, key: str) -> dict[str, np.ndarray]:
        return self.native_study(key)[0]

    def native_study(self, key: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """A study's native views and lesion label maps by view (no maps: not annotated)."""
        g, _, entry = self._place(key)
        p, shapes, views = entry["plane"], entry["shapes"], entry["attrs"]["views"]

        def planes(name: str) -> dict[str, np.ndarray]:
            block = g[name][p:p + len(shapes)]
            return {v: np.ascontiguousarray(block[i, :r, :c]) for i, (v, (r, c)) in enumerate(zip(views, shapes))}

        return planes("native"), planes("labels") if entry["has_labels"] else {}

    def training_level(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """A study's stored training image (mean counts, not normalised) and label map."""
        g, row, _ = self._place(key)
        return g["train_image"][row], g["train_labels"][row]

    def training_levels(self, keys: Iterable[str]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(position in `keys`, training image, label map) for every key, a batch at a time: the rows a
        batch holds are one read of its shard (bench/store_scale measures what that saves)."""
        by_batch: dict[str, list[tuple[int, int]]] = {}
        for i, key in enumerate(keys):
            batch, row, _ = self._place(key)             # opens the batch once; names a missing key
            by_batch.setdefault(batch.path.name, []).append((i, row))
        for batch, wanted in by_batch.items():
            g = self._batches[batch]
            # One contiguous slice over the rows wanted: zarr 3.1's orthogonal selection of the same rows
            # took 3-60x longer on a sharded array (64 rows of 512 x 256: 0.68-3.7 s against 0.056 s).
            lo, hi = min(row for _, row in wanted), max(row for _, row in wanted) + 1
            images, labels = g["train_image"][lo:hi], g["train_labels"][lo:hi]
            for i, row in wanted:
                yield i, images[row - lo], labels[row - lo]

    def writer(self, batch_studies: int | None = None) -> BatchWriter:
        """The writer that adds studies to this store (`with store.writer() as w: w.add(prepared)`)."""
        return BatchWriter(self, batch_studies or BATCH_STUDIES)

    # -- store-wide groups, replaced whole ------------------------------------------------------------
    def staged_group(self, name: str) -> zarr.Group:
        """An empty group under .staging/ to build `name` in; `swap_in(name)` publishes it."""
        tmp = self.staging() / f"{name}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        return zarr.open_group(str(tmp), mode="w", zarr_format=3)

    def swap_in(self, name: str) -> None:
        """Replace store/<name> by its staged copy with two renames: a reader sees the old or the new
        group, never a mix (a crash between them leaves none, and the rerun rebuilds it)."""
        final = self.path / name
        staged = self.staging() / f"{name}.{os.getpid()}"
        old = self.staging() / f"{name}.old.{os.getpid()}"
        sync_tree(staged)
        if final.exists():
            os.rename(final, old)
        os.rename(staged, final)
        fsync_dir(self.path)
        shutil.rmtree(old, ignore_errors=True)

    # -- lesion table ----------------------------------------------------------------------------------
    def lock(self, what: str, mode: str = "exclusive") -> Lock:
        """The store's writer lock (beside it: STORE.lock), see `store_lock`."""
        return store_lock(self.path, what, mode)

    def rebuild_lesion_table(self) -> dict:
        cols: dict[str, list] = {name: [] for name in LESION_COLUMNS}
        n_studies = n_annotated = 0
        self.refresh()                          # shards may have published batches since this process looked
        for key in self.study_keys():
            attrs = self.study_attrs(key)
            n_studies += 1
            lesions = attrs.get("lesions") or []
            if attrs.get("annotated"):
                n_annotated += 1
            for les in lesions:
                cols["study"].append(key_to_int(key))
                cols["patient"].append(key_to_int(attrs["patient"]))
                cols["lesion_id"].append(les["lesion_id"])
                cols["view"].append(VIEWS.index(les["view"]))
                cols["label"].append(LABEL_CODES[les["label"]])
                cols["tumor_type"].append(TUMOR_TYPES.index(attrs["tumor_type"]))
                cols["burden"].append(len(lesions))
                cols["burden_group"].append(BURDEN_GROUPS.index(burden_group(len(lesions))))
                cols["area"].append(les["area"])
                cols["area_train"].append(les["area_train"])
        g = self.staged_group("lesions")
        g.attrs.update({"views": list(VIEWS), "tumor_types": list(TUMOR_TYPES), "burden_groups": list(BURDEN_GROUPS),
                        "labels": {str(code): name for name, code in LABEL_CODES.items()},
                        "columns": {k: v[1] for k, v in LESION_COLUMNS.items()}, "rows": len(cols["study"])})
        for name, (dtype, _) in LESION_COLUMNS.items():
            arr = np.asarray(cols[name], dtype=dtype)
            g.create_array(name, data=arr, chunks=(max(len(arr), 1),), compressors=[CODEC])
        self.swap_in("lesions")
        counts = {"studies": n_studies, "annotated_studies": n_annotated, "lesions": len(cols["study"]),
                  "malignant_lesions": int(sum(cols["label"]))}
        self.root.attrs["counts"] = counts
        return counts

    def lesion_table(self) -> dict[str, np.ndarray]:
        if not (self.path / "lesions" / "zarr.json").exists():
            raise StoreError(f"store {self.path} has no lesion table (ingest did not finish; rerun it)")
        g = zarr.open_group(str(self.path / "lesions"), mode="r", zarr_format=3)
        return {name: g[name][:] for name in LESION_COLUMNS}
