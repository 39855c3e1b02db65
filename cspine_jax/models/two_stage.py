"""The two-stage baseline of the training-time benchmark: a segmenter, then a vertebra classifier.

In the spirit of the RSNA 2022 winners: stage 1 segments C1..C7 slice by slice; its output gives
each vertebra the slices it is on and its in-plane box (`data.vertebrae`); stage 2 classifies
each vertebra from a stack of those slices with its own 2D encoder and a BiGRU along z. Built
from SpineNet's parts (backbone, SegDecoder, presence, losses), so that the benchmark compares
two ways of training the same kind of network, not two code bases.

Config (`config.model`):
  family            'two_stage'
  dtype             compute dtype, 'float32' or 'bfloat16'; parameters stay float32
  segmenter         widths, depths, decoder_width of stage 1 (backbone + SegDecoder)
  classifier        widths, depths of stage 2's backbone; hidden: GRU width per direction
  stacks            num_slices, crop, margin, min_area of the vertebra stacks (data.vertebrae)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from cspine_jax import augment
from cspine_jax.models import spine_net
from cspine_jax.models.backbone import Backbone, group_norm
from cspine_jax.models.heads import (
    NUM_CLASSES,
    NUM_VERTEBRAE,
    SegDecoder,
    noisy_or_logit,
)

_GROUP_SIZE = 16  # GroupNorm channels per group, as SpineNet's default
# Prior probability that a vertebra is fractured (RSNA 2022: 3.6-19.5 % by level): the initial
# vertebra logits, whose noisy-OR (~0.5) is near the share of positive studies, as SpineNet's
# initial study logits are.
VERTEBRA_PRIOR = 0.1


def _strides(widths) -> tuple[int, ...]:
    return (2,) * len(widths)


class Segmenter(nnx.Module):
    """Stage 1: slices (N, H, W, C) -> segmentation logits (N, H/2, W/2, 8), float32."""

    def __init__(self, cfg: Mapping, in_features: int, dtype, rngs: nnx.Rngs):
        widths = tuple(cfg["widths"])
        self.backbone = Backbone(in_features, widths, tuple(cfg["depths"]), _strides(widths),
                                 _GROUP_SIZE, dtype, rngs)
        # SegDecoder also has SpineNet's fracture channel: stage 1 leaves it untrained.
        self.decoder = SegDecoder((widths[0], *widths), self.backbone.feature_strides,
                                  cfg["decoder_width"], _GROUP_SIZE, dtype, rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.decoder(self.backbone(images))[..., :NUM_CLASSES].astype(jnp.float32)


class VertebraClassifier(nnx.Module):
    """Stage 2: vertebra stacks -> study logits [patient_overall, C1..C7].

    Every slice of every stack goes through the backbone and is pooled in-plane (mean and max);
    an embedding of the vertebra level is added (C1's ring and C2's dens look nothing like
    C3-C7); a BiGRU runs along each stack; its outputs are pooled over the stack (mean and max)
    into one logit per vertebra, plus a learned per-level bias. patient_overall is the noisy-OR
    of the seven, through a learned affine, as in SpineNet's study pool.
    stacks (B, 7, T, c, c, C), found (B, 7) -> (B, 8) float32.
    """

    def __init__(self, cfg: Mapping, in_features: int, dtype, rngs: nnx.Rngs):
        widths, hidden = tuple(cfg["widths"]), int(cfg["hidden"])
        self.hidden = hidden
        self.backbone = Backbone(in_features, widths, tuple(cfg["depths"]), _strides(widths),
                                 _GROUP_SIZE, dtype, rngs)
        self.norm = group_norm(widths[-1], _GROUP_SIZE, dtype, rngs)
        self.embed = nnx.Linear(2 * widths[-1], hidden, dtype=dtype, rngs=rngs)
        self.level = nnx.Embed(NUM_VERTEBRAE, hidden, dtype=dtype, rngs=rngs)
        # rngs=False: the carry starts at zeros (passed in), so the RNNs need no RNG state.
        self.gru = nnx.Bidirectional(
            nnx.RNN(nnx.GRUCell(hidden, hidden, dtype=dtype, rngs=rngs), rngs=False),
            nnx.RNN(nnx.GRUCell(hidden, hidden, dtype=dtype, rngs=rngs), reverse=True,
                    keep_order=True, rngs=False),
            rngs=False)
        # Zero-initialised output, as SpineNet's heads: the first predictions are the priors.
        self.out = nnx.Linear(4 * hidden, 1, dtype=dtype,
                              kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
        prior = math.log(VERTEBRA_PRIOR / (1 - VERTEBRA_PRIOR))
        # An explicit dtype: a weak-typed parameter turns strong at its first update, and the
        # train step would compile a second time.
        self.bias = nnx.Param(jnp.full((NUM_VERTEBRAE,), prior, jnp.float32))
        self.overall_scale = nnx.Param(jnp.ones(()))
        self.overall_bias = nnx.Param(jnp.zeros(()))

    def __call__(self, stacks: jax.Array, found: jax.Array) -> jax.Array:
        b, v, t = stacks.shape[:3]
        x = nnx.silu(self.norm(self.backbone(stacks.reshape(b * v * t, *stacks.shape[3:]))[-1]))
        x = self.embed(jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1))
        x = x.reshape(b, v, t, -1) + self.level(jnp.arange(v))[None, :, None]
        x = nnx.silu(x).reshape(b * v, t, -1)
        carry = jnp.zeros((b * v, self.hidden), x.dtype)
        x = self.gru(x, initial_carry=(carry, carry))  # (b * v, t, 2 * hidden)
        x = jnp.concatenate([x.mean(axis=1), x.max(axis=1)], axis=-1)
        bias = self.bias[...]
        # [:, 0] first: a reshape that splits the sharded batch axis and drops a size-1 axis
        # at once has no sharding rule.
        vertebra = self.out(x)[:, 0].reshape(b, v).astype(jnp.float32) + bias
        # A vertebra stage 1 did not find has an all-zero stack: it gets its prior only.
        vertebra = jnp.where(found > 0, vertebra, bias)
        overall = (self.overall_scale[...] * noisy_or_logit(vertebra, axis=-1)
                   + self.overall_bias[...])
        return jnp.concatenate([overall[:, None], vertebra], axis=-1)


class TwoStageModel(nnx.Module):
    """Both stages in one parameter tree, so that one checkpoint holds the whole baseline."""

    def __init__(self, model_config: ml_collections.ConfigDict, in_features: int, *,
                 rngs: nnx.Rngs):
        dtype = jnp.dtype(model_config.dtype)
        self.segmenter = Segmenter(model_config.segmenter, in_features, dtype, rngs)
        self.classifier = VertebraClassifier(model_config.classifier, in_features, dtype, rngs)

    def locate(self, images: jax.Array) -> jax.Array:
        """Stage 1 on slices (N, H, W, C) -> labels (N, H/2, W/2) uint8 (0 bg, 1-7 C1-C7)."""
        return jnp.argmax(self.segmenter(images), -1).astype(jnp.uint8)


def create_model(config: ml_collections.ConfigDict, seed: int = 0) -> TwoStageModel:
    """The two-stage model of a full config (reads config.model and config.data)."""
    model = TwoStageModel(config.model, spine_net.input_channels(config), rngs=nnx.Rngs(seed))
    logging.info("TwoStageModel: %s segmenter + %s classifier parameters",
                 f"{spine_net.param_count(model.segmenter):,}",
                 f"{spine_net.param_count(model.classifier):,}")
    return model


def segmenter_loss(segmenter: Segmenter, batch: dict[str, jax.Array],
                   weights: Mapping[str, float]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage 1's loss on a `pipeline` training batch, warped as SpineNet's: its segmentation
    CE and soft Dice on the studies with masks, weighted by `weights` (`seg_ce`, `seg_dice`).
    """
    batch = augment.apply_warp(batch, batch["image"].shape[-1] - 1)  # all but the position
    image = batch["image"]
    b, s = image.shape[:2]
    logits = segmenter(image.reshape(b * s, *image.shape[2:]))
    ce, dice = spine_net.segmentation_losses(logits.reshape(b, s, *logits.shape[1:]),
                                             batch["mask"], batch["valid"], batch["has_mask"])
    terms = {"seg_ce": ce, "seg_dice": dice}
    return sum(weights[k] * v for k, v in terms.items()), terms


def classifier_loss(classifier: VertebraClassifier,
                    batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage 2's loss on a `vertebrae` training batch, each stack warped by its own `warp`:
    the competition's weighted log loss."""
    image = batch["image"]
    b, v = image.shape[:2]
    stacks = augment.apply_warp({"image": image.reshape(b * v, *image.shape[2:]),
                                 "warp": batch["warp"].reshape(b * v, -1)},
                                image.shape[-1] - 1)["image"]
    logits = classifier(stacks.reshape(image.shape), batch["found"])
    loss = spine_net.study_loss(logits, batch["labels"])
    return loss, {"study": loss}
