"""Study plan: everything that determines one study, drawn from (seed, index) alone.

`plan_study` draws the labels, the anatomy (`anatomy`), the fractures and look-alikes
(`fractures`), the neck's soft tissue, the CT grid of the requested size (`SIZES`) and the
DICOM layout (numbering, transfer syntax, pixel sign), each from its own random stream, so
that one choice never shifts another. World coordinates are DICOM LPS in mm; the grid is
(z, y, x) with slice 0 the most superior. Only the grid (`_Grid`) and the widening of thin
lucencies (`GAP_WIDENING`) depend on the size: the same (seed, index) is the same patient at
every size.

The sizes frame every study alike: a square field of view of `SizeSpec.matrix` pixels centred
near the spinal canal at C4. Real scans are framed less kindly (130-250 mm fields of view, the
neck anywhere in them); a `Framing` widens the field of view and moves the patient off its
centre, from its own random stream, so the same (seed, index) stays the same patient and the
default framing (None) the same study, byte for byte.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from cspine_jax.data.phantom.anatomy import LEVELS, _plan_anatomy, _world_bounds
from cspine_jax.data.phantom.fractures import _fracture_for
from cspine_jax.data.phantom.labels import sample_labels
from cspine_jax.data.rsna import NUM_VERTEBRAE

# Thin lucencies (fracture gaps, vascular channels) are this much wider than their real size:
# at ~1 mm pixels and ~2 mm slices a 0.5-2 mm gap loses most of its contrast to partial volume.
# Measured at demo size on the plane fractures of 60 studies: over the cortical voxels a
# break's footprint crosses, the median HU drop is 22 % of the cortex-to-gap difference at
# real width, 32 % at x1.5 and 43 % at x2. Full size keeps the real width.
GAP_WIDENING = {"tiny": 2.0, "demo": 2.0, "full": 1.0}


@dataclasses.dataclass(frozen=True)
class SizeSpec:
    """Sampling grid of one phantom size.

    Attributes:
      matrix: in-plane pixels (square).
      pixel_mm: (lo, hi) uniform range of the pixel spacing.
      slice_mm: (lo, hi) uniform range of the slice spacing (== thickness).
      slices: (lo, hi) target slice count; the spacing is adapted (within slice_mm) to it.
      top_margin_mm: (lo, hi) coverage above the C1 ring.
      supersample: (sz, sy, sx) sub-samples per voxel for the bone partial volume.
    """

    matrix: int
    pixel_mm: tuple[float, float]
    slice_mm: tuple[float, float]
    slices: tuple[int, int]
    top_margin_mm: tuple[float, float]
    supersample: tuple[int, int, int]


SIZES = {
    "tiny": SizeSpec(64, (1.7, 2.2), (3.5, 4.5), (35, 50), (3.0, 12.0), (2, 2, 2)),
    "demo": SizeSpec(128, (0.85, 1.1), (1.8, 2.4), (65, 100), (3.0, 15.0), (2, 2, 2)),
    "full": SizeSpec(512, (0.25, 0.4), (0.5, 1.0), (200, 400), (5.0, 30.0), (1, 1, 1)),
}
_UID_ROOT = "1.2.826.0.1.3680043.10"


@dataclasses.dataclass(frozen=True)
class Framing:
    """A field of view framed otherwise than the sizes frame it: wider, the patient off-centre.

    Each study draws its own framing (uniformly within the ranges, the offset's direction
    uniformly around the circle) from a stream of its own.

    Attributes:
      fov_scale: (lo, hi) field-of-view width as a multiple of the size's: more pixels at the
        size's pixel spacing, so the anatomy is sampled as finely as without a framing.
      offset: (lo, hi) distance of the spinal canal (at C4) from the field of view's centre,
        as a fraction of the field of view's width.
    """

    fov_scale: tuple[float, float] = (1.0, 1.0)
    offset: tuple[float, float] = (0.0, 0.0)


# Prevertebral soft tissue in front of each level (mm): thin behind the pharynx, thicker
# from C5 down, where the oesophagus lies between the airway and the spine.
_PREVERTEBRAL_MM = dict(C1=6, C2=4, C3=5, C4=6, C5=10, C6=14, C7=15, T1=16, T2=17)


@dataclasses.dataclass(frozen=True)
class _SoftTissue:
    """Neck cross-section parameters, tabulated on a z grid (world mm, ascending)."""

    z: np.ndarray  # (k,)
    centre: np.ndarray  # (k, 2) neck ellipse centre (x, y)
    half: np.ndarray  # (k, 2) neck half axes
    fat_mm: np.ndarray  # (k,) subcutaneous fat thickness
    airway_centre: np.ndarray  # (k, 2)
    airway_half: np.ndarray  # (k, 2)
    blobs: tuple  # intermuscular fat: (dx, dy, rx, ry, z0, z1) relative to the neck centre
    hu_skin: float
    hu_fat: float
    hu_muscle: float


@dataclasses.dataclass(frozen=True)
class _Grid:
    shape: tuple[int, int, int]  # (z, y, x)
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm
    x0: float  # world x of column 0 (pixel centre)
    y0: float  # world y of row 0
    z0: float  # world z of slice 0 (most superior)
    supersample: tuple[int, int, int]


@dataclasses.dataclass
class StudyPlan:
    """Everything that determines one study, before sampling it on the grid.

    `vertebrae[i]` has label i + 1; `targets` is (8,) `[patient_overall, C1..C7]`.
    """

    uid: str
    size: str
    targets: np.ndarray
    vertebrae: list
    discs: list
    soft: _SoftTissue
    grid: _Grid
    noise_sd: float  # HU, image noise
    noise_corr_px: float  # in-plane Gaussian correlation of the noise (sigma, pixels)
    texture_sd: float  # HU, trabecular texture of cancellous bone (~0.7 mm grain)
    noise_seed: int
    table_offset: np.ndarray  # (3,) world shift of the whole patient in the DICOM frame
    reverse_numbering: bool
    transfer_syntax: str
    unsigned: bool


# ---------------------------------------------------------------------------------------------
# Soft tissue and grid.


def _plan_soft(vertebrae, rng) -> _SoftTissue:
    """Neck outline, fat, airway and intermuscular fat along the spine."""
    refs = []  # (z, x, y of the spine's anterior surface, prevertebral mm)
    for v in vertebrae:
        front = (
            (0.0, -v.anchors["ring"][1] - 3.0, 0.0) if v.body is None else (0.0, -v.body[1], 0.0)
        )
        p = v.c + v.R @ np.array(front)
        refs.append((p[2], p[0], p[1], _PREVERTEBRAL_MM[LEVELS[v.label - 1]]))
    refs = np.array(sorted(refs))
    z = np.arange(refs[0, 0] - 80.0, refs[-1, 0] + 80.0, 4.0)
    front_x = np.interp(z, refs[:, 0], refs[:, 1])
    front_y = np.interp(z, refs[:, 0], refs[:, 2])
    prevert = np.interp(z, refs[:, 0], refs[:, 3]) * rng.uniform(0.8, 1.3)
    z_c2, z_c7, z_t2 = (vertebrae[i].c[2] for i in (1, 6, 8))
    an0, bn0 = rng.uniform(50, 66), rng.uniform(52, 64)
    head = np.clip((z - z_c2) / 30.0, 0, 1) * rng.uniform(5, 12)
    shoulders = np.clip((z_c7 - z) / max(z_c7 - z_t2, 1.0), 0, 1.5)
    half = np.stack(
        [an0 + head + shoulders * rng.uniform(15, 35), bn0 + head + shoulders * rng.uniform(5, 15)],
        1,
    )
    centre = np.stack(
        [
            front_x + rng.uniform(-3, 3),
            front_y + 8.0 + rng.uniform(10, 18) + 3.0 * np.sin(z / 40.0 + rng.uniform(0, 6)),
        ],
        1,
    )
    fat = rng.uniform(3, 14) * (1 + 0.15 * np.sin(z / 25.0 + rng.uniform(0, 6)))
    # Airway: oropharynx (wide, flat) at C1-C3, larynx at C4-C5, round trachea from C6 down.
    level_z = np.array([v.c[2] for v in vertebrae])[::-1]
    shape = np.array(
        [
            (rng.uniform(12, 18), rng.uniform(5, 9))
            if i < 3
            else (rng.uniform(9, 13), rng.uniform(6, 10))
            if i < 5
            else (rng.uniform(6.5, 9), rng.uniform(6.5, 9))
            for i in range(len(LEVELS))
        ]
    )[::-1]
    ah = np.stack([np.interp(z, level_z, shape[:, 0]), np.interp(z, level_z, shape[:, 1])], 1)
    ac = np.stack([front_x + rng.uniform(-3, 3), front_y - prevert - ah[:, 1]], 1)
    blobs = []
    for _ in range(int(rng.integers(3, 7))):
        th = rng.uniform(0.15, 0.85) * math.pi
        r = rng.uniform(0.45, 0.8)
        z0 = rng.uniform(z[0] + 60, z[-1] - 60)
        blobs.append(
            (
                r * math.cos(th) * an0,
                r * math.sin(th) * bn0,
                rng.uniform(2, 7),
                rng.uniform(1.5, 4),
                z0,
                z0 + rng.uniform(30, 120),
            )
        )
    return _SoftTissue(
        z,
        centre,
        half,
        fat,
        ac,
        ah,
        tuple(blobs),
        rng.uniform(30, 60),
        rng.uniform(-120, -80),
        rng.uniform(40, 60),
    )


def _plan_grid(
    vertebrae, spec: SizeSpec, matrix: int, rng, framing: Framing | None = None, framing_rng=None
) -> _Grid:
    top = max(_world_bounds(vertebrae[0], *p.bounds())[1][2] for p in vertebrae[0].parts)
    top += rng.uniform(*spec.top_margin_mm)
    bottom = vertebrae[8].c[2] + rng.uniform(-4.0, 4.0)
    extent = top - bottom
    dz = float(np.clip(extent / rng.uniform(*spec.slices), *spec.slice_mm))
    nz = int(round(extent / dz)) + 1
    px = float(rng.uniform(*spec.pixel_mm))
    c4 = vertebrae[3]
    canal = c4.c + c4.R @ np.array([0.0, c4.body[1] + 7.0, 0.0])
    cx = canal[0] + rng.uniform(-6, 6)
    cy = canal[1] + rng.uniform(-4, 6)
    if framing is not None:  # its own stream: the default grid draws what it always drew
        matrix = int(round(matrix * framing_rng.uniform(*framing.fov_scale)))
        off = framing_rng.uniform(*framing.offset) * matrix * px
        angle = framing_rng.uniform(0, 2 * math.pi)
        cx, cy = cx - off * math.cos(angle), cy - off * math.sin(angle)
    half = (matrix - 1) / 2 * px
    return _Grid((nz, matrix, matrix), (dz, px, px), cx - half, cy - half, top, spec.supersample)


# ---------------------------------------------------------------------------------------------
# The whole study.


def plan_study(
    index: int, seed: int, size: str = "demo", *, framing: Framing | None = None
) -> StudyPlan:
    """Draw everything about study `index` of dataset `seed` (deterministic).

    Anatomy, labels and fractures do not depend on `size` or `framing`: the same (seed, index)
    is the same patient at every size and framing. framing: None frames the study as the size
    does (`Framing`).
    """
    if size not in SIZES:
        raise ValueError(f"unknown phantom size {size!r}; one of {sorted(SIZES)}")
    spec = SIZES[size]
    streams = np.random.SeedSequence([seed, index]).spawn(8)
    r_labels, r_anat, r_look, r_frac, r_soft, r_layout, r_grid, r_noise = (
        np.random.default_rng(s) for s in streams
    )
    widen = GAP_WIDENING[size]
    targets = sample_labels(r_labels)
    vertebrae, discs = _plan_anatomy(r_anat, r_look, widen)
    for level in range(1, NUM_VERTEBRAE + 1):
        fracture = _fracture_for(vertebrae[level - 1], r_frac, widen)  # drawn for every level,
        if targets[level]:  # so one level's lesion does not depend on the others' labels
            vertebrae[level - 1].fracture = fracture
    soft = _plan_soft(vertebrae, r_soft)
    reverse = bool(r_layout.random() < 0.3)
    compressed = r_layout.random() < 0.2
    syntax = (
        (RLELossless if r_layout.random() < 0.5 else JPEG2000Lossless)
        if compressed
        else ExplicitVRLittleEndian
    )
    unsigned = bool(r_layout.random() < 0.15)
    # The real data are 99.6 % 512^2 with a few larger matrices: 1 full-size study in 50 here.
    odd_matrix = int(r_layout.choice([560, 768])) if r_layout.random() < 0.02 else spec.matrix
    matrix = odd_matrix if size == "full" else spec.matrix
    r_framing = np.random.default_rng(np.random.SeedSequence([seed, index, 2]))
    grid = _plan_grid(vertebrae, spec, matrix, r_grid, framing, r_framing)
    return StudyPlan(
        uid=f"{_UID_ROOT}.{int(seed)}.{int(index)}",
        size=size,
        targets=targets,
        vertebrae=vertebrae,
        discs=discs,
        soft=soft,
        grid=grid,
        noise_sd=float(r_noise.uniform(10, 30)),
        noise_corr_px=float(r_noise.uniform(0.5, 0.9)),
        texture_sd=float(r_noise.uniform(20, 45)),
        noise_seed=int(r_noise.integers(2**62)),
        # Scanner coordinates: off the isocentre by the table height, anywhere along the table.
        table_offset=np.array(
            [
                r_layout.uniform(-20, 20),
                r_layout.uniform(-20, 20) + 150.0,
                r_layout.uniform(-350, -50),
            ]
        ),
        reverse_numbering=reverse,
        transfer_syntax=str(syntax),
        unsigned=unsigned,
    )
