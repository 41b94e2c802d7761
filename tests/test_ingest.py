"""`wbs-dist ingest` as a user sees it: exit status, the store's contents, the errors file."""

import csv
import json
import os
import shutil
import signal
import subprocess
import time
import zipfile
import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import zarr
from pydicom.data import get_testdata_file

from wbs_dist.data.deid import keyed_hash, load_or_create_secret
from wbs_dist.data.dicom import VIEW_CODES
from wbs_dist.data.store import Store

from helpers import WBS, kill_point_rng, run_cli, store_snapshot, stored_keys

NM1_COUNTS = 3_596_452  # (0018,0070) Counts Accumulated of NEMA WG04 "NM1"


def nm1_path() -> str:
    path = get_testdata_file("JPEG-LL.dcm")
    assert path, "pydicom-data's JPEG-LL.dcm is required (pip install pydicom-data)"
    return path


def dicom_files(archive: Path):
    for p in sorted(archive.rglob("*")):
        if p.is_file() and p.name != "annotations.csv" and "masks" not in p.parts:
            yield p


def expected_views(ds) -> list[str]:
    """Views per frame read straight from the DICOM, independently of wbs_dist.dicom."""
    n = int(ds.get("NumberOfFrames", 1) or 1)
    det = ds.get("DetectorInformationSequence")
    if det and all("ViewCodeSequence" in item for item in det):
        vec = ds.get("DetectorVector", [1] * n)
        vec = list(vec) if isinstance(vec, (list, pydicom.multival.MultiValue)) else [vec]
        return [VIEW_CODES[det[int(v) - 1].ViewCodeSequence[0].CodeValue] for v in vec]
    text = f"{ds.get('SeriesDescription', '')} {ds.get('ImageComments', '')}".upper()
    return ["posterior" if "POST" in text else "anterior"]


def test_real_nm1_scan_ingests_with_its_counts(tmp_path):
    arc = tmp_path / "arc"
    arc.mkdir()
    shutil.copy(nm1_path(), arc / "NM1.dcm")
    res = run_cli("ingest", arc, "--store", tmp_path / "s.zarr")
    assert res.returncode == 0, res.stderr
    st = Store.open(tmp_path / "s.zarr")
    (key,) = st.study_keys()
    attrs = st.study_attrs(key)
    # NM1 carries no View Code Sequence nor ANT/POST text: stored as unknown, never guessed.
    assert attrs["views"] == ["unknown"]
    native = st.native_views(key)["unknown"]
    assert native.dtype == np.int16 and native.shape == (1024, 256)
    assert int(native.sum()) == NM1_COUNTS
    assert attrs["annotated"] is False
    # Plain zarr opens it (DESIGN 3.4).
    assert zarr.open_group(str(tmp_path / "s.zarr"), mode="r").attrs["format"] == "wbs_dist.store"


@pytest.fixture(scope="module")
def ingested(synth_archive, tmp_path_factory):
    store = tmp_path_factory.mktemp("ingest") / "store.zarr"
    res = run_cli("ingest", synth_archive, "--store", store, "--workers", 2)
    assert res.returncode == 0, res.stderr
    return store, res


@pytest.mark.slow             # a CLI process: out of the fast subset (CI runs it)
def test_a_store_is_a_few_files_for_many_studies(synth_archive, tmp_path):
    """A parallel filesystem's metadata load: studies share batches (up to 64, one a worker's task, one
    a native dtype), 9 files each; a group a study was 11 files in 5 folders."""
    store = tmp_path / "s.zarr"
    assert run_cli("ingest", synth_archive, "--store", store, "--workers", 1).returncode == 0
    files = sum(len(f) for _, _, f in os.walk(store / "studies"))
    assert files / len(Store.open(store).study_keys()) <= 3


def test_a_batch_of_no_studies_is_refused(synth_archive, tmp_path):
    res = run_cli("ingest", synth_archive, "--store", tmp_path / "s.zarr", "--batch-studies", "0")
    assert res.returncode == 2 and "--batch-studies" in res.stderr and not (tmp_path / "s.zarr").exists()


def test_synthetic_archive_round_trips_exactly(synth_archive, ingested):
    store, _ = ingested
    st = Store.open(store)
    secret = load_or_create_secret()
    forms = set()
    checked = 0
    for path in dicom_files(synth_archive):
        ds = pydicom.dcmread(path)
        forms.add(str(ds.file_meta.TransferSyntaxUID))
        key = keyed_hash(secret, "study", ds.StudyInstanceUID)
        stored_views = st.native_views(key)
        frames = ds.pixel_array if int(ds.get("NumberOfFrames", 1)) > 1 else ds.pixel_array[None]
        for view, frame in zip(expected_views(ds), frames):
            stored = stored_views[view]
            assert stored.dtype == frame.dtype.newbyteorder("=")
            assert stored.dtype.isnative
            np.testing.assert_array_equal(stored, frame)
            checked += 1
    assert checked >= 24
    # The forms a converter meets (synth cycles them): at least 4 transfer syntaxes went through.
    assert len(forms) >= 4, forms


