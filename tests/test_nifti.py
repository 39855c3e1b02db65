"""NIfTI vertebra masks: the RSNA storage quirk on write, alignment by geometry on load."""

import nibabel as nib
import numpy as np
import pytest

from cspine_jax.data.dicom import Series, load_series
from cspine_jax.data.dicom_writer import write_series
from cspine_jax.data.nifti import MaskError, load_mask, write_mask

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def make_series(
    z=9,
    y=20,
    x=24,
    *,
    origin=(-40.0, -55.0, 70.0),
    spacing=(1.5, 0.8, 0.7),
    uid="1.2.826.0.1.3680043.8.498.7",
):
    """Axial series, superior first; HU irrelevant here, geometry is what counts."""
    positions = np.asarray(origin) + np.arange(z)[:, None] * [0.0, 0.0, -spacing[0]]
    return Series(
        uid,
        np.zeros((z, y, x), np.float32),
        spacing,
        positions,
        [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        np.arange(1, z + 1),
    )


def make_labels(shape, seed=0):
    """Integer labels 0..19 with no symmetry, so any wrong flip or transpose shows."""
    return np.random.default_rng(seed).integers(0, 20, shape).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("shape", [(9, 20, 24), (7, 32, 32)], ids=["non-square", "square"])
def test_round_trip(tmp_path, shape, suffix):
    series = make_series(*shape)
    labels = make_labels(shape)
    path = tmp_path / f"{series.uid}{suffix}"
    write_mask(path, labels, series)
    mask = load_mask(path, series)
    assert mask.dtype == np.uint8 and mask.flags.c_contiguous
    np.testing.assert_array_equal(mask, labels)


def test_round_trip_with_a_reverse_numbered_dicom_study(tmp_path):
    source = make_series()
    write_series(
        tmp_path / "dcm",
        Series(
            source.uid,
            source.hu,
            source.spacing,
            source.positions,
            source.orientation,
            source.slice_numbers[::-1],
        ),
    )
    series = load_series(tmp_path / "dcm")
    labels = make_labels(series.shape, seed=1)
    write_mask(tmp_path / "m.nii", labels, series)
    np.testing.assert_array_equal(load_mask(tmp_path / "m.nii", series), labels)


def test_file_has_the_rsna_layout_and_a_correct_ras_affine(tmp_path):
    series = make_series()
    z, y, x = series.shape
    labels = make_labels(series.shape)
    write_mask(tmp_path / "m.nii", labels, series)
    image = nib.load(tmp_path / "m.nii")
    stored = np.asanyarray(image.dataobj)
    assert stored.shape == (x, y, z)
    i, j, k = np.meshgrid(np.arange(x), np.arange(y), np.arange(z), indexing="ij")
    np.testing.assert_array_equal(stored, labels[z - 1 - k, y - 1 - j, i])

    # The RAS affine must put stored voxel (i, j, k) where the DICOM header puts its voxel,
    # computed here from positions and direction cosines, not from Series.affine.
    row, col = series.orientation[:3], series.orientation[3:]
    for i_, j_, k_ in [(0, 0, 0), (x - 1, 0, 2), (3, y - 1, z - 1), (x - 1, y - 1, z - 1)]:
        zz, yy, xx = z - 1 - k_, y - 1 - j_, i_
        lps = series.positions[zz] + yy * series.spacing[1] * col + xx * series.spacing[2] * row
        ras = image.affine @ [i_, j_, k_, 1]
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-4)
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1


def _write_other_layout(path, labels, series, axes, flips, dtype=np.uint8):
    """Store labels with stored axis a = series axis axes[a], flipped where flips[a].

    The affine is built from the series geometry for that layout: a consistent file that
    simply differs from the RSNA quirk.
    """
    flipped = labels[
        tuple(slice(None, None, -1) if flips[axes.index(s)] else slice(None) for s in range(3))
    ]
    stored = flipped.transpose(axes)
    index = np.zeros((4, 4))  # stored index (a0, a1, a2, 1) -> series index (z, y, x, 1)
    for a, s in enumerate(axes):
        index[s, a] = -1.0 if flips[a] else 1.0
        index[s, 3] = labels.shape[s] - 1 if flips[a] else 0.0
    index[3, 3] = 1.0
    affine = LPS_FROM_RAS @ series.affine @ index
    nib.save(nib.Nifti1Image(stored.astype(dtype), affine), path)


