"""Heads on the shared slice encoder: segmentation, per-slice classifier and study pooling.

Vertebra axis convention: the segmentation has 8 classes {background, C1..C7}; every other
per-vertebra array (presence, slice logits) has 7 entries, C1..C7.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cspine_jax.data.rsna import NUM_VERTEBRAE
from cspine_jax.models.backbone import conv, group_norm, space_to_depth

NUM_CLASSES = 1 + NUM_VERTEBRAE  # background, C1..C7

# Floor of a slice's presence of a vertebra where it gates the study pool (`StudyPool`): a
# vertebra the levels find nowhere (untrained head, a scan cut above it) still gets a study
# logit, from its best slice, instead of -inf.
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
    """Bias of the decoder outputs: per output pixel (shape[0] / (NUM_CLASSES + 1) of them,
    `depth_to_space` order), log-probabilities of the pixel class prior for the NUM_CLASSES
    segmentation logits, then the prior logit of the fracture channel."""
    del key
    vertebra = (1.0 - BACKGROUND_PRIOR) / (NUM_CLASSES - 1)
    seg = jnp.log(jnp.full((NUM_CLASSES,), vertebra, dtype).at[0].set(BACKGROUND_PRIOR))
    fracture = math.log(FRACTURE_PIXEL_PRIOR / (1 - FRACTURE_PIXEL_PRIOR))
    return jnp.tile(jnp.append(seg, fracture), shape[0] // (NUM_CLASSES + 1))


def depth_to_space(x: jax.Array, factor: int) -> jax.Array:
    """(N, h, w, f*f*C) -> (N, h*f, w*f, C): the inverse of `backbone.space_to_depth`."""
    n, h, w, c = x.shape
    c //= factor * factor
    x = x.reshape(n, h, w, factor, factor, c).transpose(0, 1, 3, 2, 4, 5)
    # W, then H: as in `space_to_depth`, a reshape merging both at once has no output
    # sharding JAX can infer when N is sharded explicitly (the trainer's batch).
    x = x.reshape(n, h, factor, w * factor, c)
    return x.reshape(n, h * factor, w * factor, c)


class SegDecoder(nnx.Module):
    """FPN-like top-down decoder to the resolution of the finest feature map.

    Level widths are min(width, backbone width at that level), so the high-resolution levels,
    where almost all of the decoder's FLOPs are, stay as narrow as the encoder there.
    features (finest first, strides `strides`) -> logits (N, h, w, NUM_CLASSES + 1) at stride
    `out_stride` (a divisor of strides[0]; the last 1x1 conv predicts the
    strides[0] / out_stride squared sub-pixels of each pixel, `depth_to_space`): the
    segmentation classes, then the per-pixel fracture logit. With `image_features` > 0
    the input image joins the finest level (`image_skip`).
    """

    def __init__(
        self,
        feature_widths: Sequence[int],
        strides: Sequence[int],
        width: int,
        group_size: int,
        dtype,
        rngs: nnx.Rngs,
        out_stride: int | None = None,
        image_features: int = 0,
    ):
        self.factors = tuple(b // a for a, b in zip(strides[:-1], strides[1:], strict=True))
        self.sub_pixels = strides[0] // (out_stride or strides[0])
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
        # The image itself into the finest level (its strides[0] x strides[0] patches as
        # channels): 1-4 mm fracture gaps are a pixel or two on the input, finer than any
        # feature map the backbone keeps.
        self.image_skip = (
            conv(image_features * strides[0] ** 2, level[1], 1, 1, dtype, rngs)
            if image_features
            else None
        )
        self.out_norm = group_norm(level[0], group_size, dtype, rngs)
        self.out = nnx.Conv(
            level[0],
            (NUM_CLASSES + 1) * self.sub_pixels**2,
            (1, 1),
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=nnx.initializers.zeros_init(),
            bias_init=_seg_prior_init,
            rngs=rngs,
        )

    def __call__(self, features: Sequence[jax.Array], image: jax.Array | None = None) -> jax.Array:
        """features as the backbone gives them; image (N, H, W, C), the backbone's input,
        where the decoder was built with `image_features`."""
        x = self.top(features[-1])
        for i in reversed(range(len(self.convs))):
            x = _upsample(x, self.factors[i]) + self.laterals[i](features[i])
            if i == 0 and self.image_skip is not None:
                x = x + self.image_skip(space_to_depth(image, image.shape[1] // x.shape[1]))
            x = self.convs[i](nnx.silu(self.norms[i](x)))
        return depth_to_space(self.out(nnx.silu(self.out_norm(x))), self.sub_pixels)


def vertebra_presence(seg_logits: jax.Array, window: int) -> jax.Array:
    """Per-slice probability that each of C1..C7 is on the slice: (N, h, w, 8) -> (N, 7).

    The max over pixels of the class probability, after a `window` x `window` mean: a single
    confident pixel is not enough, a small blob is, so presence is a soft, noise-robust max.
    """
    probs = jax.nn.softmax(seg_logits.astype(jnp.float32), axis=-1)[..., 1:]
    probs = nnx.avg_pool(probs, (window, window), strides=(1, 1), padding="VALID")
    return probs.max(axis=(1, 2))


# Pixels of the fracture map read per vertebra and slice (`fracture_evidence`): about the
# stride-2 cells a 1-4 mm gap crossing a cortex covers on one slice.
EVIDENCE_PIXELS = 8
# Floor of the gate's ratio, so that its log stays finite.
_GATE_FLOOR = 1e-9


def fracture_evidence(
    seg_logits: jax.Array, fracture_logits: jax.Array, top_k: int = EVIDENCE_PIXELS
) -> jax.Array:
    """Per-slice, per-vertebra fracture logit from the pixel maps: (N, h, w, 8), (N, h, w)
    -> (N, 7), the mean of the `top_k` highest fracture logits over where vertebra v is on
    the slice: each pixel's logit plus the log of v's probability within a pixel of it,
    relative to the highest probability of any vertebra on the slice.

    A fracture pixel counts for the vertebra the segmentation puts around it, so the level
    of a fracture comes from where it is; the gap itself reads as soft tissue, which the
    segmentation may call background, hence the 3 x 3 neighbourhood. Relative to the
    slice's most certain vertebra pixel, the gate is 0 on a vertebra's own pixels whether
    the segmentation is sure (trained) or not (untrained, every class alike), so the
    evidence stays in the map's own logit units, while a vertebra the trained segmentation
    does not see on the slice gets the log of its (tiny) probability. The
    strongest pixels, not the flagged share of the area: a few cells of a thin gap are the
    whole finding, and their logit is what the map is trained to make confident
    (`fracture_map_loss`).
    """
    vertebra = jax.nn.softmax(seg_logits.astype(jnp.float32), axis=-1)[..., 1:]
    near = nnx.max_pool(vertebra, (3, 3), strides=(1, 1), padding="SAME")
    near = near / jnp.maximum(near.max(axis=(1, 2, 3), keepdims=True), _GATE_FLOOR)
    score = fracture_logits.astype(jnp.float32)[..., None] + jnp.log(near + _GATE_FLOOR)
    n, h, w, v = score.shape
    top = jax.lax.top_k(jnp.moveaxis(score.reshape(n, h * w, v), 1, 2), top_k)[0]
    return top.mean(-1)


def slice_embedding(features: jax.Array) -> jax.Array:
    """(N, h, w, C) activated deepest features -> (N, 2C): their mean and max over the slice.

    The max keeps a small lesion's response that the mean over the whole slice dilutes."""
    return jnp.concatenate([features.mean(axis=(1, 2)), features.max(axis=(1, 2))], axis=-1)


