"""In-plane geometric augmentation, applied inside the jitted train step.

The input pipeline draws one warp per study (`pipeline.SampleStudy`: rotation, scale,
shift) and ships it as four numbers; the step resamples the study's slices on the device.
A bilinear warp of S x (K*W) planes costs more host time per study than the whole train step
on a 2-core machine, but inside XLA it is one fused gather, a few per cent of the step.
Drawing the parameters on the host keeps them part of Grain's seeded, checkpointed stream, so
resumed and multi-process runs see exactly the same augmentation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_SNAP = 256.0


def _source_coords(warp: jax.Array, size: int) -> jax.Array:
    """Where each output pixel samples the input: warp (4,) -> (2, size, size) (y, x).

    Output pixel p takes the input at c + R(-angle) (p - c) / scale - shift, c the centre:
    the content turns by `angle` (radians), grows by `scale`, moves by `shift` pixels.
    """
    angle, scale, dy, dx = warp[0], warp[1], warp[2], warp[3]
    centre = (size - 1) / 2.0
    yy, xx = jnp.meshgrid(
        jnp.arange(size, dtype=jnp.float32) - centre,
        jnp.arange(size, dtype=jnp.float32) - centre,
        indexing="ij",
    )
    cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale
    coords = jnp.stack([cos * yy - sin * xx + centre - dy, sin * yy + cos * xx + centre - dx])
    # Snapped to 1/256 pixel: programs compiled for different meshes may round the products
    # differently by an ulp, which would flip nearest-neighbour labels at half-pixel ties and
    # make a sharded step differ from the single-device one.
    return jnp.round(coords * _SNAP) / _SNAP


def _resample(plane: jax.Array, coords: jax.Array, order: int) -> jax.Array:
    """One (H, W) plane at `coords` (2, H, W); outside the field of view is 0 (air after
    windowing, background in label maps)."""
    return jax.scipy.ndimage.map_coordinates(
        plane, list(coords), order=order, mode="constant", cval=0
    )


def apply_warp(batch: dict[str, jax.Array], image_channels: int) -> dict[str, jax.Array]:
    """Warps each study of a training batch by its `warp` row (B, 4).

    image (B, S, H, W, C) float: the first `image_channels` channels (CT windows) are
    resampled bilinearly, the rest (the slice-position channel, constant in-plane) is kept;
    mask and fracture (B, S, H, W) int, where present: nearest neighbour, so labels stay labels.
    Returns a new batch; the input is unchanged.
    """
    size = batch["image"].shape[2]
    coords = jax.vmap(_source_coords, in_axes=(0, None))(batch["warp"], size)  # (B, 2, H, W)

    def planes(x, order):  # (B, S, H, W) -> same, one coordinate grid per study
        per_study = jax.vmap(lambda p, c: _resample(p, c, order), in_axes=(0, None))
        return jax.vmap(per_study)(x, coords)

    image = batch["image"]
    ct = jnp.moveaxis(image[..., :image_channels], -1, 2)  # (B, S, C', H, W)
    b, s, c, h, w = ct.shape
    ct = planes(ct.reshape(b, s * c, h, w), 1).reshape(b, s, c, h, w)
    out = dict(batch)
    out["image"] = jnp.concatenate([jnp.moveaxis(ct, 2, -1), image[..., image_channels:]], -1)
    for name in ("mask", "fracture"):
        if name in batch:  # the two-stage classifier's stacks come without label maps
            out[name] = planes(batch[name], 0)
    return out


def apply_stream_warps(batch: dict[str, jax.Array], image_channels: int) -> dict[str, jax.Array]:
    """Warps each fracture-stream slice by its own `stream_warp` row (B, F, 4):
    stream_image (B, F, H, W, C) and stream_fracture (B, F, H, W) as `apply_warp` warps a
    study's slices, each slice its own one-slice study. Returns a new batch."""
    image, fracture = batch["stream_image"], batch["stream_fracture"]
    # B and F merged, then a new axis: a sharded B splits one reshape at a time.
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    warped = apply_warp(
        {
            "image": flat(image)[:, None],
            "fracture": flat(fracture)[:, None],
            "warp": flat(batch["stream_warp"]),
        },
        image_channels,
    )
    return {
        **batch,
        "stream_image": warped["image"][:, 0].reshape(image.shape),
        "stream_fracture": warped["fracture"][:, 0].reshape(fracture.shape),
    }
