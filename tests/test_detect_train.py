"""The learned lesion detector through the classifier's machinery: `wbs-dist train --fold K` with
task=detect, its FROC validation, the threshold chosen on the training folds, exact resume.

Tiny: the 30-patient store (its classifier level 64 x 32) with 3 folds, the detector at its own
level 96 x 48 made from the native views, trained on 48-row patches, the small U-Net, 2 epochs on CPU.
"""

import csv
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wbs_dist.config import load_config
from wbs_dist.errors import InputError

from helpers import ROOT, run_cli


def detect_config(store, run_dir, **extra):
    keys = {"store": store, "run_dir": run_dir, "train_size": "96x48", "folds": 3, "task": "detect",
            "model": "unet_small", "weights": "none", "epochs": 2, "batch_size": 4, "lr": 3e-3, "patch_rows": 48,
            "num_workers": 0, "checkpoint_every": 0, "deterministic": "true", **extra}
    return load_config(ROOT / "configs" / "local.yaml", [f"{k}={v}" for k, v in keys.items()])


@pytest.fixture(scope="module")
def detect_fold(loader_store, tmp_path_factory):
    from wbs_dist.train.trainer import train_fold

    run = tmp_path_factory.mktemp("detect") / "run"
    return run, train_fold(detect_config(loader_store, run), 1)


