"""The study index over RSNA label CSVs, and the stratified K-fold split."""

import os

import numpy as np
import pytest

from cspine_jax.data import rsna


def _write(path, header, rows):
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for row in rows:
            f.write(",".join(str(v) for v in row) + "\n")


def _layout(tmp_path, labels, boxes=(), masks=()):
    for uid in labels:
        os.makedirs(tmp_path / "train_images" / uid)
    os.makedirs(tmp_path / "segmentations")
    for uid in masks:
        (tmp_path / "segmentations" / f"{uid}.nii").write_bytes(b"")
    _write(tmp_path / "train.csv", rsna.TRAIN_COLUMNS, [(u, *y) for u, y in labels.items()])
    _write(tmp_path / "train_bounding_boxes.csv", rsna.BOX_COLUMNS, boxes)
    return str(tmp_path)


def test_index_reads_labels_boxes_and_masks(tmp_path):
    data = _layout(
        tmp_path,
        {"1.2.3": (1, 0, 1, 0, 0, 0, 0, 1), "1.2.4": (0,) * 8},
        boxes=[("1.2.3", 10.5, 20, 5, 6, 101), ("1.2.3", 11, 21, 4, 5, 102)],
        masks=["1.2.4"],
    )
    studies = rsna.load_index(data)
    assert [s.uid for s in studies] == ["1.2.3", "1.2.4"]
    positive, negative = studies
    np.testing.assert_array_equal(positive.labels, [1, 0, 1, 0, 0, 0, 0, 1])
    assert positive.has_boxes and not negative.has_boxes
    np.testing.assert_allclose(positive.boxes[0], [101, 10.5, 20, 5, 6])
    assert positive.mask_path is None
    assert negative.mask_path.endswith("segmentations/1.2.4.nii")


@pytest.mark.parametrize(
    "labels, boxes, message",
    [
        ({"1.2.3": (1, 0, 2, 0, 0, 0, 0, 0)}, [], "is not 0 or 1"),
        ({"1.2.3": (0, 0, 1, 0, 0, 0, 0, 0)}, [], "patient_overall=0"),
        ({"1.2.3": (0,) * 8}, [("9.9.9", 1, 1, 1, 1, 5)], "unknown StudyInstanceUID 9.9.9"),
        ({"1..2": (0,) * 8}, [], "'1..2' is not a safe identifier"),
        ({"a/b": (0,) * 8}, [], "is not a safe identifier"),
    ],
)
def test_index_rejects_bad_csvs(tmp_path, labels, boxes, message):
    data = _layout(tmp_path, labels, boxes=boxes)
    with pytest.raises(rsna.DatasetError, match=message):
        rsna.load_index(data)


def test_index_names_missing_columns_and_folders(tmp_path):
    data = _layout(tmp_path, {"1.2.3": (0,) * 8})
    _write(tmp_path / "train.csv", ("StudyInstanceUID", "C1"), [("1.2.3", 0)])
    with pytest.raises(rsna.DatasetError, match=r"train.csv: missing column\(s\) patient_overall"):
        rsna.load_index(data)
    _write(tmp_path / "train.csv", rsna.TRAIN_COLUMNS, [("4.5.6", *(0,) * 8)])
    with pytest.raises(rsna.DatasetError, match="no image folder for study 4.5.6"):
        rsna.load_index(data)


def test_kfold_is_stratified_and_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    labels = {}
    for i in range(200):
        levels = rng.random(7) < np.array([0.07, 0.14, 0.04, 0.05, 0.08, 0.14, 0.2])
        labels[f"1.2.{i}"] = (int(levels.any()), *levels.astype(int))
    masks = [f"1.2.{i}" for i in range(0, 200, 5)]
    studies = rsna.load_index(_layout(tmp_path, labels, masks=masks))
    y = np.stack([s.labels for s in studies])
    has_mask = np.array([s.mask_path is not None for s in studies])
    folds = rsna.kfold_assignments(y, has_mask, num_folds=5, seed=1)
    np.testing.assert_array_equal(folds, rsna.kfold_assignments(y, has_mask, 5, seed=1))
    assert np.bincount(folds).tolist() == [40] * 5
    for fold in range(5):
        held_out = folds == fold
        # Every fold sees the overall positive rate and its share of masked studies.
        assert abs(y[held_out, 0].mean() - y[:, 0].mean()) <= 0.03
        assert abs(has_mask[held_out].sum() - has_mask.sum() / 5) <= 1
    assert not np.array_equal(folds, rsna.kfold_assignments(y, has_mask, 5, seed=2))
