"""Rendering: a study plan to Poisson counts on both views, and the label maps of its lesions.

The noise-free expectation is the patient's template (body.py, scaled, shifted and weighted by the
plan's gains) plus every lesion on both views, attenuated by its depth; each lesion is delineated on
its own view at a fixed fraction of its peak. The counts draw from the study's own random stream, so
any study renders alone, identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from wbs_dist.schema import ANTERIOR, POSTERIOR, VIEWS
from wbs_dist.synth.body import C0, COLS, R0, ROWS, anatomy, attenuation
from wbs_dist.synth.lesions import anterior_position, extent
from wbs_dist.synth.plan import StudyPlan, plan_study, study_rng

_MASK_LEVEL = 0.3  # delineation threshold, fraction of the lesion's own peak


@dataclass
class Study:
    plan: StudyPlan
    views: dict[str, np.ndarray]  # view -> counts (ROWS, COLS), uint16 or int16
    labels: dict[str, np.ndarray]  # view -> uint16 label map, pixel value = lesion_id


def _render_lesion(canvas, row, col, blobs, amplitude, mirror: bool):
    """Add the lesion's normalised profile times amplitude; return (slice, profile) for masking."""
    ext = extent(blobs) + 2
    lo_r, hi_r = max(0, int(row - ext)), min(ROWS, int(row + ext) + 2)
    lo_c, hi_c = max(0, int(col - ext)), min(COLS, int(col + ext) + 2)
    rr = np.arange(lo_r, hi_r, dtype=np.float64)[:, None] - row
    cc = np.arange(lo_c, hi_c, dtype=np.float64)[None, :] - col
    prof = np.zeros((hi_r - lo_r, hi_c - lo_c))
    for d_r, d_c, s_r, s_c, ang, w in blobs:
        if mirror:
            d_c, ang = -d_c, math.pi - ang
        ca, sa = math.cos(ang), math.sin(ang)
        u = (rr - d_r) * ca - (cc - d_c) * sa
        v = (rr - d_r) * sa + (cc - d_c) * ca
        prof += w * np.exp(-0.5 * ((u / s_r) ** 2 + (v / s_c) ** 2))
    ir, ic = int(round(row)) - lo_r, int(round(col)) - lo_c
    prof /= max(prof.max(), prof[ir, ic])
    canvas[lo_r:hi_r, lo_c:hi_c] += amplitude * prof
    return (slice(lo_r, hi_r), slice(lo_c, hi_c)), prof


def _warp(img: np.ndarray, scale: float, dy: float, dx: float) -> np.ndarray:
    from scipy.ndimage import affine_transform

    inv = 1.0 / scale
    offset = (R0 - (R0 + dy) * inv, C0 - (C0 + dx) * inv)
    return affine_transform(img, [inv, inv], offset=offset, order=1, mode="constant", cval=0.0)


def render_study(plan: StudyPlan) -> Study:
    """Noise-free expectation -> Poisson counts for both views, and the label maps."""
    ana = anatomy()
    scale, dy, dx = plan.geometry
    g = np.asarray(plan.gains, dtype=np.float32)
    lam = {
        ANTERIOR: _warp(np.tensordot(g, ana.layers_ant, axes=1), scale, dy, dx),
        # the posterior camera sees the patient from behind: mirror the anterior-oriented projection
        POSTERIOR: _warp(np.tensordot(g, ana.layers_post, axes=1), scale, dy, dx)[:, ::-1].copy(),
    }
    labels = {v: np.zeros((ROWS, COLS), np.uint16) for v in VIEWS}
    for les in plan.lesions:
        row, col_a = anterior_position(les)
        r_ref = int(np.clip(round(R0 + (row - R0 - dy) / scale), 0, ROWS - 1))
        c_ref = int(np.clip(round(C0 + (col_a - C0 - dx) / scale), 0, COLS - 1))
        bone = max(float(ana.bone_raw[r_ref, c_ref]), 0.3) * plan.gains[0]
        atts = dict(zip(VIEWS, attenuation(les.depth, 20)))
        for view in VIEWS:
            col = col_a if view == ANTERIOR else COLS - 1 - col_a
            amp = (les.contrast - 1.0) * bone * atts[view]
            sl, prof = _render_lesion(lam[view], row, col, les.blobs, amp, mirror=view == POSTERIOR)
            if view == les.view:
                lab = labels[view][sl]
                lab[(prof >= _MASK_LEVEL) & (lab == 0)] = les.lesion_id
    if plan.injection_site is not None:
        row, col_a, amp = plan.injection_site
        blob = ((0.0, 0.0, 2.0, 2.0, 0.0, 1.0),)
        _render_lesion(lam[ANTERIOR], row, col_a, blob, amp * plan.gains[0], False)
        _render_lesion(lam[POSTERIOR], row, COLS - 1 - col_a, blob, amp * plan.gains[0], True)

    rng = study_rng(plan.seed, plan.index, 2)
    hi = np.iinfo(plan.pixel_dtype).max
    views = {}
    for view, target in zip(VIEWS, plan.counts):
        lv = lam[view]
        np.clip(lv, 0, None, out=lv)
        lv *= target / float(lv.sum())
        views[view] = np.minimum(rng.poisson(lv), hi).astype(plan.pixel_dtype)
    return Study(plan=plan, views=views, labels=labels)


def make_study(seed: int, index: int, patient_of: int | None = None) -> Study:
    """Ground truth of study `index` for `seed`: images, label maps and lesions, without writing
    (`patient_of`: see plan_study)."""
    return render_study(plan_study(seed, index, patient_of))

