"""SingleModel: one 2.5D network for vertebra segmentation, slice and study fracture logits.

Three parts, in order:
1. `encode_slices`, per slice and independent across slices (so chunkable): the backbone,
   the segmentation decoder's pixel logits (vertebra classes and a fracture map) and the
   slice's embedding.
2. `context`, along z over the embeddings of one study (`heads.ZContext`): each slice's level
   logits (which of C1..C7 it shows) and per-level fracture logits from its neighbours.
3. `locate`, per slice again: the segmentation is the pixel logits plus the log of the
   slice's level probabilities (a product of experts: a pixel is C_v only where z-context
   allows C_v), so the segmentation and the sequence module agree by construction; the
   slice's fracture logits are the pixel evidence per vertebra under the fracture map plus
   the z-context fracture logits. `pool` then gives the study logits, weighted by the level
   probabilities.
Whole-study inference runs 1 over chunks of slices, 2 once over every slice, 3 over chunks,
then pools (`evaluation.StudyPredictor`).

Config (`config.model`, declared and commented in configs/default.py): widths, depths,
decoder_width, dtype, stem_patch, strides, norm_group_size, z_width, z_layers, z_heads,
presence_window,
detach_presence, detach_map, image_skip.
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

from cspine_jax.data.rsna import NEGATIVE_WEIGHTS, NUM_VERTEBRAE, POSITIVE_WEIGHTS
from cspine_jax.models.backbone import Backbone, group_norm
from cspine_jax.models.heads import (
    NUM_CLASSES,
    Calibration,
    SegDecoder,
    StudyPool,
    ZContext,
    fracture_evidence,
    label_grid,
    noisy_or_logit,
    slice_embedding,
    vertebra_presence,
)

SEG_STRIDE = 2  # input pixels per segmentation pixel


def input_channels(config: ml_collections.ConfigDict) -> int:
    """C of the image: K adjacent slices times the number of HU windows, plus the slice's
    position channel (`pipeline.add_position`)."""
    return config.data.context * len(config.data.windows) + 1


class SingleModel(nnx.Module):
    """Study batch (B, S, H, W, C), slice positions (B, S) -> segmentation, level, slice and
    study logits."""

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
        self.detach_map = cfg.detach_map
        self.backbone = Backbone(
            in_features, widths, depths, strides, group_size, dtype, rngs, cfg.stem_patch
        )
        # The segmentation stays at stride 2 whatever the stem, so its Dice is scored on one
        # grid across architectures.
        self.decoder = SegDecoder(
            (widths[0], *widths),
            self.backbone.feature_strides,
            cfg.decoder_width,
            group_size,
            dtype,
            rngs,
            out_stride=SEG_STRIDE,
            image_features=in_features if cfg.image_skip else 0,
        )
        self.feature_norm = group_norm(widths[-1], group_size, dtype, rngs)
        self.zcontext = ZContext(
            2 * widths[-1] + NUM_VERTEBRAE + 1, cfg.z_width, cfg.z_layers, cfg.z_heads, dtype, rngs
        )
        # The map's evidence in slice logits: its scale moves as the map learns (and the
        # map is detached from the losses that read it), so a fast affine follows it.
        self.evidence_calibration = Calibration()
        self.study_pool = StudyPool()

    def encode_slices(self, images: jax.Array) -> dict[str, jax.Array]:
        """Per-slice work, independent across slices (so chunkable).

        images (N, H, W, C) -> pixel_logits (N, h, w, 8) (the segmentation before z-context),
        fracture_logits (N, h, w), embedding (N, 2 * widths[-1] + 8): pooled deepest features,
        the pixels' vertebra presence and the slice's position channel; all float32.
        """
        features = self.backbone(images)
        decoded = self.decoder(features, images).astype(jnp.float32)
        pixel_logits, fracture_logits = decoded[..., :NUM_CLASSES], decoded[..., NUM_CLASSES]
        pooled = slice_embedding(nnx.silu(self.feature_norm(features[-1]))).astype(jnp.float32)
        # What the pixels say is on the slice, as a feature of the sequence: not a path for
        # the fracture losses into the segmentation.
        presence = jax.lax.stop_gradient(vertebra_presence(pixel_logits, self.presence_window))
        # Where the slice sits in the scan (0 top .. 1 bottom): after the backbone's
        # normalisation the position plane no longer reaches the pooled features as a number.
        position = images[:, 0, 0, -1:].astype(jnp.float32)
        return dict(
            pixel_logits=pixel_logits,
            fracture_logits=fracture_logits,
            embedding=jnp.concatenate([pooled, presence, position], axis=-1),
        )

    def context(
        self, embedding: jax.Array, z: jax.Array, valid: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """(B, S, F) embeddings, (B, S) slice positions (prepared slices), (B, S) valid ->
        level logits (B, S, 7), z-context fracture logits (B, S, 7)."""
        return self.zcontext(embedding, z, valid)

    def locate(
        self,
        pixel_logits: jax.Array,
        fracture_logits: jax.Array,
        level_logits: jax.Array,
        context_fracture: jax.Array,
        detach: bool = True,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Per slice: (N, h, w, 8), (N, h, w), (N, 7), (N, 7) -> seg_logits (N, h, w, 8),
        slice_logits (N, 7), presence (N, 7) (the level probabilities).

        detach: the training-time stop-gradients of `detach_presence` and `detach_map` (the
        values are the same either way); False where gradients must follow every path to
        the input (`saliency`)."""
        level = jax.nn.log_sigmoid(level_logits)
        seg_logits = pixel_logits + jnp.pad(level, ((0, 0), (1, 0)))[:, None, None, :]
        presence, located = jax.nn.sigmoid(level_logits), seg_logits
        if detach and self.detach_presence:
            # Levels are trained by masks only: letting the fracture losses move them would
            # turn presence into free attention that no longer says where C_v is.
            presence = jax.lax.stop_gradient(presence)
            located = jax.lax.stop_gradient(seg_logits)
        evidence = fracture_evidence(located, fracture_logits)
        if detach and self.detach_map:
            # The map learns from its pixel losses alone (boxes, the fracture stream): the
            # study and slice losses through its few strongest pixels would mine hard
            # negatives, which trains it worse; they calibrate the pool and z-context.
            evidence = jax.lax.stop_gradient(evidence)
        slice_logits = self.evidence_calibration(evidence) + context_fracture
        return seg_logits, slice_logits, presence

    def pool(self, slice_logits: jax.Array, presence: jax.Array, valid: jax.Array) -> jax.Array:
        """(B, S, 7), (B, S, 7), (B, S) -> study logits (B, 8): [patient_overall, C1..C7]."""
        return self.study_pool(slice_logits, presence, valid)

    def __call__(
        self,
        image: jax.Array,
        valid: jax.Array,
        z: jax.Array,
        stream: jax.Array | None = None,
        detach: bool = True,
    ) -> dict[str, jax.Array]:
        """image (B, S, H, W, C), valid (B, S), z (B, S) slice positions in prepared slices ->
        dict of seg_logits (B, S, h, w, 8), level_logits (B, S, 7), slice_logits (B, S, 7),
        presence (B, S, 7), fracture_logits (B, S, h, w), study_logits (B, 8).

        stream (B, F, H, W, C), independent slices (the fracture stream), are encoded in the
        same backbone pass as the studies' slices; their fracture map is returned as
        stream_fracture_logits (B, F, h, w). detach: `locate`'s."""
        b, s = image.shape[:2]
        flat = image.reshape(b * s, *image.shape[2:])
        if stream is not None:
            flat = jnp.concatenate([flat, stream.reshape(-1, *stream.shape[2:])])
        slices = self.encode_slices(flat)
        extra = {}
        if stream is not None:
            extra["stream_fracture_logits"] = slices["fracture_logits"][b * s :].reshape(
                b, stream.shape[1], *slices["fracture_logits"].shape[1:]
            )
            slices = {k: v[: b * s] for k, v in slices.items()}
        level, context_fracture = self.context(slices["embedding"].reshape(b, s, -1), z, valid)
        seg, slice_logits, presence = self.locate(
            slices["pixel_logits"],
            slices["fracture_logits"],
            level.reshape(b * s, -1),
            context_fracture.reshape(b * s, -1),
            detach,
        )
        per_study = lambda x: x.reshape(b, s, *x.shape[1:])  # noqa: E731
        slice_logits, presence = per_study(slice_logits), per_study(presence)
        return dict(
            seg_logits=per_study(seg),
            level_logits=level,
            slice_logits=slice_logits,
            presence=presence,
            fracture_logits=per_study(slices["fracture_logits"]),
            study_logits=self.pool(slice_logits, presence, valid),
            **extra,
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


# A vertebra counts as on a slice from this share of the slice's pixels: a sliver of the
# neighbouring vertebra at its end plate is not the level a fracture there belongs to.
LEVEL_MIN_SHARE = 1e-3


def level_targets(mask: jax.Array) -> jax.Array:
    """(B, S, H, W) int labels -> (B, S, 7) float32, 1 where C_v covers LEVEL_MIN_SHARE of
    the slice."""
    counts = jax.nn.one_hot(mask, NUM_CLASSES, dtype=jnp.float32)[..., 1:].sum(axis=(2, 3))
    return (counts >= LEVEL_MIN_SHARE * mask.shape[2] * mask.shape[3]).astype(jnp.float32)


def level_loss(
    level_logits: jax.Array, mask: jax.Array, valid: jax.Array, has_mask: jax.Array
) -> Ratio:
    """BCE of each slice's level logits against `level_targets`, averaged over the valid
    slices of masked studies and the 7 levels. (B, S, 7), (B, S, H, W), (B, S), (B,) -> its
    `Ratio`."""
    bce = optax.sigmoid_binary_cross_entropy(level_logits, level_targets(mask)).mean(-1)
    return masked_ratio(bce, valid.astype(jnp.float32) * has_mask.astype(jnp.float32)[:, None])


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
    """The study, segmentation, level, slice and fracture-map loss terms as `Ratio`s, in
    float32; with the fracture stream's map (`stream_fracture_logits`), its pixel BCE too
    (`stream`)."""
    seg_ce, seg_dice = segmentation_losses(
        outputs["seg_logits"], batch["mask"], batch["valid"], batch["has_mask"]
    )
    # Where fractures are is known on studies with boxes, and on negative studies: nowhere.
    located = jnp.maximum(batch["has_boxes"], 1.0 - batch["labels"][:, 0])
    terms = {}
    if "stream_fracture_logits" in outputs:
        # Every stream slice comes from a study whose fractures are located.
        ones = jnp.ones(batch["stream_fracture"].shape[:2], jnp.float32)
        terms["stream"] = fracture_map_loss(
            outputs["stream_fracture_logits"], batch["stream_fracture"], ones, ones[:, 0]
        )
    return dict(
        **terms,
        study=study_loss(outputs["study_logits"], batch["labels"]),
        seg_ce=seg_ce,
        seg_dice=seg_dice,
        level=level_loss(outputs["level_logits"], batch["mask"], batch["valid"], batch["has_mask"]),
        slice=slice_loss(outputs["slice_logits"], batch["slice_fracture"], batch["valid"], located),
        fracture_map=fracture_map_loss(
            outputs["fracture_logits"], batch["fracture"], batch["valid"], located
        ),
    )


def compute_loss(
    outputs: dict[str, jax.Array], batch: dict[str, jax.Array], loss_cfg: Mapping[str, float]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted sum of `loss_ratios` (weights `study`, `seg_ce`, `seg_dice`, `level`,
    `slice`, `fracture_map` of loss_cfg) and the unweighted term values (for logging)."""
    return weighted_loss(loss_ratios(outputs, batch), loss_cfg)
