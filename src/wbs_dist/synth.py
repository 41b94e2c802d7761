"""Synthetic whole-body bone-scan archive: NM DICOM in the forms converters meet, plus annotations.

Real patient data never enters this repository, so everything downstream (ingest, training, scoring,
reports) is exercised on an archive this module writes. It imitates a hospital export of 99mTc-MDP
whole-body scans: one study per patient, anterior and posterior views of 1024 x 256 counts with Poisson
noise on a skeleton template, bladder and kidney activity, and hot-spot lesions whose label
(malignant/benign) follows their location, shape, contrast and the patient's burden, with label noise
(DESIGN 1). Annotations follow DESIGN 3.2: ``annotations.csv`` and ``masks/<study_uid>/<view>.png``.

Ground truth comes from two pure functions: :func:`plan_study` (patient, lesions, labels, DICOM
form; cheap, no pixels) and :func:`make_study` (the plan rendered to images and label maps). Both
derive their random streams from ``(seed, index)`` only, so any study can be regenerated alone and the
archive is byte-identical for a seed (no wall-clock time anywhere: dates derive from the seed).

DICOM forms (:data:`FORMS`), cycled by study index (:func:`form_for_index`) so that the first eight
studies hold each form once; after that the plain 2-frame object is the most common, as in real exports:

- ``multiframe``  one 2-frame NM object, Explicit VR Little Endian.
- ``single_view`` two single-frame NM objects (same study, separate series).
- ``rle``         2-frame, RLE Lossless (pylibjpeg-rle encoder).
- ``jpegls``      2-frame, JPEG-LS Lossless (pyjpegls encoder).
- ``j2k``         2-frame, JPEG 2000 Lossless (pylibjpeg-openjpeg encoder).
- ``implicit``    2-frame, Implicit VR Little Endian, int16 pixels.
- ``big_endian``  2-frame, Explicit VR Big Endian (retired, found in old archives; pydicom 3 writes
                  it), int16 pixels, view codes in the legacy SRT scheme (G-5215 / G-5216).
- ``text_views``  two single-frame objects without View Code Sequence: the view is named only by
                  'ANT'/'POST' in SeriesDescription and ImageComments.

Two-frame objects store the posterior frame first in about a quarter of studies: readers must take the
view from Detector Vector -> Detector Information Sequence -> View Code Sequence, never from frame order.

Skipped: JPEG Lossless (process 14, 1.2.840.10008.1.2.4.70) has no encoder in the pydicom ecosystem;
the real-file tests (pydicom-data ``JPEG-LL.dcm``) cover decoding it.

Other choices worth knowing:

- UIDs are ``2.25.<uuid>`` derived from a hash of (seed, study, role). ``pydicom.uid.generate_uid``
  ignores ``entropy_srcs`` when ``prefix=None`` (it returns a random UUID), so it cannot be used here.
- Counts Accumulated (0018,0070) at the top level is the pixel sum of the object (one view for the
  single-view forms, both frames for 2-frame objects); each Detector Information Sequence item also
  carries its own frame's sum, so every view's true sum is recorded.
- Every object holds PHI-like data that de-identification must remove: names, MRN-like IDs, birth
  dates, accession numbers, physicians, institution, and a private block (group 0009, creator
  ``SYNTH_VENDOR``) repeating the patient's name, ID and birth date.
- Each lesion is rendered on both views but delineated on one: the view where it is less attenuated.
- Labels: each lesion's features (site, irregularity, contrast, size, symmetric pair) are drawn from
  its intended class; a latent score weighs those features and the patient's burden, and the label
  is the sign of score + Gaussian noise, which flips ~14 % of labels against the noise-free sign
  (a logistic regression on the true features reaches ~85 % accuracy, so a CNN can learn it, not
  trivially). Targets met on large archives: ~50 % malignant lesions, ~44 % metastatic patients,
  4.4 lesions per study (few 63 %, medium 17 %, extensive 21 % of studies).
- The study-level mix (tumour type, metastatic intent, lesion burden, unannotated studies) comes
  from low-discrepancy sequences, so even small archives sit near the target shares.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import functools
import gzip
import hashlib
import io
import logging
import math
import os
import shutil
import sys
import tarfile
import uuid
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UsageError

# ----------------------------------------------------------------------------------------------------
# Public constants

ROWS, COLS = 1024, 256
VIEWS = ("anterior", "posterior")
PIXEL_SPACING_MM = 2.21
FORMS = ("multiframe", "single_view", "rle", "jpegls", "j2k", "implicit", "big_endian", "text_views")
SKIPPED_FORMS = {"jpeg_lossless": "JPEG Lossless process 14 has no encoder in the pydicom ecosystem"}
# First eight: every form once. Then the plain 2-frame object dominates, as in hospital exports.
FORM_CYCLE = FORMS + ("multiframe", "multiframe", "single_view", "multiframe")
ARCHIVE_FORMS = ("dir", "zip", "tar")
TUMOR_TYPES = ("lung", "prostate", "breast")
TUMOR_WEIGHTS = (0.374, 0.303, 0.323)
ANNOTATED_FRACTION = 0.95

NM_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
VIEW_CODES = {  # SCT codes; legacy SRT codes for the old big-endian archive form
    "anterior": (("399321004", "SCT", "anterior projection"), ("G-5215", "SRT", "Anterior projection")),
    "posterior": (("399001007", "SCT", "posterior projection"), ("G-5216", "SRT", "Posterior projection")),
}
VIEW_TEXT = {"anterior": "ANT", "posterior": "POST"}

# Reference body (stature ~770 px, 170 cm): head top at row _R0, midline between columns 127 and 128.
_R0, _C0 = 40.0, (COLS - 1) / 2.0
_MU_PER_CM = 0.12  # effective 140 keV attenuation in tissue with scatter
_BLUR_PX = 1.7  # camera resolution, ~9 mm FWHM at 2.21 mm pixels
_MASK_LEVEL = 0.3  # delineation threshold, fraction of the lesion's own peak


# ----------------------------------------------------------------------------------------------------
# Ground-truth records


@dataclass(frozen=True)
class Patient:
    name: str  # DICOM PN, FAMILY^Given
    patient_id: str
    birth_date: str  # YYYYMMDD
    sex: str  # M | F
    age: int


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


@dataclass(frozen=True)
class Acquisition:
    manufacturer: str
    model: str
    station: str
    serial: str
    software: str
    institution: str
    institution_address: str
    referring: str
    operator: str
    study_date: str
    study_time: str
    injection_time: str
    accession: str
    study_id: str
    dose_mbq: float
    scan_speed_cm_min: float


@dataclass(frozen=True)
class StudyPlan:
    seed: int
    index: int
    study_uid: str
    form: str
    patient: Patient
    tumor_type: str
    metastatic_intent: bool  # the generator's intent; the labels carry noise on top
    annotated: bool
    lesions: tuple[Lesion, ...]
    acquisition: Acquisition
    pixel_dtype: str  # uint16 | int16
    posterior_first: bool  # frame / file order
    geometry: tuple[float, float, float]  # scale, row shift, column shift of the patient
    gains: tuple[float, float, float, float]  # bone, soft tissue, kidneys, bladder
    counts: tuple[float, float]  # target expected total counts, anterior / posterior
    injection_site: tuple[float, float, float] | None  # row, col (anterior), amplitude; not a lesion

    @property
    def malignant(self) -> bool:
        return any(les.label == "malignant" for les in self.lesions)


@dataclass
class Study:
    plan: StudyPlan
    views: dict[str, np.ndarray]  # view -> counts (ROWS, COLS), uint16 or int16
    labels: dict[str, np.ndarray]  # view -> uint16 label map, pixel value = lesion_id


# ----------------------------------------------------------------------------------------------------
# Deterministic helpers


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, stream])


def synth_uid(seed: int, *parts) -> str:
    """A ``2.25.`` UID that depends only on the seed and the parts (study index, role...)."""
    digest = hashlib.sha256(repr(("wbs-dist-synth", seed) + parts).encode()).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"


_WEYL_STEPS = ((math.sqrt(5) - 1) / 2, math.sqrt(2) - 1, math.sqrt(3) - 1, math.sqrt(11) - 3)


def _weyl(seed: int, index: int, which: int) -> float:
    """Low-discrepancy value in [0, 1) for study `index`: equidistributed over any run of indices."""
    start = int.from_bytes(hashlib.sha256(f"weyl/{seed}/{which}".encode()).digest()[:8], "big") / 2**64
    return (start + index * _WEYL_STEPS[which]) % 1.0


def form_for_index(index: int) -> str:
    return FORM_CYCLE[index % len(FORM_CYCLE)]


# ----------------------------------------------------------------------------------------------------
# Anatomy: primitives in reference coordinates (r: rows below head top, x: columns, + = patient's left,
# which is the viewer's right on the anterior view). Each primitive has a depth that splits its
# brightness between the views and a tissue thickness in cm for the attenuation.

_C_SPINE = [(88 + 5 * i, 4.5 + 0.2 * i) for i in range(7)]
_T_SPINE = [(124 + 12.8 * i, 5.5 + 0.25 * i) for i in range(12)]
_L_SPINE = [(280 + 14.0 * i, 8.5 + 0.5 * i) for i in range(5)]
_RIB_WIDTH = [34, 48, 57, 63, 67, 69, 70, 69, 66, 61, 50, 40]


def _rib_path(i: int, side: int) -> list[tuple[float, float, float]]:
    """(r, x, depth) points along rib i: back from the spine, round the side, forward and down."""
    r0 = _T_SPINE[i][0]
    w = _RIB_WIDTH[i]
    pts = []
    floating = i >= 10
    n_back, n_front = 7, 0 if floating else 6
    for k in range(n_back + 1):  # posterior arc: spine -> lateral, falling slowly
        t = k / n_back
        pts.append((r0 + 14 * t, side * (7 + (w - 7) * math.sin(t * math.pi / 2)), 0.85 - 0.35 * t))
    for k in range(1, n_front + 1):  # anterior arc: lateral -> costal cartilage, falling faster
        t = k / n_front
        pts.append((r0 + 14 + 26 * t, side * (w - (w * 0.55) * t), 0.5 - 0.38 * t))
    return pts


def _primitives() -> list[tuple]:
    """('capsule', p0, p1, radius, uptake, depth, thickness_cm) and ('ellipse', centre, (ry, rx),
    angle, uptake, depth, thickness_cm, shell) in reference coordinates; mirrored pairs expanded."""
    prims: list[tuple] = []

    def cap(p0, p1, rad, up, depth, thick):
        prims.append(("capsule", p0, p1, rad, up, depth, thick))

    def ell(c, radii, up, depth, thick, angle=0.0, shell=0.0):
        prims.append(("ellipse", c, radii, angle, up, depth, thick, shell))

    # skull vault as a shell, face and mandible
    ell((50, 0), (48, 35), 0.75, 0.5, 18, shell=0.3)
    ell((52, 0), (40, 29), 0.1, 0.5, 18)
    ell((78, 0), (10, 15), 0.45, 0.2, 18)
    for side in (-1, 1):
        cap((78, side * 27), (104, side * 14), 4.0, 0.8, 0.3, 14)
    cap((104, -14), (108, 0), 4.0, 0.8, 0.2, 14)
    cap((108, 0), (104, 14), 4.0, 0.8, 0.2, 14)
    for r, w in _C_SPINE + _T_SPINE + _L_SPINE:  # vertebral bodies
        ell((r, 0), (w * 0.55 + 2.0, w), 1.1, 0.72, 22 if r > 120 else 12)
    ell((352, 0), (24, 19), 1.0, 0.8, 24)  # sacrum
    ell((382, 0), (6, 5), 0.7, 0.8, 24)
    ell((146, 0), (8, 11), 0.7, 0.1, 22)  # manubrium
    cap((154, 0), (218, 0), 5.0, 0.6, 0.1, 22)  # sternal body
    for side in (-1, 1):
        s = side
        for i in range(12):
            pts = _rib_path(i, s)
            for (r0, x0, d0), (r1, x1, d1) in zip(pts[:-1], pts[1:]):
                cap((r0, x0), (r1, x1), 2.6, 0.5, (d0 + d1) / 2, 22)
        cap((128, s * 10), (121, s * 72), 4.0, 0.9, 0.15, 14)  # clavicle
        ell((178, s * 56), (38, 20), 0.35, 0.9, 20, angle=s * 0.25)  # scapular blade
        cap((152, s * 36), (136, s * 74), 3.5, 0.8, 0.9, 20)  # scapular spine
        ell((210, s * 48), (6, 6), 0.6, 0.9, 20)  # scapular tip
        ell((140, s * 80), (11, 10), 1.2, 0.5, 12)  # humeral head
        cap((148, s * 84), (278, s * 94), 5.0, 0.9, 0.5, 8)  # humerus
        ell((284, s * 95), (8, 9), 1.15, 0.5, 8)  # elbow
        cap((290, s * 92), (380, s * 99), 3.0, 0.8, 0.5, 7)  # radius
        cap((290, s * 99), (380, s * 106), 2.8, 0.75, 0.5, 7)  # ulna
        ell((386, s * 103), (6, 7), 1.15, 0.5, 6)  # wrist
        for k in range(4):  # hand
            cap((392, s * (97 + 3.5 * k)), (432 - 2 * k, s * (95 + 5 * k)), 1.8, 0.7, 0.5, 4)
        ell((326, s * 50), (26, 24), 0.45, 0.6, 24)  # iliac wing
        cap((334, s * 22), (302, s * 50), 4.0, 0.9, 0.6, 24)  # iliac crest, rising laterally
        cap((302, s * 50), (326, s * 72), 4.0, 0.9, 0.5, 24)  # ... and falling to the ASIS
        cap((340, s * 16), (378, s * 22), 4.5, 1.3, 0.85, 24)  # sacroiliac joint
        ell((398, s * 22), (14, 16), 0.95, 0.4, 24, shell=0.45)  # obturator ring: pubis + ischium
        ell((370, s * 50), (11, 11), 1.25, 0.5, 22)  # acetabulum / femoral head
        ell((380, s * 66), (8, 7), 1.1, 0.5, 20)  # greater trochanter
        cap((378, s * 58), (540, s * 36), 7.0, 0.85, 0.5, 14)  # femur
        ell((548, s * 35), (9, 13), 1.25, 0.5, 12)  # femoral condyles
        ell((540, s * 35), (6, 6), 0.8, 0.1, 12)  # patella
        ell((562, s * 34), (6, 13), 1.1, 0.5, 12)  # tibial plateau
        cap((566, s * 33), (732, s * 30), 5.0, 0.85, 0.35, 10)  # tibia
        cap((568, s * 46), (732, s * 40), 2.2, 0.35, 0.6, 10)  # fibula
        ell((740, s * 31), (7, 10), 1.2, 0.5, 9)  # ankle
        ell((758, s * 30), (13, 11), 0.9, 0.6, 9)  # foot (foreshortened)
    ell((404, 0), (6, 5), 1.0, 0.25, 22)  # symphysis
    return prims


def _soft_primitives() -> list[tuple]:
    prims: list[tuple] = []
    prims.append(("ellipse", (52, 0), (56, 42), 0.0, 1.0, 0.5, 18, 0.0))
    prims.append(("capsule", (100, 0), (130, 0), 24.0, 1.0, 0.5, 12))
    prims.append(("capsule", (150, 0), (380, 0), 76.0, 1.0, 0.5, 22))
    for s in (-1, 1):
        prims.append(("capsule", (140, s * 82), (285, s * 95), 13.0, 0.8, 0.5, 8))
        prims.append(("capsule", (285, s * 95), (385, s * 103), 11.0, 0.8, 0.5, 7))
        prims.append(("ellipse", (410, s * 101), (24, 11), 0.0, 0.8, 0.5, 4, 0.0))
        prims.append(("capsule", (390, s * 50), (548, s * 36), 26.0, 1.0, 0.5, 14))
        prims.append(("capsule", (548, s * 36), (735, s * 31), 17.0, 0.9, 0.5, 10))
    return prims


def _kidney_primitives() -> list[tuple]:
    # the patient's right kidney (x < 0) lies lower, under the liver
    return [("ellipse", (252 + (8 if s < 0 else 0), s * 44), (24, 12), s * -0.3, 1.0, 0.8, 22, 0.0)
            for s in (-1, 1)]


def _bladder_primitives() -> list[tuple]:
    return [("ellipse", (384, 0), (20, 26), 0.0, 1.0, 0.35, 22, 0.0)]


def _attenuation(depth: float, thick_cm: float) -> tuple[float, float]:
    return (math.exp(-_MU_PER_CM * thick_cm * depth), math.exp(-_MU_PER_CM * thick_cm * (1 - depth)))


def _draw(prims, ant, post, raw=None):
    """Project primitives into the anterior-oriented reference canvases: a solid of radius rho seen
    from the side has a chord length ~ sqrt(1 - (d/rho)^2), which gives bones their rounded profile."""
    rows = np.arange(ROWS, dtype=np.float64)[:, None]
    cols = np.arange(COLS, dtype=np.float64)[None, :]
    for p in prims:
        if p[0] == "capsule":
            _, p0, p1, rad, up, depth, thick = p
            (r0, x0), (r1, x1) = p0, p1
            c0, c1 = _C0 + x0, _C0 + x1
            r0, r1 = _R0 + r0, _R0 + r1
            lo_r, hi_r = int(max(0, min(r0, r1) - rad - 1)), int(min(ROWS, max(r0, r1) + rad + 2))
            lo_c, hi_c = int(max(0, min(c0, c1) - rad - 1)), int(min(COLS, max(c0, c1) + rad + 2))
            if lo_r >= hi_r or lo_c >= hi_c:
                continue
            rr, cc = rows[lo_r:hi_r], cols[:, lo_c:hi_c]
            dr, dc = r1 - r0, c1 - c0
            seg2 = dr * dr + dc * dc
            t = np.clip(((rr - r0) * dr + (cc - c0) * dc) / seg2, 0, 1) if seg2 > 0 else 0.0
            d2 = (rr - r0 - t * dr) ** 2 + (cc - c0 - t * dc) ** 2
            prof = np.sqrt(np.clip(1 - d2 / (rad * rad), 0, None))
        else:
            _, cen, (ry, rx), ang, up, depth, thick, shell = p
            rc, cc0 = _R0 + cen[0], _C0 + cen[1]
            ext = max(ry, rx) + 1
            lo_r, hi_r = int(max(0, rc - ext)), int(min(ROWS, rc + ext + 1))
            lo_c, hi_c = int(max(0, cc0 - ext)), int(min(COLS, cc0 + ext + 1))
            if lo_r >= hi_r or lo_c >= hi_c:
                continue
            rr, cc = rows[lo_r:hi_r] - rc, cols[:, lo_c:hi_c] - cc0
            ca, sa = math.cos(ang), math.sin(ang)
            u, v = rr * ca - cc * sa, rr * sa + cc * ca
            q = (u / ry) ** 2 + (v / rx) ** 2
            prof = np.sqrt(np.clip(1 - q, 0, None))
            if shell:  # a hollow shell: subtract the inner solid, leaving a bright rim in projection
                k = 1 - shell
                prof = prof - k * np.sqrt(np.clip(1 - q / (k * k), 0, None))
        a_ant, a_post = _attenuation(depth, thick)
        ant[lo_r:hi_r, lo_c:hi_c] += up * a_ant * prof
        post[lo_r:hi_r, lo_c:hi_c] += up * a_post * prof
        if raw is not None:
            raw[lo_r:hi_r, lo_c:hi_c] += up * prof


@dataclass(frozen=True)
class _Anatomy:
    layers_ant: np.ndarray  # (4, ROWS, COLS): bone, soft tissue, kidneys, bladder
    layers_post: np.ndarray  # same, posterior, still anterior-oriented (mirrored at the end)
    bone_raw: np.ndarray  # unattenuated bone, for the local bone level under a lesion


@functools.lru_cache(maxsize=1)
def anatomy() -> _Anatomy:
    """The reference template, rendered once per process (patients vary it by scale, shift, gains)."""
    from scipy.ndimage import gaussian_filter

    ant = np.zeros((4, ROWS, COLS))
    post = np.zeros((4, ROWS, COLS))
    raw = np.zeros((ROWS, COLS))
    _draw(_primitives(), ant[0], post[0], raw)
    _draw(_soft_primitives(), ant[1], post[1])
    _draw(_kidney_primitives(), ant[2], post[2])
    _draw(_bladder_primitives(), ant[3], post[3])
    for a in (ant, post):
        for k in range(4):
            a[k] = gaussian_filter(a[k], _BLUR_PX if k != 1 else 4.0)
    raw = gaussian_filter(raw, _BLUR_PX)
    return _Anatomy(ant.astype(np.float32), post.astype(np.float32), raw.astype(np.float32))


# ----------------------------------------------------------------------------------------------------
# Lesion sites: each sampler returns (r, x, depth) in reference coordinates.


def _pick_side(rng) -> int:
    return -1 if rng.random() < 0.5 else 1


def _site_spine(rng, lumbar_bias=False):
    verts = _C_SPINE[2:] + _T_SPINE + _L_SPINE
    w = np.array([0.5] * 5 + [1.0] * 12 + [1.3] * 5)
    if lumbar_bias:
        w[-7:] *= 3.0
    r, half = verts[rng.choice(len(verts), p=w / w.sum())]
    return r + rng.uniform(-2, 2), rng.uniform(-0.6, 0.6) * half, 0.72


def _site_rib(rng):
    i = int(rng.integers(1, 11))
    pts = _rib_path(i, _pick_side(rng))
    j = int(rng.integers(1, len(pts) - 1))
    t = rng.random()
    return tuple(pts[j][k] + t * (pts[j + 1][k] - pts[j][k]) for k in range(3))


def _site_pelvis(rng):
    s = _pick_side(rng)
    k = rng.random()
    if k < 0.4:  # iliac wing
        return 322 + rng.uniform(-15, 15), s * (50 + rng.uniform(-14, 14)), 0.6
    if k < 0.6:  # sacrum
        return 352 + rng.uniform(-15, 15), rng.uniform(-10, 10), 0.8
    if k < 0.8:  # acetabulum
        return 366 + rng.uniform(-5, 5), s * (44 + rng.uniform(-4, 4)), 0.5
    return 400 + rng.uniform(-8, 8), s * (24 + rng.uniform(-10, 6)), 0.4  # pubis / ischium


def _site_si(rng):
    s = _pick_side(rng)
    t = rng.random()
    return 340 + 38 * t, s * (16 + 6 * t), 0.85


def _site_skull(rng):
    a = rng.uniform(-math.pi * 0.9, math.pi * 0.9)
    return 50 - 40 * math.cos(a), 29 * math.sin(a), rng.uniform(0.3, 0.7)


def _site_sternum(rng):
    return rng.uniform(146, 214), rng.uniform(-3, 3), 0.1


def _site_scapula(rng):
    s = _pick_side(rng)
    return 178 + rng.uniform(-25, 25), s * (56 + rng.uniform(-10, 10)), 0.9


def _site_clavicle(rng):
    s, t = _pick_side(rng), rng.random()
    return 128 - 7 * t, s * (10 + 62 * t), 0.15


def _site_humerus(rng):
    s, t = _pick_side(rng), rng.uniform(0.05, 0.5)
    return 148 + 130 * t, s * (84 + 10 * t), 0.5


def _site_femur(rng):
    s, t = _pick_side(rng), rng.uniform(0.0, 0.55)
    return 378 + 162 * t, s * (58 - 22 * t), 0.5


def _site_tibia(rng):
    s, t = _pick_side(rng), rng.uniform(0.1, 0.9)
    return 566 + 166 * t, s * (33 - 3 * t), 0.35


def _joint(centres, jitter, depth):
    def sample(rng):
        r, x = centres[int(rng.integers(len(centres)))]
        s = _pick_side(rng)
        return r + rng.uniform(-jitter, jitter), s * (x + rng.uniform(-jitter, jitter)), depth

    return sample


# name -> (region, sampler)
_SITES = {
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
    "prostate": {"spine": 1.3, "pelvis": 1.4},
    "breast": {"rib": 1.3, "sternum": 1.5, "skull": 1.4, "spine": 1.1},
    "lung": {"femur": 1.6, "humerus": 1.6, "scapula": 1.3, "rib": 1.2},
}


def _site_probs(table: dict, bias: dict) -> tuple[list[str], np.ndarray]:
    names = list(table)
    p = np.array([table[n] * bias.get(n, 1.0) for n in names])
    return names, p / p.sum()


# Latent score: weights on the lesion's visible features and the patient's burden. The label is the
# sign of score + noise; the noise scale flips about 15 % of labels against the noise-free sign.
_REGION_WEIGHT = {"axial": 0.9, "appendicular": 0.4, "joint": -1.1}
_SCORE_BIAS = -0.75
_SCORE_NOISE = 1.7
_BURDEN_WEIGHT = 1.2
_NONMET_EXTRA = 1.3  # mean extra lesions (beyond one) in patients without metastasis
_MET_MEAN = 9.5  # mean lesion count in metastatic patients
_MET_DISPERSION = 4.0  # negative-binomial shape of that count: smaller = more extreme burdens
_MET_PROB = {"lung": 0.3, "prostate": 0.32, "breast": 0.28}
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


def _lesion_count(metastatic: bool, u: float) -> int:
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


def _extent(blobs) -> float:
    return max(math.hypot(b[0], b[1]) + 1.8 * max(b[2], b[3]) for b in blobs)


# ----------------------------------------------------------------------------------------------------
# Fake but plausible identities (PHI-like test data)

_SYL_A = ["Al", "Ber", "Bran", "Cal", "Dor", "El", "Fen", "Gar", "Hal", "Har", "Kel", "Lan", "Mar",
          "Mor", "Nor", "Os", "Pen", "Ral", "Ros", "Sel", "Stan", "Tor", "Vel", "Wen", "Win", "Ha",
          "Lind", "Kra", "Bo", "Fal"]
_SYL_B = ["", "a", "e", "i", "o", "en", "er", "in"]
_SYL_C = ["son", "ley", "man", "berg", "ford", "ton", "ski", "ez", "ini", "ström", "holt", "wick",
          "mann", "sen", "ow", "ard", "ier", "ova"]
_GIVEN = {
    "M": ["James", "Peter", "Anton", "Henrik", "Luis", "Marco", "Tomas", "Jan", "David", "Karl", "Olaf",
          "Stefan", "Paul", "Viktor", "Georg", "Emil", "José", "Björn", "Samuel", "Ivan"],
    "F": ["Anna", "Maria", "Helena", "Sofia", "Clara", "Ingrid", "Elena", "Lucia", "Marta", "Greta",
          "Irene", "Nora", "Petra", "Julia", "Rosa", "Agnes", "Renée", "Zoë", "Ada", "Lena"],
}
_INSTITUTIONS = [("St. Aldric General Hospital", "12 Harbour Road, Kingsport"),
                 ("Northfield University Hospital", "1 Campus Drive, Northfield")]
_CAMERAS = [  # (manufacturer, model, station, serial, software, institution index)
    ("GE MEDICAL SYSTEMS", "Discovery NM/CT 670", "NM670-A", "67010482", "Xeleris 4.0", 0),
    ("GE MEDICAL SYSTEMS", "Discovery NM/CT 670", "NM670-B", "67011937", "Xeleris 4.0", 1),
    ("Philips", "Precedence 16", "PRECEDENCE16", "3701288", "JETStream 3.0", 0),
]


def _surname(rng) -> str:
    return (_SYL_A[rng.integers(len(_SYL_A))] + _SYL_B[rng.integers(len(_SYL_B))]
            + _SYL_C[rng.integers(len(_SYL_C))])


def _person(rng, sex: str, upper: bool) -> str:
    name = f"{_surname(rng)}^{_GIVEN[sex][rng.integers(len(_GIVEN[sex]))]}"
    if rng.random() < 0.3:
        name += f"^{'ABCDEFGHJKLMNPRSTW'[rng.integers(18)]}"
    return name.upper() if upper else name


def _unique_digits(seed: int, index: int, salt: int, digits: int) -> int:
    # an affine map mod 10^digits with a multiplier coprime to 10 is a bijection: IDs never collide
    mod = 10**digits
    offset = int.from_bytes(hashlib.sha256(f"{seed}/{salt}".encode()).digest()[:8], "big")
    return (3_141_593 * (index + 1) + offset) % mod


# ----------------------------------------------------------------------------------------------------
# Planning (cheap ground truth) and rendering


def plan_study(seed: int, index: int) -> StudyPlan:
    """Everything about study `index` except pixels: identity, acquisition, lesions and labels."""
    if seed < 0 or index < 0:
        raise ValueError("seed and index must be >= 0")
    rng = _rng(seed, index, 1)
    # Weyl sequences instead of independent draws for the study-level mix: any archive, even a small
    # one, then holds tumour types, metastatic patients and unannotated studies near their shares.
    tumor = TUMOR_TYPES[int(np.searchsorted(np.cumsum(TUMOR_WEIGHTS), _weyl(seed, index, 0)))]
    sex = {"prostate": "M", "breast": "F"}.get(tumor) or ("M" if rng.random() < 0.6 else "F")

    study_day = dt.date(2015, 1, 5) + dt.timedelta(days=int(rng.integers(0, 9 * 365)))
    birth = dt.date(int(rng.integers(1935, 1991)), 1, 1) + dt.timedelta(days=int(rng.integers(0, 365)))
    age = study_day.year - birth.year - ((study_day.month, study_day.day) < (birth.month, birth.day))
    cam = _CAMERAS[rng.choice(3, p=[0.35, 0.3, 0.35])]
    upper = cam[0].startswith("GE")
    inst, addr = _INSTITUTIONS[cam[5]]
    secs = int(rng.integers(10 * 3600 + 1800, 17 * 3600 + 1800))
    inj = secs - int(rng.integers(150, 240)) * 60
    patient = Patient(
        name=_person(rng, sex, upper),
        patient_id=f"MRN{_unique_digits(seed, index, 1, 7):07d}",
        birth_date=birth.strftime("%Y%m%d"),
        sex=sex,
        age=int(age),
    )
    acq = Acquisition(
        manufacturer=cam[0], model=cam[1], station=cam[2], serial=cam[3], software=cam[4],
        institution=inst, institution_address=addr,
        referring=_person(rng, "M" if rng.random() < 0.5 else "F", upper),
        operator=_person(rng, "M" if rng.random() < 0.5 else "F", upper),
        study_date=study_day.strftime("%Y%m%d"),
        study_time=f"{secs // 3600:02d}{secs // 60 % 60:02d}{secs % 60:02d}",
        injection_time=f"{inj // 3600:02d}{inj // 60 % 60:02d}{inj % 60:02d}",
        accession=f"A{_unique_digits(seed, index, 2, 9):09d}",
        study_id=str(int(rng.integers(1000, 99999))),
        dose_mbq=float(round(rng.uniform(550, 800), 1)),
        scan_speed_cm_min=float(rng.choice([12.0, 15.0, 16.0, 20.0])),
    )

    scale = float(rng.uniform(0.95, 1.13))
    geometry = (scale, float(rng.uniform(-12, 35)), float(rng.uniform(-5, 5)))
    gains = (float(rng.uniform(0.8, 1.2)), float(rng.uniform(0.05, 0.1)),
             float(rng.uniform(0.3, 1.5)), float(math.exp(rng.normal(math.log(5.0), 0.7))))
    c_ant = float(rng.uniform(1.0e6, 2.6e6))
    counts = (c_ant, float(c_ant * rng.uniform(1.0, 1.15)))

    metastatic = bool(_weyl(seed, index, 1) < _MET_PROB[tumor])
    n_target = _lesion_count(metastatic, _weyl(seed, index, 3))
    lesions = _place_lesions(rng, tumor, metastatic, n_target, geometry)
    n = len(lesions)
    final = []
    for k, les in enumerate(lesions, start=1):
        score = _latent_score(les["region"], les["irr"], les["contrast"], les["sigma"], les["paired"], n)
        label = "malignant" if score + _SCORE_NOISE * rng.normal() > 0 else "benign"
        final.append(Lesion(lesion_id=k, view=les["view"], label=label, site=les["site"],
                            region=les["region"], row=les["row"], col=les["col"], depth=les["depth"],
                            sigma=les["sigma"] * scale, contrast=les["contrast"],
                            irregularity=les["irr"], paired=les["paired"], score=float(score),
                            blobs=les["blobs"]))

    inj_site = None
    if rng.random() < 0.1:  # tracer extravasation at the injection site: hot, but not a lesion
        r, x = ((283, 95) if rng.random() < 0.6 else (405, 104))
        s = _pick_side(rng)
        row = _R0 + scale * r + geometry[1]
        col = _C0 + scale * s * x + geometry[2]
        if _clear_of(final, row, col, 8.0):
            inj_site = (float(row), float(col), float(rng.uniform(2.0, 8.0)))

    form = form_for_index(index)
    return StudyPlan(
        seed=seed, index=index, study_uid=synth_uid(seed, index, "study"), form=form, patient=patient,
        tumor_type=tumor, metastatic_intent=metastatic,
        annotated=bool(_weyl(seed, index, 2) < ANNOTATED_FRACTION),
        lesions=tuple(final), acquisition=acq,
        pixel_dtype="int16" if form in ("implicit", "big_endian") else "uint16",
        posterior_first=bool(rng.random() < 0.25), geometry=geometry, gains=gains, counts=counts,
        injection_site=inj_site,
    )


def _anterior_position(les) -> tuple[float, float]:
    return (les.row, les.col) if les.view == "anterior" else (les.row, COLS - 1 - les.col)


def _clear_of(lesions, row, col, ext) -> bool:
    for les in lesions:
        r, c = _anterior_position(les) if isinstance(les, Lesion) else (les["row_a"], les["col_a"])
        e = les["ext"] if isinstance(les, dict) else _extent(les.blobs)
        if math.hypot(r - row, c - col) < e + ext + 2.0:
            return False
    return True


def _place_lesions(rng, tumor, metastatic, n_target, geometry) -> list[dict]:
    scale, dy, dx = geometry
    mal_names, mal_p = _site_probs(_MALIGNANT_SITES, _TUMOR_SITE_BIAS[tumor])
    ben_names, ben_p = _site_probs(_BENIGN_SITES, {})
    placed: list[dict] = []

    def add(site, r, x, depth, irr, contrast, sigma, blobs, paired) -> bool:
        row = _R0 + scale * r + dy
        col_a = _C0 + scale * x + dx
        if not (4 <= row <= ROWS - 5 and 4 <= col_a <= COLS - 5):
            return False
        blobs = tuple((b[0] * scale, b[1] * scale, b[2] * scale, b[3] * scale, b[4], b[5]) for b in blobs)
        ext = _extent(blobs)
        if not _clear_of(placed, row, col_a, ext):
            return False
        a_ant, a_post = _attenuation(depth, 20)
        if abs(a_ant - a_post) < 0.05:
            view = VIEWS[int(rng.integers(2))]
        else:
            view = "anterior" if a_ant > a_post else "posterior"
        col = col_a if view == "anterior" else COLS - 1 - col_a
        placed.append(dict(site=site, region=_SITES[site][0], row=float(row), col=float(col),
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
        r, x, depth = _SITES[site][1](rng)
        irr, contrast, sigma = _lesion_features(rng, malignant)
        blobs = _blobs(rng, irr, sigma)
        want_pair = (not malignant and _SITES[site][0] == "joint" and rng.random() < 0.5
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


def _render_lesion(canvas, row, col, blobs, amplitude, mirror: bool):
    """Add the lesion's normalised profile times amplitude; return (slice, profile) for masking."""
    ext = _extent(blobs) + 2
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
    offset = (_R0 - (_R0 + dy) * inv, _C0 - (_C0 + dx) * inv)
    return affine_transform(img, [inv, inv], offset=offset, order=1, mode="constant", cval=0.0)


