"""The Zarr v3 store: atomic per-study writes, the store-wide lesion table, reads.

Layout (documented in the README; `zarr.open_group(path)` opens it):

    <store>/                      root group, attrs: format, version, train_size, counts
      studies/<study_key>/        one group per study; key = keyed hash of the Study Instance UID;
                                  attrs: patient pseudonym, views, lesions, tumour type, sources
        native                    (V, rows, cols) the views as acquired, in attrs.views order:
                                  source dtype, native byte order, lossless; one chunk per view
        labels                    (V, rows, cols) uint16 lesion label maps (annotated studies only)
        train_image               float32 (H, W): anterior | posterior side by side, area-resampled
                                  mean counts (zeros where a view is absent)
        train_labels              uint16 (H, W): the lesion label map at that resolution
      lesions/<column>            the lesion table, one 1-D array per column (codes in attrs)
      .staging/                   work in progress; never part of the store, cleared on start

A study is written under .staging/ and renamed into studies/ when complete, so a reader (or a rerun
after a crash) sees a study whole or not at all. The lesion table is rebuilt from the studies' attrs
at the end of every ingest and swapped in by rename, so it can never disagree with them for long.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle
from zarr.core.group import AsyncGroup
from zarr.core.sync import sync as zarr_sync

from wbs_dist.atomic import fsync_dir, publish_dir, sync_tree
from wbs_dist.errors import UsageError
from wbs_dist.lock import Lock, process_start_time
from wbs_dist.preprocess import count_scale, training_level
from wbs_dist.schema import BURDEN_GROUPS, BURDEN_TEXT, LABEL_CODES, TUMOR_TYPES, VIEWS, burden_group, view_order

if TYPE_CHECKING:
    from wbs_dist.data.studies import StudyData

FORMAT = "wbs_dist.store"
VERSION = 1

# Counts are small integers with long zero runs: bit-shuffle + zstd compresses them losslessly to
# well under the size of the DICOM files; level 1 compresses within 2 % of level 5 at a third of the
# time on these images (measured on synthetic views; see bench/ingest).
_CODEC = BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.bitshuffle)

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


async def _write_group(path: str, attrs: dict, arrays: dict[str, np.ndarray]) -> None:
    root = await AsyncGroup.from_store(path, attributes=attrs, zarr_format=3)
    # Whole-view chunks: a reader always wants a whole view. Empty chunks are written too, so every
    # study has the same files (and no per-chunk emptiness check is paid).
    # Flat chunk keys ("c.0.0.0", a file beside the array's zarr.json, not c/0/0/0): 16 files and
    # folders a study instead of 30, each a metadata object on a parallel filesystem and an fsync
    # before publishing (31 fsyncs, 4.8 s of a 22.5 s one-process ingest of 100 JPEG-LS studies).
    await asyncio.gather(*(
        root.create_array(name, data=arr, chunks=_chunks(arr), compressors=[_CODEC],
                          chunk_key_encoding={"name": "default", "separator": "."},
                          config={"write_empty_chunks": True})
        for name, arr in arrays.items()))


def _chunks(arr: np.ndarray) -> tuple[int, ...]:
    return (1, *arr.shape[1:]) if arr.ndim == 3 else arr.shape


def chunk_files(arrays: dict[str, np.ndarray]) -> list[str]:
    """The chunk files `_write_group` writes, relative to the study folder (one a view, one a 2-D array)."""
    return sorted(f"{name}/c.{i}.0.0" if arr.ndim == 3 else f"{name}/c.0.0"
                  for name, arr in arrays.items() for i in range(arr.shape[0] if arr.ndim == 3 else 1))


class StoreError(UsageError):
    """The store is missing, of another layout, or lacks what is asked of it."""


def key_to_int(key: str) -> int:
    return int(key, 16)


def int_to_key(value: int) -> str:
    return f"{int(value):016x}"


# The arrays of a study written before studies listed their own (attrs["arrays"]).
STUDY_ARRAYS = ("native", "train_image", "train_labels")


def store_lock(path: Path, what: str, mode: str = "exclusive") -> Lock:
    """One writer at a time: ingest and folds take STORE.lock exclusive; ingest shards (`--shard I/N`)
    take it shared, as they write disjoint studies and nothing store-wide. Beside the store, so that
    it can be taken before the store exists."""
    path = Path(path)
    return Lock(path.with_name(path.name + ".lock"), what, mode, subject=f"store {path}")


class Store:
    def __init__(self, path: Path, root: zarr.Group):
        self.path = Path(path)
        self.root = root

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
            raise StoreError(f"store {path} has layout version {ver}; this wbs-dist reads version {VERSION}")
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
            pid = folder.name.rsplit("-", 1)[1]
            if pid.isdigit() and process_start_time(int(pid)) is None:
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

    def study_keys(self) -> list[str]:
        d = self.path / "studies"
        return sorted(p.name for p in d.iterdir() if self._complete(p)) if d.exists() else []

    def has_study(self, key: str) -> bool:
        return self._complete(self.path / "studies" / key)

    @staticmethod
    def _complete(folder: Path) -> bool:
        """A study counts only when its attributes and every array it lists are there; a torn one (a
        crash of a filesystem without ordered renames, a concurrent writer of an older version) is
        written again by the next ingest."""
        try:
            attrs = json.loads((folder / "zarr.json").read_text()).get("attributes") or {}
        except (OSError, ValueError):
            return False
        if "views" not in attrs or "lesions" not in attrs:
            return False
        arrays = attrs.get("arrays") or STUDY_ARRAYS
        if not all((folder / name / "zarr.json").exists() for name in arrays):
            return False
        if "chunk_files" in attrs:             # flat chunk keys: every chunk file named, checked
            return all((folder / f).is_file() for f in attrs["chunk_files"])
        return all((folder / name / "c").is_dir() for name in arrays)     # stores written before them

    def study(self, key: str) -> zarr.Group:
        return zarr.open_group(str(self.path / "studies" / key), mode="r", zarr_format=3)

    def native_views(self, key: str) -> dict[str, np.ndarray]:
        g = self.study(key)
        native = g["native"][...]
        return dict(zip(g.attrs["views"], native))

    def native_study(self, key: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """A study's native views and lesion label maps by view (no maps: not annotated), one group open."""
        g = self.study(key)
        views = list(g.attrs["views"])
        labels = dict(zip(views, g["labels"][...])) if "labels" in g else {}
        return dict(zip(views, g["native"][...])), labels

    def write_study(self, data: "StudyData") -> bool:
        """Write a study atomically. False when it was already there (a concurrent or earlier run)."""
        final = self.path / "studies" / data.key
        if self._complete(final):
            return False
        image, labels = training_level(data.views, data.labels, *self.train_size)
        counts = np.bincount(labels.ravel())
        areas = {int(v): int(c) for v, c in enumerate(counts) if v and c}
        attrs = dict(data.attrs)
        attrs["count_scale"] = count_scale(image)
        attrs["lesions"] = [dict(les, area_train=areas.get(les["lesion_id"], 0)) for les in attrs.get("lesions", [])]
        names = sorted(data.views, key=view_order)
        # A study is one array per kind, not one per view: zarr-python's per-array cost, not I/O,
        # dominated ingest time with one array per view (bench/ingest).
        arrays = {"native": np.stack([data.views[v] for v in names]),
                  "train_image": image, "train_labels": labels}
        if data.labels:
            shape = data.views[names[0]].shape
            arrays["labels"] = np.stack([data.labels.get(v, np.zeros(shape, np.uint16)) for v in names])
        attrs["views"] = names
        attrs["arrays"] = sorted(arrays)
        attrs["chunk_files"] = chunk_files(arrays)

        tmp = self.staging() / f"{data.key}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        # One trip into zarr's event loop for the whole study: per-call sync overhead, not I/O, is
        # what a study costs when each array is created through the synchronous API.
        zarr_sync(_write_group(str(tmp), attrs, arrays))
        if final.exists() and not self._complete(final):
            torn = self.staging() / f"{data.key}.torn"
            os.rename(final, torn)
            shutil.rmtree(torn, ignore_errors=True)
        if not publish_dir(tmp, final):        # another worker won the race with the same study
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        return True

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
        for key in self.study_keys():
            attrs = json.loads((self.path / "studies" / key / "zarr.json").read_text())["attributes"]
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
            g.create_array(name, data=arr, chunks=(max(len(arr), 1),), compressors=[_CODEC])
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
