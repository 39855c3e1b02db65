"""Whole-study inference of the two-stage baseline, a `systems.Predictor`.

Stage 1 reads every slice in chunks, as the single model's `evaluation.StudyPredictor`; the
vertebra stacks it gives are built exactly as stage 2 was trained on them, without jitter or
augmentation.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from flax import nnx

from cspine_jax.baseline import two_stage, vertebrae
from cspine_jax.evaluation import encode_chunks
from cspine_jax.systems import StudyPrediction


class TwoStagePredictor:
    """Compiled whole-study inference of the two-stage baseline (process-local)."""

    def __init__(
        self, model: two_stage.TwoStageModel, config: ml_collections.ConfigDict, chunk: int = 32
    ):
        graphdef, state = nnx.split(model)
        self.state = jax.device_get(state)
        self.context, self.chunk = config.data.context, chunk
        self.stacks_config = dict(config.model.stacks)

        def locate(state, images):
            return (nnx.merge(graphdef, state).locate(images),)

        def classify(state, stacks, found):
            logits = nnx.merge(graphdef, state).classifier(stacks[None], found[None])
            return jax.nn.sigmoid(logits[0])

        self._locate, self._classify = jax.jit(locate), jax.jit(classify)

    def locate(self, image: np.ndarray) -> tuple[vertebrae.Located, np.ndarray]:
        """Stage 1 on a prepared study: its `Located` and segmentation (z', h, w) uint8."""
        (segmentation,) = encode_chunks(self._locate, self.state, image, self.chunk, self.context)
        return vertebrae.locate(segmentation, self.stacks_config["min_area"]), segmentation

    def __call__(self, image: np.ndarray) -> StudyPrediction:
        """image: (z', G, G, n_windows) uint8 prepared study -> its prediction."""
        located, segmentation = self.locate(image)
        stacks, found = vertebrae.study_stacks(image, located, self.stacks_config, self.context)[:2]
        probs = self._classify(self.state, stacks, found)
        return StudyPrediction(
            probs=np.asarray(probs, np.float32),
            slice_logits=None,
            presence=located.area,
            segmentation=segmentation,
        )