def render_study(plan: StudyPlan) -> Study:
    """Noise-free expectation -> Poisson counts for both views, and the label maps."""
    ana = anatomy()
    scale, dy, dx = plan.geometry
    g = np.asarray(plan.gains, dtype=np.float32)
    lam = {
        "anterior": _warp(np.tensordot(g, ana.layers_ant, axes=1), scale, dy, dx),
        # the posterior camera sees the patient from behind: mirror the anterior-oriented projection
        "posterior": _warp(np.tensordot(g, ana.layers_post, axes=1), scale, dy, dx)[:, ::-1].copy(),
    }
    labels = {v: np.zeros((ROWS, COLS), np.uint16) for v in VIEWS}
    for les in plan.lesions:
        row, col_a = _anterior_position(les)
        r_ref = int(np.clip(round(_R0 + (row - _R0 - dy) / scale), 0, ROWS - 1))
        c_ref = int(np.clip(round(_C0 + (col_a - _C0 - dx) / scale), 0, COLS - 1))
        bone = max(float(ana.bone_raw[r_ref, c_ref]), 0.3) * plan.gains[0]
        atts = dict(zip(VIEWS, _attenuation(les.depth, 20)))
        for view in VIEWS:
            col = col_a if view == "anterior" else COLS - 1 - col_a
            amp = (les.contrast - 1.0) * bone * atts[view]
            sl, prof = _render_lesion(lam[view], row, col, les.blobs, amp, mirror=view == "posterior")
            if view == les.view:
                lab = labels[view][sl]
                lab[(prof >= _MASK_LEVEL) & (lab == 0)] = les.lesion_id
    if plan.injection_site is not None:
        row, col_a, amp = plan.injection_site
        blob = ((0.0, 0.0, 2.0, 2.0, 0.0, 1.0),)
        _render_lesion(lam["anterior"], row, col_a, blob, amp * plan.gains[0], False)
        _render_lesion(lam["posterior"], row, COLS - 1 - col_a, blob, amp * plan.gains[0], True)

    rng = _rng(plan.seed, plan.index, 2)
    hi = np.iinfo(plan.pixel_dtype).max
    views = {}
    for view, target in zip(VIEWS, plan.counts):
        lv = lam[view]
        np.clip(lv, 0, None, out=lv)
        lv *= target / float(lv.sum())
        views[view] = np.minimum(rng.poisson(lv), hi).astype(plan.pixel_dtype)
    return Study(plan=plan, views=views, labels=labels)


