"""The DALI loader: equal to the plain Dataset, sharded exactly, deterministic, resumable mid-epoch."""

import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from wbs_dist.preprocess import mirror_views
from wbs_dist.train.dataset import LesionDataset, lesion_index
from wbs_dist.train.loader import LesionLoader, StudyCache, epoch_plan, steps_per_epoch
from wbs_dist.data.store import Store, StoreError

pytestmark = pytest.mark.slow

H, W = 64, 32


@pytest.fixture(scope="module")
def index(loader_store):
    return lesion_index(Store.open(loader_store), [0, 1, 2], (H, W))


@pytest.fixture(scope="module")
def cache(index):
    c = StudyCache.build(index)
    yield c
    c.remove()


def collect(loader):
    return [(b.x.clone(), b.y.clone(), b.valid.clone(), b.index.clone()) for b in loader.epoch()]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu-op", "portable-gpu-graph"])
def test_dali_equals_dataset_bit_for_bit_without_augmentation(index, fused):
    # Both graphs: the fused operator used on CPUs, and the stock operators the GPU runs (here on
    # CPU cores). Parallel external source (2 worker processes), as in training.
    ds = LesionDataset(index)
    seen = set()
    with LesionLoader(index, global_batch=8, train=False, workers=2, fused=fused) as loader:
        for x, y, valid, idx in collect(loader):
            for j in range(len(idx)):
                if valid[j]:
                    i = int(idx[j])
                    ref = ds[i]
                    assert torch.equal(x[j], ref["x"]), f"sample {i} differs"
                    assert y[j] == ref["y"]
                    seen.add(i)
    assert seen == set(range(len(index)))
    assert x.shape[1:] == (3, H, W)


def test_labels_mask_and_indices_outlive_the_next_batch(index, cache):
    # x is a view of DALI's recycled buffer (valid until the next batch); the small fields are copies.
    with LesionLoader(index, global_batch=8, train=False, workers=0, cache=cache) as loader:
        held = list(loader.epoch())
    fresh = None
    with LesionLoader(index, global_batch=8, train=False, workers=0, cache=cache) as loader:
        fresh = collect(loader)
    for b, (_, y, valid, idx) in zip(held, fresh):
        assert torch.equal(b.y, y) and torch.equal(b.valid, valid) and torch.equal(b.index, idx)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu-op", "portable-gpu-graph"])
def test_training_flip_mirrors_each_view_in_place(index, cache, fused):
    ds = LesionDataset(index)
    with LesionLoader(index, global_batch=8, train=True, flip_p=0.5, seed=4, workers=0, cache=cache,
                      fused=fused) as loader:
        batches = collect(loader)
    _, _, flips = epoch_plan(len(index), 8, 1, 0, seed=4, epoch=0, shuffle=True, flip_p=0.5)
    n_flipped = 0
    for step, (x, _, valid, idx) in enumerate(batches):
        for j in range(len(idx)):
            ref = ds[int(idx[j])]["x"].numpy()
            if flips[step, j]:
                ref = mirror_views(ref)
                n_flipped += 1
            assert np.array_equal(x[j].numpy(), ref)
    assert 0 < n_flipped < sum(len(b[3]) for b in batches)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu-op", "portable-gpu-graph"])
def test_without_other_lesions_channel_two_channels_equal_dataset(loader_store, fused):
    index2 = lesion_index(Store.open(loader_store), [1], (H, W), other_lesions_channel=False)
    ds = LesionDataset(index2)
    with LesionLoader(index2, global_batch=4, train=True, flip_p=0.5, seed=1, workers=0, fused=fused) as loader:
        batches = collect(loader)
    _, _, flips = epoch_plan(len(index2), 4, 1, 0, seed=1, epoch=0, shuffle=True, flip_p=0.5)
    for step, (x, _, valid, idx) in enumerate(batches):
        assert x.shape[1:] == (2, H, W)
        for j in range(len(idx)):
            ref = ds[int(idx[j])]["x"].numpy()
            assert np.array_equal(x[j].numpy(), mirror_views(ref) if flips[step, j] else ref)


