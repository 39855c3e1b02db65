"""The two-stage baseline of the training-time benchmark: a segmenter, then a vertebra classifier.

In the spirit of the RSNA 2022 winners: stage 1 segments C1..C7 slice by slice; its output gives
each vertebra the slices it is on and its in-plane box (`baseline.vertebrae`); stage 2 classifies
each vertebra from a stack of those slices with its own 2D encoder and a BiGRU along z. Built
from SingleModel's parts (backbone, SegDecoder, presence, losses), so that the benchmark compares
two ways of training the same kind of network, not two code bases.

Config (`config.model`):
  family            'two_stage'
  dtype             compute dtype, 'float32' or 'bfloat16'; parameters stay float32
  segmenter         widths, depths, decoder_width of stage 1 (backbone + SegDecoder)
  classifier        widths, depths of stage 2's backbone; hidden: GRU width per direction
  stacks            num_slices, crop, margin, min_area of the vertebra stacks (baseline.vertebrae)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx

from cspine_jax import augment
from cspine_jax.data.rsna import NEGATIVE_WEIGHTS, POSITIVE_WEIGHTS
from cspine_jax.models import single
from cspine_jax.models.backbone import Backbone, group_norm
from cspine_jax.models.heads import (
    NUM_CLASSES,
    NUM_VERTEBRAE,
    SegDecoder,
    noisy_or_logit,
)
from cspine_jax.models.single import Ratio

_GROUP_SIZE = 16  # GroupNorm channels per group, as SingleModel's default
# Prior probability that a vertebra is fractured (RSNA 2022: 3.6-19.5 % by level): the initial
# vertebra logits, whose noisy-OR (~0.5) is near the share of positive studies, as SingleModel's
# initial study logits are.
VERTEBRA_PRIOR = 0.1
# Share of a stack's slices that a fracture box touches (the initial slice logits).
SLICE_PRIOR = 0.05


def _strides(widths) -> tuple[int, ...]:
    return (2,) * len(widths)


class Segmenter(nnx.Module):
    """Stage 1: slices (N, H, W, C) -> segmentation logits (N, H/2, W/2, 8), float32."""

    def __init__(self, cfg: Mapping, in_features: int, dtype, rngs: nnx.Rngs):
        widths = tuple(cfg["widths"])
        self.backbone = Backbone(
            in_features, widths, tuple(cfg["depths"]), _strides(widths), _GROUP_SIZE, dtype, rngs
        )
        # SegDecoder also has SingleModel's fracture channel: stage 1 leaves it untrained.
        self.decoder = SegDecoder(
            (widths[0], *widths),
            self.backbone.feature_strides,
            cfg["decoder_width"],
            _GROUP_SIZE,
            dtype,
            rngs,
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.decoder(self.backbone(images))[..., :NUM_CLASSES].astype(jnp.float32)


class VertebraClassifier(nnx.Module):
    """Stage 2: vertebra stacks -> study logits [patient_overall, C1..C7].

    Every slice of every stack goes through the backbone and is pooled in-plane (mean and max);
    an embedding of the vertebra level is added (C1's ring and C2's dens look nothing like
    C3-C7); a BiGRU runs along each stack; its outputs are pooled over the stack (mean and max)
    into one logit per vertebra, plus a learned per-level bias. patient_overall is the noisy-OR
    of the seven, through a learned affine, as in SingleModel's study pool.
    stacks (B, 7, T, c, c, C), found (B, 7) -> (B, 8) float32.
    """

    def __init__(self, cfg: Mapping, in_features: int, dtype, rngs: nnx.Rngs):
        widths, hidden = tuple(cfg["widths"]), int(cfg["hidden"])
        self.hidden = hidden
        self.backbone = Backbone(
            in_features, widths, tuple(cfg["depths"]), _strides(widths), _GROUP_SIZE, dtype, rngs
        )
        self.norm = group_norm(widths[-1], _GROUP_SIZE, dtype, rngs)
        self.embed = nnx.Linear(2 * widths[-1], hidden, dtype=dtype, rngs=rngs)
        self.level = nnx.Embed(NUM_VERTEBRAE, hidden, dtype=dtype, rngs=rngs)
        # rngs=False: the carry starts at zeros (passed in), so the RNNs need no RNG state.
        self.gru = nnx.Bidirectional(
            nnx.RNN(nnx.GRUCell(hidden, hidden, dtype=dtype, rngs=rngs), rngs=False),
            nnx.RNN(
                nnx.GRUCell(hidden, hidden, dtype=dtype, rngs=rngs),
                reverse=True,
                keep_order=True,
                rngs=False,
            ),
            rngs=False,
        )
        # Zero-initialised output, as SingleModel's heads: the first predictions are the priors.
        self.out = nnx.Linear(
            4 * hidden, 1, dtype=dtype, kernel_init=nnx.initializers.zeros_init(), rngs=rngs
        )
        prior = math.log(VERTEBRA_PRIOR / (1 - VERTEBRA_PRIOR))
        # An explicit dtype: a weak-typed parameter turns strong at its first update, and the
        # train step would compile a second time.
        self.bias = nnx.Param(jnp.full((NUM_VERTEBRAE,), prior, jnp.float32))
        # Per-slice fracture logits along the stack, trained where boxes exist (as SingleModel's
        # slice and map losses): the boxes' slice-level supervision, which the study labels
        # alone spread over 7 x 12 slices.
        slice_prior = math.log(SLICE_PRIOR / (1 - SLICE_PRIOR))
        self.slice_out = nnx.Linear(
            2 * hidden,
            1,
            dtype=dtype,
            kernel_init=nnx.initializers.zeros_init(),
            bias_init=nnx.initializers.constant(slice_prior),
            rngs=rngs,
        )
        self.overall_scale = nnx.Param(jnp.ones(()))
        self.overall_bias = nnx.Param(jnp.zeros(()))

    def vertebra_logits(self, stacks: jax.Array, levels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Stacks (N, T, c, c, C) of vertebrae `levels` (N,) int 0-6 -> (N,) float32 logits,
        the per-level bias included, and (N, T) float32 per-slice fracture logits."""
        n, t = stacks.shape[:2]
        x = nnx.silu(self.norm(self.backbone(stacks.reshape(n * t, *stacks.shape[2:]))[-1]))
        x = self.embed(jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1))
        # One-hot products, not gathers: a gather at indices sharded over the batch has no
        # sharding rule.
        level = jax.nn.one_hot(levels, NUM_VERTEBRAE, dtype=jnp.float32)
        embedding = level.astype(x.dtype) @ self.level.embedding[...].astype(x.dtype)
        x = nnx.silu(x.reshape(n, t, -1) + embedding[:, None])
        carry = jnp.zeros((n, self.hidden), x.dtype)
        x = self.gru(x, initial_carry=(carry, carry))  # (n, t, 2 * hidden)
        slices = self.slice_out(x)[..., 0].astype(jnp.float32)
        x = jnp.concatenate([x.mean(axis=1), x.max(axis=1)], axis=-1)
        return self.out(x)[:, 0].astype(jnp.float32) + level @ self.bias[...], slices

    def __call__(self, stacks: jax.Array, found: jax.Array) -> jax.Array:
        return self.study_and_slices(stacks, found)[0]

    def study_and_slices(self, stacks: jax.Array, found: jax.Array) -> tuple[jax.Array, jax.Array]:
        """stacks (B, 7, T, c, c, C), found (B, 7) -> study logits (B, 8) and per-slice
        fracture logits (B, 7, T), float32."""
        b, v, t = stacks.shape[:3]
        # A reshape that splits the sharded batch axis has a sharding rule; one that also
        # drops a size-1 axis has not: vertebra_logits returns (N,), not (N, 1).
        vertebra, slices = self.vertebra_logits(
            stacks.reshape(b * v, *stacks.shape[2:]), jnp.tile(jnp.arange(v), b)
        )
        vertebra, slices = vertebra.reshape(b, v), slices.reshape(b, v, t)
        bias = self.bias[...]
        # A vertebra stage 1 did not find has an all-zero stack: it gets its prior only.
        vertebra = jnp.where(found > 0, vertebra, bias)
        overall = (
            self.overall_scale[...] * noisy_or_logit(vertebra, axis=-1) + self.overall_bias[...]
        )
        return jnp.concatenate([overall[:, None], vertebra], axis=-1), slices


