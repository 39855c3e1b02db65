"""Study-level metrics: the competition's weighted log loss and the survey's measures.

Arrays are (n_studies, 8) in column order `[patient_overall, C1..C7]` unless said otherwise.
AUC and the multi-label measures come from scikit-learn.

Decisions (a study positive for a label) are `p >= t` with one threshold per label
(`decision_thresholds`): sensitivity and specificity use patient_overall's, macro-F1 and
exact match each vertebra's own. A value that is undefined on the studies given (an AUC of a
label with one class only, a Dice of a vertebra neither in the masks nor predicted) is NaN;
`undefined_reasons` says why, from the study counts `study_metrics` returns with it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
from sklearn import metrics as skm

from cspine_jax.data.rsna import LABEL_COLUMNS, NEGATIVE_WEIGHTS, POSITIVE_WEIGHTS, VERTEBRAE

_CLIP = 1e-15
# patient_overall's threshold when the studies it is chosen on hold one class only.
FALLBACK_THRESHOLD = 0.5


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


def youden(y: np.ndarray, p: np.ndarray) -> float | None:
    """The threshold t of one label whose decisions `p >= t` maximise sensitivity +
    specificity (Youden's J), in [0, 1]; None where `y` holds one class only.

    Of several maximising thresholds, the highest. Where no threshold beats chance (J <= 0
    everywhere) that is 1.0: no study called positive but those at p = 1.
    """
    y = np.asarray(y) > 0.5
    if y.all() or not y.any():
        return None
    fpr, tpr, thresholds = skm.roc_curve(y, np.asarray(p, np.float64))
    return float(np.clip(thresholds[np.argmax(tpr - fpr)], 0.0, 1.0))


def one_class(positives: float, studies: float) -> str | None:
    """'only negatives' / 'only positives' for a label with one class among `studies`,
    else None."""
    if positives == 0:
        return "only negatives"
    if positives == studies:
        return "only positives"
    return None


class ThresholdsError(ValueError):
    """A run's metrics.json holds no usable decision thresholds (the message names it):
    a user's error, reported as one line by `cli`."""


def decision_thresholds(y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, float]:
    """Label -> decision threshold, each label's own Youden's J on these studies.

    Fallbacks for a label with one class only among them (`threshold_fallbacks` words
    them): patient_overall takes `FALLBACK_THRESHOLD`; a vertebra takes patient_overall's
    threshold, the study-level decision, as no threshold of its own can be told apart there.
    """
    y_true, y_prob = np.asarray(y_true) > 0.5, np.asarray(y_prob, np.float64)
    out = {}
    for j, name in enumerate(LABEL_COLUMNS):
        t = youden(y_true[:, j], y_prob[:, j])
        if t is None:
            t = FALLBACK_THRESHOLD if j == 0 else out[LABEL_COLUMNS[0]]
        out[name] = t
    return out


def threshold_fallbacks(
    positives: Mapping[str, float], studies: float, where: str
) -> dict[str, str]:
    """Label -> why its threshold is a fallback (`decision_thresholds`), for the labels with
    one class only among the `studies` the thresholds were chosen on (`where`, e.g. 'the
    held-out fold'); `positives`: label -> its positive studies there."""
    out = {}
    for j, name in enumerate(LABEL_COLUMNS):
        kind = one_class(positives[name], studies)
        if kind is not None:
            fallback = str(FALLBACK_THRESHOLD) if j == 0 else "patient_overall's threshold"
            out[name] = f"{kind} on {where} ({int(studies)} studies): {fallback}"
    return out


def as_thresholds(thresholds: float | Mapping[str, float]) -> dict[str, float]:
    """Label -> threshold from one threshold for every label, or from a label mapping
    (every label of `LABEL_COLUMNS`, finite, in [0, 1])."""
    if isinstance(thresholds, Mapping):
        missing = [name for name in LABEL_COLUMNS if name not in thresholds]
        if missing:
            raise ValueError(f"no decision threshold for {', '.join(missing)}")
        out = {name: float(thresholds[name]) for name in LABEL_COLUMNS}
    else:
        out = dict.fromkeys(LABEL_COLUMNS, float(thresholds))
    bad = {name: t for name, t in out.items() if not 0.0 <= t <= 1.0}  # NaN included
    if bad:
        raise ValueError(f"decision thresholds outside [0, 1]: {bad}")
    return out


def study_metrics(
    y_true: np.ndarray, y_prob: np.ndarray, thresholds: float | Mapping[str, float]
) -> dict[str, float]:
    """Every study-level number a report shows, as flat keys of floats (NaN: undefined).

    Args:
      y_true: (n, 8) binary targets.
      y_prob: (n, 8) predicted probabilities.
      thresholds: the decision threshold of each label (`decision_thresholds`), or one for
        all. Sensitivity/specificity decide by patient_overall's (`threshold`), macro-F1 and
        exact match by each vertebra's own (`threshold_C1`..`threshold_C7`).

    Also returns the counts behind the undefined values: `studies` and `positives_<label>`.
    """
    y_true = np.asarray(y_true) > 0.5
    y_prob = np.asarray(y_prob, np.float64)
    t = as_thresholds(thresholds)
    out = {"competition_loss": competition_loss(y_true, y_prob)}
    for j, name in enumerate(LABEL_COLUMNS):
        out[f"auc_{name}"] = auc(y_true[:, j], y_prob[:, j])
    vertebra_aucs = [out[f"auc_{v}"] for v in VERTEBRAE]
    with warnings.catch_warnings():  # every vertebra one-class: NaN, said by the reasons
        warnings.simplefilter("ignore", RuntimeWarning)
        out["auc_mean_vertebra"] = float(np.nanmean(vertebra_aucs))
    patient_pred = y_prob[:, 0] >= t[LABEL_COLUMNS[0]]
    positives, negatives = y_true[:, 0].sum(), (~y_true[:, 0]).sum()
    tp = np.sum(patient_pred & y_true[:, 0])
    tn = np.sum(~patient_pred & ~y_true[:, 0])
    # How far apart a confident map pushes the studies: the mean patient probability of the
    # fractured and of the intact studies (their AUC is auc_patient_overall).
    out["mean_prob_fractured"] = float(y_prob[y_true[:, 0], 0].mean()) if positives else np.nan
    out["mean_prob_intact"] = float(y_prob[~y_true[:, 0], 0].mean()) if negatives else np.nan
    out["sensitivity"] = float(tp / positives) if positives else float("nan")
    out["specificity"] = float(tn / negatives) if negatives else float("nan")
    out["threshold"] = t[LABEL_COLUMNS[0]]
    for v in VERTEBRAE:
        out[f"threshold_{v}"] = t[v]
    vert_true, vert_prob = y_true[:, 1:], y_prob[:, 1:]
    vert_pred = vert_prob >= np.array([t[v] for v in VERTEBRAE])
    out["macro_f1"] = float(skm.f1_score(vert_true, vert_pred, average="macro", zero_division=0))
    out["exact_match"] = float(skm.accuracy_score(vert_true, vert_pred))
    out["coverage_error"] = float(skm.coverage_error(vert_true, vert_prob))
    out["studies"] = float(len(y_true))
    for j, name in enumerate(LABEL_COLUMNS):
        out[f"positives_{name}"] = float(y_true[:, j].sum())
    return out


def thresholds_of(values: Mapping[str, float]) -> dict[str, float]:
    """Label -> decision threshold, read back from `study_metrics`' keys."""
    return {
        name: float(values["threshold" if j == 0 else f"threshold_{name}"])
        for j, name in enumerate(LABEL_COLUMNS)
    }


def undefined_reasons(values: Mapping[str, float]) -> dict[str, str]:
    """Key -> why its value is not a finite number, for every such key of `values` (the
    keys of `study_metrics` and `dice_iou`), from the counts `study_metrics` returns."""
    studies = values.get("studies")
    where = "these studies" if studies is None else f"these {int(studies)} studies"
    out = {}
    for key, value in values.items():
        if np.isfinite(value):
            continue
        reason = "not defined on these studies"
        label = key.split("_", 1)[-1]
        if key.startswith("auc_") and f"positives_{label}" in values and studies is not None:
            kind = one_class(values[f"positives_{label}"], studies)
            reason = f"{kind} on {where}" if kind else reason
        elif key == "auc_mean_vertebra":
            reason = f"no vertebra with both positives and negatives on {where}"
        elif key in ("sensitivity", "mean_prob_fractured"):
            reason = f"no positive (patient_overall) study among {where}"
        elif key in ("specificity", "mean_prob_intact"):
            reason = f"no negative (patient_overall) study among {where}"
        elif key.startswith(("dice_", "iou_")):
            reason = f"{label} neither in the masks nor predicted"
        out[key] = reason
    return out


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
