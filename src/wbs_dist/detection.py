"""Lesion detection's yardstick, shared by training validation, the report and scoring: proposed
components matched to lesions, lesion sensitivity against false positives per study (FROC), and the
operating threshold chosen on training folds only.

A detector (or the classical hot-spot finder) proposes connected components on a study's image; a
true lesion is **found** when a proposed component overlaps it with overlap coefficient
|C n L| / min(|C|, |L|) > 0.3 (Szymkiewicz-Simpson: the finder's criterion, finder.py; a
component that takes in the joint under a lesion still finds it, where IoU would not), and a
component that finds no lesion is a **false positive**. A component may find several lesions (two
touching metastases), and a lesion may be found by several components; neither is a false
positive. A component more than MAX_AREA_RATIO (10) times a lesion's area does not find it: a
threshold low enough to melt the map into one body-sized blob would otherwise "find" every lesion
with no false positive (an untrained U-Net did exactly that: 100 % sensitivity at 0 false positives
a study at threshold 0.1); a region 10 times a lesion still takes in the joint under it.

A lesion shows on both views but is delineated on one (the study's protocol: the view where it is
less attenuated). Its other appearance sits at the mirrored place of the other view: the anterior
and posterior images are taken at once by opposed camera heads, same rows, columns mirrored, so on
the side-by-side image (anterior | posterior) it is the whole image flipped left-right
(`with_copies`). A component on such a copy (the same overlap rule) finds no delineation and is
**not a false positive** either: it is the lesion, seen from the other side. Before this rule every
lesion a detector saw on both views counted once as false; the number of such components is
`copies` in each FROC point, so nothing is hidden. The detector learns the copies as lesions too:
a target that calls one appearance lesion and its mirror image background is one no network can meet.

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
COUNTS = ("found", "lesions", "false", "copies")      # a study's counts at one threshold, as ranks gather them
COPY = 0x8000        # label-map ids from here on: a delineated lesion's appearance on the other view
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
    copies: int = 0     # components on a lesion's other-view appearance only: neither found nor false


def counts(m: Match) -> list[int]:
    return [m.found, m.lesions, m.false, m.copies]


def components(prob: np.ndarray, threshold: float) -> np.ndarray:
    """8-connected components of `prob >= threshold`: an int32 label map, 0 background."""
    labels, _ = ndi.label(np.asarray(prob) >= threshold, structure=EIGHT)
    return labels


def with_copies(labels: np.ndarray, image: np.ndarray) -> np.ndarray:
    """The side-by-side label map (anterior | posterior) with each delineated lesion's other-view
    appearance added as id | COPY, where that view was acquired (`image` has counts in its half) and
    nothing is delineated."""
    labels = np.asarray(labels)
    if labels.size and labels.max() >= COPY:
        raise ValueError(f"lesion ids must be below {COPY} (got {int(labels.max())})")
    half = labels.shape[1] // 2
    mirrored = labels[:, ::-1]
    acquired = np.zeros(labels.shape, bool)
    for h in (0, 1):
        acquired[:, h * half:(h + 1) * half] = np.asarray(image)[:, h * half:(h + 1) * half].any()
    out = labels.astype(np.uint16, copy=True)
    put = (labels == 0) & (mirrored > 0) & acquired
    out[put] = mirrored[put] | COPY
    return out


def _hits(proposed: np.ndarray, truth: np.ndarray, comp_ids, comp_area, overlap: float) -> np.ndarray:
    """(component, lesion) pairs where the component finds the lesion: overlap coefficient above
    `overlap`, component at most MAX_AREA_RATIO times the lesion."""
    les_ids, les_area = np.unique(truth[truth > 0], return_counts=True)
    both = (proposed > 0) & (truth > 0)
    pairs, inter = np.unique(np.stack([proposed[both], truth[both]]), axis=1, return_counts=True)
    if not inter.size:
        return np.zeros((0, 2), dtype=np.int64)
    comp = comp_area[np.searchsorted(comp_ids, pairs[0])]
    les = les_area[np.searchsorted(les_ids, pairs[1])]
    return pairs[:, (inter / np.minimum(comp, les) > overlap) & (comp <= MAX_AREA_RATIO * les)].T


def _sorted(proposed: np.ndarray, truth: np.ndarray, overlap: float):
    """(component ids, (component, lesion) hits on delineations, components on copies only, lesions)."""
    proposed, truth = np.asarray(proposed), np.asarray(truth)
    if proposed.shape != truth.shape:
        raise ValueError(f"proposed components {proposed.shape} and lesion map {truth.shape} differ in shape")
    comp_ids, comp_area = np.unique(proposed[proposed > 0], return_counts=True)
    copy = truth >= COPY
    delineated = np.where(copy, 0, truth)
    hit = _hits(proposed, delineated, comp_ids, comp_area, overlap)
    on_copy = set(_hits(proposed, np.where(copy, truth, 0), comp_ids, comp_area, overlap)[:, 0].tolist())
    lesions = int(np.unique(delineated[delineated > 0]).size)
    return comp_ids, hit, on_copy - set(hit[:, 0].tolist()), lesions


def match(proposed: np.ndarray, truth: np.ndarray, overlap: float = OVERLAP) -> Match:
    """Match a label map of proposed components against the study's lesion label map (ids > 0;
    ids >= COPY: other-view appearances, see with_copies)."""
    comp_ids, hit, copies, lesions = _sorted(proposed, truth, overlap)
    true_components = len(set(hit[:, 0].tolist()))
    return Match(lesions, len(set(hit[:, 1].tolist())), int(comp_ids.size) - true_components - len(copies),
                 int(comp_ids.size), len(copies))


def false_components(proposed: np.ndarray, truth: np.ndarray, overlap: float = OVERLAP) -> list[int]:
    """The ids of the proposed components that `match` counts false: they find no delineated lesion
    and lie on no lesion's other-view appearance."""
    comp_ids, hit, copies, _ = _sorted(proposed, truth, overlap)
    keep = set(hit[:, 0].tolist()) | copies
    return [int(c) for c in comp_ids if int(c) not in keep]


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
            "copies": sum(m.copies for m in matches), "studies": n}


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
    """FROC points from per-study counts (studies, thresholds, COUNTS): what ranks gather instead of
    probability maps."""
    counts = np.asarray(counts).reshape(-1, len(thresholds), len(COUNTS))
    return [point(float(t), [Match(int(l), int(f), int(x), 0, int(c)) for f, l, x, c in counts[:, j]])
            for j, t in enumerate(thresholds)]


def sensitivity_at(points: Sequence[dict], fp_per_study: float) -> float | None:
    """The highest sensitivity among the points with at most `fp_per_study` false positives a study
    (0.0 when none has so few; None when there are no lesions)."""
    usable = [p for p in points if p["sensitivity"] is not None]
    if not usable:
        return None
    return max((p["sensitivity"] for p in usable if p["fp_per_study"] <= fp_per_study), default=0.0)
