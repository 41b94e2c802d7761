"""The report's figures (ROC curves, confusion matrices, calibration) and their PNG rendering.

Figures are built with matplotlib's object API on the Agg canvas: no pyplot, so no global figure
state and no display backend, whatever MPLBACKEND says.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_curve

from wbs_dist.evaluate.analysis import Run
from wbs_dist.schema import BENIGN, LABEL_CODES, MALIGNANT

# Class names in label-code order (0 benign, 1 malignant): the confusion matrix's rows and columns.
CLASS_NAMES = sorted(LABEL_CODES, key=LABEL_CODES.__getitem__)


def png(fig: Figure) -> bytes:
    """The figure rendered as PNG bytes."""
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def roc_figure(title: str, curves: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> Figure:
    """One ROC curve per (name, labels, scores); a curve without both classes is named, not drawn."""
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


def runs_roc_figure(runs: Sequence[Run]) -> Figure:
    """Runs side by side: each run's pooled lesion-level ROC curve."""
    return roc_figure("ROC per run (lesion level, pooled)",
                      [(r.name, r.pred.label, r.pred.score) for r in runs])


def _confusion_figure(run: Run) -> Figure:
    fig = Figure(figsize=(8, 3.8), dpi=100, layout="constrained")
    for ax, level in zip(fig.subplots(1, 2), ("lesion", "patient")):
        m = run.metrics[level]["pooled"]
        cells = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
        ax.imshow(cells, cmap="Blues", vmin=0, vmax=max(1, cells.max()))
        for (i, j), v in np.ndenumerate(cells):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=13,
                    color="white" if v > cells.max() / 2 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=CLASS_NAMES,
               yticklabels=CLASS_NAMES, xlabel="Predicted", ylabel="True",
               title=f"{level.capitalize()} level (pooled, n={m['n']})")
    fig.suptitle(f"Confusion matrices — {run.name}")
    return fig


def _calibration_figure(run: Run) -> Figure:
    y, s = run.pred.label, run.pred.score
    fig = Figure(figsize=(5.5, 6), dpi=100, layout="constrained")
    ax, hist = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
    frac, mean_score = calibration_curve(y, s, n_bins=10, strategy="uniform",
                                         pos_label=LABEL_CODES[MALIGNANT])
    ax.plot(mean_score, frac, "o-", label=f"lesions, pooled (n={y.size})")
    ax.set(ylim=(0, 1.01), ylabel="Fraction malignant", title=f"Calibration — {run.name}")
    ax.legend(loc="upper left", fontsize=8)
    bins = np.linspace(0, 1, 21)
    hist.hist([s[y == LABEL_CODES[BENIGN]], s[y == LABEL_CODES[MALIGNANT]]], bins=bins,
              label=[BENIGN, MALIGNANT], stacked=True)
    hist.set(xlim=(0, 1), xlabel="Score (predicted probability of malignant)", ylabel="Lesions")
    hist.legend(fontsize=8)
    return fig


def run_figures(run: Run) -> dict[str, Figure]:
    """Plot name -> figure for one run."""
    pred = run.pred
    figs = {}
    if pred.folds:
        figs["roc_folds"] = roc_figure(
            f"ROC per fold — {run.name}",
            [(f"fold {k}", pred.label[pred.fold == k], pred.score[pred.fold == k]) for k in pred.folds])
    for dim, values in (("burden", pred.burden), ("tumor_type", pred.tumor_type)):
        groups = [g for g in run.metrics["subgroups"][dim] if g != "chi2"]
        figs[f"roc_{dim}"] = roc_figure(
            f"ROC per {'lesion burden' if dim == 'burden' else 'primary tumour'} — {run.name}",
            [(g, pred.label[values == g], pred.score[values == g]) for g in groups])
    figs["confusion"] = _confusion_figure(run)
    figs["calibration"] = _calibration_figure(run)
    return figs
