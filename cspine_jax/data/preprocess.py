"""Series -> model grid: resampling, the spine region and windowing, shared by the cache and by
inference.

Training (through `prepare`) and whole-study inference (`predict`, and `evaluate.py --data`,
which prepares a cache) call the same functions, so a model always sees studies preprocessed
one way: `prepare` streams a study's files through `read_resampled` (each slice resized as it
is decoded, no full-resolution volume), `predict` resamples the `Series` it also draws
(`prepare_series`); both end in `on_grid`.

Grid: a study becomes (z', G, G), slices resampled to a fixed spacing `spacing_z` (mm), most
superior slice first, each showing the same square of the patient (its `Placement`). Which
square is the config's `data.region`:
  "spine"   `region_mm` x `region_mm` around the study's vertebral column, at region_mm / G mm
            pixels whatever the scan's field of view: the whole field of view is resampled to
            that pixel size, the column found on it without labels (`find_spine`) and the
            G x G pixels around it kept as they are (no second interpolation), air where they
            reach past the field of view. Real fields of view (130-250 mm, the neck anywhere
            in them, mandible and shoulders in view) leave a fixed crop either mostly neck
            and air or short of the spine; the spine (~50 x 60 mm, ~80 x 90 mm with its
            processes) sits in the same square, at the same scale, in every study.
  "centre"  the central `crop` fraction of the field of view resized to G x G, pixels as
            large as the field of view makes them; runs trained before the spine region
            (configs without `data.region`) prepare this way.
Downsampling uses an antialiasing triangle filter so thin structures (fracture gaps, cortex)
fade rather than alias. Labels (`resample_labels`) and fracture boxes (`fracture_mask`) go
through the study's placement; the cache records it per study (`meta.json`) and the triage
picture maps source pixels through it (`triage_figure`).

The column rule (`find_spine`), on the resampled field of view: bone is HU > 250. The
vertebral column is bone in nearly every slice at about the same place, while the mandible,
skull base, clavicles and shoulders are bone in some slices only, so the share of slices in
which a pixel is bone (its persistence), smoothed over 3 mm, peaks on the column; its core is
the part of that peak above half its height (vertebral bodies, lateral masses, arches). The
column's extent is, slice by slice, the bone connected to the core (gaps of up to 2 mm
bridged) within 60 mm of it: in its own slice the mandible or a clavicle does not touch the
column, though along z they overlap its processes. The region is centred on the extent's
bounding box, not on the core, which lies in front of the middle of the spinous and
transverse processes that the region must also hold. One centre per study: the neck's
lordosis moves the column < ~20 mm along z, inside the box. Bone that does touch the column
in its own slices counts as column (the skull base at C1, ribs at T1 and below): it widens
the box, moving its centre by up to half the width it adds. Without a core bone in a quarter
of the slices (no column in view) the region is centred on the field of view.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from cspine_jax.data.dicom import Series, SeriesHeader, StoredSlice, read_series

REGIONS = ("spine", "centre")  # `data.region`
AIR_HU = -1000.0  # grid pixels beyond the field of view
BONE_HU = 250.0  # above muscle, blood and cartilage; cancellous bone and cortex reach it
_CORE_SMOOTH_MM = 3.0  # persistence smoothing: pixel noise, and a column that drifts along z
_CORE_LEVEL = 0.5  # the core: persistence above this share of its peak
_MIN_PEAK = 0.25  # no column: nothing is bone in even a quarter of the slices
_BRIDGE_MM = 2.0  # gaps bridged between a vertebra's parts (joints, thin cortex, a fracture)
# The column's extent is looked for this far from its core: C1's transverse processes and
# C2's and C7's spinous processes reach ~45-55 mm from it, the thoracic ones' farther.
_REACH_MM = 60.0


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


def axis_matrix(n_in: int, start: float, step: float, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights sampling n_in pixels at n_out pixels `step` input pixels wide, the
    first one's leading edge at `start` (input pixel i spans [i, i + 1))."""
    return interpolation_matrix(n_in, start + (np.arange(n_out) + 0.5) * step - 0.5, step)


