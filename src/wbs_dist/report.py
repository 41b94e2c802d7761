"""`wbs-dist report`: predictions CSVs (DESIGN 3.3) -> metrics.json, Markdown tables, PNG plots and
one self-contained HTML report, in the shape of the study's tables.

Each CSV is one run (an architecture, a config). Tables follow the study: per fold with mean and
standard deviation (its Table 2), runs side by side (Table 3), subgroups by lesion burden and by
primary tumour with chi-square (Tables 4 and 5). A lesion is predicted malignant when its score is
>= the threshold: 0.5, a given number, or per validation fold the Youden threshold of the other
folds (the training folds), so no threshold is ever tuned on the data it is reported on.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_curve

from .errors import InputError, UsageError
from .metrics import RATES, chi_square, fold_mean_std, summarize, youden_threshold

REQUIRED_COLUMNS = ("patient_id", "study_uid", "lesion_id", "view", "fold", "label", "score",
                    "tumor_type", "lesion_count")
TUMOR_TYPES = ("lung", "prostate", "breast", "other")
# The contract's tumour subgroups; "other" is reported when present but stays out of the chi-square.
CONTRACT_TUMOR_TYPES = ("lung", "prostate", "breast")
BURDEN_GROUPS = ("few", "medium", "extensive")
# `unknown`: the scorer's label for a view the DICOM does not name (score.py); views are not used in
# any metric, so those rows are reported like the rest.
VIEWS = ("anterior", "posterior", "unknown")
ROW_CONVENTION = "rows numbered as lines of the file, header = row 1"

METHODS = {
    "prediction": "malignant when score >= threshold",
    "ci": "95 %: Wilson score interval for rates, DeLong (fast, midranks) for the AUC",
    "chi2": "Pearson, no continuity correction, 2 x k table of each rate's numerator and complement "
            "across subgroups; subgroups where the rate is undefined are left out",
    "fold_summary": "mean and sample std (ddof=1) over folds of each key, counts included",
    "patient": "score = highest lesion score, label = malignant if any lesion is, "
               "predicted malignant if any lesion is",
    "burden": "lesions per study: few 1-3, medium 4-6, extensive > 6",
}


def burden_group(lesion_count: int) -> str:
    """The study's lesion-burden subgroup of a study with ``lesion_count`` lesions."""
    if lesion_count <= 3:
        return "few"
    return "medium" if lesion_count <= 6 else "extensive"


@dataclass
class Predictions:
    """The labelled rows of one predictions CSV as arrays; unlabelled rows are only counted."""

    path: Path
    patient_id: np.ndarray
    fold: np.ndarray | None  # None when the file has no folds (scorer output)
    label: np.ndarray
    score: np.ndarray
    tumor_type: np.ndarray  # "" where unknown
    burden: np.ndarray
    n_unlabelled: int

    @property
    def folds(self) -> list[int]:
        return [] if self.fold is None else sorted({int(f) for f in self.fold})


def _bad(path: Path, row: int, column: str, message: str) -> InputError:
    return InputError(f"{path}, row {row}, column '{column}': {message} ({ROW_CONVENTION})")


