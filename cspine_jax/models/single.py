"""SingleModel: one 2.5D network for vertebra segmentation, slice and study fracture logits.

Every slice of a study goes through the same encoder (backbone, segmentation decoder, slice
classifier); the study head pools the per-slice logits over z, weighted by the segmentation's
own per-slice vertebra presence. Per-slice work and pooling are separate methods, so whole-study
inference can encode slices in chunks of any size and pool once.

Config (`config.model`, declared and commented in configs/default.py): widths, depths,
decoder_width, dtype, strides, norm_group_size, head_hidden, presence_window,
pool_temperature, detach_presence.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from cspine_jax.data.rsna import NEGATIVE_WEIGHTS, POSITIVE_WEIGHTS
from cspine_jax.models.backbone import Backbone
from cspine_jax.models.heads import (
    NUM_CLASSES,
    SegDecoder,
    SliceClassifier,
    StudyPool,
    fracture_evidence,
    label_grid,
    noisy_or_logit,
    vertebra_presence,
)


def input_channels(config: ml_collections.ConfigDict) -> int:
    """C of the image: K adjacent slices times the number of HU windows, plus the slice's
    position channel (`pipeline.add_position`)."""
    return config.data.context * len(config.data.windows) + 1


class SingleModel(nnx.Module):
    """Study batch (B, S, H, W, C) -> segmentation, slice, presence and study logits."""

    def __init__(
        self, model_config: ml_collections.ConfigDict, in_features: int, *, rngs: nnx.Rngs
    ):
        cfg = model_config
        widths, depths = tuple(cfg.widths), tuple(cfg.depths)
        strides = tuple(cfg.strides)
        group_size = cfg.norm_group_size
        dtype = jnp.dtype(cfg.dtype)
        self.presence_window = cfg.presence_window
        self.detach_presence = cfg.detach_presence
        self.backbone = Backbone(in_features, widths, depths, strides, group_size, dtype, rngs)
        self.decoder = SegDecoder(
            (widths[0], *widths),
            self.backbone.feature_strides,
            cfg.decoder_width,
            group_size,
            dtype,
            rngs,
        )
        self.classifier = SliceClassifier(
            widths[-1], cfg.head_hidden or widths[-1], group_size, dtype, rngs
        )
        self.study_pool = StudyPool(cfg.pool_temperature)

    def encode_slices(self, images: jax.Array) -> tuple[jax.Array, ...]:
        """Per-slice work, independent across slices (so chunkable).

        images (N, H, W, C) -> seg_logits (N, H/2, W/2, 8), slice_logits (N, 7),
        presence (N, 7), fracture_logits (N, H/2, W/2); all float32.
        """
        features = self.backbone(images)
        decoded = self.decoder(features).astype(jnp.float32)
        seg_logits, fracture_logits = decoded[..., :NUM_CLASSES], decoded[..., NUM_CLASSES]
        presence = vertebra_presence(seg_logits, self.presence_window)
        located = seg_logits
        if self.detach_presence:
            # The segmentation is trained by masks only: letting the fracture losses move it
            # would turn presence into free attention that no longer says where C_v is.
            presence = jax.lax.stop_gradient(presence)
            located = jax.lax.stop_gradient(seg_logits)
        slice_logits = fracture_evidence(located, fracture_logits) + self.classifier(
            features[-1], presence
        ).astype(jnp.float32)
        return seg_logits, slice_logits, presence, fracture_logits

    def pool(self, slice_logits: jax.Array, presence: jax.Array, valid: jax.Array) -> jax.Array:
        """(B, S, 7), (B, S, 7), (B, S) -> study logits (B, 8): [patient_overall, C1..C7]."""
        return self.study_pool(slice_logits, presence, valid)

    def __call__(self, image: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
        """image (B, S, H, W, C), valid (B, S) -> dict of seg_logits (B, S, h, w, 8),
        slice_logits (B, S, 7), presence (B, S, 7), fracture_logits (B, S, h, w),
        study_logits (B, 8)."""
        b, s = image.shape[:2]
        seg, slices, presence, fracture = self.encode_slices(image.reshape(b * s, *image.shape[2:]))
        seg = seg.reshape(b, s, *seg.shape[1:])
        slices = slices.reshape(b, s, -1)
        presence = presence.reshape(b, s, -1)
        return dict(
            seg_logits=seg,
            slice_logits=slices,
            presence=presence,
            fracture_logits=fracture.reshape(b, s, *fracture.shape[1:]),
            study_logits=self.pool(slices, presence, valid),
        )


def create_model(config: ml_collections.ConfigDict, seed: int = 0) -> SingleModel:
    """The model of a full config (reads config.model and config.data)."""
    model = SingleModel(config.model, input_channels(config), rngs=nnx.Rngs(seed))
    logging.info("SingleModel: %s parameters", f"{param_count(model):,}")
    return model


def param_count(model: nnx.Module | nnx.State) -> int:
    """Number of trainable parameters of a model or of its (parameter) state."""
    state = model if isinstance(model, nnx.State) else nnx.state(model, nnx.Param)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


# A loss term as (numerator, denominator): its value is num / max(den, 1). Denominators count
# what a term averages over (studies, masked studies, weighted pixels) and depend on the batch
# alone, so gradient accumulation can divide every micro-batch's numerator by the whole
# batch's denominator and get exactly the whole batch's loss (`trainer.make_grad_fn`).
Ratio = tuple[jax.Array, jax.Array]


def masked_ratio(x: jax.Array, weights: jax.Array) -> Ratio:
    """(sum(w * x), sum(w)): the weighted mean of x as a `Ratio`."""
    return (weights * x).sum(), weights.sum()


def ratio_value(ratio: Ratio) -> jax.Array:
    """num / den of a `Ratio`, 0 when den == 0."""
    num, den = ratio
    return num / jnp.maximum(den, 1.0)


def weighted_loss(
    ratios: dict[str, Ratio], weights: Mapping[str, float]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(sum_t weights[t] * value_t, {t: value_t}) of loss terms given as `Ratio`s."""
    terms = {name: ratio_value(r) for name, r in ratios.items()}
    return sum(weights[name] * value for name, value in terms.items()), terms