@pytest.mark.slow
def test_a_detect_fold_writes_its_froc_and_a_threshold_chosen_on_the_training_folds(detect_fold, loader_store):
    from wbs_dist.data.store import Store
    from wbs_dist.detection import THRESHOLDS, choose_threshold
    from wbs_dist.train.detector import study_index

    run, result = detect_fold
    assert result.epochs == 2 and (run / "fold1" / "done.json").exists()
    det = json.loads((run / "fold1" / "detection.json").read_text())
    store = Store.open(loader_store)
    val, train = study_index(store, [1], (96, 48)), study_index(store, [0, 2], (96, 48))
    assert det["studies"] == len(val) and det["froc"][0]["studies"] == len(val)
    assert det["train_froc"][0]["studies"] == len(train)
    # Two 48-row patches of each 96-row training study an epoch: the schedule counts the loader's steps.
    steps = -(-2 * len(train) // 4)
    assert f", {steps} steps an epoch" in (run / "fold1" / "train.log").read_text()
    lesions = store.lesion_table()
    assert det["froc"][0]["lesions"] + det["train_froc"][0]["lesions"] <= len(lesions["study"])
    assert [p["threshold"] for p in det["froc"]] == list(THRESHOLDS)
    # The threshold comes from the training folds' points, never the validation fold's.
    assert det["threshold"] == choose_threshold(det["train_froc"], 0.95)[0]
    assert det["at_threshold"] == next(p for p in det["froc"] if p["threshold"] == det["threshold"])
    for p in det["froc"]:
        assert p["sensitivity"] == pytest.approx(p["found"] / p["lesions"])
        assert p["fp_per_study"] == pytest.approx(p["false"] / p["studies"])
    # (Sensitivity need not fall as the threshold rises: a low threshold can merge a lesion into a
    # component over 10 times its size, which then finds nothing.)
    assert all(0 <= p["found"] <= p["lesions"] and p["false"] >= 0 and p["copies"] >= 0 for p in det["froc"])
    with open(run / "fold1" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and "val_sensitivity_at_3fp" in rows[0] and "val_auc" not in rows[0]
    assert not (run / "fold1" / "predictions.csv").exists()


@pytest.mark.slow
def test_a_detect_fold_resumes_exactly(detect_fold, loader_store, tmp_path):
    """Stopped after its first epoch (and a mid-epoch checkpoint), then run again: the same weights,
    bit for bit, as two epochs at once."""
    from wbs_dist.train.trainer import FoldTrainer, train_fold

    run, _ = detect_fold
    cfg = detect_config(loader_store, tmp_path / "run", checkpoint_every=3)
    first = FoldTrainer(cfg, 1)
    try:
        first.open(preemption=False)
        first.train_epoch()
    finally:
        first.close()
    assert not (tmp_path / "run" / "fold1" / "done.json").exists()
    train_fold(cfg, 1)
    a = torch.load(run / "fold1" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "run" / "fold1" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow             # several CLI processes: out of the fast subset
def test_a_detector_model_needs_task_detect_and_back(loader_store, tmp_path):
    r = run_cli("train", ROOT / "configs" / "local.yaml", "--fold", "0", f"store={loader_store}",
                f"run_dir={tmp_path}", "train_size=64x32", "folds=3", "model=unet_small")
    assert r.returncode == 2 and "set task=detect" in r.stderr, r.stderr
    r = run_cli("train", ROOT / "configs" / "local.yaml", "--fold", "0", f"store={loader_store}",
                f"run_dir={tmp_path}", "train_size=64x32", "folds=3", "task=detect", "model=resnet18")
    assert r.returncode == 2 and "set task=classify" in r.stderr, r.stderr


@pytest.mark.slow             # several CLI processes: out of the fast subset
def test_detector_sizes_and_patches_are_checked_before_training(loader_store, tmp_path):
    base = ["train", ROOT / "configs" / "local.yaml", "--fold", "0", f"store={loader_store}", f"run_dir={tmp_path}",
            "folds=3", "task=detect", "model=unet_small"]
    r = run_cli(*base, "train_size=96x50")                       # unet_small halves twice: multiples of 4
    assert r.returncode == 2 and "'train_size'" in r.stderr and "multiples of 4" in r.stderr, r.stderr
    r = run_cli(*base, "train_size=96x48", "patch_rows=30")
    assert r.returncode == 2 and "'patch_rows'" in r.stderr, r.stderr
    r = run_cli(*base[:-2], "train_size=64x32", "patch_rows=32")  # a classifier sees whole studies
    assert r.returncode == 2 and "'patch_rows' is for task=detect" in r.stderr, r.stderr
    assert not list(tmp_path.glob("fold0/*.pt"))


@pytest.mark.slow
def test_cv_of_a_detector_pools_the_folds_at_their_own_thresholds(loader_store, tmp_path):
    """`wbs-dist cv` with task=detect: three folds, the detection block of metrics.json summed by hand
    from the folds' detection.json, and the FROC plot."""
    r = run_cli("cv", ROOT / "configs" / "local.yaml", f"store={loader_store}", f"run_dir={tmp_path}",
                "train_size=64x32", "folds=3", "task=detect", "model=unet_small", "weights=none", "epochs=1",
                "batch_size=4", "num_workers=0", "checkpoint_every=0", timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "false positives per study" in r.stdout
    folds = [json.loads((tmp_path / f"fold{k}" / "detection.json").read_text()) for k in range(3)]
    det = json.loads((tmp_path / "report" / "metrics.json").read_text())["detection"]
    at = [f["at_threshold"] for f in folds]
    found, lesions = sum(a["found"] for a in at), sum(a["lesions"] for a in at)
    false, studies = sum(a["false"] for a in at), sum(a["studies"] for a in at)
    assert det["pooled"]["sensitivity"] == pytest.approx(found / lesions)
    assert det["pooled"]["fp_per_study"] == pytest.approx(false / studies)
    assert det["pooled"]["copies"] == sum(a["copies"] for a in at)
    # The classical finder's point, on the same studies and delineations at the same level.
    c = det["classical"]
    assert (c["studies"], c["lesions"]) == (studies, lesions) and 0 < c["found"] <= lesions and c["false"] > 0
    assert "hot-spot finder" in (tmp_path / "report" / "report.html").read_text()
    assert {k: f["threshold"] for k, f in det["folds"].items()} == {str(k): f["threshold"] for k, f in enumerate(folds)}
    first = det["froc"][0]
    assert first["studies"] == studies and first["found"] == sum(f["froc"][0]["found"] for f in folds)
    assert (tmp_path / "report" / "froc.png").stat().st_size > 1000
    assert "Detection report" in (tmp_path / "report" / "report.html").read_text()


def written_detection(tmp_path):
    """A detection.json as DetectTask.write_outputs writes it, from made-up validation counts."""
    from wbs_dist.detection import choose_threshold, froc_from_counts
    from wbs_dist.train.rundir import FoldDir
    from wbs_dist.train.tasks import DetectTask

    rng = np.random.default_rng(0)
    lesions = rng.integers(1, 6, (8, 1))
    counts = np.stack(np.broadcast_arrays(rng.integers(0, 6, (8, 19)).clip(max=lesions), lesions,
                                          rng.integers(0, 4, (8, 19))), axis=-1)
    points, train = froc_from_counts(counts[:4]), froc_from_counts(counts[4:])
    threshold, note = choose_threshold(train, 0.95)
    task = SimpleNamespace(fold=0, val_index=range(4), cfg=SimpleNamespace(target_sensitivity=0.95, split="s"))
    val = {"points": points, "train_points": train, "threshold": threshold, "threshold_note": note}
    (tmp_path / "fold0").mkdir()
    return DetectTask.write_outputs(task, val, FoldDir(tmp_path, 0))


def _drop(doc, *keys):
    for key in keys[:-1]:
        doc = doc[key]
    del doc[keys[-1]]


CORRUPT = {
    "truncated": (lambda text, doc: text[:len(text) // 2], "not valid JSON"),
    "empty": (lambda text, doc: "", "not valid JSON"),
    "not text": (lambda text, doc: b"\xff\xfe\x00{", "not valid JSON"),
    "a list": (lambda text, doc: [doc], "not a JSON object"),
    "no threshold": (lambda text, doc: _drop(doc, "threshold"), "missing key(s) threshold"),
    "no froc": (lambda text, doc: _drop(doc, "froc"), "missing key(s) froc"),
    "threshold a string": (lambda text, doc: doc.update(threshold="0.5"), "threshold '0.5': expected a number"),
    "threshold 1.5": (lambda text, doc: doc.update(threshold=1.5), "threshold 1.5: expected a number"),
    "threshold 0": (lambda text, doc: doc.update(threshold=0), "threshold 0: expected a number"),
    "threshold true": (lambda text, doc: doc.update(threshold=True), "threshold True: expected a number"),
    "threshold NaN": (lambda text, doc: text.replace(f'"threshold": {doc["threshold"]}', '"threshold": NaN', 1),
                      "threshold nan: expected a number"),
    "target 2": (lambda text, doc: doc.update(target_sensitivity=2), "target_sensitivity 2: expected"),
    "froc empty": (lambda text, doc: doc.update(froc=[]), "froc: expected a non-empty list"),
    "point without counts": (lambda text, doc: _drop(doc, "at_threshold", "found"), "at_threshold: expected"),
    "count a string": (lambda text, doc: doc["froc"][3].update(lesions="7"), "froc[3]: expected"),
}


@pytest.mark.parametrize("name", CORRUPT)
def test_an_unusable_detection_json_is_an_input_error_naming_the_file(tmp_path, name):
    from wbs_dist.train.rundir import FoldDir

    path = written_detection(tmp_path)
    text = path.read_text()
    assert FoldDir(tmp_path, 0).read_detection() == json.loads(text)      # as written, it reads back
    doc = json.loads(text)
    corrupt, needle = CORRUPT[name]
    out = corrupt(text, doc)
    out = json.dumps(doc, indent=1) if out is None else out
    if isinstance(out, list):
        out = json.dumps(out)
    path.write_bytes(out if isinstance(out, bytes) else out.encode())
    with pytest.raises(InputError) as err:
        FoldDir(tmp_path, 0).read_detection()
    assert str(err.value).startswith(f"{path}: {needle}"), str(err.value)
    assert str(tmp_path / "fold0" / "done.json") in str(err.value)


def test_a_missing_detection_json_is_an_input_error(tmp_path):
    from wbs_dist.train.rundir import FoldDir

    with pytest.raises(InputError, match="detection.json: missing"):
        FoldDir(tmp_path, 0).read_detection()


@pytest.mark.slow
def test_cv_report_with_an_unusable_detection_json_exits_2_naming_it(detector_dir, loader_store, tmp_path):
    """Three finished detector folds (copies of one), one detection.json stripped of its FROC: the
    report is refused with the file's name, not a KeyError."""
    run = tmp_path / "run"
    for k in range(3):
        shutil.copytree(detector_dir / "fold0", run / f"fold{k}", ignore=shutil.ignore_patterns("*.lock"))
    bad = run / "fold2" / "detection.json"
    doc = json.loads(bad.read_text())
    del doc["froc"]
    bad.write_text(json.dumps(doc))
    r = run_cli("cv", ROOT / "configs" / "local.yaml", f"store={loader_store}", f"run_dir={run}", "train_size=64x32",
                "folds=3", "task=detect", "model=unet_small", "weights=none", "epochs=1", "batch_size=4",
                "num_workers=0", "checkpoint_every=0")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"{bad}: missing key(s) froc" in r.stderr, r.stderr
    assert r.stderr.count("already finished") == 3 and not (run / "report").exists()


@pytest.mark.ddp
def test_ddp_two_ranks_of_a_detector_under_torchrun(loader_store, tmp_path):
    """Two ranks under torchrun, a global batch that divides neither the training patches nor the
    validation studies: both ranks end with the same weights, and the fold's validation FROC equals
    one process's count over every validation study exactly once with those weights."""
    import os
    import subprocess
    import sys

    import numpy as np

    from wbs_dist.data.store import Store
    from wbs_dist.detection import THRESHOLDS, components, counts, froc_from_counts, match
    from wbs_dist.train.detector import StudyDataset, build_detector, study_index

    store = Store.open(loader_store)
    val, train = study_index(store, [0], (96, 48)), study_index(store, [1, 2], (96, 48))
    batch = next(b for b in range(4, 64, 2) if (2 * len(train)) % b and len(val) % b)
    cfg = detect_config(loader_store, tmp_path / "runs", batch_size=batch, dist_timeout_s=120)
    overrides = [f"{k}={v}" for k, v in cfg.to_dict().items() if k in (
        "store", "run_dir", "train_size", "folds", "task", "model", "weights", "epochs", "batch_size", "lr",
        "patch_rows", "num_workers", "checkpoint_every", "deterministic", "dist_timeout_s")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "ddp_train_rank.py"), str(ROOT / "configs" / "local.yaml"), str(tmp_path), *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    fold = tmp_path / "runs" / "fold0"
    assert "2 rank(s)" in (fold / "train.log").read_text()
    det = json.loads((fold / "detection.json").read_text())
    model = build_detector("unet_small")
    model.load_state_dict(r0)
    model.eval()
    ds = StudyDataset(val)
    want = []
    with torch.no_grad():
        for i in range(len(val)):
            prob = torch.softmax(model(ds[i]["x"][None]), dim=1)[0, 1].numpy()
            truth = val.study_arrays(store, i)[1]
            want.append([counts(match(components(prob, t), truth)) for t in THRESHOLDS])
    # Every study once (lesions and studies exact); a component count may move by one where batching
    # changed a probability in its last bits right at a threshold.
    ref = froc_from_counts(np.array(want))
    for got, exp in zip(det["froc"], ref):
        assert (got["studies"], got["lesions"]) == (exp["studies"], exp["lesions"]) == (len(val), exp["lesions"])
        assert all(abs(got[k] - exp[k]) <= 1 for k in ("found", "false", "copies")), (got, exp)
    assert sum(got == exp for got, exp in zip(det["froc"], ref)) >= len(ref) - 2


@pytest.mark.slow
def test_a_detect_fold_reads_its_training_studies_into_one_cache(loader_store, tmp_path, monkeypatch):
    """The threshold pass at the end reads the training studies from the training loader's cache: two
    caches a fold (training, validation), not a third made again from the native views."""
    from wbs_dist.train import loader as loader_mod
    from wbs_dist.train.trainer import train_fold

    built = []
    real = loader_mod.StudyCache.build.__func__

    def counting(cls, index):
        built.append(len(index))
        return real(cls, index)

    monkeypatch.setattr(loader_mod.StudyCache, "build", classmethod(counting))
    train_fold(detect_config(loader_store, tmp_path / "run", epochs=1), 0)
    assert len(built) == 2, built
