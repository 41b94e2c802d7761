"""One DICOM object → its planar views with pixels and the few attributes we keep, or a reason why not.

Accepted: nuclear-medicine planar images — NM Image Storage, and Secondary Capture objects whose
Modality is NM (screen captures and converted archives; the NEMA NM1 scan is one). Views are
identified from the DICOM only: the View Code Sequence of the frame's detector (PS3.3 C.8.4.11), then
ANT/POST words in the code meaning or the descriptions; a view that cannot be identified stays
`unknown` — never guessed from frame order.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from wbs_dist.data.deid import DEVICE_ATTRIBUTES, KEPT_ATTRIBUTES, device_fields
from wbs_dist.schema import ANTERIOR, POSTERIOR, UNKNOWN_VIEW

# Reading never validates values: pydicom's validation warnings quote the offending value in full, and
# a malformed UID or name is exactly what must never reach a log (DESIGN 3.4). What this module needs
# it checks itself.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

NM_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
SECONDARY_CAPTURE = {
    "1.2.840.10008.5.1.4.1.1.7",      # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.2",    # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",    # Multi-frame Grayscale Word SC
}
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR: an index, not an image

# SNOMED CT codes and their legacy SNOMED RT equivalents (DICOM CID 26 "Nuclear Medicine Projections").
VIEW_CODES = {
    "399321004": ANTERIOR, "G-5215": ANTERIOR,
    "399001007": POSTERIOR, "G-5216": POSTERIOR,
}
_ANT_WORDS = {"ANT", "ANTERIOR"}
_POST_WORDS = {"POST", "POSTERIOR", "PST"}
_DETECTOR_VECTOR = 0x00540020


class Rejected(Exception):
    """This object cannot be used; the message is the reason shown to the user."""


@dataclass
class Header:
    """What grouping needs, read without the pixels."""

    study_uid: str
    patient_id: str
    sop_uid: str
    directory: bool = False  # a DICOMDIR index: skipped quietly
    frames: int = 1          # declared NumberOfFrames: the views this object brings to its study
    nbytes: int = 0          # declared pixel data: rows x columns x frames x samples x bytes
    burned_in: bool = False  # Burned In Annotation (0028,0301) YES: text such as a name may be in the pixels


@dataclass
class View:
    name: str                  # anterior | posterior | unknown
    pixels: np.ndarray         # (rows, cols), source dtype, native byte order


@dataclass
class DecodedObject:
    views: list[View]
    meta: dict                 # allow-listed attributes (deid.KEPT_ATTRIBUTES) + transfer syntax


def _read(data, stop_before_pixels: bool) -> pydicom.Dataset:
    """`data` is bytes or a seekable binary file object."""
    if isinstance(data, (bytes, bytearray)):
        if not data:
            raise Rejected("empty file")
        data = io.BytesIO(data)
    try:
        return pydicom.dcmread(data, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        raise Rejected("not a DICOM file (no DICM preamble or recognisable header)")
    except Exception as exc:  # pydicom raises many types on garbage; all mean the same to a user
        raise Rejected(f"unreadable DICOM header ({type(exc).__name__}: {exc})")


def declared_size(ds: pydicom.Dataset) -> tuple[int, int, str]:
    """(frames, bytes, 'rows x cols x frames ...' text) as the header declares them, before any pixel
    is read: the budget a decoder would allocate."""
    try:
        rows = int(ds.get("Rows", 0) or 0)
        cols = int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 8) or 8)
    except (TypeError, ValueError) as exc:
        raise Rejected(f"unreadable image size in the header ({exc})")
    if min(rows, cols, frames, samples, bits) < 0:
        raise Rejected(f"negative image size in the header ({rows} x {cols}, {frames} frame(s))")
    nbytes = rows * cols * frames * samples * max(1, (bits + 7) // 8)
    text = (f"{rows} x {cols} x {frames} frame(s) x {samples} sample(s) x {max(1, (bits + 7) // 8)} byte(s)")
    return frames, nbytes, text


def check_size(ds: pydicom.Dataset, max_bytes: int | None) -> tuple[int, int]:
    """(frames, bytes) declared; Rejected when the pixel data would exceed `max_bytes`. Checked from
    the header: a 9.5 KB zip holding an RLE object that declares one 16384 x 16384 frame decoded at
    2.7 GB peak memory (issue 13)."""
    frames, nbytes, text = declared_size(ds)
    if max_bytes is not None and nbytes > max_bytes:
        raise Rejected(f"declared image of {text} = {_mib(nbytes)}, over the {_mib(max_bytes)} object "
                       "ceiling (--max-object-mb); not decoded")
    return frames, nbytes


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.4g} MiB"


def read_header(data, max_bytes: int | None = None) -> Header:
    """The grouping fields; Rejected when the object is not one we use or declares more pixel data
    than `max_bytes`."""
    ds = _read(data, stop_before_pixels=True)
    sop_class = str(ds.get("SOPClassUID", "") or getattr(ds.get("file_meta", {}), "MediaStorageSOPClassUID", ""))
    if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        return Header("", "", "", directory=True)
    study = str(ds.get("StudyInstanceUID", "") or "")
    sop = str(ds.get("SOPInstanceUID", "") or "")
    if not study:
        raise Rejected("no Study Instance UID")
    if not sop:
        raise Rejected("no SOP Instance UID")
    _check_modality(ds)
    frames, nbytes = check_size(ds, max_bytes)
    return Header(study_uid=study, patient_id=str(ds.get("PatientID", "") or ""), sop_uid=sop,
                  frames=frames, nbytes=nbytes,
                  burned_in=str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES")


def _check_modality(ds: pydicom.Dataset) -> None:
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", ""))
    if sop_class == NM_IMAGE_STORAGE or (sop_class in SECONDARY_CAPTURE and modality == "NM"):
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        if any("TOMO" in v for v in image_type[2:3]):
            raise Rejected(f"NM tomography ({image_type[2]}), not a planar whole-body image")
        return
    try:
        name = pydicom.uid.UID(sop_class).name
    except Exception:
        name = sop_class
    raise Rejected(f"not a nuclear-medicine planar image (Modality {modality or 'missing'}, {name or 'no SOP class'})")


def _words(text) -> set[str]:
    return set(re.split(r"[^A-Z]+", str(text).upper())) - {""}


def _view_from_text(*texts) -> str:
    words = set().union(*(_words(t) for t in texts if t))
    ant, post = bool(words & _ANT_WORDS), bool(words & _POST_WORDS)
    if ant != post:
        return ANTERIOR if ant else POSTERIOR
    return UNKNOWN_VIEW  # neither, or both ("ANT/POST" on a side-by-side capture)


def _view_from_detector_item(item) -> str:
    for code in item.get("ViewCodeSequence") or []:
        view = VIEW_CODES.get(str(code.get("CodeValue", "")))
        if view:
            return view
        view = _view_from_text(code.get("CodeMeaning", ""))
        if view != UNKNOWN_VIEW:
            return view
    return UNKNOWN_VIEW


def identify_views(ds: pydicom.Dataset, n_frames: int) -> list[str]:
    """One view name per frame, from the DICOM alone."""
    detectors = list(ds.get("DetectorInformationSequence") or [])
    pointers = ds.get("FrameIncrementPointer")
    if pointers is not None and not isinstance(pointers, (list, tuple, pydicom.multival.MultiValue)):
        pointers = [pointers]
    names = [UNKNOWN_VIEW] * n_frames
    if detectors:
        vector = ds.get("DetectorVector")
        if vector is not None and not isinstance(vector, (list, tuple, pydicom.multival.MultiValue)):
            vector = [vector]
        indexed = pointers is not None and _DETECTOR_VECTOR in [int(p) for p in pointers]
        for i in range(n_frames):
            if indexed and vector is not None and i < len(vector) and 1 <= int(vector[i]) <= len(detectors):
                names[i] = _view_from_detector_item(detectors[int(vector[i]) - 1])
            elif len(detectors) == 1:
                names[i] = _view_from_detector_item(detectors[0])
    if n_frames == 1 and names[0] == UNKNOWN_VIEW:
        names[0] = _view_from_text(ds.get("SeriesDescription", ""), ds.get("ImageComments", ""),
                                   ds.get("ImageID", ""), ds.get("DerivationDescription", ""))
    return names


def decode(data: bytes, max_bytes: int | None = None) -> DecodedObject:
    ds = _read(data, stop_before_pixels=False)
    _check_modality(ds)
    check_size(ds, max_bytes)           # before the pixels, whether or not a header pass ran
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise Rejected("no pixel data")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise Rejected(f"colour image (SamplesPerPixel {ds.SamplesPerPixel}), expected greyscale counts")
    meta_group = getattr(ds, "file_meta", None)
    ts = str(meta_group.get("TransferSyntaxUID", "")) if meta_group is not None else ""
    try:
        arr = ds.pixel_array
    except Exception as exc:  # truncated, corrupt stream, missing decoder: all stop this object
        msg = str(exc).splitlines()[0][:300]
        raise Rejected(f"pixel data could not be decoded ({type(exc).__name__}: {msg})")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    frames = arr if (n_frames > 1 and arr.ndim == 3) else arr[None]
    if frames.ndim != 3:
        raise Rejected(f"unexpected pixel array shape {arr.shape}")
    # Big-endian syntaxes decode to '>i2': store in this machine's byte order, same values.
    frames = frames.astype(frames.dtype.newbyteorder("="), copy=False)
    names = identify_views(ds, frames.shape[0])
    meta = {k: _plain(ds.get(k)) for k in KEPT_ATTRIBUTES if k in ds}
    if any(k in ds for k in DEVICE_ATTRIBUTES):
        meta.update(device_fields(ds.get("Manufacturer"), ds.get("ManufacturerModelName")))
    meta["TransferSyntaxUID"] = ts
    return DecodedObject(views=[View(name, np.ascontiguousarray(f)) for name, f in zip(names, frames)], meta=meta)


def _plain(value):
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [_plain(v) for v in value]
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)
