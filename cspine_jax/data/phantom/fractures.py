"""Fractures and their look-alikes, as lesions in the local frame of their vertebra (mm).

A fractured vertebra carries one `_Fracture`: lucent planes (`_Break`, optionally displacing
the bone on one side) and/or an anterior compression (`_Wedge`), sampled by `_fracture_for`
with the level's type mix. `_add_lookalikes` adds the benign findings a model must not take
for a fracture (vascular channels, osteophytes, Schmorl's nodes, a C1 arch cleft, benign
wedging); they are drawn from their own random stream, independent of the labels. Gap widths
are real-scale (0.5-2 mm) times `widen` (`plan.GAP_WIDENING`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np

from cspine_jax.data.phantom.shapes import _Block, _Capsule, _Ellipsoid, _ring_point, _unit

if TYPE_CHECKING:
    from cspine_jax.data.phantom.anatomy import _Vertebra


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


def _tilted(axis, lo_deg: float, hi_deg: float, rng) -> tuple[float, float, float]:
    """`axis` turned by lo..hi degrees in a random direction (unit 3-tuple)."""
    axis = _unit(axis)
    other = _unit(np.cross(axis, rng.normal(size=3)))
    ang = math.radians(rng.uniform(lo_deg, hi_deg))
    return tuple(_unit(axis * math.cos(ang) + other * math.sin(ang)))


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
# Look-alikes: benign findings on the intact anatomy.


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
