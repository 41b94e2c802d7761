"""The detection report of a cross-validated detector run: RUN_DIR/report/ with metrics.json's
`detection` block, the FROC curve (froc.png) and report.html.

Per fold (from each fold's detection.json, train/tasks.py): the operating threshold chosen on that
fold's training folds, and the validation fold's lesion sensitivity and false positives per study at
it. Pooled: the folds' validation counts summed, at each fold's own threshold (`pooled`), and at
every threshold of the grid (`froc`, the pooled FROC curve). Nothing here is chosen on the studies it
grades: the thresholds came from the training folds.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

from wbs_dist import atomic
from wbs_dist.errors import InputError

FOLD_KEYS = ("threshold", "sensitivity", "fp_per_study", "found", "lesions", "false", "copies", "studies")
METHOD = ("a lesion is found when a component of the thresholded probability map (8-connected) overlaps it with "
          "overlap coefficient > 0.3 and is at most 10 times its area; a component on a lesion's appearance on the "
          "other view (the mirrored place: lesions are delineated on one view) is counted as a copy, neither found "
          "nor false; any other component is a false positive; each fold's threshold is the highest reaching the "
          "target sensitivity on its training folds (detection.py)")


def pooled_point(threshold: float | None, points: Sequence[dict]) -> dict:
    """Points of disjoint sets of studies (the folds) as one: their counts summed."""
    found, lesions, false, copies, studies = (sum(p[k] for p in points)
                                              for k in ("found", "lesions", "false", "copies", "studies"))
    return {"threshold": threshold, "sensitivity": found / lesions if lesions else None,
            "fp_per_study": false / studies if studies else None, "found": found, "lesions": lesions,
            "false": false, "copies": copies, "studies": studies}


def detection_summary(folds: dict[int, dict], classical: dict | None = None) -> dict:
    """metrics.json's `detection` block from the folds' detection.json contents, with the classical
    hot-spot finder's point on the same studies when given (`classical`, a detection.point)."""
    _same_setting(folds)
    per_fold = {str(k): {**{key: d["at_threshold"][key] for key in FOLD_KEYS}, "threshold_note": d["threshold_note"]}
                for k, d in sorted(folds.items())}
    pooled = pooled_point(None, [d["at_threshold"] for d in folds.values()])
    del pooled["threshold"]                       # each fold at its own
    grid = [p["threshold"] for p in next(iter(folds.values()))["froc"]]
    froc = [pooled_point(t, [next(p for p in d["froc"] if p["threshold"] == t) for d in folds.values()])
            for t in grid]
    return {"folds": per_fold, "pooled": pooled, "froc": froc, "classical": classical,
            "target_sensitivity": next(iter(folds.values()))["target_sensitivity"], "method": METHOD}


def _same_setting(folds: dict[int, dict]) -> None:
    """Folds pool only when they share one FROC threshold grid and one target: a hand-assembled run
    (folds trained under different settings) is refused, naming the folds that differ."""
    def setting(d: dict) -> tuple:
        return tuple(p["threshold"] for p in d["froc"]), d["target_sensitivity"]

    first = min(folds)
    for k, d in sorted(folds.items()):
        if setting(d) != setting(folds[first]):
            def text(f: int) -> str:
                grid, target = setting(folds[f])
                span = f"{grid[0]:g}..{grid[-1]:g}" if grid else "none"
                return f"fold {f}: {len(grid)} thresholds {span}, target {target:g}"
            raise InputError(f"the folds' detection.json files do not pool: {text(first)}; {text(k)}. They were "
                             "trained under different detection settings; retrain the folds that differ")


def froc_figure(summary: dict):
    """Pooled FROC (sensitivity against false positives per study), the folds' operating points, and
    the classical hot-spot finder's point on the same studies."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.2))
    ax = fig.add_subplot()
    pts = [p for p in summary["froc"] if p["sensitivity"] is not None]
    ax.plot([p["fp_per_study"] for p in pts], [p["sensitivity"] for p in pts], "-o", ms=3, label="learned (pooled)")
    for k, f in summary["folds"].items():
        ax.plot(f["fp_per_study"], f["sensitivity"], "s", ms=6, label=f"fold {k} at its threshold {f['threshold']:g}")
    c = summary.get("classical")
    if c and c["sensitivity"] is not None:
        ax.plot(c["fp_per_study"], c["sensitivity"], "*", ms=12, label="hot-spot finder (classical)")
    ax.axhline(summary["target_sensitivity"], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("false positives per study")
    ax.set_ylabel("lesion sensitivity")
    ax.set_ylim(0, 1.02)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=0)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("FROC, validation folds")
    fig.tight_layout()
    return fig


def write_detection_report(folds: dict[int, dict], out: Path, classical: dict | None = None) -> dict:
    """OUT/metrics.json ({"detection": ...}), OUT/froc.png and OUT/report.html; the block."""
    from wbs_dist.evaluate.plots import png

    summary = detection_summary(folds, classical)
    image = png(froc_figure(summary))
    p = summary["pooled"]
    rows = "".join(f"<tr><td>{k}</td><td>{f['threshold']:g}</td><td>{100 * f['sensitivity']:.1f} %</td>"
                   f"<td>{f['fp_per_study']:.2f}</td><td>{f['found']}/{f['lesions']}</td><td>{f['studies']}</td></tr>"
                   for k, f in summary["folds"].items())
    import base64

    c = summary["classical"]
    finder = (f"<p>The classical hot-spot finder on the same studies at the same level: sensitivity "
              f"{100 * c['sensitivity']:.1f} % ({c['found']}/{c['lesions']}), {c['fp_per_study']:.2f} false positives "
              "per study.</p>" if c and c["sensitivity"] is not None else "")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>wbs-dist detection report</title></head><body>"
            "<h1>Detection report</h1>"
            f"<p>Pooled over the validation folds at each fold's threshold: sensitivity "
            f"{100 * p['sensitivity']:.1f} % ({p['found']}/{p['lesions']} lesions), {p['fp_per_study']:.2f} false "
            f"positives per study ({p['studies']} studies; {p['copies']} components on a lesion's other-view "
            f"appearance, not counted as false).</p>{finder}"
            "<table><tr><th>fold</th><th>threshold</th><th>sensitivity</th><th>FP/study</th><th>found</th>"
            f"<th>studies</th></tr>{rows}</table>"
            f"<img alt='FROC' src='data:image/png;base64,{base64.b64encode(image).decode()}'>"
            f"<h3>Method</h3><p>{html.escape(summary['method'])}</p></body></html>\n")
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "metrics.json", {"detection": summary}, indent=2)
    atomic.write_bytes(out / "froc.png", image)
    atomic.write_text(out / "report.html", page)
    return summary
