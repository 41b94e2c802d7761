"""Lesions: how many a patient has, where they sit, what they look like, and how they are labelled.

Each lesion's features (site, irregularity, contrast, size, symmetric pair) are drawn from its
intended class; a latent score weighs those features and the patient's burden, and the label is the
sign of score + Gaussian noise (see the package docstring for the shares this reaches). Lesions are
placed apart from each other on the patient's scaled and shifted skeleton and delineated on the view
where they are less attenuated.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from wbs_dist.schema import ANTERIOR, BENIGN, MALIGNANT, POSTERIOR, VIEWS
from wbs_dist.synth.body import C0, COLS, R0, ROWS, attenuation
from wbs_dist.synth.sites import SITES, benign_sites, malignant_sites


@dataclass(frozen=True)
class Lesion:
    lesion_id: int
    view: str  # the view it is delineated on
    label: str  # malignant | benign
    site: str
    region: str  # axial | appendicular | joint
    row: float  # centre in the delineated view's pixel coordinates
    col: float
    depth: float  # 0 = anterior surface, 1 = posterior surface
    sigma: float  # blob scale in pixels
    contrast: float  # peak uptake relative to the bone beneath it
    irregularity: float  # 0 round .. 1 irregular
    paired: bool  # one of a symmetric (degenerative) pair
    score: float  # latent malignancy score without the label noise
    blobs: tuple = field(repr=False, default=())  # (d_row, d_col, s_row, s_col, angle, weight), anterior


# Latent score: weights on the lesion's visible features and the patient's burden. The label is the
# sign of score + noise; the noise scale flips about 15 % of labels against the noise-free sign.
_REGION_WEIGHT = {"axial": 0.9, "appendicular": 0.4, "joint": -1.1}
_SCORE_BIAS = -0.75
_SCORE_NOISE = 1.7
_BURDEN_WEIGHT = 1.2
_NONMET_EXTRA = 1.3  # mean extra lesions (beyond one) in patients without metastasis
_MET_MEAN = 9.5  # mean lesion count in metastatic patients
_MET_DISPERSION = 4.0  # negative-binomial shape of that count: smaller = more extreme burdens
_MET_LESION_MALIGNANT = 0.75


@functools.lru_cache(maxsize=2)
def _count_quantiles(metastatic: bool) -> np.ndarray:
    """1000 quantiles of the lesion count: 1 + negative binomial (metastatic) or 1 + Poisson."""
    x = np.arange(200)
    lgx = np.array([math.lgamma(v + 1) for v in x])
    if metastatic:
        k, mean = _MET_DISPERSION, _MET_MEAN - 1
        p = k / (k + mean)
        lg = np.array([math.lgamma(v + k) for v in x]) - lgx - math.lgamma(k)
        pmf = np.exp(lg + k * math.log(p) + x * math.log1p(-p))
        cap = 30
    else:
        pmf = np.exp(x * math.log(_NONMET_EXTRA) - _NONMET_EXTRA - lgx)
        cap = 9
    q = (np.arange(1000) + 0.5) / 1000
    extra = np.searchsorted(np.cumsum(pmf), q)
    return np.minimum(cap, 1 + extra)


def lesion_count(metastatic: bool, u: float) -> int:
    # a quantile, not a draw: the stratified u keeps an archive's total burden near its expectation
    return int(_count_quantiles(metastatic)[int(u * 1000)])


def _latent_score(region, irregularity, contrast, sigma, paired, n_lesions) -> float:
    return (_SCORE_BIAS + _REGION_WEIGHT[region] + 2.2 * (irregularity - 0.47)
            + 1.6 * (math.log(contrast) - math.log(2.35)) + 0.8 * (math.log(sigma) - math.log(3.2))
            - 0.8 * paired + _BURDEN_WEIGHT * (math.log(n_lesions) - math.log(3.0)))


def _lesion_features(rng, malignant: bool):
    if malignant:
        irr = rng.beta(4.0, 2.5)
        contrast = math.exp(rng.normal(math.log(3.0), 0.4))
        sigma = math.exp(rng.normal(math.log(3.8), 0.25))
    else:
        irr = rng.beta(2.0, 4.0)
        contrast = math.exp(rng.normal(math.log(1.9), 0.35))
        sigma = math.exp(rng.normal(math.log(2.7), 0.25))
    return float(irr), float(max(1.3, contrast)), float(np.clip(sigma, 1.6, 7.0))


def _blobs(rng, irregularity: float, sigma: float) -> tuple:
    """Irregular lesions are several anisotropic blobs; round ones a single near-isotropic blob."""
    n = 1 + int(rng.binomial(3, irregularity))
    out = []
    for k in range(n):
        off = 0.0 if k == 0 else sigma * irregularity * rng.uniform(0.6, 1.3)
        a = rng.uniform(0, 2 * math.pi)
        elong = 1.0 + 1.4 * irregularity * rng.random()
        s_r, s_c = sigma * elong ** 0.5, sigma / elong ** 0.5
        w = 1.0 if k == 0 else rng.uniform(0.5, 0.9)
        out.append((off * math.sin(a), off * math.cos(a), s_r, s_c, rng.uniform(0, math.pi), w))
    return tuple(out)


def extent(blobs) -> float:
    return max(math.hypot(b[0], b[1]) + 1.8 * max(b[2], b[3]) for b in blobs)


# ----------------------------------------------------------------------------------------------------
# Placement and labels


def anterior_position(les) -> tuple[float, float]:
    return (les.row, les.col) if les.view == ANTERIOR else (les.row, COLS - 1 - les.col)


def clear_of(lesions, row, col, ext) -> bool:
    for les in lesions:
        r, c = anterior_position(les) if isinstance(les, Lesion) else (les["row_a"], les["col_a"])
        e = les["ext"] if isinstance(les, dict) else extent(les.blobs)
        if math.hypot(r - row, c - col) < e + ext + 2.0:
            return False
    return True


def _place_lesions(rng, tumor, metastatic, n_target, geometry) -> list[dict]:
    scale, dy, dx = geometry
    mal_names, mal_p = malignant_sites(tumor)
    ben_names, ben_p = benign_sites()
    placed: list[dict] = []

    def add(site, r, x, depth, irr, contrast, sigma, blobs, paired) -> bool:
        row = R0 + scale * r + dy
        col_a = C0 + scale * x + dx
        if not (4 <= row <= ROWS - 5 and 4 <= col_a <= COLS - 5):
            return False
        blobs = tuple((b[0] * scale, b[1] * scale, b[2] * scale, b[3] * scale, b[4], b[5]) for b in blobs)
        ext = extent(blobs)
        if not clear_of(placed, row, col_a, ext):
            return False
        a_ant, a_post = attenuation(depth, 20)
        if abs(a_ant - a_post) < 0.05:
            view = VIEWS[int(rng.integers(2))]
        else:
            view = ANTERIOR if a_ant > a_post else POSTERIOR
        col = col_a if view == ANTERIOR else COLS - 1 - col_a
        placed.append(dict(site=site, region=SITES[site][0], row=float(row), col=float(col),
                           row_a=float(row), col_a=float(col_a), depth=float(depth), view=view,
                           irr=irr, contrast=contrast, sigma=sigma, blobs=blobs, ext=ext,
                           paired=paired))
        return True

    attempts = 0
    while len(placed) < n_target and attempts < 40 * n_target:
        attempts += 1
        malignant = metastatic and rng.random() < _MET_LESION_MALIGNANT
        names, p = (mal_names, mal_p) if malignant else (ben_names, ben_p)
        site = names[rng.choice(len(names), p=p)]
        r, x, depth = SITES[site][1](rng)
        irr, contrast, sigma = _lesion_features(rng, malignant)
        blobs = _blobs(rng, irr, sigma)
        want_pair = (not malignant and SITES[site][0] == "joint" and rng.random() < 0.5
                     and len(placed) + 2 <= n_target)
        if not add(site, r, x, depth, irr, contrast, sigma, blobs, want_pair):
            continue
        if want_pair:  # the contralateral joint, a little different
            mirrored = tuple((b[0], -b[1], b[2], b[3], math.pi - b[4], b[5]) for b in blobs)
            s2 = sigma * float(rng.uniform(0.85, 1.15))
            c2 = float(max(1.3, contrast * rng.uniform(0.85, 1.15)))
            if not add(site, r + rng.uniform(-2, 2), -x, depth, irr, c2, s2, mirrored, True):
                placed[-1]["paired"] = False
    return placed


def make_lesions(rng, tumor: str, metastatic: bool, n_target: int, geometry) -> tuple[Lesion, ...]:
    """Place up to `n_target` lesions on the patient of `geometry` (scale, row shift, column shift) and
    label them; ids run from 1 in placement order."""
    scale = geometry[0]
    lesions = _place_lesions(rng, tumor, metastatic, n_target, geometry)
    n = len(lesions)
    final = []
    for k, les in enumerate(lesions, start=1):
        score = _latent_score(les["region"], les["irr"], les["contrast"], les["sigma"], les["paired"], n)
        label = MALIGNANT if score + _SCORE_NOISE * rng.normal() > 0 else BENIGN
        final.append(Lesion(lesion_id=k, view=les["view"], label=label, site=les["site"],
                            region=les["region"], row=les["row"], col=les["col"], depth=les["depth"],
                            sigma=les["sigma"] * scale, contrast=les["contrast"],
                            irregularity=les["irr"], paired=les["paired"], score=float(score),
                            blobs=les["blobs"]))
    return tuple(final)
