"""Series -> model grid: resampling and windowing shared by the cache and by inference.

Training (through `prepare`) and whole-study inference (`predict`) call the same functions,
so a model always sees studies preprocessed one way: `prepare` streams a study's files
through `read_resampled` (each slice resized as it is decoded, no full-resolution volume),
`predict` resamples the `Series` it also draws (`prepare_series`); both end in `on_grid`.

Grid: a study becomes (z', G, G) with the central `crop` fraction of the field of view
resized to G x G pixels and slices resampled to a fixed spacing `spacing_z` (mm), most
superior slice first. Downsampling uses an antialiasing triangle filter so thin structures
(fracture gaps, cortex) fade rather than alias.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import numpy as np

from cspine_jax.data.dicom import Series, SeriesHeader, StoredSlice, read_series


def interpolation_matrix(n_in: int, positions: np.ndarray, step: float) -> np.ndarray:
    """(n_out, n_in) float32 linear-interpolation weights, antialiased for downsampling.

    Args:
      n_in: input samples along the axis.
      positions: (n_out,) output sample positions in input index units.
      step: output spacing in input index units; > 1 widens the triangle kernel to it.
    """
    width = max(1.0, step)
    taps = int(np.ceil(2 * width)) + 1
    index = np.floor(positions - width).astype(np.int64)[:, None] + 1 + np.arange(taps)
    weights = np.maximum(0.0, 1.0 - np.abs(index - positions[:, None]) / width)
    matrix = np.zeros((len(positions), n_in), np.float64)
    # Taps beyond the edge fold back onto the edge sample (clamp-to-edge).
    rows = np.repeat(np.arange(len(positions)), taps)
    np.add.at(matrix, (rows, np.clip(index, 0, n_in - 1).ravel()), weights.ravel())
    matrix /= matrix.sum(axis=1, keepdims=True)
    return matrix.astype(np.float32)


def resize_matrix(n_in: int, n_out: int, crop: float = 1.0) -> np.ndarray:
    """(n_out, n_in) weights mapping the central `crop` fraction of n_in samples (pixel
    centres) onto n_out samples."""
    step = n_in * crop / n_out
    start = n_in * (1.0 - crop) / 2
    return interpolation_matrix(n_in, start + (np.arange(n_out) + 0.5) * step - 0.5, step)


def _crop_index(n_in: int, n_out: int, crop: float) -> np.ndarray:
    """(n_out,) nearest source index of each output pixel of `resize_matrix`."""
    start = n_in * (1.0 - crop) / 2
    return np.floor(start + (np.arange(n_out) + 0.5) * n_in * crop / n_out).astype(np.int64)


def slice_positions(num_slices: int, dz: float, spacing_z: float) -> np.ndarray:
    """(z',) prepared slice positions in source slice index units, superior first."""
    extent = (num_slices - 1) * dz
    return np.arange(int(np.floor(extent / spacing_z + 1e-6)) + 1) * spacing_z / dz


class BandedMatrix:
    """An (n_out, n_in) interpolation matrix kept as row blocks, each over the inputs it touches.

    An antialiased resize has ~2 * step + 1 taps per output, so a dense matmul spends most
    of its multiplies on zeros (512 -> 96 px with crop 0.75: 30 M multiply-adds a slice
    dense, 1.7 M in blocks of 8 rows); blocks skip them while each stays one BLAS call.

    Attributes:
      shape: (n_out, n_in).
      support: the inputs any weight touches; `left` and `right` take inputs cut to it.
    """

    def __init__(self, matrix: np.ndarray, rows_per_block: int = 8):
        # 8 rows: few enough that a block's span is mostly taps, enough that the BLAS calls
        # stay few (8 to 16 were fastest for 512 -> 96 px, measured against 4 to 96).
        touched = np.flatnonzero(matrix.any(axis=0))
        self.shape = matrix.shape
        self.support = slice(int(touched[0]), int(touched[-1]) + 1)
        self.blocks = []
        for start in range(0, matrix.shape[0], rows_per_block):
            rows = matrix[start : start + rows_per_block]
            cols = np.flatnonzero(rows.any(axis=0))
            lo, hi = int(cols[0]), int(cols[-1]) + 1
            self.blocks.append(
                (
                    slice(start, start + len(rows)),
                    slice(lo - self.support.start, hi - self.support.start),
                    np.ascontiguousarray(rows[:, lo:hi], np.float32),
                )
            )

    def left(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out (..., n_out, k) = matrix @ x for x (..., support, k) float32."""
        for rows, cols, weights in self.blocks:
            np.matmul(weights, x[..., cols, :], out=out[..., rows, :])
        return out

    def right(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out (..., k, n_out) = x @ matrix.T for x (..., k, support) float32."""
        for rows, cols, weights in self.blocks:
            np.matmul(x[..., cols], weights.T, out=out[..., rows])
        return out


class PlanarResize:
    """(..., h, w) slices -> (..., grid, grid) float32: the central `crop` of the field of
    view resized by `resize_matrix` along y, then x (antialiased)."""

    def __init__(self, h: int, w: int, grid: int, crop: float = 1.0):
        self.rows = BandedMatrix(resize_matrix(h, grid, crop))
        self.cols = BandedMatrix(resize_matrix(w, grid, crop))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """image (..., h, w) of any real dtype -> (..., grid, grid) float32."""
        # Only the pixels some weight touches are read; BLAS needs them as float32.
        src = np.asarray(image[..., self.rows.support, self.cols.support], np.float32)
        # y first: it contracts the most (cropped) input, leaving grid x w' for the x pass.
        rows_done = self.rows.left(
            src, np.empty((*src.shape[:-2], self.rows.shape[0], src.shape[-1]), np.float32)
        )
        # All slices' rows as one matrix: a BLAS call per block, not per block and slice.
        flat = rows_done.reshape(-1, rows_done.shape[-1])
        out = self.cols.right(flat, np.empty((len(flat), self.cols.shape[0]), np.float32))
        return out.reshape(*rows_done.shape[:-1], self.cols.shape[0])


def resample_z(stack: np.ndarray, dz: float, spacing_z: float) -> np.ndarray:
    """(z, ...) float32 slices dz mm apart -> (z', ...) float32 every `spacing_z` mm from
    the first (most superior) slice, antialiased where spacing_z > dz."""
    z = stack.shape[0]
    positions = slice_positions(z, dz, spacing_z)
    rz = BandedMatrix(interpolation_matrix(z, positions, spacing_z / dz))
    out = np.empty((len(positions), *stack.shape[1:]), np.float32)
    rz.left(stack.reshape(z, -1)[rz.support], out.reshape(len(positions), -1))
    return out


def resample_hu(
    hu: np.ndarray, spacing: Sequence[float], grid: int, spacing_z: float, crop: float = 1.0
) -> np.ndarray:
    """(z, y, x) HU at `spacing` (dz, dy, dx) mm -> (z', grid, grid) float32 HU.

    The central `crop` fraction of the field of view (1: all of it) is resized in-plane to
    grid x grid; z is resampled to `spacing_z` mm starting at the most superior slice.
    """
    _, h, w = hu.shape
    return resample_z(PlanarResize(h, w, grid, crop)(hu), spacing[0], spacing_z)


def read_resampled(
    folder: str | os.PathLike, grid: int, spacing_z: float, crop: float = 1.0
) -> tuple[SeriesHeader, np.ndarray]:
    """`resample_hu` of the series in `folder`, without its full-resolution volume.

    Each slice is resized in-plane as its file is decoded, from its stored integers, and
    rescaled to HU after (the rescale is affine and the resize weights sum to 1, so the order
    only moves float rounding); z is resampled on the small stack.

    Returns:
      (header, hu): the series geometry (`dicom.read_series`) and (z', grid, grid) float32 HU,
      `resample_hu(dicom.load_series(folder).hu, ...)` up to float rounding.
    Raises:
      dicom.DicomError: as `dicom.read_series`.
    """
    resize_for = functools.cache(lambda shape: PlanarResize(*shape, grid, crop))

    def in_plane(stored: StoredSlice) -> np.ndarray:
        planar = resize_for(stored.pixels.shape)(stored.pixels)
        return stored.rescale(planar, out=planar)

    header, planar = read_series(folder, in_plane)
    return header, resample_z(np.stack(planar), header.spacing[0], spacing_z)


def resample_labels(
    labels: np.ndarray, spacing: Sequence[float], grid: int, spacing_z: float, crop: float = 1.0
) -> np.ndarray:
    """(z, y, x) integer labels -> (z', grid, grid) uint8 by nearest neighbour, on the
    grid of `resample_hu`."""
    z, h, w = labels.shape
    zi = np.rint(slice_positions(z, spacing[0], spacing_z)).astype(np.int64).clip(0, z - 1)
    yi, xi = _crop_index(h, grid, crop), _crop_index(w, grid, crop)
    return labels[np.ix_(zi, yi, xi)].astype(np.uint8)


def window(hu: np.ndarray, windows: Sequence[Sequence[float]]) -> np.ndarray:
    """HU (...) -> uint8 (..., n_windows): each (centre, width) window mapped to 0..255."""
    out = np.empty((*hu.shape, len(windows)), np.uint8)
    for i, (centre, width) in enumerate(windows):
        scaled = (hu - (centre - width / 2)) * (255.0 / width)
        np.clip(scaled, 0, 255, out=scaled)
        out[..., i] = np.rint(scaled)
    return out


def fracture_mask(
    header: SeriesHeader, boxes: np.ndarray, grid: int, spacing_z: float, crop: float = 1.0
) -> np.ndarray:
    """(z', grid, grid) uint8: 1 inside fracture boxes, on the prepared slices within half a
    step of each boxed source slice (the grid of `resample_hu`).

    Args:
      header: the source series' geometry (its slice_numbers map file numbers to z indices).
      boxes: (n, 5) rows `[slice_number, x, y, width, height]` in source pixels.
      spacing_z: prepared slice spacing, mm.
    """
    z, h, w = header.shape
    positions = slice_positions(z, header.spacing[0], spacing_z)
    mask = np.zeros((len(positions), grid, grid), np.uint8)
    half_step = 0.5 * max(spacing_z / header.spacing[0], 1.0)
    index_of = {int(n): i for i, n in enumerate(header.slice_numbers)}
    for number, x, y, width, height in np.asarray(boxes, np.float64).reshape(-1, 5):
        source = index_of.get(int(number))
        if source is None:
            continue
        slices = np.flatnonzero(np.abs(positions - source) <= half_step + 1e-6)
        sx, sy = grid / (w * crop), grid / (h * crop)  # grid pixels per source pixel
        x, y = x - w * (1 - crop) / 2, y - h * (1 - crop) / 2
        x0, x1 = int(np.floor(x * sx)), int(np.ceil((x + width) * sx))
        y0, y1 = int(np.floor(y * sy)), int(np.ceil((y + height) * sy))
        x0, y0 = max(x0, 0), max(y0, 0)
        if x0 < grid and y0 < grid:
            mask[slices, y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)] = 1
    return mask


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One study on the model grid.

    Attributes:
      image: (z', G, G, n_windows) uint8 windowed HU, most superior slice first.
      mask: (z', G, G) uint8 vertebra labels (0 bg, 1-7 C1-C7, 8+ thoracic), or None.
      fracture: (z', G, G) uint8 1 inside the fracture boxes.
      spacing: (spacing_z, dy, dx) mm of the prepared grid.
    """

    image: np.ndarray
    mask: np.ndarray | None
    fracture: np.ndarray
    spacing: tuple[float, float, float]


def prepare_series(
    series: Series,
    *,
    grid: int,
    spacing_z: float,
    windows: Sequence[Sequence[float]],
    mask: np.ndarray | None = None,
    crop: float = 1.0,
    boxes: np.ndarray | None = None,
) -> Prepared:
    """Resamples and windows one series (and its aligned mask and boxes) onto the model grid.

    crop: central fraction of the field of view kept (the spine sits mid-image; the rest is
      neck, shoulders and air).
    mask: (z, y, x) integer labels aligned with series.hu.
    boxes: (n, 5) `[slice_number, x, y, width, height]` fracture boxes in source pixels.
    """
    hu = resample_hu(series.hu, series.spacing, grid, spacing_z, crop)
    return on_grid(
        series.header,
        hu,
        grid=grid,
        spacing_z=spacing_z,
        windows=windows,
        mask=mask,
        crop=crop,
        boxes=boxes,
    )


def on_grid(
    header: SeriesHeader,
    hu: np.ndarray,
    *,
    grid: int,
    spacing_z: float,
    windows: Sequence[Sequence[float]],
    mask: np.ndarray | None = None,
    crop: float = 1.0,
    boxes: np.ndarray | None = None,
) -> Prepared:
    """`prepare_series` from the series' geometry and its HU already resampled: (z', grid,
    grid) float32 from `resample_hu` or `read_resampled` with the same grid, spacing_z, crop."""
    _, h, w = header.shape
    dy, dx = header.spacing[1] * h * crop / grid, header.spacing[2] * w * crop / grid
    boxes = np.zeros((0, 5)) if boxes is None else boxes
    sp = header.spacing
    return Prepared(
        image=window(hu, windows),
        mask=None if mask is None else resample_labels(mask, sp, grid, spacing_z, crop),
        fracture=fracture_mask(header, boxes, grid, spacing_z, crop),
        spacing=(float(spacing_z), float(dy), float(dx)),
    )