# Knots (in prepared slices, signed: key minus query) of the piecewise-linear attention bias
# over z distance; beyond the outer knots the bias is constant. Dense near 0, where the
# neighbouring slices of the same vertebra are, sparse far away, where only which way and
# roughly how far (a vertebra is ~8 slices of 2 mm) matter.
Z_KNOTS = (-64.0, -32.0, -16.0, -8.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


def _hats(x: jax.Array, knots: Sequence[float]) -> jax.Array:
    """(...) -> (..., len(knots)) piecewise-linear interpolation weights of x on `knots`
    (ascending), constant beyond the outer knots: sum_j w_j * values_j interpolates values."""
    k = np.asarray(knots, np.float32)
    x = jnp.clip(x, k[0], k[-1])[..., None]
    rising = (x - k[:-1]) / (k[1:] - k[:-1])  # (..., J-1): segment j-1 -> j
    up = jnp.concatenate([jnp.ones_like(x), rising], axis=-1)
    down = jnp.concatenate([1.0 - rising, jnp.ones_like(x)], axis=-1)
    return jnp.clip(jnp.minimum(up, down), 0.0, 1.0)


class ZBlock(nnx.Module):
    """Pre-LayerNorm transformer block along z with a learned bias on z distance.

    Attention is over the valid slices of one study; the bias is a per-head piecewise-linear
    function of the signed distance between slices (`Z_KNOTS`), so any sampling of a study
    (S jittered slices in training, every slice at inference, any spacing) reads alike.
    x (B, S, D), z (B, S) slice positions, valid (B, S) -> (B, S, D).
    """

    def __init__(self, width: int, heads: int, dtype, rngs: nnx.Rngs):
        if width % heads:
            raise ValueError(f"z-context width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.norm1 = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
        self.query = nnx.Linear(width, width, dtype=dtype, rngs=rngs)
        # No bias on the keys: it would add the same q . b to every score of a query, which
        # softmax ignores, so its gradient is rounding noise that Adam turns into steps.
        self.key = nnx.Linear(width, width, use_bias=False, dtype=dtype, rngs=rngs)
        self.value = nnx.Linear(width, width, dtype=dtype, rngs=rngs)
        self.proj = nnx.Linear(width, width, dtype=dtype, rngs=rngs)
        self.bias = nnx.Param(jnp.zeros((heads, len(Z_KNOTS))))
        self.norm2 = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
        self.mlp_in = nnx.Linear(width, 2 * width, dtype=dtype, rngs=rngs)
        self.mlp_out = nnx.Linear(2 * width, width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, z: jax.Array, valid: jax.Array) -> jax.Array:
        b, s, d = x.shape
        normed = self.norm1(x)
        q, k, v = (
            layer(normed).reshape(b, s, self.heads, -1)
            for layer in (self.query, self.key, self.value)
        )
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(
            d // self.heads
        )
        z = z.astype(jnp.float32)
        delta = z[:, None, :] - z[:, :, None]  # (B, q, k)
        bias = jnp.einsum("bqkj,hj->bhqk", _hats(delta, Z_KNOTS), self.bias[...])
        logits = jnp.where(valid[:, None, None, :] > 0, logits + bias, -1e9)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, s, d)
        x = x + self.proj(attended)
        return x + self.mlp_out(nnx.silu(self.mlp_in(self.norm2(x))))


# Share of a study's slices that show a given vertebra (~1 in 7, plus overlaps): the level
# head's starting prior.
LEVEL_PRIOR = 0.2


class ZContext(nnx.Module):
    """Level identity and per-level fracture logits from the slices around each slice.

    An axial slice and its two neighbours cannot tell C4 from C5; the sequence of a study's
    slices can (count down from the skull base and C2's dens). Embeds each slice's features,
    runs `layers` `ZBlock`s along z (0: each slice on its own, the no-context ablation) and
    reads two heads: level logits (is C_v on this slice) and fracture logits (is C_v broken
    on this slice, read from the sequence without shaping it), the latter added to the pixel
    evidence.
    x (B, S, F), z (B, S), valid (B, S) -> level logits (B, S, 7), fracture logits (B, S, 7).
    """

    def __init__(
        self, in_features: int, width: int, layers: int, heads: int, dtype, rngs: nnx.Rngs
    ):
        self.embed = nnx.Linear(in_features, width, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([ZBlock(width, heads, dtype, rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
        prior = math.log(LEVEL_PRIOR / (1 - LEVEL_PRIOR))
        self.level = nnx.Linear(
            width,
            NUM_VERTEBRAE,
            dtype=dtype,
            kernel_init=nnx.initializers.zeros_init(),
            bias_init=nnx.initializers.constant(prior),
            rngs=rngs,
        )
        # Adds to the pixel evidence (`fracture_evidence`), so it starts as a no-op.
        self.fracture = nnx.Linear(
            width,
            NUM_VERTEBRAE,
            dtype=dtype,
            kernel_init=nnx.initializers.zeros_init(),
            bias_init=nnx.initializers.zeros_init(),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, z: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, z, valid)
        h = nnx.silu(self.norm(h))
        # The fracture head reads the sequence, it does not shape it: the study and slice
        # losses through it would turn the blocks into a per-study fracture memory (the
        # study loss reaches the map's evidence only detached) and starve the levels.
        fracture = self.fracture(jax.lax.stop_gradient(h))
        return self.level(h).astype(jnp.float32), fracture.astype(jnp.float32)


def noisy_or_logit(logits: jax.Array, axis: int) -> jax.Array:
    """logit(1 - prod(1 - sigmoid(logits))) along `axis`, computed in log space."""
    log_none = -jax.nn.softplus(logits).sum(axis=axis)  # log prod(1 - p), <= 0
    # Clamped below 0 so that log(1 - prod) stays finite when every p underflows to 0.
    log_none = jnp.minimum(log_none, -1e-12)
    return jnp.log(-jnp.expm1(log_none)) - log_none


# The study pool's affine parameters move CALIBRATION_RATE times faster than Adam's step on
# a parameter (`StudyPool`): the calibration of the map's logits into study probabilities is
# a few numbers that must travel several logits within a run of a few hundred steps.
CALIBRATION_RATE = 10.0


class Calibration(nnx.Module):
    """A per-level affine of logits, rate * (scale * x + bias), whose parameters move
    `CALIBRATION_RATE` times faster than Adam's step: (..., 7) -> (..., 7). Starts as
    x + `bias` (default 0)."""

    def __init__(self, bias: float = 0.0):
        self.scale = nnx.Param(jnp.full((NUM_VERTEBRAE,), 1.0 / CALIBRATION_RATE))
        self.bias = nnx.Param(jnp.full((NUM_VERTEBRAE,), bias / CALIBRATION_RATE))

    def __call__(self, x: jax.Array) -> jax.Array:
        return CALIBRATION_RATE * (self.scale[...] * x + self.bias[...])


class StudyPool(nnx.Module):
    """Study logits [patient_overall, C1..C7] from per-slice logits, pooled over z.

    C_v: the maximum over the slices of the slice logit plus the log of the slice's
    presence of v (a slice that does not show v does not speak for it), through a learned
    per-level affine. A maximum, not a mean: the evidence of a fracture is on the few slices
    it crosses, whatever the number of slices read (a few jittered ones in training, every
    slice at inference). patient_overall: the noisy-OR of the seven vertebra probabilities,
    as a logit, through a learned affine. The affines' parameters are scaled by
    `CALIBRATION_RATE`; they start at the identity, the bias of C_v cancelling the presence
    prior (`LEVEL_PRIOR`) the untrained levels give every slice.
    Any S works and slice order does not matter.
    slice_logits (B, S, 7), presence (B, S, 7), valid (B, S) -> (B, 8), float32.
    """

    def __init__(self):
        rate = CALIBRATION_RATE
        self.vertebra = Calibration(-math.log(LEVEL_PRIOR))
        self.overall_scale = nnx.Param(jnp.full((), 1.0 / rate))
        self.overall_bias = nnx.Param(jnp.zeros(()))

    def __call__(self, slice_logits: jax.Array, presence: jax.Array, valid: jax.Array) -> jax.Array:
        rate = CALIBRATION_RATE
        gated = slice_logits.astype(jnp.float32) + jnp.log(
            presence.astype(jnp.float32) + PRESENCE_FLOOR
        )
        # Padding rows are out exactly; a study without a valid slice pools to 0.
        gated = jnp.where(valid[..., None] > 0, gated, -jnp.inf)
        peak = gated.max(axis=1)
        peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
        vertebra = self.vertebra(peak)
        overall = rate * (
            self.overall_scale[...] * noisy_or_logit(vertebra, axis=-1) + self.overall_bias[...]
        )
        return jnp.concatenate([overall[:, None], vertebra], axis=-1)
