"""Detection evaluation (detection.py) against cases counted by hand: the overlap criterion,
false positives, FROC points and the threshold chosen on training folds."""

import numpy as np
import pytest

from wbs_dist.detection import THRESHOLDS, choose_threshold, components, froc, match, point


def square(shape, r, c, size, value=1, out=None):
    out = np.zeros(shape, np.int32) if out is None else out
    out[r:r + size, c:c + size] = value
    return out


def test_a_lesion_is_found_when_the_overlap_coefficient_exceeds_0_3():
    truth = square((20, 20), 0, 0, 10, 1)                            # lesion 1: 100 px
    # A component of 10 px, 3 inside the lesion: 3 / min(10, 100) = 0.3, not > 0.3: missed, and false.
    miss = np.zeros((20, 20), np.int32)
    miss[9, 7:17] = 1
    m = match(miss, truth)
    assert (m.lesions, m.found, m.false, m.components) == (1, 0, 1, 1)
    # 4 inside: 0.4 > 0.3: found, not false.
    found = np.zeros((20, 20), np.int32)
    found[9, 6:16] = 1
    m = match(found, truth)
    assert (m.lesions, m.found, m.false, m.components) == (1, 1, 0, 1)
    # A large component taking in the lesion (the joint under it): IoU 100/400 = 0.25, coefficient 1.
    big = square((20, 20), 0, 0, 20, 1)
    assert match(big, truth).found == 1
    # A body-sized blob (over 10 times the lesion) finds nothing and is one false positive.
    small = square((40, 40), 0, 0, 3, 1)                             # 9 px
    assert (match(square((40, 40), 0, 0, 9, 1), small).found, match(square((40, 40), 0, 0, 10, 1), small).found) \
        == (1, 0)
    assert match(square((40, 40), 0, 0, 10, 1), small).false == 1


def test_hand_counted_study_with_touching_lesions_and_false_components():
    truth = np.zeros((30, 30), np.int32)
    square(truth.shape, 0, 0, 4, 1, truth)       # lesion 1
    square(truth.shape, 0, 4, 4, 2, truth)       # lesion 2, touching 1
    square(truth.shape, 20, 20, 5, 3, truth)     # lesion 3: nothing proposed there
    proposed = np.zeros((30, 30), np.int32)
    square(proposed.shape, 0, 1, 6, 1, proposed)     # covers parts of 1 and 2: finds both
    square(proposed.shape, 10, 10, 3, 2, proposed)   # on no lesion: false
    square(proposed.shape, 25, 0, 2, 3, proposed)    # on no lesion: false
    square(proposed.shape, 1, 1, 2, 4, proposed)     # inside lesion 1 (overwrites part of comp 1): also finds 1
    m = match(proposed, truth)
    assert (m.lesions, m.found, m.false, m.components) == (3, 2, 2, 4)


def test_a_component_on_a_lesions_other_view_appearance_is_a_copy_not_false():
    """Side by side (anterior | posterior, 2 x 10 columns): lesion 1 delineated on the anterior at
    columns 1-3 shows on the posterior mirrored, at columns 16-18 of the whole image."""
    from wbs_dist.detection import COPY, with_copies

    image = np.ones((6, 20), np.float32)
    truth = np.zeros((6, 20), np.uint16)
    truth[2:4, 1:4] = 1
    both = with_copies(truth, image)
    assert (both[2:4, 16:19] == (1 | COPY)).all() and (both[2:4, 1:4] == 1).all()
    assert (both > 0).sum() == 12
    proposed = np.zeros((6, 20), np.int32)
    proposed[2:4, 16:19] = 1                     # on the copy
    proposed[0, 9] = 2                           # on nothing
    proposed[2:4, 1:3] = 3                       # finds the lesion
    m = match(proposed, both)
    assert (m.lesions, m.found, m.false, m.copies, m.components) == (1, 1, 1, 1, 3)
    # Without the copy the same component is false; a component finding the lesion is never a copy.
    assert match(proposed, truth).false == 2 and match(proposed, truth).copies == 0
    # Only where the other view was acquired (a one-view study gets no copies).
    image[:, 10:] = 0
    assert (with_copies(truth, image) == truth).all()
    with pytest.raises(ValueError, match="below"):
        with_copies(np.full((2, 4), COPY, np.uint16), np.ones((2, 4)))


