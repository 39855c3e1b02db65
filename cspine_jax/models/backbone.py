"""The shared 2.5D slice encoder: a compact pre-activation ResNet.

Normalisation is GroupNorm, whose statistics are per sample: the forward pass of a slice does
not depend on the other slices of the batch, so a data-parallel step on 8 devices computes
exactly what one device computes, and there is no mutable batch-statistics state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def group_norm(features: int, group_size: int, dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """GroupNorm with about `group_size` channels per group (at least one group).

    Sized by channels per group, not by group count: narrow layers with one channel per group
    would be InstanceNorm, which erases which input channel (CT window, neighbour slice) a
    pattern came from; Wu & He 2018 find ~16 channels per group as good as 32 groups.
    """
    groups = math.gcd(features, max(1, features // group_size))
    return nnx.GroupNorm(features, num_groups=groups, dtype=dtype, rngs=rngs)


def conv(
    in_features: int, out_features: int, kernel: int, stride: int, dtype, rngs: nnx.Rngs
) -> nnx.Conv:
    """A 'SAME' conv computing in `dtype` with float32 parameters."""
    return nnx.Conv(
        in_features,
        out_features,
        (kernel, kernel),
        strides=stride,
        padding="SAME",
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


class PreActBlock(nnx.Module):
    """Pre-activation residual block: (GN, SiLU, conv3x3) twice, plus a shortcut.

    (N, h, w, in_features) -> (N, h/stride, w/stride, out_features).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        stride: int,
        group_size: int,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.norm1 = group_norm(in_features, group_size, dtype, rngs)
        self.conv1 = conv(in_features, out_features, 3, stride, dtype, rngs)
        self.norm2 = group_norm(out_features, group_size, dtype, rngs)
        self.conv2 = conv(out_features, out_features, 3, 1, dtype, rngs)
        needs_projection = stride != 1 or in_features != out_features
        self.shortcut = (
            conv(in_features, out_features, 1, stride, dtype, rngs) if needs_projection else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.silu(self.norm1(x))
        # The projection reads the normalised input, as in He et al. 2016 (identity mappings):
        # the un-normalised residual stream can have a large scale.
        shortcut = x if self.shortcut is None else self.shortcut(h)
        h = self.conv1(h)
        h = self.conv2(nnx.silu(self.norm2(h)))
        return shortcut + h


def space_to_depth(x: jax.Array, factor: int) -> jax.Array:
    """(N, H, W, C) -> (N, H/f, W/f, f*f*C): each f x f patch of pixels as one pixel's
    channels, in (row, column, channel) order."""
    n, h, w, c = x.shape
    # H, then W: JAX cannot infer the output sharding of a reshape splitting both at once
    # when N is sharded explicitly (the trainer's batch), one split at a time it can.
    x = x.reshape(n, h // factor, factor, w, c)
    x = x.reshape(n, h // factor, factor, w // factor, factor, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, h // factor, w // factor, -1)


class Backbone(nnx.Module):
    """Stem then stages of `PreActBlock`s.

    The stem: with `stem_patch` = 0 a 3x3 conv of stride 2; with p > 0 the image cut into
    p x p patches (`space_to_depth`) and a 3x3 conv over those, stride p. XLA-CPU runs narrow
    full-resolution layers at a few GFLOP/s against ~100 for 64-128 channels at low
    resolution, so patches spend the same FLOPs several times faster.
    (N, H, W, C) -> list of feature maps, finest first: the stem output (stride s0 = 2 or p)
    and each stage's output (stride s0 * prod(strides[:i+1])), as raw residual streams (not
    normalised); `feature_strides` lists those strides.
    """

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int],
        depths: Sequence[int],
        strides: Sequence[int],
        group_size: int,
        dtype,
        rngs: nnx.Rngs,
        stem_patch: int = 0,
    ):
        if not len(widths) == len(depths) == len(strides):
            raise ValueError(
                f"widths {widths}, depths {depths} and strides {strides} must have "
                "one entry per stage"
            )
        self.stem_patch = stem_patch
        if stem_patch:
            self.stem = conv(in_features * stem_patch**2, widths[0], 3, 1, dtype, rngs)
        else:
            self.stem = conv(in_features, widths[0], 3, 2, dtype, rngs)
        first = stem_patch or 2
        self.feature_strides = tuple(
            first * math.prod(strides[:i]) for i in range(len(strides) + 1)
        )
        blocks = []
        previous = widths[0]
        for width, depth, stride in zip(widths, depths, strides, strict=True):
            stage = [
                PreActBlock(
                    previous if i == 0 else width,
                    width,
                    stride if i == 0 else 1,
                    group_size,
                    dtype,
                    rngs,
                )
                for i in range(depth)
            ]
            blocks.append(nnx.List(stage))
            previous = width
        self.stages = nnx.List(blocks)

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        if self.stem_patch:
            x = space_to_depth(x, self.stem_patch)
        x = self.stem(x)
        features = [x]
        for stage in self.stages:
            for block in stage:
                x = block(x)
            features.append(x)
        return features