def study_loss(study_logits: jax.Array, labels: jax.Array) -> Ratio:
    """The competition's weighted log loss: (B, 8), (B, 8) -> its `Ratio`.

    Per study sum_j w_j * bce_j / sum_j w_j with w = where(y, POSITIVE, NEGATIVE), then the
    mean over studies.
    """
    labels = labels.astype(jnp.float32)
    weights = jnp.where(labels > 0.5, jnp.asarray(POSITIVE_WEIGHTS), jnp.asarray(NEGATIVE_WEIGHTS))
    bce = optax.sigmoid_binary_cross_entropy(study_logits.astype(jnp.float32), labels)
    per_study = (weights * bce).sum(-1) / weights.sum(-1)
    return per_study.sum(), jnp.asarray(per_study.shape[0], jnp.float32)


def segmentation_losses(
    seg_logits: jax.Array, mask: jax.Array, valid: jax.Array, has_mask: jax.Array
) -> tuple[Ratio, Ratio]:
    """Pixel cross-entropy and soft Dice over the C1..C7 present, on masked studies only.

    seg_logits (B, S, h, w, 8), mask (B, S, H, W) int, valid (B, S), has_mask (B,) ->
    (ce, dice) `Ratio`s: each a per-study value averaged over the studies with a mask.
    """
    mask = label_grid(mask, seg_logits.shape[3])
    logits = seg_logits.astype(jnp.float32)
    pixels = valid.astype(jnp.float32)[:, :, None, None]  # (B, S, 1, 1)
    num_pixels = pixels.sum(axis=(1, 2, 3)) * mask.shape[2] * mask.shape[3]

    ce = optax.softmax_cross_entropy_with_integer_labels(logits, mask)  # (B, S, h, w)
    ce = (pixels * ce).sum(axis=(1, 2, 3)) / jnp.maximum(num_pixels, 1.0)

    probs = jax.nn.softmax(logits, axis=-1)[..., 1:]
    target = jax.nn.one_hot(mask, NUM_CLASSES, dtype=jnp.float32)[..., 1:]
    pixels = pixels[..., None]
    axes = (1, 2, 3)
    overlap = (pixels * probs * target).sum(axes)  # (B, 7)
    total = (pixels * (probs + target)).sum(axes)
    present = ((pixels * target).sum(axes) > 0).astype(jnp.float32)
    dice = 2.0 * overlap / jnp.maximum(total, 1e-6)
    dice_loss = (present * (1.0 - dice)).sum(-1) / jnp.maximum(present.sum(-1), 1.0)

    has_mask = has_mask.astype(jnp.float32)
    return masked_ratio(ce, has_mask), masked_ratio(dice_loss, has_mask)


