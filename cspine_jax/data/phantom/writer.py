"""Studies and the RSNA 2022 layout: `generate_study` and `write_dataset`.

A `Study` is a rendered plan as the real data present it: a DICOM `Series` (hu (z, y, x)
float32 HU, slice 0 the most superior, LPS positions in mm), the vertebra mask, the targets
and the per-slice fracture boxes (pixels). `write_dataset` writes studies as
`train_images/<uid>/<n>.dcm`, `segmentations/<uid>.nii`, `train.csv` and
`train_bounding_boxes.csv`, with the columns of `rsna.TRAIN_COLUMNS` and `rsna.BOX_COLUMNS`.
"""

from __future__ import annotations

import csv
import dataclasses
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from cspine_jax.data.dicom import Series
from cspine_jax.data.phantom.plan import SIZES, Framing, plan_study
from cspine_jax.data.phantom.rendering import render
from cspine_jax.data.rsna import BOX_COLUMNS, TRAIN_COLUMNS


@dataclasses.dataclass(frozen=True, eq=False)
class Study:
    """One generated study, ready to be written in the RSNA layout.

    Attributes:
      series: the CT volume and its DICOM geometry (hu (z, y, x) float32 HU).
      labels_zyx: (z, y, x) uint8 vertebra labels aligned with series.hu; None without a mask.
      targets: (8,) int64 `[patient_overall, C1..C7]`.
      boxes: one dict per (fracture feature, axial slice it touches): `x`, `y` (column, row of
        the top-left corner, pixels), `width`, `height` (pixels), `slice_number` (file n);
        empty for negative studies or without boxes.
      transfer_syntax: DICOM transfer syntax UID to write the files with.
      unsigned: store uint16 pixels instead of int16.
    """

    series: Series
    labels_zyx: np.ndarray | None
    targets: np.ndarray
    boxes: list
    transfer_syntax: str
    unsigned: bool


def _slice_numbers(n: int, reverse: bool) -> np.ndarray:
    return np.arange(n, 0, -1, dtype=np.int64) if reverse else np.arange(1, n + 1, dtype=np.int64)


def _boxes(footprints: dict, slice_numbers: np.ndarray, pixel_mm: float) -> list:
    """Per-slice boxes of each fracture footprint, with a 1 mm margin as an annotator draws."""
    margin = max(1, round(1.0 / pixel_mm))
    out = []
    for mask in footprints.values():
        ny, nx = mask.shape[1:]
        for z in np.nonzero(mask.any((1, 2)))[0]:
            rows = np.nonzero(mask[z].any(1))[0]
            cols = np.nonzero(mask[z].any(0))[0]
            x0, y0 = max(cols[0] - margin, 0), max(rows[0] - margin, 0)
            x1, y1 = min(cols[-1] + 1 + margin, nx), min(rows[-1] + 1 + margin, ny)
            out.append(
                {
                    "x": float(x0),
                    "y": float(y0),
                    "width": float(x1 - x0),
                    "height": float(y1 - y0),
                    "slice_number": int(slice_numbers[z]),
                }
            )
    return out


def generate_study(
    index: int,
    seed: int,
    size: str = "demo",
    *,
    with_mask: bool,
    with_boxes: bool,
    framing: Framing | None = None,
) -> Study:
    """Generate study `index` of the dataset `seed`, deterministically.

    Args:
      index, seed: identify the study (`np.random.SeedSequence([seed, index])`).
      size: "tiny", "demo" or "full" (see `SIZES`).
      with_mask: return the vertebra labels (else labels_zyx is None).
      with_boxes: return the fracture boxes of a positive study (else boxes is empty).
      framing: a wider, off-centre field of view (`Framing`); None: the size's.
      The image does not depend on with_mask / with_boxes.
    """
    plan = plan_study(index, seed, size, framing=framing)
    hu, labels, footprints = render(plan)
    g = plan.grid
    numbers = _slice_numbers(g.shape[0], plan.reverse_numbering)
    positions = (
        np.stack(
            [
                np.full(g.shape[0], g.x0),
                np.full(g.shape[0], g.y0),
                g.z0 - np.arange(g.shape[0]) * g.spacing[0],
            ],
            1,
        )
        + plan.table_offset
    )
    series = Series(
        uid=plan.uid,
        hu=hu,
        spacing=g.spacing,
        positions=positions,
        orientation=np.array([1.0, 0, 0, 0, 1, 0]),
        slice_numbers=numbers,
    )
    boxes = _boxes(footprints, numbers, g.spacing[1]) if with_boxes and plan.targets[0] else []
    return Study(
        series,
        labels if with_mask else None,
        plan.targets,
        boxes,
        plan.transfer_syntax,
        plan.unsigned,
    )