@pytest.mark.parametrize("n, g, world", [(10, 8, 1), (10, 8, 2), (11, 6, 3), (7, 8, 4), (64, 8, 2), (1, 4, 4)])
def test_epoch_plan_covers_every_sample_once_across_ranks(n, g, world):
    plans = [epoch_plan(n, g, world, r, seed=1, epoch=2, shuffle=True, flip_p=0.5) for r in range(world)]
    steps = {p[0].shape[0] for p in plans}
    assert steps == {steps_per_epoch(n, g)}                    # same number of batches on every rank
    valid = np.concatenate([idx[v.astype(bool)] for idx, v, _ in plans])
    assert sorted(valid.tolist()) == list(range(n))            # each sample exactly once
    # The global order and flips do not depend on the number of ranks.
    one = epoch_plan(n, g, 1, 0, seed=1, epoch=2, shuffle=True, flip_p=0.5)
    merged = np.stack([p[0] for p in plans], 1).reshape(one[0].shape)
    assert np.array_equal(merged, one[0])
    assert np.array_equal(np.stack([p[2] for p in plans], 1).reshape(one[2].shape), one[2])


def test_dali_shards_by_global_rank_with_equal_batch_counts(index, cache):
    world, g = 3, 6
    seen, counts = [], []
    for rank in range(world):
        with LesionLoader(index, global_batch=g, train=True, seed=9, world=world, rank=rank, workers=0,
                          cache=cache) as loader:
            batches = collect(loader)
        counts.append(len(batches))
        for _, _, valid, idx in batches:
            seen += idx[valid.bool()].tolist()
            assert len(idx) == g // world
    assert len(set(counts)) == 1
    assert sorted(seen) == list(range(len(index)))


def test_deterministic_for_seed_epoch_rank(index, cache):
    def run(seed):
        with LesionLoader(index, global_batch=8, train=True, seed=seed, workers=0, cache=cache) as loader:
            return [collect(loader) for _ in range(2)]

    a, b, c = run(1), run(1), run(2)
    for ea, eb in zip(a, b):
        for (xa, *_, ia), (xb, *_, ib) in zip(ea, eb):
            assert torch.equal(xa, xb) and torch.equal(ia, ib)
    order = lambda epoch: torch.cat([i for *_, i in epoch])
    assert not torch.equal(order(a[0]), order(a[1]))           # a new order every epoch
    assert not torch.equal(order(a[0]), order(c[0]))           # and for another seed


def test_resume_mid_epoch_yields_exactly_the_remaining_batches(index, cache):
    with LesionLoader(index, global_batch=8, train=True, seed=3, workers=0, cache=cache,
                      start_epoch=1) as loader:
        full = collect(loader)
        next_full = collect(loader)
    k = 3
    with LesionLoader(index, global_batch=8, train=True, seed=3, workers=0, cache=cache,
                      start_epoch=1, start_step=k) as loader:
        rest = collect(loader)
        assert loader.position == {"epoch": 2, "step": 0}
        after = collect(loader)
    assert len(rest) == len(full) - k
    for (xa, ya, va, ia), (xb, yb, vb, ib) in zip(full[k:], rest):
        assert torch.equal(xa, xb) and torch.equal(ia, ib) and torch.equal(va, vb)
    assert len(after) == len(next_full)
    for (xa, *_, ia), (xb, *_, ib) in zip(next_full, after):
        assert torch.equal(xa, xb) and torch.equal(ia, ib)


def test_bad_stores_and_folds_are_named(loader_store, tmp_path):
    with pytest.raises(StoreError, match="no store at"):
        Store.open(tmp_path / "missing.zarr")

    other = tmp_path / "v99.zarr"
    shutil.copytree(loader_store, other)
    meta = json.loads((other / "zarr.json").read_text())
    meta["attributes"]["version"] = 99
    (other / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="layout version 99"):
        Store.open(other)

    st = Store.open(loader_store)
    with pytest.raises(StoreError, match="holds its training level at 64x32"):
        lesion_index(st, [0], (512, 256))
    with pytest.raises(StoreError, match="fold 7 out of range"):
        lesion_index(st, [7], (H, W))

    # Folds edited by hand: fold 2 empty, fold 0 only benign.
    edited = tmp_path / "edited.zarr"
    shutil.copytree(loader_store, edited)
    est = Store.open(edited)
    table = est.lesion_table()
    g = zarr.open_group(str(edited / "folds"), mode="r+")
    patients = g["patient"][...]
    malignant = {p for p, y in zip(table["patient"], table["label"]) if y == 1}
    g["fold"][...] = np.array([1 if p in malignant else 0 for p in patients], np.int8)
    with pytest.raises(StoreError, match="fold 0 holds only benign lesions"):
        lesion_index(est, [0], (H, W))
    with pytest.raises(StoreError, match="fold 2 has no lesions"):
        lesion_index(est, [2], (H, W))
