"""Study-level metrics: the competition's weighted log loss and the survey's measures.

Arrays are (n_studies, 8) in column order `[patient_overall, C1..C7]` unless said otherwise.
AUC and the multi-label measures come from scikit-learn.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from cspine_jax.data.rsna import LABEL_COLUMNS, NEGATIVE_WEIGHTS, POSITIVE_WEIGHTS, VERTEBRAE

_CLIP = 1e-15


def competition_loss(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """RSNA 2022 weighted multi-label log loss.

    Per study: sum(w * bce) / sum(w) over its 8 labels, with w = 14/2 for positive and 7/1
    for negative [patient_overall, C1..C7] targets; the score is the mean over studies.
    Probabilities are clipped to [1e-15, 1 - 1e-15].
    """
    y_true = np.asarray(y_true, np.float64)
    p = np.clip(np.asarray(y_prob, np.float64), _CLIP, 1 - _CLIP)
    if y_true.shape != p.shape or y_true.ndim != 2 or y_true.shape[1] != len(LABEL_COLUMNS):
        raise ValueError(f"expected two (n, 8) arrays, got {y_true.shape} and {p.shape}")
    weights = np.where(y_true > 0.5, POSITIVE_WEIGHTS, NEGATIVE_WEIGHTS)
    bce = -(y_true * np.log(p) + (1 - y_true) * np.log(1 - p))
    return float(np.mean((weights * bce).sum(axis=1) / weights.sum(axis=1)))


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC-AUC, NaN where only one class is present (undefined, not 0.5)."""
    return float(skm.roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


def study_metrics(y_true: np.ndarray, y_prob: np.ndarray, threshold: float) -> dict[str, float]:
    """Every study-level number a report shows, as flat keys.

    Args:
      y_true: (n, 8) binary targets.
      y_prob: (n, 8) predicted probabilities.
      threshold: decision threshold for sensitivity/specificity (patient_overall) and the
        multi-label measures (C1..C7).
    """
    y_true = np.asarray(y_true) > 0.5
    y_prob = np.asarray(y_prob, np.float64)
    out = {"competition_loss": competition_loss(y_true, y_prob)}
    for j, name in enumerate(LABEL_COLUMNS):
        out[f"auc_{name}"] = auc(y_true[:, j], y_prob[:, j])
    out["auc_mean_vertebra"] = float(np.nanmean([out[f"auc_{v}"] for v in VERTEBRAE]))
    patient_pred = y_prob[:, 0] >= threshold
    tp = np.sum(patient_pred & y_true[:, 0])
    tn = np.sum(~patient_pred & ~y_true[:, 0])
    out["sensitivity"] = float(tp / max(1, y_true[:, 0].sum()))
    out["specificity"] = float(tn / max(1, (~y_true[:, 0]).sum()))
    out["threshold"] = float(threshold)
    vert_true, vert_prob = y_true[:, 1:], y_prob[:, 1:]
    vert_pred = vert_prob >= threshold
    out["macro_f1"] = float(skm.f1_score(vert_true, vert_pred, average="macro", zero_division=0))
    out["exact_match"] = float(skm.accuracy_score(vert_true, vert_pred))
    out["coverage_error"] = float(skm.coverage_error(vert_true, vert_prob))
    return out


def youden_threshold(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """The patient_overall threshold maximising sensitivity + specificity (Youden's J)."""
    y, p = np.asarray(y_true)[:, 0] > 0.5, np.asarray(y_prob)[:, 0]
    if y.all() or not y.any():
        return 0.5
    fpr, tpr, thresholds = skm.roc_curve(y, p)
    return float(np.clip(thresholds[np.argmax(tpr - fpr)], 0.0, 1.0))


def label_confusion(true: np.ndarray, pred: np.ndarray, num_classes: int = 8) -> np.ndarray:
    """(num_classes, num_classes) int64 voxel counts, rows = true label, columns = predicted."""
    index = np.asarray(true, np.int64).ravel() * num_classes + np.asarray(pred, np.int64).ravel()
    return np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def dice_iou(confusion: np.ndarray) -> dict[str, float]:
    """Per-vertebra Dice and IoU from a label confusion matrix (classes 1..7 = C1..C7).

    NaN for a vertebra absent from both prediction and truth.
    """
    out = {}
    for c, name in enumerate(VERTEBRAE, start=1):
        inter = confusion[c, c]
        total = confusion[c, :].sum() + confusion[:, c].sum()
        out[f"dice_{name}"] = float(2 * inter / total) if total else float("nan")
        out[f"iou_{name}"] = float(inter / (total - inter)) if total else float("nan")
    return out
