"""The in-step warp: identity is exact, geometry is right, labels stay labels."""

import jax
import numpy as np

from cspine_jax import augment
from cspine_jax.data import pipeline

B, S, G, C = 2, 3, 12, 4  # C - 1 CT channels, then the position channel


def _batch(warp):
    rng = np.random.default_rng(0)
    image = rng.random((B, S, G, G, C), np.float32)
    image[..., -1] = np.arange(S, dtype=np.float32)[None, :, None, None] / S
    return {
        "image": image,
        "mask": rng.integers(0, 8, (B, S, G, G)).astype(np.int32),
        "fracture": rng.integers(0, 2, (B, S, G, G)).astype(np.int32),
        "warp": np.asarray(warp, np.float32),
        "labels": np.ones((B, 8), np.float32),
    }


def _warp(batch):
    return jax.device_get(jax.jit(lambda b: augment.apply_warp(b, C - 1))(batch))


def test_no_warp_is_exact():
    batch = _batch(np.stack([pipeline.NO_WARP] * B))
    out = _warp(batch)
    for k in batch:
        np.testing.assert_array_equal(out[k], batch[k], err_msg=k)


def test_quarter_turn_shift_and_labels():
    # Study 0 turns by 90 degrees, study 1 moves by (2, -3) pixels: both exact on the grid.
    batch = _batch([[np.pi / 2, 1.0, 0.0, 0.0], [0.0, 1.0, 2.0, -3.0]])
    out = _warp(batch)
    for k in ("mask", "fracture"):
        turned = np.rot90(batch[k][0], k=1, axes=(1, 2))  # content turns towards +x -> -y
        turned_alt = np.rot90(batch[k][0], k=-1, axes=(1, 2))
        assert np.array_equal(out[k][0], turned) or np.array_equal(out[k][0], turned_alt), k
        assert out[k].dtype == batch[k].dtype
        moved = np.zeros_like(batch[k][1])
        moved[:, 2:, : G - 3] = batch[k][1][:, : G - 2, 3:]
        np.testing.assert_array_equal(out[k][1], moved, err_msg=k)
    # The position channel is constant in-plane: warping must not touch (or blank) it.
    np.testing.assert_array_equal(out["image"][..., -1], batch["image"][..., -1])
    np.testing.assert_allclose(
        out["image"][1, :, 2:, : G - 3, :-1], batch["image"][1, :, : G - 2, 3:, :-1], atol=1e-6
    )


def test_rotation_direction_matches_for_image_and_labels():
    batch = _batch([[0.3, 1.1, 1.0, 0.5]] * B)
    yy, xx = np.mgrid[:G, :G]
    blocks = ((yy // 4) * 3 + xx // 4) % 8  # label regions wide enough for bilinear plateaus
    batch["mask"][:] = blocks
    batch["image"][..., :-1] = blocks[..., None].astype(np.float32)
    out = _warp(batch)
    # Where the bilinear image sits on a single label value, it equals the warped label.
    ct = out["image"][..., 0]
    exact = np.isclose(ct, np.round(ct), atol=1e-4)
    assert exact.mean() > 0.3
    np.testing.assert_array_equal(np.round(ct[exact]), out["mask"][exact])
