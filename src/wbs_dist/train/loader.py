"""The DALI loader: lesions of a split → batches of (C, H, W) inputs, sharded by global rank.

Data path: at start the split's studies are read once from the Zarr store into a study cache
(memory-mapped files in a private temporary folder: each view of the normalised training image and
of the label map, so per-sample reads are slices, shared between DALI's worker processes through
the page cache). A batch-mode `fn.external_source` (parallel workers) hands DALI per-sample
(image, label map, lesion id, flip flag); the DALI graph builds the lesion and other-lesion masks,
stacks channels and mirrors each view for augmentation (views side by side).

Two graphs compute the same samples, bit for bit (tests/test_loader.py):
  portable   stock DALI operators (arithmetic expressions, stack, flip); runs on the GPU when a
             CUDA device is given, where the host only ships image and label map (a third of the
             sample) and the GPU composes the channels
  fused      on CPU cores: one operator (lesion_op.py) that writes each output element once; the
             stock operators each pass over the whole sample and leave a CPU loader bound by
             memory traffic (bench/loader.py measures both)

Batches on the CPU are zero-copy views of DALI's output buffers, which DALI reuses: a batch is
valid until the next one is drawn (the contract of DALI's own `Pipeline.run`). A training step uses
its batch before asking for the next; `.clone()` what must outlive that. Copying every batch out
would halve a CPU loader's throughput.

Sharding (DESIGN 5): the epoch's order is a permutation of all samples from (seed, epoch), the same
on every rank; it is padded to whole global batches and step s of rank r takes positions
[s*G + r*b, s*G + (r+1)*b) (G global batch, b = G / world). Every rank runs the same number of
steps, so DDP never waits on a rank that ran out; padded positions carry valid = 0 and must never
reach the loss or the metrics. Flip flags are drawn per global position from (seed, epoch), so a
sample's augmentation does not depend on the number of ranks. A loader built with (start_epoch,
start_step) yields exactly the remaining batches of that epoch, then whole epochs.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wbs_dist import scratch
from wbs_dist.data.store import Store
from wbs_dist.errors import UsageError
from wbs_dist.train.dataset import LesionIndex


# -- which samples, in which order ------------------------------------------------------------------
def steps_per_epoch(n: int, global_batch: int) -> int:
    return max(1, math.ceil(n / global_batch))


def epoch_plan(n: int, global_batch: int, world: int, rank: int, seed: int, epoch: int, shuffle: bool,
               flip_p: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample index, valid, flip) arrays of shape (steps, global_batch / world) for this rank."""
    if global_batch % world:
        raise UsageError(f"config key 'batch_size': {global_batch} is not divisible by the {world} ranks")
    steps = steps_per_epoch(n, global_batch)
    rng = np.random.default_rng([seed, epoch, 0xB0E])
    order = rng.permutation(n) if shuffle else np.arange(n)
    total = steps * global_batch
    padded = np.resize(order, total)                         # wraps around: padding repeats samples
    valid = (np.arange(total) < n).astype(np.float32)
    flip = (np.random.default_rng([seed, epoch, 0xF11]).random(total) < flip_p).astype(np.int32)
    b = global_batch // world

    def mine(a):
        return a.reshape(steps, world, b)[:, rank]

    return mine(padded), mine(valid), mine(flip)


