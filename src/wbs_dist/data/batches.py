"""Study batches: how the store lays studies out on disk, a few files for many studies.

A batch is one Zarr group under `studies/`, written by one process and published by one rename, holding
up to `BATCH_STUDIES` studies (fewer when their pixels pass `BATCH_BYTES`, or at the end of a run):

    studies/<batch>/         attrs: studies = [{key, attrs, plane, shapes, has_labels}, ...] in row order,
                             shard_files (every file the arrays must have)
      native                 (P, R, C) every view of the batch's studies, in the source dtype, lossless,
                             each padded with zeros to the batch's largest view (R, C); a study's views
                             are planes plane .. plane + len(shapes) - 1, its own sizes in `shapes`
      labels                 (P, R, C) uint16 lesion label maps, plane for plane (zeros: no annotation)
      train_image            (n, H, W) float32: the training level, row = the study's place in `studies`
      train_labels           (n, H, W) uint16

Each array is one file: Zarr v3's sharding codec puts all its chunks (one a view, one a training image)
in a single shard with an index, so a whole view is still read alone (one chunk's bytes, found through
the index), and a loader reads a batch's training level in one request. 9 files and 5 folders a batch:
at 64 studies 0.22 metadata objects a study, against 16 with a group per study (bench/store_scale),
which is what parallel filesystems ask of their users (Lustre, GPFS: few, larger files).

Why batches and not one store-wide array: writers run in parallel (ingest workers, shards on several
nodes), and a shard file shared by two writers would be rewritten by both. A batch has one writer and is
immutable once published, so atomicity stays per batch, as it was per study: a reader, or a rerun after
a kill, sees a batch whole or not at all, and a kill loses at most the batch being filled.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from zarr.codecs import BloscCodec, BloscShuffle
from zarr.core.group import AsyncGroup
from zarr.core.sync import sync as zarr_sync

from wbs_dist.atomic import publish_dir
from wbs_dist.preprocess import count_scale, training_level
from wbs_dist.schema import view_order

if TYPE_CHECKING:
    from wbs_dist.data.store import Store
    from wbs_dist.data.studies import StudyData

# Counts are small integers with long zero runs: bit-shuffle + zstd compresses them losslessly to
# well under the size of the DICOM files; level 1 compresses within 2 % of level 5 at a third of the
# time on these images (measured on synthetic views; see bench/ingest).
CODEC = BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.bitshuffle)
# The training image is float32 mean counts: byte shuffle groups exponents and mantissa bytes better
# than bit shuffle there (100 JPEG-LS bench studies at 512 x 256: 7.3 MB against 8.2 MB, and faster).
FLOAT_CODEC = BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.shuffle)

# 64 studies of two 1024 x 256 views make a native shard of ~20 MB: large for a metadata server, small
# for a stripe. The byte bound keeps a writer's buffer small for large matrices (2048 x 512 views).
BATCH_STUDIES = 64
BATCH_BYTES = 256 << 20
ARRAYS = ("native", "labels", "train_image", "train_labels")


@dataclass
class StoredStudy:
    """A study as the store keeps it: its attributes, native views and label maps in view order, and
    its training level. Made in the decoding worker (`prepare`); written by the run's one writer."""

    key: str
    attrs: dict
    native: list[np.ndarray]
    labels: list[np.ndarray] | None            # None: not annotated
    train_image: np.ndarray
    train_labels: np.ndarray

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.native) * (2 if self.labels else 1) + \
            self.train_image.nbytes + self.train_labels.nbytes


def prepare(data: "StudyData", train_size: tuple[int, int]) -> StoredStudy:
    """A decoded study's stored form: training level, count scale, lesion areas at that level."""
    image, labels = training_level(data.views, data.labels, *train_size)
    counts = np.bincount(labels.ravel())
    areas = {int(v): int(c) for v, c in enumerate(counts) if v and c}
    names = sorted(data.views, key=view_order)
    attrs = dict(data.attrs, views=names, count_scale=count_scale(image))
    attrs["lesions"] = [dict(les, area_train=areas.get(les["lesion_id"], 0)) for les in attrs.get("lesions", [])]
    native = [data.views[v] for v in names]
    maps = [data.labels.get(v, np.zeros(native[i].shape, np.uint16)) for i, v in enumerate(names)] \
        if data.labels else None
    return StoredStudy(data.key, attrs, native, maps, image, labels)


def batch_entries(folder: Path) -> list[dict] | None:
    """A published batch's study entries, or None when it is not whole: its attributes unreadable, or
    a file its arrays need missing (a crash on a filesystem that does not order renames; zarr would read
    a lost shard as zeros)."""
    try:
        attrs = json.loads((folder / "zarr.json").read_text()).get("attributes") or {}
    except (FileNotFoundError, ValueError):
        return None
    except OSError as exc:     # EACCES, EIO, ESTALE: not a torn batch, and never one to remove
        raise OSError(exc.errno, f"cannot read the store's batch {folder / 'zarr.json'}: {exc.strerror}") from None
    studies, files = attrs.get("studies"), attrs.get("shard_files")
    if not isinstance(studies, list) or not isinstance(files, list):
        return None
    if not all((folder / f).is_file() for f in files) or not all((folder / a / "zarr.json").is_file() for a in ARRAYS):
        return None
    return studies