# ---------------------------------------------------------------------------------------------
# RSNA layout writer.


def dataset_flags(index: int, seed: int, mask_fraction: float, box_fraction: float):
    """(with_mask, with_boxes) of study `index`: independent of its labels and image."""
    u = np.random.default_rng(np.random.SeedSequence([seed, index, 1])).random(2)
    return bool(u[0] < mask_fraction), bool(u[1] < box_fraction)


def _write_one(job):
    out, index, seed, size, mask_fraction, box_fraction, framing = job
    from cspine_jax.data.dicom_writer import write_series
    from cspine_jax.data.nifti import write_mask

    with_mask, with_boxes = dataset_flags(index, seed, mask_fraction, box_fraction)
    study = generate_study(
        index, seed, size, with_mask=with_mask, with_boxes=with_boxes, framing=framing
    )
    uid = study.series.uid
    write_series(
        Path(out) / "train_images" / uid,
        study.series,
        transfer_syntax=study.transfer_syntax,
        unsigned=study.unsigned,
    )
    if with_mask:
        write_mask(Path(out) / "segmentations" / f"{uid}.nii", study.labels_zyx, study.series)
    return index, uid, [int(t) for t in study.targets], study.boxes


def write_dataset(
    out,
    num_studies: int,
    seed: int = 0,
    size: str = "demo",
    workers: int | None = None,
    mask_fraction: float = 0.3,
    box_fraction: float = 0.5,
    framing: Framing | None = None,
) -> Path:
    """Generate `num_studies` phantoms into `out` in the RSNA 2022 layout.

    Writes `train_images/<uid>/<n>.dcm`, `segmentations/<uid>.nii` (a `mask_fraction` share of
    studies), `train.csv` and `train_bounding_boxes.csv` (boxes for a `box_fraction` share of
    positive studies). Rows are in study-index order, so the output is the same for any
    `workers` (default os.cpu_count(); 1 runs in this process). framing: every study's field
    of view widened and moved off the patient (`Framing`); None: as the size frames it.

    Returns:
      The output folder.
    """
    from tqdm import tqdm

    if size not in SIZES:
        raise ValueError(f"unknown phantom size {size!r}; one of {sorted(SIZES)}")
    out = Path(out)
    (out / "train_images").mkdir(parents=True, exist_ok=True)
    (out / "segmentations").mkdir(exist_ok=True)
    jobs = [
        (str(out), i, seed, size, mask_fraction, box_fraction, framing) for i in range(num_studies)
    ]
    workers = min(workers or os.cpu_count() or 1, max(num_studies, 1))
    bar = tqdm(total=num_studies, desc=f"phantoms ({size})", unit="study")
    if workers == 1:
        results = []
        for job in jobs:
            results.append(_write_one(job))
            bar.update()
    else:
        # spawn: the caller may hold JAX or other threads that fork would copy half-locked.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            results = []
            for result in pool.map(_write_one, jobs, chunksize=1):
                results.append(result)
                bar.update()
    bar.close()
    results.sort(key=lambda r: r[0])
    with open(out / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TRAIN_COLUMNS)
        for _, uid, targets, _ in results:
            w.writerow([uid, *targets])
    with open(out / "train_bounding_boxes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(BOX_COLUMNS)
        for _, uid, _, boxes in results:
            for b in sorted(boxes, key=lambda b: (b["slice_number"], b["x"], b["y"])):
                w.writerow([uid, *(b[c] for c in BOX_COLUMNS[1:])])
    return out
