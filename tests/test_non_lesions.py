"""Config key non_lesions: the hot-spot finder's unmatched candidates of the training studies as
benign training lesions (issue 15 item 4). Off by default; the validation fold stays the delineations."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ROOT, run_cli

CONFIG = ROOT / "configs" / "local.yaml"
COLUMNS = ("study", "lesion_id", "label", "patient", "fold", "view", "tumor_type", "burden")


def test_false_components_are_the_ones_match_counts_false():
    """Hand-drawn: component 1 finds lesion 3, 2 lies on lesion 3's other-view copy, 4 is a blob 12
    times lesion 5's area over it (too large to find it), 7 lies on nothing."""
    from wbs_dist.detection import COPY, false_components, match

    truth = np.zeros((8, 16), np.uint16)
    truth[1, 1] = 3
    truth[1, 14] = 3 | COPY
    truth[5, 5] = 5
    proposed = np.zeros_like(truth, dtype=np.int32)
    proposed[1, 1:3] = 1
    proposed[1, 13:15] = 2
    proposed[4:7, 3:7] = 4
    proposed[7, 10] = 7
    assert false_components(proposed, truth) == [4, 7]
    assert match(proposed, truth).false == 2


@pytest.fixture(scope="module")
def store(loader_store):
    from wbs_dist.data.store import Store

    return Store.open(loader_store)


@pytest.fixture(scope="module")
def indices(store):
    from wbs_dist.train.dataset import lesion_index, with_non_lesions

    plain = lesion_index(store, [1, 2], (64, 32))
    return plain, with_non_lesions(plain, store, 3)


def test_a_studys_non_lesions_lie_on_no_lesion_and_the_cap_keeps_the_first(store):
    from wbs_dist.detection import match, with_copies
    from wbs_dist.train.dataset import study_non_lesions

    key = next(k for k in store.study_keys() if store.study_attrs(k).get("annotated"))
    views, _ = store.native_study(key)
    image, labels = store.training_level(key)
    every = study_non_lesions(views, image, labels, 100)
    assert len(every) >= 3                           # a synthetic body's joints and kidneys
    two = study_non_lesions(views, image, labels, 2)        # the cap keeps the first (hottest) ones
    assert len(two) == 2 and all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(two, every))
    proposed = np.zeros(labels.size, np.int32)
    for i, (view, where) in enumerate(every, start=1):
        assert view in ("anterior", "posterior")
        assert (labels.reshape(-1)[where] == 0).all()   # never over a delineated lesion's pixels
        proposed[where] = i
    m = match(proposed.reshape(labels.shape), with_copies(labels, image))
    assert m.false == len(every) and m.found == 0 and m.copies == 0


def test_non_lesions_are_benign_rows_painted_into_their_study(store, indices):
    plain, more = indices
    n = len(more) - len(plain)
    assert n > 0 and len(more.painted) > 0
    assert n <= 3 * len(plain.study_keys)
    assert more.label.sum() == plain.label.sum()              # every one benign
    order = np.lexsort((more.lesion_id, more.study))
    assert (order == np.arange(len(more))).all()             # (study, lesion id) order kept
    for s in range(len(plain.study_keys)):
        old, new = plain.study == s, more.study == s
        _, labels = plain.study_arrays(store, s)
        _, painted = more.study_arrays(store, s)
        added = np.setdiff1d(more.lesion_id[new], plain.lesion_id[old])
        assert (added > labels.max()).all()                  # ids after the study's own
        assert set(np.unique(painted).tolist()) == set(np.unique(labels).tolist()) | set(added.tolist())
        assert np.array_equal(painted[labels > 0], labels[labels > 0])   # delineations untouched
        for name in ("patient", "fold", "tumor_type", "burden"):
            assert set(getattr(more, name)[new].tolist()) == set(getattr(plain, name)[old].tolist()), name


