"""`wbs-dist score`: annotated and candidate lesions, the training code's preprocessing, the fold
ensemble, shards that merge to the unsharded output, kill and resume, bad inputs."""

import csv
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from wbs_dist.config import load_config
from wbs_dist.infer.parts import parts_dir
from wbs_dist.infer.score import score_archive
from wbs_dist.synth import plan_study

from helpers import ROOT, WBS, kill_point_rng

pytestmark = pytest.mark.slow

SYNTH_SEED = 7  # conftest's synth_archive


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def assert_same_rows(a: Path, b: Path) -> None:
    """Same rows, scores within float noise: CPU convolutions round differently with the batch's
    composition and the thread count, so the sixth decimal of a score may differ between runs (and
    with it which of two near-equal lesions is a study's highest)."""
    scores, ignored = ("score", "max_score"), ("max_lesion_id",)

    def split(path):
        rows = sorted(rows_of(path), key=lambda r: tuple(v for k, v in r.items() if k not in scores + ignored))
        return ([tuple(v for k, v in r.items() if k not in scores + ignored) for r in rows],
                np.array([[float(r[k] or "nan") for k in scores if k in r] for r in rows]))

    (keys_a, scores_a), (keys_b, scores_b) = split(a), split(b)
    assert keys_a == keys_b
    np.testing.assert_allclose(scores_a, scores_b, atol=1e-5, equal_nan=True)


@pytest.fixture(scope="module")
def run_dir(loader_store, tmp_path_factory):
    """fold0 trained for one epoch; fold1 its weights perturbed (a distinct second model)."""
    from wbs_dist.train.trainer import train_fold

    run = tmp_path_factory.mktemp("score") / "run"
    cfg = load_config(ROOT / "configs" / "local.yaml",
                      [f"store={loader_store}", f"run_dir={run}", "train_size=64x32", "folds=3",
                       "epochs=1", "model=resnet18", "deterministic=false", "checkpoint_every=0"])
    train_fold(cfg, 0)
    state = torch.load(run / "fold0" / "last.pt", weights_only=True)
    gen = torch.Generator().manual_seed(1)
    state["model"] = {k: v + 0.05 * torch.randn(v.shape, generator=gen) * v.abs().mean() if v.is_floating_point() else v
                      for k, v in state["model"].items()}
    (run / "fold1").mkdir()
    torch.save(state, run / "fold1" / "last.pt")
    for name in ("config.yaml", "done.json"):
        shutil.copy(run / "fold0" / name, run / "fold1" / name)
    return run


