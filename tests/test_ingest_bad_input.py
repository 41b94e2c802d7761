"""Bad input gets a clear reason in the errors file, the rest is ingested, exit status 3."""

import csv
import gzip
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, JPEGLSLossless

from wbs_dist.data.store import Store

from helpers import WBS, run_cli


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


# -- budgets before work, and whatever one member raises (issue 13) ---------------------------------------
MiB = 1 << 20
RATIO = 200                 # archive.RATIO_LIMIT: the bound on expansion
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Runs the command and reports the peak RSS of its whole waited-for process tree (the CLI and its
# decoding workers): RUSAGE_CHILDREN's ru_maxrss is the largest descendant's, in KiB on Linux.
PEAK_WRAPPER = """
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(r.stderr)
sys.stdout.write(r.stdout)
print("PEAK_RSS_KIB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(r.returncode)
"""


def run_cli_peak(*args, timeout=600):
    """run_cli, plus the peak resident memory of the command's process tree in bytes."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    res = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *WBS, *map(str, args)], capture_output=True,
                         text=True, env=env, timeout=timeout)
    peak = int(re.search(r"PEAK_RSS_KIB (\d+)", res.stdout).group(1)) * 1024
    return res, peak


@pytest.fixture
def private_tmpdir(tmp_path, monkeypatch):
    """TMPDIR for the commands a test runs, so the test can see what they leave there."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder


def reasons_by_path(store: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in errors_of(store):
        out.setdefault(e["path"], []).append(e["reason"])
    return out


def assert_clean_exit_3(res):
    assert res.returncode == 3, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]


def new_uids(ds, tag: str) -> None:
    """A study of its own: fresh study/series/SOP UIDs and patient."""
    root, n = "1.2.826.0.1.3680043.10.543.", zlib.crc32(tag.encode())
    ds.StudyInstanceUID = f"{root}1.{n}"
    ds.SeriesInstanceUID = f"{root}2.{n}"
    ds.SOPInstanceUID = f"{root}3.{n}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = f"BUDGET-{tag}"


def rle_bomb(template: Path, out: Path, side: int = 16384) -> None:
    """An RLE object declaring one side x side int16 frame of zeros: 8 MiB on disk (a run of 128 zero
    bytes encodes in 2), 512 MiB decoded. Built by hand: encoding 512 MiB would cost the test that much."""
    ds = pydicom.dcmread(template)
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    new_uids(ds, "rle-bomb")
    ds.Rows = ds.Columns = side
    ds.NumberOfFrames = 1
    for kw in ("DetectorVector", "EnergyWindowVector"):
        setattr(ds, kw, [1])
    ds.DetectorInformationSequence = ds.DetectorInformationSequence[:1]
    segment = b"\x81\x00" * (side * side // 128)        # each row: 128 runs of 128 zeros (PS3.5 G.3.1)
    header = struct.pack("<16I", 2, 64, 64 + len(segment), *([0] * 13))  # high bytes, then low bytes
    ds.PixelData = pydicom.encaps.encapsulate([header + segment + segment])
    ds.save_as(out, enforce_file_format=True)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["zip", "dir"])
def test_pixel_bomb_is_listed_at_bounded_memory(synth_archive, tmp_path, private_tmpdir, form):
    """Issue 13: a 9.5 KB zip holding a 16384 x 16384 RLE frame was decoded at 2.7 GB peak memory (and
    died with a MemoryError traceback under a memory cap). Now it is refused from its header (dir) or
    from its zip entry's expansion ratio (zip), listed, and the rest is ingested."""
    arc = tmp_path / "archive"
    shutil.copytree(synth_archive, arc)
    template = by_syntax(arc, [RLELossless])[0]
    bomb = arc / "DICOM" / "bomb" / "IM0001"
    bomb.parent.mkdir()
    rle_bomb(template, bomb)
    assert bomb.stat().st_size < 9 * MiB
    if form == "zip":
        target = tmp_path / "export.zip"
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
            for p in sorted(arc.rglob("*")):
                if p.is_file():
                    zf.write(p, p.relative_to(arc).as_posix())
        with zipfile.ZipFile(target) as zf:
            assert zf.getinfo("DICOM/bomb/IM0001").compress_size < 12_000    # the 9.5 KB
    else:
        target = arc
    store = tmp_path / "store.zarr"
    res, peak = run_cli_peak("ingest", target, "--store", store)
    print(f"[{form}] peak RSS of ingest and its workers: {peak / MiB:.0f} MiB")
    assert_clean_exit_3(res)
    reasons = reasons_by_path(store)
    assert list(reasons) == ["DICOM/bomb/IM0001"], reasons
    reason = reasons["DICOM/bomb/IM0001"][0]
    if form == "zip":
        assert "200:1" in reason and "zip bomb" in reason, reason
    else:
        assert "16384 x 16384" in reason and "512 MiB" in reason and "256 MiB object ceiling" in reason, reason
    assert len(Store.open(store).study_keys()) == len(studies_of(synth_archive))
    # The old code peaked at 2.7 GB decoding the frame; now nothing of it is decoded.
    assert peak < 1024 * MiB, f"peak RSS {peak / MiB:.0f} MiB"
    assert not any(private_tmpdir.iterdir())


@pytest.mark.slow
def test_object_and_study_ceilings_come_from_the_command_line(synth_archive, tmp_path):
    """--max-object-mb 0.75: every two-frame object (1024 x 256 x 2 x int16 = 1 MiB) is refused from its
    header; studies of two single-view objects (0.5 MiB each) are refused as a whole, before decoding."""
    store = tmp_path / "store.zarr"
    res = run_cli("ingest", synth_archive, "--store", store, "--max-object-mb", "0.75")
    assert_clean_exit_3(res)
    reasons = [r for rs in reasons_by_path(store).values() for r in rs]
    assert any("declared image of 1024 x 256 x 2 frame(s) x 1 sample(s) x 2 byte(s) = 1 MiB, over the "
               "0.75 MiB object ceiling (--max-object-mb); not decoded" in r for r in reasons), reasons
    assert any("study declares 1.0 MiB of pixel data in 2 object(s), over the 0.75 MiB ceiling" in r
               for r in reasons), reasons
    assert Store.open(store).study_keys() == []
    for bad in ("0", "-1", "nan", "inf", "lots"):
        res = run_cli("ingest", synth_archive, "--store", tmp_path / "x.zarr", "--max-object-mb", bad)
        assert res.returncode == 2 and "--max-object-mb" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("score", synth_archive, "--run", tmp_path, "--out", tmp_path / "p.csv", "--max-views", "0")
    assert res.returncode == 2 and "--max-views" in res.stderr


@pytest.mark.parametrize("workers", [0, 1])
def test_budgets_reach_the_header_pass_of_both_stages(synth_archive, workers):
    """Ingest and score read through the same StudySource/StudyPool: the budgets reach its workers."""
    from wbs_dist.data.studies import Budgets, StudySource
    from wbs_dist.data.workers import StudyPool

    with StudySource.open(synth_archive, budgets=Budgets(max_object_mb=0.75)) as source:
        assert source.budgets.object_bytes == int(0.75 * MiB)
        with StudyPool(source, workers, {}) as pool:
            headers = dict(pool.headers(source.members, progress=False))
    refused = [h for h in headers.values() if isinstance(h, str)]
    assert refused and all("object ceiling" in h for h in refused)
    assert all(h.frames == 1 for h in headers.values() if not isinstance(h, str))


@pytest.mark.slow
def test_study_with_too_many_views_is_refused_before_decoding(archive_copy, tmp_path):
    """Nine frames in one object: nine views, none identified (no detector information). The old code
    stored them all; now the study is listed from its header."""
    src = by_syntax(archive_copy, [ExplicitVRLittleEndian])[0]
    ds = pydicom.dcmread(src)
    new_uids(ds, "nine-views")
    frame = ds.pixel_array[0] if int(ds.get("NumberOfFrames", 1)) > 1 else ds.pixel_array
    ds.NumberOfFrames = 9
    for kw in ("DetectorInformationSequence", "DetectorVector", "EnergyWindowVector", "FrameIncrementPointer",
               "SeriesDescription", "ImageComments"):
        if kw in ds:
            delattr(ds, kw)
    ds.PixelData = np.ascontiguousarray(np.stack([frame] * 9)).tobytes()
    (archive_copy / "DICOM" / "many").mkdir()
    ds.save_as(archive_copy / "DICOM" / "many" / "IM1", enforce_file_format=True)
    store = tmp_path / "store.zarr"
    res = run_cli("ingest", archive_copy, "--store", store, "--workers", 1)
    assert_clean_exit_3(res)
    reasons = reasons_by_path(store)
    assert list(reasons) == ["DICOM/many/IM1"], reasons
    reason = reasons["DICOM/many/IM1"][0]
    assert "declares 9 views" in reason and "8 allowed (--max-views)" in reason and "not decoded" in reason
    assert len(Store.open(store).study_keys()) == len(studies_of(archive_copy)) - 1
    res = run_cli("ingest", archive_copy, "--store", tmp_path / "nine.zarr", "--max-views", 9)
    assert res.returncode == 0, res.stderr


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking 16-bit greyscale PNG header declaring width x height, with no pixels: 65 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_mask_png_bomb_is_refused_from_its_header(archive_copy, tmp_path):
    """Issue 13: a 65-byte mask PNG claiming 20000 x 20000 pixels crashed ingest (PIL's
    DecompressionBombError), and every rerun crashed at the same file."""
    bomb = png_claiming(20000, 20000)
    assert len(bomb) == 65
    uid = next(r["study_uid"] for r in csv.DictReader(open(archive_copy / "annotations.csv")))
    mask = sorted((archive_copy / "masks" / uid).glob("*.png"))[0]
    mask.write_bytes(bomb)
    member = mask.relative_to(archive_copy).as_posix()
    store = tmp_path / "store.zarr"
    for _ in range(2):                         # the rerun finishes too, and the store has its lesion table
        res = run_cli("ingest", archive_copy, "--store", store, "--workers", 1)
        assert_clean_exit_3(res)
        reasons = reasons_by_path(store)
        assert "20000x20000 does not match the view's 1024x256" in reasons[member][0], reasons
        assert "not decoded" in reasons[member][0]
    st = Store.open(store)
    assert len(st.study_keys()) == len(studies_of(archive_copy)) - 1
    assert len(st.lesion_table()["study"]) > 0


@pytest.mark.slow
def test_unreadable_zip_members_are_listed_and_a_rerun_finishes(synth_archive, tmp_path):
    """Issue 13: a zip member with a bad CRC crashed ingest (BadZipFile), every rerun crashed at the same
    file and the store never got its lesion table. Now: a bad CRC (stored member) and a corrupt deflate
    stream (zlib.error) are each that member's listed error."""
    by_study = studies_of(synth_archive)
    single = [ps[0] for ps in by_study.values() if len(ps) == 1]
    stored_victim, deflated_victim = single[0], single[1]
    zpath = tmp_path / "export.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(synth_archive.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(synth_archive).as_posix(),
                         compress_type=zipfile.ZIP_STORED if p == stored_victim else zipfile.ZIP_DEFLATED)
    raw = bytearray(zpath.read_bytes())
    with zipfile.ZipFile(zpath) as zf:
        for victim in (stored_victim, deflated_victim):
            info = zf.getinfo(victim.relative_to(synth_archive).as_posix())
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
            start = info.header_offset + 30 + name_len + extra_len
            mid = start + info.compress_size * 3 // 4            # in the pixel data, past the header
            raw[mid: mid + 64] = bytes(b ^ 0xFF for b in raw[mid: mid + 64])
    zpath.write_bytes(bytes(raw))
    store = tmp_path / "store.zarr"
    for _ in range(2):
        res = run_cli("ingest", zpath, "--store", store)
        assert_clean_exit_3(res)
        reasons = reasons_by_path(store)
        stored = reasons[stored_victim.relative_to(synth_archive).as_posix()][0]
        deflated = reasons[deflated_victim.relative_to(synth_archive).as_posix()][0]
        assert "cannot read (BadZipFile: Bad CRC-32" in stored, stored
        assert "cannot read (" in deflated and ("error" in deflated or "BadZipFile" in deflated), deflated
    st = Store.open(store)
    assert len(st.study_keys()) == len(by_study) - 2
    assert len(st.lesion_table()["study"]) > 0


