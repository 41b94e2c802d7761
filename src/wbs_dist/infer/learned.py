"""Learned candidates: the detector ensemble's lesion proposals for a study without delineations.

For each network image of the study (score.Scan), the detector folds' mean lesion probability map
(the known patient's own fold alone, by the out-of-fold rule) over the study at the detector's own
level (`Scan.detect`, preprocess.detection_level: the detector run's train_size, made from the
native views), cut at the threshold the folds chose on their training folds (the median of the
folds'; a single fold's own), and its connected components (detection.py, 8-connected) within each
view's half: a component never spans two views. Each component becomes a lesion of the study,
numbered across the study in view order as the annotation contract numbers lesions (DESIGN 3.2), is
brought back to its view's native size (nearest neighbour: the level is a plain stretch of each
view) and from there to the classifier's level as ingest brings a delineation
(preprocess.training_level: every lesion keeps at least one pixel), and the classifier scores it like
a delineated one. Overlays draw the native-size maps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from wbs_dist.detection import components
from wbs_dist.errors import UsageError
from wbs_dist.preprocess import training_level
from wbs_dist.schema import VIEWS


def propose(detector, scans: list, fold: int) -> tuple[list[tuple[int, str, str, int]], dict[str, np.ndarray]]:
    """Fill each scan's label map with the detector's components; (lesions as (id, view, label '',
    scan), native-size label map per view)."""
    lesions, native = [], {}
    next_id = 1
    for s, scan in enumerate(scans):
        prob, threshold = detector.maps(scan.detect[None, None], fold)
        half = scan.detect.shape[1] // 2
        by_slot = {}
        for i, slot in enumerate(VIEWS):
            view = scan.slots.get(slot)
            if view is None:
                continue
            comp = components(prob[0][:, i * half:(i + 1) * half], threshold)
            n = int(comp.max())
            part = np.where(comp > 0, comp + next_id - 1, 0).astype(np.uint16)
            rows, cols = scan.shapes[slot]
            by_slot[slot] = native[view] = np.asarray(Image.fromarray(part).resize((cols, rows),
                                                                                  Image.Resampling.NEAREST))
            lesions += [(lid, view, "", s) for lid in range(next_id, next_id + n)]
            next_id += n
        scan.labels = training_level({}, by_slot, *scan.image.shape)[1]
    return lesions, native


def load_detector(path: Path, fold: int | None, split: str, explicit: bool):
    """The detector folds that propose learned candidates (score --detector): on the classifier's
    `split`, and reaching their target sensitivity on their own training folds unless `explicit`
    (--candidates learned) asks for them anyway."""
    from wbs_dist.infer.ensemble import Ensemble         # torch: the main process only

    det = Ensemble(path, fold, task="detect")
    below = det.below_target()
    if below:
        said = "; ".join(f"fold {k} {'no lesions' if s is None else f'{s:.1%}'} (target {t:.0%})"
                         for k, (s, t) in sorted(below.items()))
        message = (f"--detector {path} does not reach its target lesion sensitivity on its own training folds at "
                   f"its threshold ({said}): it misses lesions the classical finder would propose")
        if not explicit:
            raise UsageError(f"{message}. Pass --candidates learned to score with it anyway, or --candidates "
                             "classical for the finder")
        print(f"WARNING: {message}; scoring with it as --candidates learned asks", file=sys.stderr)
    if det.split and split and det.split != split:
        raise UsageError(f"--detector {path} was trained on split {det.split}, the classifier --run on {split}: "
                         "the out-of-fold rule needs one split (train both on the same store's folds)")
    return det
