"""Anatomy plan: the bones and discs of one patient, in mm, independent of the sampling grid.

C1..T2 are `_Vertebra`s (labels 1..9, `LEVELS[label - 1]`), each a union of `shapes`
primitives minus its cuts, in its own local frame (origin at the body centre, C1 at the ring
centre; x patient left, y posterior, z superior; world = c + R @ q, DICOM LPS mm). C2..T2 are
sized by `_VertebraDims` and placed along a lordotic curve; C1 sits on the dens of C2. Discs
fill the gaps between the bodies of C2..T2.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from cspine_jax.data.phantom.fractures import _add_lookalikes, _Fracture, _Wedge
from cspine_jax.data.phantom.shapes import (
    _Block,
    _Capsule,
    _Ellipsoid,
    _Hole,
    _Pillar,
    _Ring,
    _rot,
    _Slab,
    _unit,
)
from cspine_jax.data.rsna import VERTEBRAE

LEVELS = (*VERTEBRAE, "T1", "T2")  # label = index + 1


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
class _VertebraDims:
    """Size of one vertebra C2..T2 (mm); C1 has its own fixed shape (`_atlas`)."""

    body_width: float  # mm, left-right extent of the body
    body_depth: float  # mm, anterior-posterior extent of the body
    body_height: float  # mm, superior-inferior extent of the body
    canal_half_width: float  # mm, midline to the lateral wall of the spinal canal
    canal_depth: float  # mm, posterior body wall to the junction of the laminae
    spinous_length: float  # mm, posterior reach of the spinous process from the laminae
    spinous_drop: float  # mm, how far the spinous tip lies below its root
    transverse_reach: float  # mm, midline to the tip of a transverse process


# Per-level base dimensions, in `_VertebraDims` field order: body width, depth, height; canal
# half-width, depth; spinous length, drop; transverse reach (mm).
_BASE = {
    "C2": _VertebraDims(17.0, 15.0, 15.0, 12.0, 15.5, 18.0, 4.0, 24.0),
    "C3": _VertebraDims(16.0, 15.0, 13.0, 12.0, 14.0, 12.0, 5.0, 26.0),
    "C4": _VertebraDims(17.0, 15.5, 13.0, 12.5, 14.0, 13.0, 6.0, 27.0),
    "C5": _VertebraDims(18.0, 16.0, 13.5, 12.5, 14.0, 15.0, 6.0, 28.0),
    "C6": _VertebraDims(19.5, 16.5, 13.5, 12.5, 14.0, 19.0, 8.0, 29.0),
    "C7": _VertebraDims(21.0, 16.5, 14.5, 12.0, 14.0, 27.0, 10.0, 33.0),
    "T1": _VertebraDims(25.0, 18.0, 16.0, 10.0, 13.0, 30.0, 16.0, 22.0),
    "T2": _VertebraDims(25.0, 19.0, 17.0, 8.5, 13.0, 32.0, 18.0, 20.0),
}
_DISC_MM = (5.0, 5.5, 5.5, 5.5, 5.0, 4.5, 4.0)  # C2-3 .. T1-2


def _sample_dims(rng) -> tuple[float, dict[str, _VertebraDims]]:
    """The patient scale and the dimensions of C2..T2 (name -> `_VertebraDims`, mm).

    Scales: patient N(1, 0.05) clipped to +-10 %, times per vertebra N(1, 0.05) in-plane and
    N(1, 0.06) in height, clipped to +-10 % / +-12 %.
    """
    patient = float(np.clip(rng.normal(1.0, 0.05), 0.9, 1.1))
    dims = {}
    for name, base in _BASE.items():
        sxy = patient * float(np.clip(rng.normal(1.0, 0.05), 0.9, 1.1))
        sz = patient * float(np.clip(rng.normal(1.0, 0.06), 0.88, 1.12))
        scaled = {f.name: getattr(base, f.name) * sxy for f in dataclasses.fields(base)}
        scaled["body_height"] = base.body_height * sz
        dims[name] = dataclasses.replace(base, **scaled)
    return patient, dims


def _spine_frames(rng, dims, discs_mm):
    """World centre and rotation of C2..T2 along a lordotic curve (C2 body centre near 0)."""
    names = list(_BASE)
    s = [0.0]
    for i in range(1, len(names)):
        s.append(
            s[-1]
            + dims[names[i - 1]].body_height / 2
            + discs_mm[i - 1]
            + dims[names[i]].body_height / 2
        )
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


def _subaxial(name, d: _VertebraDims, planes, rng):
    """Primitives and fracture anchors of C2..T2 (the C2 extras are added by `_axis`)."""
    a, b, h = d.body_width / 2, d.body_depth / 2, d.body_height / 2
    cw, cd = d.canal_half_width, d.canal_depth
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
            tp_a, tp_b = (sgn * xp, yp), (sgn * (xp + d.transverse_reach * 0.8), yp + 7.0)
            parts.append(_Slab(tp_a, tp_b, 4.2, 1.0, 1.5, 4.0, 1.5))
            anchors[f"tp_{side}"] = (
                (0.5 * (tp_a[0] + tp_b[0]), 0.5 * (tp_a[1] + tp_b[1]), 1.2),
                (tp_b[0] - tp_a[0], tp_b[1] - tp_a[1], 0.0),
            )
        elif name != "C2":
            tp_a, tp_b = (
                (sgn * (a - 1.0), b - 4.0),
                (sgn * d.transverse_reach, b - 3.0 + (1.5 if name == "C7" else 0)),
            )
            parts.append(_Slab(tp_a, tp_b, 4.5, 0.1 * h, 0.1 * h - 1.0, 3.0, 1.2))
            fr = 1.6 if name == "C7" else 2.7
            if name != "C7" or rng.random() < 0.5:
                cuts.append(
                    _Hole((sgn * (cw + 5.0), b - 3.5), fr, fr * 1.05, 0.1 * h - 5, 0.1 * h + 4)
                )
            anchors[f"tp_{side}"] = ((sgn * (cw + 5.0), b - 3.5, 0.1 * h), (1.0, 0.0, 0.0))
    # Spinous process, sloping down; bifid tips C2-C6, a tubercle on C7 and T1-T2.
    ls, drop = d.spinous_length, d.spinous_drop
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


def _axis(d: _VertebraDims, parts, cuts, anchors):
    """C2 extras: dens, superior facet shoulders, pars, small transverse processes.

    Returns the y of the dens tip (local mm), where the atlas ring is centred around it.
    """
    a, b, h = d.body_width / 2, d.body_depth / 2, d.body_height / 2
    xp, yp = d.canal_half_width + 5.0, b + 6.0
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
        tp_a, tp_b = (sgn * (a + 1.0), 1.0), (sgn * d.transverse_reach, 1.5)
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
        yp = d.body_depth / 2 + (5.0 if names[i].startswith("T") else 6.0)
        below = discs_mm[i] if i < len(discs_mm) else 4.0
        p = c + R @ np.array([0.0, yp, -d.body_height / 2 - below / 2 + rng.uniform(-1.0, 1.0)])
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
            p_up = (0.0, 0.0, d.body_height / 2 - 3.0)
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


def _world_bounds(v: _Vertebra, lo, hi):
    """World AABB (lo, hi) of the local box [lo, hi] of vertebra v."""
    centre, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
    wc = v.c + v.R @ centre
    wh = np.abs(v.R) @ half
    return wc - wh, wc + wh