def make_study(seed: int, index: int) -> Study:
    """Ground truth of study `index` for `seed`: images, label maps and lesions, without writing."""
    return render_study(plan_study(seed, index))


# ----------------------------------------------------------------------------------------------------
# DICOM


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _code(value, scheme, meaning):
    from pydicom.dataset import Dataset

    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _base_dataset(plan: StudyPlan, series_no: int, instance_no: int, role: str):
    from pydicom.dataset import Dataset

    p, a = plan.patient, plan.acquisition
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "WHOLE BODY", "EMISSION"]
    ds.SOPClassUID = NM_IMAGE_STORAGE
    ds.SOPInstanceUID = synth_uid(plan.seed, plan.index, "sop", role)
    for tag in ("Study", "Series", "Acquisition", "Content"):
        setattr(ds, f"{tag}Date", a.study_date)
        setattr(ds, f"{tag}Time", a.study_time)
    ds.AccessionNumber = a.accession
    ds.Modality = "NM"
    ds.Manufacturer = a.manufacturer
    ds.InstitutionName = a.institution
    ds.InstitutionAddress = a.institution_address
    ds.ReferringPhysicianName = a.referring
    ds.StationName = a.station
    ds.StudyDescription = "NM BONE SCAN WHOLE BODY"
    ds.OperatorsName = a.operator
    ds.ManufacturerModelName = a.model
    ds.PatientName = p.name
    ds.PatientID = p.patient_id
    ds.PatientBirthDate = p.birth_date
    ds.PatientSex = p.sex
    ds.PatientAge = f"{p.age:03d}Y"
    ds.BodyPartExamined = "WHOLEBODY"
    ds.DeviceSerialNumber = a.serial
    ds.SoftwareVersions = a.software
    ds.ScanVelocity = f"{a.scan_speed_cm_min:g}"
    ds.WholeBodyTechnique = "1PS"
    ds.ScanLength = "200"
    ds.ActualFrameDuration = int(round(200 / a.scan_speed_cm_min * 60_000))
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = plan.study_uid
    ds.SeriesInstanceUID = synth_uid(plan.seed, plan.index, "series", series_no)
    ds.StudyID = a.study_id
    ds.SeriesNumber = series_no
    ds.InstanceNumber = instance_no
    ds.FrameOfReferenceUID = synth_uid(plan.seed, plan.index, "frame-of-reference")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ROWS, COLS
    ds.PixelSpacing = [f"{PIXEL_SPACING_MM:g}", f"{PIXEL_SPACING_MM:g}"]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if plan.pixel_dtype == "int16" else 0

    win = Dataset()
    rng_item = Dataset()
    rng_item.EnergyWindowLowerLimit, rng_item.EnergyWindowUpperLimit = "126.45", "154.55"
    win.EnergyWindowRangeSequence = [rng_item]
    win.EnergyWindowName = "TC99M"
    ds.EnergyWindowInformationSequence = [win]
    ds.NumberOfEnergyWindows = 1
    rad = Dataset()
    rad.Radiopharmaceutical = "Tc-99m MDP"
    rad.RadiopharmaceuticalStartTime = a.injection_time
    rad.RadionuclideTotalDose = f"{a.dose_mbq:g}"
    rad.RadionuclideHalfLife = "21624.12"
    rad.RadionuclideCodeSequence = [_code("44588005", "SCT", "Technetium-99m")]
    ds.RadiopharmaceuticalInformationSequence = [rad]

    # vendor-private block that repeats identifiers: de-identification must drop private tags
    block = ds.private_block(0x0009, "SYNTH_VENDOR", create=True)
    block.add_new(0x10, "LO", p.name.replace("^", " "))
    block.add_new(0x11, "LO", p.patient_id)
    block.add_new(0x12, "DA", p.birth_date)
    block.add_new(0x13, "LO", f"{a.station} {a.serial}")
    return ds


