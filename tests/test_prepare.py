"""Preprocessing onto the model grid, and the resumable, failure-tolerant prepare job."""

import json
import os
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from cspine_jax.data import cache, dicom, dicom_writer, nifti, phantom, prepare, preprocess, rsna

PARAMS = {"grid": 16, "spacing_z": 2.0, "crop": 1.0, "windows": [[400.0, 1800.0], [40.0, 400.0]]}


def test_resize_preserves_constants_and_means():
    m = preprocess.resize_matrix(64, 16)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-6)
    x = np.random.default_rng(0).normal(size=64).astype(np.float32)
    # Antialiased 4x reduction: every input sample contributes, the mean is kept.
    assert (m.sum(axis=0) > 0).all()
    assert abs((m @ x).mean() - x.mean()) < 0.05
    ramp = np.arange(64, dtype=np.float32)
    np.testing.assert_allclose(m[2:-2] @ ramp, (np.arange(16)[2:-2] + 0.5) * 4 - 0.5, atol=1e-4)


def test_resample_hu_follows_spacing():
    z, spacing = 21, (1.0, 0.5, 0.5)
    hu = np.broadcast_to(np.arange(z, dtype=np.float32)[:, None, None] * 10, (z, 32, 32))
    out, _ = preprocess.resample_hu(hu, spacing, grid=8, spacing_z=2.5)
    assert out.shape == (9, 8, 8)  # 20 mm of slices every 2.5 mm
    # Slice j lies at 2.5 j mm, i.e. source index 2.5 j; its value is kept (interior slices).
    np.testing.assert_allclose(out[1:-1, 4, 4], 25.0 * np.arange(1, 8), atol=1e-3)


def test_crop_keeps_the_centre_on_every_map():
    z, hw = 5, 40
    series = _series("1.2.9", z, hw=hw)  # bone block at rows/columns 8..15
    labels = np.zeros((z, hw, hw), np.uint8)
    labels[:, 8:16, 8:16] = 3
    boxes = np.array([[2, 8, 8, 8, 8]], np.float32)  # on file 2, the block itself
    prepared = preprocess.prepare_series(
        series,
        grid=16,
        spacing_z=1.0,
        crop=0.5,
        windows=[[400.0, 1800.0]],
        mask=labels,
        boxes=boxes,
    )
    # Crop 0.5 keeps source pixels 10..29, 1.25 per output pixel: the block's columns
    # 10..15 become output pixels 0..4.
    assert prepared.spacing[1] == pytest.approx(0.8 * 40 * 0.5 / 16)
    np.testing.assert_array_equal(np.flatnonzero(prepared.mask[0, 0] == 3), np.arange(5))
    assert (prepared.image[0, 0, :4, 0] > 200).all() and (prepared.image[0, 0, 6:, 0] == 0).all()
    assert np.flatnonzero(prepared.fracture[1, 0]).tolist() == [0, 1, 2, 3, 4]
    assert not prepared.fracture[[0, 2, 3, 4]].any()


