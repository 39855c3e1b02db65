"""Whole-study inference and held-out evaluation, shared by training, evaluate.py and predict.

A study is scored from EVERY prepared slice, whatever their number: slices are encoded in
fixed-size chunks (one compiled program per chunk shape) and pooled once over a z length
rounded up to a bucket (a handful of compiled programs for all study lengths).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from cspine_jax import metrics
from cspine_jax.data import cache, pipeline
from cspine_jax.models.spine_net import SpineNet

_Z_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class StudyPrediction:
    """Outputs for one study on its prepared grid (z' slices, most superior first).

    Attributes:
      probs: (8,) float32 probabilities `[patient_overall, C1..C7]`.
      slice_probs: (z', 7) per-slice fracture probabilities of C1..C7.
      presence: (z', 7) per-slice vertebra presence.
      segmentation: (z', h, w) uint8 predicted labels (0 bg, 1-7 C1-C7) at the seg stride.
    """

    probs: np.ndarray
    slice_probs: np.ndarray
    presence: np.ndarray
    segmentation: np.ndarray


class StudyPredictor:
    """Compiled whole-study inference of one model (process-local, any device count)."""

    def __init__(self, model: SpineNet, context: int, chunk: int = 32):
        graphdef, state = nnx.split(model)
        self.state = jax.device_get(state)
        self.context, self.chunk = context, chunk

        def encode(state, images):
            seg, slice_logits, presence = nnx.merge(graphdef, state).encode_slices(images)
            return jnp.argmax(seg, -1).astype(jnp.uint8), slice_logits, presence

        def pool(state, slice_logits, presence, valid):
            return jax.nn.sigmoid(nnx.merge(graphdef, state).pool(slice_logits, presence, valid))

        self._encode, self._pool = jax.jit(encode), jax.jit(pool)

    def __call__(self, image: np.ndarray) -> StudyPrediction:
        """image: (z', G, G, n_windows) uint8 prepared study -> its prediction."""
        z = image.shape[0]
        segs, logits, presences = [], [], []
        for start in range(0, z, self.chunk):
            centres = np.arange(start, min(start + self.chunk, z))
            stacks = pipeline.stack_context(image, centres, self.context)
            padded = np.zeros((self.chunk, *stacks.shape[1:]), np.float32)
            padded[: len(centres)] = stacks / np.float32(255.0)
            seg, slice_logits, presence = jax.device_get(self._encode(self.state, padded))
            segs.append(seg[: len(centres)])
            logits.append(slice_logits[: len(centres)])
            presences.append(presence[: len(centres)])
        logits_z, presence_z = np.concatenate(logits), np.concatenate(presences)
        length = -(-z // _Z_BUCKET) * _Z_BUCKET
        pad = ((0, length - z), (0, 0))
        valid = (np.arange(length) < z).astype(np.float32)
        probs = self._pool(self.state, np.pad(logits_z, pad)[None], np.pad(presence_z, pad)[None],
                           valid[None])
        return StudyPrediction(
            probs=np.asarray(probs[0], np.float32),
            slice_probs=1.0 / (1.0 + np.exp(-logits_z)),
            presence=presence_z,
            segmentation=np.concatenate(segs),
        )


def _mask_at(mask: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """(z', G, G) labels -> the seg output's (z', h, w) grid (centre pixel of each cell)."""
    factor = mask.shape[1] // shape[1]
    sub = np.asarray(mask)[:, factor // 2::factor, factor // 2::factor]
    return np.where(sub <= pipeline.NUM_VERTEBRAE, sub, 0)


@dataclasses.dataclass(frozen=True)
class Predictions:
    """Outputs over a list of entries.

    Attributes:
      probs: (n, 8) probabilities `[patient_overall, C1..C7]` in entry order.
      confusion: (8, 8) voxel counts of true (rows) vs predicted (columns) vertebra labels
        over the entries with masks (all zero when none has one).
    """

    probs: np.ndarray
    confusion: np.ndarray


def predict_entries(predictor: StudyPredictor, entries: Sequence[cache.Entry],
                    progress: bool = True) -> Predictions:
    """Whole-study predictions of every entry."""
    probs, confusion = [], np.zeros((8, 8), np.int64)
    for entry in tqdm.tqdm(entries, desc="evaluate", unit="study", disable=not progress):
        prediction = predictor(entry.image())
        probs.append(prediction.probs)
        if entry.has_mask:
            true = _mask_at(entry.mask(), prediction.segmentation.shape)
            confusion += metrics.label_confusion(true, prediction.segmentation)
    return Predictions(np.stack(probs), confusion)


def evaluate_entries(predictor: StudyPredictor, entries: Sequence[cache.Entry],
                     threshold: float | None = None,
                     progress: bool = True) -> tuple[dict[str, float], Predictions]:
    """Every held-out metric of `entries` (all labelled) and the predictions behind them.

    `threshold` (patient_overall decision threshold) defaults to Youden's J on these
    studies themselves; pass the validation fold's to evaluate another set fairly.
    """
    predictions = predict_entries(predictor, entries, progress)
    y_true = np.stack([e.labels for e in entries])
    if threshold is None:
        threshold = metrics.youden_threshold(y_true, predictions.probs)
    values = metrics.study_metrics(y_true, predictions.probs, threshold)
    if predictions.confusion.any():
        values.update(metrics.dice_iou(predictions.confusion))
    return values, predictions


def format_table(values: dict[str, float]) -> str:
    """Metric name / value lines, for terminals and logs."""
    width = max(len(k) for k in values)
    return "\n".join(f"{k:<{width}}  {v:.4f}" for k, v in values.items())