class TwoStageModel(nnx.Module):
    """Both stages in one parameter tree, so that one checkpoint holds the whole baseline."""

    def __init__(
        self, model_config: ml_collections.ConfigDict, in_features: int, *, rngs: nnx.Rngs
    ):
        dtype = jnp.dtype(model_config.dtype)
        self.segmenter = Segmenter(model_config.segmenter, in_features, dtype, rngs)
        self.classifier = VertebraClassifier(model_config.classifier, in_features, dtype, rngs)

    def locate(self, images: jax.Array) -> jax.Array:
        """Stage 1 on slices (N, H, W, C) -> labels (N, H/2, W/2) uint8 (0 bg, 1-7 C1-C7)."""
        return jnp.argmax(self.segmenter(images), -1).astype(jnp.uint8)


def create_model(config: ml_collections.ConfigDict, seed: int = 0) -> TwoStageModel:
    """The two-stage model of a full config (reads config.model and config.data)."""
    model = TwoStageModel(config.model, single.input_channels(config), rngs=nnx.Rngs(seed))
    logging.info(
        "TwoStageModel: %s segmenter + %s classifier parameters",
        f"{single.param_count(model.segmenter):,}",
        f"{single.param_count(model.classifier):,}",
    )
    return model


def segmenter_loss(segmenter: Segmenter, batch: dict[str, jax.Array]) -> dict[str, Ratio]:
    """Stage 1's loss terms on a `pipeline` training batch, warped as SingleModel's: its
    segmentation CE and soft Dice on the studies with masks (`seg_ce`, `seg_dice`)."""
    batch = augment.apply_warp(batch, batch["image"].shape[-1] - 1)  # all but the position
    image = batch["image"]
    b, s = image.shape[:2]
    logits = segmenter(image.reshape(b * s, *image.shape[2:]))
    ce, dice = single.segmentation_losses(
        logits.reshape(b, s, *logits.shape[1:]), batch["mask"], batch["valid"], batch["has_mask"]
    )
    return {"seg_ce": ce, "seg_dice": dice}