@pytest.mark.parametrize(
    "grid, region, spacing_z, unsigned",
    [
        (24, {"crop": 0.8}, 3.0, False),
        (40, {"crop": 1.0}, 7.0, True),
        (96, {"crop": 0.9}, 4.4, False),
        (24, {"region": "spine", "region_mm": 90.0}, 3.0, False),
        (40, {"region": "spine", "region_mm": 150.0}, 7.0, True),  # wider than the field of view
    ],
    ids=["down", "down-z-antialiased", "up", "spine", "spine-past-the-field-of-view"],
)
def test_streaming_prepare_matches_the_full_volume_path(
    tmp_path, grid, region, spacing_z, unsigned
):
    """read_resampled + on_grid (slices resized as decoded, rescaled after) against the
    straightforward path: the whole HU volume, then dense resampling matrices over the grid's
    placement (air where it reaches past the field of view)."""
    study = next(
        s
        for s in (
            phantom.generate_study(i, 0, "tiny", with_mask=True, with_boxes=True) for i in range(50)
        )
        if s.boxes
    )
    dicom_writer.write_series(tmp_path, study.series, unsigned=unsigned)
    # One slice with its own rescale: the stream must rescale slice by slice.
    odd = pydicom.dcmread(tmp_path / "7.dcm")
    odd.RescaleSlope, odd.RescaleIntercept = 0.5, -700
    odd.save_as(tmp_path / "7.dcm")
    boxes = np.array(
        [[b["slice_number"], b["x"], b["y"], b["width"], b["height"]] for b in study.boxes],
        np.float64,
    )
    assert len(boxes)
    windows = [[400.0, 1800.0], [40.0, 400.0]]
    params = {"grid": grid, "spacing_z": spacing_z, **region, "windows": windows}

    header, hu, placement = preprocess.read_resampled(tmp_path, grid, spacing_z, **region)
    fast = preprocess.on_grid(
        header,
        hu,
        placement,
        spacing_z=spacing_z,
        windows=windows,
        mask=study.labels_zyx,
        boxes=boxes,
    )

    series = dicom.load_series(tmp_path)
    z, h, w = series.shape
    dz = series.spacing[0]
    rz = preprocess.interpolation_matrix(
        z, preprocess.slice_positions(z, dz, spacing_z), spacing_z / dz
    )
    ry, rx = (
        preprocess.axis_matrix(n, placement.start[a], placement.step[a], grid)
        for a, n in ((0, h), (1, w))
    )
    dense = np.tensordot(rz, ry @ series.hu.astype(np.float64) @ rx.T, axes=1)
    dense[:, ~placement.inside(0)] = preprocess.AIR_HU
    dense[:, :, ~placement.inside(1)] = preprocess.AIR_HU
    if "crop" in region:
        assert placement == preprocess.Placement.centred(h, w, grid, region["crop"])
        assert placement.inside(0).all() and placement.inside(1).all()
    else:
        assert placement.centre is not None and placement.persistence > 0.5
        assert placement.step[0] * series.spacing[1] == pytest.approx(region["region_mm"] / grid)
        # 150 mm: wider than the tiny phantoms' ~110-140 mm field of view.
        assert placement.inside(0).all() == (region["region_mm"] < 100)
    np.testing.assert_allclose(hu, dense, atol=0.02)
    image = preprocess.window(dense, params["windows"])
    assert fast.image.shape == image.shape
    assert np.abs(fast.image.astype(int) - image).max() <= 1  # rounding at a .5 only
    assert (fast.image == image).mean() > 0.999

    full = preprocess.prepare_series(series, **params, mask=study.labels_zyx, boxes=boxes)
    assert full.placement == placement
    assert np.abs(fast.image.astype(int) - full.image).max() <= 1
    np.testing.assert_array_equal(fast.mask, full.mask)
    np.testing.assert_array_equal(fast.fracture, full.fracture)
    assert fast.fracture.any() and fast.spacing == full.spacing
    assert header.uid == series.uid and header.shape == series.shape
    np.testing.assert_array_equal(header.slice_numbers, series.slice_numbers)


def test_window_maps_to_uint8():
    hu = np.array([-2000.0, -500.0, 400.0, 1300.0, 3000.0])
    w = preprocess.window(hu, [[400.0, 1800.0]])
    assert w.dtype == np.uint8
    assert w[:, 0].tolist() == [0, 0, 128, 255, 255]


def _series(uid, z, reverse=False, hw=24):
    numbers = np.arange(z, 0, -1) if reverse else np.arange(1, z + 1)
    hu = np.full((z, hw, hw), -1000.0, np.float32)
    hu[:, 8:16, 8:16] = 1000.0 + 10 * np.arange(z)[:, None, None]
    positions = np.stack([np.full(z, -50.0), np.full(z, -60.0), 100.0 - np.arange(z)], axis=1)
    return dicom.Series(uid, hu, (1.0, 0.8, 0.8), positions, (1, 0, 0, 0, 1, 0), numbers)