def test_components_are_8_connected():
    prob = np.zeros((5, 5))
    prob[0, 0] = prob[1, 1] = prob[2, 2] = 0.9      # a diagonal: one component
    prob[4, 0] = 0.9                                # alone
    labels = components(prob, 0.5)
    assert labels.max() == 2 and labels[0, 0] == labels[2, 2] != labels[4, 0]
    assert components(prob, 0.95).max() == 0


def test_froc_points_and_the_threshold_chosen_on_training_points():
    # Two studies. Study A: lesion 1 at probability 0.8, a false blob at 0.6. Study B: lesion at 0.4, false at 0.2.
    a_truth = square((16, 16), 0, 0, 4, 1)
    a_prob = np.zeros((16, 16))
    a_prob[0:4, 0:4] = 0.8
    a_prob[10:13, 10:13] = 0.6
    b_truth = square((16, 16), 8, 8, 4, 1)
    b_prob = np.zeros((16, 16))
    b_prob[8:12, 8:12] = 0.4
    b_prob[0:2, 0:2] = 0.2
    points = {p["threshold"]: p for p in froc([a_prob, b_prob], [a_truth, b_truth], [0.1, 0.3, 0.5, 0.7, 0.9])}
    by_hand = {0.1: (1.0, 2 / 2), 0.3: (1.0, 1 / 2), 0.5: (0.5, 1 / 2), 0.7: (0.5, 0.0), 0.9: (0.0, 0.0)}
    for t, (sens, fp) in by_hand.items():
        assert (points[t]["sensitivity"], points[t]["fp_per_study"]) == pytest.approx((sens, fp)), t
        assert points[t]["lesions"] == 2 and points[t]["studies"] == 2
    t, note = choose_threshold(list(points.values()), target=0.95)
    assert t == 0.3 and "highest reaching" in note
    t, note = choose_threshold(list(points.values()), target=0.5)
    assert t == 0.7
    # Nothing reaches 100 % above 0.3 ... and when nothing reaches the target, the highest sensitivity.
    t, note = choose_threshold([p for k, p in points.items() if k >= 0.5], target=0.95)
    assert t == 0.7 and "no threshold reaches" in note


def test_folds_pool_by_summed_counts_and_folds_of_other_settings_are_refused():
    from wbs_dist.errors import InputError
    from wbs_dist.evaluate.detection_report import detection_summary

    def fold_doc(grid, counts, target=0.95):
        pts = [dict(threshold=t, found=f, lesions=4, false=fp, copies=0, studies=2,
                    sensitivity=f / 4, fp_per_study=fp / 2) for t, (f, fp) in zip(grid, counts)]
        return {"froc": pts, "at_threshold": pts[0], "threshold_note": "n", "target_sensitivity": target}

    a = fold_doc([0.3, 0.6], [(4, 6), (2, 1)])
    b = fold_doc([0.3, 0.6], [(3, 2), (1, 0)])
    s = detection_summary({0: a, 1: b})
    assert [(p["found"], p["lesions"], p["false"], p["studies"]) for p in s["froc"]] == [(7, 8, 8, 4), (3, 8, 1, 4)]
    assert s["froc"][0]["sensitivity"] == 7 / 8 and s["froc"][1]["fp_per_study"] == 1 / 4
    with pytest.raises(InputError, match="fold 0: 2 thresholds 0.3..0.6, target 0.95; fold 1: 3 thresholds"):
        detection_summary({0: a, 1: fold_doc([0.3, 0.5, 0.6], [(3, 2), (2, 1), (1, 0)])})
    with pytest.raises(InputError, match="fold 1: 2 thresholds 0.3..0.6, target 0.9"):
        detection_summary({0: a, 1: fold_doc([0.3, 0.6], [(3, 2), (1, 0)], target=0.9)})


def test_point_of_no_lesions_and_bad_inputs():
    assert point(0.5, [])["sensitivity"] is None
    with pytest.raises(ValueError, match="shape"):
        match(np.zeros((3, 3), np.int32), np.zeros((3, 4), np.int32))
    with pytest.raises(ValueError, match="lesion maps"):
        froc([np.zeros((2, 2))], [])
    with pytest.raises(ValueError, match="no FROC point"):
        choose_threshold([point(0.5, [])])
    assert THRESHOLDS[0] == 0.05 and THRESHOLDS[-1] == 0.95 and len(THRESHOLDS) == 19