def _int(path: Path, row: int, column: str, text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _bad(path, row, column, f"{text!r} is not an integer") from None
    if value < minimum:
        raise _bad(path, row, column, f"{value} is below {minimum}")
    return value


def read_predictions(path: Path) -> Predictions:
    """Read and validate one predictions CSV; any problem is an ``InputError`` naming row and column."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            try:
                return _parse(path, reader)
            except csv.Error as exc:
                raise InputError(f"{path}, row {reader.line_num}: malformed CSV ({exc}; "
                                 f"{ROW_CONVENTION})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None


def _parse(path: Path, reader) -> Predictions:
    header = next(reader, None)
    if header is None:
        raise InputError(f"{path}: empty file; expected a header with columns "
                         + ", ".join(REQUIRED_COLUMNS))
    names = [h.strip() for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise InputError(f"{path}, row 1 (header): missing column(s) {', '.join(missing)}")
    col = {c: names.index(c) for c in REQUIRED_COLUMNS}

    patients, folds, labels, scores, tumors, burdens = [], [], [], [], [], []
    n_rows = n_unlabelled = 0
    lesion_row: dict[tuple[str, int], int] = {}
    patient_fold: dict[str, tuple[int | None, int]] = {}
    fold_row: tuple[bool, int] | None = None  # whether the first data row had a fold, and its row
    for record in reader:
        row = reader.line_num
        if not any(cell.strip() for cell in record):
            continue
        if len(record) != len(names):
            raise InputError(f"{path}, row {row}: {len(record)} fields but the header has "
                             f"{len(names)} ({ROW_CONVENTION})")
        value = {c: record[i].strip() for c, i in col.items()}
        n_rows += 1

        for c in ("patient_id", "study_uid"):
            if not value[c]:
                raise _bad(path, row, c, "empty")
        lesion_id = _int(path, row, "lesion_id", value["lesion_id"], 1)
        if value["view"] not in VIEWS:
            raise _bad(path, row, "view", f"{value['view']!r} is not one of {', '.join(VIEWS)}")

        fold = _int(path, row, "fold", value["fold"], 0) if value["fold"] else None
        if fold_row is None:
            fold_row = (fold is not None, row)
        elif (fold is not None) != fold_row[0]:
            raise _bad(path, row, "fold", f"{'set' if fold is not None else 'empty'} here but "
                       f"{'set' if fold_row[0] else 'empty'} in row {fold_row[1]}; either every "
                       "row has a fold or none has")

        if value["label"] not in ("0", "1", ""):
            raise _bad(path, row, "label", f"{value['label']!r} is not 0, 1 or empty (unknown)")
        try:
            score = float(value["score"])
        except ValueError:
            raise _bad(path, row, "score", f"{value['score']!r} is not a number") from None
        if not (math.isfinite(score) and 0.0 <= score <= 1.0):
            raise _bad(path, row, "score", f"{value['score']} is outside [0, 1]")
        tumor = value["tumor_type"].lower()
        if tumor and tumor not in TUMOR_TYPES:
            raise _bad(path, row, "tumor_type", f"unknown tumour type {value['tumor_type']!r} "
                       f"(allowed: {', '.join(TUMOR_TYPES)}, or empty when unknown)")
        lesion_count = _int(path, row, "lesion_count", value["lesion_count"], 1)

        key = (value["study_uid"], lesion_id)
        if key in lesion_row:
            raise _bad(path, row, "lesion_id", f"duplicate lesion: study {key[0]} lesion {key[1]} "
                       f"already in row {lesion_row[key]}")
        lesion_row[key] = row
        # A patient in two validation folds means the split leaked, and it would give the patient
        # two thresholds under --threshold youden.
        first = patient_fold.setdefault(value["patient_id"], (fold, row))
        if first[0] != fold:
            raise _bad(path, row, "fold", f"patient {value['patient_id']} is in fold {fold} here "
                       f"but in fold {first[0]} in row {first[1]}; folds must split by patient")

        if not value["label"]:
            n_unlabelled += 1
            continue
        patients.append(value["patient_id"])
        folds.append(fold)
        labels.append(int(value["label"]))
        scores.append(score)
        tumors.append(tumor)
        burdens.append(burden_group(lesion_count))

    if not n_rows:
        raise InputError(f"{path}: no data rows below the header")
    if not labels:
        raise InputError(f"{path}, column 'label': every row is empty (unknown); nothing to evaluate")
    return Predictions(
        path=path,
        patient_id=np.array(patients, dtype=object),
        fold=np.array(folds, dtype=int) if folds[0] is not None else None,
        label=np.array(labels, dtype=int),
        score=np.array(scores, dtype=float),
        tumor_type=np.array(tumors, dtype=object),
        burden=np.array(burdens, dtype=object),
        n_unlabelled=n_unlabelled,
    )


def parse_threshold(text: str) -> float | str:
    """``--threshold``: a number in [0, 1] or ``"youden"``."""
    if text.strip().lower() == "youden":
        return "youden"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"--threshold: expected a number in [0, 1] or 'youden', got {text!r}")
    return value


def fold_thresholds(pred: Predictions, threshold: float | str) -> dict[int, float]:
    """The threshold applied to each validation fold ({} without folds, where one fixed value applies).

    For Youden, fold k's threshold is chosen on the rows of every other fold only.
    """
    if threshold != "youden":
        return {k: float(threshold) for k in pred.folds}
    if len(pred.folds) < 2:
        raise InputError(
            f"{pred.path}, column 'fold': --threshold youden picks each fold's threshold on the other "
            f"(training) folds, but this file has {'one fold' if pred.folds else 'no folds'}; "
            "use a fixed threshold such as 0.5")
    out = {}
    for k in pred.folds:
        train = pred.fold != k
        try:
            out[k] = youden_threshold(pred.label[train], pred.score[train])
        except ValueError:
            raise InputError(f"{pred.path}, column 'label': --threshold youden: the folds other "
                             f"than {k} do not have both malignant and benign lesions") from None
    return out


@dataclass
class Run:
    """One CSV's predictions and its metrics (a metrics.json body)."""

    name: str
    pred: Predictions
    metrics: dict


def analyse(name: str, pred: Predictions, threshold: float | str) -> Run:
    """All metrics of one run: DESIGN 3.3 plus "thresholds", "notes", "methods" and "input"."""
    notes: list[str] = []

    def block(where: str, y, s, p) -> dict:
        m, why = summarize(y, s, p)
        notes.extend(f"{where}: {n}" for n in why)
        return m

    if pred.n_unlabelled:
        notes.append(f"{pred.n_unlabelled} rows with an empty label (unknown) left out of every metric")
    per_fold = fold_thresholds(pred, threshold)
    cut = (np.array([per_fold[f] for f in pred.fold]) if per_fold
           else np.full(pred.score.size, float(threshold)))
    y_pred = pred.score >= cut
    y, s = pred.label, pred.score

    folds = {}
    for k in pred.folds:
        sel = pred.fold == k
        folds[str(k)] = block(f"lesion.folds.{k}", y[sel], s[sel], y_pred[sel])
    mean, std, why = fold_mean_std(list(folds.values()))
    if folds:
        notes.extend(f"lesion.mean/std: {n}" for n in why)
    else:
        notes.append("lesion.mean/std: no folds in the input (fold column empty), so only pooled")
    lesion = {"folds": folds, "mean": mean, "std": std, "pooled": block("lesion.pooled", y, s, y_pred)}

    patients, index = np.unique(pred.patient_id.astype(str), return_inverse=True)
    p_label = np.zeros(patients.size, dtype=int)
    p_score = np.zeros(patients.size)
    p_pred = np.zeros(patients.size, dtype=bool)
    np.maximum.at(p_label, index, y)
    np.maximum.at(p_score, index, s)
    # Any lesion over its fold's threshold; a patient lives in one fold, so this is the same as
    # its highest score against that threshold.
    np.logical_or.at(p_pred, index, y_pred)
    patient = {"pooled": block("patient.pooled", p_label, p_score, p_pred)}

    subgroups = {}
    for dim, names, contract, values in (
        ("burden", BURDEN_GROUPS, BURDEN_GROUPS, pred.burden),
        ("tumor_type", TUMOR_TYPES, CONTRACT_TUMOR_TYPES, pred.tumor_type),
    ):
        groups = {}
        for g in names:
            sel = values == g
            if g in contract or sel.any():
                groups[g] = block(f"subgroups.{dim}.{g}", y[sel], s[sel], y_pred[sel])
        c, why = chi_square({g: groups[g] for g in contract})
        notes.extend(f"subgroups.{dim}.chi2: {n}" for n in why)
        subgroups[dim] = {**groups, "chi2": c}
    unknown_tumor = int(np.sum(pred.tumor_type == ""))
    if unknown_tumor:
        notes.append(f"subgroups.tumor_type: {unknown_tumor} labelled lesions with an empty "
                     "tumor_type are in no tumour subgroup")

    metrics = {
        "threshold": threshold,
        "thresholds": {str(k): t for k, t in per_fold.items()},
        "lesion": lesion,
        "patient": patient,
        "subgroups": subgroups,
        "notes": notes,
        "methods": METHODS,
        "input": str(pred.path),
    }
    return Run(name=name, pred=pred, metrics=metrics)


def run_names(paths: list[Path]) -> list[str]:
    """Run names: CSV stems, else parent folder names when stems collide, else parent/stem."""
    for naming in (lambda p: p.stem, lambda p: p.parent.name, lambda p: f"{p.parent.name}/{p.stem}"):
        names = [naming(Path(p)) for p in paths]
        if len(set(names)) == len(names) and all(names):
            return names
    return [f"{Path(p).stem}#{i + 1}" for i, p in enumerate(paths)]


# --- tables -----------------------------------------------------------------------------------

RATE_TITLES = {"sensitivity": "Sensitivity (%)", "specificity": "Specificity (%)",
               "accuracy": "Accuracy (%)", "ppv": "PPV (%)", "npv": "NPV (%)"}
NA = "n/a"


def _pct(x: float | None) -> str:
    return NA if x is None else f"{100 * x:.2f}"


def _auc(x: float | None) -> str:
    return NA if x is None else f"{x:.3f}"


def _count(x: float | int | None) -> str:
    if x is None:
        return NA
    return str(x) if isinstance(x, int) else f"{x:.1f}"


def _p(p: float | None) -> str:
    if p is None:
        return NA
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _with_ci(m: dict, key: str) -> str:
    text = _auc(m[key]) if key == "auc" else _pct(m[key])
    ci = m["ci"][key]
    if ci is None or m[key] is None:
        return text
    lo, hi = ci
    return f"{text} ({_auc(lo)}–{_auc(hi)})" if key == "auc" else f"{text} ({_pct(lo)}–{_pct(hi)})"


def _metric_cells(m: dict) -> list[str]:
    return [_count(m["n"])] + [_pct(m[r]) for r in RATES] + [_auc(m["auc"])]


METRIC_HEADER = ["n"] + [RATE_TITLES[r] for r in RATES] + ["AUC"]


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    caption: str = ""

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
                 "|" + "|".join("---" for _ in self.header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.caption:
            lines += ["", self.caption]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                       for r in self.rows)
        caption = f"<p class='caption'>{html.escape(self.caption)}</p>" if self.caption else ""
        return (f"<h3>{html.escape(self.title)}</h3><table><thead><tr>{head}</tr></thead>"
                f"<tbody>{body}</tbody></table>{caption}")


def _threshold_text(run: Run) -> str:
    t = run.metrics["threshold"]
    if t == "youden":
        return ("threshold per fold: Youden-optimal on the other (training) folds: "
                + ", ".join(f"fold {k} {v:.4f}" for k, v in run.metrics["thresholds"].items()))
    return f"threshold {t:g} (malignant when score >= threshold)"


def fold_table(run: Run) -> Table:
    """The study's Table 2: lesion level per fold, mean, std, and pooled."""
    lesion = run.metrics["lesion"]
    youden = run.metrics["threshold"] == "youden"
    header = ["Fold"] + METRIC_HEADER + (["Threshold"] if youden else [])
    rows = []
    for k, m in lesion["folds"].items():
        rows.append([k] + _metric_cells(m) + ([f"{run.metrics['thresholds'][k]:.4f}"] if youden else []))
    for label, key in (("Mean", "mean"), ("Std", "std"), ("Pooled", "pooled")):
        rows.append([label] + _metric_cells(lesion[key]) + ([""] if youden else []))
    return Table(f"Lesion level by fold — {run.name}", header, rows,
                 "Mean and Std: over folds (sample std); n in those rows is the mean/std of fold "
                 f"sizes. Pooled: all folds together. {_threshold_text(run)}.")


def pooled_table(run: Run) -> Table:
    """Pooled lesion and patient level with counts and 95 % CIs."""
    les, pat = run.metrics["lesion"]["pooled"], run.metrics["patient"]["pooled"]
    rows = [[k.upper() if k != "n" else "n", str(les[k]), str(pat[k])] for k in ("n", "tp", "fp", "tn", "fn")]
    rows += [[RATE_TITLES[r], _with_ci(les, r), _with_ci(pat, r)] for r in RATES]
    rows.append(["AUC", _with_ci(les, "auc"), _with_ci(pat, "auc")])
    return Table(f"Pooled, with 95 % confidence intervals — {run.name}",
                 ["", "Lesion level", "Patient level"], rows,
                 "Wilson score intervals for rates, DeLong for the AUC. A patient is malignant if any "
                 "lesion is; its score is its highest lesion score.")


SUBGROUP_TITLES = {"burden": "Lesion burden (lesions per study: few 1–3, medium 4–6, extensive > 6)",
                   "tumor_type": "Primary tumour"}


def subgroup_table(run: Run, dim: str) -> Table:
    """The study's Tables 4 (burden) and 5 (tumour type): subgroups, then chi-square and p."""
    sub = run.metrics["subgroups"][dim]
    rows = [[g] + _metric_cells(m) for g, m in sub.items() if g != "chi2"]
    c = sub["chi2"]
    rows.append(["χ² (df)", ""] + [NA if c[r]["chi2"] is None else f"{c[r]['chi2']:.3f} ({c[r]['df']})"
                                   for r in RATES] + [""])
    rows.append(["p", ""] + [_p(c[r]["p"]) for r in RATES] + [""])
    caption = "Pearson chi-square without continuity correction across the subgroups."
    if dim == "tumor_type" and "other" in sub:
        caption += " 'other' is shown but not part of the chi-square (lung, prostate, breast)."
    return Table(f"{SUBGROUP_TITLES[dim]} — {run.name}", ["Subgroup"] + METRIC_HEADER, rows, caption)


def runs_table(runs: list[Run]) -> Table:
    """The study's Table 3: runs (architectures) side by side, on the fold mean when there are folds."""
    rows = []
    for run in runs:
        lesion = run.metrics["lesion"]
        basis = f"mean of {len(lesion['folds'])} folds" if lesion["folds"] else "pooled"
        m = lesion["mean"] if lesion["folds"] else lesion["pooled"]
        rows.append([run.name, basis] + _metric_cells(m))
    return Table("Runs side by side (lesion level)", ["Run", "Basis"] + METRIC_HEADER, rows,
                 "Fold means, as the study reports them, where the input has folds.")


def run_tables(run: Run) -> list[Table]:
    tables = [fold_table(run)] if run.metrics["lesion"]["folds"] else []
    return tables + [pooled_table(run), subgroup_table(run, "burden"), subgroup_table(run, "tumor_type")]


# --- plots ------------------------------------------------------------------------------------


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def _roc_figure(title: str, curves: list[tuple[str, np.ndarray, np.ndarray]]) -> Figure:
    fig = Figure(figsize=(5.5, 5), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    for name, y, s in curves:
        if y.size and 0 < y.sum() < y.size:
            fpr, tpr, _ = roc_curve(y, s)
            auc = float(np.trapezoid(tpr, fpr))
            ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {auc:.3f}, n={y.size})")
        else:
            # Keeps the subgroup visible in the legend, saying why it has no curve.
            why = "no lesions" if not y.size else "one class only"
            ax.plot([], [], " ", label=f"{name}: AUC n/a ({why}, n={y.size})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 − specificity", ylabel="Sensitivity", title=title)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def _confusion_figure(run: Run) -> Figure:
    fig = Figure(figsize=(8, 3.8), dpi=100, layout="constrained")
    for ax, level in zip(fig.subplots(1, 2), ("lesion", "patient")):
        m = run.metrics[level]["pooled"]
        cells = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
        ax.imshow(cells, cmap="Blues", vmin=0, vmax=max(1, cells.max()))
        for (i, j), v in np.ndenumerate(cells):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=13,
                    color="white" if v > cells.max() / 2 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["benign", "malignant"],
               yticklabels=["benign", "malignant"], xlabel="Predicted", ylabel="True",
               title=f"{level.capitalize()} level (pooled, n={m['n']})")
    fig.suptitle(f"Confusion matrices — {run.name}")
    return fig


