"""The DALI loader: equal to the plain Dataset, sharded exactly, deterministic, resumable mid-epoch."""

import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from wbs_dist.dataset import LesionDataset, lesion_index, mirror_views
from wbs_dist.loader import LesionLoader, StudyCache, epoch_plan, steps_per_epoch
from wbs_dist.store import Store, StoreError

H, W = 64, 32


@pytest.fixture(scope="module")
def index(loader_store):
    return lesion_index(Store.open(loader_store), [0, 1, 2], H, W)


@pytest.fixture(scope="module")
def cache(index):
    c = StudyCache.build(index)
    yield c
    c.remove()


def collect(loader):
    return [(b.x.clone(), b.y.clone(), b.valid.clone(), b.index.clone()) for b in loader.epoch()]


def test_dali_equals_dataset_bit_for_bit_without_augmentation(index):
    ds = LesionDataset(index)
    seen = set()
    # Parallel external source (2 worker processes), as in training. Batches are zero-copy views of
    # DALI's outputs: hold a whole epoch before comparing, so a reused buffer would show.
    with LesionLoader(index, global_batch=8, train=False, workers=2) as loader:
        held = list(loader.epoch())
        for b in held:
            for j in range(len(b.index)):
                if b.valid[j]:
                    i = int(b.index[j])
                    ref = ds[i]
                    assert torch.equal(b.x[j], ref["x"]), f"sample {i} differs"
                    assert b.y[j] == ref["y"]
                    seen.add(i)
    assert seen == set(range(len(index)))
    assert b.x.shape[1:] == (3, H, W)


def test_training_flip_mirrors_each_view_in_place(index, cache):
    ds = LesionDataset(index)
    with LesionLoader(index, global_batch=8, train=True, flip_p=0.5, seed=4, workers=0, cache=cache) as loader:
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
        lesion_index(st, [0], 512, 256)
    with pytest.raises(StoreError, match="fold 7 out of range"):
        lesion_index(st, [7], H, W)

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
        lesion_index(est, [0], H, W)
    with pytest.raises(StoreError, match="fold 2 has no lesions"):
        lesion_index(est, [2], H, W)
