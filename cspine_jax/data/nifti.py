"""Vertebra label masks in NIfTI, aligned voxel-for-voxel with a DICOM Series.

Labels: 0 background, 1-7 C1-C7, 8-19 T1-T12. The RSNA files (`segmentations/<uid>.nii`)
store the array as (columns, rows, slices), rows flipped and slices running from the feet
up, with a RAS affine (as dcm2niix writes it) that says so. Loading does not assume that
layout: it reads the affine and maps each NIfTI axis onto the series' (z, y, x) axes.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from cspine_jax.data.dicom import Series, SeriesHeader

# NIfTI world coordinates are RAS, DICOM's are LPS: the first two axes change sign.
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Axis directions (unit vectors) closer than this in cosine count as parallel.
_AXIS_ALIGNED_ATOL = 1e-3
_NIFTI_SCANNER_XFORM = 1  # sform/qform code "scanner", as dcm2niix writes


class MaskError(ValueError):
    """A mask that cannot be aligned with its series; message `<path>: <problem>`."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")


def _rsna_from_series_index(shape: tuple[int, int, int]) -> np.ndarray:
    """(4, 4) map from an RSNA-layout index (i, j, k, 1) to the series index (z, y, x, 1).

    stored[i, j, k] = labels[Z-1-k, Y-1-j, i]: i = column, j = row from the bottom,
    k = slice from the most inferior.
    """
    z, y, _ = shape
    return np.array(
        [
            [0.0, 0.0, -1.0, z - 1],
            [0.0, -1.0, 0.0, y - 1],
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


def write_mask(path: str | os.PathLike, labels: np.ndarray, series: Series) -> None:
    """Write (z, y, x) integer labels for `series` the way the RSNA segmentations are stored.

    The file holds a uint8 (x, y, z) array with rows and slices flipped (see module doc) and
    the RAS affine of that layout, so any geometry-aware reader places it correctly.
    `.nii` or `.nii.gz` by the suffix of `path`.

    Raises:
      MaskError: labels not shaped like series.hu, or values outside 0..255 / not integers.
    """
    labels = np.asarray(labels)
    if labels.shape != series.shape:
        raise MaskError(path, f"labels shape {labels.shape} != series shape {series.shape}")
    _check_labels(path, labels)
    stored = labels[::-1, ::-1, :].transpose(2, 1, 0).astype(np.uint8)
    affine = _LPS_FROM_RAS @ series.affine @ _rsna_from_series_index(series.shape)
    image = nib.Nifti1Image(stored, affine)
    image.set_sform(affine, code=_NIFTI_SCANNER_XFORM)
    image.set_qform(affine, code=_NIFTI_SCANNER_XFORM)
    image.header.set_xyzt_units("mm")
    nib.save(image, os.fspath(path))


def _check_labels(path, values: np.ndarray) -> None:
    if values.dtype.kind not in "iub":
        if not np.isfinite(values).all() or (values != np.round(values)).any():
            raise MaskError(path, f"non-integer label values (dtype {values.dtype})")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise MaskError(path, f"label values {values.min()}..{values.max()} outside 0..255")


def load_mask(path: str | os.PathLike, series: Series | SeriesHeader) -> np.ndarray:
    """Read a label mask (`.nii` / `.nii.gz`) as (z, y, x) uint8 aligned with the series'
    voxels (its shape, affine and uid are all it reads).

    The NIfTI affine (RAS) is turned to LPS; each NIfTI axis is matched to the series axis
    it is parallel to (largest |cosine|), which gives the transpose and the flips. The
    result's corner voxels must then land within half a voxel of the series' own.

    Raises:
      MaskError: unreadable file, not 3-D, oblique relative to the series, shape mismatch,
        corners off by half a voxel or more (another study, or wrong geometry), non-integer
        or out-of-range (0..255) labels.
    """
    path = Path(path)
    try:
        image = nib.load(path)
        # dataobj applies scl_slope/scl_inter when set, like any NIfTI reader would.
        data = np.asanyarray(image.dataobj)
    except Exception as e:  # nibabel raises many types for a bad file
        raise MaskError(path, f"unreadable NIfTI ({type(e).__name__}: {e})") from e
    if data.ndim != 3:
        raise MaskError(path, f"expected a 3-D mask, got shape {data.shape}")

    # Columns of the 3x3 parts are the per-voxel steps of each axis in LPS mm.
    mask_steps = (_LPS_FROM_RAS @ image.affine)[:3, :3]
    series_steps = series.affine[:3, :3]
    cosines = (mask_steps / np.linalg.norm(mask_steps, axis=0)).T @ (
        series_steps / np.linalg.norm(series_steps, axis=0)
    )  # [mask axis, series axis]
    series_axis = np.argmax(np.abs(cosines), axis=1)
    best = np.abs(cosines[np.arange(3), series_axis])
    if (best < 1 - _AXIS_ALIGNED_ATOL).any() or len(set(series_axis.tolist())) != 3:
        raise MaskError(
            path,
            f"mask axes are oblique to the series axes (cosines {np.round(cosines, 4).tolist()})",
        )

    mask_axis = np.argsort(series_axis)  # mask_axis[s] = the mask axis along series axis s
    flipped = cosines[mask_axis, np.arange(3)] < 0
    aligned = data.transpose(mask_axis)
    aligned = aligned[tuple(slice(None, None, -1) if f else slice(None) for f in flipped)]
    if aligned.shape != series.shape:
        raise MaskError(
            path,
            f"mask shape {aligned.shape} (as z, y, x; stored {data.shape}) "
            f"!= series shape {series.shape}",
        )

    # Where the aligned array's first and last voxels sit, in series voxel units.
    last = np.array(series.shape) - 1
    corners = np.stack([np.where(flipped, last, 0), np.where(flipped, 0, last)])
    corners_mask_index = np.zeros((2, 4))
    corners_mask_index[:, mask_axis] = corners
    corners_mask_index[:, 3] = 1
    world = _LPS_FROM_RAS @ image.affine @ corners_mask_index.T
    in_series = (np.linalg.inv(series.affine) @ world)[:3].T
    offset = np.abs(in_series - np.stack([np.zeros(3), last]))
    if (offset >= 0.5).any():
        raise MaskError(
            path,
            f"mask geometry does not match study {series.uid}: its corner "
            f"voxels are off by up to {offset.max():.2f} voxels (z, y, x "
            f"{np.round(offset.max(axis=0), 2).tolist()})",
        )

    _check_labels(path, aligned)
    return np.ascontiguousarray(aligned, dtype=np.uint8)
