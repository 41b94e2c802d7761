"""Learned candidates: the detector ensemble's lesion proposals for a study without delineations.

For each network image of the study (score.Scan: anterior | posterior side by side at the training
level), the detector folds' mean lesion probability map (the known patient's own fold alone, by the
out-of-fold rule), cut at the threshold the folds chose on their training folds (the median of the
folds'; a single fold's own), and its connected components (detection.py, 8-connected)
within each view's half: a component never spans two views. Each component becomes a lesion of the
study, numbered across the study in view order as the annotation contract numbers lesions (DESIGN
3.2), and the classifier scores it like a delineated one. For overlays, each view's label map is
brought back to the view's native size (nearest neighbour: the training level is a plain stretch of
each view, preprocess.training_level).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from wbs_dist.detection import components
from wbs_dist.preprocess import normalise
from wbs_dist.schema import VIEWS


def propose(detector, scans: list, native_shapes: dict[str, tuple[int, int]], fold: int
            ) -> tuple[list[tuple[int, str, str, int]], dict[str, np.ndarray]]:
    """Fill each scan's label map with the detector's components; (lesions as (id, view, label '',
    scan), native-size label map per view)."""
    lesions, native = [], {}
    next_id = 1
    for s, scan in enumerate(scans):
        x = normalise(scan.image, np.float32(scan.scale))[None, None]
        prob, threshold = detector.maps(x, fold)
        height, width = scan.image.shape
        half = width // 2
        labels = np.zeros((height, width), np.uint16)
        for i, slot in enumerate(VIEWS):
            view = scan.slots.get(slot)
            if view is None:
                continue
            comp = components(prob[0][:, i * half:(i + 1) * half], threshold)
            n = int(comp.max())
            part = np.where(comp > 0, comp + next_id - 1, 0).astype(np.uint16)
            labels[:, i * half:(i + 1) * half] = part
            lesions += [(lid, view, "", s) for lid in range(next_id, next_id + n)]
            next_id += n
            if view in native_shapes:
                rows, cols = native_shapes[view]
                native[view] = np.asarray(Image.fromarray(part).resize((cols, rows), Image.Resampling.NEAREST))
        scan.labels = labels
    return lesions, native
