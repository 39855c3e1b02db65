"""Synthetic phantoms: label prevalence, anatomy, fractures, shortcut check, RSNA layout."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from cspine_jax.data import phantom
from cspine_jax.data.dicom import load_series
from cspine_jax.data.nifti import load_mask

SEED = 0


def _first_positive(size, kinds=None):
    """Index of the first study (seed SEED) with a fracture of one of `kinds` (any if None)."""
    for i in range(500):
        plan = phantom.plan_study(i, SEED, size)
        found = [
            v for v in plan.vertebrae if v.fracture and (kinds is None or v.fracture.kind in kinds)
        ]
        if found:
            return i, found[0].label
    raise AssertionError("no such fracture in 500 studies")


@pytest.fixture(scope="module")
def demo_studies():
    """Two demo studies, one negative, one positive, as (plan, hu, labels, footprints)."""
    out = []
    for i in (0, _first_positive("demo")[0]):
        plan = phantom.plan_study(i, SEED, "demo")
        out.append((plan, *phantom.render(plan)))
    return out


@pytest.fixture(scope="module")
def tiny_stats():
    """Per-vertebra stats and targets of 240 tiny studies (the shortcut check's input)."""
    stats, targets = [], []
    for i in range(240):
        plan = phantom.plan_study(i, SEED, "tiny")
        hu, labels, _ = phantom.render(plan)
        stats.append(phantom.vertebra_stats(hu, labels, plan.grid.spacing))
        targets.append(plan.targets)
    return np.array(stats), np.array(targets)


def test_sample_labels_match_rsna_prevalence():
    rng = np.random.default_rng(123)
    y = np.array([phantom.sample_labels(rng) for _ in range(20_000)])
    assert y.shape == (20_000, 8) and set(np.unique(y)) <= {0, 1}
    np.testing.assert_array_equal(y[:, 0], y[:, 1:].any(1))
    assert abs(y[:, 0].mean() - 0.476) < 0.015
    np.testing.assert_allclose(
        y[:, 1:].mean(0), [0.072, 0.141, 0.036, 0.054, 0.080, 0.137, 0.195], atol=0.015
    )
    counts = y[y[:, 0] == 1, 1:].sum(1)
    share = [np.mean(counts == 1), np.mean(counts == 2), np.mean(counts == 3), np.mean(counts >= 4)]
    np.testing.assert_allclose(share, [0.65, 0.25, 0.07, 0.03], atol=0.02)


def test_same_seed_and_index_give_the_same_study():
    a = phantom.generate_study(3, SEED, "tiny", with_mask=True, with_boxes=True)
    b = phantom.generate_study(3, SEED, "tiny", with_mask=True, with_boxes=True)
    c = phantom.generate_study(4, SEED, "tiny", with_mask=True, with_boxes=True)
    np.testing.assert_array_equal(a.series.hu, b.series.hu)
    np.testing.assert_array_equal(a.labels_zyx, b.labels_zyx)
    np.testing.assert_array_equal(a.series.positions, b.series.positions)
    assert a.series.uid == b.series.uid != c.series.uid
    assert a.series.hu.shape != c.series.hu.shape or not np.array_equal(a.series.hu, c.series.hu)
    # The flags only filter outputs: the image is the same without mask and boxes.
    d = phantom.generate_study(3, SEED, "tiny", with_mask=False, with_boxes=False)
    np.testing.assert_array_equal(a.series.hu, d.series.hu)
    assert d.labels_zyx is None and d.boxes == []


def test_uid_is_a_valid_dicom_uid():
    uid = phantom.plan_study(12345, 987654321, "tiny").uid
    assert len(uid) <= 64 and all(
        part.isdigit() and (part == "0" or part[0] != "0") for part in uid.split(".")
    )


@pytest.mark.parametrize("size", ["tiny", "demo"])
def test_grid_matches_size_spec(size):
    spec = phantom.SIZES[size]
    for i in range(5):
        g = phantom.plan_study(i, SEED, size).grid
        assert g.shape[1:] == (spec.matrix, spec.matrix)
        assert spec.pixel_mm[0] <= g.spacing[1] <= spec.pixel_mm[1]
        assert spec.slice_mm[0] <= g.spacing[0] <= spec.slice_mm[1]
        assert 0.8 * spec.slices[0] <= g.shape[0] <= 1.2 * spec.slices[1]


def test_hu_ranges_and_label_order(demo_studies):
    for _, hu, labels, _ in demo_studies:
        assert hu.dtype == np.float32 and labels.dtype == np.uint8 and hu.shape == labels.shape
        assert np.mean(hu < -900) > 0.02  # air outside the neck and in the airway
        hist, edges = np.histogram(hu, bins=np.arange(-300, 301, 10))
        assert 0 <= edges[np.argmax(hist)] <= 70  # the commonest tissue is soft tissue
        bone = hu[labels > 0]
        assert 800 <= np.percentile(bone, 99.5) <= 1700  # cortex at 800-1500 HU plus noise
        assert 100 <= np.median(bone) <= 700
        assert set(np.unique(labels)) == set(range(10))
        z = np.arange(hu.shape[0])
        centroids = [np.average(z, weights=(labels == k).sum((1, 2))) for k in range(1, 10)]
        assert np.all(np.diff(centroids) > 0), centroids


def test_fracture_changes_the_image_locally_and_inside_its_boxes(demo_studies):
    plan, hu, labels, footprints = demo_studies[1]
    intact, intact_labels, _ = phantom.render(plan, fractures=False)
    diff = np.abs(hu - intact)
    assert diff.max() > 300  # a gap in cortex or a moved fragment: hundreds of HU
    changed = diff > 1e-3
    fractured = [v.label for v in plan.vertebrae if v.fracture]
    near_vertebra = ndimage.binary_dilation(np.isin(intact_labels, fractured), iterations=3)
    assert changed[~near_vertebra].sum() == 0  # same noise, same patient: nothing else moves
    boxes = phantom.writer._boxes(footprints, np.arange(1, hu.shape[0] + 1), plan.grid.spacing[1])
    assert boxes
    in_box = np.zeros(hu.shape, bool)
    for b in boxes:
        x, y, w, h = (int(b[k]) for k in ("x", "y", "width", "height"))
        in_box[b["slice_number"] - 1, y : y + h, x : x + w] = True
    in_box = ndimage.binary_dilation(in_box, iterations=2)
    assert diff[in_box].sum() / diff.sum() > 0.8


def test_wedge_and_plane_fractures_are_visible():
    """The lesion's footprint differs from the intact vertebra by a visible amount."""
    for kinds in (("wedge",), ("body", "posterior", "ring", "hangman", "dens")):
        index, level = _first_positive("demo", kinds)
        plan = phantom.plan_study(index, SEED, "demo")
        hu, _, footprints = phantom.render(plan)
        intact, _, _ = phantom.render(plan, fractures=False)
        region = np.any([m for k, m in footprints.items() if k[0] == level], axis=0)
        assert np.abs(hu - intact)[region].mean() > 3 * plan.noise_sd, kinds


def test_global_vertebra_stats_do_not_predict_fractures(tiny_stats):
    stats, targets = tiny_stats
    assert stats.shape == (240, 7, 3) and np.isfinite(stats).all()
    assert targets[:, 1:].sum() >= 40  # enough positive vertebrae for the AUC to mean something
    assert phantom.shortcut_auc(stats, targets) <= 0.75


def test_shortcut_auc_detects_a_real_shortcut(tiny_stats):
    """The check itself must be able to fail: a volume loss tied to the label is caught."""
    stats, targets = tiny_stats
    leaky = stats.copy()
    leaky[..., 0] *= np.where(targets[:, 1:] == 1, 0.7, 1.0)
    assert phantom.shortcut_auc(leaky, targets) > 0.75


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    phantom.write_dataset(
        out, 4, seed=8, size="tiny", workers=1, mask_fraction=0.5, box_fraction=1.0
    )
    return out


def test_write_dataset_rsna_layout(written):
    header, rows = _read_csv(written / "train.csv")
    assert header == [
        "StudyInstanceUID",
        "patient_overall",
        "C1",
        "C2",
        "C3",
        "C4",
        "C5",
        "C6",
        "C7",
    ]
    assert [r[0] for r in rows] == [f"1.2.826.0.1.3680043.10.8.{i}" for i in range(4)]
    for r in rows:
        assert all(v in ("0", "1") for v in r[1:]) and int(r[1]) == max(int(v) for v in r[2:])
    assert sorted(os.listdir(written)) == [
        "segmentations",
        "train.csv",
        "train_bounding_boxes.csv",
        "train_images",
    ]
    assert sorted(os.listdir(written / "train_images")) == sorted(r[0] for r in rows)
    masked = [f"{r[0]}.nii" for i, r in enumerate(rows) if phantom.dataset_flags(i, 8, 0.5, 1.0)[0]]
    assert masked and sorted(os.listdir(written / "segmentations")) == sorted(masked)

    box_header, boxes = _read_csv(written / "train_bounding_boxes.csv")
    assert box_header == ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
    positive = {r[0] for r in rows if r[1] == "1"}
    assert boxes and {b[0] for b in boxes} == positive
    for uid, x, y, w, h, n in boxes:
        assert float(w) > 0 and float(h) > 0 and 0 <= float(x) and 0 <= float(y)
        assert float(x) + float(w) <= 64 and float(y) + float(h) <= 64
        assert (written / "train_images" / uid / f"{int(n)}.dcm").exists()


def test_written_files_load_back(written):
    _, rows = _read_csv(written / "train.csv")
    for i, row in enumerate(rows):
        uid = row[0]
        series = load_series(written / "train_images" / uid)
        study = phantom.generate_study(i, 8, "tiny", with_mask=True, with_boxes=True)
        assert len(os.listdir(written / "train_images" / uid)) == series.hu.shape[0]
        np.testing.assert_allclose(series.hu, study.series.hu, atol=0.51)
        np.testing.assert_array_equal(series.slice_numbers, study.series.slice_numbers)
        mask_path = written / "segmentations" / f"{uid}.nii"
        if not mask_path.exists():
            continue
        labels = load_mask(mask_path, series)
        np.testing.assert_array_equal(labels, study.labels_zyx)
        cervical = np.nonzero(((labels >= 1) & (labels <= 7)).any((1, 2)))[0]
        region = np.s_[cervical[0] : cervical[-1] + 1]
        bone = series.hu[region] > 300
        assert (labels[region][bone] > 0).mean() >= 0.95


@pytest.mark.slow
def test_output_does_not_depend_on_worker_count(written, tmp_path):
    phantom.write_dataset(
        tmp_path, 4, seed=8, size="tiny", workers=2, mask_fraction=0.5, box_fraction=1.0
    )
    for name in ("train.csv", "train_bounding_boxes.csv"):
        assert (tmp_path / name).read_text() == (written / name).read_text()
    uid = "1.2.826.0.1.3680043.10.8.3"
    for f in os.listdir(written / "train_images" / uid):
        assert (tmp_path / "train_images" / uid / f).read_bytes() == (
            written / "train_images" / uid / f
        ).read_bytes()


def test_reverse_numbering_compression_and_unsigned_shares():
    plans = [phantom.plan_study(i, SEED, "tiny") for i in range(300)]
    assert 0.2 <= np.mean([p.reverse_numbering for p in plans]) <= 0.4
    syntaxes = [p.transfer_syntax for p in plans]
    compressed = np.mean([s != "1.2.840.10008.1.2.1" for s in syntaxes])
    assert 0.12 <= compressed <= 0.28
    assert {"1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90"} <= set(syntaxes)
    assert 0.08 <= np.mean([p.unsigned for p in plans]) <= 0.22


@pytest.mark.slow
def test_cli_framing_flags_reach_the_studies(tmp_path):
    """`--fov_scale` and `--off_centre` of `python -m cspine_jax.data.phantom`: each study is
    the one `generate_study` frames by them (`Framing`), wider than the size's field of view
    and not the unframed study."""
    out = tmp_path / "framed"
    args = ["--size=tiny", "--num_studies=2", "--seed=8", "--workers=1"]
    framing = ["--fov_scale=1.5", "--off_centre=0.2"]
    result = subprocess.run(
        [sys.executable, "-m", "cspine_jax.data.phantom", f"--out={out}", *args, *framing],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _, rows = _read_csv(out / "train.csv")
    expected = phantom.Framing((1.0, 1.5), (0.0, 0.2))
    for i, row in enumerate(rows):
        series = load_series(out / "train_images" / row[0])
        framed = phantom.generate_study(
            i, 8, "tiny", with_mask=False, with_boxes=False, framing=expected
        )
        plain = phantom.generate_study(i, 8, "tiny", with_mask=False, with_boxes=False)
        np.testing.assert_allclose(series.hu, framed.series.hu, atol=0.51)
        assert series.hu.shape[1] > plain.series.hu.shape[1], (
            series.hu.shape,
            plain.series.hu.shape,
        )
