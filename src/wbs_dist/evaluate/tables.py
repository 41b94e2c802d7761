"""The study's tables from a run's metrics, each as Markdown and as HTML.

Per fold with mean and standard deviation (the study's Table 2), pooled with confidence intervals,
runs side by side (Table 3), subgroups by lesion burden and by primary tumour with chi-square
(Tables 4 and 5).
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass

from wbs_dist.evaluate.analysis import YOUDEN, Run
from wbs_dist.evaluate.metrics import RATES
from wbs_dist.schema import BURDEN_TEXT, OTHER, STUDY_TUMOR_TYPES

RATE_TITLES = {"sensitivity": "Sensitivity (%)", "specificity": "Specificity (%)",
               "accuracy": "Accuracy (%)", "ppv": "PPV (%)", "npv": "NPV (%)"}
NA = "n/a"


def pct(x: float | None) -> str:
    """A rate as a percentage with two decimals."""
    return NA if x is None else f"{100 * x:.2f}"


def auc_text(x: float | None) -> str:
    return NA if x is None else f"{x:.3f}"


def _count(x: float | int | None) -> str:
    if x is None:
        return NA
    return str(x) if isinstance(x, int) else f"{x:.1f}"


def _p(p: float | None) -> str:
    if p is None:
        return NA
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _with_ci(m: dict, key: str, interval: str = "ci") -> str:
    text = auc_text(m[key]) if key == "auc" else pct(m[key])
    ci = m[interval][key]
    if ci is None or m[key] is None:
        return text
    lo, hi = ci
    return f"{text} ({auc_text(lo)}–{auc_text(hi)})" if key == "auc" else f"{text} ({pct(lo)}–{pct(hi)})"


def _metric_cells(m: dict) -> list[str]:
    return [_count(m["n"])] + [pct(m[r]) for r in RATES] + [auc_text(m["auc"])]


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


def threshold_text(run: Run) -> str:
    """The run's threshold in words, as the tables and the report state it."""
    t = run.metrics["threshold"]
    if t == YOUDEN:
        return ("threshold per fold: Youden-optimal on the other (training) folds: "
                + ", ".join(f"fold {k} {v:.4f}" for k, v in run.metrics["thresholds"].items()))
    return f"threshold {t:g} (malignant when score >= threshold)"


def fold_table(run: Run) -> Table:
    """The study's Table 2: lesion level per fold, mean, std, and pooled."""
    lesion = run.metrics["lesion"]
    youden = run.metrics["threshold"] == YOUDEN
    header = ["Fold"] + METRIC_HEADER + (["Threshold"] if youden else [])
    rows = []
    for k, m in lesion["folds"].items():
        rows.append([k] + _metric_cells(m) + ([f"{run.metrics['thresholds'][k]:.4f}"] if youden else []))
    for label, key in (("Mean", "mean"), ("Std", "std"), ("Pooled", "pooled")):
        rows.append([label] + _metric_cells(lesion[key]) + ([""] if youden else []))
    return Table(f"Lesion level by fold — {run.name}", header, rows,
                 "Mean and Std: over folds (sample std); n in those rows is the mean/std of fold "
                 f"sizes. Pooled: all folds together. {threshold_text(run)}.")


def pooled_table(run: Run) -> Table:
    """Pooled lesion and patient level with counts and 95 % CIs."""
    les, pat = run.metrics["lesion"]["pooled"], run.metrics["patient"]["pooled"]
    boot = "ci_patient_bootstrap" in les
    rows = [[k.upper() if k != "n" else "n", str(les[k])] + ([""] if boot else []) + [str(pat[k])]
            for k in ("n", "tp", "fp", "tn", "fn")]
    for key, title in [(r, RATE_TITLES[r]) for r in RATES] + [("auc", "AUC")]:
        bootstrapped = [_with_ci(les, key, "ci_patient_bootstrap")] if boot else []
        rows.append([title, _with_ci(les, key)] + bootstrapped + [_with_ci(pat, key)])
    header = ["", "Lesion level (Wilson / DeLong)"] + (["Lesion level (patient bootstrap)"] if boot else [])
    caption = ("Lesion level (Wilson / DeLong): Wilson score intervals for rates, DeLong for the AUC, as the "
               "study reports them; they assume independent lesions, which lesions of one patient are not, "
               "so they are too narrow. ")
    if boot:
        b = run.metrics["bootstrap"]
        caption += (f"Lesion level (patient bootstrap): 95 % percentile intervals over {b['replicates']} "
                    f"replicates that resample patients with all their lesions (seed {b['seed']}); quote "
                    "these for lesion-level claims. ")
    caption += ("Patient level: Wilson / DeLong, patients are independent. A patient is malignant if any "
                "lesion is; its score is its highest lesion score.")
    return Table(f"Pooled, with 95 % confidence intervals — {run.name}", header + ["Patient level"], rows,
                 caption)


# The burden definition as schema writes it, with typographic dashes for the ranges ("1–3").
_BURDEN_TITLE = re.sub(r"(?<=\d)-(?=\d)", "–", BURDEN_TEXT)
SUBGROUP_TITLES = {"burden": f"Lesion burden ({_BURDEN_TITLE})", "tumor_type": "Primary tumour"}


def subgroup_table(run: Run, dim: str) -> Table:
    """The study's Tables 4 (burden) and 5 (tumour type): subgroups, then chi-square and p."""
    sub = run.metrics["subgroups"][dim]
    rows = [[g] + _metric_cells(m) for g, m in sub.items() if g != "chi2"]
    c = sub["chi2"]
    rows.append(["χ² (df)", ""] + [NA if c[r]["chi2"] is None else f"{c[r]['chi2']:.3f} ({c[r]['df']})"
                                   for r in RATES] + [""])
    rows.append(["p", ""] + [_p(c[r]["p"]) for r in RATES] + [""])
    rows.append(["p (patients)", ""] + [_p(c[r]["cluster"]["p"]) if "cluster" in c[r] else NA
                                        for r in RATES] + [""])
    permuted = c[RATES[0]].get("cluster", {}).get("method") == "rao_scott_permutation"
    caption = ("χ² and p: Pearson chi-square without continuity correction across the subgroups, as the "
               "study reports it; it assumes independent lesions and rejects too often when lesions "
               "cluster within patients. p (patients): Rao–Scott adjusted chi-square with patients as "
               "clusters, its p " + ("by permuting the patients' subgroup labels" if permuted
                                     else "from the chi-square distribution (no permutations)")
               + "; quote this one.")
    if dim == "tumor_type" and OTHER in sub:
        caption += (f" '{OTHER}' is shown but not part of the chi-square "
                    f"({', '.join(STUDY_TUMOR_TYPES)}).")
    return Table(f"{SUBGROUP_TITLES[dim]} — {run.name}", ["Subgroup"] + METRIC_HEADER, rows, caption)


def runs_table(runs: Sequence[Run]) -> Table:
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
    """One run's tables in report order: by fold (when it has folds), pooled, burden, tumour type."""
    tables = [fold_table(run)] if run.metrics["lesion"]["folds"] else []
    return tables + [pooled_table(run), subgroup_table(run, "burden"), subgroup_table(run, "tumor_type")]
