"""Single-study triage: a DICOM folder -> fracture probabilities (JSON) and a picture (PNG).

    python -m cspine_jax.predict STUDY_DIR --workdir=RUN --out=OUT [--step=N]

Loads the run's best checkpoint (or `--step`), preprocesses the series exactly as the
training cache did, scores it with `evaluation.StudyPredictor` (the code path of held-out
evaluation) and writes
  OUT/<StudyInstanceUID>.json  `patient_overall`, `C1`..`C7` probabilities and run details;
  OUT/<StudyInstanceUID>.png   sagittal, coronal and axial views of the CT (bone window) with
                               the predicted vertebra labels and a fracture heat map.

The heat map is the gradient saliency of the study fracture logits of the suspected levels
(p > 0.5, else the most likely one) with respect to the input image, computed chunk by chunk
so memory stays bounded whatever the study length. Errors (not a DICOM series, no
checkpoint) print one line and exit with status 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from matplotlib import colormaps
from matplotlib.figure import Figure
from scipy import ndimage

from cspine_jax import checkpoints, evaluation, report, visualize
from cspine_jax.data import dicom, pipeline, prepare, preprocess
from cspine_jax.data.rsna import LABEL_COLUMNS, VERTEBRAE

SUSPECT_THRESHOLD = 0.5
_SLAB_MM = 15.0  # half-thickness of the heat map's maximum projection around each view plane
_HEAT_SMOOTH_MM = 2.0  # raw input gradients are speckled at the pixel scale; fractures are not
_PATH_SMOOTH_MM = 8.0  # smoothing of the spine's course along z for the curved coronal view
_LABEL_ALPHA = 0.3  # light enough to read the cortex through the vertebra colours
_HEAT_CMAP = colormaps["hot"]
_BONE_HU = 300.0  # above soft tissue and contrast-filled vessels, below most cortex


def unstack_context(grads: np.ndarray, centres: np.ndarray, context: int,
                    out: np.ndarray) -> None:
    """Adjoint of `pipeline.stack_context`: adds gradients of stacks into the volume's.

    grads (S, G, G, K * W [+ 1]) with respect to the K-slice stacks around `centres` are
    added into out (z', G, G, W): each voxel receives the gradient of every stack channel it
    was copied into (edge slices also those of their clamped neighbours). A trailing
    position channel (`pipeline.add_position`) carries no voxel and is dropped.
    """
    grads = grads[..., : context * out.shape[-1]]
    s, h, w, _ = grads.shape
    per_offset = grads.reshape(s, h, w, context, -1)  # stack_context's (offset, window) order
    for k in range(context):
        np.add.at(out, np.clip(centres + k - context // 2, 0, out.shape[0] - 1),
                  per_offset[:, :, :, k])


class FractureSaliency:
    """Input-gradient saliency of a study's fracture logits, in bounded memory.

    Built on a StudyPredictor (whose forward pass gives the per-slice logits), plus two
    compiled programs at fixed shapes (the last chunk is padded), so a study of any length
    compiles them once: the gradient of the pooled study logits with respect to all
    per-slice logits (tiny), and the input gradient of sum(g * slice_logits) for one chunk.
    Only one chunk's activations are alive at a time.
    """

    def __init__(self, predictor: evaluation.StudyPredictor):
        self.predictor = predictor
        graphdef = predictor.graphdef

        def logit_grad(state, slice_logits, presence, valid, levels):
            model = nnx.merge(graphdef, state)

            def selected(slice_logits):
                study = model.pool(slice_logits[None], presence[None], valid[None])[0]
                return jnp.sum(study[1:] * levels)

            return jax.grad(selected)(slice_logits)

        def input_grad(state, stacks, g):
            model = nnx.merge(graphdef, state)
            return jax.grad(lambda x: jnp.sum(g * model.encode_slices(x)[1]))(stacks)

        self._logit_grad = jax.jit(logit_grad)
        self._input_grad = jax.jit(input_grad)

    def __call__(self, image: np.ndarray, levels: np.ndarray,
                 prediction: evaluation.StudyPrediction | None = None) -> np.ndarray:
        """Saliency of the summed study logits of `levels`.

        Args:
          image: (z', G, G, n_windows) uint8 prepared study.
          levels: (7,) weights of the C1..C7 study logits (1 for each suspected level).
          prediction: the predictor's output for `image`, if already computed.

        Returns:
          (z', G, G) float32 |d logits / d voxel|, summed over the windows.
        """
        p = self.predictor
        prediction = p(image) if prediction is None else prediction
        z = image.shape[0]
        starts = range(0, z, p.chunk)
        pad = ((0, len(starts) * p.chunk - z), (0, 0))
        valid = (np.arange(len(starts) * p.chunk) < z).astype(np.float32)
        g = np.asarray(self._logit_grad(p.state, np.pad(prediction.slice_logits, pad),
                                        np.pad(prediction.presence, pad), valid,
                                        np.asarray(levels, np.float32)))
        volume = np.zeros(image.shape, np.float32)
        for start in starts:
            stacks, centres = pipeline.chunk_inputs(image, start, p.chunk, p.context)
            grads = np.asarray(self._input_grad(p.state, stacks, g[start: start + p.chunk]))
            unstack_context(grads[: len(centres)], centres, p.context, volume)
        return np.abs(volume).sum(axis=-1)


def suspected_levels(probs: np.ndarray) -> np.ndarray:
    """(7,) float32 weights of C1..C7: 1 where p > 0.5, else 1 for the most likely level only.

    probs: (8,) `[patient_overall, C1..C7]`.
    """
    vertebrae = np.asarray(probs)[1:]
    levels = (vertebrae > SUSPECT_THRESHOLD).astype(np.float32)
    if not levels.any():
        levels[np.argmax(vertebrae)] = 1.0
    return levels


def _to_grid(index, n_from: int, n_to: int) -> np.ndarray:
    """Fractional index on a grid of n_from pixels -> the same point on n_to pixels (same FOV)."""
    return (np.asarray(index, np.float64) + 0.5) * n_to / n_from - 0.5


def _cells(n_from: int, n_to: int) -> np.ndarray:
    """(n_from,) index of the n_to-grid pixel containing each n_from-grid pixel centre."""
    return np.floor((np.arange(n_from) + 0.5) * n_to / n_from).astype(np.int64).clip(0, n_to - 1)


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
class _View:
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
        return (max(rows[0] * row_mm - margin_mm, 0.0),
                min((rows[-1] + 1) * row_mm + margin_mm, self.height_mm),
                max(cols[0] * col_mm - margin_mm, 0.0),
                min((cols[-1] + 1) * col_mm + margin_mm, self.width_mm))


def _views(series: dicom.Series, prepared: preprocess.Prepared, segmentation: np.ndarray,
           saliency: np.ndarray, levels: np.ndarray, windows: Sequence[Sequence[float]]
           ) -> tuple[list[_View], dict[str, int | bool]]:
    """Sagittal, curved coronal and axial views through the predicted spine.

    The CT is shown at its own resolution, sharper than the model's grid; labels (segmentation
    grid) are looked up by nearest pixel and the heat map (prepared grid) interpolated
    linearly, each at the source pixel centres. The sagittal plane passes through the labels'
    mean column (their centroid per slice, averaged along z); the coronal surface follows the
    spine's course slice by slice (so lordosis does not take the spine out of the plane); the
    axial slice is the heat map's peak within the suspected levels. Heat is the maximum over a
    +-15 mm slab around each plane. Without any predicted vertebra (an untrained or failing
    model) the planes follow the bone (> 300 HU) instead.

    windows: the run's HU windows; the one with the highest centre is the bone window.
    """
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
        factor = grid // h_seg
        cells = prepared.image[:, factor // 2::factor, factor // 2::factor, bone]
        threshold = preprocess.window(np.array([_BONE_HU]), [bone_window])[0, 0]
        course = spine_course(cells >= threshold, spacing_z)
    if course is None:
        course = np.tile([(h_seg - 1) / 2, (w_seg - 1) / 2], (z_p, 1))
    # Source slice i lies at prepared index i * dz / spacing_z (both start at the top slice).
    z_at_src = np.arange(z_src) * dz / spacing_z
    z_cell = np.clip(np.rint(z_at_src), 0, z_p - 1).astype(np.int64)
    rows_cell, cols_cell = _cells(h_src, h_seg), _cells(w_src, w_seg)

    def gray(hu_plane: np.ndarray) -> np.ndarray:
        return preprocess.window(hu_plane, [bone_window])[..., 0] / 255.0

    def project(heat_2d: np.ndarray, across: np.ndarray, n_src: int) -> np.ndarray:
        """(z', G) heat on the prepared grid -> (z_src, n_src) at the source pixel centres."""
        zz, aa = np.meshgrid(z_at_src, _to_grid(across, n_src, grid), indexing="ij")
        return ndimage.map_coordinates(heat_2d, [zz, aa], order=1, mode="nearest")

    letters_row = _direction_letter(series.orientation[:3])  # increasing column index
    letters_col = _direction_letter(series.orientation[3:])  # increasing row index
    opposite = {"L": "R", "R": "L", "P": "A", "A": "P", "S": "I", "I": "S"}
    top = opposite[_direction_letter(series.affine[:3, 0])]  # axis 0 runs inferior

    # Sagittal: the column through the labels' centroid.
    col_seg = float(np.mean(course[:, 1]))
    x_src = int(np.clip(np.rint(_to_grid(col_seg, w_seg, w_src)), 0, w_src - 1))
    x_p = _to_grid(x_src, w_src, grid)
    slab = np.abs(np.arange(grid) - x_p) <= max(_SLAB_MM / dx_p, 0.5)
    sagittal = _View(
        "sagittal", gray(hu[:, :, x_src]),
        segmentation[np.ix_(z_cell, rows_cell, [cols_cell[x_src]])][..., 0],
        project(heat[:, :, slab].max(axis=2), np.arange(h_src), h_src),
        z_src * dz, h_src * dy, (opposite[letters_col], letters_col, top, opposite[top]))

    # Curved coronal: per source slice, the row on the spine's course.
    row_p = _to_grid(course[:, 0], h_seg, grid)  # (z',) prepared rows
    rows_src = np.clip(np.rint(_to_grid(np.interp(z_at_src, np.arange(z_p), course[:, 0]),
                                        h_seg, h_src)), 0, h_src - 1).astype(np.int64)
    slab = np.abs(np.arange(grid)[None, :] - row_p[:, None]) <= max(_SLAB_MM / dy_p, 0.5)
    coronal_heat = np.where(slab[:, :, None], heat, 0.0).max(axis=1)
    coronal = _View(
        "coronal (curved)", gray(hu[np.arange(z_src), rows_src]),
        segmentation[z_cell, rows_cell[rows_src]][:, cols_cell],
        project(coronal_heat, np.arange(w_src), w_src),
        z_src * dz, w_src * dx, (opposite[letters_row], letters_row, top, opposite[top]))

    # Axial: the hottest voxel of the suspected levels (of the whole study if none is found).
    factor = grid // h_seg
    suspected = np.isin(segmentation, np.flatnonzero(levels) + 1)
    suspected = suspected.repeat(factor, axis=1).repeat(factor, axis=2)
    j_peak = int(np.unravel_index(np.argmax(np.where(suspected, heat, 0) if suspected.any()
                                            else heat), heat.shape)[0])
    i_src = int(np.clip(np.rint(j_peak * spacing_z / dz), 0, z_src - 1))
    yy, xx = np.meshgrid(_to_grid(np.arange(h_src), h_src, grid),
                         _to_grid(np.arange(w_src), w_src, grid), indexing="ij")
    axial = _View(
        "axial", gray(hu[i_src]),
        segmentation[j_peak][np.ix_(rows_cell, cols_cell)],
        ndimage.map_coordinates(heat[j_peak], [yy, xx], order=1, mode="nearest"),
        h_src * dy, w_src * dx,
        (opposite[letters_row], letters_row, opposite[letters_col], letters_col))

    planes = {"sagittal_column": x_src, "axial_slice": i_src,
              "coronal_row_at_axial": int(rows_src[i_src]), "spine_found": found}
    return [sagittal, coronal, axial], planes


def _compose(view: _View) -> np.ndarray:
    """(rows, cols, 3) float RGB: bone window, light vertebra colours, heat on top."""
    rgb = visualize.label_overlay(view.gray, view.labels, _LABEL_ALPHA) / 255.0
    # Only the upper part of the heat range is drawn: the faint gradient everywhere else
    # would tint the whole neck and hide the cortex. Nor over air in this plane (the airway),
    # which the slab's maximum projection would otherwise colour from the tissue beside it.
    alpha = 0.8 * np.clip((view.heat - 0.25) / 0.5, 0.0, 1.0) * (view.gray > 0)
    rgb = (1.0 - alpha[..., None]) * rgb + alpha[..., None] * _HEAT_CMAP(view.heat)[..., :3]
    return np.clip(rgb, 0.0, 1.0)


# Axes-fraction positions of the direction letters: left, right, top, bottom edge.
_LETTER_PLACES = ((0.01, 0.5, "left", "center"), (0.99, 0.5, "right", "center"),
                  (0.5, 0.995, "center", "top"), (0.5, 0.005, "center", "bottom"))


def study_figure(uid: str, probs: np.ndarray, levels: np.ndarray, views: list[_View],
                 planes: dict[str, int | bool], spacing: Sequence[float],
                 footnote: str) -> Figure:
    """The triage picture: sagittal, curved coronal and axial views side by side, in mm.

    Args:
      uid: StudyInstanceUID.
      probs: (8,) `[patient_overall, C1..C7]`.
      levels: (7,) 1 for the levels the heat map explains.
      views: from `_views`.
      planes: plane positions from `_views` (source voxel indices).
      spacing: (dz, dy, dx) mm of the source CT.
      footnote: run details for the bottom line.
    """
    dz, dy, dx = spacing
    boxes = [v.body_box_mm() for v in views]
    ratios = [(right - left) / (bottom - top) for top, bottom, left, right in boxes]
    height_in = 7.0
    fig = Figure(figsize=(height_in * sum(ratios) + 1.2, height_in + 1.6), facecolor="black",
                 layout="constrained")
    axes = fig.subplots(1, len(views), width_ratios=ratios)
    for ax, view, (top, bottom, left, right) in zip(axes, views, boxes, strict=True):
        ax.imshow(_compose(view), extent=(0, view.width_mm, view.height_mm, 0),
                  interpolation="antialiased")
        ax.set(xlim=(left, right), ylim=(bottom, top))
        ax.set_axis_off()
        ax.set_title(view.name, color="white", fontsize=11)
        for letter, (x, y, ha, va) in zip(view.letters, _LETTER_PLACES, strict=True):
            ax.text(x, y, letter, ha=ha, va=va, color="0.85", fontsize=10, fontweight="bold",
                    transform=ax.transAxes)
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
            max(cols.min() * dy - 4.0, left + 1.0), (rows.mean() + 0.5) * dz,
            f"{name} {probs[v]:.2f}", ha="right", va="center", fontsize=9,
            color="white" if suspect else visualize.VERTEBRA_COLOURS[v],
            fontweight="bold" if suspect else "normal",
            bbox=dict(boxstyle="round,pad=0.2", lw=0,
                      fc="red" if suspect else "black", alpha=0.75))

    suspected = [VERTEBRAE[i] for i in np.flatnonzero(levels)]
    if (probs[1:] > SUSPECT_THRESHOLD).any():
        verdict, colour = f"FRACTURE SUSPECTED at {', '.join(suspected)}", "#ff5050"
    elif probs[0] > SUSPECT_THRESHOLD:
        verdict, colour = (f"FRACTURE SUSPECTED, level uncertain (most likely {suspected[0]})",
                           "#ff5050")
    else:
        verdict, colour = (f"no fracture suspected (all p <= {SUSPECT_THRESHOLD}); "
                           f"heat map for the most likely level, {suspected[0]}"), "#80e080"
    values = "   ".join(f"{name} {p:.2f}" for name, p in zip(LABEL_COLUMNS, probs, strict=True))
    fig.suptitle(f"{uid}\npatient_overall p = {probs[0]:.2f}: {verdict}\n{values}",
                 color=colour, fontsize=12, linespacing=1.5)
    notes = [f"heat map: gradient saliency of the {'+'.join(suspected)} study logit(s), "
             f"max over +-{_SLAB_MM:.0f} mm around each plane, relative to its peak; "
             "colours: predicted vertebrae; dashed: plane positions"]
    if not planes["spine_found"]:
        notes.append("no vertebra predicted: planes through the bone")
    fig.supxlabel("\n".join([*notes, footnote]), color="0.7", fontsize=8)
    return fig


def _file_stem(uid: str) -> str:
    # A uid falls back to the folder name, which may hold characters no file name should.
    return re.sub(r"[^\w.-]", "_", uid)


def predict_study(study_dir: str, workdir: str, out_dir: str,
                  step: int | None = None) -> dict[str, object]:
    """Scores one DICOM series and writes `<uid>.json` and `<uid>.png` into `out_dir`.

    Returns:
      The JSON record: `patient_overall`, `C1`..`C7` probabilities and run details.

    Raises:
      dicom.DicomError: `study_dir` is not one readable CT series.
      FileNotFoundError: `workdir` has no checkpoint (or not `step`).
    """
    start = time.perf_counter()
    timings = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 3)
        return now

    series = dicom.load_series(study_dir)
    t = lap("read", start)
    model, config, step = checkpoints.load_model(workdir, step)
    t = lap("load_model", t)
    params = prepare.preprocessing_params(config.data)
    prepared = preprocess.prepare_series(series, **params)
    t = lap("preprocess", t)
    predictor = evaluation.StudyPredictor(model, config.data.context)
    prediction = predictor(prepared.image)
    t = lap("predict", t)
    probs = prediction.probs
    levels = suspected_levels(probs)
    saliency = FractureSaliency(predictor)(prepared.image, levels, prediction)
    t = lap("saliency", t)
    views, planes = _views(series, prepared, prediction.segmentation, saliency, levels,
                           params["windows"])
    footnote = (f"checkpoint step {step} of {os.path.abspath(workdir)}; "
                f"{series.hu.shape[0]} slices of {series.hu.shape[1]}x{series.hu.shape[2]}, "
                "spacing {:.2f} x {:.2f} x {:.2f} mm (z, y, x); research use only, "
                "not a diagnosis".format(*series.spacing))
    fig = study_figure(series.uid, probs, levels, views, planes, series.spacing, footnote)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, _file_stem(series.uid))
    report.save_png(fig, stem + ".png", dpi=150)
    lap("picture", t)

    record: dict[str, object] = {name: float(p) for name, p in zip(LABEL_COLUMNS, probs,
                                                                     strict=True)}
    record.update(
        StudyInstanceUID=series.uid,
        suspected=[VERTEBRAE[i] for i in np.flatnonzero(probs[1:] > SUSPECT_THRESHOLD)],
        threshold=SUSPECT_THRESHOLD,
        checkpoint_step=int(step),
        workdir=os.path.abspath(workdir),
        num_slices=int(series.hu.shape[0]),
        source_spacing_mm=list(series.spacing),
        prepared_slices=int(prepared.image.shape[0]),
        prepared_spacing_mm=list(prepared.spacing),
        picture_planes=planes,
        seconds=round(time.perf_counter() - start, 3),
        timings_s=timings,
        picture=os.path.abspath(stem + ".png"),
    )
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=2)
    return record


def main(argv: Sequence[str]) -> int:
    from absl import flags, logging

    if len(argv) != 2:
        print(f"usage: python -m cspine_jax.predict STUDY_DIR --workdir=RUN --out=OUT "
              f"(got {len(argv) - 1} positional arguments)", file=sys.stderr)
        return 2
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # Orbax warns about read-only folders at WARNING
    try:
        record = predict_study(argv[1], flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.step)
    except (dicom.DicomError, FileNotFoundError) as e:
        print(f"predict: error: {e}", file=sys.stderr)
        return 1
    probs = "  ".join(f"{name} {record[name]:.3f}" for name in LABEL_COLUMNS)
    print(f"{record['StudyInstanceUID']}: {probs}  ({record['seconds']:.1f} s)")
    return 0


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Training run folder (its checkpoints/).", required=True)
    flags.DEFINE_string("out", None, "Output folder for <uid>.json and <uid>.png.",
                        required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step; default: the best by val loss.")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