def _calibration_figure(run: Run) -> Figure:
    y, s = run.pred.label, run.pred.score
    fig = Figure(figsize=(5.5, 6), dpi=100, layout="constrained")
    ax, hist = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
    frac, mean_score = calibration_curve(y, s, n_bins=10, strategy="uniform", pos_label=1)
    ax.plot(mean_score, frac, "o-", label=f"lesions, pooled (n={y.size})")
    ax.set(ylim=(0, 1.01), ylabel="Fraction malignant", title=f"Calibration — {run.name}")
    ax.legend(loc="upper left", fontsize=8)
    bins = np.linspace(0, 1, 21)
    hist.hist([s[y == 0], s[y == 1]], bins=bins, label=["benign", "malignant"], stacked=True)
    hist.set(xlim=(0, 1), xlabel="Score (predicted probability of malignant)", ylabel="Lesions")
    hist.legend(fontsize=8)
    return fig


def run_figures(run: Run) -> dict[str, Figure]:
    """Plot name -> figure for one run."""
    pred = run.pred
    figs = {}
    if pred.folds:
        figs["roc_folds"] = _roc_figure(
            f"ROC per fold — {run.name}",
            [(f"fold {k}", pred.label[pred.fold == k], pred.score[pred.fold == k]) for k in pred.folds])
    for dim, values in (("burden", pred.burden), ("tumor_type", pred.tumor_type)):
        groups = [g for g in run.metrics["subgroups"][dim] if g != "chi2"]
        figs[f"roc_{dim}"] = _roc_figure(
            f"ROC per {'lesion burden' if dim == 'burden' else 'primary tumour'} — {run.name}",
            [(g, pred.label[values == g], pred.score[values == g]) for g in groups])
    figs["confusion"] = _confusion_figure(run)
    figs["calibration"] = _calibration_figure(run)
    return figs


