"""Review overlays: a study's views side by side, each lesion's contour coloured by its score.

DIR/<study_uid>.png, green (0) -> yellow (0.5) -> red (1). They show the original Study Instance UID
in the name and the patient's scan: private files (0600) in a private folder (0700, when this run
creates it), written atomically.

The name comes from the archive, so it is used only when it is a DICOM UID (digits and dots, at
most 64 characters, no empty component); any other value (`./../../x`, one with a `/`, ...) is
named by a hash of it, `uid-<16 hex digits>.png`, and every path is checked to stay in DIR.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
from PIL import Image

from wbs_dist.atomic import PRIVATE, inside, private_dir, replace

_DICOM_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")     # PS3.5 9.1, without the leading-zero rule


def colour(score: float) -> tuple[int, int, int]:
    """green (0) -> yellow (0.5) -> red (1)."""
    s = min(max(float(score), 0.0), 1.0)
    return (int(round(255 * min(1.0, 2 * s))), int(round(255 * min(1.0, 2 * (1 - s)))), 0)


def render(views: list[str], native: dict[str, np.ndarray], labels: dict[str, np.ndarray],
           lesions: list[tuple[int, str, float]]) -> np.ndarray:
    """(rows, cols, 3) uint8: the views side by side; lesions are (lesion id, view, score)."""
    panels = []
    for view in views:
        counts = native[view].astype(np.float32)
        body = counts[counts > 0]
        top = float(np.percentile(body, 99.0)) if body.size else 1.0
        grey = (np.clip(counts / max(top, 1e-6), 0, 1) * 255).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        label_map = labels.get(view)
        mine = [(lid, s) for lid, lview, s in lesions if lview == view]
        if label_map is not None and mine:
            table = np.zeros((int(label_map.max()) + 1, 3), np.uint8)
            scored = np.zeros(len(table), bool)
            for lid, s in mine:
                table[lid], scored[lid] = colour(s), True
            # A contour pixel is a lesion pixel with a 4-neighbour outside that lesion.
            edge = np.zeros(label_map.shape, bool)
            edge[1:] |= label_map[1:] != label_map[:-1]
            edge[:-1] |= label_map[:-1] != label_map[1:]
            edge[:, 1:] |= label_map[:, 1:] != label_map[:, :-1]
            edge[:, :-1] |= label_map[:, :-1] != label_map[:, 1:]
            edge &= scored[label_map]
            rgb[edge] = table[label_map[edge]]
        panels.append(rgb)
    rows = max(p.shape[0] for p in panels)
    panels = [np.pad(p, ((0, rows - p.shape[0]), (0, 4), (0, 0))) for p in panels]
    return np.concatenate(panels, axis=1)


def overlay_name(study_uid: str) -> str:
    """The overlay's file name (without .png): the UID itself when it is a valid DICOM UID, else
    `uid-` and the first 16 hex digits of its SHA-256 (the same name on every run)."""
    if len(study_uid) <= 64 and _DICOM_UID.fullmatch(study_uid):
        return study_uid
    return "uid-" + hashlib.sha256(study_uid.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def write_overlay(folder: Path, study_uid: str, image: np.ndarray) -> Path:
    folder = Path(folder)
    private_dir(folder)
    path = inside(folder, overlay_name(study_uid) + ".png")
    with replace(path, mode=PRIVATE) as fh:
        Image.fromarray(image).save(fh, format="PNG")
    return path