@pytest.fixture()
def dataset(tmp_path):
    """Three tiny studies: one with a mask and boxes, one reverse-numbered, one corrupt."""
    root = tmp_path / "rsna"
    rows = []
    for i, uid in enumerate(["1.2.1", "1.2.2", "1.2.3"]):
        series = _series(uid, 12, reverse=i == 1)
        dicom_writer.write_series(root / "train_images" / uid, series)
        rows.append(f"{uid},{int(i == 0)},{int(i == 0)},0,0,0,0,0,0")
        if i == 0:
            os.makedirs(root / "segmentations")
            labels = np.zeros(series.shape, np.uint8)
            labels[:, 8:16, 8:16] = 1
            nifti.write_mask(root / "segmentations" / f"{uid}.nii", labels, series)
    (root / "train.csv").write_text(",".join(rsna.TRAIN_COLUMNS) + "\n" + "\n".join(rows) + "\n")
    (root / "train_bounding_boxes.csv").write_text(
        ",".join(rsna.BOX_COLUMNS) + "\n1.2.1,8,8,8,8,5\n1.2.1,8,8,8,8,6\n"
    )
    # Study 3: a slice cut short mid-pixel-data.
    victim = root / "train_images" / "1.2.3" / "7.dcm"
    victim.write_bytes(victim.read_bytes()[:-300])
    return str(root)


def test_prepare_writes_entries_reports_failures_and_resumes(dataset, tmp_path):
    out = str(tmp_path / "cache")
    summary = prepare.prepare_dataset(dataset, out, PARAMS, workers=0, progress=False)
    assert summary.prepared == ["1.2.1", "1.2.2"]
    assert list(summary.failed) == ["1.2.3"]
    assert "7.dcm" in summary.failed["1.2.3"]
    assert "FAILED 1.2.3" in "\n".join(summary.lines())
    with open(os.path.join(out, "failures-0.json")) as f:
        assert list(json.load(f)) == ["1.2.3"]

    entries = {e.uid: e for e in cache.read_entries(out)}
    assert sorted(entries) == ["1.2.1", "1.2.2"]
    first = entries["1.2.1"]
    assert first.has_mask and first.has_boxes and first.num_slices == 6  # 11 mm / 2 mm + 1
    assert first.image().shape == (6, 16, 16, 2) and first.image().dtype == np.uint8
    assert first.mask()[:, 8, 8].tolist() == [1] * 6
    # Boxes on files 5 and 6 (4-5 mm below the top) mark the slices at 4 and 6 mm, in the
    # box's pixels scaled from 24 to 16 columns: x 8..16 -> 5..11 (rounded outwards).
    assert first.slice_fracture().tolist() == [0, 0, 1, 1, 0, 0]
    fracture = np.asarray(first.fracture())
    assert fracture[2, 5:11, 5:11].all() and fracture[2].sum() == 36
    # Reverse numbering changes nothing once slices are ordered by position.
    np.testing.assert_array_equal(entries["1.2.2"].image(), first.image())

    again = prepare.prepare_dataset(dataset, out, PARAMS, workers=0, progress=False)
    assert again.prepared == [] and again.skipped == ["1.2.1", "1.2.2"]
    assert list(again.failed) == ["1.2.3"]


def test_prepare_refuses_a_cache_with_other_parameters(dataset, tmp_path):
    out = str(tmp_path / "cache")
    prepare.prepare_dataset(dataset, out, PARAMS, workers=0, progress=False)
    with pytest.raises(cache.CacheError, match="prepared with"):
        prepare.prepare_dataset(dataset, out, {**PARAMS, "grid": 32}, workers=0, progress=False)


def test_interrupted_study_leaves_no_entry(dataset, tmp_path, monkeypatch):
    out = str(tmp_path / "cache")

    def crash(path, array):  # dies while writing the second array of a study
        if path.endswith("fracture.npy"):
            raise KeyboardInterrupt
        np.lib.format.write_array(open(path, "wb"), array)

    monkeypatch.setattr(cache.np, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_dataset(dataset, out, PARAMS, workers=0, progress=False)
    assert os.listdir(os.path.join(out, "studies")) == []
    monkeypatch.undo()
    summary = prepare.prepare_dataset(dataset, out, PARAMS, workers=0, progress=False)
    assert summary.prepared == ["1.2.1", "1.2.2"]


@pytest.mark.slow
def test_cli_shards_and_workers(dataset, tmp_path):
    out = str(tmp_path / "cache")
    for shard in (0, 1):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "cspine_jax.data.prepare",
                f"--data={dataset}",
                f"--out={out}",
                "--workers=2",
                f"--shard={shard}",
                "--num_shards=2",
                "--config.data.grid=16",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert "prepared" in result.stdout
    # Shard 0 holds studies 1 and 3 (3 fails), shard 1 holds study 2.
    assert sorted(e.uid for e in cache.read_entries(out)) == ["1.2.1", "1.2.2"]
    assert cache.read_params(out)["grid"] == 16