# --- output -----------------------------------------------------------------------------------

_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #bbb;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#eee}.caption{font-size:.9em;color:#555}
img{max-width:100%;margin:.5em .5em 0 0;vertical-align:top}li{font-size:.9em}"""


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def run_report(predictions: list[Path], out: Path, threshold: str = "0.5") -> int:
    """Write DIR/metrics.json, DIR/tables.md, the PNGs and DIR/report.html; print a headline."""
    spec = parse_threshold(threshold)
    paths = [Path(p) for p in predictions]
    # Every input is read and checked before anything is written, so a bad file leaves no half report.
    preds = [read_predictions(p) for p in paths]
    runs = [analyse(name, pred, spec) for name, pred in zip(run_names(paths), preds)]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)

    doc = {**runs[0].metrics, "run": runs[0].name}
    if len(runs) > 1:
        doc["runs"] = {r.name: r.metrics for r in runs}
    _write_atomic(out / "metrics.json", (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode())

    several = len(runs) > 1
    md = ["# Evaluation report", ""]
    body = ["<h1>Evaluation report</h1>"]
    if several:
        table = runs_table(runs)
        md.append(table.markdown())
        fig = _roc_figure("ROC per run (lesion level, pooled)",
                          [(r.name, r.pred.label, r.pred.score) for r in runs])
        png = _png(fig)
        (out / "roc_runs.png").write_bytes(png)
        body += [table.html(), _img(png, "ROC per run")]
    for run in runs:
        prefix = re.sub(r"[^A-Za-z0-9._-]+", "_", run.name) + "_" if several else ""
        tables = run_tables(run)
        md.append(f"## {run.name}\n\n{run.pred.path}; {_threshold_text(run)}\n")
        md += [t.markdown() for t in tables]
        body.append(f"<h2>{html.escape(run.name)}</h2><p>{html.escape(str(run.pred.path))}; "
                    f"{html.escape(_threshold_text(run))}</p>")
        body += [t.html() for t in tables]
        for name, fig in run_figures(run).items():
            png = _png(fig)
            (out / f"{prefix}{name}.png").write_bytes(png)
            body.append(_img(png, f"{name} — {run.name}"))
        notes = run.metrics["notes"]
        if notes:
            md.append("Notes:\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
            body.append("<h3>Notes</h3><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes)
                        + "</ul>")
    (out / "tables.md").write_text("\n".join(md), encoding="utf-8")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>wbs-dist evaluation report</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>\n")
    _write_atomic(out / "report.html", page.encode("utf-8"))

    for run in runs:
        m = run.metrics["lesion"]["pooled"]
        print(f"{run.name}: lesion level (pooled, n={m['n']}): accuracy {_pct(m['accuracy'])} %, "
              f"sensitivity {_pct(m['sensitivity'])} %, specificity {_pct(m['specificity'])} %, "
              f"AUC {_auc(m['auc'])}")
    print(f"report: {out / 'report.html'}")
    return 0

