"""Signed-distance primitives that vertebrae are built from, and rotation helpers.

Every primitive is a frozen dataclass in a vertebra's local frame (mm; x patient left,
y posterior, z superior) with `bounds()` -> (lo, hi), its local axis-aligned bounding box as two
(3,) arrays (mm), and `sdf(x, y, z)` -> its signed distance (mm, < 0 inside), evaluated on
broadcastable float32 arrays of local coordinates. The ellipsoid and scaled-capsule distances
are approximations, accurate near the surface where they matter: a vertebra's cortex is the
shell -t < d < 0.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


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


def _ring_point(A, B, theta):
    """Point and tangent on the C1 ring centreline; theta = 0 anterior, pi posterior."""
    p = (A * math.sin(theta), -B * math.cos(theta), 0.0)
    t = (A * math.cos(theta), B * math.sin(theta), 0.0)
    return p, t


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
