"""The triage picture of one study: sagittal, curved coronal and axial views with the
predicted vertebra labels and the fracture heat map, side by side in mm.

Three grids meet here, all in voxel order (z, y, x), most superior slice first:
  source CT      `dicom.Series.hu`, (z, y, x) float HU at `series.spacing` (dz, dy, dx) mm;
  prepared grid  `preprocess.Prepared.image`, (z', G, G, n_windows) uint8 at
                 `prepared.spacing` (spacing_z, dy', dx') mm, and the saliency on it
                 (z', G, G) (`saliency.FractureSaliency`);
  segmentation   `StudyPrediction.segmentation`, (z', h, w) uint8 labels 0 (background),
                 1..7 (C1..C7) at the segmentation stride (G = factor * h).
The CT is drawn at its own pixels; labels and heat are looked up on their grids at the source
pixel centres. The prepared and segmentation grids cover the square of the source slices the
study was prepared on (`prepared.placement`: the region around the spine found in it, or the
central crop; `preprocess.Placement`): outside it there are no labels and no heat.
Views carry their extent in mm and the patient directions (DICOM LPS) at their edges.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from scipy import ndimage

from cspine_jax import visualize
from cspine_jax.data import dicom, preprocess
from cspine_jax.data.rsna import LABEL_COLUMNS, VERTEBRAE
from cspine_jax.models.heads import label_grid

_SLAB_MM = 15.0  # half-thickness of the heat map's maximum projection around each view plane
_HEAT_SMOOTH_MM = 2.0  # raw input gradients are speckled at the pixel scale; fractures are not
_PATH_SMOOTH_MM = 8.0  # smoothing of the spine's course along z for the curved coronal view
_LABEL_ALPHA = 0.3  # light enough to read the cortex through the vertebra colours
_HEAT_CMAP = colormaps["hot"]
_BONE_HU = 300.0  # above soft tissue and contrast-filled vessels, below most cortex


def _rescale(index, n_from: int, n_to: int) -> np.ndarray:
    """Fractional index on a grid of n_from pixels -> the same point on a grid of n_to pixels
    over the same extent."""
    return (np.asarray(index, np.float64) + 0.5) * n_to / n_from - 0.5


def _cells(placement: preprocess.Placement, axis: int, n_to: int) -> np.ndarray:
    """(n_source,) index of the pixel of an n_to grid over the placement's square containing
    each source pixel centre along `axis`, shifted by one for a border of background around
    the n_to grid (`_with_border`): 0 and n_to + 1 lie outside it."""
    source = np.arange(placement.source[axis])
    cell = np.floor(placement.to_grid(axis, source, n_to) + 0.5).astype(np.int64)
    return np.clip(cell + 1, 0, n_to + 1)


def _with_border(labels: np.ndarray) -> np.ndarray:
    """(z', h, w) labels -> (z', h + 2, w + 2) with background around: what `_cells` indexes."""
    return np.pad(labels, ((0, 0), (1, 1), (1, 1)))


def _sample(plane: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """`plane` (a, b) interpolated linearly at fractional (rows, cols): edge values up to half a
    pixel beyond the grid (its outer pixels' own extent), 0 farther out (outside its square)."""
    a, b = plane.shape
    inside = (rows >= -0.5) & (rows <= a - 0.5) & (cols >= -0.5) & (cols <= b - 0.5)
    values = ndimage.map_coordinates(plane, [rows, cols], order=1, mode="nearest")
    return np.where(inside, values, 0.0)


def spine_course(mask: np.ndarray, spacing_z: float) -> np.ndarray | None:
    """Where the spine runs: (z', 2) float (row, column) of `mask`'s centroid per slice.

    mask: (z', h, w) bool, e.g. the predicted C1..C7 pixels. Slices without any pixel are
    interpolated from their neighbours; the course is smoothed along z (the neck's lordosis
    is gentle, label noise is not). None when the mask is empty.
    """
    z = mask.shape[0]
    slices, rows, cols = np.nonzero(mask)
    if not len(slices):
        return None
    count = np.bincount(slices, minlength=z)
    have = count > 0
    course = np.empty((z, 2))
    for axis, coords in enumerate((rows, cols)):
        mean = np.bincount(slices, coords, minlength=z)[have] / count[have]
        course[:, axis] = np.interp(np.arange(z), np.flatnonzero(have), mean)
    return ndimage.gaussian_filter1d(course, _PATH_SMOOTH_MM / spacing_z, axis=0, mode="nearest")


def _direction_letter(vector: np.ndarray) -> str:
    """Patient direction (LPS) a vector mostly points to: L/R, P/A or S/I."""
    axis = int(np.argmax(np.abs(vector)))
    return ("LR", "PA", "SI")[axis][0 if vector[axis] > 0 else 1]


@dataclasses.dataclass(frozen=True)
class View:
    """One displayed plane sampled at the source CT's pixels.

    Attributes:
      name: panel title.
      gray: (rows, cols) bone-windowed CT in [0, 1].
      labels: (rows, cols) predicted vertebra labels 0..7.
      heat: (rows, cols) saliency relative to the study's peak, in [0, 1].
      height_mm, width_mm: extent of the plane.
      letters: patient directions at the left, right, top and bottom edges.
    """

    name: str
    gray: np.ndarray
    labels: np.ndarray
    heat: np.ndarray
    height_mm: float
    width_mm: float
    letters: tuple[str, str, str, str]

    def body_box_mm(self, margin_mm: float = 5.0) -> tuple[float, float, float, float]:
        """(top, bottom, left, right) mm around the body: pixels above the window's floor
        (-500 HU for a 400/1800 bone window), so the air around the neck is not drawn."""
        inside = self.gray > 0
        if not inside.any():
            return 0.0, self.height_mm, 0.0, self.width_mm
        row_mm, col_mm = self.height_mm / inside.shape[0], self.width_mm / inside.shape[1]
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        return (
            max(rows[0] * row_mm - margin_mm, 0.0),
            min((rows[-1] + 1) * row_mm + margin_mm, self.height_mm),
            max(cols[0] * col_mm - margin_mm, 0.0),
            min((cols[-1] + 1) * col_mm + margin_mm, self.width_mm),
        )


def _source_cells(
    series: dicom.Series, prepared: preprocess.Prepared, segmentation: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z_src,), (h_src,), (w_src,) int64: for each source slice, row and column, its cell of
    `_with_border(segmentation)` (nearest prepared slice; rows and columns as `_cells`)."""
    placement = prepared.placement
    if placement is None:
        raise ValueError("the source grid needs prepared.placement (preprocess.prepare_series)")
    z_src = series.hu.shape[0]
    z_p = prepared.image.shape[0]
    h_seg, w_seg = segmentation.shape[1:]
    # Source slice i lies at prepared index i * dz / spacing_z (both start at the top slice).
    z_at_src = np.arange(z_src) * series.spacing[0] / prepared.spacing[0]
    z_cell = np.clip(np.rint(z_at_src), 0, z_p - 1).astype(np.int64)
    return z_cell, _cells(placement, 0, h_seg), _cells(placement, 1, w_seg)


def source_labels(
    series: dicom.Series, prepared: preprocess.Prepared, segmentation: np.ndarray
) -> np.ndarray:
    """(z, y, x) uint8 predicted labels 0 (background), 1..7 (C1..C7) at every source voxel:
    `segmentation` (z', h, w) looked up at the nearest cell, as the views draw them; 0
    outside the square the study was prepared on."""
    z_cell, rows_cell, cols_cell = _source_cells(series, prepared, segmentation)
    return _with_border(segmentation)[np.ix_(z_cell, rows_cell, cols_cell)].astype(np.uint8)


def study_views(
    series: dicom.Series,
    prepared: preprocess.Prepared,
    segmentation: np.ndarray,
    saliency: np.ndarray,
    levels: np.ndarray,
    windows: Sequence[Sequence[float]],
) -> tuple[list[View], dict[str, int | bool]]:
    """Sagittal, curved coronal and axial views through the predicted spine.

    The CT is shown at its own resolution, sharper than the model's grid; labels (segmentation
    grid) are looked up by nearest pixel and the heat map (prepared grid) interpolated
    linearly, each at the source pixel centres. The sagittal plane passes through the labels'
    mean column (their centroid per slice, averaged along z); the coronal surface follows the
    spine's course slice by slice (so lordosis does not take the spine out of the plane); the
    axial slice is the heat map's peak within the suspected levels. Heat is the maximum over a
    +-15 mm slab around each plane. Without any predicted vertebra (an untrained or failing
    model) the planes follow the bone (> 300 HU) instead.

    prepared: the study on the model's grid, with its placement on the source slices.
    windows: the run's HU windows; the one with the highest centre is the bone window.
    """
    placement = prepared.placement
    z_cell, rows_cell, cols_cell = _source_cells(series, prepared, segmentation)
    hu = series.hu
    z_src, h_src, w_src = hu.shape
    dz, dy, dx = series.spacing
    spacing_z, dy_p, dx_p = prepared.spacing
    z_p, grid = prepared.image.shape[:2]
    h_seg, w_seg = segmentation.shape[1:]

    bone = int(np.argmax([centre for centre, _ in windows]))
    bone_window = windows[bone]
    # Heat outside the body (above the bone window's floor) is not drawn, nor does it set
    # the scale: a gradient peak in the air would wash out the neck.
    heat = ndimage.gaussian_filter(saliency, _HEAT_SMOOTH_MM / np.asarray(prepared.spacing))
    heat = np.where(prepared.image[..., bone] > 0, heat, 0.0)
    heat /= max(float(heat.max()), 1e-30)
    course = spine_course((segmentation >= 1) & (segmentation <= 7), spacing_z)
    found = course is not None
    if not found:
        cells = label_grid(prepared.image[..., bone], w_seg)
        threshold = preprocess.window(np.array([_BONE_HU]), [bone_window])[0, 0]
        course = spine_course(cells >= threshold, spacing_z)
    if course is None:
        course = np.tile([(h_seg - 1) / 2, (w_seg - 1) / 2], (z_p, 1))
    z_at_src = np.arange(z_src) * dz / spacing_z  # as in `_source_cells`
    bordered = _with_border(segmentation)

    def gray(hu_plane: np.ndarray) -> np.ndarray:
        return preprocess.window(hu_plane, [bone_window])[..., 0] / 255.0

    def project(heat_2d: np.ndarray, across: np.ndarray, axis: int) -> np.ndarray:
        """(z', G) heat on the prepared grid -> (z_src, len(across)) at the source pixel
        centres `across` along in-plane `axis`."""
        zz, aa = np.meshgrid(z_at_src, placement.to_grid(axis, across), indexing="ij")
        return _sample(heat_2d, zz, aa)

    letters_row = _direction_letter(series.orientation[:3])  # increasing column index
    letters_col = _direction_letter(series.orientation[3:])  # increasing row index
    opposite = {"L": "R", "R": "L", "P": "A", "A": "P", "S": "I", "I": "S"}
    top = opposite[_direction_letter(series.affine[:3, 0])]  # axis 0 runs inferior

    # Sagittal: the column through the labels' centroid.
    col_seg = float(np.mean(course[:, 1]))
    x_src = int(np.clip(np.rint(placement.to_source(1, col_seg, w_seg)), 0, w_src - 1))
    x_p = placement.to_grid(1, x_src)
    slab = np.abs(np.arange(grid) - x_p) <= max(_SLAB_MM / dx_p, 0.5)
    sagittal = View(
        "sagittal",
        gray(hu[:, :, x_src]),
        bordered[np.ix_(z_cell, rows_cell, [cols_cell[x_src]])][..., 0],
        project(heat[:, :, slab].max(axis=2), np.arange(h_src), 0),
        z_src * dz,
        h_src * dy,
        (opposite[letters_col], letters_col, top, opposite[top]),
    )

    # Curved coronal: per source slice, the row on the spine's course.
    row_p = _rescale(course[:, 0], h_seg, grid)  # (z',) prepared rows
    row_seg_at_src = np.interp(z_at_src, np.arange(z_p), course[:, 0])
    rows_src = np.rint(placement.to_source(0, row_seg_at_src, h_seg)).astype(np.int64)
    rows_src = np.clip(rows_src, 0, h_src - 1)
    slab = np.abs(np.arange(grid)[None, :] - row_p[:, None]) <= max(_SLAB_MM / dy_p, 0.5)
    coronal_heat = np.where(slab[:, :, None], heat, 0.0).max(axis=1)
    coronal = View(
        "coronal (curved)",
        gray(hu[np.arange(z_src), rows_src]),
        bordered[z_cell, rows_cell[rows_src]][:, cols_cell],
        project(coronal_heat, np.arange(w_src), 1),
        z_src * dz,
        w_src * dx,
        (opposite[letters_row], letters_row, top, opposite[top]),
    )

    # Axial: the hottest voxel of the suspected levels (of the whole study if none is found).
    factor = grid // h_seg
    suspected = np.isin(segmentation, np.flatnonzero(levels) + 1)
    suspected = suspected.repeat(factor, axis=1).repeat(factor, axis=2)
    j_peak = int(
        np.unravel_index(
            np.argmax(np.where(suspected, heat, 0) if suspected.any() else heat), heat.shape
        )[0]
    )
    i_src = int(np.clip(np.rint(j_peak * spacing_z / dz), 0, z_src - 1))
    yy, xx = np.meshgrid(
        placement.to_grid(0, np.arange(h_src)),
        placement.to_grid(1, np.arange(w_src)),
        indexing="ij",
    )
    axial = View(
        "axial",
        gray(hu[i_src]),
        bordered[j_peak][np.ix_(rows_cell, cols_cell)],
        _sample(heat[j_peak], yy, xx),
        h_src * dy,
        w_src * dx,
        (opposite[letters_row], letters_row, opposite[letters_col], letters_col),
    )

    planes = {
        "sagittal_column": x_src,
        "axial_slice": i_src,
        "coronal_row_at_axial": int(rows_src[i_src]),
        "spine_found": found,
    }
    return [sagittal, coronal, axial], planes


def _compose(view: View) -> np.ndarray:
    """(rows, cols, 3) float RGB: bone window, light vertebra colours, heat on top."""
    rgb = visualize.label_overlay(view.gray, view.labels, _LABEL_ALPHA) / 255.0
    # Only the upper part of the heat range is drawn: the faint gradient everywhere else
    # would tint the whole neck and hide the cortex. Nor over air in this plane (the airway),
    # which the slab's maximum projection would otherwise colour from the tissue beside it.
    alpha = 0.8 * np.clip((view.heat - 0.25) / 0.5, 0.0, 1.0) * (view.gray > 0)
    rgb = (1.0 - alpha[..., None]) * rgb + alpha[..., None] * _HEAT_CMAP(view.heat)[..., :3]
    return np.clip(rgb, 0.0, 1.0)


# Axes-fraction positions of the direction letters: left, right, top, bottom edge.
_LETTER_PLACES = (
    (0.01, 0.5, "left", "center"),
    (0.99, 0.5, "right", "center"),
    (0.5, 0.995, "center", "top"),
    (0.5, 0.005, "center", "bottom"),
)


def study_figure(
    uid: str,
    probs: np.ndarray,
    levels: np.ndarray,
    views: list[View],
    planes: dict[str, int | bool],
    spacing: Sequence[float],
    footnote: str,
    thresholds: Mapping[str, float],
) -> Figure:
    """The triage picture: sagittal, curved coronal and axial views side by side, in mm.

    Args:
      uid: StudyInstanceUID.
      probs: (8,) `[patient_overall, C1..C7]`.
      levels: (7,) 1 for the levels the heat map explains.
      views: from `study_views`.
      planes: plane positions from `study_views` (source voxel indices).
      spacing: (dz, dy, dx) mm of the source CT.
      footnote: run details for the bottom line.
      thresholds: label -> decision threshold (the run's), for the verdict.
    """
    dz, dy, dx = spacing
    boxes = [v.body_box_mm() for v in views]
    ratios = [(right - left) / (bottom - top) for top, bottom, left, right in boxes]
    height_in = 7.0
    fig = Figure(
        figsize=(height_in * sum(ratios) + 1.2, height_in + 1.6),
        facecolor="black",
        layout="constrained",
    )
    axes = fig.subplots(1, len(views), width_ratios=ratios)
    for ax, view, (top, bottom, left, right) in zip(axes, views, boxes, strict=True):
        ax.imshow(
            _compose(view),
            extent=(0, view.width_mm, view.height_mm, 0),
            interpolation="antialiased",
        )
        ax.set(xlim=(left, right), ylim=(bottom, top))
        ax.set_axis_off()
        ax.set_title(view.name, color="white", fontsize=11)
        for letter, (x, y, ha, va) in zip(view.letters, _LETTER_PLACES, strict=True):
            ax.text(
                x,
                y,
                letter,
                ha=ha,
                va=va,
                color="0.85",
                fontsize=10,
                fontweight="bold",
                transform=ax.transAxes,
            )
    sagittal, coronal, axial = axes
    line = dict(color="cyan", lw=0.8, ls="--", alpha=0.7)
    for ax in (sagittal, coronal):
        ax.axhline((planes["axial_slice"] + 0.5) * dz, **line)
    axial.axvline((planes["sagittal_column"] + 0.5) * dx, **line)
    axial.axhline((planes["coronal_row_at_axial"] + 0.5) * dy, **line)
    _, bottom, left, _ = boxes[0]
    sagittal.plot([left + 4, left + 4], [bottom - 56, bottom - 6], color="white", lw=2)
    sagittal.text(left + 6, bottom - 31, "5 cm", color="white", va="center", fontsize=9)

    # Level names with their probabilities beside the vertebrae, anterior to the spine.
    labels = views[0].labels
    for v, name in enumerate(VERTEBRAE, start=1):
        rows, cols = np.nonzero(labels == v)
        if not len(rows):
            continue
        suspect = levels[v - 1] > 0
        sagittal.text(
            max(cols.min() * dy - 4.0, left + 1.0),
            (rows.mean() + 0.5) * dz,
            f"{name} {probs[v]:.2f}",
            ha="right",
            va="center",
            fontsize=9,
            color="white" if suspect else visualize.VERTEBRA_COLOURS[v],
            fontweight="bold" if suspect else "normal",
            bbox=dict(boxstyle="round,pad=0.2", lw=0, fc="red" if suspect else "black", alpha=0.75),
        )

    suspected = [VERTEBRAE[i] for i in np.flatnonzero(levels)]
    cut = np.array([thresholds[name] for name in LABEL_COLUMNS])
    if (probs[1:] >= cut[1:]).any():
        verdict, colour = f"FRACTURE SUSPECTED at {', '.join(suspected)}", "#ff5050"
    elif probs[0] >= cut[0]:
        verdict, colour = (
            f"FRACTURE SUSPECTED, level uncertain (most likely {suspected[0]})",
            "#ff5050",
        )
    else:
        verdict, colour = (
            (
                "no fracture suspected (every p below its decision threshold); "
                f"heat map for the most likely level, {suspected[0]}"
            ),
            "#80e080",
        )
    values = "   ".join(f"{name} {p:.2f}" for name, p in zip(LABEL_COLUMNS, probs, strict=True))
    fig.suptitle(
        f"{uid}\npatient_overall p = {probs[0]:.2f}: {verdict}\n{values}",
        color=colour,
        fontsize=12,
        linespacing=1.5,
    )
    notes = [
        f"heat map: gradient saliency of the {'+'.join(suspected)} study logit(s), "
        f"max over +-{_SLAB_MM:.0f} mm around each plane, relative to its peak; "
        "colours: predicted vertebrae; dashed: plane positions"
    ]
    if not planes["spine_found"]:
        notes.append("no vertebra predicted: planes through the bone")
    fig.supxlabel("\n".join([*notes, footnote]), color="0.7", fontsize=8)
    return fig
