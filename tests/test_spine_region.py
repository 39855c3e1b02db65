"""The spine region (`preprocess.find_spine`, `preprocess.Placement`) on studies framed as real
scans are: fields of view up to twice the tiny phantoms' (~110-140 mm -> up to ~280 mm) with
the patient up to 30 % of their width off-centre (`phantom.Framing`). The region is found
without labels, holds every C1-C7 voxel, ignores bone that is not the column, and the masks,
boxes, cache and both preprocessing paths (prepare's stream, predict's `prepare_series`)
share it.
"""

import json
import os

import numpy as np
import pytest
from scipy import ndimage

from configs import default
from cspine_jax.data import cache, dicom, nifti, phantom, prepare, preprocess, rsna

# The default config's grid: a 100 mm spine region on 96 pixels.
PARAMS = {**prepare.preprocessing_params(default.get_config().data), "spacing_z": 4.0}
SEED = 5
FRAMINGS = {
    "as-the-size-frames-it": None,
    "twice-as-wide": phantom.Framing((2.0, 2.0), (0.0, 0.0)),
    "off-centre": phantom.Framing((1.0, 1.0), (0.15, 0.15)),  # 13-31 mm off, near an edge
    "wider-off-centre": phantom.Framing((1.5, 1.5), (0.25, 0.25)),
    "twice-as-wide-off-centre": phantom.Framing((2.0, 2.0), (0.3, 0.3)),  # 66-91 mm off
}
STUDIES = range(1, 7)  # their C1-C7 in view in every framing above (study 0's C7 is not)
# The centre found against the middle of the C1-C7 voxels: the thoracic spinous processes in
# view, long and behind, pull it back a few mm; across, the column is symmetric.
CENTRE_MM = 10.0
LEFT_RIGHT_MM = 4.0


def _study(index, framing):
    return phantom.generate_study(
        index, SEED, "tiny", with_mask=True, with_boxes=False, framing=framing
    )


def _spine_box(labels):
    """(lo, hi) (row, column) source pixel edges around every C1-C7 voxel."""
    _, rows, cols = np.nonzero((labels >= 1) & (labels <= 7))
    return np.array([rows.min(), cols.min()], float), np.array([rows.max(), cols.max()]) + 1.0


def _holds(placement, lo, hi):
    """Whether the placement's square holds source pixels [lo, hi)."""
    start = np.array(placement.start)
    end = start + placement.grid * np.array(placement.step)
    return bool(np.all(lo >= start) and np.all(hi <= end))


@pytest.mark.parametrize("framing", FRAMINGS.values(), ids=FRAMINGS.keys())
def test_region_holds_the_spine_wherever_the_field_of_view_puts_it(framing):
    missed_by_the_centre = 0
    for index in STUDIES:
        study = _study(index, framing)
        labels, pixel = study.labels_zyx, np.array(study.series.spacing[1:])
        lo, hi = _spine_box(labels)
        assert lo.min() > 0 and (hi < labels.shape[1:]).all(), "the spine must be in view"
        prepared = preprocess.prepare_series(study.series, **PARAMS, mask=labels)
        placement = prepared.placement
        assert placement.centre is not None and placement.persistence > 0.5
        assert placement.pixel_mm(study.series.spacing) == pytest.approx((100 / 96, 100 / 96))
        assert _holds(placement, lo, hi), (index, placement, lo, hi)
        # Every C1-C7 voxel made it onto the grid: as many of each level as nearest-neighbour
        # sampling at this scale gives of the whole study.
        whole = preprocess.resample_labels(
            labels, study.series.spacing, PARAMS["spacing_z"], _whole_view(labels, placement)
        )
        for level in range(1, 8):
            assert (prepared.mask == level).sum() == (whole == level).sum() > 0
        off = (np.array(placement.centre) - (lo + hi) / 2) * pixel
        assert np.hypot(*off) <= CENTRE_MM and abs(off[1]) <= LEFT_RIGHT_MM, (index, off)
        missed_by_the_centre += not _holds(_on_the_centre(placement), lo, hi)
    # What the test tells apart: off-centre, a region on the field of view's centre misses.
    if framing is not None and framing.offset[0] > 0:
        assert missed_by_the_centre >= 3


def _on_the_centre(placement):
    """`placement`'s square moved onto the field of view's centre, as `spine_window` places
    it where it finds no column."""
    step = np.array(placement.step)
    planes = np.array(
        [preprocess.fov_pixels(n, s) for n, s in zip(placement.source, step, strict=True)]
    )
    first = np.rint((planes - 1) / 2 - (placement.grid - 1) / 2)
    return preprocess.Placement(
        placement.grid, placement.source, tuple(first * step), placement.step
    )


def _whole_view(labels, placement):
    """A placement with `placement`'s pixels over a square holding the whole field of view."""
    n = int(np.ceil(max(labels.shape[1:]) / min(placement.step))) + 2
    return preprocess.Placement(n, placement.source, (0.0, 0.0), placement.step)


