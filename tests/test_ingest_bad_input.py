"""Bad input gets a clear reason in the errors file, the rest is ingested, exit status 3."""

import csv
import io
import shutil
import zipfile
import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, JPEGLSLossless

from wbs_dist.data.store import Store

from helpers import run_cli


def synthetic_objects(archive: Path):
    for p in sorted((archive / "DICOM").rglob("*")):
        if p.is_file():
            yield p, pydicom.dcmread(p, stop_before_pixels=True)


def by_syntax(archive: Path, syntaxes) -> list[Path]:
    return [p for p, ds in synthetic_objects(archive) if ds.file_meta.TransferSyntaxUID in syntaxes]


def studies_of(archive: Path) -> dict[str, list[Path]]:
    out = {}
    for p, ds in synthetic_objects(archive):
        out.setdefault(ds.StudyInstanceUID, []).append(p)
    return out


def errors_of(store: Path) -> list[dict]:
    return list(csv.DictReader(open(store.with_name(store.name + ".errors.csv"))))


def test_every_bad_input_is_listed_and_the_rest_ingested(archive_copy, tmp_path):
    arc = archive_copy
    n_studies = len(studies_of(arc))
    bad = arc / "bad"
    bad.mkdir()
    expect = {}  # path relative to archive -> substring of the reason
    (bad / "notes.txt").write_text("scanner export log\n")
    expect["bad/notes.txt"] = "not a DICOM file"
    (bad / "empty.dcm").write_bytes(b"")
    expect["bad/empty.dcm"] = "empty file"
    (bad / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    expect["bad/ct.dcm"] = "not a nuclear-medicine planar image (Modality CT"
    (bad / "rtplan.dcm").write_bytes(Path(get_testdata_file("rtplan.dcm")).read_bytes())
    expect["bad/rtplan.dcm"] = "not a nuclear-medicine planar image (Modality RTPLAN"

    objects = [(p, ds.file_meta.TransferSyntaxUID, ds.StudyInstanceUID) for p, ds in synthetic_objects(arc)]
    touched_studies = set()

    def take(syntaxes):
        for p, ts, uid in objects:
            if ts in syntaxes and uid not in touched_studies:
                touched_studies.add(uid)
                return p, uid
        raise AssertionError(f"no untouched file with {syntaxes}")

    # Truncated file: the header cuts off.
    p, _ = take([ExplicitVRLittleEndian])
    p.write_bytes(p.read_bytes()[:200])
    expect[p.relative_to(arc).as_posix()] = ""
    # Pixel data shorter than Rows x Columns x Frames says.
    p, _ = take([ExplicitVRLittleEndian])
    ds = pydicom.dcmread(p)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(p)
    expect[p.relative_to(arc).as_posix()] = "pixel data could not be decoded"
    # No pixel data at all.
    p, _ = take([ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian])
    ds = pydicom.dcmread(p)
    del ds.PixelData
    ds.save_as(p)
    expect[p.relative_to(arc).as_posix()] = "no pixel data"
    # Corrupt compressed stream.
    p, _ = take([JPEG2000Lossless, JPEGLSLossless, RLELossless])
    ds = pydicom.dcmread(p)
    frames = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1))))
    frames = [f[: len(f) // 3] + bytes(200) for f in frames]
    ds.PixelData = pydicom.encaps.encapsulate(frames)
    ds.save_as(p)
    expect[p.relative_to(arc).as_posix()] = "pixel data could not be decoded"
    # Duplicate SOP Instance UID: the same object under a second name; the study itself is fine.
    p, uid = take([ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless,
                   pydicom.uid.ImplicitVRLittleEndian])
    touched_studies.discard(uid)
    dup = bad / "copy_of_object"
    shutil.copy(p, dup)
    expect["bad/copy_of_object"] = "duplicate SOP Instance UID"

    rows = list(csv.DictReader(open(arc / "annotations.csv")))
    annotated = [u for u in dict.fromkeys(r["study_uid"] for r in rows) if u not in touched_studies]
    # Mask of the wrong size.
    uid = annotated[0]
    touched_studies.add(uid)
    mask_path = next((arc / "masks" / uid).glob("*.png"))
    Image.fromarray(np.zeros((512, 128), np.uint16)).save(mask_path)
    expect[mask_path.relative_to(arc).as_posix()] = "does not match"
    # Conflicting lesion ids: the same id twice in one study.
    uid = annotated[1]
    touched_studies.add(uid)
    first = next(r for r in rows if r["study_uid"] == uid)
    rows.append(dict(first, label="benign" if first["label"] == "malignant" else "malignant"))
    # Rows for a study that is not in the archive.
    rows.append(dict(first, study_uid="1.2.826.0.1.3680043.99999.1"))
    with open(arc / "annotations.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["study_uid", "view", "lesion_id", "label", "tumor_type"])
        w.writeheader()
        w.writerows(rows)
    expect["annotations.csv"] = "conflicting lesion ids"

    store = tmp_path / "store.zarr"
    res = run_cli("ingest", arc, "--store", store)
    assert res.returncode == 3, res.stderr
    assert "Traceback" not in res.stderr
    assert "skipped" in res.stderr
    errs = errors_of(store)
    reasons = {}
    for e in errs:
        reasons.setdefault(e["path"], []).append(e["reason"])
    for path, needle in expect.items():
        assert path in reasons, f"{path} not listed; got {sorted(reasons)}"
        assert any(needle in r for r in reasons[path]), (path, reasons[path])
    assert any("matches no DICOM study" in r for r in reasons["annotations.csv"])
    st = Store.open(store)
    # Only the studies we broke are missing; everything else is in.
    assert len(st.study_keys()) == n_studies - len(touched_studies)


def test_archive_members_escaping_their_folder_are_refused(synth_archive, tmp_path):
    zpath = tmp_path / "evil.zip"
    one = next(p for p in sorted(synth_archive.rglob("*")) if p.is_file() and p.suffix != ".png"
               and p.name != "annotations.csv")
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.write(one, "ok/IM1")
        zf.writestr("../escape.dcm", one.read_bytes())
        zf.writestr("/abs/path.dcm", one.read_bytes())
    tpath = tmp_path / "evil.tar"
    with tarfile.open(tpath, "w") as tf:
        tf.add(one, "ok/IM1")
        info = tarfile.TarInfo("../../escape.dcm")
        data = one.read_bytes()
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("ok/link")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    for arc in (zpath, tpath):
        store = tmp_path / f"{arc.name}.zarr"
        res = run_cli("ingest", arc, "--store", store, "--workers", 1)
        assert res.returncode == 3, res.stderr
        reasons = {e["path"]: e["reason"] for e in errors_of(store)}
        assert any("escapes" in r for r in reasons.values()), reasons
        assert not (tmp_path / "escape.dcm").exists() and not (tmp_path.parent / "escape.dcm").exists()
        if arc == zpath:
            assert "absolute path" in reasons["/abs/path.dcm"]
        else:
            assert "link" in reasons["ok/link"]
        assert len(Store.open(store).study_keys()) <= 1


@pytest.mark.parametrize("content, needle", [
    (b"study_uid,view,lesion_id\n1.2.3,anterior,1\n", "missing column(s) label, tumor_type"),
    (b"\xff\xfe\x00garbage\x00\x81", "not UTF-8"),
])
def test_unusable_annotations_file_is_a_usage_error(synth_archive, tmp_path, content, needle):
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "annotations.csv").write_bytes(content)
    res = run_cli("ingest", synth_archive, "--store", tmp_path / "s.zarr", "--annotations", ann)
    assert res.returncode == 2
    assert needle in res.stderr and "Traceback" not in res.stderr


def test_bad_row_costs_only_its_study(archive_copy, tmp_path):
    rows = list(csv.DictReader(open(archive_copy / "annotations.csv")))
    rows[0]["label"] = "probably"
    with open(archive_copy / "annotations.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    store = tmp_path / "s.zarr"
    res = run_cli("ingest", archive_copy, "--store", store)
    assert res.returncode == 3
    reasons = [e["reason"] for e in errors_of(store)]
    assert any("line 2 column label: 'probably'" in r for r in reasons), reasons
    assert len(Store.open(store).study_keys()) == len(studies_of(archive_copy)) - 1


def test_missing_archive_and_foreign_store_are_usage_errors(synth_archive, tmp_path):
    res = run_cli("ingest", tmp_path / "nope", "--store", tmp_path / "s.zarr")
    assert res.returncode == 2 and "archive not found" in res.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"x")
    res = run_cli("ingest", synth_archive, "--store", foreign)
    assert res.returncode == 2 and "not a wbs_dist store" in res.stderr