def _detector_item(view: str, counts: int, coded: bool, legacy: bool):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CollimatorGridName = "LEHR"
    item.CollimatorType = "PARA"
    item.ZoomFactor = ["1", "1"]
    if coded:
        item.ViewCodeSequence = [_code(*VIEW_CODES[view][1 if legacy else 0])]
    item.CountsAccumulated = counts
    return item


def _set_frames(ds, views: list[str], counts: list[int], coded=True, legacy=False):
    n = len(views)
    ds.NumberOfFrames = n
    ds.FrameIncrementPointer = [0x00540010, 0x00540020]
    ds.EnergyWindowVector = [1] * n
    ds.NumberOfDetectors = n
    ds.DetectorVector = list(range(1, n + 1))
    ds.DetectorInformationSequence = [_detector_item(v, c, coded, legacy) for v, c in zip(views, counts)]
    ds.CountsAccumulated = int(sum(counts))


def study_datasets(study: Study) -> list:
    """The study's DICOM objects (pydicom Datasets with file meta), in archive order."""
    return [ds for ds, _ in _study_objects(study)]


def _study_objects(study: Study) -> list[tuple]:
    """(Dataset, the pixel array it encodes) for each of the study's objects."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                             JPEG2000Lossless, JPEGLSLossless, RLELossless)

    plan = study.plan
    order = ["posterior", "anterior"] if plan.posterior_first else ["anterior", "posterior"]
    sums = {v: int(study.views[v].sum(dtype=np.int64)) for v in VIEWS}
    form = plan.form
    out = []

    def finish(ds, arr, syntax):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.ImplementationClassUID = synth_uid(0, "implementation", plan.acquisition.manufacturer)
        meta.ImplementationVersionName = "GE_NM_EXP" if plan.acquisition.manufacturer.startswith("GE") \
            else "PMS_EXPORT"
        ds.file_meta = meta
        if syntax.is_compressed:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.PixelData = arr.tobytes()
            plugin = "pylibjpeg" if syntax == RLELossless else ""
            with _quiet("openjpeg"):  # it logs every tile at INFO
                ds.compress(syntax, arr, encoding_plugin=plugin, generate_instance_uid=False)
        else:
            meta.TransferSyntaxUID = syntax
            big = syntax == ExplicitVRBigEndian
            ds.PixelData = arr.astype(arr.dtype.newbyteorder(">") if big else arr.dtype).tobytes()
            ds["PixelData"].VR = "OW"
        out.append((ds, arr))

    if form in ("single_view", "text_views"):
        coded = form == "single_view"
        for k, view in enumerate(order, start=1):
            ds = _base_dataset(plan, k, 1, view)
            ds.SeriesDescription = f"WB {VIEW_TEXT[view]}" if not coded else "WB BONE"
            if not coded:
                ds.ImageComments = VIEW_TEXT[view]
            _set_frames(ds, [view], [sums[view]], coded=coded)
            finish(ds, study.views[view], ExplicitVRLittleEndian)
        return out

    syntax = {"multiframe": ExplicitVRLittleEndian, "rle": RLELossless, "jpegls": JPEGLSLossless,
              "j2k": JPEG2000Lossless, "implicit": ImplicitVRLittleEndian,
              "big_endian": ExplicitVRBigEndian}[form]
    ds = _base_dataset(plan, 1, 1, "wb")
    ds.SeriesDescription = "WB BONE"
    _set_frames(ds, order, [sums[v] for v in order], legacy=form == "big_endian")
    finish(ds, np.stack([study.views[v] for v in order]), syntax)
    return out


def encode(ds) -> bytes:
    from pydicom import dcmwrite

    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _check_roundtrip(data: bytes, expected: np.ndarray) -> None:
    from pydicom import dcmread

    got = dcmread(io.BytesIO(data)).pixel_array
    if got.shape != expected.shape or not np.array_equal(got, expected):
        raise RuntimeError("encoder round trip changed the pixels")


def mask_png(label_map: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(label_map.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def study_files(study: Study, folder: int, verify: bool = True) -> list[tuple[str, bytes]]:
    """(archive path, bytes) of the study's DICOM files; paths carry no identifiers."""
    files = []
    for k, (ds, arr) in enumerate(_study_objects(study), start=1):
        data = encode(ds)
        if verify and ds.file_meta.TransferSyntaxUID.is_compressed:
            _check_roundtrip(data, arr)  # a broken codec plugin must not yield a silently wrong archive
        files.append((f"DICOM/{folder:05d}/{int(ds.SeriesNumber):02d}/IM{k:04d}", data))
    return files


