"""Series -> model grid: resampling and windowing shared by the cache and by inference.

Training (through `prepare`) and whole-study inference (`predict`) call the same functions,
so a model always sees studies preprocessed one way.

Grid: a study becomes (z', G, G) with the central `crop` fraction of the field of view
resized to G x G pixels and slices resampled to a fixed spacing `spacing_z` (mm), most
superior slice first. Downsampling
uses an antialiasing triangle filter so thin structures (fracture gaps, cortex) fade
rather than alias.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from cspine_jax.data.dicom import Series


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


def resample_hu(hu: np.ndarray, spacing: Sequence[float], grid: int,
                spacing_z: float, crop: float = 1.0) -> np.ndarray:
    """(z, y, x) HU at `spacing` (dz, dy, dx) mm -> (z', grid, grid) float32 HU.

    The central `crop` fraction of the field of view (1: all of it) is resized in-plane to
    grid x grid; z is resampled to `spacing_z` mm starting at the most superior slice.
    """
    z, h, w = hu.shape
    ry, rx = resize_matrix(h, grid, crop), resize_matrix(w, grid, crop)
    planar = np.matmul(ry, np.matmul(hu, rx.T))  # (z, grid, grid), BLAS does the work
    rz = interpolation_matrix(z, slice_positions(z, spacing[0], spacing_z), spacing_z / spacing[0])
    return np.matmul(rz, planar.reshape(z, -1)).reshape(-1, grid, grid)


def resample_labels(labels: np.ndarray, spacing: Sequence[float], grid: int,
                    spacing_z: float, crop: float = 1.0) -> np.ndarray:
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


def fracture_mask(series: Series, boxes: np.ndarray, grid: int, spacing_z: float,
                  crop: float = 1.0) -> np.ndarray:
    """(z', grid, grid) uint8: 1 inside fracture boxes, on the prepared slices within half a
    step of each boxed source slice (the grid of `resample_hu`).

    Args:
      series: the source series (its slice_numbers map file numbers to z indices).
      boxes: (n, 5) rows `[slice_number, x, y, width, height]` in source pixels.
      spacing_z: prepared slice spacing, mm.
    """
    z, h, w = series.hu.shape
    positions = slice_positions(z, series.spacing[0], spacing_z)
    mask = np.zeros((len(positions), grid, grid), np.uint8)
    half_step = 0.5 * max(spacing_z / series.spacing[0], 1.0)
    index_of = {int(n): i for i, n in enumerate(series.slice_numbers)}
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
            mask[slices, y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] = 1
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


def prepare_series(series: Series, *, grid: int, spacing_z: float,
                   windows: Sequence[Sequence[float]], mask: np.ndarray | None = None,
                   crop: float = 1.0, boxes: np.ndarray | None = None) -> Prepared:
    """Resamples and windows one series (and its aligned mask and boxes) onto the model grid.

    crop: central fraction of the field of view kept (the spine sits mid-image; the rest is
      neck, shoulders and air).
    boxes: (n, 5) `[slice_number, x, y, width, height]` fracture boxes in source pixels.
    """
    _, h, w = series.hu.shape
    dy, dx = series.spacing[1] * h * crop / grid, series.spacing[2] * w * crop / grid
    boxes = np.zeros((0, 5)) if boxes is None else boxes
    sp = series.spacing
    return Prepared(
        image=window(resample_hu(series.hu, sp, grid, spacing_z, crop), windows),
        mask=None if mask is None else resample_labels(mask, sp, grid, spacing_z, crop),
        fracture=fracture_mask(series, boxes, grid, spacing_z, crop),
        spacing=(float(spacing_z), float(dy), float(dx)),
    )
