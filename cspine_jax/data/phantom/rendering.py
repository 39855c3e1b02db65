"""Plan -> volume: sample a `StudyPlan` on its CT grid.

Soft tissue and discs are painted with analytic partial-volume edges; each vertebra is
sampled at `SizeSpec.supersample` sub-samples per voxel from its signed distance (smooth
union of its parts, minus its cuts, fractures applied in its local frame) and averaged, so
thin cortex and gaps keep their partial volume. Then trabecular texture and correlated image
noise. Volumes are (z, y, x) float32 HU with slice 0 the most superior, clipped to the 12-bit
CT range [-1024, 3071]; labels are (z, y, x) uint8 0..9 (`anatomy.LEVELS`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cspine_jax.data.phantom.anatomy import _Disc, _Vertebra, _world_bounds
from cspine_jax.data.phantom.plan import GAP_WIDENING, StudyPlan, _Grid, _SoftTissue
from cspine_jax.data.phantom.shapes import _ellipse2d

_LABEL_COVERAGE = 0.25  # a voxel is labelled when its vertebra covers >= 1/4 of it
_SMOOTH_MM = 1.5  # smooth-union radius: rounded junctions of a vertebra's parts
_CHANNEL_RIM_MM = 0.4  # sclerotic lining of a vascular channel, real scale
_HU_AIR = -1000.0


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