def _paint_bone_that_is_not_the_column(hu, spacing, centre):
    """Mandible, clavicles and humeral heads over some slices, a dense table under all of them,
    placed in mm around the spine's `centre` (row, column; rows run posterior)."""
    z, h, w = hu.shape
    rows, cols = np.mgrid[:h, :w]
    y = (rows + 0.5 - centre[0]) * spacing[1]  # mm, posterior
    x = (cols + 0.5 - centre[1]) * spacing[2]  # mm
    painted = hu.copy()

    def paint(top, bottom, where, value):
        slices = slice(int(top * z), int(np.ceil(bottom * z)))
        painted[slices] = np.where(where, value, painted[slices])

    # Mandible: a U 45 mm wide, its chin 60 mm in front of the spine, in the upper slices.
    paint(0.15, 0.45, (np.abs(y + 60 - 35 * (x / 45) ** 2) < 4) & (np.abs(x) < 48), 1200.0)
    # Clavicles from the manubrium (70 mm in front) out and back, and the humeral heads.
    t = np.clip((np.abs(x) - 25) / 105, 0, 1)
    clavicles = (np.abs(x) > 25) & (np.abs(x) < 130) & (np.abs(y + 70 - 60 * t) < 6)
    heads = np.hypot(np.abs(x) - 150, y) < 22
    paint(0.75, 1.0, clavicles | heads, 900.0)
    # A table top 100 mm behind the spine, 3 mm thick and denser than bone's threshold.
    paint(0.0, 1.0, np.abs(y - 100) < 1.5, 350.0)
    return painted


def test_bone_that_is_not_the_column_does_not_move_the_region():
    framing = FRAMINGS["twice-as-wide-off-centre"]
    for index in STUDIES[:4]:
        study = _study(index, framing)
        series = study.series
        lo, hi = _spine_box(study.labels_zyx)
        painted = _paint_bone_that_is_not_the_column(series.hu, series.spacing, (lo + hi) / 2)
        assert (painted > preprocess.BONE_HU).sum() > 1.5 * (series.hu > preprocess.BONE_HU).sum()
        args = (series.spacing, PARAMS["grid"], PARAMS["spacing_z"])
        kwargs = {"region": "spine", "region_mm": PARAMS["region_mm"]}
        _, clean = preprocess.resample_hu(series.hu, *args, **kwargs)
        _, busy = preprocess.resample_hu(painted, *args, **kwargs)
        moved = (np.array(busy.centre) - clean.centre) * series.spacing[1:]
        assert np.hypot(*moved) <= 2.0, (index, moved)
        assert _holds(busy, lo, hi)


def test_no_column_centres_the_region_on_the_field_of_view():
    z, n = 12, 150
    rows, cols = np.mgrid[:n, :n]
    neck = np.hypot(rows - 70, cols - 90) < 55  # soft tissue, off-centre, no bone
    hu = np.broadcast_to(np.where(neck, 40.0, -1000.0).astype(np.float32), (z, n, n))
    spacing = (3.0, 1.3, 1.3)  # a 195 mm field of view
    out, placement = preprocess.resample_hu(hu, spacing, 96, 3.0, region="spine", region_mm=100.0)
    assert placement.centre is None and placement.persistence == 0.0
    # Centred on the field of view to within a pixel; all of it inside: no air added.
    middle = np.array(placement.start) + 48 * np.array(placement.step)
    np.testing.assert_allclose(middle, n / 2, atol=placement.step[0])
    assert placement.inside(0).all() and placement.inside(1).all()
    assert out.shape == (12, 96, 96) and out.max() == pytest.approx(40.0, abs=0.1)


def test_a_region_wider_than_the_field_of_view_is_air_beyond_it():
    study = _study(0, None)
    series = study.series
    fov_mm = series.hu.shape[1] * series.spacing[1]
    hu, placement = preprocess.resample_hu(
        series.hu, series.spacing, 64, 4.0, region="spine", region_mm=2 * fov_mm
    )
    beyond = ~np.outer(placement.inside(0), placement.inside(1))
    assert 0.5 < beyond.mean() < 0.9
    np.testing.assert_allclose(hu[:, beyond], preprocess.AIR_HU, atol=0.01)  # z: rounding
    assert (hu[:, ~beyond] > preprocess.AIR_HU).any()
    labels = preprocess.resample_labels(study.labels_zyx, series.spacing, 4.0, placement)
    assert not labels[:, beyond].any() and labels.any()


@pytest.fixture(scope="module")
def framed_dataset(tmp_path_factory):
    """Four tiny studies framed twice as wide and off-centre, with masks and boxes."""
    root = tmp_path_factory.mktemp("framed")
    phantom.write_dataset(
        root, 4, SEED, "tiny", 1, 1.0, 1.0, framing=FRAMINGS["twice-as-wide-off-centre"]
    )
    return str(root)