def resize_matrix(n_in: int, n_out: int, crop: float = 1.0) -> np.ndarray:
    """(n_out, n_in) weights mapping the central `crop` fraction of n_in samples (pixel
    centres) onto n_out samples."""
    return axis_matrix(n_in, n_in * (1.0 - crop) / 2, n_in * crop / n_out, n_out)


def slice_positions(num_slices: int, dz: float, spacing_z: float) -> np.ndarray:
    """(z',) prepared slice positions in source slice index units, superior first."""
    extent = (num_slices - 1) * dz
    return np.arange(int(np.floor(extent / spacing_z + 1e-6)) + 1) * spacing_z / dz


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a study's G x G grid lies on its source slices (the same on every slice).

    Source coordinates are in source pixels, pixel i spanning [i, i + 1) (its centre at
    i + 0.5), rows then columns. Grid pixel j along an axis spans
    [start + j * step, start + (j + 1) * step); where its centre falls outside [0, n) of the
    field of view it holds air and no label.

    Attributes:
      grid: G.
      source: (h, w) source pixels.
      start: (row, column) of the grid's top-left corner; negative or past the field of view
        where the grid reaches beyond it.
      step: (rows, columns) source pixels per grid pixel.
      centre: (row, column) of the spine found (`find_spine`), None where the grid is not
        placed on one (a centred crop; no column found).
      persistence: the column's peak share of slices in which it is bone (0: none looked for).
    """

    grid: int
    source: tuple[int, int]
    start: tuple[float, float]
    step: tuple[float, float]
    centre: tuple[float, float] | None = None
    persistence: float = 0.0

    @classmethod
    def centred(cls, h: int, w: int, grid: int, crop: float = 1.0) -> Placement:
        """The central `crop` fraction of an h x w field of view (region 'centre')."""
        return cls(
            int(grid),
            (int(h), int(w)),
            (h * (1.0 - crop) / 2, w * (1.0 - crop) / 2),
            (h * crop / grid, w * crop / grid),
        )

    def positions(self, axis: int) -> np.ndarray:
        """(G,) source index (pixel centres at integers) of each grid pixel's centre."""
        return self.start[axis] + (np.arange(self.grid) + 0.5) * self.step[axis] - 0.5

    def inside(self, axis: int) -> np.ndarray:
        """(G,) bool: the grid pixel's centre lies in the field of view."""
        edge = self.positions(axis) + 0.5
        return (edge >= 0) & (edge < self.source[axis])

    def nearest(self, axis: int) -> np.ndarray:
        """(G,) int64 source index nearest each grid pixel's centre, -1 outside the field of
        view."""
        index = np.floor(self.positions(axis) + 0.5).astype(np.int64)
        return np.where(self.inside(axis), index, -1)

    def to_grid(self, axis: int, index, n: int | None = None) -> np.ndarray:
        """Fractional source index (pixel centres at integers) -> the same point's fractional
        index on a grid of n pixels (default G) spanning the placement's square."""
        n = self.grid if n is None else n
        size = self.grid * self.step[axis]
        return (np.asarray(index, np.float64) + 0.5 - self.start[axis]) * n / size - 0.5

    def to_source(self, axis: int, index, n: int | None = None) -> np.ndarray:
        """The inverse of `to_grid`: fractional index on an n-pixel grid -> source index."""
        n = self.grid if n is None else n
        size = self.grid * self.step[axis]
        return (np.asarray(index, np.float64) + 0.5) * size / n + self.start[axis] - 0.5

    def pixel_mm(self, spacing: Sequence[float]) -> tuple[float, float]:
        """(dy, dx) mm of a grid pixel, from the source's (.., dy, dx) spacing."""
        return float(spacing[-2] * self.step[0]), float(spacing[-1] * self.step[1])

    def to_json(self) -> dict[str, Any]:
        return {
            "grid": self.grid,
            "source": list(self.source),
            "start": list(self.start),
            "step": list(self.step),
            "centre": None if self.centre is None else list(self.centre),
            "persistence": self.persistence,
        }

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> Placement:
        centre = payload["centre"]
        return cls(
            int(payload["grid"]),
            tuple(int(v) for v in payload["source"]),
            tuple(float(v) for v in payload["start"]),
            tuple(float(v) for v in payload["step"]),
            None if centre is None else tuple(float(v) for v in centre),
            float(payload["persistence"]),
        )


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
    """(..., h, w) slices -> (..., n_rows, n_cols) float32 by a row and a column weight matrix
    (`axis_matrix`), along y, then x."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray):
        self.rows = BandedMatrix(rows)
        self.cols = BandedMatrix(cols)

    @classmethod
    def crop(cls, h: int, w: int, grid: int, crop: float = 1.0) -> PlanarResize:
        """The central `crop` of the field of view onto grid x grid pixels."""
        return cls(resize_matrix(h, grid, crop), resize_matrix(w, grid, crop))

    @classmethod
    def field_of_view(cls, h: int, w: int, step: Sequence[float]) -> PlanarResize:
        """The whole field of view at pixels of `step` (rows, columns) source pixels: every
        pixel whose centre lies in it, the first one's edge on the field of view's."""
        sy, sx = step
        return cls(
            axis_matrix(h, 0.0, sy, fov_pixels(h, sy)), axis_matrix(w, 0.0, sx, fov_pixels(w, sx))
        )

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """image (..., h, w) of any real dtype -> (..., n_rows, n_cols) float32."""
        if image.ndim > 2:
            # Slice by slice: a stack's batched matmul into strided blocks of the output leaves
            # BLAS, 4-7x slower (90 x 128^2 and 100 x 512^2 stacks, crop and field of view).
            out = np.empty((*image.shape[:-2], self.rows.shape[0], self.cols.shape[0]), np.float32)
            for index in np.ndindex(image.shape[:-2]):
                out[index] = self(image[index])
            return out
        # Only the pixels some weight touches are read; BLAS needs them as float32.
        src = np.asarray(image[self.rows.support, self.cols.support], np.float32)
        # y first: it contracts the most (cropped) input, leaving n_rows x w' for the x pass.
        rows_done = self.rows.left(src, np.empty((self.rows.shape[0], src.shape[1]), np.float32))
        return self.cols.right(
            rows_done, np.empty((self.rows.shape[0], self.cols.shape[0]), np.float32)
        )


def fov_pixels(n: int, step: float) -> int:
    """Pixels `step` source pixels wide from a field of view's edge whose centres lie in its
    n source pixels (at least one)."""
    return max(1, int(np.ceil(n / step - 0.5)))


def find_spine(planes: Sequence[np.ndarray] | np.ndarray, pixel_mm: float) -> tuple:
    """The vertebral column's centre on a study's slices, without labels (the module's rule).

    Args:
      planes: (z, h, w) HU, every slice of the study (any order) at square pixels.
      pixel_mm: their pixel size.

    Returns:
      (centre, persistence): centre (2,) float64 (row, column) pixel index (centres at
      integers) of the middle of the column's bounding box, None where no column stands out
      (nothing is bone in a quarter of the slices); persistence, the core's peak share of
      slices in which it is bone.
    """
    count = np.zeros(planes[0].shape, np.int32)
    for plane in planes:  # slice by slice: no (z, h, w) boolean temporary
        count += plane > BONE_HU
    persistence = count / len(planes)
    smooth = ndimage.gaussian_filter(persistence, _CORE_SMOOTH_MM / pixel_mm, mode="constant")
    peak_at = np.unravel_index(np.argmax(smooth), smooth.shape)
    parts, _ = ndimage.label(smooth >= _CORE_LEVEL * smooth[peak_at])
    core = parts == parts[peak_at]
    peak = float(persistence[core].max())
    if peak < _MIN_PEAK:
        return None, peak
    # The extent, slice by slice: projected along z, the mandible or a clavicle overlaps the
    # column's processes; within one slice it does not touch them.
    weights = smooth[core]
    middle = np.rint(np.array(np.nonzero(core)) @ weights / weights.sum())  # (row, column)
    reach = round(_REACH_MM / pixel_mm)
    (y0, x0), (y1, x1) = np.maximum(middle - reach, 0), middle + reach + 1
    near = np.s_[int(y0) : int(y1), int(x0) : int(x1)]
    core_near = core[near]
    column = np.zeros(core_near.shape, bool)
    bridge = max(1, round(_BRIDGE_MM / pixel_mm / 2))  # dilated by k, gaps of 2 k close
    for plane in planes:
        bone = plane[near] > BONE_HU
        if not (bone & core_near).any():
            continue
        parts, count = ndimage.label(_dilate(bone, bridge))
        keep = np.zeros(count + 1, bool)
        keep[parts[core_near & bone]] = True
        column |= keep[parts] & bone
    rows, cols = np.nonzero(column)
    centre = np.array([rows.min() + rows.max() + 2 * y0, cols.min() + cols.max() + 2 * x0]) / 2
    return centre, peak


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """`mask` grown by `steps` pixels along rows and columns (a 4-connected dilation; shifted
    ORs cost a tenth of scipy's generic one on these small slices)."""
    mask = mask.copy()
    for _ in range(steps):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


def _window(planes: Sequence[np.ndarray] | np.ndarray, first: np.ndarray, grid: int):
    """(z, grid, grid) float32: pixels [first, first + grid) of each plane, air beyond it."""
    out = np.full((len(planes), grid, grid), AIR_HU, np.float32)
    h, w = planes[0].shape
    (y0, x0), (y1, x1) = np.maximum(first, 0), np.minimum(first + grid, (h, w))
    if y0 < y1 and x0 < x1:
        into = np.s_[y0 - first[0] : y1 - first[0], x0 - first[1] : x1 - first[1]]
        for k, plane in enumerate(planes):
            out[k][into] = plane[y0:y1, x0:x1]
    return out


def spine_window(
    planes: Sequence[np.ndarray] | np.ndarray,
    source: Sequence[int],
    step: Sequence[float],
    grid: int,
    pixel_mm: float,
) -> tuple[np.ndarray, Placement]:
    """The grid x grid pixels around the column of a study's resampled field of view.

    Args:
      planes: (z, h', w') HU, the field of view at `PlanarResize.field_of_view` pixels.
      source: (h, w) source pixels.
      step: (rows, columns) source pixels per plane pixel.
      pixel_mm: the planes' (square) pixel size.

    Returns:
      ((z, grid, grid) float32 HU, its `Placement`); centred on the field of view where no
      column is found.
    """
    centre, persistence = find_spine(planes, pixel_mm)
    at = (np.array(planes[0].shape) - 1) / 2 if centre is None else centre
    first = np.rint(at - (grid - 1) / 2).astype(np.int64)
    placement = Placement(
        int(grid),
        (int(source[0]), int(source[1])),
        (float(first[0] * step[0]), float(first[1] * step[1])),
        (float(step[0]), float(step[1])),
        None if centre is None else tuple(float(v) for v in (centre + 0.5) * step),
        persistence,
    )
    return _window(planes, first, grid), placement


def _check_region(region: str, region_mm: float) -> None:
    if region not in REGIONS:
        raise ValueError(f"data.region {region!r}: one of {REGIONS}")
    if region == "spine" and not region_mm > 0:
        raise ValueError(f"data.region_mm {region_mm}: must be > 0 for region 'spine'")


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
    hu: np.ndarray,
    spacing: Sequence[float],
    grid: int,
    spacing_z: float,
    crop: float = 1.0,
    *,
    region: str = "centre",
    region_mm: float = 0.0,
) -> tuple[np.ndarray, Placement]:
    """(z, y, x) HU at `spacing` (dz, dy, dx) mm -> ((z', grid, grid) float32 HU, placement).

    In-plane, the region (module docstring): 'spine', a region_mm square around the column
    at region_mm / grid mm pixels; 'centre', the central `crop` fraction of the field of view
    (1: all of it). z is resampled to `spacing_z` mm starting at the most superior slice.
    """
    _check_region(region, region_mm)
    _, h, w = hu.shape
    if region == "centre":
        planar = PlanarResize.crop(h, w, grid, crop)(hu)
        placement = Placement.centred(h, w, grid, crop)
    else:
        pixel = region_mm / grid
        step = (pixel / spacing[1], pixel / spacing[2])
        fov = PlanarResize.field_of_view(h, w, step)(hu)
        planar, placement = spine_window(fov, (h, w), step, grid, pixel)
    return resample_z(planar, spacing[0], spacing_z), placement


def read_resampled(
    folder: str | os.PathLike,
    grid: int,
    spacing_z: float,
    crop: float = 1.0,
    *,
    region: str = "centre",
    region_mm: float = 0.0,
) -> tuple[SeriesHeader, np.ndarray, Placement]:
    """`resample_hu` of the series in `folder`, without its full-resolution volume.

    Each slice is resized in-plane as its file is decoded, from its stored integers, and
    rescaled to HU after (the rescale is affine and the resize weights sum to 1, so the order
    only moves float rounding); for the 'spine' region the whole field of view at the
    region's pixel size, kept until every slice is in and the column found (z x (field of
    view / pixel)^2 float32: ~140 MB for 600 slices of 250 mm at 1.04 mm), then its window.
    z is resampled on the (z, grid, grid) stack.

    Returns:
      (header, hu, placement): the series geometry (`dicom.read_series`), (z', grid, grid)
      float32 HU and where the grid lies, `resample_hu(dicom.load_series(folder).hu, ...)` up
      to float rounding.
    Raises:
      dicom.DicomError: as `dicom.read_series`.
    """
    _check_region(region, region_mm)
    pixel = region_mm / grid
    spacing = []  # (dy, dx) of the first file read: the one the header's spacing comes from

    def resizer(shape: tuple[int, int]) -> PlanarResize:
        if region == "centre":
            return PlanarResize.crop(*shape, grid, crop)
        return PlanarResize.field_of_view(*shape, (pixel / spacing[0][0], pixel / spacing[0][1]))

    resize_for = functools.cache(resizer)

    def in_plane(stored: StoredSlice) -> np.ndarray | None:
        if region == "spine":
            if stored.pixel_spacing is None:
                return None  # read_series rejects the series once the headers are checked
            spacing[:] = spacing or [stored.pixel_spacing]
        planar = resize_for(stored.pixels.shape)(stored.pixels)
        return stored.rescale(planar, out=planar)

    header, planar = read_series(folder, in_plane)
    _, h, w = header.shape
    if region == "centre":
        planar, placement = np.stack(planar), Placement.centred(h, w, grid, crop)
    else:
        step = (pixel / header.spacing[1], pixel / header.spacing[2])
        planar, placement = spine_window(planar, (h, w), step, grid, pixel)
    return header, resample_z(planar, header.spacing[0], spacing_z), placement


def resample_labels(
    labels: np.ndarray, spacing: Sequence[float], spacing_z: float, placement: Placement
) -> np.ndarray:
    """(z, y, x) integer labels -> (z', G, G) uint8 by nearest neighbour, on the grid of
    `resample_hu` (0 beyond the field of view)."""
    z = labels.shape[0]
    zi = np.rint(slice_positions(z, spacing[0], spacing_z)).astype(np.int64).clip(0, z - 1)
    yi, xi = placement.nearest(0), placement.nearest(1)
    out = labels[np.ix_(zi, yi.clip(0), xi.clip(0))].astype(np.uint8)
    out[:, yi < 0] = 0
    out[:, :, xi < 0] = 0
    return out


def window(hu: np.ndarray, windows: Sequence[Sequence[float]]) -> np.ndarray:
    """HU (...) -> uint8 (..., n_windows): each (centre, width) window mapped to 0..255."""
    out = np.empty((*hu.shape, len(windows)), np.uint8)
    for i, (centre, width) in enumerate(windows):
        scaled = (hu - (centre - width / 2)) * (255.0 / width)
        np.clip(scaled, 0, 255, out=scaled)
        out[..., i] = np.rint(scaled)
    return out


def fracture_mask(
    header: SeriesHeader, boxes: np.ndarray, spacing_z: float, placement: Placement
) -> np.ndarray:
    """(z', G, G) uint8: 1 inside fracture boxes, on the prepared slices within half a step of
    each boxed source slice (the grid of `resample_hu`); boxes outside the grid are dropped.

    Args:
      header: the source series' geometry (its slice_numbers map file numbers to z indices).
      boxes: (n, 5) rows `[slice_number, x, y, width, height]` in source pixels.
      spacing_z: prepared slice spacing, mm.
      placement: where the grid lies on the source slices.
    """
    z = header.shape[0]
    grid = placement.grid
    positions = slice_positions(z, header.spacing[0], spacing_z)
    mask = np.zeros((len(positions), grid, grid), np.uint8)
    half_step = 0.5 * max(spacing_z / header.spacing[0], 1.0)
    index_of = {int(n): i for i, n in enumerate(header.slice_numbers)}
    (sy, sx), (y_at, x_at) = placement.step, placement.start
    for number, x, y, width, height in np.asarray(boxes, np.float64).reshape(-1, 5):
        source = index_of.get(int(number))
        if source is None:
            continue
        slices = np.flatnonzero(np.abs(positions - source) <= half_step + 1e-6)
        # Box edges on the grid, rounded outwards; at least one pixel for a box inside.
        x0, x1 = int(np.floor((x - x_at) / sx)), int(np.ceil((x + width - x_at) / sx))
        y0, y1 = int(np.floor((y - y_at) / sy)), int(np.ceil((y + height - y_at) / sy))
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
        if x1 > 0 and y1 > 0 and x0 < grid and y0 < grid:
            mask[slices, max(y0, 0) : y1, max(x0, 0) : x1] = 1
    return mask


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One study on the model grid.

    Attributes:
      image: (z', G, G, n_windows) uint8 windowed HU, most superior slice first.
      mask: (z', G, G) uint8 vertebra labels (0 bg, 1-7 C1-C7, 8+ thoracic), or None.
      fracture: (z', G, G) uint8 1 inside the fracture boxes.
      spacing: (spacing_z, dy, dx) mm of the prepared grid.
      placement: where the grid lies on the source slices (None: not known, e.g. a test's
        hand-made study).
    """

    image: np.ndarray
    mask: np.ndarray | None
    fracture: np.ndarray
    spacing: tuple[float, float, float]
    placement: Placement | None = None


def prepare_series(
    series: Series,
    *,
    grid: int,
    spacing_z: float,
    windows: Sequence[Sequence[float]],
    mask: np.ndarray | None = None,
    crop: float = 1.0,
    region: str = "centre",
    region_mm: float = 0.0,
    boxes: np.ndarray | None = None,
) -> Prepared:
    """Resamples and windows one series (and its aligned mask and boxes) onto the model grid.

    region, region_mm, crop: where the grid lies (module docstring): 'spine', a region_mm
      square around the column; 'centre', the central `crop` fraction of the field of view.
    mask: (z, y, x) integer labels aligned with series.hu.
    boxes: (n, 5) `[slice_number, x, y, width, height]` fracture boxes in source pixels.
    """
    hu, placement = resample_hu(
        series.hu, series.spacing, grid, spacing_z, crop, region=region, region_mm=region_mm
    )
    return on_grid(
        series.header,
        hu,
        placement,
        spacing_z=spacing_z,
        windows=windows,
        mask=mask,
        boxes=boxes,
    )


def on_grid(
    header: SeriesHeader,
    hu: np.ndarray,
    placement: Placement,
    *,
    spacing_z: float,
    windows: Sequence[Sequence[float]],
    mask: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
) -> Prepared:
    """`prepare_series` from the series' geometry and its HU already resampled: (z', G, G)
    float32 and its placement from `resample_hu` or `read_resampled` with the same
    spacing_z."""
    boxes = np.zeros((0, 5)) if boxes is None else boxes
    sp = header.spacing
    return Prepared(
        image=window(hu, windows),
        mask=None if mask is None else resample_labels(mask, sp, spacing_z, placement),
        fracture=fracture_mask(header, boxes, spacing_z, placement),
        spacing=(float(spacing_z), *placement.pixel_mm(sp)),
        placement=placement,
    )