def zeros_tar_gz(path: Path, before: list[tuple[str, bytes]], after: list[tuple[str, bytes]],
                 big: int = 100 * MiB, count: int = 10) -> None:
    """A .tar.gz of `count` members of `big` zero bytes between small members, written as concatenated
    gzip members (valid gzip, read as one stream): 1 GB expanded from about 1 MB, built in a second."""
    zeros = gzip.compress(bytes(MiB), compresslevel=9, mtime=0)

    def member(out, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        out.write(gzip.compress(info.tobuf(tarfile.PAX_FORMAT) + data + bytes(-len(data) % 512), mtime=0))

    with open(path, "wb") as out:
        for name, data in before:
            member(out, name, data)
        for i in range(count):
            info = tarfile.TarInfo(f"zeros/{i:02d}.bin")
            info.size = big
            out.write(gzip.compress(info.tobuf(tarfile.PAX_FORMAT), mtime=0))
            for _ in range(big // MiB):
                out.write(zeros)
        for name, data in after:
            member(out, name, data)
        out.write(gzip.compress(bytes(1024), mtime=0))        # end of archive: two zero blocks


@pytest.mark.slow
def test_tar_gz_bomb_extracts_within_its_budget(synth_archive, tmp_path, private_tmpdir):
    """Issue 13: a 1 MB .tar.gz filled the temporary folder with 1 GB before any check. Now the
    extraction stops at 200 x the archive's size (here about 1.3 MB: 260 MB); the members beyond are
    listed, not extracted, and the studies before and after them are ingested."""
    # Two one-object studies (the smallest, compressed ones), one before the zeros and one after.
    singles = sorted((ps[0] for ps in studies_of(synth_archive).values() if len(ps) == 1),
                     key=lambda p: p.stat().st_size)[:2]
    first, second = [(p.relative_to(synth_archive).as_posix(), p.read_bytes()) for p in singles]
    tgz = tmp_path / "export.tar.gz"
    zeros_tar_gz(tgz, [first], [second])
    size = tgz.stat().st_size
    budget = max(64 * MiB, RATIO * size)
    assert size < 2 * MiB

    peak, stop = [0], threading.Event()

    def watch():                                # the temporary folder's size, every 20 ms
        while not stop.is_set():
            total = 0
            for dirpath, _, names in os.walk(private_tmpdir):
                for n in names:
                    try:
                        total += os.lstat(os.path.join(dirpath, n)).st_size
                    except OSError:
                        pass
            peak[0] = max(peak[0], total)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    store = tmp_path / "store.zarr"
    t0 = time.monotonic()
    try:
        res = run_cli("ingest", tgz, "--store", store)
    finally:
        stop.set()
        watcher.join()
    print(f"archive {size / MiB:.2f} MiB, budget {budget / MiB:.0f} MiB, temporary folder peak "
          f"{peak[0] / MiB:.0f} MiB, {time.monotonic() - t0:.1f} s")
    assert_clean_exit_3(res)
    assert peak[0] <= budget, f"temporary folder reached {peak[0] / MiB:.0f} MiB, budget {budget / MiB:.0f} MiB"
    reasons = reasons_by_path(store)
    over = [p for p, rs in reasons.items() if any("past its budget" in r for r in rs)]
    assert len(over) >= 6 and all(p.startswith("zeros/") for p in over), reasons
    assert all(f"{RATIO}x the archive's" in reasons[p][0] for p in over)
    assert set(reasons) == {f"zeros/{i:02d}.bin" for i in range(10)}, reasons   # the rest: not DICOM
    assert len(Store.open(store).study_keys()) == 2
    assert not any(private_tmpdir.iterdir()), list(private_tmpdir.iterdir())


def test_tar_member_that_cannot_be_extracted_is_listed_and_the_rest_read(synth_archive, tmp_path,
                                                                         private_tmpdir):
    """Issue 13: a member name too long for the file system, or a file where a folder is needed, made
    the whole tar unreadable (exit 2, nothing ingested); zip and folder archives list just the member."""
    tpath = tmp_path / "export.tar"
    long_name = "DICOM/" + "x" * 300
    with tarfile.open(tpath, "w", format=tarfile.PAX_FORMAT) as tf:
        for p in sorted(synth_archive.rglob("*")):
            if p.is_file():
                tf.add(p, p.relative_to(synth_archive).as_posix())
        for name in (long_name, "clash/IM1", "clash/IM1/IM2", "DICOM/after/IM1"):
            data = b"not dicom" if name != "DICOM/after/IM1" else b""
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    store = tmp_path / "store.zarr"
    res = run_cli("ingest", tpath, "--store", store)
    assert_clean_exit_3(res)
    reasons = reasons_by_path(store)
    assert "not extracted (OSError: File name too long)" in reasons[long_name][0], reasons
    assert "not extracted (" in reasons["clash/IM1/IM2"][0], reasons
    assert "empty file" in reasons["DICOM/after/IM1"][0]         # read after the failures
    assert str(private_tmpdir) not in "".join(r for rs in reasons.values() for r in rs)
    assert len(Store.open(store).study_keys()) == len(studies_of(synth_archive))
    assert not any(private_tmpdir.iterdir())


@pytest.mark.slow
def test_tar_cut_short_keeps_the_members_before_the_break(synth_archive, tmp_path, private_tmpdir):
    """A .tar.gz cut off mid-way (a copy that ran out of space): the members before the break are read,
    and the rest of the archive is listed (a member cut half-way is listed, its file removed)."""
    tgz = tmp_path / "export.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        for p in sorted(synth_archive.rglob("*")):
            if p.is_file() and p.name != "annotations.csv" and "masks" not in p.parts:
                tf.add(p, p.relative_to(synth_archive).as_posix())
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(tgz.read_bytes()[: tgz.stat().st_size // 2])
    store = tmp_path / "store.zarr"
    res = run_cli("ingest", cut, "--store", store)
    assert_clean_exit_3(res)
    reasons = reasons_by_path(store)
    assert any("rest of the archive unreadable after member" in r for r in reasons[str(cut)]), reasons
    assert 0 < len(Store.open(store).study_keys()) < len(studies_of(synth_archive))
    assert not any(private_tmpdir.iterdir())
