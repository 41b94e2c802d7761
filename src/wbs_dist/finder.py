"""Hot-spot candidates: where to look in a study that has no annotations.

A classical detector, per view, at the view's native resolution (pixels of a 1024 x 256-class
whole-body matrix, about 2.2 mm; levels in units of the skeleton's typical uptake `ref`):

1. **Smooth** the counts with a Gaussian of sigma 2 px (about the camera's resolution) against
   Poisson noise.
2. **Normalise to the skeleton's typical uptake**: `ref` = the 90th percentile of the smoothed body
   pixels (body = smoothed counts > 0.5). Bone is roughly the brightest fifth of the body, so this
   lands on ordinary bone; unlike `store.count_scale`'s 99th percentile it stays below the bladder.
3. Two **excess maps**, in units of `ref`:
   - *asymmetry* `A = s - dilate(mirror(s))`: the view mirrored about the body's midline (the
     shift that best correlates the view with its mirror image), dilated by a 3 x 3 maximum to
     forgive 1 px misalignments. The normal skeleton is nearly left-right symmetric; most lesions are not.
   - *hot spot* `H = s - background`, the background being the largest grey-scale opening of `s`
     by a 41 px line segment over 8 orientations (computed at half resolution): it keeps elongated
     bone (shafts, ribs, spine) and removes compact blobs. `H` finds what asymmetry cannot: midline
     lesions (spine, sternum, skull) and symmetric pairs (degenerative joints).
4. **Seeds**: local maxima (7 px window) of `A` with `A >= 0.1` and `s >= 1.1 x` the mirrored side;
   of `H` with `H >= 0.6`, `s >= 1.9 x` the background and `s >= 0.8 ref`.
5. **Region growing**, hottest seed first: the connected pixels of the seed's map at or above 35 %
   of the seed's value (annotators commonly delineate at 30-40 % of a lesion's peak; the synthetic
   masks are drawn at 30 %), not taken by an earlier region, within 24 px of the seed. When that
   leaks (reaches the edge of the window, exceeds 1500 px or an elongation of 4 -- a shaft, a
   clavicle), the level is raised to 50, 65, 80 % until it is a blob; a seed with no blob at any
   level gives no candidate. Regions under 6 px are dropped.
6. **Exclusions**: the *bladder* -- what survives a grey-scale opening by a 12 px disk (larger than
   any lesion, smaller than a bladder) above 1.8 ref: the largest such blob of at least 400 px whose
   centre lies in the pelvic band (42-60 % of the body's height from its top) within 12 % of the
   body's width of the midline; seeds in it are ignored and no region grows into it. A bladder
   dimmer than 1.8 ref is no hotter than a joint and is not excluded. An *injection site* -- a
   region of at most 300 px hotter than 5 ref in the arm periphery (further from the midline than
   65 % of the body's half-width) or outside the body outline (tracer extravasated at the elbow or
   hand).

Result: one uint16 label map per view, ids 1..n numbered across the study in view order (the
annotation contract's label maps, DESIGN 3.2), so a candidate is a lesion to the scorer.

Measured (tests/test_candidates.py) on a held-out synthetic archive, seed 4242, 20 studies, 73
annotated lesions, never used for tuning (tuned on seeds 101, 77, 5 and 2024): 95.9 % of lesions
found, a lesion counting as found when a candidate of its view overlaps it with overlap coefficient
|C n L| / min(|C|, |L|) > 0.3 (80.8 % with IoU > 0.3: hot-spot regions often take in the joint
under a lesion); 36.8 false candidates a study (at most 43), plus 3.6 on the other view's image of
an annotated lesion (every lesion shows on both views but is delineated on one); no injection site
and no hot bladder kept; ~0.2 s a study on one core. The false candidates are mostly normal joints,
sacroiliac joints, the kidneys and the manubrium: the price of finding symmetric joint lesions
without an atlas of normal uptake. The misses are lesions that barely rise above the bone they sit
on (less than ~0.35 ref), and those under a hot bladder.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

SIGMA = 2.0
BODY_COUNTS = 0.5
REF_PERCENTILE = 90.0
MIRROR_TOLERANCE = 3
MAX_MIRROR_SHIFT = 48
LINE_LENGTH = 41
LINE_ORIENTATIONS = 8
PEAK_WINDOW = 7
ASYM_EXCESS, ASYM_RATIO = 0.10, 1.10
HOT_EXCESS, HOT_RATIO, HOT_LEVEL = 0.60, 1.90, 0.80
GROW_FRACTIONS = (0.35, 0.5, 0.65, 0.8)
GROW_RADIUS = 24
MIN_AREA, MAX_AREA = 6, 1500
MAX_ELONGATION = 4.0
BLADDER_BAND = (0.42, 0.60)
BLADDER_HALF_WIDTH = 0.12
BLADDER_MIN_AREA = 400
BLADDER_RADIUS = 12
BLADDER_LEVEL = 1.8
INJECTION_LEVEL = 5.0
INJECTION_MAX_AREA = 300
ARM_PERIPHERY = 0.65

# Part of a scoring run's fingerprint: results found with other parameters are not reused.
PARAMETERS = {k: v for k, v in globals().items() if k.isupper()}


@dataclass
class Region:
    view: str
    label: int              # id in the study's label map
    row: int                # seed (peak) position
    col: int
    area: int
    peak: float             # smoothed counts at the seed / ref
    channel: str            # "asymmetry" | "hot"


@lru_cache(maxsize=LINE_ORIENTATIONS)
def _line(k: int) -> np.ndarray:
    """A line segment LINE_LENGTH native pixels long (at half resolution) at angle k/n x 180 deg."""
    angle = np.pi * k / LINE_ORIENTATIONS
    n = LINE_LENGTH // 2 + 1
    r = (n - 1) / 2
    fp = np.zeros((n, n), bool)
    for t in np.linspace(-r, r, 4 * n):
        fp[int(round(r + t * np.sin(angle))), int(round(r + t * np.cos(angle)))] = True
    ys, xs = np.nonzero(fp)
    return fp[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _half(s: np.ndarray) -> np.ndarray:
    h, w = s.shape
    return s[: h - h % 2, : w - w % 2].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))


def _full(half: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    full = ndi.zoom(half, 2, order=1, mode="nearest", grid_mode=True)
    return np.pad(full, ((0, shape[0] - full.shape[0]), (0, shape[1] - full.shape[1])), mode="edge")


def _line_background(s: np.ndarray) -> np.ndarray:
    # At half resolution (the background is smooth; an opening costs its footprint per pixel),
    # then back up: a quarter of the pixels and half the footprint, 8x cheaper.
    half = _half(s)
    out = ndi.grey_opening(half, footprint=_line(0))
    for k in range(1, LINE_ORIENTATIONS):
        np.maximum(out, ndi.grey_opening(half, footprint=_line(k)), out=out)
    return _full(out, s.shape)


def _mirror(s: np.ndarray) -> tuple[np.ndarray, float]:
    """The view mirrored about the body's midline, and that midline's column."""
    width = s.shape[1]
    flipped = s[:, ::-1]
    n = 2 * width
    corr = np.fft.irfft(np.fft.rfft(s, n=n, axis=1) * np.conj(np.fft.rfft(flipped, n=n, axis=1)), n=n, axis=1).sum(0)
    shifts = np.arange(-min(MAX_MIRROR_SHIFT, width - 1), min(MAX_MIRROR_SHIFT, width - 1) + 1)
    d = int(shifts[np.argmax(corr[shifts % n])])
    return np.roll(flipped, d, axis=1), (width - 1 + d) / 2


def _elongation(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    if len(ys) < 3:
        return 1.0
    cov = np.cov(np.stack([ys, xs]).astype(np.float64)) + np.eye(2) / 12  # a pixel's own extent
    ev = np.linalg.eigvalsh(cov)
    return float(np.sqrt(ev[1] / max(ev[0], 1e-9)))


def _grow(excess: np.ndarray, r: int, c: int, value: float, taken: np.ndarray):
    """The seed's blob: the connected pixels at or above f x value, for the lowest f of
    GROW_FRACTIONS at which that is a blob (at most MAX_AREA px and MAX_ELONGATION, not reaching
    the edge of the GROW_RADIUS window, i.e. not leaking into neighbouring structures).
    Returns (window, mask within it), or None when no level gives a blob."""
    h, w = excess.shape
    r0, r1 = max(0, r - GROW_RADIUS), min(h, r + GROW_RADIUS + 1)
    c0, c1 = max(0, c - GROW_RADIUS), min(w, c + GROW_RADIUS + 1)
    window = (slice(r0, r1), slice(c0, c1))
    sub, free = excess[window], taken[window] == 0
    for fraction in GROW_FRACTIONS:
        lab, _ = ndi.label((sub >= fraction * value) & free)
        comp = lab == lab[r - r0, c - c0]
        leaks = ((r0 > 0 and comp[0].any()) or (r1 < h and comp[-1].any())
                 or (c0 > 0 and comp[:, 0].any()) or (c1 < w and comp[:, -1].any()))
        if not leaks and comp.sum() <= MAX_AREA and _elongation(comp) <= MAX_ELONGATION:
            return window, comp
    return None


def _bladder(s: np.ndarray, ref: float, top: int, height: int, midline: float, half_width: float) -> np.ndarray:
    """The bladder: what survives an opening by a disk larger than any lesion (BLADDER_RADIUS) above
    BLADDER_LEVEL x ref, the largest such blob of at least BLADDER_MIN_AREA px whose centre lies in
    the pelvic band near the midline; else nothing. The opening keeps the bladder's round pool and
    drops the narrower hot bone beside it (sacroiliac joints, pubis) and lesions on it."""
    r = BLADDER_RADIUS // 2
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    opened = _full(ndi.grey_opening(_half(s), footprint=yy * yy + xx * xx <= r * r), s.shape)
    lab, n = ndi.label(opened >= BLADDER_LEVEL * ref)
    best, best_area = 0, BLADDER_MIN_AREA - 1
    if n:
        index = np.arange(1, n + 1)
        areas = ndi.sum_labels(np.ones(s.shape), lab, index)
        for k, area, (cr, cc) in zip(index, areas, ndi.center_of_mass(np.ones(s.shape), lab, index)):
            if (area > best_area and BLADDER_BAND[0] <= (cr - top) / height <= BLADDER_BAND[1]
                    and abs(cc - midline) <= BLADDER_HALF_WIDTH * 2 * half_width):
                best, best_area = k, area
    return lab == best if best else np.zeros(s.shape, bool)


def find_view(counts: np.ndarray, view: str = "unknown") -> tuple[np.ndarray, list[Region]]:
    """One view's candidates: an int32 label map (ids 1..n) and the regions, in id order."""
    s = ndi.gaussian_filter(np.asarray(counts, np.float32), SIGMA)
    body = s > BODY_COUNTS
    if not body.any():
        return np.zeros(s.shape, np.int32), []
    ref = max(float(np.percentile(s[body], REF_PERCENTILE)), 1e-6)
    mirrored, midline = _mirror(s)
    mirrored = ndi.maximum_filter(mirrored, size=MIRROR_TOLERANCE)
    background = _line_background(s)
    asym = (s - mirrored) / ref
    hot = (s - background) / ref

    rows = np.nonzero(body.any(axis=1))[0]
    top, height = int(rows[0]), max(int(rows[-1] - rows[0]), 1)
    half_width = max(float(np.percentile(np.abs(np.nonzero(body)[1] - midline), 98)), 1.0)
    bladder = _bladder(s, ref, top, height, midline, half_width)

    seeds = []
    for excess, name, ok in (
        (asym, "asymmetry", (asym >= ASYM_EXCESS) & (s >= ASYM_RATIO * mirrored)),
        (hot, "hot", (hot >= HOT_EXCESS) & (s >= HOT_RATIO * background) & (s >= HOT_LEVEL * ref)),
    ):
        peaks = ok & (excess == ndi.maximum_filter(excess, size=PEAK_WINDOW)) & ~bladder
        seeds += [(float(excess[r, c]), int(r), int(c), name) for r, c in np.argwhere(peaks)]
    seeds.sort(key=lambda t: (-t[0], t[1], t[2]))

    # The bladder is taken before any region grows, so no candidate grows into it.
    taken = np.where(bladder, -1, 0).astype(np.int32)
    grown = []
    for value, r, c, name in seeds:
        if taken[r, c]:
            continue
        excess = asym if name == "asymmetry" else hot
        blob = _grow(excess, r, c, value, taken)
        if blob is None:
            continue
        window, comp = blob
        grown.append(Region(view, len(grown) + 1, r, c, int(comp.sum()), float(s[r, c] / ref), name))
        taken[window][comp] = grown[-1].label
    taken[bladder] = 0

    kept = []
    for reg in grown:
        if reg.area < MIN_AREA:
            continue
        if reg.peak >= INJECTION_LEVEL and reg.area <= INJECTION_MAX_AREA:
            mask = taken == reg.label
            ring = ndi.binary_dilation(mask, iterations=3) & ~mask
            outside = (~body[ring]).mean() > 0.5
            if outside or abs(reg.col - midline) > ARM_PERIPHERY * half_width:
                continue
        kept.append(reg)

    lut = np.zeros(len(grown) + 1, np.int32)
    for new, reg in enumerate(kept, start=1):
        lut[reg.label] = new
        reg.label = new
    return lut[taken], kept


