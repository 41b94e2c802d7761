"""The synthetic archive: deterministic, every DICOM form decodes to its source, annotations consistent,
proportions near the study's, and `wbs-dist synth` behaves as a command."""

import csv
import hashlib
import tarfile
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from wbs_dist import synth
from wbs_dist.cli import main
from wbs_dist.errors import UsageError
from wbs_dist.schema import STUDY_TUMOR_TYPES

CODES = {c[0]: view for view, pair in synth.VIEW_CODES.items() for c in pair}


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def dicom_paths(root: Path) -> list[Path]:
    return [p for p in sorted((root / "DICOM").rglob("*")) if p.is_file()]


def frame_views(ds) -> list[str]:
    """Per-frame views read from the DICOM alone: View Code Sequence, else ANT/POST text."""
    n = int(ds.NumberOfFrames)
    items = ds.DetectorInformationSequence
    if all("ViewCodeSequence" in it for it in items):
        vector = ds.DetectorVector if n > 1 else [ds.DetectorVector]  # a single value reads as int
        return [CODES[items[int(v) - 1].ViewCodeSequence[0].CodeValue] for v in vector]
    text = f"{ds.SeriesDescription} {ds.ImageComments}".split()
    assert n == 1
    return ["posterior" if "POST" in text else "anterior"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "archive"
    summary = synth.write_archive(out, 10, seed=11, progress=False)
    assert summary["out"] == str(out) and summary["archive_form"] == "dir" and summary["studies"] == 10
    assert sum(summary["dicom_forms"].values()) == 10 and summary["dicom_files"] == len(dicom_paths(out))
    return out


def test_same_seed_same_bytes_other_seed_differs(archive, tmp_path):
    again = tmp_path / "again"
    synth.write_archive(again, 10, seed=11, progress=False)
    assert tree(again) == tree(archive)
    other = tmp_path / "other"
    synth.write_archive(other, 3, seed=12, progress=False)
    a, b = tree(archive), tree(other)
    assert not any(a.get(name) == digest for name, digest in b.items())


def test_every_form_decodes_to_its_source_with_identifiable_views(archive):
    studies = {}
    seen_forms, syntaxes, dtypes = Counter(), set(), set()
    posterior_first = False
    for path in dicom_paths(archive):
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == synth.NM_IMAGE_STORAGE and ds.Modality == "NM"
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "WHOLE BODY", "EMISSION"]
        assert [int(t) for t in ds.FrameIncrementPointer] == [0x00540010, 0x00540020]
        assert ds.PatientID.startswith("MRN") and str(ds.PatientName) and ds.PatientBirthDate
        assert ds.Manufacturer in ("GE MEDICAL SYSTEMS", "Philips")
        assert ds.private_block(0x0009, "SYNTH_VENDOR")[0x10].value  # PHI in a private tag
        index = int(path.relative_to(archive).parts[1]) - 1
        if index not in studies:
            studies[index] = synth.make_study(11, index)
        study = studies[index]
        assert ds.StudyInstanceUID == study.plan.study_uid
        seen_forms[study.plan.form] += 1
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        pixels = ds.pixel_array
        frames = pixels if pixels.ndim == 3 else pixels[None]
        views = frame_views(ds)
        posterior_first |= views[0] == "posterior" and len(views) == 2
        assert len(views) == len(frames) == int(ds.NumberOfFrames)
        for view, frame, item in zip(views, frames, ds.DetectorInformationSequence):
            np.testing.assert_array_equal(frame, study.views[view])  # exact, dtype-independent
            dtypes.add(frame.dtype.newbyteorder("=").name)
            assert int(item.CountsAccumulated) == int(frame.sum(dtype=np.int64))
            assert 0.8e6 < int(item.CountsAccumulated) < 3.3e6
        assert int(ds.CountsAccumulated) == int(frames.sum(dtype=np.int64))
    assert set(seen_forms) == set(synth.FORMS)
    assert len(syntaxes) == 6 and dtypes == {"uint16", "int16"}
    assert sorted(studies) == list(range(10))
    assert posterior_first or any(s.plan.posterior_first for s in studies.values())


def test_form_cycle_covers_everything_in_eight_studies():
    assert {synth.form_for_index(i) for i in range(8)} == set(synth.FORMS)
    common = Counter(synth.form_for_index(i) for i in range(len(synth.FORM_CYCLE) * 10))
    assert common.most_common(1)[0][0] == "multiframe"


