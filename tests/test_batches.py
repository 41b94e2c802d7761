"""The store's batches (data/batches.py): many studies in a few files, each study read back exactly.

Real zarr on disk, no DICOM: studies are made as ingest's workers hand them to the writer.
"""

import json
import os

import numpy as np
import pytest
import zarr

from wbs_dist.data.batches import ARRAYS, prepare
from wbs_dist.data.store import Store, StoreError
from wbs_dist.data.studies import StudyData
from wbs_dist.schema import ANTERIOR, POSTERIOR

TRAIN = (32, 16)


def study(i: int, shape=(64, 16), dtype=np.int16, annotated=True, views=(ANTERIOR, POSTERIOR)) -> StudyData:
    rng = np.random.default_rng(i)
    pixels = {v: rng.integers(0, 50, shape).astype(dtype) for v in views}
    labels, lesions = {}, []
    if annotated:
        lab = np.zeros(shape, np.uint16)
        lab[10:14, 4:8] = 1
        labels[views[0]] = lab
        lesions = [{"lesion_id": 1, "view": views[0], "label": "malignant", "area": 16}]
    attrs = {"patient": f"{i:016x}", "annotated": annotated, "tumor_type": "lung" if annotated else None,
             "views": list(views), "lesions": lesions, "sources": [], "dtypes": {}}
    return StudyData(f"{i:016x}", attrs, pixels, labels)


def new_store(tmp_path) -> Store:
    return Store.create_or_open(tmp_path / "s.zarr", TRAIN)


def batches(st: Store) -> list:
    return sorted(p for p in (st.path / "studies").iterdir() if p.is_dir())


def test_each_study_reads_back_exactly_whatever_its_batch_neighbours(tmp_path):
    """A study's views of different sizes share its batch padded to the largest; each is read back at its
    own size, its label maps only when annotated, its training level and attrs as prepared. Studies of
    another view size go to another batch (padding them would multiply a batch's memory and reads)."""
    st = new_store(tmp_path)
    uneven = study(4)
    uneven.views[POSTERIOR] = uneven.views[POSTERIOR][:60, :12].copy()
    made = [study(0), study(2, annotated=False), study(3, views=("unknown",)), uneven, study(1, shape=(80, 24))]
    with st.writer() as w:
        assert all(w.add(prepare(s, TRAIN)) for s in made)
    batch, other = sorted(batches(st), key=lambda b: zarr.open_group(str(b), mode="r")["native"].shape[0],
                          reverse=True)
    again = Store.open(st.path)                          # another process's view: the index from disk
    assert again.study_keys() == sorted(s.key for s in made)
    for s in made:
        views, labels = again.native_study(s.key)
        assert list(views) == list(s.views)
        for v, a in s.views.items():
            assert views[v].dtype == a.dtype and views[v].shape == a.shape
            np.testing.assert_array_equal(views[v], a)
        if s.labels:
            for v in s.views:
                np.testing.assert_array_equal(labels[v], s.labels.get(v, np.zeros(s.views[v].shape, np.uint16)))
        else:
            assert labels == {}
        p = prepare(s, TRAIN)
        image, label = again.training_level(s.key)
        np.testing.assert_array_equal(image, p.train_image)
        np.testing.assert_array_equal(label, p.train_labels)
        assert again.study_attrs(s.key) == json.loads(json.dumps(p.attrs))
    # Bulk reads give the same rows, in any order asked.
    keys = [made[3].key, made[0].key, made[2].key]
    got = {i: (img, lab) for i, img, lab in again.training_levels(keys)}
    for i, key in enumerate(keys):
        np.testing.assert_array_equal(got[i][0], again.training_level(key)[0])
    # One file an array, whatever the number of studies; plain zarr opens the batch.
    files = sorted(os.path.relpath(os.path.join(d, f), batch) for d, _, fs in os.walk(batch) for f in fs)
    assert files == sorted(["zarr.json"] + [f"{a}/{n}" for a in ARRAYS for n in ("zarr.json", "c.0.0.0")])
    assert zarr.open_group(str(batch), mode="r")["native"].shape == (7, 64, 16)
    assert zarr.open_group(str(other), mode="r")["native"].shape == (2, 80, 24)
    with pytest.raises(StoreError, match="no study 00000000000000ff"):
        again.native_study("00000000000000ff")


def test_batches_are_bounded_and_one_dtype_each(tmp_path):
    st = new_store(tmp_path)
    with st.writer(batch_studies=3) as w:
        for i in range(7):
            w.add(prepare(study(i), TRAIN))
        w.add(prepare(study(7, dtype=np.uint16), TRAIN))
        assert not w.add(prepare(study(7, dtype=np.uint16), TRAIN))     # the same study twice: once
    sizes = sorted(len(json.loads((b / "zarr.json").read_text())["attributes"]["studies"]) for b in batches(st))
    assert sizes == [1, 1, 3, 3]                           # 3 + 3 + 1 int16, 1 uint16 in its own batch
    dtypes = {zarr.open_group(str(b), mode="r")["native"].dtype for b in batches(st)}
    assert dtypes == {np.dtype(np.int16), np.dtype(np.uint16)}
    assert len(Store.open(st.path).study_keys()) == 8


def test_an_exception_in_the_writer_publishes_only_full_batches(tmp_path):
    """A SIGTERM (an exception in the block) drops the batch being filled: nothing half-written is
    published, and what was published is whole."""
    st = new_store(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with st.writer(batch_studies=2) as w:
            for i in range(5):
                w.add(prepare(study(i), TRAIN))
            raise KeyboardInterrupt
    assert Store.open(st.path).study_keys() == [f"{i:016x}" for i in range(4)]


def test_a_batch_missing_a_file_is_not_read_and_an_exclusive_writer_removes_it(tmp_path):
    st = new_store(tmp_path)
    with st.writer(batch_studies=2) as w:
        for i in range(4):
            w.add(prepare(study(i), TRAIN))
    first = batches(st)[0]
    (first / "labels" / "c.0.0.0").unlink()
    again = Store.open(st.path)
    assert len(again.study_keys()) == 2                    # the torn batch's two studies are not there
    again.clear_torn_batches()
    assert not first.exists() and len(batches(again)) == 1 and len(again.study_keys()) == 2


def test_a_store_of_the_former_layout_is_refused_with_what_to_do(tmp_path):
    st = new_store(tmp_path)
    st.root.attrs["version"] = 1
    with pytest.raises(StoreError, match="layout version 1; this wbs-dist reads version 2: ingest the archive again"):
        Store.open(st.path)


def test_a_dead_writers_staging_is_cleared_on_its_own_host_only(tmp_path):
    """`<host>-<pid>` of a pid gone is this host's leftover; `<host>-2-<pid>` is another machine's."""
    import socket

    st = new_store(tmp_path)
    host, gone = socket.gethostname(), 4_000_000           # above any pid this machine hands out now
    mine, theirs = st.path / ".staging" / f"{host}-{gone}", st.path / ".staging" / f"{host}-2-{gone}"
    for d in (mine, theirs):
        d.mkdir(parents=True)
    st.clear_dead_staging()
    assert not mine.exists() and theirs.exists()
