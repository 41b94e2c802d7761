"""The annotation contract (DESIGN 3.2): annotations.csv rows and 16-bit PNG lesion label maps.

Row problems are collected, not raised, so one bad row costs its own study and nothing else; a file
that is not the contract's CSV at all (missing columns, not text) stops the run with exit 2.
"""

from __future__ import annotations

import csv
import io
import struct
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from wbs_dist.errors import InputError
from wbs_dist.schema import ANNOTATION_COLUMNS as COLUMNS
from wbs_dist.schema import ANNOTATIONS_CSV, LABELS, TUMOR_TYPES, VIEWS


@dataclass
class Lesion:
    lesion_id: int
    view: str
    label: str
    row: int                     # 1-based line in the CSV (header = line 1)


@dataclass
class StudyAnnotations:
    lesions: list[Lesion] = field(default_factory=list)
    tumor_type: str | None = None
    problems: list[str] = field(default_factory=list)   # reasons this study's rows cannot be used

    @property
    def rows(self) -> list[int]:
        return [les.row for les in self.lesions]


def parse_annotations(data: bytes, name: str = ANNOTATIONS_CSV) -> dict[str, StudyAnnotations]:
    """study_uid -> its lesions. Raises InputError when the file as a whole is unusable."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{name}: not UTF-8 text; expected a CSV with columns {', '.join(COLUMNS)}")
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise InputError(f"{name}: missing column(s) {', '.join(missing)} (line 1 has: {', '.join(header) or 'nothing'})")
    reader.fieldnames = header
    studies: dict[str, StudyAnnotations] = defaultdict(StudyAnnotations)
    seen: dict[tuple[str, int], int] = {}
    try:
        for row in reader:
            line = reader.line_num
            values = {k: (row.get(k) or "").strip() for k in COLUMNS}
            uid = values["study_uid"]
            if not uid:
                # Without a study we cannot attach the problem to anything: a file-level error.
                raise InputError(f"{name} line {line}: empty study_uid")
            st = studies[uid]
            problem = None
            try:
                lid = int(values["lesion_id"])
            except ValueError:
                lid = None
            if None in row.values() or None in row:
                problem = f"line {line}: wrong number of fields"
            elif lid is None or lid < 1 or lid > 65535:
                problem = f"line {line} column lesion_id: {values['lesion_id']!r} is not an integer in 1..65535"
            elif values["view"] not in VIEWS:
                problem = f"line {line} column view: {values['view']!r} is not {'|'.join(VIEWS)}"
            elif values["label"] not in LABELS:
                problem = f"line {line} column label: {values['label']!r} is not {'|'.join(LABELS)}"
            elif values["tumor_type"] not in TUMOR_TYPES:
                problem = f"line {line} column tumor_type: {values['tumor_type']!r} is not {'|'.join(TUMOR_TYPES)}"
            elif (uid, lid) in seen:
                problem = f"conflicting lesion ids: lesion {lid} appears on lines {seen[(uid, lid)]} and {line}"
            elif st.tumor_type not in (None, values["tumor_type"]):
                problem = f"line {line} column tumor_type: {values['tumor_type']!r} differs from {st.tumor_type!r} earlier in the study"
            if problem:
                st.problems.append(problem)
                continue
            seen[(uid, lid)] = line
            st.tumor_type = values["tumor_type"]
            st.lesions.append(Lesion(lid, values["view"], values["label"], line))
    except csv.Error as exc:
        raise InputError(f"{name} line {reader.line_num}: not valid CSV ({exc})")
    return dict(studies)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG's IHDR chunk, without decoding anything; None if not a PNG."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return height, width


def read_mask(data: bytes, name: str, shape: tuple[int, int]) -> np.ndarray:
    """A lesion label map as uint16, checked against the view's shape. Raises ValueError(reason).

    The size is checked from the header before any pixel is decoded: a 65-byte PNG declaring
    20000 x 20000 pixels would otherwise cost 800 MB (16-bit) or stop the run with PIL's
    DecompressionBombError."""
    declared = _png_size(data)
    if declared is not None and declared != tuple(shape):
        raise ValueError(f"{name}: mask size {declared[0]}x{declared[1]} does not match the view's "
                         f"{shape[0]}x{shape[1]} (from the PNG header; not decoded)")
    try:
        with warnings.catch_warnings():
            # Over PIL's pixel limit: a warning up to twice the limit, an error beyond; both refuse.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:    # lazy: reads the header only
                if img.format != "PNG":
                    raise ValueError(f"{name}: not a PNG ({img.format})")
                if img.mode not in ("I;16", "I;16B", "I;16L", "I", "L"):
                    raise ValueError(f"{name}: PNG mode {img.mode}, expected 16-bit greyscale label map")
                if (img.height, img.width) != tuple(shape):
                    raise ValueError(f"{name}: mask size {img.height}x{img.width} does not match the view's "
                                     f"{shape[0]}x{shape[1]} (from the PNG header; not decoded)")
                img.load()
                arr = np.asarray(img)
    except ValueError as exc:
        if str(exc).startswith(f"{name}: "):
            raise                                         # ours, already phrased
        raise ValueError(f"{name}: unreadable PNG ({str(exc)[:200]})")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"{name}: refused before decoding ({exc})")
    except Exception as exc:  # UnidentifiedImageError, truncated or corrupt streams (OSError, SyntaxError,
        # zlib.error), MemoryError: this mask's problem, never the run's
        raise ValueError(f"{name}: unreadable PNG ({type(exc).__name__}: {str(exc)[:200]})")
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a single-channel image, got shape {arr.shape}")
    if arr.min() < 0 or arr.max() > 65535:
        raise ValueError(f"{name}: values outside 0..65535")
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name}: mask size {arr.shape[0]}x{arr.shape[1]} does not match the view's {shape[0]}x{shape[1]}")
    return arr.astype(np.uint16)
