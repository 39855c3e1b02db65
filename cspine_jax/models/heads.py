"""Heads on the shared slice encoder: segmentation, per-slice classifier and study pooling.

Vertebra axis convention: the segmentation has 8 classes {background, C1..C7}; every other
per-vertebra array (presence, slice logits) has 7 entries, C1..C7.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cspine_jax.data.rsna import NUM_VERTEBRAE
from cspine_jax.models.backbone import conv, group_norm

NUM_CLASSES = 1 + NUM_VERTEBRAE  # background, C1..C7

# Weight every valid slice gets on top of its presence: a vertebra the segmentation finds
# nowhere (untrained head, a scan cut above it) still gets a study logit, the log-mean-exp over
# all valid slices, instead of 0/0.
PRESENCE_FLOOR = 1e-4
# Output layers start with zero kernels and biases at these priors (as big_vision's zero-init
# heads): initial predictions are the priors, not random logits of scale 1, and Adam, which moves
# each parameter by ~lr per step, does not spend the first hundred steps unlearning them.
# Probability of background in a segmentation pixel (the rest shared by C1..C7):
BACKGROUND_PRIOR = 0.9
# Probability that a pixel lies inside a fracture box:
FRACTURE_PIXEL_PRIOR = 0.01


def label_grid(mask, size: int):
    """Labels (..., H, W) -> the segmentation output's (..., size, size) grid, numpy or jax.

    Each output pixel summarises a factor x factor cell of the input (factor = W // size):
    it takes the label nearest the cell's centre. The loss and the evaluation's Dice share this
    so that both score the same pixels.
    """
    factor = mask.shape[-1] // size
    return mask[..., factor // 2 :: factor, factor // 2 :: factor]


def _upsample(x: jax.Array, factor: int) -> jax.Array:
    """Nearest-neighbour upsampling (N, h, w, C) -> (N, h*factor, w*factor, C)."""
    if factor == 1:
        return x
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def _seg_prior_init(key, shape, dtype=jnp.float32):
    """Bias of the decoder outputs: log-probabilities of the pixel class prior for the
    NUM_CLASSES segmentation logits, then the prior logit of the fracture channel."""
    del key
    vertebra = (1.0 - BACKGROUND_PRIOR) / (NUM_CLASSES - 1)
    seg = jnp.log(jnp.full((NUM_CLASSES,), vertebra, dtype).at[0].set(BACKGROUND_PRIOR))
    fracture = math.log(FRACTURE_PIXEL_PRIOR / (1 - FRACTURE_PIXEL_PRIOR))
    return jnp.concatenate([seg, jnp.full((shape[0] - NUM_CLASSES,), fracture, dtype)])


class SegDecoder(nnx.Module):
    """FPN-like top-down decoder to the resolution of the finest feature map.

    Level widths are min(width, backbone width at that level), so the high-resolution levels,
    where almost all of the decoder's FLOPs are, stay as narrow as the encoder there.
    features (finest first, strides `strides`) -> logits (N, h, w, NUM_CLASSES + 1) at
    strides[0]: the segmentation classes, then the per-pixel fracture logit.
    """

    def __init__(
        self,
        feature_widths: Sequence[int],
        strides: Sequence[int],
        width: int,
        group_size: int,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.factors = tuple(b // a for a, b in zip(strides[:-1], strides[1:], strict=True))
        level = [min(width, w) for w in feature_widths]
        self.top = conv(feature_widths[-1], level[-1], 1, 1, dtype, rngs)
        # Level i merges the upsampled level i+1 with a 1x1 lateral of feature i, then a 3x3
        # conv narrows it to level i's width.
        self.laterals = nnx.List(
            [
                conv(feature_widths[i], level[i + 1], 1, 1, dtype, rngs)
                for i in range(len(level) - 1)
            ]
        )
        self.norms = nnx.List(
            [group_norm(level[i + 1], group_size, dtype, rngs) for i in range(len(level) - 1)]
        )
        self.convs = nnx.List(
            [conv(level[i + 1], level[i], 3, 1, dtype, rngs) for i in range(len(level) - 1)]
        )
        self.out_norm = group_norm(level[0], group_size, dtype, rngs)
        self.out = nnx.Conv(
            level[0],
            NUM_CLASSES + 1,
            (1, 1),
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=nnx.initializers.zeros_init(),
            bias_init=_seg_prior_init,
            rngs=rngs,
        )

    def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
        x = self.top(features[-1])
        for i in reversed(range(len(self.convs))):
            x = _upsample(x, self.factors[i]) + self.laterals[i](features[i])
            x = self.convs[i](nnx.silu(self.norms[i](x)))
        return self.out(nnx.silu(self.out_norm(x)))


def vertebra_presence(seg_logits: jax.Array, window: int) -> jax.Array:
    """Per-slice probability that each of C1..C7 is on the slice: (N, h, w, 8) -> (N, 7).

    The max over pixels of the class probability, after a `window` x `window` mean: a single
    confident pixel is not enough, a small blob is, so presence is a soft, noise-robust max.
    """
    probs = jax.nn.softmax(seg_logits.astype(jnp.float32), axis=-1)[..., 1:]
    probs = nnx.avg_pool(probs, (window, window), strides=(1, 1), padding="VALID")
    return probs.max(axis=(1, 2))


def fracture_evidence(seg_logits: jax.Array, fracture_logits: jax.Array) -> jax.Array:
    """Per-slice, per-vertebra fracture logit from the pixel maps: (N, h, w, 8), (N, h, w)
    -> (N, 7), the logit of the share of vertebra v's area that the fracture map flags,
    sum(P(v) * P(fracture)) / sum(P(v)).

    A fracture pixel counts for the vertebra the segmentation puts under it, so the level of
    a fracture comes from where it is, not from a global guess. An area share rather than a
    maximum: a max over thousands of pixels saturates on the map's scattered false alarms.
    """
    vertebra = jax.nn.softmax(seg_logits.astype(jnp.float32), axis=-1)[..., 1:]
    fracture = jax.nn.sigmoid(fracture_logits.astype(jnp.float32))[..., None]
    share = (vertebra * fracture).sum(axis=(1, 2)) / (vertebra.sum(axis=(1, 2)) + 1.0)
    share = jnp.clip(share, 1e-6, 1 - 1e-6)
    return jnp.log(share) - jnp.log1p(-share)


class SliceClassifier(nnx.Module):
    """Per-slice fracture logits for C1..C7 from the deepest feature map.

    Conditioned on the slice's vertebra presence: a slice shows one or two vertebrae, and a
    fracture feature means "C2 fractured" only if the head knows the slice is at C2.
    (N, h, w, C), presence (N, 7) -> logits (N, 7).
    """

    def __init__(self, in_features: int, hidden: int, group_size: int, dtype, rngs: nnx.Rngs):
        self.norm = group_norm(in_features, group_size, dtype, rngs)
        self.features = nnx.Linear(2 * in_features, hidden, dtype=dtype, rngs=rngs)
        self.presence = nnx.Linear(NUM_VERTEBRAE, hidden, dtype=dtype, rngs=rngs)
        # Adds to the pixel evidence (`fracture_evidence`), so it starts as a no-op.
        self.out = nnx.Linear(
            hidden,
            NUM_VERTEBRAE,
            dtype=dtype,
            kernel_init=nnx.initializers.zeros_init(),
            bias_init=nnx.initializers.zeros_init(),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, presence: jax.Array) -> jax.Array:
        x = nnx.silu(self.norm(x))
        pooled = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
        hidden = nnx.silu(self.features(pooled) + self.presence(presence.astype(x.dtype)))
        return self.out(hidden)


def weighted_log_mean_exp(x: jax.Array, weights: jax.Array, axis: int) -> jax.Array:
    """log(sum(w * exp(x)) / sum(w)) along `axis`; entries with w == 0 are ignored exactly.

    Zero-weight entries contribute an exact 0 (not exp(x) * 0, which overflows to nan for
    large x), so padding never changes the result. All-zero weights give 0.
    """
    active = weights > 0
    z = jnp.where(active, x, -jnp.inf)
    peak = jax.lax.stop_gradient(z.max(axis=axis, keepdims=True))
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    total = (weights * jnp.exp(z - peak)).sum(axis=axis)
    norm = weights.sum(axis=axis)
    any_active = norm > 0
    ratio = jnp.where(any_active, total, 1.0) / jnp.where(any_active, norm, 1.0)
    return jnp.where(any_active, jnp.log(ratio) + jnp.squeeze(peak, axis), 0.0)


def noisy_or_logit(logits: jax.Array, axis: int) -> jax.Array:
    """logit(1 - prod(1 - sigmoid(logits))) along `axis`, computed in log space."""
    log_none = -jax.nn.softplus(logits).sum(axis=axis)  # log prod(1 - p), <= 0
    # Clamped below 0 so that log(1 - prod) stays finite when every p underflows to 0.
    log_none = jnp.minimum(log_none, -1e-12)
    return jnp.log(-jnp.expm1(log_none)) - log_none


class StudyPool(nnx.Module):
    """Study logits [patient_overall, C1..C7] from per-slice logits, pooled over z.

    C_v: a presence-weighted log-mean-exp at a fixed temperature (a soft max over the slices
    where the vertebra is) plus a learned bias. The temperature is not learned: while the
    slice logits are still alike (all of early training) its gradient is rounding noise,
    which Adam would turn into full-size random steps. patient_overall: the noisy-OR
    of the seven vertebra probabilities, as a logit, through a learned affine.
    Sums over slices only, so any S works and slice order does not matter.
    slice_logits (B, S, 7), presence (B, S, 7), valid (B, S) -> (B, 8), float32.
    """

    def __init__(self, temperature: float):
        self.temperature = float(temperature)
        self.bias = nnx.Param(jnp.zeros((NUM_VERTEBRAE,)))
        self.overall_scale = nnx.Param(jnp.ones(()))
        self.overall_bias = nnx.Param(jnp.zeros(()))

    def __call__(self, slice_logits: jax.Array, presence: jax.Array, valid: jax.Array) -> jax.Array:
        slice_logits = slice_logits.astype(jnp.float32)
        weights = valid.astype(jnp.float32)[..., None] * (
            presence.astype(jnp.float32) + PRESENCE_FLOOR
        )
        tau = self.temperature
        vertebra = tau * weighted_log_mean_exp(slice_logits / tau, weights, axis=1)
        vertebra = vertebra + self.bias[...]
        overall = (
            self.overall_scale[...] * noisy_or_logit(vertebra, axis=-1) + self.overall_bias[...]
        )
        return jnp.concatenate([overall[:, None], vertebra], axis=-1)
