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

    Built on a StudyPredictor and the model's three parts (`models.single`): the gradient
    runs back from the pooled study logits through the pool (whole study, tiny), `locate`
    (chunk by chunk), z-context (whole study) and the encoder (chunk by chunk), each a
    program compiled at fixed shapes (chunks and z lengths padded), so only one chunk's
    activations are alive at a time. The inputs of each backward step are the prediction's
    own per-slice outputs (`evaluation.SinglePrediction`); each step still re-runs its own
    part's forward pass for its activations (the encoder's, chunk by chunk, is the one that
    costs), as holding every chunk's activations would not keep memory bounded.

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

        def pool_grad(state, slice_logits, presence, valid, levels):
            model = nnx.merge(graphdef, state)

            def selected(slice_logits, presence):
                study = model.pool(slice_logits[None], presence[None], valid[None])[0]
                return jnp.sum(study[1:] * levels)

            return jax.grad(selected, argnums=(0, 1))(slice_logits, presence)

        def locate_grad(state, pixels, level, context_fracture, g_slices, g_presence):
            model = nnx.merge(graphdef, state)

            def located(pixels, level, context_fracture):
                _, slice_logits, presence = model.locate(
                    pixels[..., :-1], pixels[..., -1], level, context_fracture, detach=False
                )
                return slice_logits, presence

            primals = (pixels.astype(jnp.float32), level, context_fracture)
            return jax.vjp(located, *primals)[1]((g_slices, g_presence))

        def context_grad(state, embedding, z, valid, g_level, g_fracture):
            model = nnx.merge(graphdef, state)
            _, vjp = jax.vjp(lambda e: model.context(e[None], z[None], valid[None]), embedding)
            return vjp((g_level[None], g_fracture[None]))[0]

        def input_grad(state, stacks, g_pixels, g_embedding):
            model = nnx.merge(graphdef, state)

            def encoded(x):
                out = model.encode_slices(x)
                return out["pixel_logits"], out["fracture_logits"], out["embedding"]

            cotangents = (g_pixels[..., :-1], g_pixels[..., -1], g_embedding)
            return jax.vjp(encoded, stacks)[1](cotangents)[0]

        self._pool_grad, self._locate_grad = jax.jit(pool_grad), jax.jit(locate_grad)
        self._context_grad, self._input_grad = jax.jit(context_grad), jax.jit(input_grad)

    def __call__(
        self,
        image: np.ndarray,
        levels: np.ndarray,
        prediction: evaluation.SinglePrediction | None = None,
    ) -> np.ndarray:
        """Saliency of the summed study logits of `levels`.

        Args:
          image: (z', G, G, n_windows) uint8 prepared study.
          levels: (7,) weights of the C1..C7 study logits (1 for each suspected level).
          prediction: the predictor's output for `image`, if already computed: its
            per-slice outputs are the forward pass the gradient runs back through (the
            encoder runs again only in its backward pass, chunk by chunk).

        Returns:
          (z', G, G) float32 |d logits / d voxel|, summed over the windows.
        """
        p = self.predictor
        prediction = p(image) if prediction is None else prediction
        z, chunk = image.shape[0], p.chunk
        starts = range(0, z, chunk)
        valid, position = evaluation.z_axes(z)
        pad = lambda x: evaluation.pad_z(x, len(valid))  # noqa: E731
        g_slices, g_presence = jax.device_get(
            self._pool_grad(
                p.state,
                pad(prediction.slice_logits),
                pad(prediction.presence),
                valid,
                np.asarray(levels, np.float32),
            )
        )
        g_pixels = np.zeros(prediction.pixels.shape, np.float32)
        g_level, g_fracture = np.zeros((2, len(valid), g_slices.shape[-1]), np.float32)
        for start in starts:
            rows = slice(start, min(start + chunk, z))
            out = self._locate_grad(
                p.state,
                *(
                    p.chunk_rows(x, start, z)
                    for x in (
                        prediction.pixels,
                        prediction.level_logits,
                        prediction.context_fracture,
                        g_slices,
                        g_presence,
                    )
                ),
            )
            n = rows.stop - start
            g_pixels[rows], g_level[rows], g_fracture[rows] = (x[:n] for x in jax.device_get(out))
        g_embedding = np.asarray(
            self._context_grad(
                p.state, pad(prediction.embedding), position, valid, g_level, g_fracture
            )
        )
        volume = np.zeros(image.shape, np.float32)
        for start in starts:
            stacks, centres = pipeline.chunk_inputs(image, start, chunk, p.context)
            cotangents = (p.chunk_rows(x, start, z) for x in (g_pixels, g_embedding))
            grads = np.asarray(self._input_grad(p.state, stacks, *cotangents))
            unstack_context(grads[: len(centres)], centres, p.context, volume)
        return np.abs(volume).sum(axis=-1)