# -- the detector's data and network (train/detector.py) ---------------------------------------------
def test_study_index_holds_the_annotated_studies_of_the_folds_asked(loader_store):
    from wbs_dist.data.folds import lesion_folds
    from wbs_dist.data.store import Store, int_to_key
    from wbs_dist.train.detector import study_index

    store = Store.open(loader_store)
    table = store.lesion_table()
    fold_of = lesion_folds(store, table)
    ix = study_index(store, [0, 2], (64, 32))
    want = {int_to_key(s) for s, f in zip(table["study"], fold_of) if f in (0, 2)}
    assert set(ix.study_keys) == want and len(ix.study_keys) == len(want)
    assert set(ix.fold.tolist()) == {0, 2}
    assert not set(ix.study_keys) & set(study_index(store, [1], (64, 32)).study_keys)


def test_study_samples_are_the_normalised_image_and_its_lesions_flipped_together(loader_store):
    import torch

    from wbs_dist.data.store import Store
    from wbs_dist.preprocess import count_scale, training_level
    from wbs_dist.train.detector import StudyDataset, study_index

    store = Store.open(loader_store)
    ix = study_index(store, [0], (128, 64))          # the detector's level, not the store's 64 x 32
    plain, flipped = StudyDataset(ix)[0], StudyDataset(ix, flip_p=1.0)[0]
    assert plain["x"].shape == (1, 128, 64) and plain["y"].dtype == torch.int64
    native, maps = store.native_study(ix.study_keys[0])
    image, labels = training_level({v: a.astype(np.float32) for v, a in native.items()}, maps, 128, 64)
    np.testing.assert_array_equal(plain["x"][0].numpy(), image / np.float32(count_scale(image)))
    # The target: the delineated lesions and, on the other view, their mirror image.
    target = (labels > 0) | ((labels[:, ::-1] > 0) & (labels == 0))
    np.testing.assert_array_equal(plain["y"][0].numpy(), target.astype(np.int64))
    assert plain["y"].sum() > (labels > 0).sum() > 0
    # Each view mirrored on its own half, image and target alike.
    for key in ("x", "y"):
        a, b = plain[key][0].numpy(), flipped[key][0].numpy()
        np.testing.assert_array_equal(b[:, :32], a[:, :32][:, ::-1])
        np.testing.assert_array_equal(b[:, 32:], a[:, 32:][:, ::-1])


def test_the_detector_learns_lesions_with_dice_plus_cross_entropy(loader_store):
    """A few studies, the small U-Net, 80 Adam steps on CPU: the loss falls well below its start and
    lesion pixels end with a higher probability than background."""
    import torch

    from wbs_dist.data.store import Store
    from wbs_dist.train.detector import StudyDataset, build_detector, detector_loss, probability_maps, study_index

    torch.manual_seed(0)
    ds = StudyDataset(study_index(Store.open(loader_store), [0], (64, 32)))
    batch = [ds[i] for i in range(min(6, len(ds)))]
    x, y = torch.stack([b["x"] for b in batch]), torch.stack([b["y"] for b in batch])
    model = build_detector("unet_small")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss = detector_loss(model(x), y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0], losses[::10]
    prob = probability_maps(model, x)
    assert prob.shape == (len(batch), 64, 32) and model.training
    lesion = y[:, 0].numpy() == 1
    assert prob[lesion].mean() > prob[~lesion].mean() + 0.2


def test_the_dali_study_loader_gives_the_datasets_samples_with_the_same_flips(loader_store):
    """StudyLoader (DALI, the trainer's) against StudyDataset (plain reads): same image and target for
    every study of an epoch, and a flipped sample is the plain one mirrored view by view."""
    import torch

    from wbs_dist.data.store import Store
    from wbs_dist.preprocess import mirror_views
    from wbs_dist.train.detector import StudyDataset, study_index
    from wbs_dist.train.loader import StudyLoader

    ix = study_index(Store.open(loader_store), [0, 1], (96, 48))
    ds = StudyDataset(ix)
    seen = {}
    with StudyLoader(ix, global_batch=4, train=True, flip_p=0.5, seed=3, workers=0) as loader:
        for batch in loader.epoch():
            assert batch.x.shape[1:] == (2, 96, 48)
            for x, v, i in zip(batch.x, batch.valid, batch.index):
                if v:
                    seen[int(i)] = x.clone()
    assert sorted(seen) == list(range(len(ix)))
    flips = 0
    for i, x in seen.items():
        want = torch.cat([ds[i]["x"], ds[i]["y"].float()]).numpy()
        if not np.array_equal(x.numpy(), want):
            np.testing.assert_array_equal(x.numpy(), mirror_views(want))
            flips += 1
    assert 0 < flips < len(ix)