# -- the study cache --------------------------------------------------------------------------------
@dataclass
class StudyCache:
    """The split's studies as (S, H, W) memory maps: normalised image (float32), labels (uint16), as
    the index makes them (`study_arrays`: the classifier's stored level, or the detector's)."""

    folder: str
    shape: tuple[int, int, int, int]

    @classmethod
    def build(cls, index: LesionIndex) -> "StudyCache":
        h, w = index.height, index.width
        shape = (len(index.study_keys), h, w)
        # /dev/shm when there is one: the cache is rebuilt for every run, so it never goes stale. A
        # killed run's cache would hold the node's RAM: the next run on the node removes it (scratch).
        base = "/dev/shm" if Path("/dev/shm").is_dir() else None
        folder = str(scratch.make("cache", base))
        cache = cls(folder, shape)
        images = np.lib.format.open_memmap(cache._path("image"), mode="w+", dtype=np.float32, shape=shape)
        labels = np.lib.format.open_memmap(cache._path("labels"), mode="w+", dtype=np.uint16, shape=shape)
        # The index reads its own way (`each_study`): the classifier's stored level a batch of studies
        # at a time, the detector's level made from the native views in threads.
        for s, image, label in index.each_study(Store.open(index.store_path)):
            images[s], labels[s] = image, label
        images.flush()
        labels.flush()
        # (the maps close when this function returns)
        return cache

    def _path(self, name: str) -> str:
        return f"{self.folder}/{name}.npy"

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.load(self._path("image"), mmap_mode="r"), np.load(self._path("labels"), mmap_mode="r"))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class _Source:
    """DALI batch source. Picklable and stateless in what it yields: batch = f(epoch, step)."""

    def __init__(self, index: LesionIndex, cache: StudyCache, *, global_batch: int, world: int, rank: int,
                 seed: int, shuffle: bool, flip_p: float, start_epoch: int, start_step: int, samples: int):
        self.study = getattr(index, "study", None)        # a StudyIndex's sample i is study i
        self.lesion_id = getattr(index, "lesion_id", None)
        self.label = getattr(index, "label", None)
        self.n = samples                                   # len(index), or more (StudyLoader's patches)
        self.cache = cache
        self.args = dict(global_batch=global_batch, world=world, rank=rank, seed=seed, shuffle=shuffle, flip_p=flip_p)
        self.start_epoch, self.start_step = start_epoch, start_step
        self.steps = steps_per_epoch(self.n, global_batch)
        self._arrays = None
        self._plan = (None, None)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"], state["_plan"] = None, (None, None)
        return state

    def plan(self, epoch: int):
        if self._plan[0] != epoch:
            self._plan = (epoch, epoch_plan(self.n, epoch=epoch, **self.args))
        return self._plan[1]

    def _draw(self, info):
        """(cached images and label maps, sample index, valid, flip, epoch, step) of this batch."""
        epoch = self.start_epoch + info.epoch_idx
        step = info.iteration + (self.start_step if info.epoch_idx == 0 else 0)
        if step >= self.steps:
            raise StopIteration
        if self._arrays is None:
            self._arrays = self.cache.arrays()
        idx, valid, flip = (a[step] for a in self.plan(epoch))
        return self._arrays, idx, valid, flip, epoch, step

    def __call__(self, info):
        (images, labels), idx, valid, flip, _, _ = self._draw(info)
        studies = self.study[idx]
        return ([np.asarray(images[s]) for s in studies],
                [np.asarray(labels[s]) for s in studies],
                [np.array([self.lesion_id[i]], np.uint16) for i in idx],
                [np.array([f], np.int32) for f in flip],
                [np.array(self.label[i], np.float32) for i in idx],
                [np.array(v, np.float32) for v in valid],
                [np.array(i, np.int64) for i in idx])


# nnU-Net's oversample_foreground_percent: a third of the training patches are placed on a lesion;
# the rest anywhere, so that most of what the detector sees is normal anatomy, as in a study.
PATCH_FOREGROUND = 1 / 3


