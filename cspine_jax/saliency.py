"""Gradient saliency of the single model's study fracture logits, in bounded memory.

Everything here lives on the prepared grid (`preprocess.Prepared`): a study is a
(z', G, G, n_windows) uint8 volume, voxel order (z, y, x) with z' slices `spacing_z` mm apart,
most superior first, each window mapping its HU range onto 0..255. The model reads it as
K-slice stacks scaled to [0, 1] (`pipeline.slice_inputs`), so a saliency value is
|d study logit / d input| per unit of that [0, 1] scale (0: the window's floor, 1: its
ceiling), summed over the windows.

Which levels are explained is the triage decision (`suspected_levels`): the vertebrae whose
probability reaches the run's decision threshold (`SUSPECT_THRESHOLD` for a run without
saved thresholds), else the most likely one. Only the single model has the per-slice
logits this needs (`evaluation.StudyPredictor`); the two-stage baseline scores vertebra
stacks and has no slice logits to differentiate.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cspine_jax import evaluation
from cspine_jax.data import pipeline
from cspine_jax.data.rsna import VERTEBRAE
from cspine_jax.systems import StudyPrediction

SUSPECT_THRESHOLD = 0.5  # the decision threshold of a run that saved none


def suspected_levels(probs: np.ndarray, thresholds: Mapping[str, float]) -> np.ndarray:
    """(7,) float32 weights of C1..C7 the heat map explains: 1 for each level whose
    probability reaches its decision threshold, else 1 for the most likely level only.

    probs: (8,) `[patient_overall, C1..C7]`; thresholds: label -> threshold (the run's).
    """
    vertebrae = np.asarray(probs)[1:]
    levels = (vertebrae >= np.array([thresholds[v] for v in VERTEBRAE])).astype(np.float32)
    if not levels.any():
        levels[np.argmax(vertebrae)] = 1.0
    return levels


def unstack_context(grads: np.ndarray, centres: np.ndarray, context: int, out: np.ndarray) -> None:
    """Adjoint of `pipeline.stack_context`: adds gradients of stacks into the volume's.

    grads (S, G, G, K * W [+ 1]) with respect to the K-slice stacks around `centres` are
    added into out (z', G, G, W): each voxel receives the gradient of every stack channel it
    was copied into (edge slices also those of their clamped neighbours). A trailing
    position channel (`pipeline.add_position`) carries no voxel and is dropped.
    """
    grads = grads[..., : context * out.shape[-1]]
    s, h, w, _ = grads.shape
    per_offset = grads.reshape(s, h, w, context, -1)  # stack_context's (offset, window) order
    for k in range(context):
        np.add.at(
            out, np.clip(centres + k - context // 2, 0, out.shape[0] - 1), per_offset[:, :, :, k]
        )


class FractureSaliency:
    """Input-gradient saliency of a study's fracture logits, in bounded memory.

    Built on a StudyPredictor (whose forward pass gives the per-slice logits), plus two
    compiled programs at fixed shapes (the last chunk is padded), so a study of any length
    compiles them once: the gradient of the pooled study logits with respect to all
    per-slice logits (tiny), and the input gradient of sum(g * slice_logits) for one chunk.
    Only one chunk's activations are alive at a time.

    Raises:
      TypeError: `predictor` is not the single model's (e.g. a two-stage run's), so there
        are no slice logits to explain.
    """

    def __init__(self, predictor: evaluation.StudyPredictor):
        if not isinstance(predictor, evaluation.StudyPredictor):
            raise TypeError(
                f"fracture saliency needs the single model's slice logits; "
                f"{type(predictor).__name__} has none"
            )
        self.predictor = predictor
        graphdef = predictor.graphdef

        def logit_grad(state, slice_logits, presence, valid, levels):
            model = nnx.merge(graphdef, state)

            def selected(slice_logits):
                study = model.pool(slice_logits[None], presence[None], valid[None])[0]
                return jnp.sum(study[1:] * levels)

            return jax.grad(selected)(slice_logits)

        def input_grad(state, stacks, g):
            model = nnx.merge(graphdef, state)
            return jax.grad(lambda x: jnp.sum(g * model.encode_slices(x)[1]))(stacks)

        self._logit_grad = jax.jit(logit_grad)
        self._input_grad = jax.jit(input_grad)

    def __call__(
        self, image: np.ndarray, levels: np.ndarray, prediction: StudyPrediction | None = None
    ) -> np.ndarray:
        """Saliency of the summed study logits of `levels`.

        Args:
          image: (z', G, G, n_windows) uint8 prepared study.
          levels: (7,) weights of the C1..C7 study logits (1 for each suspected level).
          prediction: the predictor's output for `image`, if already computed.

        Returns:
          (z', G, G) float32 |d logits / d voxel|, summed over the windows.
        """
        p = self.predictor
        prediction = p(image) if prediction is None else prediction
        z = image.shape[0]
        starts = range(0, z, p.chunk)
        pad = ((0, len(starts) * p.chunk - z), (0, 0))
        valid = (np.arange(len(starts) * p.chunk) < z).astype(np.float32)
        g = np.asarray(
            self._logit_grad(
                p.state,
                np.pad(prediction.slice_logits, pad),
                np.pad(prediction.presence, pad),
                valid,
                np.asarray(levels, np.float32),
            )
        )
        volume = np.zeros(image.shape, np.float32)
        for start in starts:
            stacks, centres = pipeline.chunk_inputs(image, start, p.chunk, p.context)
            grads = np.asarray(self._input_grad(p.state, stacks, g[start : start + p.chunk]))
            unstack_context(grads[: len(centres)], centres, p.context, volume)
        return np.abs(volume).sum(axis=-1)