def _warped(image: jax.Array, warp: jax.Array) -> jax.Array:
    """Stacks (..., T, c, c, C) each warped by its own `warp` (..., 4), the position channel
    left as it is."""
    flat = {"image": image.reshape(-1, *image.shape[-4:]), "warp": warp.reshape(-1, 4)}
    return augment.apply_warp(flat, image.shape[-1] - 1)["image"].reshape(image.shape)


def _slice_loss(slice_logits: jax.Array, batch: dict[str, jax.Array], found: jax.Array) -> Ratio:
    """BCE of per-slice logits (..., T) against `slice_fracture` on the found stacks of studies
    with boxes; `found` (...) 0/1."""
    bce = optax.sigmoid_binary_cross_entropy(slice_logits, batch["slice_fracture"])
    weights = found * batch["has_boxes"].reshape(batch["has_boxes"].shape + (1,) * (found.ndim - 1))
    return single.masked_ratio(bce, jnp.broadcast_to(weights[..., None], bce.shape))


def classifier_loss(
    classifier: VertebraClassifier, batch: dict[str, jax.Array]
) -> dict[str, Ratio]:
    """Stage 2's loss terms on a batch of study examples (`vertebrae.SampleStudyStacks`), each
    stack warped by its own `warp`: the competition's weighted log loss (`study`) and the
    per-slice BCE (`slice`)."""
    study, slices = classifier.study_and_slices(
        _warped(batch["image"], batch["warp"]), batch["found"]
    )
    return {
        "study": single.study_loss(study, batch["labels"]),
        "slice": _slice_loss(slices, batch, batch["found"]),
    }


def vertebra_loss(classifier: VertebraClassifier, batch: dict[str, jax.Array]) -> dict[str, Ratio]:
    """Stage 2's loss terms on a batch of vertebra examples (`vertebrae.SampleVertebraStack`),
    each stack warped by its own `warp`: the competition's weighting of a vertebra label
    (positive 2, negative 1), sum(w * bce) / sum(w) over the batch (`study`: patient_overall
    is not trained, it is the noisy-OR of the seven vertebrae), and the per-slice BCE
    (`slice`)."""
    logits, slices = classifier.vertebra_logits(
        _warped(batch["image"], batch["warp"]), batch["level"]
    )
    label = batch["label"]
    w = jnp.where(label > 0.5, POSITIVE_WEIGHTS[1], NEGATIVE_WEIGHTS[1])
    bce = optax.sigmoid_binary_cross_entropy(logits, label)
    return {
        "study": single.masked_ratio(bce, w),
        "slice": _slice_loss(slices, batch, jnp.ones_like(label)),
    }