@pytest.fixture(scope="module")
def full(synth_archive, run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "pred.csv"
    assert not score_archive(synth_archive, run_dir, out, workers=2, batch=16, overlays=out.parent / "overlays").errors
    return out


@pytest.fixture(scope="module")
def nm1_archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nm1")
    shutil.copy(get_testdata_file("JPEG-LL.dcm"), folder / "NM1.dcm")
    return folder


def test_annotated_lesions_one_row_each_with_scores_in_0_1(full, synth_archive):
    pred = rows_of(full)
    ann = {(r["study_uid"], int(r["lesion_id"])): r for r in rows_of(synth_archive / "annotations.csv")}
    annotated = {uid for uid, _ in ann}
    got = {(r["study_uid"], int(r["lesion_id"])): r for r in pred if r["study_uid"] in annotated}
    assert len(got) == sum(r["study_uid"] in annotated for r in pred), "a lesion written twice"
    assert set(got) == set(ann)
    for key, row in got.items():
        a = ann[key]
        assert row["view"] == a["view"] and row["tumor_type"] == a["tumor_type"]
        assert row["label"] == ("1" if a["label"] == "malignant" else "0")
        assert int(row["lesion_count"]) == sum(uid == key[0] for uid, _ in ann)
    for row in pred:
        assert 0.0 <= float(row["score"]) <= 1.0 and row["fold"] == ""
    # The site's own identifiers come back, so it can act on the result.
    ids = {plan_study(SYNTH_SEED, i).study_uid: plan_study(SYNTH_SEED, i).patient.patient_id for i in range(12)}
    assert {r["study_uid"]: r["patient_id"] for r in pred} == {u: ids[u] for u in {r["study_uid"] for r in pred}}


def test_summary_errors_and_overlays(full, synth_archive):
    summary = {r["study_uid"]: r for r in rows_of(full.with_name("pred.summary.csv"))}
    assert len(summary) == 12
    pred = rows_of(full)
    for uid, s in summary.items():
        scores = [float(r["score"]) for r in pred if r["study_uid"] == uid]
        assert int(s["lesions"]) == len(scores)
        assert s["source"] == ("annotated" if any(r["label"] for r in pred if r["study_uid"] == uid) else "candidates")
        if scores:
            assert float(s["max_score"]) == pytest.approx(max(scores), abs=1e-6)
    # Studies without annotation rows are scored through the candidate path.
    unannotated = [s for s in summary.values() if s["source"] == "candidates"]
    assert all(int(s["lesions"]) > 0 for s in unannotated)
    assert rows_of(full.with_name("pred.errors.csv")) == []
    assert len(list((full.parent / "overlays").glob("*.png"))) == 12


def test_outputs_that_identify_patients_are_private_files(full):
    """Scores, summaries, errors, part files and overlays carry Patient IDs, Study UIDs or the scan
    itself: readable by their owner only, whatever the umask."""
    files = [full, full.with_name("pred.summary.csv"), full.with_name("pred.errors.csv"),
             *parts_dir(full).glob("part-*.json"), *(full.parent / "overlays").glob("*.png")]
    assert len(files) > 15
    assert {f.stat().st_mode & 0o777 for f in files} == {0o600}


def test_preprocessing_is_the_training_pipelines(loader_store):
    """The scorer's network input for a lesion equals the training dataset's, bit for bit."""
    from wbs_dist.data.deid import keyed_hash, load_or_create_secret
    from wbs_dist.data.store import Store
    from wbs_dist.data.studies import StudySource, group_studies
    from wbs_dist.data.workers import StudyPool
    from wbs_dist.infer import score
    from wbs_dist.preprocess import make_input, normalise
    from wbs_dist.train.dataset import LesionDataset, lesion_index

    store = Store.open(loader_store)
    index = lesion_index(store, [0, 1, 2], (64, 32))
    secret = load_or_create_secret(None)
    with StudySource.open(loader_store.parent / "archive") as source:
        uid = sorted(u for u, a in source.rows.items() if len(a.lesions) >= 2)[0]
        with StudyPool(source, 0, {"size": (64, 32), "overlays": False}) as pool:
            studies = group_studies(pool.headers(source.members, progress=False), [])
            res = score._study_task(source.job(uid, "", uid, studies[uid]))
    key = keyed_hash(secret, "study", uid)
    dataset = LesionDataset(index)
    s = index.study_keys.index(key)
    for lid, _, _, scan in res.lesions:
        i = int(np.nonzero((index.study == s) & (index.lesion_id == lid))[0][0])
        ours = make_input(normalise(res.scans[scan].image, np.float32(res.scans[scan].scale)),
                          res.scans[scan].labels, lid, True)
        assert np.array_equal(ours, dataset[i]["x"].numpy())


def test_shards_merge_to_the_unsharded_output(full, synth_archive, run_dir, tmp_path):
    out = tmp_path / "pred.csv"
    for i in range(3):
        assert not score_archive(synth_archive, run_dir, out, shard=f"{i}/3", workers=0).errors
    assert not out.exists()  # shards write parts only
    merged = score_archive(synth_archive, run_dir, out, workers=0)
    assert (merged.scored, merged.already, merged.errors) == (0, 12, [])
    assert_same_rows(out, full)
    assert_same_rows(out.with_name("pred.summary.csv"), full.with_name("pred.summary.csv"))


def kill_after_a_part(cmd: list[str], out: Path, name: str) -> None:
    """Start a scorer, and SIGKILL it and its workers (mid-write, whatever they were doing) at a random
    moment after its first part file is written."""
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 120
    while not list(parts_dir(out).glob("part-*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(kill_point_rng(name).uniform(0.0, 0.3))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_at_a_random_point_then_rerun_gives_each_lesion_once(full, synth_archive, run_dir, tmp_path):
    out = tmp_path / "pred.csv"
    cmd = WBS + ["score", str(synth_archive), "--run", str(run_dir), "--out", str(out), "--workers", "1",
                 "--batch", "4", "--part-size", "1"]
    kill_after_a_part(cmd, out, "score")
    done_before = len(list(parts_dir(out).glob("part-*.json")))
    assert not out.exists() and done_before < 12, "the kill should interrupt the run"
    assert not score_archive(synth_archive, run_dir, out, workers=0).errors
    pred = rows_of(out)
    keys = [(r["study_uid"], r["lesion_id"]) for r in pred]
    assert len(keys) == len(set(keys))
    assert_same_rows(out, full)


def test_bad_files_are_listed_and_exit_3(synth_archive, run_dir, tmp_path):
    from wbs_dist.cli import main

    dicom = sorted(p for p in (synth_archive / "DICOM").rglob("*") if p.is_file())
    by_study: dict[str, list[Path]] = {}
    for p in dicom:
        by_study.setdefault(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID, []).append(p)
    # Studies held in one uncompressed 2-frame object: cutting its end leaves the header whole.
    single = [files[0] for files in by_study.values() if len(files) == 1 and pydicom.dcmread(
        files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian]
    good, victim = single[0], single[1]
    arc = tmp_path / "archive"
    arc.mkdir()
    shutil.copy(good, arc / "good.dcm")
    data = victim.read_bytes()
    (arc / "truncated.dcm").write_bytes(data[: len(data) * 2 // 3])  # pixel data cut short
    shutil.copy(get_testdata_file("CT_small.dcm"), arc / "ct.dcm")
    (arc / "notes.txt").write_text("export log\n")
    out = tmp_path / "out" / "pred.csv"
    assert main(["score", str(arc), "--run", str(run_dir), "--out", str(out), "--workers", "0"]) == 3
    errors = {r["path"]: r["reason"] for r in rows_of(out.with_name("pred.errors.csv"))}
    assert "not a DICOM file" in errors["notes.txt"]
    assert "not a nuclear-medicine planar image (Modality CT" in errors["ct.dcm"]
    assert "pixel data could not be decoded" in errors["truncated.dcm"]
    assert {r["source"] for r in rows_of(out.with_name("pred.summary.csv"))} == {"candidates"}
    # A rerun tries the failed study again (it is not recorded as done) and lists it again.
    assert main(["score", str(arc), "--run", str(run_dir), "--out", str(out), "--workers", "0"]) == 3
    assert "truncated.dcm" in {r["path"] for r in rows_of(out.with_name("pred.errors.csv"))}


def test_real_nm1_scan_scored_through_the_candidate_path(nm1_archive, run_dir, tmp_path):
    out = tmp_path / "pred.csv"
    assert not score_archive(nm1_archive, run_dir, out, workers=0).errors
    pred = rows_of(out)
    (summary,) = rows_of(out.with_name("pred.summary.csv"))
    assert summary["source"] == "candidates" and summary["views"] == "unknown"
    assert pred and {r["view"] for r in pred} == {"unknown"} and {r["label"] for r in pred} == {""}
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in pred)


def test_ensemble_score_is_the_mean_of_the_folds(nm1_archive, run_dir, tmp_path):
    scores = {}
    for name, fold in (("both", None), ("f0", 0), ("f1", 1)):
        out = tmp_path / name / "pred.csv"
        assert not score_archive(nm1_archive, run_dir, out, fold=fold, workers=0).errors
        scores[name] = np.array([float(r["score"]) for r in rows_of(out)])
    assert not np.allclose(scores["f0"], scores["f1"], atol=1e-4), "the two folds should differ"
    np.testing.assert_allclose(scores["both"], (scores["f0"] + scores["f1"]) / 2, atol=2e-6)


def test_other_setup_in_the_parts_folder_is_refused(full, synth_archive, run_dir):
    from wbs_dist.errors import UsageError

    with pytest.raises(UsageError, match="another setup"):
        score_archive(synth_archive, run_dir, full, fold=0, workers=0)


def test_usage_errors_exit_2(nm1_archive, run_dir, tmp_path):
    from wbs_dist.cli import main

    out = str(tmp_path / "pred.csv")
    assert main(["score", str(nm1_archive), "--run", str(run_dir), "--out", out, "--shard", "3/3"]) == 2
    assert main(["score", str(nm1_archive), "--run", str(tmp_path / "nope"), "--out", out]) == 2
    assert main(["score", str(nm1_archive), "--run", str(run_dir), "--out", out, "--fold", "7"]) == 2


# -- hostile values in the archive: path tricks in a Study Instance UID, a formula in a Patient ID -----
HOSTILE_PATIENT = '=HYPERLINK("http://x","y")'
HOSTILE_UIDS = ("1.2.3/../../escaped", "./../../x")
HOSTILE_MEMBER = "=1+2.txt"


@pytest.fixture(scope="module")
def hostile_archive(synth_archive, tmp_path_factory):
    """Three studies of the synthetic archive: an annotated one whose Patient ID is a spreadsheet
    formula, and two whose Study Instance UIDs are path tricks (their annotation rows left out: the
    candidate path); plus a non-DICOM member whose name is a formula (listed as an error)."""
    arc = tmp_path_factory.mktemp("hostile") / "archive"
    by_study: dict[str, list[Path]] = {}
    for p in sorted(p for p in (synth_archive / "DICOM").rglob("*") if p.is_file()):
        by_study.setdefault(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID, []).append(p)
    rows = rows_of(synth_archive / "annotations.csv")
    annotated = min({r["study_uid"] for r in rows} & set(by_study))
    others = [u for u in sorted(by_study) if u != annotated][:2]
    plan = {annotated: (annotated, HOSTILE_PATIENT), others[0]: (HOSTILE_UIDS[0], None),
            others[1]: (HOSTILE_UIDS[1], None)}
    settings = pydicom.config.settings
    modes = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        for n, (uid, (new_uid, patient)) in enumerate(plan.items()):
            for i, src in enumerate(by_study[uid]):
                ds = pydicom.dcmread(src)
                ds.StudyInstanceUID = new_uid
                if patient is not None:
                    ds.PatientID = patient
                dst = arc / "DICOM" / f"S{n}" / f"IM{i}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(dst)
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = modes
    with open(synth_archive / "annotations.csv", newline="") as fh:
        lines = fh.read().splitlines(keepends=True)
    (arc / "annotations.csv").write_text(lines[0] + "".join(line for line in lines[1:] if line.startswith(annotated + ",")))
    shutil.copytree(synth_archive / "masks" / annotated, arc / "masks" / annotated)
    (arc / HOSTILE_MEMBER).write_text("not DICOM\n")
    return arc, annotated


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_hostile_uids_and_ids_neither_escape_nor_crash_and_outputs_stay_private(hostile_archive, run_dir, tmp_path,
                                                                                  umask):
    """A Study Instance UID `./../../x` or `1.2.3/../../escaped` named an overlay two folders up, or
    crashed the run; a Patient ID `=HYPERLINK(...)` landed as a live formula; outputs followed the
    umask. Now: overlays named by a hash of such a UID, inside their folder; formula cells quoted;
    files 0600 and the parts and overlay folders 0700 whatever the umask."""
    import hashlib

    from wbs_dist.evaluate.predictions import read_predictions

    arc, annotated = hostile_archive
    base = tmp_path / "a" / "b"          # '../../' from base/overlays would land in tmp_path
    out, overlays = base / "pred.csv", base / "overlays"
    res = subprocess.run(WBS + ["score", str(arc), "--run", str(run_dir), "--out", str(out), "--overlays",
                                str(overlays), "--workers", "0"], check=False, capture_output=True, text=True,
                         timeout=600, preexec_fn=lambda: os.umask(umask), env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert res.returncode == 3, res.stderr[-3000:]       # 3: the non-DICOM member, listed
    assert "Traceback" not in res.stderr

    # Nothing outside the output folder; one overlay per study, inside it, a hash for the bad UIDs.
    assert [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(base)] == []
    hashed = {"uid-" + hashlib.sha256(u.encode()).hexdigest()[:16] + ".png" for u in HOSTILE_UIDS}
    assert {p.name for p in overlays.iterdir()} == {annotated + ".png"} | hashed
    assert [p for p in tmp_path.rglob("*.png") if p.parent != overlays] == []

    # The UIDs come back as they are (the site acts on them); formula cells are quoted.
    pred, summary = rows_of(out), rows_of(out.with_name("pred.summary.csv"))
    assert {r["study_uid"] for r in summary} == {annotated, *HOSTILE_UIDS}
    for rows in (pred, summary):
        assert {r["patient_id"] for r in rows if r["study_uid"] == annotated} == {"'" + HOSTILE_PATIENT}
        assert not any(v.startswith(("=", "+", "-", "@")) for r in rows for v in r.values())
    errors = rows_of(out.with_name("pred.errors.csv"))
    assert [r["path"] for r in errors] == ["'" + HOSTILE_MEMBER]
    # The report's reader still reads the scorer's file: scores and labels are unchanged.
    assert "'" + HOSTILE_PATIENT in set(read_predictions(out).patient_id)

    parts = parts_dir(out)
    files = [out, out.with_name("pred.summary.csv"), out.with_name("pred.errors.csv"), *parts.iterdir(),
             *overlays.iterdir()]
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {oct(0o600)}
    assert {oct(d.stat().st_mode & 0o777) for d in (parts, overlays)} == {oct(0o700)}


def test_report_reads_the_scorers_csv(full, tmp_path):
    """The formula-safe CSV is still a predictions CSV that `wbs-dist report` analyses."""
    from wbs_dist.cli import main

    assert main(["report", str(full), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "metrics.json").exists()


def test_a_second_scorer_of_the_same_output_is_refused(full, synth_archive, run_dir, tmp_path):
    """Two runs writing one output's parts would score every study twice and race to merge."""
    from wbs_dist.infer.parts import parts_dir
    from wbs_dist.lock import Lock, Locked

    out = tmp_path / "pred.csv"
    assert not score_archive(synth_archive, run_dir, out, shard="0/3", workers=0).errors
    with Lock(parts_dir(out) / ".all.lock", "another wbs-dist score"):
        with pytest.raises(Locked, match="scoring output .* is in use by .*another wbs-dist score"):
            score_archive(synth_archive, run_dir, out, workers=0)
    # Another shard of the same output is another writer: it may run beside it.
    with Lock(parts_dir(out) / ".all.lock", "the merge"):
        assert not score_archive(synth_archive, run_dir, out, shard="1/3", workers=0).errors
    assert not score_archive(synth_archive, run_dir, out, workers=0).errors


# -- the out-of-fold rule: patients the run trained on --------------------------------------------------------
def test_known_patients_are_scored_by_their_validation_fold_reproducing_its_predictions(loader_store, run_dir,
                                                                                      tmp_path):
    """Scoring the run's own training archive: each known patient's lesions are scored by the fold that
    held the patient out (fold0's scores equal its cross-validation predictions), a patient of a fold
    without a finished model is listed, not scored by the models that trained on it."""
    from wbs_dist.data.deid import keyed_hash, load_secret
    from wbs_dist.data.folds import read_folds
    from wbs_dist.data.store import Store, key_to_int

    secret = load_secret()
    patients, folds, _ = read_folds(Store.open(loader_store))
    fold_of = dict(zip(patients.tolist(), folds.tolist()))
    out = tmp_path / "pred.csv"
    r = score_archive(loader_store.parent / "archive", run_dir, out, workers=2, batch=16)
    pred = rows_of(out)
    expect = {row["study_uid"]: fold_of.get(key_to_int(keyed_hash(secret, "patient", row["patient_id"])), "")
              for row in pred}
    assert {row["study_uid"]: row["fold"] for row in pred} == {u: str(f) for u, f in expect.items()}
    assert {"0", "1"} <= {row["fold"] for row in pred}
    assert "2" not in {row["fold"] for row in pred}
    st = Store.open(loader_store)
    known = [key for key in st.study_keys() if key_to_int(st.study_attrs(key)["patient"]) in fold_of]
    assert r.known == len(known) > 0
    # fold 2 is not finished: its patients are listed, every other model having trained on them.
    assert r.errors and all("validation fold 2" in reason for _, reason in r.errors)
    # Fold 0's rows are its cross-validation predictions, study by study and lesion by lesion.
    cv = {(row["study_uid"], row["lesion_id"]): float(row["score"])
          for row in rows_of(run_dir / "fold0" / "predictions.csv")}
    got = {(keyed_hash(secret, "study", row["study_uid"]), row["lesion_id"]): float(row["score"])
           for row in pred if row["fold"] == "0"}
    assert got.keys() == cv.keys()
    np.testing.assert_allclose([got[k] for k in cv], list(cv.values()), atol=2e-6)
    summary = rows_of(out.with_name("pred.summary.csv"))
    assert {s["study_uid"]: s["fold"] for s in summary} == {row["study_uid"]: row["fold"] for row in pred}


def test_without_the_secret_known_patients_cannot_be_recognised_and_it_says_so(loader_store, run_dir, tmp_path):
    archive = loader_store.parent / "archive"
    missing = tmp_path / "no-secret"
    r = subprocess.run(WBS + ["score", str(archive), "--run", str(run_dir), "--out", str(tmp_path / "a.csv"),
                              "--workers", "0"], capture_output=True, text=True,
                       env=dict(os.environ, WBS_DIST_SECRET_FILE=str(missing)))
    assert r.returncode == 0, r.stderr
    assert "WARNING" in r.stderr and "cannot be recognised" in r.stderr and str(missing) in r.stderr
    assert not missing.exists(), "scoring must never create a secret"
    assert {row["fold"] for row in rows_of(tmp_path / "a.csv")} == {""}
    # Another site's secret: not the one the store was made with, said as loudly.
    other = tmp_path / "other-secret"
    other.write_text("f" * 64)
    other.chmod(0o600)
    r = subprocess.run(WBS + ["score", str(archive), "--run", str(run_dir), "--out", str(tmp_path / "b.csv"),
                              "--workers", "0", "--secret-file", str(other)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "WARNING" in r.stderr and "is not the secret" in r.stderr


def test_a_store_re_split_since_the_run_is_refused(loader_store, run_dir, tmp_path):
    """The folds that route known patients must be the run's: another split would send a patient to a
    model that trained on it."""
    from wbs_dist.data.folds import write_folds
    from wbs_dist.data.store import Store

    store = tmp_path / "store.zarr"
    shutil.copytree(loader_store, store)
    write_folds(Store.open(store), k=3, seed=5, force=True)
    r = subprocess.run(WBS + ["score", str(loader_store.parent / "archive"), "--run", str(run_dir), "--out",
                              str(tmp_path / "p.csv"), "--store", str(store), "--workers", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "the split changed" in r.stderr, r.stderr


# -- learned candidates: the detector ensemble proposes the lesions of studies without delineations -----
# (detector_dir: conftest.py)
def test_studies_without_annotations_are_scored_on_the_detectors_components(synth_archive, run_dir, detector_dir,
                                                                            tmp_path):
    import json

    from wbs_dist.data.studies import StudySource, group_studies, patient_id_of
    from wbs_dist.data.workers import StudyPool, assemble
    from wbs_dist.detection import components
    from wbs_dist.infer.ensemble import Ensemble
    from wbs_dist.preprocess import detection_level

    # Annotated studies keep their annotations, with a detector at hand too.
    # (The one-epoch detector is far below its target: --candidates learned asks for it anyway.)
    annotated = score_archive(synth_archive, run_dir, tmp_path / "a.csv", workers=0, detector=detector_dir,
                              candidates_from="learned")
    assert {s["source"] for s in rows_of(tmp_path / "a.summary.csv")} == {"annotated"} and not annotated.errors
    # The same archive without its delineations (DICOM only): all learned.
    bare = tmp_path / "dicom-only"
    shutil.copytree(synth_archive, bare, ignore=shutil.ignore_patterns("annotations.csv", "masks"))
    out = tmp_path / "pred.csv"
    r = score_archive(bare, run_dir, out, workers=2, batch=16, detector=detector_dir, candidates_from="learned",
                      overlays=tmp_path / "overlays")
    assert not r.errors
    summary = {s["study_uid"]: s for s in rows_of(out.with_name("pred.summary.csv"))}
    pred = rows_of(out)
    assert {s["source"] for s in summary.values()} == {"learned"} and len(summary) == 12
    threshold = json.loads((detector_dir / "fold0" / "detection.json").read_text())["threshold"]
    decoded = {}
    with StudySource.open(bare, None) as source, StudyPool(source, 0, {}) as pool:
        for uid, objs in group_studies(pool.headers(source.members), []).items():
            data, _ = pool.submit(assemble, source.job(uid, patient_id_of(objs), uid, objs)).result()
            decoded[uid] = data.views
    det = Ensemble(detector_dir, task="detect")
    checked = 0
    for uid, s in summary.items():
        rows = [p for p in pred if p["study_uid"] == uid]
        assert int(s["lesions"]) == len(rows)
        if s["source"] != "learned":
            continue
        assert all(p["label"] == "" and p["view"] in ("anterior", "posterior") for p in rows)
        # The lesions are the components of the detector's map at its own level (96 x 48) and
        # training-chosen threshold, counted per view's half (the study decoded here in-process,
        # apart from the scorer's workers).
        views = decoded[uid]
        if set(views) != {"anterior", "posterior"}:
            continue
        image, _ = detection_level({v: views[v].astype(np.float32) for v in views}, {}, 96, 48)
        prob, cut = det.maps(image[None, None])
        assert cut == threshold
        expect = sum(int(components(prob[0][:, h * 24:(h + 1) * 24], cut).max()) for h in (0, 1))
        assert len(rows) == expect, uid
        checked += 1
    assert checked >= 6
    assert len(list((tmp_path / "overlays").glob("*.png"))) == len(summary)
    # --candidates classical keeps the finder; learned without a detector is a usage error.
    classical = score_archive(bare, run_dir, tmp_path / "c.csv", workers=0, detector=detector_dir,
                              candidates_from="classical")
    assert not classical.errors
    assert {s["source"] for s in rows_of(tmp_path / "c.summary.csv")} == {"candidates"}
    from wbs_dist.errors import UsageError

    with pytest.raises(UsageError, match="learned"):
        score_archive(synth_archive, run_dir, tmp_path / "d.csv", candidates_from="learned")
    with pytest.raises(UsageError, match="holds detect folds"):
        score_archive(synth_archive, detector_dir, tmp_path / "e.csv")


@pytest.mark.slow
def test_a_learned_scoring_killed_mid_run_reruns_to_the_uninterrupted_output(synth_archive, run_dir, detector_dir,
                                                                            tmp_path):
    """The learned path's parts (the detector's forward pass in the scorer, components in its workers)
    under SIGKILL: nothing half-written is trusted, and the rerun gives each lesion once."""
    bare = tmp_path / "dicom-only"
    shutil.copytree(synth_archive, bare, ignore=shutil.ignore_patterns("annotations.csv", "masks"))
    full = tmp_path / "full.csv"
    assert not score_archive(bare, run_dir, full, workers=0, detector=detector_dir, candidates_from="learned").errors
    out = tmp_path / "pred.csv"
    cmd = WBS + ["score", str(bare), "--run", str(run_dir), "--out", str(out), "--workers", "1", "--batch", "4",
                 "--part-size", "1", "--detector", str(detector_dir), "--candidates", "learned"]
    kill_after_a_part(cmd, out, "learned score")
    assert not out.exists() and len(list(parts_dir(out).glob("part-*.json"))) < 12, "the kill should interrupt the run"
    again = score_archive(bare, run_dir, out, workers=0, detector=detector_dir, candidates_from="learned")
    assert not again.errors and again.already > 0
    keys = [(r["study_uid"], r["lesion_id"]) for r in rows_of(out)]
    assert len(keys) == len(set(keys))
    assert_same_rows(out, full)
    assert_same_rows(out.with_name("pred.summary.csv"), full.with_name("full.summary.csv"))


def test_an_unusable_detection_json_of_the_detector_exits_2_naming_it(synth_archive, run_dir, detector_dir, tmp_path):
    detector = tmp_path / "detector"
    shutil.copytree(detector_dir, detector)
    bad = detector / "fold1" / "detection.json"
    bad.write_text(bad.read_text()[:300])                 # cut short (a full disk, an interrupted copy)
    r = subprocess.run(WBS + ["score", str(synth_archive), "--run", str(run_dir), "--out", str(tmp_path / "p.csv"),
                              "--detector", str(detector), "--workers", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"{bad}: not valid JSON" in r.stderr and "done.json" in r.stderr, r.stderr


def test_a_detector_below_its_target_is_used_only_when_asked_for(synth_archive, run_dir, detector_dir, tmp_path):
    """A detector whose threshold misses its target sensitivity on its own training folds would drop
    lesions the finder proposes: `--detector` alone refuses it (exit 2, naming each fold's figure),
    `--candidates learned` scores with it and warns; one that reaches its target is used silently."""
    import json

    args = ["score", str(synth_archive), "--run", str(run_dir), "--workers", "0", "--detector", str(detector_dir)]
    r = subprocess.run(WBS + args + ["--out", str(tmp_path / "a.csv")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "does not reach its target lesion sensitivity" in r.stderr and "fold 0 " in r.stderr, r.stderr
    assert "--candidates learned" in r.stderr and not (tmp_path / "a.csv").exists()
    r = subprocess.run(WBS + args + ["--out", str(tmp_path / "b.csv"), "--candidates", "learned"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "WARNING" in r.stderr and "target lesion sensitivity" in r.stderr, r.stderr[-3000:]
    # The same folds as if their training folds had reached the target at their threshold (the
    # one-epoch detector finds nothing: its detection.json is edited to say every lesion was found).
    reached = tmp_path / "reached"
    shutil.copytree(detector_dir, reached)
    for k in (0, 1):
        path = reached / f"fold{k}" / "detection.json"
        doc = json.loads(path.read_text())
        at = next(p for p in doc["train_froc"] if p["threshold"] == doc["threshold"])
        at.update(found=at["lesions"], sensitivity=1.0)
        path.write_text(json.dumps(doc))
    r = subprocess.run(WBS + args[:-1] + [str(reached), "--out", str(tmp_path / "c.csv")], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "target lesion sensitivity" not in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("content", [b'{"fold": 0, "epochs": 1, "val_au', b"[1, 2]", b'{"fold": 0, "epochs": "1"}',
                                     b"\xff\xfe"])
def test_an_unusable_done_json_exits_2_naming_it(synth_archive, run_dir, tmp_path, content):
    """done.json marks a fold finished; cut short or hand-edited it stops score (and cv, train) with exit
    2 naming it and what to do, not a traceback."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("*.lock"))
    (run / "fold1" / "done.json").write_bytes(content)
    r = subprocess.run(WBS + ["score", str(synth_archive), "--run", str(run), "--out", str(tmp_path / "p.csv"),
                              "--workers", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"{run / 'fold1' / 'done.json'}: unusable" in r.stderr and "delete it" in r.stderr, r.stderr