def test_froc_from_gathered_counts_equals_froc_from_maps():
    from wbs_dist.detection import counts as counts_of, froc_from_counts, sensitivity_at

    rng = np.random.default_rng(0)
    truths, probs = [], []
    for _ in range(5):
        truth = np.zeros((24, 24), np.int32)
        for lid in range(1, 4):
            r, c = rng.integers(0, 20, 2)
            truth[r:r + 3, c:c + 3] = lid
        truths.append(truth)
        probs.append(np.clip(rng.random((24, 24)) * 0.5 + (truth > 0) * rng.random(), 0, 1))
    ts = (0.3, 0.6, 0.9)
    counts = [[list(counts_of(m)) for m in (match(components(p, t), y) for t in ts)]
              for p, y in zip(probs, truths)]
    assert froc_from_counts(np.array(counts), ts) == froc(probs, truths, ts)
    pts = [{"sensitivity": 0.5, "fp_per_study": 1.0}, {"sensitivity": 0.9, "fp_per_study": 3.0},
           {"sensitivity": 1.0, "fp_per_study": 3.5}]
    assert sensitivity_at(pts, 3.0) == 0.9 and sensitivity_at(pts, 0.5) == 0.0
    assert sensitivity_at([{"sensitivity": None, "fp_per_study": 0.0}], 3.0) is None


def test_training_patches_are_bands_of_the_flipped_study_on_any_number_of_ranks(loader_store):
    """patch_rows: each training sample is a band of whole-width rows of the (flipped) study, its
    first row in Batch.y; an epoch holds ceil(H / patch_rows) bands of every study; the bands depend
    on the global position only, so one rank and two ranks draw the same ones."""
    from collections import Counter

    import torch

    from wbs_dist.data.store import Store
    from wbs_dist.preprocess import mirror_views
    from wbs_dist.train.detector import StudyDataset, study_index
    from wbs_dist.train.loader import StudyCache, StudyLoader

    ix = study_index(Store.open(loader_store), [0, 1], (96, 48))
    ds = StudyDataset(ix)
    whole = [torch.cat([ds[i]["x"], ds[i]["y"].float()]).numpy() for i in range(len(ix))]
    cache = StudyCache.build(ix)
    try:
        def draw(world, rank):
            got = []
            with StudyLoader(ix, global_batch=4, train=True, flip_p=0.5, seed=3, workers=0, world=world, rank=rank,
                             cache=cache, patch_rows=24) as loader:
                for batch in loader.epoch():
                    assert batch.x.shape[1:] == (2, 24, 48)
                    for x, first, v, i in zip(batch.x, batch.y, batch.valid, batch.index):
                        if not v:
                            continue
                        i, first = int(i), int(first)
                        band = whole[i][:, first:first + 24]
                        flipped = not np.array_equal(x.numpy(), band)
                        if flipped:
                            np.testing.assert_array_equal(x.numpy(), mirror_views(band))
                        got.append((i, first, flipped, bool(x[1].any())))
            return got

        one = draw(1, 0)
        two = draw(2, 0) + draw(2, 1)
        assert len(one) == 4 * len(ix) and Counter(one) == Counter(two)
        assert Counter(i for i, *_ in one) == {i: 4 for i in range(len(ix))}
        assert 0 < sum(f for _, _, f, _ in one) < len(one) and sum(h for *_, h in one) > 0
        # Validation loaders never cut patches.
        with StudyLoader(ix, global_batch=4, train=False, workers=0, cache=cache, patch_rows=24) as loader:
            assert next(iter(loader.epoch())).x.shape[2:] == (96, 48) and len(loader) == -(-len(ix) // 4)
    finally:
        cache.remove()


def test_a_third_of_the_patches_are_placed_on_a_lesion():
    """One lesion at rows 80-81 of 96: a uniform 24-row band holds it with p = 16/73; with a third of
    the bands placed on a lesion, p = 1/3 + 2/3 x 16/73 = 0.48."""
    from wbs_dist.train.loader import patch_start

    labels = np.zeros((96, 48), np.uint16)
    labels[80:82, 10:12] = 1
    starts = [patch_start(labels, 24, 0, 0, p) for p in range(600)]
    assert all(0 <= s <= 72 for s in starts)
    assert starts == [patch_start(labels, 24, 0, 0, p) for p in range(600)]
    held = np.mean([s <= 80 < s + 24 for s in starts])
    assert 0.40 < held < 0.56, held
    assert patch_start(np.zeros((96, 48), np.uint16), 24, 0, 0, 5) <= 72     # no lesion: anywhere
    assert patch_start(labels, 96, 0, 0, 5) == 0