def test_cache_and_predict_prepare_the_same_grid(framed_dataset, tmp_path):
    out = str(tmp_path / "cache")
    summary = prepare.prepare_dataset(framed_dataset, out, PARAMS, workers=0, progress=False)
    assert len(summary.prepared) == 4 and not summary.failed
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)["params"]
    assert manifest["region"] == "spine" and manifest["region_mm"] == 100.0
    # A cache prepared around the spine is not one of the old central crop, nor the reverse.
    old = {**{k: v for k, v in PARAMS.items() if k not in ("region", "region_mm")}, "crop": 0.75}
    with pytest.raises(cache.CacheError, match="prepared with"):
        prepare.prepare_dataset(framed_dataset, out, old, workers=0, progress=False)

    boxed = 0
    studies = {s.uid: s for s in rsna.load_index(framed_dataset)}
    for entry in cache.read_entries(out):
        study = studies[entry.uid]
        series = dicom.load_series(study.image_dir)
        mask = nifti.load_mask(study.mask_path, series.header)
        direct = preprocess.prepare_series(series, **PARAMS, mask=mask, boxes=study.boxes)
        assert entry.placement() == direct.placement  # predict's path finds the same region
        assert entry.placement().centre is not None
        assert np.abs(entry.image().astype(int) - direct.image).max() <= 1
        np.testing.assert_array_equal(entry.mask(), direct.mask)
        np.testing.assert_array_equal(entry.fracture(), direct.fracture)
        _check_alignment(entry)
        boxed += entry.has_boxes and bool(entry.fracture().any())
    assert boxed >= 1


def _check_alignment(entry):
    """The prepared mask lies on the prepared image's bone, boxes on the vertebrae."""
    image, mask = np.asarray(entry.image()), np.asarray(entry.mask())
    bone_level = preprocess.window(np.array([preprocess.BONE_HU]), [[400.0, 1800.0]])[0, 0]
    bone = image[..., 0] >= bone_level
    vertebrae = (mask >= 1) & (mask <= 7)
    on_bone = bone[vertebrae].mean()
    assert on_bone > 0.6, on_bone
    # Three pixels (~3 mm) off, the mask would sit much less on bone.
    for shift in ((0, 3, 0), (0, 0, 3), (0, -3, 0), (0, 0, -3)):
        assert bone[np.roll(vertebrae, shift, axis=(0, 1, 2))].mean() < on_bone - 0.1
    fracture = np.asarray(entry.fracture()) > 0
    if fracture.any():
        near = ndimage.binary_dilation(mask > 0, iterations=2)
        assert near[fracture].mean() > 0.9


def test_preprocessing_params_keep_old_runs_grids():
    config = default.get_config().data
    assert prepare.preprocessing_params(config) == {
        "grid": 96,
        "spacing_z": 2.0,
        "region": "spine",
        "region_mm": 100.0,
        "windows": [[400.0, 1800.0], [40.0, 400.0]],
    }
    # A run saved before the spine region has no data.region: its central crop, keyed as then.
    saved = config.to_dict()
    del saved["region"], saved["region_mm"]
    assert prepare.preprocessing_params(saved) == {
        "grid": 96,
        "spacing_z": 2.0,
        "crop": 0.75,
        "windows": [[400.0, 1800.0], [40.0, 400.0]],
    }
    with pytest.raises(ValueError, match="region"):
        prepare.preprocessing_params({**saved, "region": "middle"})


def test_framing_moves_the_field_of_view_not_the_patient():
    plain = _study(1, None)
    unframed = _study(1, phantom.Framing())  # no widening, no offset: the same study
    np.testing.assert_array_equal(plain.series.hu, unframed.series.hu)
    np.testing.assert_array_equal(plain.labels_zyx, unframed.labels_zyx)
    np.testing.assert_array_equal(plain.series.positions, unframed.series.positions)

    framed = _study(1, FRAMINGS["twice-as-wide-off-centre"])
    assert framed.series.hu.shape[1] == 2 * plain.series.hu.shape[1]
    assert framed.series.spacing == plain.series.spacing
    np.testing.assert_array_equal(framed.targets, plain.targets)
    # The patient stays where it was in the scanner (its spine's world position); its place
    # in the field of view moves.
    world, in_view = [], []
    for study in (plain, framed):
        voxels = np.argwhere((study.labels_zyx >= 1) & (study.labels_zyx <= 7))
        world.append((study.series.affine @ np.c_[voxels, np.ones(len(voxels))].T)[:3].mean(1))
        in_view.append(voxels.mean(axis=0)[1:] * study.series.spacing[1])
    np.testing.assert_allclose(world[1], world[0], atol=plain.series.spacing[1])
    assert np.hypot(*(in_view[1] - in_view[0])) > 50.0