@pytest.mark.parametrize(
    "axes, flips",
    [
        ((0, 1, 2), (False, False, False)),  # stored as (z, y, x), its own correct affine
        ((2, 1, 0), (False, False, False)),  # (x, y, z) without the flips
        ((1, 0, 2), (True, False, True)),
        ((2, 0, 1), (False, True, True)),
    ],
)
def test_any_consistent_layout_loads_aligned(tmp_path, axes, flips):
    series = make_series()
    labels = make_labels(series.shape, seed=2)
    _write_other_layout(tmp_path / "m.nii", labels, series, axes, flips)
    np.testing.assert_array_equal(load_mask(tmp_path / "m.nii", series), labels)


def test_integer_valued_float_and_int16_masks_load(tmp_path):
    series = make_series()
    labels = make_labels(series.shape, seed=3)
    for dtype in (np.float32, np.int16):
        _write_other_layout(
            tmp_path / "m.nii", labels, series, (2, 1, 0), (False, True, True), dtype
        )
        np.testing.assert_array_equal(load_mask(tmp_path / "m.nii", series), labels)


def test_shape_mismatch_names_both_shapes(tmp_path):
    write_mask(tmp_path / "m.nii", make_labels((9, 20, 24)), make_series(9, 20, 24))
    with pytest.raises(MaskError, match=r"\(9, 20, 24\).*\(10, 20, 24\)") as err:
        load_mask(tmp_path / "m.nii", make_series(10, 20, 24))
    assert str(err.value).startswith(f"{tmp_path / 'm.nii'}: ")


def test_mask_of_another_study_geometry_is_rejected(tmp_path):
    series = make_series()
    write_mask(tmp_path / "m.nii", make_labels(series.shape), series)
    shifted = make_series(origin=(-40.0 + 4 * 0.7, -55.0, 70.0))
    with pytest.raises(MaskError, match="does not match study") as err:
        load_mask(tmp_path / "m.nii", shifted)
    assert str(err.value).startswith(f"{tmp_path / 'm.nii'}: ")
    # Two slices out along z is also another study, even with the same in-plane frame.
    with pytest.raises(MaskError, match="does not match study"):
        load_mask(tmp_path / "m.nii", make_series(origin=(-40.0, -55.0, 73.0)))
    # Same origin, but half the pixel size: the far corner lands off.
    with pytest.raises(MaskError, match="does not match study"):
        load_mask(tmp_path / "m.nii", make_series(spacing=(1.5, 0.4, 0.35)))


def test_non_integer_labels_are_rejected(tmp_path):
    series = make_series()
    labels = make_labels(series.shape).astype(np.float32)
    labels[4, 5, 6] = 2.5
    _write_other_layout(
        tmp_path / "m.nii", labels, series, (0, 1, 2), (False, False, False), np.float32
    )
    with pytest.raises(MaskError, match="non-integer") as err:
        load_mask(tmp_path / "m.nii", series)
    assert str(err.value).startswith(f"{tmp_path / 'm.nii'}: ")
    with pytest.raises(MaskError, match="non-integer"):
        write_mask(tmp_path / "w.nii", labels, series)


def test_oblique_mask_is_rejected(tmp_path):
    series = make_series()
    theta = np.deg2rad(5.0)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    affine = LPS_FROM_RAS @ rotation @ series.affine
    nib.save(nib.Nifti1Image(make_labels(series.shape), affine), tmp_path / "m.nii")
    with pytest.raises(MaskError, match="oblique"):
        load_mask(tmp_path / "m.nii", series)
