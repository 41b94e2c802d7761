"""DICOM: a rendered study as NM objects in the eight forms of :data:`~wbs_dist.synth.plan.FORMS`.

Each form is either one 2-frame object (both views, in the plan's frame order) or two single-frame
objects; the view is named by View Code Sequence in the Detector Information Sequence, or, in the
``text_views`` form, only by 'ANT'/'POST' text. Compressed forms are encoded by the pydicom ecosystem's
plugins and decoded again before they are written (:func:`study_files`).
"""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np

from wbs_dist.schema import ANTERIOR, POSTERIOR, VIEWS
from wbs_dist.synth.body import COLS, PIXEL_SPACING_MM, ROWS
from wbs_dist.synth.plan import StudyPlan, synth_uid
from wbs_dist.synth.render import Study

# The DICOM vocabulary below (SOP class, SCT/SRT view codes, ANT/POST text) is written out here on
# purpose and not imported from wbs_dist.data.dicom: the synthetic archive is the independent oracle
# that data/dicom.py's reader is tested against, so a wrong code there must not be copied here too.
# Only the contract's words (the view names, from wbs_dist.schema) are shared.
NM_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
VIEW_CODES = {  # SCT codes; legacy SRT codes for the old big-endian archive form
    ANTERIOR: (("399321004", "SCT", "anterior projection"), ("G-5215", "SRT", "Anterior projection")),
    POSTERIOR: (("399001007", "SCT", "posterior projection"), ("G-5216", "SRT", "Posterior projection")),
}
VIEW_TEXT = {ANTERIOR: "ANT", POSTERIOR: "POST"}


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
    order = [POSTERIOR, ANTERIOR] if plan.posterior_first else [ANTERIOR, POSTERIOR]
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
    """The dataset as a DICOM file (preamble, file meta), in its file meta's transfer syntax."""
    from pydicom import dcmwrite

    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _check_roundtrip(data: bytes, expected: np.ndarray) -> None:
    from pydicom import dcmread

    got = dcmread(io.BytesIO(data)).pixel_array
    if got.shape != expected.shape or not np.array_equal(got, expected):
        raise RuntimeError("encoder round trip changed the pixels")


def study_files(study: Study, folder: int, verify: bool = True) -> list[tuple[str, bytes]]:
    """(archive path, bytes) of the study's DICOM files; paths carry no identifiers."""
    files = []
    for k, (ds, arr) in enumerate(_study_objects(study), start=1):
        data = encode(ds)
        if verify and ds.file_meta.TransferSyntaxUID.is_compressed:
            _check_roundtrip(data, arr)  # a broken codec plugin must not yield a silently wrong archive
        files.append((f"DICOM/{folder:05d}/{int(ds.SeriesNumber):02d}/IM{k:04d}", data))
    return files