def test_annotations_and_masks_agree(archive):
    with open(archive / "annotations.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["study_uid", "view", "lesion_id", "label", "tumor_type"]
        rows = list(reader)
    assert rows
    by_view = defaultdict(set)
    tumor = defaultdict(set)
    for r in rows:
        assert r["view"] in synth.VIEWS and r["label"] in ("malignant", "benign")
        assert r["tumor_type"] in STUDY_TUMOR_TYPES
        by_view[(r["study_uid"], r["view"])].add(int(r["lesion_id"]))
        tumor[r["study_uid"]].add(r["tumor_type"])
    assert all(len(t) == 1 for t in tumor.values())
    for uid in tumor:  # lesion ids unique within the study across both views
        ids = [i for v in synth.VIEWS for i in by_view.get((uid, v), ())]
        assert len(ids) == len(set(ids)) and min(ids) >= 1
    pngs = sorted((archive / "masks").rglob("*.png"))
    assert {(p.parent.name, p.stem) for p in pngs} == set(by_view)
    for p in pngs:
        with Image.open(p) as im:
            assert im.mode == "I;16" and im.size == (synth.COLS, synth.ROWS)
            values = set(np.unique(np.asarray(im)).tolist()) - {0}
        assert values == by_view[(p.parent.name, p.stem)]
    # The CSV is the plans' ground truth for annotated studies.
    plans = [synth.plan_study(11, i) for i in range(10)]
    want = [(p.study_uid, les.view, str(les.lesion_id), les.label, p.tumor_type)
            for p in plans if p.annotated for les in p.lesions]
    assert [tuple(r.values()) for r in rows] == want


def test_followups_are_the_same_patients_later_and_leave_the_first_studies_as_they_were(archive, tmp_path):
    out = tmp_path / "followups"
    summary = synth.write_archive(out, 10, seed=11, progress=False, followups=0.5)
    extra = summary["followups"]
    assert summary["studies"] == 15 and sorted(extra) == list(range(10, 15))
    assert extra == {10 + j: p for j, p in enumerate(synth.followup_patients(11, 10, 0.5))}
    # Drawn with replacement: this seed gives one patient two follow-ups (three studies).
    assert max(Counter(extra.values()).values()) >= 2
    first_ten = {k: v for k, v in tree(out).items()
                 if k.startswith("DICOM/") and int(k.split("/")[1]) <= 10 or k.startswith("masks/")
                 and k.split("/")[1] in {synth.plan_study(11, i).study_uid for i in range(10)}}
    assert first_ten == {k: v for k, v in tree(archive).items() if k != "annotations.csv"}
    for index, first in extra.items():
        plan, base = synth.plan_study(11, index, first), synth.plan_study(11, first)
        assert plan.patient.patient_id == base.patient.patient_id
        assert plan.patient.birth_date == base.patient.birth_date and plan.patient.sex == base.patient.sex
        assert plan.patient.name.upper() == base.patient.name.upper()
        assert plan.tumor_type == base.tumor_type
        assert plan.acquisition.study_date > base.acquisition.study_date
        assert plan.study_uid not in {synth.plan_study(11, i).study_uid for i in range(10)}
        ds = pydicom.dcmread(next(p for p in dicom_paths(out) if p.relative_to(out).parts[1] == f"{index + 1:05d}"))
        assert ds.PatientID == base.patient.patient_id and ds.StudyInstanceUID == plan.study_uid
    with pytest.raises(UsageError, match="followups"):
        synth.write_archive(tmp_path / "bad", 3, followups=-1)


def test_lesion_masks_sit_on_their_lesions_and_views_mirror():
    study = synth.make_study(2, 3)
    assert study.plan.lesions
    for les in study.plan.lesions:
        rr, cc = np.nonzero(study.labels[les.view] == les.lesion_id)
        assert rr.size and abs(rr.mean() - les.row) < 6 and abs(cc.mean() - les.col) < 6
        # the hot spot is on the other view too, at the mirrored column
        other = "posterior" if les.view == "anterior" else "anterior"
        r, c = int(round(les.row)), int(round(synth.COLS - 1 - les.col))
        assert study.views[other][r - 2:r + 3, c - 2:c + 3].sum() > 0
    ant, post = (study.views[v].astype(float) for v in synth.VIEWS)
    # posterior is the mirror image: it matches the flipped anterior far better than the unflipped one
    assert np.corrcoef(ant.ravel(), post[:, ::-1].ravel())[0, 1] > np.corrcoef(ant.ravel(), post.ravel())[0, 1]


def test_proportions_near_the_study():
    plans = [synth.plan_study(0, i) for i in range(300)]
    annotated = [p for p in plans if p.annotated]
    assert 0.01 <= 1 - len(annotated) / len(plans) <= 0.1  # some studies are images only
    lesions = [les for p in annotated for les in p.lesions]
    malignant = np.mean([les.label == "malignant" for les in lesions])
    patients = np.mean([p.malignant for p in annotated])
    assert 0.45 <= malignant <= 0.57, malignant
    assert 0.36 <= patients <= 0.52, patients
    types = Counter(p.tumor_type for p in plans)
    assert tuple(synth.TUMOR_WEIGHTS) == STUDY_TUMOR_TYPES
    for t, share in synth.TUMOR_WEIGHTS.items():
        assert abs(types[t] / len(plans) - share) <= 0.06, (t, types[t])
    for p in plans:
        if p.tumor_type == "prostate":
            assert p.patient.sex == "M"
        if p.tumor_type == "breast":
            assert p.patient.sex == "F"
        assert 1935 <= int(p.patient.birth_date[:4]) <= 1990
    n = np.array([len(p.lesions) for p in plans])
    assert n.min() >= 1 and 3.5 <= n.mean() <= 5.5
    for share in (np.mean(n <= 3), np.mean((n >= 4) & (n <= 6)), np.mean(n > 6)):
        assert share >= 0.1  # few, medium and extensive burdens all represented
    # the label follows the features: axial lesions are mostly malignant, joint lesions mostly benign
    by_region = defaultdict(list)
    for les in lesions:
        by_region[les.region].append(les.label == "malignant")
    assert np.mean(by_region["axial"]) > 0.6 > 0.3 > np.mean(by_region["joint"])
    # ... but not trivially: the noise flips a share of labels against the noise-free score
    flipped = np.mean([(les.score > 0) != (les.label == "malignant") for les in lesions])
    assert 0.08 <= flipped <= 0.22
    assert len({p.patient.patient_id for p in plans}) == len(plans)


def test_zip_and_tar_hold_the_same_members(archive, tmp_path):
    names = set(tree(archive))
    z = tmp_path / "a.zip"
    synth.write_archive(z, 10, seed=11, progress=False)
    with zipfile.ZipFile(z) as zf:
        assert set(zf.namelist()) == names
        assert zf.read("annotations.csv") == (archive / "annotations.csv").read_bytes()
    for name in ("a.tar", "a.tar.gz"):
        t = tmp_path / name
        synth.write_archive(t, 10, seed=11, progress=False)
        with tarfile.open(t) as tf:
            assert {m.name for m in tf.getmembers() if m.isfile()} == names
            member = next(n for n in names if n.startswith("DICOM/"))
            assert tf.extractfile(member).read() == (archive / member).read_bytes()
    assert not list(tmp_path.glob(".*partial*"))


def test_paths_carry_no_identifiers(archive):
    ids = set()
    for path in dicom_paths(archive):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ids.update({ds.PatientID, ds.PatientName.family_name, ds.AccessionNumber})
        parts = path.relative_to(archive).parts
        assert parts[0] == "DICOM" and parts[-1].startswith("IM") and all(p.isdigit() for p in parts[1:-1])
    names = "\n".join(tree(archive))
    assert not any(i in names for i in ids)


def test_usage_errors(tmp_path):
    with pytest.raises(UsageError):
        synth.write_archive(tmp_path / "x", 0, progress=False)
    with pytest.raises(UsageError):
        synth.write_archive(tmp_path / "x", 1, seed=-1, progress=False)
    with pytest.raises(UsageError):
        synth.write_archive(tmp_path / "x", 1, form="rar", progress=False)
    (tmp_path / "file.zip").write_bytes(b"")
    with pytest.raises(UsageError, match="already exists"):
        synth.write_archive(tmp_path / "file.zip", 1, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    synth.write_archive(empty, 1, progress=False)  # an empty folder is fine: nothing is lost
    assert (empty / "annotations.csv").exists()


def test_cli_writes_then_refuses_a_non_empty_out(tmp_path, capsys):
    out = tmp_path / "arc"
    assert main(["synth", str(out), "--patients", "2", "--seed", "5"]) == 0
    captured = capsys.readouterr()
    assert "patients 2" in captured.out and "malignant" in captured.out
    assert (out / "annotations.csv").exists() and dicom_paths(out)
    before = tree(out)
    assert main(["synth", str(out), "--patients", "2"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert tree(out) == before
    assert main(["synth", str(tmp_path / "t.tgz"), "--patients", "1"]) == 0
    with tarfile.open(tmp_path / "t.tgz") as tf:
        assert "annotations.csv" in tf.getnames()
