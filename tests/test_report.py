"""`wbs-dist report`: hand-computed metrics, the metrics.json contract (DESIGN 3.3), outputs, bad input."""

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from wbs_dist.cli import main
from wbs_dist.errors import InputError
from wbs_dist.evaluate.analysis import analyse, run_names
from wbs_dist.evaluate.metrics import METRIC_KEYS, RATES
from wbs_dist.evaluate.predictions import read_predictions
from wbs_dist.evaluate.report import headline, write_report
from wbs_dist.schema import burden_group

DATA = Path(__file__).parent / "data" / "report"
TEN = DATA / "ten_rows.csv"
HEADER = ["patient_id", "study_uid", "lesion_id", "view", "fold", "label", "score", "tumor_type",
          "lesion_count"]


def write_csv(path: Path, rows, header=HEADER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def ten_rows() -> list[list[str]]:
    with TEN.open(newline="") as fh:
        return list(csv.reader(fh))[1:]


def report(tmp_path, *csvs, threshold=None):
    out = tmp_path / "out"
    argv = ["report", *map(str, csvs), "--out", str(out)]
    if threshold is not None:
        argv += ["--threshold", threshold]
    return main(argv), out


# --- hand-computed metrics (tests/data/report/ten_rows.csv) -----------------------------------


@pytest.fixture(scope="module")
def ten():
    return analyse("ten_rows", read_predictions(TEN), 0.5).metrics


def counts(m):
    return tuple(m[k] for k in ("n", "tp", "fp", "tn", "fn"))


def test_lesion_pooled_hand_computed(ten):
    m = ten["lesion"]["pooled"]
    assert counts(m) == (10, 4, 1, 4, 1)
    for rate in RATES:
        assert m[rate] == pytest.approx(0.8)
    assert m["auc"] == pytest.approx(21 / 25)
    assert [round(v, 4) for v in m["ci"]["accuracy"]] == [0.4902, 0.9433]


def test_lesion_folds_mean_std_hand_computed(ten):
    f0, f1 = ten["lesion"]["folds"]["0"], ten["lesion"]["folds"]["1"]
    assert counts(f0) == (5, 1, 1, 2, 1)
    assert (f0["sensitivity"], f0["specificity"], f0["accuracy"]) == pytest.approx((0.5, 2 / 3, 0.6))
    assert f0["auc"] == pytest.approx(4 / 6)
    assert counts(f1) == (5, 3, 0, 2, 0)
    assert f1["auc"] == 1.0
    mean, std = ten["lesion"]["mean"], ten["lesion"]["std"]
    assert mean["sensitivity"] == pytest.approx(0.75)
    assert std["sensitivity"] == pytest.approx(math.sqrt(0.125))  # sample std of 0.5 and 1
    assert mean["accuracy"] == pytest.approx(0.8)
    assert (mean["n"], std["n"]) == (5.0, 0.0)
    assert ten["threshold"] == 0.5 and ten["thresholds"] == {"0": 0.5, "1": 0.5}


def test_patient_level_is_max_score_and_any_malignant(ten):
    # P5 has a benign 0.10 and a malignant 0.55 lesion: malignant, score 0.55, predicted malignant.
    m = ten["patient"]["pooled"]
    assert counts(m) == (6, 3, 1, 1, 1)
    assert m["sensitivity"] == pytest.approx(0.75) and m["specificity"] == pytest.approx(0.5)
    assert m["auc"] == pytest.approx(5 / 8)


def test_subgroups_hand_computed(ten):
    burden = ten["subgroups"]["burden"]
    assert counts(burden["few"]) == (4, 1, 0, 2, 1)
    assert counts(burden["medium"]) == (4, 2, 1, 1, 0)
    assert counts(burden["extensive"]) == (2, 1, 0, 1, 0)
    assert burden["chi2"]["accuracy"]["chi2"] == pytest.approx(0.625)
    assert burden["chi2"]["accuracy"]["p"] == pytest.approx(math.exp(-0.625 / 2))
    assert burden["chi2"]["sensitivity"]["chi2"] == pytest.approx(1.875)
    tumor = ten["subgroups"]["tumor_type"]
    assert counts(tumor["lung"]) == (3, 1, 0, 2, 0)
    assert counts(tumor["prostate"]) == (3, 0, 1, 1, 1)
    assert counts(tumor["breast"]) == (4, 3, 0, 1, 0)
    # Sensitivity TP/FN [[1, 0, 3], [0, 1, 0]]: expected [[.8, .8, 2.4], [.2, .2, .6]] -> chi2 5.0.
    assert tumor["chi2"]["sensitivity"]["chi2"] == pytest.approx(5.0)
    assert tumor["chi2"]["sensitivity"]["p"] == pytest.approx(math.exp(-2.5))
    assert "other" not in tumor


def test_burden_groups():
    assert [burden_group(n) for n in (1, 3, 4, 6, 7, 40)] == ["few", "few", "medium", "medium",
                                                              "extensive", "extensive"]


def _keys_exactly(d, required, extra=()):
    assert set(required) <= set(d), f"missing {set(required) - set(d)}"
    assert set(d) - set(required) <= set(extra), f"unexpected {set(d) - set(required) - set(extra)}"


def test_metrics_json_shape_matches_contract(tmp_path):
    rc, out = report(tmp_path, TEN)
    assert rc == 0
    doc = json.loads((out / "metrics.json").read_text())
    _keys_exactly(doc, ["threshold", "lesion", "patient", "subgroups"],
                  ["thresholds", "notes", "methods", "input", "run", "bootstrap"])
    assert doc["threshold"] == 0.5
    _keys_exactly(doc["lesion"], ["folds", "mean", "std", "pooled"])
    _keys_exactly(doc["patient"], ["pooled"])
    _keys_exactly(doc["subgroups"], ["burden", "tumor_type"])
    _keys_exactly(doc["subgroups"]["burden"], ["few", "medium", "extensive", "chi2"])
    _keys_exactly(doc["subgroups"]["tumor_type"], ["lung", "prostate", "breast", "chi2"], ["other"])
    assert list(doc["lesion"]["folds"]) == ["0", "1"]
    # DESIGN 3.3's added keys: patient-bootstrap intervals in lesion.pooled and every subgroup (with
    # the replicates used where fewer than B), a cluster-aware test beside each Pearson chi-square.
    clustered = [doc["lesion"]["pooled"],
                 *(m for dim in doc["subgroups"].values() for k, m in dim.items() if k != "chi2")]
    plain = [*doc["lesion"]["folds"].values(), doc["patient"]["pooled"]]
    for m in plain:
        _keys_exactly(m, METRIC_KEYS, ["ci"])
    for m in clustered:
        _keys_exactly(m, [*METRIC_KEYS, "ci_patient_bootstrap"], ["ci", "ci_patient_bootstrap_replicates"])
        _keys_exactly(m["ci_patient_bootstrap"], [*RATES, "auc"])
        assert set(m.get("ci_patient_bootstrap_replicates", {})) <= {*RATES, "auc"}
    blocks = plain + clustered
    for m in blocks:
        _keys_exactly(m["ci"], [*RATES, "auc"])
    for m in (doc["lesion"]["mean"], doc["lesion"]["std"]):
        _keys_exactly(m, METRIC_KEYS)
    for dim in doc["subgroups"].values():
        _keys_exactly(dim["chi2"], RATES)
        for c in dim["chi2"].values():
            _keys_exactly(c, ["chi2", "p"], ["df", "cluster"])
            _keys_exactly(c["cluster"], ["method", "chi2", "df", "p", "p_chi2", "deff"])
    assert doc["bootstrap"] == {"replicates": 2000, "seed": 0}
    for m in blocks:
        for rate in RATES:
            assert m[rate] is None or 0.0 <= m[rate] <= 1.0


def test_cli_writes_report_plots_and_headline(tmp_path, capsys):
    rc, out = report(tmp_path, TEN)
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "accuracy 80.00 %, sensitivity 80.00 %, specificity 80.00 %, AUC 0.840" in stdout
    assert str(out / "report.html") in stdout
    for name in ("roc_folds", "roc_burden", "roc_tumor_type", "confusion", "calibration"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5
    assert "http" not in page and "<link" not in page and "<script" not in page
    md = (out / "tables.md").read_text()
    assert "| 0 | 5 | 50.00 | 66.67 | 60.00 | 50.00 | 66.67 | 0.667 |" in md
    assert "| Mean | 5.0 | 75.00 |" in md
    assert "| Std | 0.0 | 35.36 |" in md
    assert "| p |  | 0.392 |" in md  # burden sensitivity: exp(-1.875 / 2)


def test_subgroup_without_positives_is_null_with_note(tmp_path):
    rows = ten_rows()
    for r in rows:
        if r[7] == "lung":
            r[5] = "0"
    rc, out = report(tmp_path, write_csv(tmp_path / "p.csv", rows))
    assert rc == 0
    doc = json.loads((out / "metrics.json").read_text())
    lung = doc["subgroups"]["tumor_type"]["lung"]
    assert lung["sensitivity"] is None and lung["auc"] is None and lung["ci"]["auc"] is None
    assert lung["specificity"] is not None
    assert "subgroups.tumor_type.lung: sensitivity undefined: no malignant cases" in doc["notes"]
    assert "subgroups.tumor_type.lung: AUC undefined: no malignant cases" in doc["notes"]
    chi = doc["subgroups"]["tumor_type"]["chi2"]["sensitivity"]
    assert chi["df"] == 1  # prostate and breast only
    assert any(n.startswith("subgroups.tumor_type.chi2: sensitivity chi-square leaves out lung")
               for n in doc["notes"])
    assert "NaN" not in (out / "metrics.json").read_text()


def test_unlabelled_rows_other_tumour_and_no_folds(tmp_path):
    rows = [r[:4] + [""] + r[5:] for r in ten_rows()]
    rows.append(["P7", "S7", "1", "anterior", "", "", "0.9", "lung", "1"])
    rows.append(["P8", "S8", "1", "anterior", "", "1", "0.9", "other", "1"])
    rows.append(["P9", "S9", "1", "posterior", "", "0", "0.2", "", "1"])
    # The scorer's row for a candidate on a view the DICOM does not name (score.py).
    rows.append(["P10", "S10", "1", "unknown", "", "", "0.4", "", "1"])
    rc, out = report(tmp_path, write_csv(tmp_path / "p.csv", rows))
    assert rc == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["lesion"]["folds"] == {} and doc["thresholds"] == {}
    assert all(v is None for v in doc["lesion"]["mean"].values())
    assert doc["lesion"]["pooled"]["n"] == 12
    assert "2 rows with an empty label (unknown) left out of every metric" in doc["notes"]
    assert counts(doc["subgroups"]["tumor_type"]["other"]) == (1, 1, 0, 0, 0)
    # 'other' stays out of the contract's chi-square: same value as without it.
    assert doc["subgroups"]["tumor_type"]["chi2"]["sensitivity"]["chi2"] == pytest.approx(5.0)
    assert any("1 labelled lesions with an empty tumor_type" in n for n in doc["notes"])
    assert not (out / "roc_folds.png").exists()
    assert "other" in (out / "tables.md").read_text()


def test_youden_uses_only_the_other_folds(tmp_path):
    # Fold 0 alone would pick 0.3, and so would all folds pooled (fold 0 dominates); folds 1 and 2
    # alone pick 0.8. Fold 0 must be judged at 0.8, which misses all its malignant lesions.
    rows, i = [], 0
    for fold, pos, neg in ((0, [0.3] * 6, [0.1] * 6), (1, [0.8, 0.85], [0.6, 0.65]),
                           (2, [0.8, 0.9], [0.6, 0.7])):
        for label, scores in ((1, pos), (0, neg)):
            for s in scores:
                i += 1
                rows.append([f"P{i}", f"S{i}", "1", "anterior", str(fold), str(label), str(s), "lung", "1"])
    rc, out = report(tmp_path, write_csv(tmp_path / "y.csv", rows), threshold="youden")
    assert rc == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["threshold"] == "youden"
    assert doc["thresholds"] == {"0": 0.8, "1": 0.3, "2": 0.3}
    f0 = doc["lesion"]["folds"]["0"]
    assert (f0["tp"], f0["fn"], f0["sensitivity"]) == (0, 6, 0.0)
    f1 = doc["lesion"]["folds"]["1"]  # at 0.3 everything in fold 1 is called malignant
    assert (f1["tp"], f1["fp"]) == (2, 2)
    assert "Threshold" in (out / "tables.md").read_text()


def test_several_runs_side_by_side(tmp_path, capsys):
    a = tmp_path / "resnet50" / "predictions.csv"
    b = tmp_path / "vgg16" / "predictions.csv"
    a.parent.mkdir()
    shutil.copy(TEN, a)
    rows = ten_rows()
    rows[2][6] = "0.95"  # one more true positive for vgg16
    write_csv(b, rows)
    rc, out = report(tmp_path, a, b)
    assert rc == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert list(doc["runs"]) == ["resnet50", "vgg16"] and doc["run"] == "resnet50"
    top = {k: v for k, v in doc.items() if k not in ("runs", "run")}
    assert top == doc["runs"]["resnet50"]
    assert doc["runs"]["vgg16"]["lesion"]["pooled"]["tp"] == 5
    md = (out / "tables.md").read_text()
    assert "Runs side by side" in md and "| vgg16 | mean of 2 folds |" in md
    for name in ("roc_runs", "resnet50_roc_folds", "vgg16_calibration"):
        assert (out / f"{name}.png").exists()
    assert capsys.readouterr().out.count("lesion level (pooled") == 2


def test_write_report_returns_runs_and_prints_nothing(tmp_path, capsys):
    runs = write_report([TEN], tmp_path / "out", threshold=0.5)
    assert capsys.readouterr().out == ""
    assert [r.name for r in runs] == ["ten_rows"]
    assert headline(runs[0]) == ("ten_rows: lesion level (pooled, n=10): accuracy 80.00 %, "
                                 "sensitivity 80.00 %, specificity 80.00 %, AUC 0.840")
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["threshold"] == 0.5
    with pytest.raises(ValueError, match="threshold"):
        write_report([TEN], tmp_path / "other", threshold="0.5")  # not parsed: parse_threshold first


def test_failed_rendering_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    # Everything is rendered before the first file is written: a plot that fails must not leave new
    # metrics.json beside the previous run's tables and pages.
    out = tmp_path / "out"
    write_report([TEN], out, threshold=0.5)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise RuntimeError("rendering failed")

    monkeypatch.setattr(FigureCanvasAgg, "print_png", boom)
    with pytest.raises(RuntimeError, match="rendering failed"):
        write_report([TEN], out, threshold=0.35)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_run_names():
    assert run_names([Path("a/resnet.csv"), Path("a/vgg.csv")]) == ["resnet", "vgg"]
    assert run_names([Path("r/p.csv"), Path("v/p.csv")]) == ["r", "v"]
    assert run_names([Path("x/r/p.csv"), Path("y/r/p.csv")]) == ["p#1", "p#2"]


# --- bad input: exit 2, row and column named, no traceback, nothing written ---------------------


def _replace(row: int, column: str, value: str):
    """Rows as in the message: header = 1, so data row i is ten_rows()[i - 2]."""
    def edit(rows):
        rows[row - 2][HEADER.index(column)] = value
        return rows
    return edit


BAD_CELLS = [
    ("score_text", _replace(3, "score", "abc"), "row 3, column 'score': 'abc' is not a number"),
    ("score_range", _replace(4, "score", "1.5"), "row 4, column 'score': 1.5 is outside [0, 1]"),
    ("score_negative", _replace(4, "score", "-0.1"), "row 4, column 'score': -0.1 is outside"),
    ("score_nan", _replace(5, "score", "nan"), "row 5, column 'score': nan is outside"),
    ("score_empty", _replace(5, "score", ""), "row 5, column 'score': '' is not a number"),
    ("label", _replace(6, "label", "2"), "row 6, column 'label': '2' is not 0, 1 or empty"),
    ("label_word", _replace(6, "label", "malignant"), "row 6, column 'label'"),
    ("tumor", _replace(7, "tumor_type", "kidney"), "row 7, column 'tumor_type': unknown tumour type"),
    ("lesion_count_float", _replace(8, "lesion_count", "3.5"),
     "row 8, column 'lesion_count': '3.5' is not an integer"),
    ("lesion_count_zero", _replace(8, "lesion_count", "0"), "row 8, column 'lesion_count': 0 is below 1"),
    ("fold_text", _replace(9, "fold", "x"), "row 9, column 'fold': 'x' is not an integer"),
    ("fold_negative", _replace(9, "fold", "-1"), "row 9, column 'fold': -1 is below 0"),
    ("fold_mixed", _replace(11, "fold", ""), "row 11, column 'fold': empty here but set in row 2"),
    ("patient_two_folds", _replace(3, "fold", "1"), "row 3, column 'fold': patient P1 is in fold 1"),
    ("lesion_id", _replace(2, "lesion_id", "a"), "row 2, column 'lesion_id': 'a' is not an integer"),
    ("view", _replace(2, "view", "lateral"), "row 2, column 'view': 'lateral' is not one of"),
    ("patient_empty", _replace(2, "patient_id", ""), "row 2, column 'patient_id': empty"),
    ("duplicate", _replace(3, "lesion_id", "1"),
     "row 3, column 'lesion_id': duplicate lesion: study S1 lesion 1 already in row 2"),
    # lesion_count is the study's: the same on every row of S4 (rows 7, 8), at least its rows (S1: 2).
    ("lesion_count_differs", _replace(8, "lesion_count", "6"),
     "row 8, column 'lesion_count': 6 here but 5 in row 7 for study S4"),
    ("lesion_count_below_rows", lambda rows: _replace(3, "lesion_count", "1")(_replace(2, "lesion_count", "1")(rows)),
     "row 2, column 'lesion_count': study S1 has 2 rows (lesions) but a lesion_count of 1"),
]


@pytest.mark.parametrize("edit,expected", [c[1:] for c in BAD_CELLS], ids=[c[0] for c in BAD_CELLS])
def test_bad_cell_exits_2_naming_row_and_column(tmp_path, capsys, edit, expected):
    rc, out = report(tmp_path, write_csv(tmp_path / "bad.csv", edit(ten_rows())))
    err = capsys.readouterr().err
    assert rc == 2
    assert expected in err
    assert "bad.csv" in err and "header = row 1" in err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("name,content,expected", [
    ("empty", "", "empty file"),
    ("header_only", ",".join(HEADER) + "\n", "no data rows"),
    ("missing_columns", "patient_id,study_uid,lesion_id,view,fold,label\nP1,S1,1,anterior,0,1\n",
     "row 1 (header): missing column(s) score, tumor_type, lesion_count"),
    ("short_row", ",".join(HEADER) + "\nP1,S1,1,anterior,0,1,0.5\n", "row 2: 7 fields but the header has 9"),
    ("all_unlabelled", ",".join(HEADER) + "\nP1,S1,1,anterior,0,,0.5,lung,1\n",
     "column 'label': every row is empty"),
    ("not_utf8", b"\xff\xfe\x00bad", "not UTF-8"),
])
def test_bad_file_exits_2(tmp_path, capsys, name, content, expected):
    path = tmp_path / f"{name}.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    rc, _ = report(tmp_path, path)
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and "Traceback" not in err


def test_missing_file_exits_2(tmp_path, capsys):
    rc, _ = report(tmp_path, TEN, tmp_path / "nope.csv")
    err = capsys.readouterr().err
    assert rc == 2 and "nope.csv: no such file" in err


def test_bad_threshold_exits_2(tmp_path, capsys):
    for value in ("abc", "1.5", "-0.1"):
        rc, _ = report(tmp_path, TEN, threshold=value)
        assert rc == 2
        assert f"--threshold: expected a number in [0, 1] or 'youden', got '{value}'" in capsys.readouterr().err


def test_threshold_number_applies(tmp_path):
    rc, out = report(tmp_path, TEN, threshold="0.35")
    assert rc == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["threshold"] == 0.35
    # Benign 0.40 and 0.45 become false positives beside 0.60; malignant 0.30 stays a false negative.
    assert counts(doc["lesion"]["pooled"]) == (10, 4, 3, 2, 1)


def test_youden_without_enough_folds_exits_2(tmp_path, capsys):
    no_folds = write_csv(tmp_path / "nofold.csv", [r[:4] + [""] + r[5:] for r in ten_rows()])
    one_fold = write_csv(tmp_path / "onefold.csv", [r[:4] + ["0"] + r[5:] for r in ten_rows()])
    for path, why in ((no_folds, "has no folds"), (one_fold, "has one fold")):
        rc, _ = report(tmp_path, path, threshold="youden")
        err = capsys.readouterr().err
        assert rc == 2 and "column 'fold'" in err and why in err and "other (training) folds" in err


def test_read_predictions_raises_input_error(tmp_path):
    with pytest.raises(InputError, match="row 4, column 'score'"):
        read_predictions(write_csv(tmp_path / "b.csv", _replace(4, "score", "x")(ten_rows())))


# --- intervals and tests that respect patients (issue 14) ----------------------------------------


def test_cli_writes_patient_bootstrap_and_cluster_test_reproducibly(tmp_path):
    argv = ["report", str(TEN), "--bootstrap", "300", "--seed", "5"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    text = (tmp_path / "a" / "metrics.json").read_text()
    assert text == (tmp_path / "b" / "metrics.json").read_text()  # same seed, same file
    doc = json.loads(text)
    assert doc["bootstrap"] == {"replicates": 300, "seed": 5}
    pooled = doc["lesion"]["pooled"]
    for key in (*RATES, "auc"):
        lo, hi = pooled["ci_patient_bootstrap"][key]
        assert 0.0 <= lo <= pooled[key] <= hi <= 1.0
    assert "ci_patient_bootstrap" in doc["subgroups"]["tumor_type"]["lung"]
    assert "ci_patient_bootstrap" not in doc["patient"]["pooled"]  # patients are the unit there
    cluster = doc["subgroups"]["burden"]["chi2"]["accuracy"]["cluster"]
    assert cluster["method"] == "rao_scott_permutation" and 0 < cluster["p"] <= 1
    assert doc["subgroups"]["burden"]["chi2"]["accuracy"]["chi2"] == pytest.approx(0.625)  # unchanged
    assert "B = 300" in doc["methods"]["ci_patient_bootstrap"]
    assert "assume independent lesions" in doc["methods"]["independence"]
    assert main([*argv[:-1], "6", "--out", str(tmp_path / "c")]) == 0
    other = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert other["lesion"]["pooled"]["ci_patient_bootstrap"] != pooled["ci_patient_bootstrap"]


def test_report_shows_both_intervals_and_both_p(tmp_path):
    rc, out = report(tmp_path, TEN)
    assert rc == 0
    md = (out / "tables.md").read_text()
    assert "| Lesion level (Wilson / DeLong) | Lesion level (patient bootstrap) | Patient level |" in md
    assert "| Accuracy (%) | 80.00 (49.02–94.33) | 80.00 (" in md
    assert md.count("| p (patients) |  |") == 2
    assert "| p |  | 0.392 |" in md  # Pearson's stays
    page = (out / "report.html").read_text()
    assert "assume independent lesions" in page and "Rao–Scott" in page and "patient bootstrap" in page


def test_bootstrap_off_and_bad_values(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", str(TEN), "--out", str(out), "--bootstrap", "0"]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert "ci_patient_bootstrap" not in doc["lesion"]["pooled"]
    cluster = doc["subgroups"]["tumor_type"]["chi2"]["sensitivity"]["cluster"]
    assert cluster["method"] == "rao_scott" and cluster["p"] == cluster["p_chi2"]
    assert "Lesion level (patient bootstrap)" not in (out / "tables.md").read_text()
    for flag, value in (("--bootstrap", "-1"), ("--seed", "-2")):
        assert main(["report", str(TEN), "--out", str(tmp_path / "x"), flag, value]) == 2
        assert f"{flag}: expected" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_degenerate_auc_interval_and_expected_count_notes_in_metrics_json(ten):
    # Fold 1 separates perfectly (AUC 1): DeLong's interval would be [1, 1].
    lo, hi = ten["lesion"]["folds"]["1"]["ci"]["auc"]
    assert hi == 1.0 and lo < 0.9
    assert any(n.startswith("lesion.folds.1: AUC 1.000: DeLong variance 0") for n in ten["notes"])
    assert ("subgroups.burden.chi2: accuracy chi-square: 6 of 6 cells (100.0 %) have an expected count "
            "below 5 (minimum 0.40); the chi-square approximation may not hold") in ten["notes"]


def test_unlabelled_rows_may_lack_the_fold_that_labelled_rows_carry(tmp_path):
    """A scorer's output over a training archive: known patients' rows carry their fold (the out-of-fold
    rule), the candidates of a patient the run never saw have neither fold nor label. Graded rows must
    agree; the others are out of every metric."""
    from wbs_dist.evaluate.predictions import read_predictions

    rows = ten_rows() + [["PNEW", "SNEW", "1", "anterior", "", "", "0.400000", "", "1"]]
    pred = read_predictions(write_csv(tmp_path / "mixed.csv", rows))
    assert pred.n_unlabelled == 1 and pred.fold is not None and len(pred.fold) == len(ten_rows())