def _stack(planes: list[np.ndarray], dtype) -> np.ndarray:
    rows, cols = max(p.shape[0] for p in planes), max(p.shape[1] for p in planes)
    out = np.zeros((len(planes), rows, cols), dtype)
    for i, p in enumerate(planes):
        out[i, :p.shape[0], :p.shape[1]] = p
    return out


async def _write_group(path: str, attrs: dict, arrays: dict[str, np.ndarray]) -> None:
    root = await AsyncGroup.from_store(path, attributes=attrs, zarr_format=3)
    # One chunk a view (or a training image), all of an array's chunks in one shard file. Empty chunks
    # are written too, so every batch has the same files (and no per-chunk emptiness check is paid).
    await asyncio.gather(*(
        root.create_array(name, data=arr, chunks=(1, *arr.shape[1:]), shards=arr.shape,
                          compressors=[FLOAT_CODEC if arr.dtype.kind == "f" else CODEC],
                          chunk_key_encoding={"name": "default", "separator": "."},
                          config={"write_empty_chunks": True})
        for name, arr in arrays.items()))


def write_batch(folder: Path, studies: list[StoredStudy]) -> list[dict]:
    """Write `studies` as a batch group at `folder` (unpublished); its study entries."""
    planes, maps, entries = [], [], []
    for s in studies:
        entries.append({"key": s.key, "attrs": s.attrs, "plane": len(planes), "has_labels": s.labels is not None,
                        "shapes": [list(p.shape) for p in s.native]})
        planes += s.native
        maps += s.labels if s.labels is not None else [np.zeros(p.shape, np.uint16) for p in s.native]
    arrays = {"native": _stack(planes, planes[0].dtype), "labels": _stack(maps, np.uint16),
              "train_image": np.stack([s.train_image for s in studies]),
              "train_labels": np.stack([s.train_labels for s in studies])}
    attrs = {"studies": entries, "shard_files": [f"{name}/c.0.0.0" for name in ARRAYS]}
    # One trip into zarr's event loop for the whole batch: per-call sync overhead, not I/O, is what
    # small writes cost through the synchronous API.
    zarr_sync(_write_group(str(folder), attrs, arrays))
    return entries


class BatchWriter:
    """Collects prepared studies and publishes them a batch at a time; one per writing process (never
    two on one study: ingest's workers get disjoint studies, its shards disjoint hashes).

    `with store.writer() as w: w.add(study)`: leaving the block normally publishes what is left; on an
    exception (a SIGTERM turned into one) the unpublished studies are dropped, and the rerun redoes them.
    Studies of another native dtype or view size go to other batches.""" 

    def __init__(self, store: "Store", batch_studies: int = BATCH_STUDIES, batch_bytes: int = BATCH_BYTES):
        if batch_studies < 1:
            raise ValueError(f"batch_studies must be >= 1 (got {batch_studies})")
        self.store, self.batch_studies, self.batch_bytes = store, batch_studies, batch_bytes
        self._open: dict[tuple, list[StoredStudy]] = {}
        self._keys: set[str] = set()
        self.published = 0                      # studies published by this writer

    def add(self, study: StoredStudy) -> bool:
        """Queue a study the store lacks (its caller checks `has_study`: a writer does not read the
        store's index, which at 100,000 studies is worth not loading in every worker); False when this
        writer has it already."""
        if study.key in self._keys:
            return False
        self._keys.add(study.key)
        # One dtype and one view size a batch: an array has one dtype, and a 2048 x 512 study among
        # 1024 x 256 ones would pad every plane of the batch to its size (4x the memory and the reads).
        kind = (np.dtype(study.native[0].dtype).str, tuple(max(p.shape[i] for p in study.native) for i in (0, 1)))
        buf = self._open.setdefault(kind, [])
        buf.append(study)
        if len(buf) >= self.batch_studies or sum(s.nbytes for s in buf) >= self.batch_bytes:
            self._publish(buf)
        return True

    def flush(self) -> None:
        for buf in self._open.values():
            if buf:
                self._publish(buf)

    def _publish(self, buf: list[StoredStudy]) -> None:
        name = secrets.token_hex(8)
        tmp = self.store.staging() / f"batch-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        entries = write_batch(tmp, buf)
        if not publish_dir(tmp, self.store.path / "studies" / name):     # 64 random bits: never seen
            raise FileExistsError(f"batch {self.store.path / 'studies' / name} exists already; not replaced")
        self.store.indexed(name, entries)
        self.published += len(buf)
        buf.clear()

    def __enter__(self) -> "BatchWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.flush()
        self._open.clear()
