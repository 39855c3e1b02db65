"""Pictures people look at: label overlays on CT slices (TensorBoard images, reports)."""

from __future__ import annotations

import numpy as np

# Background transparent, then C1..C7 in distinct hues (matplotlib's tab10 order).
VERTEBRA_COLOURS = (
    np.array(
        [
            [0, 0, 0],
            [31, 119, 180],
            [255, 127, 14],
            [44, 160, 44],
            [214, 39, 40],
            [148, 103, 189],
            [140, 86, 75],
            [227, 119, 194],
        ],
        np.float32,
    )
    / 255.0
)


def label_overlay(gray: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """(h, w) intensities in [0, 1] and (h', w') labels 0..7 -> (h, w, 3) uint8 RGB.

    Labels at a coarser grid (the segmentation stride) are repeated up to the image size.
    """
    factor = gray.shape[0] // labels.shape[0]
    labels = np.repeat(np.repeat(labels, factor, axis=0), factor, axis=1)
    labels = np.clip(labels, 0, len(VERTEBRA_COLOURS) - 1)
    rgb = np.repeat(np.clip(gray, 0, 1)[..., None], 3, axis=-1)
    tinted = (1 - alpha) * rgb + alpha * VERTEBRA_COLOURS[labels]
    rgb = np.where((labels > 0)[..., None], tinted, rgb)
    return (rgb * 255).round().astype(np.uint8)


def truth_vs_prediction(gray: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Side by side: true labels (left), predicted labels (right); (h, 2w + 2, 3) uint8."""
    left, right = label_overlay(gray, truth), label_overlay(gray, prediction)
    gap = np.full((left.shape[0], 2, 3), 255, np.uint8)
    return np.concatenate([left, gap, right], axis=1)