def slice_loss(
    slice_logits: jax.Array, slice_fracture: jax.Array, valid: jax.Array, located: jax.Array
) -> Ratio:
    """BCE of "any fracture on this slice" (noisy-OR of the 7 slice logits), averaged over
    the valid slices of studies whose fractures are `located` (boxes, or none at all).
    (B, S, 7), (B, S), (B, S), (B,) -> its `Ratio`."""
    any_logit = noisy_or_logit(slice_logits.astype(jnp.float32), axis=-1)
    bce = optax.sigmoid_binary_cross_entropy(any_logit, slice_fracture.astype(jnp.float32))
    weights = valid.astype(jnp.float32) * located.astype(jnp.float32)[:, None]
    return masked_ratio(bce, weights)


def box_cells(fracture: jax.Array, size: int) -> jax.Array:
    """Box masks on a coarser output grid: (B, S, H, W) -> (B, S, size, size), a cell
    positive if any of its pixels is (boxes are thin)."""
    factor = fracture.shape[2] // size
    # Strided slices, not a reshape: the batch axis is sharded and must stay untouched.
    return functools.reduce(
        jnp.maximum,
        [fracture[:, :, i::factor, j::factor] for i in range(factor) for j in range(factor)],
    )


# Box pixels are ~1 % of a slice: weighted up so that they weigh about as much as the rest.
# Hard-negative mining (the top 2 % of each study's negative pixels) trained the map worse:
# 0.67 training / 0.57 held-out slice AUC after 300 detector steps against 0.82 / 0.61.
BOX_PIXEL_WEIGHT = 20.0


def fracture_map_loss(
    fracture_logits: jax.Array, fracture: jax.Array, valid: jax.Array, located: jax.Array
) -> Ratio:
    """Pixel BCE of the fracture map against the box masks, box pixels weighted
    `BOX_PIXEL_WEIGHT` times, over the valid slices of the studies whose fractures are
    `located` (boxes, or a negative study: none).

    fracture_logits (B, S, h, w), fracture (B, S, H, W) 0/1, valid (B, S), located (B,);
    targets by `box_cells`.
    """
    target = box_cells(fracture, fracture_logits.shape[2]).astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(fracture_logits.astype(jnp.float32), target)
    weights = valid.astype(jnp.float32) * located.astype(jnp.float32)[:, None]
    weights = weights[:, :, None, None] * jnp.where(target > 0, BOX_PIXEL_WEIGHT, 1.0)
    return masked_ratio(bce, weights)


def loss_ratios(outputs: dict[str, jax.Array], batch: dict[str, jax.Array]) -> dict[str, Ratio]:
    """The study, segmentation, slice and fracture-map loss terms as `Ratio`s, in float32."""
    seg_ce, seg_dice = segmentation_losses(
        outputs["seg_logits"], batch["mask"], batch["valid"], batch["has_mask"]
    )
    # Where fractures are is known on studies with boxes, and on negative studies: nowhere.
    located = jnp.maximum(batch["has_boxes"], 1.0 - batch["labels"][:, 0])
    return dict(
        study=study_loss(outputs["study_logits"], batch["labels"]),
        seg_ce=seg_ce,
        seg_dice=seg_dice,
        slice=slice_loss(outputs["slice_logits"], batch["slice_fracture"], batch["valid"], located),
        fracture_map=fracture_map_loss(
            outputs["fracture_logits"], batch["fracture"], batch["valid"], located
        ),
    )


def compute_loss(
    outputs: dict[str, jax.Array], batch: dict[str, jax.Array], loss_cfg: Mapping[str, float]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted sum of `loss_ratios` (weights `study`, `seg_ce`, `seg_dice`, `slice`,
    `fracture_map` of loss_cfg) and the unweighted term values (for logging)."""
    return weighted_loss(loss_ratios(outputs, batch), loss_cfg)
