"""The shortcut check: global per-vertebra statistics must not predict the fracture label.

If a vertebra's bone volume, mean HU or height gave its label away, a model could score well
without learning what a fracture looks like; `shortcut_auc` measures how far a logistic
regression on `vertebra_stats` gets (0.5: no shortcut).
"""

from __future__ import annotations

import numpy as np

from cspine_jax.data.rsna import NUM_VERTEBRAE

STAT_NAMES = ("bone_volume_mm3", "mean_hu", "height_mm")


def vertebra_stats(hu: np.ndarray, labels: np.ndarray, spacing) -> np.ndarray:
    """Global statistics of C1..C7 that must not give the fracture label away.

    Args:
      hu: (z, y, x) HU; labels: (z, y, x) vertebra labels; spacing: (dz, dy, dx) mm.

    Returns:
      (7, 3) float64 rows C1..C7: bone volume (mm^3 of voxels > 300 HU inside the label),
      mean HU inside the label, height (mm, z-extent of the label); NaN for an absent level.
    """
    dz, dy, dx = spacing
    out = np.full((NUM_VERTEBRAE, len(STAT_NAMES)), np.nan)
    for level in range(1, NUM_VERTEBRAE + 1):
        m = labels == level
        if not m.any():
            continue
        values = hu[m]
        zs = np.nonzero(m.any((1, 2)))[0]
        out[level - 1] = (
            (values > 300).sum() * dz * dy * dx,
            values.mean(),
            (zs[-1] - zs[0] + 1) * dz,
        )
    return out


def shortcut_auc(stats: np.ndarray, targets: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated ROC-AUC of a logistic regression predicting fracture from the stats.

    Args:
      stats: (studies, 7, 3) from `vertebra_stats`; targets: (studies, 8) `[overall, C1..C7]`.
      Each feature is standardised within its level (so the level's own prevalence is no
      feature); vertebrae with a missing level are dropped; folds are stratified.

    Returns:
      The AUC over all vertebrae of the out-of-fold predicted probabilities.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    stats = np.asarray(stats, np.float64)
    mean = np.nanmean(stats, axis=0, keepdims=True)
    sd = np.nanstd(stats, axis=0, keepdims=True) + 1e-9
    x = ((stats - mean) / sd).reshape(-1, stats.shape[-1])
    y = np.asarray(targets)[:, 1:].reshape(-1)
    keep = np.isfinite(x).all(1)
    x, y = x[keep], y[keep]
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    p = cross_val_predict(LogisticRegression(), x, y, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, p))