def test_lesion_table_matches_annotations(synth_archive, ingested):
    store, _ = ingested
    st = Store.open(store)
    secret = load_or_create_secret()
    rows = list(csv.DictReader(open(synth_archive / "annotations.csv")))
    table = st.lesion_table()
    assert len(table["study"]) == len(rows)
    want = sorted((keyed_hash(secret, "study", r["study_uid"]), int(r["lesion_id"]), r["view"],
                   int(r["label"] == "malignant")) for r in rows)
    views = zarr.open_group(str(store / "lesions")).attrs["views"]
    got = sorted((f"{s:016x}", int(l), views[v], int(y))
                 for s, l, v, y in zip(table["study"], table["lesion_id"], table["view"], table["label"]))
    assert got == want
    # Every lesion survives at the training resolution, inside its own half of the image.
    assert (table["area_train"] > 0).all()
    burden = table["burden"]
    assert set(table["burden_group"][burden <= 3]) <= {0} and set(table["burden_group"][burden > 6]) <= {2}


def test_rerun_is_idempotent(synth_archive, ingested, tmp_path):
    store, _ = ingested
    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    before = store_snapshot(copy)
    res = run_cli("ingest", synth_archive, "--store", copy)
    assert res.returncode == 0, res.stderr
    assert "0 new" in res.stdout
    assert store_snapshot(copy) == before


def test_a_store_refuses_another_secret(synth_archive, ingested, tmp_path):
    """The same patient under two secrets would be two pseudonyms, who could land in two folds: a store
    takes studies under the secret it was made with only, and loses nothing when refusing."""
    store, _ = ingested
    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    before = store_snapshot(copy)
    other = tmp_path / "other-secret"
    other.write_text("e" * 64)
    other.chmod(0o600)
    res = run_cli("ingest", synth_archive, "--store", copy, "--secret-file", other)
    assert res.returncode == 2 and "another secret" in res.stderr and str(copy) in res.stderr, res.stderr
    assert store_snapshot(copy) == before


@pytest.mark.slow
def test_zip_and_tar_give_the_same_store(synth_archive, ingested, tmp_path):
    store, _ = ingested
    want = store_snapshot(store)
    zpath = tmp_path / "a.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(synth_archive.rglob("*")):
            if p.is_file():
                zf.write(p, f"export/{p.relative_to(synth_archive).as_posix()}")
    tpath = tmp_path / "a.tar.gz"
    with tarfile.open(tpath, "w:gz") as tf:
        tf.add(synth_archive, arcname=".")
    for arc in (zpath, tpath):
        out = tmp_path / f"{arc.name}.zarr"
        res = run_cli("ingest", arc, "--store", out, "--workers", 1)
        assert res.returncode == 0, res.stderr
        assert store_snapshot(out) == want


def test_no_identifier_reaches_store_or_log(synth_archive, ingested):
    store, res = ingested
    secrets = set()
    for path in dicom_files(synth_archive):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "AccessionNumber",
                   "StudyInstanceUID", "SOPInstanceUID", "SeriesInstanceUID", "ReferringPhysicianName",
                   "StationName", "DeviceSerialNumber"):
            value = str(ds.get(kw, "") or "")
            if len(value) >= 4:
                secrets.add(value)
        name = ds.get("PatientName")
        if name:
            secrets.update(p for p in (name.family_name, name.given_name) if len(p) >= 4)
    assert len(secrets) > 20
    blobs = [res.stdout.encode(), res.stderr.encode()]
    for p in store.rglob("*"):
        if p.is_file():
            blobs.append(p.read_bytes())
    errors = store.with_name(store.name + ".errors.csv")
    blobs.append(errors.read_bytes())
    for blob in blobs:
        for s in secrets:
            assert s.encode() not in blob, f"identifier {s!r} leaked"
    # The secret itself lives outside the store, readable by its owner only.
    secret = Path(os.environ["WBS_DIST_SECRET_FILE"])
    assert oct(secret.stat().st_mode & 0o777) == "0o600"