def patches_per_study(height: int, patch_rows: int) -> int:
    """Training patches of each study an epoch: its area once, ceil(H / rows) (nnU-Net instead counts
    250 steps an epoch; ours keeps an epoch's validation cost in proportion). 1: whole studies."""
    return -(-height // patch_rows) if 0 < patch_rows < height else 1


def patch_start(labels: np.ndarray, rows: int, seed: int, epoch: int, position: int) -> int:
    """First row of a training patch of `rows` rows (the whole width: both views, so the flip of each
    view commutes with it) of a study with label map `labels`: with probability PATCH_FOREGROUND a
    patch holding a random lesion row (target pixels: lesions and their other-view copies), else
    anywhere. Drawn from (seed, epoch, global position) like the flips: the same on any number of ranks."""
    h = labels.shape[0]
    if rows >= h:
        return 0
    rng = np.random.default_rng([seed, epoch, 0x9A7C, position])
    fg, u = rng.random(2)
    lesion_rows = np.flatnonzero(np.asarray(labels).any(axis=1))
    if fg < PATCH_FOREGROUND and lesion_rows.size:
        centre = int(lesion_rows[int(u * lesion_rows.size)])
        lo, hi = max(0, centre - rows + 1), min(centre, h - rows)
        return lo + int(rng.integers(hi - lo + 1))
    return int(rng.integers(h - rows + 1))


class _StudySource(_Source):
    """Study samples (the detector's): image, label map, flip, valid, index, and the first row of the
    patch (`patch_rows` > 0: training patches of that many rows; 0: the whole study)."""

    patch_rows = 0

    def __call__(self, info):
        (images, labels), idx, valid, flip, epoch, step = self._draw(info)
        idx = idx % len(images)                          # sample p is patch p // S of study p % S
        a = self.args
        b = a["global_batch"] // a["world"]
        first = [0] * len(idx)
        if self.patch_rows:
            base = step * a["global_batch"] + a["rank"] * b
            first = [patch_start(labels[s], self.patch_rows, a["seed"], epoch, base + j) for j, s in enumerate(idx)]
        rows = [slice(r, r + self.patch_rows) if self.patch_rows else slice(None) for r in first]
        return ([np.asarray(images[s][r]) for s, r in zip(idx, rows)],
                [np.asarray(labels[s][r]) for s, r in zip(idx, rows)],
                [np.array([f], np.int32) for f in flip], [np.array(v, np.float32) for v in valid],
                [np.array(i, np.int64) for i in idx], [np.array(r, np.float32) for r in first])


def _study_pipeline(source: _StudySource, *, batch: int, height: int, width: int, device_id: int | None,
                    workers: int, seed: int):
    """(2, H, W) per study: the normalised image and its lesion target (label map > 0), each view
    mirrored together by the flip flag; stock operators, on the GPU when a device is given."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=batch, num_threads=2, device_id=device_id, seed=seed, prefetch_queue_depth=2,
                  py_num_workers=max(workers, 1), py_start_method="spawn", exec_dynamic=False)
    def graph():
        image, labels, flip, valid, index, first = fn.external_source(
            source, num_outputs=6, batch=True, batch_info=True, parallel=workers > 0,
            layout=["HW", "HW", "", "", "", ""])
        if device_id is not None:
            image, labels = image.gpu(), labels.gpu()
        x = fn.stack(image, (labels != 0) * 1.0, axis=0, axis_name="C")
        x = fn.reshape(x, shape=[1, 2 * height, 2, width // 2], layout="CDHW")      # as in _pipeline
        x = fn.flip(x, horizontal=fn.reshape(flip, shape=[]))
        return fn.reshape(x, shape=[2, height, width], layout="CHW"), first, valid, index

    return graph()


def _pipeline(source: _Source, *, batch: int, channels: int, height: int, width: int, device_id: int | None,
              workers: int, other_lesions_channel: bool, seed: int, fused: bool):
    from nvidia.dali import fn, pipeline_def

    # The static executor: outputs live in buffers DALI recycles (see the module note). The dynamic
    # executor hands over a fresh buffer per batch and measured 40 % slower on CPU.
    @pipeline_def(batch_size=batch, num_threads=2, device_id=device_id, seed=seed, prefetch_queue_depth=2,
                  py_num_workers=max(workers, 1), py_start_method="spawn", exec_dynamic=False)
    def graph():
        image, labels, lid, flip, y, valid, index = fn.external_source(
            source, num_outputs=7, batch=True, batch_info=True, parallel=workers > 0,
            layout=["HW", "HW", "", "", "", "", ""])
        if fused:
            from wbs_dist.train.lesion_op import lesion_input   # numba: only processes that build a CPU loader

            return lesion_input(image, labels, lid, flip, channels=channels), y, valid, index
        if device_id is not None:
            image, labels, lid = image.gpu(), labels.gpu(), lid.gpu()
        # Arithmetic expressions (one fused operator each) give float masks without a separate cast.
        chans = [image, (labels == lid) * 1.0]
        if other_lesions_channel:
            chans.append(((labels != 0) & (labels != lid)) * 1.0)
        x = fn.stack(*chans, axis=0, axis_name="C")               # (C, H, W)
        # Mirror each view in place without moving data around: seen as (1, C*H, 2 views, W/2) with
        # layout CDHW, a horizontal flip reverses each view's columns only; reshapes are free.
        x = fn.reshape(x, shape=[1, channels * height, 2, width // 2], layout="CDHW")
        x = fn.flip(x, horizontal=fn.reshape(flip, shape=[]))
        x = fn.reshape(x, shape=[channels, height, width], layout="CHW")
        return x, y, valid, index

    return graph()


@dataclass
class Batch:
    x: torch.Tensor          # (b, C, H, W) float32, on the loader's device; on the CPU valid until the next batch
    y: torch.Tensor          # (b,) float32
    valid: torch.Tensor      # (b,) float32: 0 for padding
    index: torch.Tensor      # (b,) int64 row in the LesionIndex


class LesionLoader:
    """Iterate epochs of batches: `for batch in loader.epoch(): ...`, one call per epoch."""

    def __init__(self, index: LesionIndex, *, global_batch: int, train: bool, flip_p: float = 0.5, seed: int = 0,
                 world: int = 1, rank: int = 0, device_id: int | None = None, workers: int = 2,
                 start_epoch: int = 0, start_step: int = 0, cache: StudyCache | None = None,
                 fused: bool | None = None):
        self._prepare(_Source, index, cache, global_batch, world, rank, seed, train, flip_p, start_epoch, start_step,
                      device_id)
        self.pipe = _pipeline(self.source, batch=self.batch, channels=index.channels, height=index.height,
                              width=index.width, device_id=device_id, workers=workers,
                              other_lesions_channel=index.other_lesions_channel, seed=seed,
                              # fused=False runs the GPU graph's operators on the CPU (tests, bench)
                              fused=device_id is None if fused is None else fused)
        self.pipe.build()

    def _prepare(self, source_type, index, cache, global_batch, world, rank, seed, train, flip_p, start_epoch,
                 start_step, device_id, samples: int | None = None) -> None:
        self.index = index
        self.own_cache = cache is None
        self.cache = cache or StudyCache.build(index)
        self.batch = global_batch // world
        samples = len(index) if samples is None else samples
        self.steps = steps_per_epoch(samples, global_batch)
        if not 0 <= start_step <= self.steps:
            raise UsageError(f"cannot resume at step {start_step}: an epoch has {self.steps} steps")
        self.source = source_type(index, self.cache, global_batch=global_batch, world=world, rank=rank, seed=seed,
                                  shuffle=train, flip_p=flip_p if train else 0.0, start_epoch=start_epoch,
                                  start_step=start_step, samples=samples)
        self.device = torch.device(f"cuda:{device_id}") if device_id is not None else torch.device("cpu")
        self.epoch_number = start_epoch
        self.step = start_step

    def __len__(self) -> int:
        return self.steps

    def epoch(self):
        """The batches of the current epoch (the rest of it, after a mid-epoch resume)."""
        while True:
            try:
                outputs = self.pipe.run()
            except StopIteration:
                self.pipe.reset()
                self.epoch_number += 1
                self.step = 0
                return
            self.step += 1
            yield self._batch(*outputs)

    def _batch(self, x, y, valid, index) -> Batch:
        # Labels, mask and indices are tiny: copied, so only x carries the next-batch lifetime.
        return Batch(self._to_torch(x), _cpu(y).clone(), _cpu(valid).clone(), _cpu(index).clone())

    def _to_torch(self, tl) -> torch.Tensor:
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = tl.as_tensor()
            out = torch.empty(t.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device))
            return out
        return _cpu(tl)

    @property
    def position(self) -> dict:
        """Where the loader is, for the checkpoint: resume with start_epoch/start_step from this."""
        return {"epoch": self.epoch_number, "step": self.step}

    def close(self) -> None:
        # Drop the pipeline first: its workers hold the cache's memory maps.
        self.pipe = None
        if self.own_cache:
            self.cache.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class StudyLoader(LesionLoader):
    """Study batches for the detector: Batch.x is (b, 2, H, W), channel 0 the normalised image,
    channel 1 the lesion target; Batch.y the first row of each sample's patch; Batch.index the study.
    `patch_rows` > 0 (training only): patches of that many rows instead of whole studies (patch_start),
    ceil(H / patch_rows) of each study an epoch. Same sharding, flips and resume as LesionLoader."""

    def __init__(self, index, *, global_batch: int, train: bool, flip_p: float = 0.5, seed: int = 0,
                 world: int = 1, rank: int = 0, device_id: int | None = None, workers: int = 2,
                 start_epoch: int = 0, start_step: int = 0, cache: StudyCache | None = None, patch_rows: int = 0):
        rows = patch_rows if train and 0 < patch_rows < index.height else 0
        repeats = patches_per_study(index.height, rows)
        self._prepare(_StudySource, index, cache, global_batch, world, rank, seed, train, flip_p, start_epoch,
                      start_step, device_id, samples=len(index) * repeats)
        self.source.patch_rows = rows
        self.pipe = _study_pipeline(self.source, batch=self.batch, height=rows or index.height, width=index.width,
                                    device_id=device_id, workers=workers, seed=seed)
        self.pipe.build()


def _cpu(tl) -> torch.Tensor:
    # Zero-copy view of DALI's buffer: valid until the next batch is drawn (module note).
    return torch.from_dlpack(tl.as_tensor())
