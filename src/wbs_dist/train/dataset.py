"""Which lesions a run uses, and a plain torch Dataset over the store for inspection and evaluation.

One sample is one lesion of an annotated study; its input is the whole study at the training
resolution with the lesion's masks on further channels (wbs_dist.preprocess defines it). The DALI
loader (loader.py) produces the same tensors, bit for bit, with augmentation off; the training
augmentation is a horizontal mirror of each view in place (the anterior stays left).

Non-lesions (config key non_lesions, off by default): a scored archive's lesions are the scorer's
candidates, most of them normal anatomy the study's classifier never saw in training. With
non_lesions N, each training study gains up to N of the hot-spot finder's candidates that match no
delineated lesion (`with_non_lesions`) as benign lesions of its own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from wbs_dist.config import Config, Size
from wbs_dist.data.folds import lesion_folds
from wbs_dist.data.store import Store, StoreError, int_to_key
from wbs_dist.detection import COPY, false_components, with_copies
from wbs_dist.errors import ConfigError
from wbs_dist.finder import find_candidates
from wbs_dist.preprocess import input_channels, make_input, normalise, training_level
from wbs_dist.schema import BENIGN, LABEL_CODES, MALIGNANT, VIEWS
from wbs_dist.train import ddp

log = logging.getLogger("wbs_dist.dataset")


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
    view: np.ndarray               # int8 index into schema.VIEWS
    tumor_type: np.ndarray         # int8 index into schema.TUMOR_TYPES
    burden: np.ndarray             # int16 lesions in the study
    # study -> (flat pixel positions, ids): non-lesions painted over the stored label map's background
    painted: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.lesion_id)

    @property
    def channels(self) -> int:
        return input_channels(self.other_lesions_channel)

    def study_arrays(self, store: Store, s: int) -> tuple[np.ndarray, np.ndarray]:
        """Study s's normalised training image and label map, as ingest stored them."""
        image, labels = store.training_level(self.study_keys[s])
        return normalise(image, self.scale[s]), self._painted(s, labels)

    def each_study(self, store: Store) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(s, study_arrays(store, s)) for every study, in the store's order: a batch's studies in one read."""
        for s, image, labels in store.training_levels(self.study_keys):
            yield s, normalise(image, self.scale[s]), self._painted(s, labels)

    def _painted(self, s: int, labels: np.ndarray) -> np.ndarray:
        if s not in self.painted:
            return labels
        where, ids = self.painted[s]
        labels = np.array(labels, dtype=np.uint16, copy=True)
        labels.reshape(-1)[where] = ids
        return labels


def lesion_index(store: Store, folds: Sequence[int], size: tuple[int, int],
                 other_lesions_channel: bool = True) -> LesionIndex:
    """The lesions of `folds`, checked: each fold non-empty and holding both classes."""
    size = Size(*size)
    if size != store.train_size:
        have = Size(*store.train_size)
        raise StoreError(f"the config asks for {size} inputs but store {store.path} holds its training level at "
                         f"{have}: set train_size={have}, or ingest into a new store with --train-size {size}")
    height, width = size
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
            only = MALIGNANT if classes == {LABEL_CODES[MALIGNANT]} else BENIGN
            raise StoreError(f"fold {f} holds only {only} lesions: sensitivity/specificity and AUC are undefined; "
                             f"use fewer folds or a larger store")
    sel = np.isin(fold_of, np.asarray(folds))
    order = np.lexsort((table["lesion_id"][sel], table["study"][sel]))
    rows = {name: col[sel][order] for name, col in table.items()}
    studies, study_pos = np.unique(rows["study"], return_inverse=True)
    keys = [int_to_key(s) for s in studies]
    scale = np.array([store.study_attrs(key)["count_scale"] for key in keys], np.float32)
    return LesionIndex(store.path, height, width, other_lesions_channel, keys, scale,
                       study_pos.astype(np.int32), rows["lesion_id"].astype(np.uint16),
                       rows["label"].astype(np.float32), rows["patient"], fold_of[sel][order].astype(np.int8),
                       rows["view"], rows["tumor_type"], rows["burden"])


def study_non_lesions(views: dict[str, np.ndarray], image: np.ndarray, labels: np.ndarray, per_study: int
                      ) -> list[tuple[str, np.ndarray]]:
    """Up to `per_study` of a study's hot-spot finder candidates (finder.py, on its native `views` by
    slot) that match no delineated lesion nor a lesion's other-view appearance (detection.py's rule,
    at the training level of `image` and `labels`), hottest first: (view, flat pixel positions at
    the training level where no lesion is delineated), each non-empty."""
    views = {v: a for v, a in views.items() if v in VIEWS}
    found, regions = find_candidates(views)
    height, width = labels.shape
    proposed = training_level({}, found, height, width)[1]
    false = set(false_components(proposed, with_copies(labels, image)))
    background = np.asarray(labels).reshape(-1) == 0
    out = []
    for region in sorted((r for r in regions if r.label in false), key=lambda r: (-r.peak, r.label)):
        where = np.flatnonzero((proposed.reshape(-1) == region.label) & background)
        if where.size:
            out.append((region.view, where))
        if len(out) == per_study:
            break
    return out


def with_non_lesions(index: LesionIndex, store: Store, per_study: int, world: int = 1, rank: int = 0) -> LesionIndex:
    """`index` with up to `per_study` non-lesions of each of its studies (`study_non_lesions`) as benign
    lesions of that study: ids after its highest lesion id, painted into its label map (`painted`),
    rows beside its lesions (same patient, fold, tumour type and burden). Ranks share the finder's
    work (0.2 s a study on one core) and gather the result, so every rank holds the same index."""
    started = time.monotonic()
    mine = {}
    for s in range(rank, len(index.study_keys), world):
        key = index.study_keys[s]
        views, _ = store.native_study(key)
        image, labels = store.training_level(key)
        first = int(labels.max()) + 1
        if first + per_study > COPY:
            raise ConfigError(f"config key 'non_lesions': study {key} has lesion ids up to {first - 1}; non-lesions "
                              f"take ids after them, below {COPY}: set non_lesions=0 for this store")
        try:
            mine[s] = (first, study_non_lesions(views, image, labels, per_study))
        except ValueError as exc:
            raise StoreError(f"study {key}: {exc}") from exc
    found = {}
    for box in ddp.all_gather_objects(mine) or [mine]:
        found.update(box)
    cols = ("study", "lesion_id", "label", "patient", "fold", "view", "tumor_type", "burden")
    parts = {name: [getattr(index, name)] for name in cols}
    first_row = {int(s): i for i, s in reversed(list(enumerate(index.study)))}
    painted = {}
    for s, (first, regions) in sorted(found.items()):
        if not regions:
            continue
        ids = np.arange(first, first + len(regions), dtype=np.uint16)
        painted[s] = (np.concatenate([where for _, where in regions]),
                      np.concatenate([np.full(where.size, i, np.uint16) for i, (_, where) in zip(ids, regions)]))
        like = first_row[s]
        n = len(regions)
        parts["study"].append(np.full(n, s, index.study.dtype))
        parts["lesion_id"].append(ids)
        parts["label"].append(np.zeros(n, index.label.dtype))
        parts["view"].append(np.array([VIEWS.index(v) for v, _ in regions], index.view.dtype))
        for name in ("patient", "fold", "tumor_type", "burden"):
            parts[name].append(np.repeat(getattr(index, name)[like:like + 1], n))
    merged = {name: np.concatenate(p) for name, p in parts.items()}
    order = np.lexsort((merged["lesion_id"], merged["study"]))
    added = len(order) - len(index)
    log.info("non_lesions: %d hot-spot finder candidates of %d training studies added as benign lesions (%.1f a "
             "study; %d delineated lesions), %.0f s", added, len(index.study_keys),
             added / max(len(index.study_keys), 1), len(index), time.monotonic() - started)
    return replace(index, painted=painted, **{name: col[order] for name, col in merged.items()})


def training_folds(cfg: Config, fold: int) -> list[int]:
    """The folds a fold trains on: every other fold but a nested run's outer fold (config key
    outer_fold), which the run never sees."""
    if not 0 <= fold < cfg.folds:
        raise ConfigError(f"--fold {fold} out of range: config key 'folds' is {cfg.folds} (0..{cfg.folds - 1})")
    if cfg.outer_fold >= cfg.folds or cfg.outer_fold == fold:
        raise ConfigError(f"config key 'outer_fold' ({cfg.outer_fold}): must be -1 or another fold than --fold "
                          f"{fold} among 0..{cfg.folds - 1}")
    return [f for f in range(cfg.folds) if f not in (fold, cfg.outer_fold)]


def fold_indices(store: Store, cfg: Config, fold: int) -> tuple[LesionIndex, LesionIndex]:
    """(training, validation) lesions of fold `fold`: validation is the fold, training its
    training_folds."""
    return (lesion_index(store, training_folds(cfg, fold), cfg.train_size, cfg.other_lesions_channel),
            lesion_index(store, [fold], cfg.train_size, cfg.other_lesions_channel))


class StoreDataset(torch.utils.data.Dataset):
    """Samples read straight from the Zarr store (simple and slow: for inspection, evaluation and as
    the DALI loaders' reference); `index` has `store_path`, `study_keys` and a length."""

    def __init__(self, index):
        self.index = index
        self._store: Store | None = None

    def __len__(self) -> int:
        return len(self.index)

    def store(self) -> Store:
        if self._store is None:  # opened lazily: each DataLoader worker gets its own handle
            self._store = Store.open(self.index.store_path)
        return self._store


class LesionDataset(StoreDataset):
    """One lesion's network input a sample."""

    def __getitem__(self, i: int) -> dict:
        ix = self.index
        s = int(ix.study[i])
        image, labels = ix.study_arrays(self.store(), s)
        x = make_input(image, labels, int(ix.lesion_id[i]), ix.other_lesions_channel)
        return {"x": torch.from_numpy(x), "y": torch.tensor(ix.label[i]), "index": torch.tensor(i)}