# ----------------------------------------------------------------------------------------------------
# Archive writing


class _DirSink:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir()

    def add(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def close(self) -> None:
        pass


class _ZipSink:
    def __init__(self, path: Path):
        self.zf = zipfile.ZipFile(path, "w", allowZip64=True)

    def add(self, name: str, data: bytes) -> None:
        info = zipfile.ZipInfo(name, date_time=(2000, 1, 1, 0, 0, 0))  # fixed: byte-identical output
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16
        self.zf.writestr(info, data, compresslevel=1)

    def close(self) -> None:
        self.zf.close()


class _TarSink:
    def __init__(self, path: Path, gz: bool):
        self.raw = open(path, "wb")
        # GzipFile with mtime=0 and no name keeps the gzip header free of time and path
        self.gz = gzip.GzipFile(filename="", fileobj=self.raw, mode="wb", compresslevel=1, mtime=0) \
            if gz else None
        self.tf = tarfile.open(fileobj=self.gz or self.raw, mode="w", format=tarfile.PAX_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 946684800, 0o644
        info.uname = info.gname = ""
        self.tf.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tf.close()
        if self.gz is not None:
            self.gz.close()
        self.raw.close()


def _infer_form(out: Path, form: str | None) -> tuple[str, bool]:
    name = out.name.lower()
    gz = name.endswith((".tar.gz", ".tgz"))
    if form is None:
        form = "zip" if name.endswith(".zip") else "tar" if gz or name.endswith(".tar") else "dir"
    if form not in ARCHIVE_FORMS:
        raise UsageError(f"--form must be one of {', '.join(ARCHIVE_FORMS)}, got {form!r}")
    return form, gz and form == "tar"


def _refuse_existing(out: Path, form: str) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if form == "dir" and out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    raise UsageError(f"{out} already exists{' and is not empty' if out.is_dir() else ''}; "
                     "synth never overwrites: choose a new path or remove it")


def annotation_rows(plan: StudyPlan) -> list[tuple]:
    """The study's annotations.csv rows (none when the study is left unannotated)."""
    if not plan.annotated:
        return []
    return [(plan.study_uid, les.view, les.lesion_id, les.label, plan.tumor_type) for les in plan.lesions]


ANNOTATION_COLUMNS = ("study_uid", "view", "lesion_id", "label", "tumor_type")


def write_archive(out: Path, patients: int, seed: int = 0, form: str | None = None,
                  progress: bool = True) -> dict:
    """Write the archive atomically (temp path beside OUT, then rename); return a summary dict."""
    from tqdm import tqdm

    out = Path(out)
    if isinstance(patients, bool) or not isinstance(patients, int) or patients < 1:
        raise UsageError(f"--patients must be an integer >= 1, got {patients!r}")
    if not isinstance(seed, int) or seed < 0:
        raise UsageError(f"--seed must be an integer >= 0, got {seed!r}")
    form, gz = _infer_form(out, form)
    _refuse_existing(out, form)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()

    sink = _DirSink(tmp) if form == "dir" else _ZipSink(tmp) if form == "zip" else _TarSink(tmp, gz)
    stats = Counter()
    plans = []
    try:
        rows = []
        for i in tqdm(range(patients), desc="synth", unit="study", file=sys.stderr, disable=not progress):
            study = make_study(seed, i)
            plan = study.plan
            plans.append(plan)
            for name, data in study_files(study, i + 1):
                sink.add(name, data)
                stats["dicom_files"] += 1
            stats[f"form:{plan.form}"] += 1
            if plan.annotated and plan.lesions:
                rows.extend(annotation_rows(plan))
                for view in VIEWS:
                    if any(les.view == view for les in plan.lesions):
                        data = mask_png(study.labels[view])
                        sink.add(f"masks/{plan.study_uid}/{view}.png", data)
                        stats["masks"] += 1
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(ANNOTATION_COLUMNS)
        writer.writerows(rows)
        sink.add("annotations.csv", text.getvalue().encode())
        sink.close()
        _refuse_existing(out, form)  # someone may have created OUT meanwhile
        os.replace(tmp, out)
    except BaseException:
        try:
            sink.close()
        except Exception:
            pass
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise

    annotated = [p for p in plans if p.annotated]
    lesions = [les for p in annotated for les in p.lesions]
    size = out.stat().st_size if form != "dir" else sum(f.stat().st_size for f in out.rglob("*")
                                                         if f.is_file())
    return {
        "out": str(out), "archive_form": form + (".gz" if gz else ""), "patients": patients,
        "studies": len(plans), "annotated_studies": len(annotated), "lesions": len(lesions),
        "malignant_lesion_fraction": (sum(les.label == "malignant" for les in lesions) / len(lesions)
                                      if lesions else 0.0),
        "metastatic_patient_fraction": (sum(p.malignant for p in annotated) / len(annotated)
                                        if annotated else 0.0),
        "tumor_types": dict(Counter(p.tumor_type for p in plans)),
        "dicom_forms": {f: stats[f"form:{f}"] for f in FORMS if stats[f"form:{f}"]},
        "dicom_files": stats["dicom_files"], "masks": stats["masks"], "bytes": size,
    }


def run_synth(out: Path, patients: int = 100, seed: int = 0, form: str | None = None) -> int:
    """CLI entry: write the archive and print a short summary to stdout."""
    s = write_archive(Path(out), patients, seed, form)
    forms = ", ".join(f"{k} {v}" for k, v in s["dicom_forms"].items())
    types = ", ".join(f"{t} {s['tumor_types'].get(t, 0)}" for t in TUMOR_TYPES)
    print(f"wrote {s['out']} ({s['archive_form']}, {s['bytes'] / 1e6:.1f} MB)")
    print(f"  patients {s['patients']}, studies {s['studies']} ({s['annotated_studies']} annotated), "
          f"lesions {s['lesions']}")
    print(f"  malignant lesions {100 * s['malignant_lesion_fraction']:.1f} %, "
          f"patients with metastasis {100 * s['metastatic_patient_fraction']:.1f} %; tumour types: {types}")
    print(f"  DICOM files {s['dicom_files']}, mask PNGs {s['masks']}; studies by DICOM form: {forms}")
    return 0