@pytest.mark.slow
def test_kill_then_rerun_equals_uninterrupted(synth_archive, ingested, tmp_path):
    store, _ = ingested
    killed = tmp_path / "killed.zarr"
    # Batches of 2 studies: a kill loses at most the batch being filled, so some are published before it.
    proc = subprocess.Popen(WBS + ["ingest", str(synth_archive), "--store", str(killed), "--workers", "2",
                                   "--batch-studies", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    at = kill_point_rng("ingest").randint(3, 6)       # studies written before the kill
    while time.time() < deadline:
        if len(stored_keys(killed)) >= at:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len(stored_keys(killed))
    assert 3 <= n_done < 12, "the kill should land mid-run"
    res = run_cli("ingest", synth_archive, "--store", killed)
    assert res.returncode == 0, res.stderr
    assert f"{12 - n_done} new" in res.stdout, res.stdout
    assert store_snapshot(killed) == store_snapshot(store)


@pytest.mark.slow
def test_sigterm_during_a_tar_ingest_leaves_no_files_and_no_processes(synth_archive, tmp_path):
    """scancel or a time limit mid-ingest: the extracted DICOM files (names, MRNs) are removed, the
    worker processes stop with the run, and a rerun finishes the store."""
    import tarfile

    tar = tmp_path / "export.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(synth_archive, arcname=".")
    scratch_dir = tmp_path / "tmp"
    scratch_dir.mkdir()
    store = tmp_path / "store.zarr"
    env = dict(os.environ, TMPDIR=str(scratch_dir), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(WBS + ["ingest", str(tar), "--store", str(store), "--workers", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(scratch_dir.glob("wbs-dist-tar-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert not list(scratch_dir.glob("wbs-dist-*"))
    # No process of the run is left (the spawned workers carry the run's TMPDIR in their environment).
    left = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"TMPDIR={scratch_dir}".encode() in environ.read_bytes():
                left.append(environ.parent.name)
        except OSError:
            pass
    assert not left, f"processes left behind: {left}"
    res = run_cli("ingest", tar, "--store", store)
    assert res.returncode == 0 and "12 studies" in res.stdout, res.stdout + res.stderr


def _studies_by_uid(archive: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for path in dicom_files(archive):
        out.setdefault(str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID), []).append(path)
    return out


def _rewrite(paths, **values):
    for path in paths:
        ds = pydicom.dcmread(path)
        for key, value in values.items():
            setattr(ds, key, value)
        ds.save_as(path)


@pytest.mark.slow             # CLI processes (4-5 s): out of the fast subset (CI runs it)
def test_deidentification_holds_for_hostile_headers(archive_copy, tmp_path):
    """Burned-in text is refused, free-text device fields keep only a vocabulary word, and a malformed
    UID is never quoted by a warning: no byte of the store, its errors file or the output shows them."""
    studies = _studies_by_uid(archive_copy)
    uids = sorted(studies)
    burned, device, odd = uids[0], uids[1], uids[2]
    _rewrite(studies[burned], BurnedInAnnotation="YES")
    _rewrite(studies[device], Manufacturer="Kellerman Imaging of Ostby", ManufacturerModelName="Discovery NM/CT 670 (room of Dr Ostbyhaugen)")
    # A UID with letters (pydicom's validation quotes such values in full), annotations moved with it.
    hostile = odd.rsplit(".", 1)[0] + ".Ostbyhaugen77"
    _rewrite(studies[odd], StudyInstanceUID=hostile)
    csv_path = archive_copy / "annotations.csv"
    csv_path.write_text(csv_path.read_text().replace(odd, hostile))
    if (archive_copy / "masks" / odd).exists():
        (archive_copy / "masks" / odd).rename(archive_copy / "masks" / hostile)
    store = tmp_path / "store.zarr"
    res = run_cli("ingest", archive_copy, "--store", store)
    assert res.returncode == 3, res.stderr[-2000:]
    errors = (tmp_path / "store.zarr.errors.csv").read_text()
    assert "Burned In Annotation" in errors and errors.count("Burned In Annotation") == len(studies[burned])
    assert "11 studies" in res.stdout                      # the burned-in study is not stored
    blobs = [res.stdout.encode(), res.stderr.encode()] + [p.read_bytes() for p in store.rglob("*") if p.is_file()]
    for secret in ("Kellerman", "Ostby", "Ostbyhaugen77", hostile):
        assert not any(secret.encode() in blob for blob in blobs), f"{secret!r} leaked"
    sources = [s for key in Store.open(store).study_keys() for s in Store.open(store).study_attrs(key)["sources"]]
    assert {(s.get("Manufacturer"), s.get("ManufacturerModelName")) for s in sources} >= \
        {(None, "Discovery NM/CT 670"), ("GE", "Discovery NM/CT 670"), ("Philips", "Precedence")}
    # Accepted on request, knowingly: the store is then not de-identified.
    again = run_cli("ingest", archive_copy, "--store", store, "--accept-burned-in")
    assert "(1 new, 11 already there)" in again.stdout, again.stdout + again.stderr


@pytest.mark.slow             # a CLI process: out of the fast subset (CI runs it)
def test_a_batch_missing_one_shard_file_is_written_again(synth_archive, ingested, tmp_path):
    """A crash on a filesystem that does not order renames can lose one file of a published batch; zarr
    would then read its views as zeros. The completeness check names every file, and the next ingest
    writes that batch's studies again."""
    store, _ = ingested
    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    batch = sorted(p for p in (copy / "studies").iterdir() if p.is_dir())[0]
    n = len(json.loads((batch / "zarr.json").read_text())["attributes"]["studies"])
    (batch / "native" / "c.0.0.0").unlink()
    assert len(stored_keys(copy)) == 12 - n
    res = run_cli("ingest", synth_archive, "--store", copy)
    assert res.returncode == 0 and f"({n} new, {12 - n} already there)" in res.stdout, res.stdout + res.stderr
    assert store_snapshot(copy) == store_snapshot(store)
    assert not batch.exists()                  # the torn batch is gone, not left beside its replacement
