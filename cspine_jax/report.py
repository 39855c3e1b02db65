"""Evaluation pictures: ROC curves, reliability (calibration) and vertebra level confusion.

Arrays are (n_studies, 8) in column order `[patient_overall, C1..C7]`, as in `metrics`.
Each picture is a `matplotlib.figure.Figure` built without pyplot, so making reports in a
training loop or a server leaves no global figure state behind; `write_report` saves them as
PNG and, given a tensorboardX writer, logs them as images.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure
from sklearn import calibration
from sklearn import metrics as skm

from cspine_jax.data.rsna import LABEL_COLUMNS, VERTEBRAE
from cspine_jax.visualize import VERTEBRA_COLOURS

LEVEL_NAMES = ("bg", *VERTEBRAE)  # segmentation labels 0..7
# patient_overall in black, each vertebra in its overlay colour: one palette for every picture.
_LABEL_COLOURS = ((0.0, 0.0, 0.0), *(tuple(c) for c in VERTEBRA_COLOURS[1:]))
_DPI = 120


def _binary(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true, probs = np.asarray(y_true) > 0.5, np.asarray(probs, np.float64)
    if y_true.shape != probs.shape or y_true.ndim != 2 or y_true.shape[1] != len(LABEL_COLUMNS):
        raise ValueError(f"expected two (n, 8) arrays, got {y_true.shape} and {probs.shape}")
    return y_true, probs


def roc_figure(y_true: np.ndarray, probs: np.ndarray) -> Figure:
    """ROC curve of each label with its AUC in the legend.

    A label with one class only among these studies has no ROC: it is listed in the legend
    as such, without a curve.
    """
    y_true, probs = _binary(y_true, probs)
    fig = Figure(figsize=(6.4, 6.0), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls=":", color="0.6", lw=1, label="chance")
    for j, name in enumerate(LABEL_COLUMNS):
        y, p = y_true[:, j], probs[:, j]
        positives = int(y.sum())
        if 0 < positives < len(y):
            fpr, tpr, _ = skm.roc_curve(y, p)
            label = f"{name}  AUC {skm.auc(fpr, tpr):.3f}  ({positives}+/{len(y) - positives}-)"
            ax.plot(
                fpr,
                tpr,
                color=_LABEL_COLOURS[j],
                lw=2.4 if j == 0 else 1.4,
                drawstyle="steps-post",
                label=label,
            )
        else:
            only = "positives" if positives else "negatives"
            ax.plot([], [], color=_LABEL_COLOURS[j], ls="--", label=f"{name}  n/a (only {only})")
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        aspect="equal",
        xlabel="1 - specificity (false positive rate)",
        ylabel="sensitivity (true positive rate)",
        title=f"ROC per label, {len(y_true)} studies",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def reliability_figure(y_true: np.ndarray, probs: np.ndarray, bins: int = 10) -> Figure:
    """Calibration: observed fracture frequency against predicted probability.

    Two groups: patient_overall (one prediction per study) and the seven vertebrae pooled
    (seven per study). Uniform bins on [0, 1]; empty bins are left out. Below, how many
    predictions fall in each bin (log scale), so a point backed by two studies reads as such.
    """
    y_true, probs = _binary(y_true, probs)
    groups = {
        "patient_overall": (y_true[:, 0], probs[:, 0], _LABEL_COLOURS[0]),
        "vertebrae C1-C7 pooled": (y_true[:, 1:].ravel(), probs[:, 1:].ravel(), "tab:red"),
    }
    fig = Figure(figsize=(6.4, 7.0), layout="constrained")
    ax, hist = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    ax.plot([0, 1], [0, 1], ls=":", color="0.6", lw=1, label="perfectly calibrated")
    edges = np.linspace(0.0, 1.0, bins + 1)
    for name, (y, p, colour) in groups.items():
        observed, predicted = calibration.calibration_curve(y, p, n_bins=bins, pos_label=True)
        brier = skm.brier_score_loss(y, p, pos_label=True)
        ax.plot(predicted, observed, "o-", color=colour, label=f"{name}  (Brier {brier:.3f})")
        hist.hist(p, bins=edges, color=colour, histtype="step", lw=1.6, label=name)
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        ylabel="observed fracture frequency",
        title=f"Reliability, {len(y_true)} studies, {bins} bins",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    hist.set(yscale="log", xlabel="predicted probability", ylabel="predictions")
    hist.grid(alpha=0.3)
    return fig


def confusion_figure(confusion: np.ndarray) -> Figure:
    """Vertebra level confusion, rows (true labels) normalised to 1, cells annotated in %.

    confusion: (8, 8) counts, rows = true label, columns = predicted (bg, C1..C7), as from
    `metrics.label_confusion`. Rows without any voxel stay blank.
    """
    confusion = np.asarray(confusion, np.float64)
    if confusion.shape != (len(LEVEL_NAMES),) * 2:
        raise ValueError(f"expected an (8, 8) confusion, got {confusion.shape}")
    totals = confusion.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(totals > 0, confusion / totals, np.nan)
    fig = Figure(figsize=(6.4, 5.6), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    for (i, j), rate in np.ndenumerate(rates):
        if np.isfinite(rate) and rate >= 0.005:
            ax.text(
                j,
                i,
                f"{100 * rate:.0f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if rate > 0.6 else "black",
            )
    ticks = np.arange(len(LEVEL_NAMES))
    ax.set_xticks(ticks, LEVEL_NAMES)
    ax.set_yticks(
        ticks, [f"{n} ({int(t):,})" for n, t in zip(LEVEL_NAMES, totals[:, 0], strict=True)]
    )
    ax.set(
        xlabel="predicted label",
        ylabel="true label (voxels)",
        title="Vertebra level confusion (% of each true label)",
    )
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of true voxels")
    return fig


def save_png(fig: Figure, path: str | os.PathLike, dpi: int = _DPI) -> str:
    """Writes `fig` as PNG at `path`; returns the path."""
    fig.savefig(path, format="png", dpi=dpi, facecolor=fig.get_facecolor())
    return os.fspath(path)


def write_report(
    out_dir: str | os.PathLike,
    y_true: np.ndarray,
    probs: np.ndarray,
    confusion: np.ndarray,
    writer=None,
    step: int = 0,
) -> dict[str, str]:
    """Writes roc.png, reliability.png and level_confusion.png into `out_dir` (created).

    Args:
      out_dir: output folder.
      y_true, probs: (n, 8) labels and probabilities `[patient_overall, C1..C7]`.
      confusion: (8, 8) true-by-predicted vertebra label counts.
      writer: a tensorboardX SummaryWriter; each figure is also logged as `report/<name>`.
      step: the global step of the TensorBoard images.

    Returns:
      Picture name -> PNG path.
    """
    os.makedirs(out_dir, exist_ok=True)
    figures = {
        "roc": roc_figure(y_true, probs),
        "reliability": reliability_figure(y_true, probs),
        "level_confusion": confusion_figure(confusion),
    }
    paths = {}
    for name, fig in figures.items():
        paths[name] = save_png(fig, os.path.join(out_dir, f"{name}.png"))
        if writer is not None:
            # close=False: closing goes through pyplot, which never knew these figures.
            writer.add_figure(f"report/{name}", fig, step, close=False)
    return paths
