"""`wbs-dist report`: predictions CSVs (DESIGN 3.3) -> metrics.json, Markdown tables, PNG plots and
one self-contained HTML report, in the shape of the study's tables.

Each CSV is one run (an architecture, a config): read and checked in predictions.py, its statistics in
analysis.py, its tables in tables.py and its figures in plots.py; this module writes the folder.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from wbs_dist import atomic
from wbs_dist.errors import UsageError
from wbs_dist.evaluate.analysis import YOUDEN, Run, analyse, run_names
from wbs_dist.evaluate.clustered import DEFAULT_B, DEFAULT_SEED
from wbs_dist.evaluate.plots import png, run_figures, runs_roc_figure
from wbs_dist.evaluate.predictions import read_predictions
from wbs_dist.evaluate.tables import auc_text, pct, run_tables, runs_table, threshold_text

_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #bbb;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#eee}.caption{font-size:.9em;color:#555}
img{max-width:100%;margin:.5em .5em 0 0;vertical-align:top}li{font-size:.9em}"""


def _img(png_bytes: bytes, alt: str) -> str:
    return (f"<img alt='{html.escape(alt)}' "
            f"src='data:image/png;base64,{base64.b64encode(png_bytes).decode()}'>")


def _check_threshold(threshold: float | str) -> float | str:
    # Already parsed (analysis.parse_threshold); a string such as "0.5" here would reach
    # metrics.json as a string, so it is refused rather than converted.
    if threshold == YOUDEN:
        return threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold: expected a number in [0, 1] or {YOUDEN!r}, got {threshold!r}")
    return float(threshold)


class Rendered(NamedTuple):
    """The report folder's contents, before any of it is written."""

    metrics: dict  # metrics.json
    pngs: dict[str, bytes]  # file name -> PNG
    markdown: str  # tables.md
    page: str  # report.html


def _render(runs: Sequence[Run]) -> Rendered:
    several = len(runs) > 1
    doc = {**runs[0].metrics, "run": runs[0].name}
    if several:
        doc["runs"] = {r.name: r.metrics for r in runs}
    pngs: dict[str, bytes] = {}
    md = ["# Evaluation report", ""]
    body = ["<h1>Evaluation report</h1>"]
    if several:
        table = runs_table(runs)
        md.append(table.markdown())
        pngs["roc_runs.png"] = png(runs_roc_figure(runs))
        body += [table.html(), _img(pngs["roc_runs.png"], "ROC per run")]
    for run in runs:
        prefix = re.sub(r"[^A-Za-z0-9._-]+", "_", run.name) + "_" if several else ""
        tables = run_tables(run)
        md.append(f"## {run.name}\n\n{run.pred.path}; {threshold_text(run)}\n")
        md += [t.markdown() for t in tables]
        body.append(f"<h2>{html.escape(run.name)}</h2><p>{html.escape(str(run.pred.path))}; "
                    f"{html.escape(threshold_text(run))}</p>")
        body += [t.html() for t in tables]
        prov = run.metrics.get("provenance")
        if prov:
            md.append(f"Provenance: {prov['text']}\n")
            body.append(f"<h3>Provenance</h3><p>{html.escape(prov['text'])}</p>")
            if prov.get("outer_folds"):
                cols = list(prov["outer_folds"][0])
                md.append("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n" + "".join(
                    "| " + " | ".join(str(r[c]) for c in cols) + " |\n" for r in prov["outer_folds"]))
                body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>" + "".join(
                    "<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in cols) + "</tr>"
                    for r in prov["outer_folds"]) + "</table>")
        for name, fig in run_figures(run).items():
            data = pngs[f"{prefix}{name}.png"] = png(fig)
            body.append(_img(data, f"{name} — {run.name}"))
        methods = run.metrics["methods"]
        md.append("Methods:\n\n" + "\n".join(f"- {k}: {v}" for k, v in methods.items()) + "\n")
        body.append("<h3>Methods</h3><ul>" + "".join(
            f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in methods.items()) + "</ul>")
        notes = run.metrics["notes"]
        if notes:
            md.append("Notes:\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
            body.append("<h3>Notes</h3><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes)
                        + "</ul>")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>wbs-dist evaluation report</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>\n")
    return Rendered(doc, pngs, "\n".join(md), page)


def write_report(predictions: Sequence[Path], out: Path, threshold: float | str = 0.5,
                 bootstrap: int = DEFAULT_B, seed: int = DEFAULT_SEED, provenance: dict | None = None) -> list[Run]:
    """Write OUT/metrics.json, OUT/tables.md, the PNGs and OUT/report.html; return the runs.

    `threshold`: a number in [0, 1] or "youden", already parsed (analysis.parse_threshold).
    `bootstrap`: patient-bootstrap replicates and cluster-test permutations (0 = off), `seed` theirs.
    A bad input is an InputError, an `out` that is not a folder a UsageError; either leaves `out`
    untouched. `provenance`: how the hyperparameters were chosen ({"text": ..., optionally
    "outer_folds": rows}), written into metrics.json and shown above the figures.
    """
    spec = _check_threshold(threshold)
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"bootstrap: expected a number of replicates >= 0, got {bootstrap!r}")
    paths = [Path(p) for p in predictions]
    if not paths:
        raise ValueError("write_report: no predictions files")
    # Every input is read and checked before anything is written, so a bad file leaves no half report.
    preds = [read_predictions(p) for p in paths]
    runs = [analyse(name, pred, spec, bootstrap, seed) for name, pred in zip(run_names(paths), preds)]
    for run in runs:
        if provenance:
            run.metrics["provenance"] = provenance
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    # Likewise every file is rendered before the first is written: a failure in the tables or the
    # plots leaves a previous report whole, not new metrics beside old pages.
    rendered = _render(runs)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "metrics.json", rendered.metrics, indent=2)
    for name, data in rendered.pngs.items():
        atomic.write_bytes(out / name, data)
    atomic.write_text(out / "tables.md", rendered.markdown)
    atomic.write_text(out / "report.html", rendered.page)
    return runs


def headline(run: Run) -> str:
    """One line for the terminal: the run's pooled lesion-level accuracy, sensitivity, specificity, AUC."""
    m = run.metrics["lesion"]["pooled"]
    return (f"{run.name}: lesion level (pooled, n={m['n']}): accuracy {pct(m['accuracy'])} %, "
            f"sensitivity {pct(m['sensitivity'])} %, specificity {pct(m['specificity'])} %, "
            f"AUC {auc_text(m['auc'])}")
