"""The reference body: the camera's image grid, the skeleton template and its projection onto both views.

The template is a set of primitives (capsules and ellipses, each with an uptake, a depth between the
anterior and posterior surfaces, and a tissue thickness) for bone, soft tissue, kidneys and bladder.
:func:`anatomy` projects them once per process into anterior-oriented layers; a patient varies them by
scale, shift and gains when rendered (render.py). The spine tables and :func:`rib_path` are public
because the lesion sites (sites.py) sit on the same bones.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

ROWS, COLS = 1024, 256
PIXEL_SPACING_MM = 2.21
# Reference body (stature ~770 px, 170 cm): head top at row R0, midline between columns 127 and 128.
R0, C0 = 40.0, (COLS - 1) / 2.0
_MU_PER_CM = 0.12  # effective 140 keV attenuation in tissue with scatter
_BLUR_PX = 1.7  # camera resolution, ~9 mm FWHM at 2.21 mm pixels


# ----------------------------------------------------------------------------------------------------
# Anatomy: primitives in reference coordinates (r: rows below head top, x: columns, + = patient's left,
# which is the viewer's right on the anterior view). Each primitive has a depth that splits its
# brightness between the views and a tissue thickness in cm for the attenuation.

C_SPINE = [(88 + 5 * i, 4.5 + 0.2 * i) for i in range(7)]
T_SPINE = [(124 + 12.8 * i, 5.5 + 0.25 * i) for i in range(12)]
L_SPINE = [(280 + 14.0 * i, 8.5 + 0.5 * i) for i in range(5)]
_RIB_WIDTH = [34, 48, 57, 63, 67, 69, 70, 69, 66, 61, 50, 40]


def rib_path(i: int, side: int) -> list[tuple[float, float, float]]:
    """(r, x, depth) points along rib i: back from the spine, round the side, forward and down."""
    r0 = T_SPINE[i][0]
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
    for r, w in C_SPINE + T_SPINE + L_SPINE:  # vertebral bodies
        ell((r, 0), (w * 0.55 + 2.0, w), 1.1, 0.72, 22 if r > 120 else 12)
    ell((352, 0), (24, 19), 1.0, 0.8, 24)  # sacrum
    ell((382, 0), (6, 5), 0.7, 0.8, 24)
    ell((146, 0), (8, 11), 0.7, 0.1, 22)  # manubrium
    cap((154, 0), (218, 0), 5.0, 0.6, 0.1, 22)  # sternal body
    for side in (-1, 1):
        s = side
        for i in range(12):
            pts = rib_path(i, s)
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


def attenuation(depth: float, thick_cm: float) -> tuple[float, float]:
    """Fractions of a source at `depth` (0 = anterior surface) that reach the anterior and posterior
    cameras through `thick_cm` of tissue."""
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
            c0, c1 = C0 + x0, C0 + x1
            r0, r1 = R0 + r0, R0 + r1
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
            rc, cc0 = R0 + cen[0], C0 + cen[1]
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
        a_ant, a_post = attenuation(depth, thick)
        ant[lo_r:hi_r, lo_c:hi_c] += up * a_ant * prof
        post[lo_r:hi_r, lo_c:hi_c] += up * a_post * prof
        if raw is not None:
            raw[lo_r:hi_r, lo_c:hi_c] += up * prof


@dataclass(frozen=True)
class Anatomy:
    layers_ant: np.ndarray  # (4, ROWS, COLS): bone, soft tissue, kidneys, bladder
    layers_post: np.ndarray  # same, posterior, still anterior-oriented (mirrored at the end)
    bone_raw: np.ndarray  # unattenuated bone, for the local bone level under a lesion


@functools.lru_cache(maxsize=1)
def anatomy() -> Anatomy:
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
    return Anatomy(ant.astype(np.float32), post.astype(np.float32), raw.astype(np.float32))
