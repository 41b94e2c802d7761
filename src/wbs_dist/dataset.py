"""Which lesions a run uses, and a plain torch Dataset over the store for inspection and evaluation.

One sample is one lesion of an annotated study. Its input is the whole study at the training
resolution (anterior | posterior side by side, H x W) stacked on channels:

    channel 0   the image: train_image / count_scale (store.count_scale: 99th percentile of body counts)
    channel 1   this lesion's mask (1 inside, 0 outside)
    channel 2   the study's other lesions (1 inside any other lesion); `other_lesions_channel: false`
                drops it, so burden and neighbours are then invisible to the network

The DALI loader (loader.py) produces the same tensors, bit for bit, with augmentation off; the
training augmentation is a horizontal mirror of each view in place (the anterior stays left).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .folds import lesion_folds
from .store import LABELS, Store, StoreError, int_to_key


@dataclass
class LesionIndex:
    """The lesions of a split in a fixed order (study, lesion id), and what a sample needs."""

    store_path: Path
    height: int
    width: int
    other_lesions_channel: bool
    study_keys: list[str]          # the studies these lesions come from, sorted
    scale: np.ndarray              # float32 count_scale per study
    study: np.ndarray              # int32 index into study_keys, per lesion
    lesion_id: np.ndarray          # uint16
    label: np.ndarray              # float32, 1 malignant / 0 benign
    patient: np.ndarray            # uint64 pseudonym
    fold: np.ndarray               # int8
    view: np.ndarray               # int8 index into store.VIEWS
    tumor_type: np.ndarray         # int8 index into store.TUMOR_TYPES
    burden: np.ndarray             # int16 lesions in the study

    def __len__(self) -> int:
        return len(self.lesion_id)

    @property
    def channels(self) -> int:
        return 3 if self.other_lesions_channel else 2


def lesion_index(store: Store, folds: Sequence[int], height: int, width: int,
                 other_lesions_channel: bool = True) -> LesionIndex:
    """The lesions of `folds`, checked: each fold non-empty and holding both classes."""
    if (height, width) != store.train_size:
        h, w = store.train_size
        raise StoreError(f"the config asks for {height}x{width} inputs but store {store.path} holds its training "
                         f"level at {h}x{w}: set image_height={h} image_width={w}, or ingest into a new store "
                         f"with --train-size {height}x{width}")
    table = store.lesion_table()
    fold_of = lesion_folds(store, table)
    k = int(store.root["folds"].attrs["k"])
    for f in folds:
        if not 0 <= f < k:
            raise StoreError(f"fold {f} out of range: the store has folds 0..{k - 1}")
        sel = fold_of == f
        if not sel.any():
            raise StoreError(f"fold {f} has no lesions")
        classes = set(np.unique(table["label"][sel]).tolist())
        if len(classes) < 2:
            only = "malignant" if classes == {LABELS["malignant"]} else "benign"
            raise StoreError(f"fold {f} holds only {only} lesions: sensitivity/specificity and AUC are undefined; "
                             f"use fewer folds or a larger store")
    sel = np.isin(fold_of, np.asarray(folds))
    order = np.lexsort((table["lesion_id"][sel], table["study"][sel]))
    rows = {name: col[sel][order] for name, col in table.items()}
    studies, study_pos = np.unique(rows["study"], return_inverse=True)
    keys = [int_to_key(s) for s in studies]
    scale = np.array([store.study(key).attrs["count_scale"] for key in keys], np.float32)
    return LesionIndex(store.path, height, width, other_lesions_channel, keys, scale,
                       study_pos.astype(np.int32), rows["lesion_id"].astype(np.uint16),
                       rows["label"].astype(np.float32), rows["patient"], fold_of[sel][order].astype(np.int8),
                       rows["view"], rows["tumor_type"], rows["burden"])


def normalise(image: np.ndarray, scale: np.float32) -> np.ndarray:
    """Counts → network input. The one definition both loaders use, so they agree bit for bit."""
    return image / np.float32(scale)


def make_input(image: np.ndarray, labels: np.ndarray, lesion_id: int, other_lesions_channel: bool) -> np.ndarray:
    """(H, W) normalised image and label map → (C, H, W) float32 network input."""
    lid = np.uint16(lesion_id)
    chans = [image, (labels == lid).astype(np.float32)]
    if other_lesions_channel:
        chans.append(((labels != 0) & (labels != lid)).astype(np.float32))
    return np.stack(chans)


def mirror_views(x: np.ndarray) -> np.ndarray:
    """Mirror each view in place: (C, H, W) with two views side by side."""
    c, h, w = x.shape
    return np.ascontiguousarray(x.reshape(c, h, 2, w // 2)[..., ::-1].reshape(c, h, w))


class LesionDataset(torch.utils.data.Dataset):
    """Reads each sample from the Zarr store: simple and slow; for inspection and evaluation."""

    def __init__(self, index: LesionIndex):
        self.index = index
        self._store: Store | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        if self._store is None:  # opened lazily: each DataLoader worker gets its own handle
            self._store = Store.open(self.index.store_path)
        ix = self.index
        s = int(ix.study[i])
        g = self._store.study(ix.study_keys[s])
        image = normalise(g["train_image"][...], ix.scale[s])
        x = make_input(image, g["train_labels"][...], int(ix.lesion_id[i]), ix.other_lesions_channel)
        return {"x": torch.from_numpy(x), "y": torch.tensor(ix.label[i]), "index": torch.tensor(i)}