@pytest.mark.slow
def test_the_dali_loader_sees_the_painted_studies(indices):
    from wbs_dist.train.dataset import LesionDataset
    from wbs_dist.train.loader import LesionLoader

    _, more = indices
    ds = LesionDataset(more)
    seen = 0
    with LesionLoader(more, global_batch=16, train=False, workers=0) as loader:
        for b in loader.epoch():
            for j in torch.nonzero(b.valid.bool()).view(-1).tolist():
                i = int(b.index[j])
                assert torch.equal(b.x[j], ds[i]["x"]), i
                seen += 1
    assert seen == len(more)


def _rank_main(store_path: str, out: str) -> None:
    """Under torchrun: every rank's index with non-lesions (the ranks split the finder's work)."""
    from wbs_dist.data.store import Store
    from wbs_dist.train import ddp
    from wbs_dist.train.dataset import lesion_index, with_non_lesions

    env = ddp.detect()
    ddp.init_process_group(env, timeout_s=120, rendezvous_dir=Path(out))
    store = Store.open(store_path)
    index = with_non_lesions(lesion_index(store, [1, 2], (64, 32)), store, 3, env.world_size, env.rank)
    arrays = {name: getattr(index, name) for name in COLUMNS}
    for s, (where, ids) in index.painted.items():
        arrays[f"where{s}"], arrays[f"ids{s}"] = where, ids
    np.savez(Path(out) / f"rank{env.rank}.npz", **arrays)
    ddp.cleanup()


@pytest.mark.ddp
def test_two_ranks_share_the_finders_work_and_hold_the_same_index(loader_store, indices, tmp_path):
    from test_dist import worker_env

    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          __file__, str(loader_store), str(tmp_path)],
                         env=worker_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    _, one = indices
    for rank in range(2):
        got = np.load(tmp_path / f"rank{rank}.npz")
        for name in COLUMNS:
            assert np.array_equal(got[name], getattr(one, name)), (rank, name)
        for s, (where, ids) in one.painted.items():
            assert np.array_equal(got[f"where{s}"], where) and np.array_equal(got[f"ids{s}"], ids)


@pytest.mark.slow
def test_a_fold_trained_with_non_lesions_validates_on_the_delineations_alone(loader_store, tmp_path):
    def train(run_dir, *extra):
        res = run_cli("train", CONFIG, "--fold", 0, f"store={loader_store}", f"run_dir={run_dir}", "train_size=64x32",
                      "folds=3", "epochs=1", "model=resnet18", "checkpoint_every=0", *extra)
        assert res.returncode == 0, res.stderr[-3000:]
        with open(run_dir / "fold0" / "predictions.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        return {(r["study_uid"], r["lesion_id"]): r for r in rows}, (run_dir / "fold0" / "train.log").read_text()

    plain, _ = train(tmp_path / "plain")
    more, log = train(tmp_path / "more", "non_lesions=3")
    assert "hot-spot finder candidates of" in log and "added as benign lesions" in log
    assert more.keys() == plain.keys()                       # the validation fold: delineations only
    assert all(more[k]["label"] == plain[k]["label"] for k in plain)
    assert any(more[k]["score"] != plain[k]["score"] for k in plain)   # the training set did change


@pytest.mark.slow                                            # CLI processes: out of the fast subset
@pytest.mark.parametrize("extra, needle", [
    (["non_lesions=-1"], "'non_lesions'"),
    (["non_lesions=2", "task=detect", "model=unet_small", "train_size=96x48"], "'non_lesions' is for task=classify"),
])
def test_bad_non_lesions_exit_2_naming_the_key(loader_store, tmp_path, extra, needle):
    res = run_cli("train", CONFIG, "--fold", 0, f"store={loader_store}", f"run_dir={tmp_path}", "train_size=64x32",
                  "folds=3", "epochs=1", "model=resnet18", *extra)
    assert res.returncode == 2, res.stderr[-2000:]
    assert needle in res.stderr and "Traceback" not in res.stderr


if __name__ == "__main__":
    _rank_main(sys.argv[1], sys.argv[2])