def find_candidates(views: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[Region]]:
    """A study's candidates: a uint16 label map per view (ids 1..n across the study, in the order of
    `views`) and the regions. Views without a candidate get an all-zero map."""
    labels, regions, offset = {}, [], 0
    for view, counts in views.items():
        lab, found = find_view(counts, view)
        if offset + len(found) > np.iinfo(np.uint16).max:
            found = found[: np.iinfo(np.uint16).max - offset]
            lab[lab > len(found)] = 0
        lab[lab > 0] += offset
        for reg in found:
            reg.label += offset
        labels[view] = lab.astype(np.uint16)
        regions += found
        offset += len(found)
    return labels, regions


def finder_match(views: dict[str, np.ndarray], labels: dict[str, np.ndarray], height: int, width: int):
    """The finder on one annotated study (native views and label maps by slot, schema.VIEWS), matched
    as the learned detector is (detection.match): its regions and the delineations with their
    other-view copies brought to the detector's level (height, width)."""
    from wbs_dist.detection import match, with_copies
    from wbs_dist.preprocess import training_level

    found, _ = find_candidates(views)
    image, truth = training_level(views, {v: a for v, a in labels.items() if v in views}, height, width)
    return match(training_level({}, found, height, width)[1], with_copies(truth, image))


def finder_point(store, study_keys, height: int, width: int) -> dict:
    """The finder's pooled operating point (detection.point) on stored annotated studies at the
    detector's level, for the detector's FROC plot (evaluate/detection_report.py)."""
    from wbs_dist.detection import point
    from wbs_dist.schema import VIEWS

    matches = []
    for key in study_keys:
        views, labels = store.native_study(key)
        views = {v: a for v, a in views.items() if v in VIEWS}
        matches.append(finder_match(views, labels, height, width))
    return point(None, matches)
