"""Procedural CT phantoms of the cervical spine, written in the RSNA 2022 layout.

A phantom is a patient built in millimetres (neck soft tissue, fat, airway, discs and the
vertebrae C1-T2 from signed-distance primitives in each vertebra's own frame), then sampled
on a CT grid with supersampling for partial volume, plus correlated noise and trabecular
texture. Fractures (lucent planes, compression wedges, displaced fragments) and look-alikes
(vascular channels, osteophytes, Schmorl's nodes, a C1 arch cleft, benign wedging, disc
narrowing, facet joints) are placed at the RSNA prevalence, so that a model has to learn the
local morphology of a fracture: per-vertebra global statistics (bone volume, mean HU, height)
are checked not to predict the label (`vertebra_stats`, `shortcut_auc`).

World coordinates are DICOM LPS in mm (x to the patient's left, y posterior, z superior);
volumes are (z, y, x) with axis 0 running from the most superior slice down. Labels: 0
background, 1-7 C1-C7, 8-9 T1-T2 (discs are 0); a voxel takes the vertebra covering the
largest share of it when that share is >= 1/4, so partial-volume cortex that reads as bone is
labelled, as in the real masks.

Sizes (`SIZES`): `tiny` (64^2, ~2 mm pixels, ~4 mm slices, for unit tests), `demo` (128^2,
0.85-1.1 mm pixels, 1.8-2.4 mm slices, ~65-100 slices: a laptop-CPU training set) and
`full` (512^2 (1 in 50 studies 560^2 or 768^2), 0.25-0.4 mm pixels, 200-400 slices of
0.5-1 mm: the real data's size, for latency benchmarks). The same (seed, index) is the same
patient at every size; only the grid, the noise and the demo widening of thin lucencies
(`GAP_WIDENING`) differ.

CLI: `python -m cspine_jax.data.phantom --out DIR --num_studies N --seed S --size demo`.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from scipy import ndimage

from cspine_jax.data.dicom import Series

LEVELS = ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "T1", "T2")  # label = index + 1
TARGET_COLUMNS = ("patient_overall", "C1", "C2", "C3", "C4", "C5", "C6", "C7")
TRAIN_CSV_COLUMNS = ("StudyInstanceUID", *TARGET_COLUMNS)
BOX_CSV_COLUMNS = ("StudyInstanceUID", "x", "y", "width", "height", "slice_number")

# RSNA 2022 training set (DESIGN.md): per-level prevalence C1..C7, and the number of
# fractured vertebrae in a positive study. The "4+" share (3 %) is split 4/5/6 so that the
# mean count, sum(per-level) / patient = 0.715 / 0.476 = 1.502, comes out (1.500).
LEVEL_PREVALENCE = np.array([0.072, 0.141, 0.036, 0.054, 0.080, 0.137, 0.195])
PATIENT_PREVALENCE = 0.476
COUNT_PROBS = {1: 0.65, 2: 0.25, 3: 0.07, 4: 0.015, 5: 0.010, 6: 0.005}
# Multi-level fractures are mostly contiguous: a subset's weight gains exp(1) per adjacent pair.
_ADJACENT_BONUS = 1.0

# Thin lucencies (fracture gaps, vascular channels) are this much wider than their real size:
# at ~1 mm pixels and ~2 mm slices a 0.5-2 mm gap loses most of its contrast to partial volume.
# Measured at demo size on the plane fractures of 60 studies: over the cortical voxels a
# break's footprint crosses, the median HU drop is 22 % of the cortex-to-gap difference at
# real width, 32 % at x1.5 and 43 % at x2. Full size keeps the real width.
GAP_WIDENING = {"tiny": 2.0, "demo": 2.0, "full": 1.0}
# Bumped whenever the same (seed, index, size) starts to give a different study: phantom
# sets cached by `sources.phantom_dir` are keyed by it, so an old set is never reused.
GENERATOR_VERSION = 1


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
_LABEL_COVERAGE = 0.25  # a voxel is labelled when its vertebra covers >= 1/4 of it
_SMOOTH_MM = 1.5  # smooth-union radius: rounded junctions of a vertebra's parts
_CHANNEL_RIM_MM = 0.4  # sclerotic lining of a vascular channel, real scale
_HU_AIR = -1000.0


# ---------------------------------------------------------------------------------------------
# Labels: which vertebrae are fractured.


def _fit_subset_model() -> tuple[np.ndarray, np.ndarray]:
    """Distribution over the 127 non-empty fractured-level subsets of C1..C7.

    P(S) = P(|S|) * prod_{i in S} w_i * exp(bonus * adjacent pairs) / Z_|S|: the count
    distribution is exact by construction and w is fitted by iterative proportional scaling
    so that P(C_i fractured | positive) = prevalence_i / patient prevalence.

    Returns:
      subsets: (127, 7) uint8 indicator rows; probs: (127,) float64, summing to 1.
    """
    subsets = np.array(list(itertools.product((0, 1), repeat=7))[1:], np.uint8)
    sizes = subsets.sum(1)
    adjacent = (subsets[:, :-1] & subsets[:, 1:]).sum(1)
    # The marginals of a positive study must sum to the mean count (1.500); the DESIGN.md
    # figures sum to 1.502, so they are matched up to that 0.14 % common factor.
    mean_count = sum(k * p for k, p in COUNT_PROBS.items())
    target = LEVEL_PREVALENCE / LEVEL_PREVALENCE.sum() * mean_count
    log_w = np.zeros(7)
    for _ in range(2000):
        score = subsets @ log_w + _ADJACENT_BONUS * adjacent
        probs = np.zeros(len(subsets))
        for k, pk in COUNT_PROBS.items():
            m = sizes == k
            e = np.exp(score[m] - score[m].max())
            probs[m] = pk * e / e.sum()
        marginal = probs @ subsets
        if np.abs(marginal - target).max() < 1e-9:
            break
        log_w += np.log(target / marginal)
    if np.abs(marginal - target).max() > 1e-6:
        raise RuntimeError(f"label model did not converge: {marginal} vs {target}")
    return subsets, probs / probs.sum()


_SUBSETS, _SUBSET_PROBS = _fit_subset_model()


def sample_labels(rng: np.random.Generator) -> np.ndarray:
    """Draw study targets at the RSNA prevalence.

    Returns:
      (8,) int64 `[patient_overall, C1..C7]` in {0, 1}; patient_overall == any(C1..C7).
      The per-level marginals and the fractured-count distribution both match DESIGN.md.
    """
    out = np.zeros(8, np.int64)
    if rng.random() < PATIENT_PREVALENCE:
        out[1:] = _SUBSETS[rng.choice(len(_SUBSETS), p=_SUBSET_PROBS)]
        out[0] = 1
    return out


# ---------------------------------------------------------------------------------------------
# Signed-distance primitives, evaluated on float32 arrays of local coordinates (mm).
# Each has `bounds()` -> (lo, hi) local AABB, and `sdf(x, y, z)` (< 0 inside). The ellipsoid
# and scaled-capsule distances are approximations; a vertebra's cortex is the shell -t < d < 0.


def _length(*c):
    return np.sqrt(sum(ci * ci for ci in c))


def _extrude(d2, dz, r):
    """Exact 3D distance of a 2D profile d2 extruded over |dz| <= 0, edges rounded by r."""
    return _length(np.maximum(d2, 0), np.maximum(dz, 0)) + np.minimum(np.maximum(d2, dz), 0) - r


def _ellipse2d(x, y, a, b):
    """Approximate signed distance to the ellipse x^2/a^2 + y^2/b^2 = 1."""
    k0 = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    k1 = np.sqrt((x / (a * a)) ** 2 + (y / (b * b)) ** 2)
    return k0 * (k0 - 1.0) / (k1 + 1e-6)


@dataclasses.dataclass(frozen=True)
class _Ellipsoid:
    c: tuple[float, float, float]
    r: tuple[float, float, float]

    def bounds(self):
        c, r = np.array(self.c), np.array(self.r)
        return c - r, c + r

    def sdf(self, x, y, z):
        px, py, pz = (
            (x - self.c[0]) / self.r[0],
            (y - self.c[1]) / self.r[1],
            (z - self.c[2]) / self.r[2],
        )
        k0 = _length(px, py, pz)
        k1 = _length(px / self.r[0], py / self.r[1], pz / self.r[2])
        return k0 * (k0 - 1.0) / (k1 + 1e-6)


@dataclasses.dataclass(frozen=True)
class _Capsule:
    """Segment a-b swept by a radius r; z is scaled by 1/zs first (oval cross-section)."""

    a: tuple[float, float, float]
    b: tuple[float, float, float]
    r: float
    zs: float = 1.0

    def bounds(self):
        a, b = np.array(self.a), np.array(self.b)
        pad = self.r * np.array([1.0, 1.0, self.zs])
        return np.minimum(a, b) - pad, np.maximum(a, b) + pad

    def sdf(self, x, y, z):
        a, b, zs = self.a, self.b, self.zs
        bx, by, bz = b[0] - a[0], b[1] - a[1], (b[2] - a[2]) / zs
        px, py, pz = x - a[0], y - a[1], (z - a[2]) / zs
        h = np.clip((px * bx + py * by + pz * bz) / (bx * bx + by * by + bz * bz + 1e-9), 0, 1)
        return _length(px - h * bx, py - h * by, pz - h * bz) - self.r


@dataclasses.dataclass(frozen=True)
class _Block:
    """Axis-aligned box of half sizes (a, b, h), xy corners rounded by rxy, edges by rz."""

    c: tuple[float, float, float]
    a: float
    b: float
    h: float
    rxy: float
    rz: float

    def bounds(self):
        c, half = np.array(self.c), np.array([self.a, self.b, self.h])
        return c - half, c + half

    def sdf(self, x, y, z):
        rz, rxy = self.rz, max(self.rxy - self.rz, 0.0)
        qx = np.abs(x - self.c[0]) - (self.a - self.rz - rxy)
        qy = np.abs(y - self.c[1]) - (self.b - self.rz - rxy)
        d2 = _length(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - rxy
        return _extrude(d2, np.abs(z - self.c[2]) - (self.h - rz), rz)


@dataclasses.dataclass(frozen=True)
class _Slab:
    """A 2D segment A-B in xy, half-thickness t, extruded over half-height hz around a z that
    runs linearly from za (at A) to zb (at B): laminae, transverse processes."""

    a: tuple[float, float]
    b: tuple[float, float]
    t: float
    za: float
    zb: float
    hz: float
    r: float

    def bounds(self):
        lo = np.array(
            [
                min(self.a[0], self.b[0]) - self.t,
                min(self.a[1], self.b[1]) - self.t,
                min(self.za, self.zb) - self.hz,
            ]
        )
        hi = np.array(
            [
                max(self.a[0], self.b[0]) + self.t,
                max(self.a[1], self.b[1]) + self.t,
                max(self.za, self.zb) + self.hz,
            ]
        )
        return lo, hi

    def sdf(self, x, y, z):
        bx, by = self.b[0] - self.a[0], self.b[1] - self.a[1]
        px, py = x - self.a[0], y - self.a[1]
        h = np.clip((px * bx + py * by) / (bx * bx + by * by + 1e-9), 0, 1)
        d2 = _length(px - h * bx, py - h * by) - (self.t - self.r)
        dz = np.abs(z - (self.za + h * (self.zb - self.za))) - (self.hz - self.r)
        return _extrude(d2, dz, self.r)


@dataclasses.dataclass(frozen=True)
class _Pillar:
    """Articular pillar: a vertical elliptic column cut by the facet-joint planes above and
    below (each plane: point p and unit normal n pointing up, local coords), with half the
    joint space `gap` taken off each side."""

    c: tuple[float, float]
    rx: float
    ry: float
    p_up: tuple[float, float, float]
    n_up: tuple[float, float, float]
    p_lo: tuple[float, float, float]
    n_lo: tuple[float, float, float]
    gap: float

    def bounds(self):
        corners = [
            (self.c[0] + sx * self.rx, self.c[1] + sy * self.ry) for sx in (-1, 1) for sy in (-1, 1)
        ]

        def plane_z(p, n, x, y):
            return p[2] - (n[0] * (x - p[0]) + n[1] * (y - p[1])) / n[2]

        z_hi = max(plane_z(self.p_up, self.n_up, x, y) for x, y in corners)
        z_lo = min(plane_z(self.p_lo, self.n_lo, x, y) for x, y in corners)
        return (
            np.array([self.c[0] - self.rx, self.c[1] - self.ry, z_lo]),
            np.array([self.c[0] + self.rx, self.c[1] + self.ry, z_hi]),
        )

    def sdf(self, x, y, z):
        d = _ellipse2d(x - self.c[0], y - self.c[1], self.rx, self.ry)
        p, n = self.p_up, self.n_up
        d = np.maximum(d, n[0] * (x - p[0]) + n[1] * (y - p[1]) + n[2] * (z - p[2]) + self.gap / 2)
        p, n = self.p_lo, self.n_lo
        return np.maximum(
            d, self.gap / 2 - (n[0] * (x - p[0]) + n[1] * (y - p[1]) + n[2] * (z - p[2]))
        )


@dataclasses.dataclass(frozen=True)
class _Ring:
    """The atlas ring: a tube around the ellipse (A, B) in z = 0, whose in-plane radius r and
    vertical radius rz blend from the anterior arch (ra, rza) to the posterior (rp, rzp)."""

    A: float
    B: float
    ra: float
    rza: float
    rp: float
    rzp: float

    def bounds(self):
        r = max(self.ra, self.rp)
        rz = max(self.rza, self.rzp)
        return np.array([-self.A - r, -self.B - r, -rz]), np.array([self.A + r, self.B + r, rz])

    def sdf(self, x, y, z):
        e = _ellipse2d(x, y, self.A, self.B)
        t = np.clip(0.5 + y / 12.0, 0, 1)
        r = self.ra + (self.rp - self.ra) * t
        rz = self.rza + (self.rzp - self.rza) * t
        return _length(e, z * r / rz) - r


@dataclasses.dataclass(frozen=True)
class _Hole:
    """Vertical elliptic cylinder over z0..z1: foramina transversaria."""

    c: tuple[float, float]
    rx: float
    ry: float
    z0: float
    z1: float

    def bounds(self):
        return (
            np.array([self.c[0] - self.rx, self.c[1] - self.ry, self.z0]),
            np.array([self.c[0] + self.rx, self.c[1] + self.ry, self.z1]),
        )

    def sdf(self, x, y, z):
        d = _ellipse2d(x - self.c[0], y - self.c[1], self.rx, self.ry)
        return np.maximum(d, np.abs(z - 0.5 * (self.z0 + self.z1)) - 0.5 * (self.z1 - self.z0))


# ---------------------------------------------------------------------------------------------
# Fractures and deformations (local coordinates of their vertebra).


@dataclasses.dataclass(frozen=True)
class _Break:
    """A lucent fracture plane: |n.(q - p) + wave| < gap / 2 within |q - p| < radius.

    With a displacement `shift`, the part on the +n side (within the sphere) moves by it:
    a step-off or a displaced fragment; the place it left is empty.
    """

    p: tuple[float, float, float]
    n: tuple[float, float, float]
    radius: float
    gap: float
    wave: tuple[float, float, float, float]  # amplitude, wavenumber (rad/mm), two phases
    shift: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def bounds(self):
        p = np.array(self.p)
        pad = self.radius + np.abs(np.array(self.shift)).max() + self.gap
        return p - pad, p + pad

    def side(self, x, y, z):
        """Signed distance to the wavy plane."""
        n, p = self.n, self.p
        dx, dy, dz = x - p[0], y - p[1], z - p[2]
        s = n[0] * dx + n[1] * dy + n[2] * dz
        amp, k, ph1, ph2 = self.wave
        # Two in-plane directions make the fracture line irregular rather than ruler-straight.
        t1 = _unit(np.cross(n, (0.0, 0.0, 1.0)) if abs(n[2]) < 0.9 else np.cross(n, (1.0, 0, 0)))
        t2 = np.cross(n, t1)
        u = t1[0] * dx + t1[1] * dy + t1[2] * dz
        v = t2[0] * dx + t2[1] * dy + t2[2] * dz
        return s + amp * (np.sin(k * u + ph1) + 0.6 * np.sin(1.7 * k * v + ph2))

    def within(self, x, y, z):
        p = self.p
        return (x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2 < self.radius**2


@dataclasses.dataclass(frozen=True)
class _Wedge:
    """Anterior compression of the body (half sizes a, b, h): the superior endplate drops by
    `loss` * body height at the anterior wall, linearly to 0 at the posterior wall; a
    sclerotic band of `band` mm under it gains `sclerosis` HU (0 for benign wedging)."""

    a: float
    b: float
    h: float
    loss: float
    band: float
    sclerosis: float

    def weight(self, x, y):
        return np.clip((self.b - y) / (2 * self.b), 0, 1) * np.clip(
            (self.a + 2 - np.abs(x)) / 2, 0, 1
        )


@dataclasses.dataclass(frozen=True)
class _Fracture:
    """One fractured vertebra's lesion: breaks and/or a wedge; `kind` names the pattern."""

    kind: str
    breaks: tuple[_Break, ...] = ()
    wedge: _Wedge | None = None


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def _rot(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """Rotation matrix Rz(az) @ Ry(ay) @ Rx(ax), radians."""
    cx, sx, cy, sy, cz, sz = (
        math.cos(ax),
        math.sin(ax),
        math.cos(ay),
        math.sin(ay),
        math.cos(az),
        math.sin(az),
    )
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _tilted(axis, lo_deg: float, hi_deg: float, rng) -> tuple[float, float, float]:
    """`axis` turned by lo..hi degrees in a random direction (unit 3-tuple)."""
    axis = _unit(axis)
    other = _unit(np.cross(axis, rng.normal(size=3)))
    ang = math.radians(rng.uniform(lo_deg, hi_deg))
    return tuple(_unit(axis * math.cos(ang) + other * math.sin(ang)))


# ---------------------------------------------------------------------------------------------
# Anatomy plan: what one patient looks like, in mm. Independent of the sampling grid.


@dataclasses.dataclass
class _Vertebra:
    """One vertebra in its local frame (origin: body centre; C1: ring centre).

    Local axes: x patient left, y posterior, z superior along the spine; world = c + R @ q.
    """

    label: int
    c: np.ndarray  # (3,) world mm
    R: np.ndarray  # (3, 3) columns = local axes in world
    parts: list  # union of primitives
    cuts: list  # primitives subtracted from it (foramina, channels, clefts)
    body: tuple[float, float, float] | None  # half sizes (a, b, h); None for C1
    anchors: dict  # fracture sites: name -> (point, axis) local
    cortex_mm: float
    hu_cortex: float
    hu_cancellous: float
    channels: list = dataclasses.field(default_factory=list)  # vascular channels (capsules)
    benign_wedge: _Wedge | None = None
    fracture: _Fracture | None = None


@dataclasses.dataclass(frozen=True)
class _Disc:
    c: np.ndarray
    R: np.ndarray
    a: float
    b: float
    h: float
    hu: float


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


# Per-level base dimensions (mm), C2..T2: body width W, depth D, height H; canal half-width
# cw and depth cd; spinous length ls and drop; transverse-process reach tp from the midline.
_BASE = {
    "C2": dict(W=17.0, D=15.0, H=15.0, cw=12.0, cd=15.5, ls=18.0, drop=4.0, tp=24.0),
    "C3": dict(W=16.0, D=15.0, H=13.0, cw=12.0, cd=14.0, ls=12.0, drop=5.0, tp=26.0),
    "C4": dict(W=17.0, D=15.5, H=13.0, cw=12.5, cd=14.0, ls=13.0, drop=6.0, tp=27.0),
    "C5": dict(W=18.0, D=16.0, H=13.5, cw=12.5, cd=14.0, ls=15.0, drop=6.0, tp=28.0),
    "C6": dict(W=19.5, D=16.5, H=13.5, cw=12.5, cd=14.0, ls=19.0, drop=8.0, tp=29.0),
    "C7": dict(W=21.0, D=16.5, H=14.5, cw=12.0, cd=14.0, ls=27.0, drop=10.0, tp=33.0),
    "T1": dict(W=25.0, D=18.0, H=16.0, cw=10.0, cd=13.0, ls=30.0, drop=16.0, tp=22.0),
    "T2": dict(W=25.0, D=19.0, H=17.0, cw=8.5, cd=13.0, ls=32.0, drop=18.0, tp=20.0),
}
_DISC_MM = (5.0, 5.5, 5.5, 5.5, 5.0, 4.5, 4.0)  # C2-3 .. T1-2
_PREVERTEBRAL_MM = dict(C1=6, C2=4, C3=5, C4=6, C5=10, C6=14, C7=15, T1=16, T2=17)


def _sample_dims(rng):
    """Per-level dims (mm) and the patient scale.

    Scales: patient N(1, 0.05) clipped to +-10 %, times per vertebra N(1, 0.05) in-plane and
    N(1, 0.06) in height, clipped to +-10 % / +-12 %.
    """
    patient = float(np.clip(rng.normal(1.0, 0.05), 0.9, 1.1))
    dims = {}
    for name, base in _BASE.items():
        sxy = patient * float(np.clip(rng.normal(1.0, 0.05), 0.9, 1.1))
        sz = patient * float(np.clip(rng.normal(1.0, 0.06), 0.88, 1.12))
        d = {k: v * sxy for k, v in base.items()}
        d["H"] = base["H"] * sz
        dims[name] = d
    return patient, dims


def _spine_frames(rng, dims, discs_mm):
    """World centre and rotation of C2..T2 along a lordotic curve (C2 body centre near 0)."""
    names = list(_BASE)
    s = [0.0]
    for i in range(1, len(names)):
        s.append(s[-1] + dims[names[i - 1]]["H"] / 2 + discs_mm[i - 1] + dims[names[i]]["H"] / 2)
    s = np.array(s)
    lordosis = math.radians(rng.uniform(-5.0, 35.0))  # C2-C7 Cobb angle; < 0: kyphotic (collar)
    s_c7 = s[5]
    grid = np.linspace(0.0, s[-1], 600)
    phi = lordosis * (grid / s_c7 - 0.5)
    ds = grid[1] - grid[0]
    y = np.concatenate([[0.0], np.cumsum(np.sin(phi[:-1]) * ds)])
    z = -np.concatenate([[0.0], np.cumsum(np.cos(phi[:-1]) * ds)])
    g = _rot(
        math.radians(rng.uniform(-8, 8)),
        math.radians(rng.uniform(-4, 4)),
        math.radians(rng.uniform(-5, 5)),
    )
    frames = []
    for si in s:
        local = np.array(
            [
                rng.normal(0, 0.6),
                np.interp(si, grid, y) + rng.normal(0, 0.6),
                np.interp(si, grid, z),
            ]
        )
        tilt = lordosis * (si / s_c7 - 0.5) + math.radians(rng.normal(0, 2.5))
        r = g @ _rot(tilt, math.radians(rng.normal(0, 2.0)), math.radians(rng.normal(0, 3.0)))
        frames.append((g @ local, r))
    return frames


def _facet_normal(alpha):
    return np.array([0.0, math.sin(alpha), math.cos(alpha)])


def _to_local(c, R, p_world, n_world):
    return tuple(R.T @ (np.asarray(p_world) - c)), tuple(_unit(R.T @ np.asarray(n_world)))


def _subaxial(name, d, planes, rng):
    """Primitives and fracture anchors of C2..T2 (the C2 extras are added by `_axis`)."""
    a, b, h = d["W"] / 2, d["D"] / 2, d["H"] / 2
    cw, cd = d["cw"], d["cd"]
    thoracic = name.startswith("T")
    xp, yp = (cw + 4.5, b + 5.0) if thoracic else (cw + 5.0, b + 6.0)
    prx, pry = (5.0, 5.5) if thoracic else (5.5, 6.0)
    r_ped = 3.3 if thoracic else (3.0 if name == "C2" else 2.7)
    t_lam = 2.3 if name == "C2" else 2.0
    parts = [_Block((0.0, 0.0, 0.0), a, b, h, 0.6 * min(a, b), 1.0)]
    cuts = []
    anchors = {}
    lam_mid = (0.0, b + cd + 1.5)
    for sgn, side in ((1, "L"), (-1, "R")):
        ped_a = (sgn * (a - 2.5), b - 2.0, 0.2 * h)
        ped_b = (sgn * (xp - 1.5), yp - 3.5, 0.15 * h)
        parts.append(_Capsule(ped_a, ped_b, r_ped, 1.35))
        anchors[f"pedicle_{side}"] = (
            tuple(0.5 * (np.array(ped_a) + ped_b)),
            np.subtract(ped_b, ped_a),
        )
        (p_up, n_up), (p_lo, n_lo) = planes
        parts.append(
            _Pillar((sgn * xp, yp), prx, pry, p_up, n_up, p_lo, n_lo, float(rng.uniform(1.2, 2.2)))
        )  # facet joint space, real scale
        anchors[f"pillar_{side}"] = ((sgn * xp, yp, 0.0), rng.normal(size=3))
        lam_a = (sgn * (xp - 2.5), yp + 3.5)
        parts.append(_Slab(lam_a, lam_mid, t_lam, -0.5, -2.5, 6.0 if thoracic else 5.0, 1.0))
        anchors[f"lamina_{side}"] = (
            (0.5 * lam_a[0], 0.5 * (lam_a[1] + lam_mid[1]), -1.5),
            (lam_mid[0] - lam_a[0], lam_mid[1] - lam_a[1], 0.0),
        )
        if thoracic:
            tp_a, tp_b = (sgn * xp, yp), (sgn * (xp + d["tp"] * 0.8), yp + 7.0)
            parts.append(_Slab(tp_a, tp_b, 4.2, 1.0, 1.5, 4.0, 1.5))
            anchors[f"tp_{side}"] = (
                (0.5 * (tp_a[0] + tp_b[0]), 0.5 * (tp_a[1] + tp_b[1]), 1.2),
                (tp_b[0] - tp_a[0], tp_b[1] - tp_a[1], 0.0),
            )
        elif name != "C2":
            tp_a, tp_b = (
                (sgn * (a - 1.0), b - 4.0),
                (sgn * d["tp"], b - 3.0 + (1.5 if name == "C7" else 0)),
            )
            parts.append(_Slab(tp_a, tp_b, 4.5, 0.1 * h, 0.1 * h - 1.0, 3.0, 1.2))
            fr = 1.6 if name == "C7" else 2.7
            if name != "C7" or rng.random() < 0.5:
                cuts.append(
                    _Hole((sgn * (cw + 5.0), b - 3.5), fr, fr * 1.05, 0.1 * h - 5, 0.1 * h + 4)
                )
            anchors[f"tp_{side}"] = ((sgn * (cw + 5.0), b - 3.5, 0.1 * h), (1.0, 0.0, 0.0))
    # Spinous process, sloping down; bifid tips C2-C6, a tubercle on C7 and T1-T2.
    ls, drop = d["ls"], d["drop"]
    r_sp = 3.0 if name == "C2" else (2.6 if thoracic else 2.3)
    sp_a = (0.0, lam_mid[1] - 0.5, -2.5)
    sp_b = (0.0, lam_mid[1] + ls, -2.5 - drop)
    parts.append(_Capsule(sp_a, sp_b, r_sp, 1.7))
    if name in ("C7", "T1", "T2"):
        parts.append(_Ellipsoid(sp_b, (3.5, 3.0, 4.0)))
    else:
        for sgn in (1, -1):
            parts.append(_Ellipsoid((sgn * 2.8, sp_b[1], sp_b[2]), (2.4, 2.6, 3.2)))
    anchors["spinous"] = ((0.0, sp_a[1] + 0.6 * ls, sp_a[2] - 0.6 * drop), np.subtract(sp_b, sp_a))
    if not thoracic and name != "C2":
        for sgn in (1, -1):  # uncinate processes: lips rising from the lateral upper endplate
            parts.append(
                _Capsule(
                    (sgn * (a - 1.2), -b + 3.0, h - 0.2),
                    (sgn * (a - 1.2), b - 2.5, h - 0.2),
                    1.3,
                    1.5,
                )
            )
    return parts, cuts, anchors, (a, b, h)


def _axis(d, parts, cuts, anchors):
    """C2 extras: dens, superior facet shoulders, pars, small transverse processes.

    Returns the y of the dens tip (local mm), where the atlas ring is centred around it.
    """
    a, b, h = d["W"] / 2, d["D"] / 2, d["H"] / 2
    xp, yp = d["cw"] + 5.0, b + 6.0
    dens_base, dens_top = (0.0, -1.0, h - 1.0), (0.0, -1.8, h + 12.5)
    parts.append(_Capsule(dens_base, dens_top, 4.8))
    anchors["dens"] = ((0.0, -1.2, h + 1.5), (0.0, 0.0, 1.0))
    for sgn, side in ((1, "L"), (-1, "R")):
        parts.append(_Ellipsoid((sgn * (a + 2.5), -0.5, h - 0.5), (6.5, 8.0, 4.0)))
        pars_a, pars_b = (sgn * (a + 2.5), 4.0, h - 2.0), (sgn * xp, yp - 1.0, h - 5.0)
        parts.append(_Capsule(pars_a, pars_b, 3.2, 1.3))
        anchors[f"pars_{side}"] = (
            tuple(0.5 * (np.array(pars_a) + pars_b)),
            np.subtract(pars_b, pars_a),
        )
        tp_a, tp_b = (sgn * (a + 1.0), 1.0), (sgn * d["tp"], 1.5)
        parts.append(_Slab(tp_a, tp_b, 3.5, h - 4.5, h - 4.5, 3.0, 1.2))
        cuts.append(_Hole((sgn * (a + 5.5), 1.0), 2.4, 2.6, h - 8.0, h - 1.5))
        anchors[f"tp_{side}"] = ((sgn * (a + 5.5), 1.0, h - 4.5), (1.0, 0.0, 0.0))
    return dens_top[1]


def _atlas():
    """C1 in its frame (ring centre at the origin); returns parts, anchors, ring (A, B)."""
    A, B = 18.5, 17.5
    parts = [
        _Ring(A, B, 3.0, 5.0, 3.0, 4.0),
        _Ellipsoid((0.0, -B - 2.0, 0.0), (5.0, 2.8, 4.5)),  # anterior tubercle
        _Ellipsoid((0.0, B + 2.0, -0.5), (4.0, 3.0, 4.5)),  # posterior tubercle
    ]
    cuts = []
    anchors = {}
    for sgn, side in ((1, "L"), (-1, "R")):
        parts.append(_Block((sgn * 14.5, -3.5, 0.0), 6.0, 8.5, 6.5, 3.0, 2.0))
        anchors[f"lateral_mass_{side}"] = ((sgn * 14.5, -3.5, 0.0), (0.0, 1.0, 0.0))
        parts.append(_Slab((sgn * 18.0, -3.0), (sgn * 35.0, -2.5), 4.5, 0.0, 0.0, 3.8, 1.5))
        cuts.append(_Hole((sgn * 24.5, -3.0), 2.9, 3.0, -5.0, 5.0))
    return parts, cuts, anchors, (A, B)


def _ring_point(A, B, theta):
    """Point and tangent on the C1 ring centreline; theta = 0 anterior, pi posterior."""
    p = (A * math.sin(theta), -B * math.cos(theta), 0.0)
    t = (A * math.cos(theta), B * math.sin(theta), 0.0)
    return p, t



def _bone(rng, cortex: float, hu_cortex: float, hu_cancellous: float) -> dict[str, float]:
    """One vertebra's cortex thickness (mm) and HU, varied around the patient's values."""
    return dict(
        cortex_mm=float(np.clip(cortex + rng.normal(0, 0.1), 0.9, 1.9)),
        hu_cortex=float(np.clip(hu_cortex * rng.normal(1, 0.04), 800, 1500)),
        hu_cancellous=float(np.clip(hu_cancellous * rng.normal(1, 0.06), 150, 350)),
    )

def _plan_anatomy(rng, look_rng, widen):
    """Vertebrae C1..T2 (no fractures yet) and discs of one patient."""
    patient_scale, dims = _sample_dims(rng)
    names = list(_BASE)
    degeneration = float(rng.beta(1.2, 2.5))
    discs_mm = []
    for i, base in enumerate(_DISC_MM):
        narrowing = 1.0
        if 2 <= i <= 4 and look_rng.random() < degeneration:  # C4-5 .. C6-7
            narrowing = 1.0 - 0.6 * degeneration * look_rng.uniform(0.5, 1.0)
        discs_mm.append(base * patient_scale * rng.uniform(0.85, 1.15) * narrowing)
    frames = _spine_frames(rng, dims, discs_mm)

    # Facet joint planes between consecutive pillars (world), C2/C3 .. T2/T3.
    alphas = [
        math.radians(rng.uniform(35, 50))
        if not n.startswith("T")
        else math.radians(rng.uniform(55, 70))
        for n in names
    ]
    joints = []
    for i in range(len(names)):
        c, R = frames[i]
        d = dims[names[i]]
        yp = d["D"] / 2 + (5.0 if names[i].startswith("T") else 6.0)
        below = discs_mm[i] if i < len(discs_mm) else 4.0
        p = c + R @ np.array([0.0, yp, -d["H"] / 2 - below / 2 + rng.uniform(-1.0, 1.0)])
        n = R @ _facet_normal(alphas[i])
        if i + 1 < len(names):
            n = _unit(n + frames[i + 1][1] @ _facet_normal(alphas[i + 1]))
        joints.append((p, n))

    cortex = rng.uniform(1.0, 1.7)
    hu_cortex = rng.uniform(1000, 1350)
    hu_canc = rng.uniform(170, 320)
    vertebrae = []
    for i, name in enumerate(names):
        c, R = frames[i]
        d = dims[name]
        if name == "C2":
            p_up = (0.0, 0.0, d["H"] / 2 - 3.0)
            up = (p_up, (0.0, 0.0, 1.0))
        else:
            up = _to_local(c, R, *joints[i - 1])
        lo = _to_local(c, R, *joints[i])
        parts, cuts, anchors, body = _subaxial(name, d, (up, lo), rng)
        if name == "C2":
            dens_y = _axis(d, parts, cuts, anchors)
        vertebrae.append(
            _Vertebra(
                label=i + 2,
                c=c,
                R=R,
                parts=parts,
                cuts=cuts,
                body=body,
                anchors=anchors,
                **_bone(rng, cortex, hu_cortex, hu_canc),
            )
        )
    # Atlas on top of the axis: the dens sits 2 mm behind the anterior arch.
    c2 = vertebrae[0]
    a2, b2, h2 = c2.body
    parts, cuts, anchors, (A, B) = _atlas()
    dens_in_ring = -B + 3.0 + 2.0 + 4.8
    c1_c = c2.c + c2.R @ np.array([0.0, dens_y - dens_in_ring, h2 + 12.0 * patient_scale])
    c1_R = c2.R @ _rot(
        math.radians(rng.uniform(-8, 4)),
        math.radians(rng.normal(0, 1.5)),
        math.radians(rng.normal(0, 2.0)),
    )
    scaled = [_scale_prim(p, patient_scale) for p in parts]
    scaled_cuts = [_scale_prim(p, patient_scale) for p in cuts]
    anchors = {k: (tuple(np.multiply(p, patient_scale)), ax) for k, (p, ax) in anchors.items()}
    anchors["ring"] = (A * patient_scale, B * patient_scale)
    vertebrae.insert(
        0,
        _Vertebra(
            label=1,
            c=c1_c,
            R=c1_R,
            parts=scaled,
            cuts=scaled_cuts,
            body=None,
            anchors=anchors,
            **_bone(rng, cortex, hu_cortex, hu_canc),
        ),
    )
    _add_lookalikes(vertebrae, degeneration, look_rng, widen)

    discs = []
    hu_disc = rng.uniform(70, 95)
    for i in range(1, len(vertebrae) - 1):
        up, dn = vertebrae[i], vertebrae[i + 1]
        (au, bu, hu_), (ad, bd, hd) = up.body, dn.body
        top = up.c + up.R @ np.array([0.0, 0.0, -hu_])
        bottom = dn.c + dn.R @ np.array([0.0, 0.0, hd])
        discs.append(
            _Disc(
                0.5 * (top + bottom),
                up.R,
                min(au, ad) - 0.3,
                0.95 * min(bu, bd),
                0.5 * np.linalg.norm(top - bottom) + 1.5,
                hu_disc,
            )
        )
    return vertebrae, discs


def _scale_prim(p, s):
    """Uniformly scaled copy of a C1 primitive (C1 is built at unit patient scale)."""
    if isinstance(p, _Ring):
        return _Ring(p.A * s, p.B * s, p.ra * s, p.rza * s, p.rp * s, p.rzp * s)
    if isinstance(p, _Ellipsoid):
        return _Ellipsoid(tuple(np.multiply(p.c, s)), tuple(np.multiply(p.r, s)))
    if isinstance(p, _Block):
        return _Block(tuple(np.multiply(p.c, s)), p.a * s, p.b * s, p.h * s, p.rxy * s, p.rz * s)
    if isinstance(p, _Slab):
        return _Slab(
            tuple(np.multiply(p.a, s)),
            tuple(np.multiply(p.b, s)),
            p.t * s,
            p.za * s,
            p.zb * s,
            p.hz * s,
            p.r * s,
        )
    if isinstance(p, _Hole):
        return _Hole(tuple(np.multiply(p.c, s)), p.rx * s, p.ry * s, p.z0 * s, p.z1 * s)
    raise TypeError(type(p))


def _add_lookalikes(vertebrae, degeneration, rng, widen):
    """Benign findings, independent of the fracture labels (drawn from their own stream)."""
    for v in vertebrae:
        if v.body is None:
            if rng.random() < 0.05:  # congenital posterior arch cleft: corticated, not a fracture
                A, B = v.anchors["ring"]
                w = rng.uniform(1.5, 3.5) * widen / 2
                v.cuts.append(_Block((rng.uniform(-2, 2), B, 0.0), w, 6.0, 8.0, 0.3, 0.3))
            continue
        a, b, h = v.body
        if rng.random() < 0.4:  # basivertebral vein channel from the posterior wall
            zc = rng.uniform(-0.2, 0.2) * h
            length = rng.uniform(0.3, 0.55) * 2 * b
            r = rng.uniform(0.8, 1.3) * widen / 2 + 0.4
            v.channels.append(
                _Capsule((0.0, b + 1.0, zc), (rng.normal(0, 0.5), b - length, zc), r, 0.8)
            )
            if rng.random() < 0.5:
                fork = b - 0.6 * length
                for sgn in (1, -1):
                    v.channels.append(
                        _Capsule(
                            (0.0, fork, zc),
                            (sgn * rng.uniform(2, 4), fork - rng.uniform(2, 4), zc),
                            0.8 * r,
                            0.8,
                        )
                    )
        for sz in (1, -1):  # anterior osteophytes at the endplate margins
            if rng.random() < 0.6 * degeneration:
                length = rng.uniform(1.5, 5.0)
                y = -b - 0.5 * length
                z = sz * (h + 0.3 * length)
                v.parts.append(
                    _Capsule((-0.6 * a, y, z), (0.6 * a, y, z), rng.uniform(1.0, 2.0), 1.0)
                )
        if v.label >= 3 and rng.random() < 0.08:
            v.benign_wedge = _Wedge(a, b, h, rng.uniform(0.04, 0.12), 0.0, 0.0)
        if rng.random() < 0.05:  # Schmorl's node: corticated endplate pit
            sz = rng.choice([1, -1])
            v.cuts.append(
                _Ellipsoid(
                    (rng.uniform(-0.4, 0.4) * a, rng.uniform(-0.3, 0.3) * b, sz * h),
                    (rng.uniform(2, 3.5), rng.uniform(2, 3.5), rng.uniform(1.5, 3.0)),
                )
            )


# ---------------------------------------------------------------------------------------------
# Fractures: type mix per level.

_C1_KINDS = {"ring": 0.8, "lateral_mass": 0.1, "arch_avulsion": 0.1}
# C2 has no wedge: compressing its body would squash the dens it carries.
_C2_KINDS = {"dens": 0.35, "body": 0.25, "hangman": 0.2, "posterior": 0.1, "teardrop": 0.1}
_SUBAXIAL_KINDS = {
    "body": 0.3,
    "posterior": 0.35,
    "teardrop": 0.1,
    "spinous_tip": 0.05,
    "wedge": 0.2,
}
_POSTERIOR_SITES = {"pedicle": 0.15, "pillar": 0.3, "lamina": 0.3, "spinous": 0.15, "tp": 0.1}


def _pick(rng, table: dict) -> str:
    keys = list(table)
    return keys[rng.choice(len(keys), p=np.array([table[k] for k in keys]) / sum(table.values()))]


def _break(rng, p, n, radius, widen, step_p=0.3, shift=None) -> _Break:
    """A fracture plane with a real-scale gap of 0.5-2 mm (times the demo widening)."""
    if shift is None:
        shift = (0.0, 0.0, 0.0)
        if rng.random() < step_p:  # step-off: one side slides along the plane
            shift = tuple(_unit(np.cross(n, rng.normal(size=3))) * rng.uniform(0.7, 2.0))
    wave = (
        rng.uniform(0.15, 0.45),
        2 * math.pi / rng.uniform(3.0, 8.0),
        rng.uniform(0, 2 * math.pi),
        rng.uniform(0, 2 * math.pi),
    )
    return _Break(
        tuple(map(float, p)),
        tuple(map(float, _unit(n))),
        float(radius),
        float(rng.uniform(0.5, 2.0) * widen),
        tuple(map(float, wave)),
        tuple(map(float, shift)),
    )


def _body_break(rng, a, b, h, widen) -> _Break:
    p = (rng.uniform(-0.4, 0.4) * a, rng.uniform(-0.4, 0.4) * b, rng.uniform(-0.4, 0.4) * h)
    az, el = rng.uniform(0, 2 * math.pi), math.radians(rng.uniform(-35, 35))
    n = (math.cos(az) * math.cos(el), math.sin(az) * math.cos(el), math.sin(el))
    return _break(rng, p, n, rng.uniform(0.9, 1.3) * max(a, b), widen)


def _site_break(rng, anchors, site, side, widen, radius) -> _Break:
    p, axis = anchors[f"{site}_{side}" if side else site]
    p = np.asarray(p) + rng.normal(0, 0.8, 3)
    return _break(rng, p, _tilted(axis, 0, 30, rng), radius, widen)


def _teardrop(rng, a, b, h, widen) -> _Break:
    """Anterior corner of the body (mostly inferior) broken off and displaced outward."""
    sz = -1 if rng.random() < 0.75 else 1
    c = rng.uniform(3.0, 5.0)
    p = (rng.uniform(-0.3, 0.3) * a, -b + c, sz * (h - c))
    n = _unit(np.array([0.0, -1.0, sz]) + rng.normal(0, 0.2, 3))
    shift = n * rng.uniform(1.0, 3.0) + rng.normal(0, 0.3, 3)
    return _break(rng, p, n, rng.uniform(6.0, 9.0), widen, shift=shift)


def _fracture_for(v: _Vertebra, rng, widen) -> _Fracture:
    """Sample one lesion for vertebra v (label 1..7), by the level's type mix."""
    if v.label == 1:
        kind = _pick(rng, _C1_KINDS)
        A, B = v.anchors["ring"]
        if kind == "ring":  # Jefferson-type: 1-4 breaks, the first anterior, the second posterior
            count = int(rng.choice([1, 2, 3, 4], p=[0.35, 0.4, 0.15, 0.1]))
            thetas = [
                rng.choice([-1, 1]) * math.radians(rng.uniform(15, 60)),
                math.pi + rng.choice([-1, 1]) * math.radians(rng.uniform(20, 70)),
            ]
            thetas += list(rng.uniform(0, 2 * math.pi, max(count - 2, 0)))
            breaks = []
            for th in thetas[:count]:
                p, t = _ring_point(A, B, th)
                breaks.append(_break(rng, p, _tilted(t, 0, 25, rng), rng.uniform(6.0, 8.0), widen))
            return _Fracture(kind, tuple(breaks))
        if kind == "lateral_mass":
            side = "L" if rng.random() < 0.5 else "R"
            p, _ = v.anchors[f"lateral_mass_{side}"]
            p = np.asarray(p) + rng.normal(0, 1.0, 3)
            return _Fracture(kind, (_break(rng, p, _tilted((1, 0, 0), 0, 30, rng), 9.0, widen),))
        p = (rng.uniform(-3, 3), -B - 1.0, -2.5)
        n = _unit(np.array(_tilted((0, -0.3, -1), 0, 20, rng)))
        return _Fracture(kind, (_break(rng, p, n, 5.0, widen, shift=n * rng.uniform(1.0, 2.5)),))

    a, b, h = v.body
    kind = _pick(rng, _C2_KINDS if v.label == 2 else _SUBAXIAL_KINDS)
    if kind == "dens":
        if rng.random() < 0.6:  # type II: base of the dens, oblique
            p, n, radius = (
                (0.0, -1.2, h + rng.uniform(0.5, 3.0)),
                _tilted((0, 0, 1), 25, 55, rng),
                7.0,
            )
        else:  # type III: into the body
            p, n, radius = (
                (0.0, -1.0, h - rng.uniform(2, 5)),
                _tilted((0, 0, 1), 25, 55, rng),
                rng.uniform(8, 11),
            )
        shift = None
        if rng.random() < 0.6:
            shift = (rng.normal(0, 0.5), rng.choice([-1, 1]) * rng.uniform(1.0, 3.0), 0.0)
        return _Fracture(kind, (_break(rng, p, n, radius, widen, shift=shift),))
    if kind == "body":
        return _Fracture(kind, (_body_break(rng, a, b, h, widen),))
    if kind == "hangman":  # pars interarticularis, often bilateral
        sides = ("L", "R") if rng.random() < 0.6 else (("L",) if rng.random() < 0.5 else ("R",))
        return _Fracture(
            kind, tuple(_site_break(rng, v.anchors, "pars", s, widen, 6.0) for s in sides)
        )
    if kind == "posterior":
        site = _pick(rng, _POSTERIOR_SITES) if v.label > 2 else rng.choice(["lamina", "spinous"])
        radius = {"pedicle": 6.0, "pillar": 9.0, "lamina": 7.0, "spinous": 6.0, "tp": 6.0}[site]
        if site == "spinous":
            return _Fracture(kind, (_site_break(rng, v.anchors, "spinous", None, widen, radius),))
        sides = ("L", "R") if rng.random() < 0.25 else (("L",) if rng.random() < 0.5 else ("R",))
        return _Fracture(
            kind, tuple(_site_break(rng, v.anchors, site, s, widen, radius) for s in sides)
        )
    if kind == "teardrop":
        return _Fracture(kind, (_teardrop(rng, a, b, h, widen),))
    if kind == "spinous_tip":  # clay-shoveler's: the tip avulsed and pulled down
        p, axis = v.anchors["spinous"]
        axis = _unit(axis)
        shift = axis * rng.uniform(1.0, 3.0) + np.array([0.0, 0.0, -rng.uniform(1.0, 2.0)])
        return _Fracture(
            kind, (_break(rng, p, _tilted(axis, 0, 20, rng), 7.0, widen, shift=shift),)
        )
    # Compression wedge; often with a break through the anterior cortex under the endplate.
    wedge = _Wedge(a, b, h, rng.uniform(0.15, 0.40), rng.uniform(2.0, 4.0), rng.uniform(150, 350))
    breaks = ()
    if rng.random() < 0.6:
        p = (rng.uniform(-0.3, 0.3) * a, -b + 1.5, h - 2.5)
        az = math.radians(rng.uniform(-40, 40)) + (0 if rng.random() < 0.5 else math.pi)
        breaks = (_break(rng, p, (math.cos(az), math.sin(az), 0.0), 4.5, widen, step_p=0.0),)
    return _Fracture("wedge", breaks, wedge)


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
            for i in range(9)
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


def _world_bounds(v: _Vertebra, lo, hi):
    """World AABB (lo, hi) of the local box [lo, hi] of vertebra v."""
    centre, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
    wc = v.c + v.R @ centre
    wh = np.abs(v.R) @ half
    return wc - wh, wc + wh


def _plan_grid(vertebrae, spec: SizeSpec, matrix: int, rng) -> _Grid:
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
    half = (matrix - 1) / 2 * px
    return _Grid((nz, matrix, matrix), (dz, px, px), cx - half, cy - half, top, spec.supersample)


# ---------------------------------------------------------------------------------------------
# Plan -> volume.


def plan_study(index: int, seed: int, size: str = "demo") -> StudyPlan:
    """Draw everything about study `index` of dataset `seed` (deterministic).

    Anatomy, labels and fractures do not depend on `size`: the same (seed, index) is the same
    patient at every size.
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
    for level in range(1, 8):
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
    grid = _plan_grid(vertebrae, spec, matrix, r_grid)
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


def _span(coords, lo, hi):
    """Index range [i0, i1) of ascending `coords` within [lo, hi]."""
    return int(np.searchsorted(coords, lo)), int(np.searchsorted(coords, hi, "right"))


def _block_mean(a, s):
    """(z, y, x) sub-sample array -> (z/sz, y/sy, x/sx) float32 voxel means."""
    a = a.astype(np.float32)
    # Strided adds: numpy reduces a tiny inner axis far slower than it adds slices.
    a = sum(a[:, :, u :: s[2]] for u in range(1, s[2])) + a[:, :, :: s[2]] if s[2] > 1 else a
    a = sum(a[:, u :: s[1]] for u in range(1, s[1])) + a[:, :: s[1]] if s[1] > 1 else a
    a = sum(a[u :: s[0]] for u in range(1, s[0])) + a[:: s[0]] if s[0] > 1 else a
    return a * np.float32(1.0 / (s[0] * s[1] * s[2]))


def _block_any(a, s):
    """(z, y, x) bool sub-samples -> (z/sz, y/sy, x/sx) bool: any sub-sample set."""
    for axis, k in enumerate(s):
        if k > 1:
            a = np.logical_or.reduce(
                [a[(slice(None),) * axis + (slice(u, None, k),)] for u in range(k)]
            )
    return a


def _smooth_min(a, b, k):
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0, 1)
    return b + (a - b) * h - k * h * (1 - h)


def _ramp(d, width):
    """Partial-volume fraction of a soft edge at signed distance d (mm), voxel size width."""
    return np.clip(0.5 - d / width, 0, 1)


class _Canvas:
    """The volume being painted: HU, label coverage, cancellous share, fracture footprints."""

    def __init__(self, grid: _Grid):
        self.grid = grid
        nz, ny, nx = grid.shape
        dz, dy, dx = grid.spacing
        self.x = (grid.x0 + np.arange(nx) * dx).astype(np.float32)
        self.y = (grid.y0 + np.arange(ny) * dy).astype(np.float32)
        self.z = (grid.z0 - np.arange(nz) * dz).astype(np.float32)
        self.hu = np.empty(grid.shape, np.float32)
        self.labels = np.zeros(grid.shape, np.uint8)
        self.coverage = np.zeros(grid.shape, np.float32)
        self.cancellous = np.zeros(grid.shape, np.float32)
        self.footprints = []  # (key, (i0, j0, k0), bool voxel mask)

    def voxel_block(self, lo, hi):
        """Voxel index slices covering the world box [lo, hi], or None if outside."""
        j = _span(self.y, lo[1], hi[1])
        k = _span(self.x, lo[0], hi[0])
        i = _span(-self.z, -hi[2], -lo[2])
        dz, dy, dx = self.grid.spacing
        # Widen by one voxel: sub-samples near the border of a voxel fall inside the box.
        i = (max(i[0] - 1, 0), min(i[1] + 1, len(self.z)))
        j = (max(j[0] - 1, 0), min(j[1] + 1, len(self.y)))
        k = (max(k[0] - 1, 0), min(k[1] + 1, len(self.x)))
        if i[0] >= i[1] or j[0] >= j[1] or k[0] >= k[1]:
            return None
        return i, j, k

    def subsamples(self, block):
        """World coordinates (1-D, mm) of the block's sub-samples along z (descending), y, x."""
        (i0, i1), (j0, j1), (k0, k1) = block
        sz, sy, sx = self.grid.supersample
        dz, dy, dx = self.grid.spacing

        def axis(n0, n1, s, step, origin, sign):
            u = n0 + (np.arange((n1 - n0) * s) + 0.5) / s - 0.5
            return (origin + sign * u * step).astype(np.float32)

        return (
            axis(i0, i1, sz, dz, self.grid.z0, -1),
            axis(j0, j1, sy, dy, self.grid.y0, 1),
            axis(k0, k1, sx, dx, self.grid.x0, 1),
        )


def _paint_soft_tissue(canvas: _Canvas, soft: _SoftTissue):
    """Air, skin, fat, muscle, intermuscular fat and airway, slice by slice (analytic edges)."""
    px = canvas.grid.spacing[1]
    X = canvas.x[None, None, :]
    Y = canvas.y[None, :, None]
    chunk = max(1, 8_000_000 // (len(canvas.x) * len(canvas.y)))
    for i0 in range(0, len(canvas.z), chunk):
        z = canvas.z[i0 : i0 + chunk].astype(np.float64)
        # Each table column interpolated at these slices, shaped (slices, 1, 1).
        cx, cy, ax, by, fat, acx, acy, aax, aay = (
            np.interp(z, soft.z, t).astype(np.float32)[:, None, None]
            for t in (
                *soft.centre.T,
                *soft.half.T,
                soft.fat_mm,
                *soft.airway_centre.T,
                *soft.airway_half.T,
            )
        )
        dx, dy = X - cx, Y - cy
        dist = np.sqrt(dx * dx + dy * dy)
        rho = np.sqrt((dx / ax) ** 2 + (dy / by) ** 2)
        d = dist * (1 - 1 / np.maximum(rho, 1e-3))  # radial distance outside the skin ellipse
        hu = _HU_AIR + _ramp(d, px) * (soft.hu_skin - _HU_AIR)
        hu += _ramp(d + 1.5, px) * (soft.hu_fat - hu)
        hu += _ramp(d + 1.5 + fat, px) * (soft.hu_muscle - hu)
        for bx, bdy, rx, ry, z0, z1 in soft.blobs:
            _paint_ellipse(
                hu,
                canvas,
                (z >= z0) & (z <= z1),
                cx[:, 0, 0] + bx,
                cy[:, 0, 0] + bdy,
                np.full(len(z), rx),
                np.full(len(z), ry),
                soft.hu_fat,
            )
        _paint_ellipse(
            hu,
            canvas,
            np.ones(len(z), bool),
            acx[:, 0, 0],
            acy[:, 0, 0],
            aax[:, 0, 0],
            aay[:, 0, 0],
            _HU_AIR,
        )
        canvas.hu[i0 : i0 + chunk] = hu


def _paint_ellipse(hu, canvas, rows, cx, cy, ax, ay, value):
    """Blend `value` into hu (a chunk of slices) inside per-slice ellipses, only on the slices
    flagged in `rows` and only in the window the ellipses can reach."""
    idx = np.nonzero(rows)[0]
    if not len(idx):
        return
    px = canvas.grid.spacing[1]
    lo_x, hi_x = (cx[idx] - ax[idx]).min() - 2 * px, (cx[idx] + ax[idx]).max() + 2 * px
    lo_y, hi_y = (cy[idx] - ay[idx]).min() - 2 * px, (cy[idx] + ay[idx]).max() + 2 * px
    j0, j1 = _span(canvas.y, lo_y, hi_y)
    k0, k1 = _span(canvas.x, lo_x, hi_x)
    if j0 >= j1 or k0 >= k1:
        return
    i0, i1 = idx[0], idx[-1] + 1
    sl = slice(i0, i1)
    X = canvas.x[None, None, k0:k1]
    Y = canvas.y[None, j0:j1, None]
    f = _ramp(
        _ellipse2d(
            X - cx[sl, None, None], Y - cy[sl, None, None], ax[sl, None, None], ay[sl, None, None]
        ),
        px,
    )
    f *= rows[sl, None, None]
    view = hu[sl, j0:j1, k0:k1]
    view += f * (np.float32(value) - view)


def _paint_disc(canvas: _Canvas, disc: _Disc):
    r = max(disc.a, disc.b, disc.h)
    block = canvas.voxel_block(disc.c - r, disc.c + r)
    if block is None:
        return
    (i0, i1), (j0, j1), (k0, k1) = block
    Z, Y, X = canvas.z[i0:i1, None, None], canvas.y[None, j0:j1, None], canvas.x[None, None, k0:k1]
    R, c = disc.R.astype(np.float32), disc.c.astype(np.float32)
    qx = R[0, 0] * (X - c[0]) + R[1, 0] * (Y - c[1]) + R[2, 0] * (Z - c[2])
    qy = R[0, 1] * (X - c[0]) + R[1, 1] * (Y - c[1]) + R[2, 1] * (Z - c[2])
    qz = R[0, 2] * (X - c[0]) + R[1, 2] * (Y - c[1]) + R[2, 2] * (Z - c[2])
    d = np.maximum(_ellipse2d(qx, qy, disc.a, disc.b), np.abs(qz) - disc.h)
    f = _ramp(d, canvas.grid.spacing[1])
    view = canvas.hu[i0:i1, j0:j1, k0:k1]
    view += f * (disc.hu - view)


def _paint_vertebra(canvas: _Canvas, v: _Vertebra, fractures: bool, gap_hu: float, widen: float):
    """Sample vertebra v with supersampling and composite it over the canvas."""
    fracture = v.fracture if fractures else None
    wedge = fracture.wedge if fracture and fracture.wedge else v.benign_wedge
    breaks = fracture.breaks if fracture else ()
    bounds = [p.bounds() for p in v.parts]
    lo = np.min([b[0] for b in bounds], 0) - 1.0
    hi = np.max([b[1] for b in bounds], 0) + 1.0
    pad = max([np.abs(b.shift).max() for b in breaks], default=0.0) + _SMOOTH_MM
    block = canvas.voxel_block(*_world_bounds(v, lo, hi))
    if block is None:
        return
    Zs, Ys, Xs = canvas.subsamples(block)
    R, c = v.R.astype(np.float32), v.c.astype(np.float32)
    dX, dY, dZ = Xs[None, None, :] - c[0], Ys[None, :, None] - c[1], Zs[:, None, None] - c[2]
    qx = R[0, 0] * dX + R[1, 0] * dY + R[2, 0] * dZ
    qy = R[0, 1] * dX + R[1, 1] * dY + R[2, 1] * dZ
    qz = R[0, 2] * dX + R[1, 2] * dY + R[2, 2] * dZ
    sclerotic = None
    if wedge is not None:  # inverse map: where does this point come from in the intact body?
        w = wedge.weight(qx, qy)
        qz = -wedge.h + (qz + wedge.h) / (1 - wedge.loss * w)
        if wedge.sclerosis:
            sclerotic = (w > 0.15) & (qz > wedge.h - wedge.band) & (qz < wedge.h)
            sclerotic_region = (w > 0.25) & (qz > 0) & (qz < wedge.h + 1)

    def sub(lo_l, hi_l, extra=0.0):
        wlo, whi = _world_bounds(v, np.asarray(lo_l) - extra, np.asarray(hi_l) + extra)
        i = _span(-Zs, -whi[2], -wlo[2])
        j = _span(Ys, wlo[1], whi[1])
        k = _span(Xs, wlo[0], whi[0])
        return np.s_[i[0] : i[1], j[0] : j[1], k[0] : k[1]]

    vacated = []
    regions = []
    for n_break, brk in enumerate(breaks):
        if not any(brk.shift):
            continue
        s = sub(*brk.bounds())
        x, y, z = qx[s], qy[s], qz[s]
        sx_, sy_, sz_ = (np.float32(t) for t in brk.shift)
        mx, my, mz = x - sx_, y - sy_, z - sz_
        frag = (brk.side(mx, my, mz) > brk.gap / 2) & brk.within(mx, my, mz)
        vac = (brk.side(x, y, z) > brk.gap / 2) & brk.within(x, y, z) & ~frag
        qx[s] = np.where(frag, mx, x)
        qy[s] = np.where(frag, my, y)
        qz[s] = np.where(frag, mz, z)
        vacated.append((n_break, s, vac, frag))

    D = np.full(qx.shape, 1e3, np.float32)
    for prim, (plo, phi) in zip(v.parts, bounds, strict=True):
        s = sub(plo, phi, pad)
        D[s] = _smooth_min(D[s], prim.sdf(qx[s], qy[s], qz[s]), _SMOOTH_MM)
    for prim in v.cuts:
        s = sub(*prim.bounds(), pad)
        D[s] = np.maximum(D[s], -prim.sdf(qx[s], qy[s], qz[s]))
    for n_break, s, vac, frag in vacated:
        regions.append((n_break, s, (vac | frag) & (D[s] < 0)))
        D[s][vac] = 1e3

    inside = D < 0
    cortical = D > -v.cortex_mm
    hu = np.where(cortical, np.float32(v.hu_cortex), np.float32(v.hu_cancellous))
    if sclerotic is not None:
        hu += np.where(sclerotic & ~cortical, np.float32(wedge.sclerosis), np.float32(0))
        regions.append(("wedge", np.s_[:, :, :], sclerotic_region & inside))
    gap_all = np.zeros(qx.shape, bool)
    # Vascular channels: a lucent lumen lined by a thin sclerotic rim (a fracture has none).
    rim_mm = _CHANNEL_RIM_MM * widen
    for ch in v.channels:
        s = sub(*ch.bounds(), rim_mm)
        d = ch.sdf(qx[s], qy[s], qz[s])
        lumen = (d < 0) & inside[s]
        rim = (d >= 0) & (d < rim_mm) & inside[s]
        hu[s] = np.where(lumen, np.float32(gap_hu), np.where(rim, np.float32(v.hu_cortex), hu[s]))
        gap_all[s] |= lumen
        cortical[s] |= rim
    for n_break, brk in enumerate(breaks):
        s = sub(*brk.bounds())
        side = np.abs(brk.side(qx[s], qy[s], qz[s]))
        within = brk.within(qx[s], qy[s], qz[s])
        gap = (side < brk.gap / 2) & within & inside[s]
        gap_all[s] |= gap
        regions.append((n_break, s, (side < brk.gap / 2 + 0.75) & within & inside[s]))
    hu = np.where(gap_all, np.float32(gap_hu), hu)

    ss = canvas.grid.supersample
    f = _block_mean(inside, ss)
    painted = _block_mean(np.where(inside, hu, np.float32(0)), ss)
    canc = _block_mean(inside & ~cortical & ~gap_all, ss)
    (i0, i1), (j0, j1), (k0, k1) = block
    view = np.s_[i0:i1, j0:j1, k0:k1]
    canvas.hu[view] = canvas.hu[view] * (1 - f) + painted
    canvas.cancellous[view] = np.maximum(canvas.cancellous[view], canc)
    better = (f >= _LABEL_COVERAGE) & (f > canvas.coverage[view])
    canvas.labels[view][better] = v.label
    canvas.coverage[view] = np.maximum(canvas.coverage[view], f)
    if fracture is not None:
        for key, s, region in regions:
            full = np.zeros(qx.shape, bool)
            full[s] |= region
            canvas.footprints.append(((v.label, key), (i0, j0, k0), _block_any(full, ss)))


def _smoothed_noise(rng, shape, sigma_px):
    """Unit-variance Gaussian noise, correlated in-plane by a Gaussian of sigma_px pixels."""
    n = rng.standard_normal(shape, dtype=np.float32)
    if sigma_px < 0.3:
        return n
    ndimage.gaussian_filter(n, (0, sigma_px, sigma_px), output=n, truncate=3.0)
    delta = np.zeros((1, 31, 31), np.float32)
    delta[0, 15, 15] = 1
    gain = np.sqrt(
        (ndimage.gaussian_filter(delta, (0, sigma_px, sigma_px), truncate=3.0) ** 2).sum()
    )
    return n / gain


def render(plan: StudyPlan, *, fractures: bool = True):
    """Sample a plan on its grid.

    Args:
      plan: from `plan_study`.
      fractures: False paints the same patient, noise included, without its fractures.

    Returns:
      hu: (z, y, x) float32 HU, slice 0 most superior, clipped to [-1024, 3071].
      labels: (z, y, x) uint8 vertebra labels 0..9.
      footprints: {(label, break index or "wedge"): (z, y, x) bool} voxels of each fracture
        feature's intersection with bone.
    """
    canvas = _Canvas(plan.grid)
    _paint_soft_tissue(canvas, plan.soft)
    for disc in plan.discs:
        _paint_disc(canvas, disc)
    gap_hu = float(np.random.default_rng(plan.noise_seed + 1).uniform(30, 80))
    for v in plan.vertebrae:
        _paint_vertebra(canvas, v, fractures, gap_hu, GAP_WIDENING[plan.size])
    rng = np.random.default_rng(plan.noise_seed)
    px = plan.grid.spacing[1]
    nz = plan.grid.shape[0]
    chunk = max(1, 8_000_000 // (plan.grid.shape[1] * plan.grid.shape[2]))
    for i0 in range(0, nz, chunk):
        view = canvas.hu[i0 : i0 + chunk]
        texture = _smoothed_noise(rng, view.shape, 0.7 / px)
        texture *= np.minimum(canvas.cancellous[i0 : i0 + chunk], 1) * np.float32(plan.texture_sd)
        view += texture
        view += _smoothed_noise(rng, view.shape, plan.noise_corr_px) * np.float32(plan.noise_sd)
    np.clip(canvas.hu, -1024, 3071, out=canvas.hu)
    footprints = {}
    for key, (i0, j0, k0), mask in canvas.footprints:
        full = footprints.setdefault(key, np.zeros(plan.grid.shape, bool))
        full[i0 : i0 + mask.shape[0], j0 : j0 + mask.shape[1], k0 : k0 + mask.shape[2]] |= mask
    return canvas.hu, canvas.labels, footprints


# ---------------------------------------------------------------------------------------------
# Studies.


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
    index: int, seed: int, size: str = "demo", *, with_mask: bool, with_boxes: bool
) -> Study:
    """Generate study `index` of the dataset `seed`, deterministically.

    Args:
      index, seed: identify the study (`np.random.SeedSequence([seed, index])`).
      size: "tiny", "demo" or "full" (see `SIZES`).
      with_mask: return the vertebra labels (else labels_zyx is None).
      with_boxes: return the fracture boxes of a positive study (else boxes is empty).
      The image does not depend on with_mask / with_boxes.
    """
    plan = plan_study(index, seed, size)
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
# Shortcut check.

STAT_NAMES = ("bone_volume_mm3", "mean_hu", "height_mm")


def vertebra_stats(hu: np.ndarray, labels: np.ndarray, spacing) -> np.ndarray:
    """Global statistics of C1..C7 that must not give the fracture label away.

    Args:
      hu: (z, y, x) HU; labels: (z, y, x) vertebra labels; spacing: (dz, dy, dx) mm.

    Returns:
      (7, 3) float64 rows C1..C7: bone volume (mm^3 of voxels > 300 HU inside the label),
      mean HU inside the label, height (mm, z-extent of the label); NaN for an absent level.
    """
    dz, dy, dx = spacing
    out = np.full((7, 3), np.nan)
    for level in range(1, 8):
        m = labels == level
        if not m.any():
            continue
        values = hu[m]
        zs = np.nonzero(m.any((1, 2)))[0]
        out[level - 1] = (
            (values > 300).sum() * dz * dy * dx,
            values.mean(),
            (zs[-1] - zs[0] + 1) * dz,
        )
    return out


def shortcut_auc(stats: np.ndarray, targets: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated ROC-AUC of a logistic regression predicting fracture from the stats.

    Args:
      stats: (studies, 7, 3) from `vertebra_stats`; targets: (studies, 8) `[overall, C1..C7]`.
      Each feature is standardised within its level (so the level's own prevalence is no
      feature); vertebrae with a missing level are dropped; folds are stratified.

    Returns:
      The AUC over all vertebrae of the out-of-fold predicted probabilities.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    stats = np.asarray(stats, np.float64)
    mean = np.nanmean(stats, axis=0, keepdims=True)
    sd = np.nanstd(stats, axis=0, keepdims=True) + 1e-9
    x = ((stats - mean) / sd).reshape(-1, stats.shape[-1])
    y = np.asarray(targets)[:, 1:].reshape(-1)
    keep = np.isfinite(x).all(1)
    x, y = x[keep], y[keep]
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    p = cross_val_predict(LogisticRegression(), x, y, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, p))


# ---------------------------------------------------------------------------------------------
# RSNA layout writer.


def dataset_flags(index: int, seed: int, mask_fraction: float, box_fraction: float):
    """(with_mask, with_boxes) of study `index`: independent of its labels and image."""
    u = np.random.default_rng(np.random.SeedSequence([seed, index, 1])).random(2)
    return bool(u[0] < mask_fraction), bool(u[1] < box_fraction)


def _write_one(job):
    out, index, seed, size, mask_fraction, box_fraction = job
    from cspine_jax.data.dicom import write_series
    from cspine_jax.data.nifti import write_mask

    with_mask, with_boxes = dataset_flags(index, seed, mask_fraction, box_fraction)
    study = generate_study(index, seed, size, with_mask=with_mask, with_boxes=with_boxes)
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
) -> Path:
    """Generate `num_studies` phantoms into `out` in the RSNA 2022 layout.

    Writes `train_images/<uid>/<n>.dcm`, `segmentations/<uid>.nii` (a `mask_fraction` share of
    studies), `train.csv` and `train_bounding_boxes.csv` (boxes for a `box_fraction` share of
    positive studies). Rows are in study-index order, so the output is the same for any
    `workers` (default os.cpu_count(); 1 runs in this process).

    Returns:
      The output folder.
    """
    from tqdm import tqdm

    if size not in SIZES:
        raise ValueError(f"unknown phantom size {size!r}; one of {sorted(SIZES)}")
    out = Path(out)
    (out / "train_images").mkdir(parents=True, exist_ok=True)
    (out / "segmentations").mkdir(exist_ok=True)
    jobs = [(str(out), i, seed, size, mask_fraction, box_fraction) for i in range(num_studies)]
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
        w.writerow(TRAIN_CSV_COLUMNS)
        for _, uid, targets, _ in results:
            w.writerow([uid, *targets])
    with open(out / "train_bounding_boxes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(BOX_CSV_COLUMNS)
        for _, uid, _, boxes in results:
            for b in sorted(boxes, key=lambda b: (b["slice_number"], b["x"], b["y"])):
                w.writerow([uid, b["x"], b["y"], b["width"], b["height"], b["slice_number"]])
    return out


def _cli():
    from absl import app, flags

    flags.DEFINE_string("out", None, "Output folder (RSNA layout).", required=True)
    flags.DEFINE_integer("num_studies", 100, "Number of studies.")
    flags.DEFINE_integer("seed", 0, "Dataset seed.")
    flags.DEFINE_enum("size", "demo", list(SIZES), "Phantom size.")
    flags.DEFINE_integer("workers", None, "Worker processes (default: all cores).")
    flags.DEFINE_float("mask_fraction", 0.3, "Share of studies with a segmentation.")
    flags.DEFINE_float("box_fraction", 0.5, "Share of positive studies with boxes.")
    FLAGS = flags.FLAGS

    def main(argv):
        del argv
        from cspine_jax.data import phantom  # workers pickle functions by their module name

        phantom.write_dataset(
            FLAGS.out,
            FLAGS.num_studies,
            FLAGS.seed,
            FLAGS.size,
            FLAGS.workers,
            FLAGS.mask_fraction,
            FLAGS.box_fraction,
        )

    app.run(main)


if __name__ == "__main__":
    _cli()
