"""Where lesions occur: site samplers on the reference skeleton and the site mix of each label.

Each sampler returns (r, x, depth) in the reference coordinates of body.py. :data:`SITES` names each
site's region (axial, appendicular, joint), which the label model weighs; malignant lesions favour the
axial skeleton (more so for each primary's typical spread), benign ones the joints.
"""

from __future__ import annotations

import math

import numpy as np

from wbs_dist.schema import BREAST, LUNG, PROSTATE
from wbs_dist.synth.body import C_SPINE, L_SPINE, T_SPINE, rib_path


def pick_side(rng) -> int:
    return -1 if rng.random() < 0.5 else 1


def _site_spine(rng, lumbar_bias=False):
    verts = C_SPINE[2:] + T_SPINE + L_SPINE
    w = np.array([0.5] * 5 + [1.0] * 12 + [1.3] * 5)
    if lumbar_bias:
        w[-7:] *= 3.0
    r, half = verts[rng.choice(len(verts), p=w / w.sum())]
    return r + rng.uniform(-2, 2), rng.uniform(-0.6, 0.6) * half, 0.72


def _site_rib(rng):
    i = int(rng.integers(1, 11))
    pts = rib_path(i, pick_side(rng))
    j = int(rng.integers(1, len(pts) - 1))
    t = rng.random()
    return tuple(pts[j][k] + t * (pts[j + 1][k] - pts[j][k]) for k in range(3))


def _site_pelvis(rng):
    s = pick_side(rng)
    k = rng.random()
    if k < 0.4:  # iliac wing
        return 322 + rng.uniform(-15, 15), s * (50 + rng.uniform(-14, 14)), 0.6
    if k < 0.6:  # sacrum
        return 352 + rng.uniform(-15, 15), rng.uniform(-10, 10), 0.8
    if k < 0.8:  # acetabulum
        return 366 + rng.uniform(-5, 5), s * (44 + rng.uniform(-4, 4)), 0.5
    return 400 + rng.uniform(-8, 8), s * (24 + rng.uniform(-10, 6)), 0.4  # pubis / ischium


def _site_si(rng):
    s = pick_side(rng)
    t = rng.random()
    return 340 + 38 * t, s * (16 + 6 * t), 0.85


def _site_skull(rng):
    a = rng.uniform(-math.pi * 0.9, math.pi * 0.9)
    return 50 - 40 * math.cos(a), 29 * math.sin(a), rng.uniform(0.3, 0.7)


def _site_sternum(rng):
    return rng.uniform(146, 214), rng.uniform(-3, 3), 0.1


def _site_scapula(rng):
    s = pick_side(rng)
    return 178 + rng.uniform(-25, 25), s * (56 + rng.uniform(-10, 10)), 0.9


def _site_clavicle(rng):
    s, t = pick_side(rng), rng.random()
    return 128 - 7 * t, s * (10 + 62 * t), 0.15


def _site_humerus(rng):
    s, t = pick_side(rng), rng.uniform(0.05, 0.5)
    return 148 + 130 * t, s * (84 + 10 * t), 0.5


def _site_femur(rng):
    s, t = pick_side(rng), rng.uniform(0.0, 0.55)
    return 378 + 162 * t, s * (58 - 22 * t), 0.5


def _site_tibia(rng):
    s, t = pick_side(rng), rng.uniform(0.1, 0.9)
    return 566 + 166 * t, s * (33 - 3 * t), 0.35


def _joint(centres, jitter, depth):
    def sample(rng):
        r, x = centres[int(rng.integers(len(centres)))]
        s = pick_side(rng)
        return r + rng.uniform(-jitter, jitter), s * (x + rng.uniform(-jitter, jitter)), depth

    return sample


# name -> (region, sampler)
SITES = {
    "spine": ("axial", _site_spine),
    "spine_degenerative": ("axial", lambda rng: _site_spine(rng, lumbar_bias=True)),
    "rib": ("axial", _site_rib),
    "pelvis": ("axial", _site_pelvis),
    "sacroiliac": ("axial", _site_si),
    "skull": ("axial", _site_skull),
    "sternum": ("axial", _site_sternum),
    "scapula": ("appendicular", _site_scapula),
    "clavicle": ("appendicular", _site_clavicle),
    "humerus": ("appendicular", _site_humerus),
    "femur": ("appendicular", _site_femur),
    "tibia": ("appendicular", _site_tibia),
    "shoulder": ("joint", _joint([(140, 80), (124, 70)], 4, 0.5)),
    "elbow": ("joint", _joint([(284, 95)], 4, 0.5)),
    "wrist_hand": ("joint", _joint([(386, 103), (400, 102), (415, 103)], 3, 0.5)),
    "hip": ("joint", _joint([(370, 50)], 4, 0.5)),
    "knee": ("joint", _joint([(548, 29), (548, 41), (560, 34), (540, 35)], 3, 0.45)),
    "ankle": ("joint", _joint([(740, 31)], 3, 0.5)),
    "foot": ("joint", _joint([(752, 30), (764, 30)], 4, 0.6)),
}
_MALIGNANT_SITES = {"spine": 0.34, "rib": 0.18, "pelvis": 0.18, "skull": 0.06, "sternum": 0.04,
                    "scapula": 0.04, "femur": 0.07, "humerus": 0.04, "clavicle": 0.01, "shoulder": 0.02,
                    "hip": 0.01, "knee": 0.01}
_BENIGN_SITES = {"knee": 0.2, "shoulder": 0.13, "ankle": 0.09, "elbow": 0.05, "wrist_hand": 0.07,
                 "foot": 0.07, "hip": 0.06, "spine_degenerative": 0.1, "rib": 0.08, "sacroiliac": 0.03,
                 "skull": 0.03, "sternum": 0.02, "clavicle": 0.02, "tibia": 0.02}
_TUMOR_SITE_BIAS = {  # where each primary tends to spread
    PROSTATE: {"spine": 1.3, "pelvis": 1.4},
    BREAST: {"rib": 1.3, "sternum": 1.5, "skull": 1.4, "spine": 1.1},
    LUNG: {"femur": 1.6, "humerus": 1.6, "scapula": 1.3, "rib": 1.2},
}


def _site_probs(table: dict, bias: dict) -> tuple[list[str], np.ndarray]:
    names = list(table)
    p = np.array([table[n] * bias.get(n, 1.0) for n in names])
    return names, p / p.sum()


def malignant_sites(tumor: str) -> tuple[list[str], np.ndarray]:
    """Site names and probabilities of a malignant lesion in a patient with primary `tumor`."""
    return _site_probs(_MALIGNANT_SITES, _TUMOR_SITE_BIAS[tumor])


def benign_sites() -> tuple[list[str], np.ndarray]:
    """Site names and probabilities of a benign lesion."""
    return _site_probs(_BENIGN_SITES, {})
