"""Lesion detection's yardstick, shared by training validation, the report and scoring: proposed
components matched to lesions, lesion sensitivity against false positives per study (FROC), and the
operating threshold chosen on training folds only.

A detector (or the classical hot-spot finder) proposes connected components on a study's image; a
true lesion is **found** when a proposed component overlaps it with overlap coefficient
|C n L| / min(|C|, |L|) > 0.3 (Szymkiewicz-Simpson: the finder's criterion, infer/candidates.py; a
component that takes in the joint under a lesion still finds it, where IoU would not), and a
component that finds no lesion is a **false positive**. A component may find several lesions (two
touching metastases), and a lesion may be found by several components; neither is a false
positive. A component more than MAX_AREA_RATIO (10) times a lesion's area does not find it: a
threshold low enough to melt the map into one body-sized blob would otherwise "find" every lesion
with no false positive (an untrained U-Net did exactly that: 100 % sensitivity at 0 false positives
a study at threshold 0.1); a region 10 times a lesion still takes in the joint under it. Lesions are delineated on one view although they show on both, so a component on the
other view's copy of a lesion counts as false: the figures are per delineation, as the
finder's measurements are.

Components are 8-connected (a diagonal step joins pixels: predicted blobs are not split along
their staircase edges).

FROC: at each threshold of a grid, sensitivity = found / lesions pooled over studies, and false
positives per study = false components / studies. The operating threshold is the highest whose
sensitivity on the *training* folds reaches the target (default 95 %): fewest false positives at
that sensitivity, never chosen on the fold it is then measured on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

OVERLAP = 0.3
MAX_AREA_RATIO = 10
TARGET_SENSITIVITY = 0.95
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 0.951, 0.05))
EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Match:
    lesions: int        # true lesions of the study
    found: int          # of them, found by a component
    false: int          # components that find no lesion
    components: int     # components proposed


def components(prob: np.ndarray, threshold: float) -> np.ndarray:
    """8-connected components of `prob >= threshold`: an int32 label map, 0 background."""
    labels, _ = ndi.label(np.asarray(prob) >= threshold, structure=EIGHT)
    return labels


def match(proposed: np.ndarray, truth: np.ndarray, overlap: float = OVERLAP) -> Match:
    """Match a label map of proposed components against the study's lesion label map (ids > 0)."""
    proposed, truth = np.asarray(proposed), np.asarray(truth)
    if proposed.shape != truth.shape:
        raise ValueError(f"proposed components {proposed.shape} and lesion map {truth.shape} differ in shape")
    comp_ids, comp_area = np.unique(proposed[proposed > 0], return_counts=True)
    les_ids, les_area = np.unique(truth[truth > 0], return_counts=True)
    both = (proposed > 0) & (truth > 0)
    pairs, inter = np.unique(np.stack([proposed[both], truth[both]]), axis=1, return_counts=True)
    hit = np.zeros((0, 2), dtype=np.int64)
    if inter.size:
        smaller = np.minimum(comp_area[np.searchsorted(comp_ids, pairs[0])],
                             les_area[np.searchsorted(les_ids, pairs[1])])
        comp = comp_area[np.searchsorted(comp_ids, pairs[0])]
        les = les_area[np.searchsorted(les_ids, pairs[1])]
        hit = pairs[:, (inter / smaller > overlap) & (comp <= MAX_AREA_RATIO * les)].T
    found = len(set(hit[:, 1].tolist()))
    true_components = len(set(hit[:, 0].tolist()))
    return Match(int(les_ids.size), found, int(comp_ids.size) - true_components, int(comp_ids.size))


def froc(probs: Sequence[np.ndarray], truths: Sequence[np.ndarray],
         thresholds: Sequence[float] = THRESHOLDS) -> list[dict]:
    """One FROC point per threshold: {"threshold", "sensitivity", "fp_per_study", "found", "lesions",
    "false", "studies"}, pooled over the studies given (probability maps and lesion label maps)."""
    if len(probs) != len(truths):
        raise ValueError(f"{len(probs)} probability maps but {len(truths)} lesion maps")
    points = []
    for t in thresholds:
        ms = [match(components(p, t), y) for p, y in zip(probs, truths)]
        points.append(point(float(t), ms))
    return points


def point(threshold: float | None, matches: Sequence[Match]) -> dict:
    """Pooled sensitivity and false positives per study of some studies' matches."""
    lesions = sum(m.lesions for m in matches)
    found = sum(m.found for m in matches)
    false = sum(m.false for m in matches)
    n = len(matches)
    return {"threshold": threshold, "sensitivity": found / lesions if lesions else None,
            "fp_per_study": false / n if n else None, "found": found, "lesions": lesions, "false": false,
            "studies": n}


def choose_threshold(points: Sequence[dict], target: float = TARGET_SENSITIVITY) -> tuple[float, str]:
    """The highest threshold whose sensitivity reaches `target` on these (training) points, and a note;
    when none does, the threshold of the highest sensitivity (ties: the higher threshold), said so."""
    usable = [p for p in points if p["sensitivity"] is not None]
    if not usable:
        raise ValueError("no FROC point has lesions: the threshold cannot be chosen")
    reaching = [p for p in usable if p["sensitivity"] >= target]
    if reaching:
        best = max(reaching, key=lambda p: p["threshold"])
        return best["threshold"], (f"threshold {best['threshold']:g}: the highest reaching sensitivity "
                                   f"{target:.0%} on the training folds")
    best = max(usable, key=lambda p: (p["sensitivity"], p["threshold"]))
    return best["threshold"], (f"threshold {best['threshold']:g}: no threshold reaches sensitivity {target:.0%} "
                               f"on the training folds; the highest sensitivity there ({best['sensitivity']:.1%})")


def froc_from_counts(counts: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> list[dict]:
    """FROC points from per-study counts (studies, thresholds, [found, lesions, false]): what ranks
    gather instead of probability maps."""
    counts = np.asarray(counts).reshape(-1, len(thresholds), 3)
    return [point(float(t), [Match(int(l), int(f), int(x), 0) for f, l, x in counts[:, j]])
            for j, t in enumerate(thresholds)]


def sensitivity_at(points: Sequence[dict], fp_per_study: float) -> float | None:
    """The highest sensitivity among the points with at most `fp_per_study` false positives a study
    (0.0 when none has so few; None when there are no lesions)."""
    usable = [p for p in points if p["sensitivity"] is not None]
    if not usable:
        return None
    return max((p["sensitivity"] for p in usable if p["fp_per_study"] <= fp_per_study), default=0.0)
