"""The RSNA 2022 study index: label CSVs, masks and boxes of one RSNA-layout folder.

Layout (real data and phantoms alike)::

    DIR/train_images/<StudyInstanceUID>/<n>.dcm
    DIR/segmentations/<StudyInstanceUID>.nii        (a minority of studies)
    DIR/train.csv                  StudyInstanceUID, patient_overall, C1..C7
    DIR/train_bounding_boxes.csv   StudyInstanceUID, x, y, width, height, slice_number
    DIR/test.csv                   StudyInstanceUID, prediction_type, row_id   (optional)
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

# The graded vertebrae: the label columns, the mask labels 1..7 and every per-vertebra axis
# of the models and the phantoms follow this order.
VERTEBRAE = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
NUM_VERTEBRAE = len(VERTEBRAE)
LABEL_COLUMNS = ("patient_overall", *VERTEBRAE)
# Competition weights per label column, for negative and positive targets.
NEGATIVE_WEIGHTS = np.array([7, 1, 1, 1, 1, 1, 1, 1], np.float32)
POSITIVE_WEIGHTS = np.array([14, 2, 2, 2, 2, 2, 2, 2], np.float32)

TRAIN_COLUMNS = ("StudyInstanceUID", *LABEL_COLUMNS)
BOX_COLUMNS = ("StudyInstanceUID", "x", "y", "width", "height", "slice_number")
TEST_COLUMNS = ("StudyInstanceUID", "prediction_type", "row_id")
# Study IDs become folder names in caches and reports: no separators, no '..', no dotfiles.
_SAFE_UID = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,127}")


class DatasetError(ValueError):
    """A label CSV or the folder layout is not what the RSNA format promises."""


@dataclasses.dataclass(frozen=True)
class Study:
    """One study of an RSNA-layout folder.

    Attributes:
      uid: StudyInstanceUID (also the image folder's name).
      image_dir: folder of its DICOM files (`<n>.dcm` in the RSNA data; any names where a
        PACS exported them: `dicom` recognises the files by content).
      mask_path: its vertebra segmentation NIfTI, or None.
      labels: (8,) float32 targets `[patient_overall, C1..C7]`, or None for test studies.
      boxes: (n, 5) float32 rows `[slice_number, x, y, width, height]` in pixels of the
        slice file `<slice_number>.dcm`; empty when the study has no boxes.
    """

    uid: str
    image_dir: str
    mask_path: str | None
    labels: np.ndarray | None
    boxes: np.ndarray

    @property
    def has_boxes(self) -> bool:
        return len(self.boxes) > 0


def _read_csv(path: str, columns: Sequence[str]) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        try:
            missing = [c for c in columns if c not in (reader.fieldnames or ())]
            if missing:
                raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}")
            return list(reader)
        except (csv.Error, UnicodeDecodeError) as e:  # binary or mangled file
            raise DatasetError(f"{path}: not a CSV text file ({e})") from None


def _uid(value: str, where: str) -> str:
    uid = value.strip()
    if not _SAFE_UID.fullmatch(uid) or ".." in uid:
        raise DatasetError(f"{where}: StudyInstanceUID {uid!r} is not a safe identifier")
    return uid


def _binary(value: str, where: str) -> float:
    if value.strip() not in ("0", "1", "0.0", "1.0"):
        raise DatasetError(f"{where}: label {value!r} is not 0 or 1")
    return float(value)


def load_index(data_dir: str, *, require_images: bool = True) -> list[Study]:
    """Reads the studies of an RSNA-layout folder, sorted by StudyInstanceUID.

    Labelled studies come from `train.csv`; if there is none, the studies of `test.csv`
    are returned unlabelled. Raises DatasetError naming the file and row for a file that
    is not CSV text, missing columns, unsafe, duplicate or unknown study IDs, non-binary
    labels, a patient_overall that disagrees with C1..C7, non-finite or negative box values,
    or (with `require_images`) a study without an image folder.
    """
    if not os.path.isdir(data_dir):
        raise DatasetError(f"{data_dir}: no such folder")
    train_csv = os.path.join(data_dir, "train.csv")
    test_csv = os.path.join(data_dir, "test.csv")
    labels: dict[str, np.ndarray | None] = {}
    if os.path.exists(train_csv):
        for row_no, row in enumerate(_read_csv(train_csv, TRAIN_COLUMNS), start=2):
            where = f"{train_csv}:{row_no}"
            uid = _uid(row["StudyInstanceUID"], where)
            if uid in labels:
                raise DatasetError(f"{where}: duplicate StudyInstanceUID {uid}")
            y = np.array([_binary(row[c], where) for c in LABEL_COLUMNS], np.float32)
            if y[0] != y[1:].max():
                raise DatasetError(f"{where}: patient_overall={y[0]:g} but C1..C7={y[1:]}")
            labels[uid] = y
    elif os.path.exists(test_csv):
        for row_no, row in enumerate(_read_csv(test_csv, TEST_COLUMNS), start=2):
            labels.setdefault(_uid(row["StudyInstanceUID"], f"{test_csv}:{row_no}"), None)
    else:
        raise DatasetError(f"{data_dir}: neither train.csv nor test.csv found")

    boxes: dict[str, list[list[float]]] = {}
    box_csv = os.path.join(data_dir, "train_bounding_boxes.csv")
    if os.path.exists(box_csv):
        for row_no, row in enumerate(_read_csv(box_csv, BOX_COLUMNS), start=2):
            uid = row["StudyInstanceUID"].strip()
            if uid not in labels:
                raise DatasetError(f"{box_csv}:{row_no}: unknown StudyInstanceUID {uid}")
            try:
                values = [float(row[c]) for c in ("slice_number", "x", "y", "width", "height")]
            except ValueError as e:
                raise DatasetError(f"{box_csv}:{row_no}: {e}") from None
            # Boxes are painted into fracture maps by arithmetic on these numbers.
            if not np.isfinite(values).all() or min(values[3:]) < 0:
                raise DatasetError(
                    f"{box_csv}:{row_no}: box {values[1:]} on slice {values[0]:g} "
                    "is not finite with width, height >= 0"
                )
            boxes.setdefault(uid, []).append(values)

    studies = []
    for uid in sorted(labels):
        image_dir = os.path.join(data_dir, "train_images", uid)
        if not os.path.isdir(image_dir):
            test_dir = os.path.join(data_dir, "test_images", uid)
            image_dir = test_dir if os.path.isdir(test_dir) else image_dir
        if require_images and not os.path.isdir(image_dir):
            raise DatasetError(f"{image_dir}: no image folder for study {uid}")
        mask_path = None
        for ext in (".nii", ".nii.gz"):
            candidate = os.path.join(data_dir, "segmentations", uid + ext)
            if os.path.exists(candidate):
                mask_path = candidate
        box_array = np.array(boxes.get(uid, []), np.float32).reshape(-1, 5)
        studies.append(Study(uid, image_dir, mask_path, labels[uid], box_array))
    return studies


def _strata(labels: np.ndarray, has_mask: bool) -> tuple[str, str, str]:
    """A study's strata, finest first: rarest fractured level + mask, sign + mask, sign."""
    sign, level = "negative", "negative"
    if labels[0] > 0:
        rarest_first = ("C3", "C4", "C1", "C5", "C6", "C2", "C7")
        fractured = {VERTEBRAE[i] for i in np.flatnonzero(labels[1:])}
        sign, level = "positive", next(v for v in rarest_first if v in fractured)
    mask = f"mask={bool(has_mask)}"
    return f"{level}|{mask}", f"{sign}|{mask}", sign


def kfold_assignments(
    labels: np.ndarray, has_mask: np.ndarray, num_folds: int, seed: int
) -> np.ndarray:
    """Study-level K-fold split stratified on the labels.

    Args:
      labels: (n_studies, 8) targets `[patient_overall, C1..C7]`.
      has_mask: (n_studies,) whether each study has a segmentation.
      num_folds: number of folds K >= 2.
      seed: shuffling seed.

    Returns:
      (n_studies,) int64 fold ids in [0, K). Uses the finest stratification whose every
      stratum has at least K studies, so scikit-learn's StratifiedKFold spreads each
      stratum over all folds.
    """
    # Imported here: prepare's worker processes import this module and never split.
    from sklearn.model_selection import StratifiedKFold

    if num_folds < 2 or len(labels) < num_folds:
        raise ValueError(f"need at least {num_folds} >= 2 studies for {num_folds} folds")
    per_study = [_strata(y, m) for y, m in zip(labels, has_mask, strict=True)]
    keys = ["all"] * len(labels)
    for level in range(3):
        candidate = [strata[level] for strata in per_study]
        if min(Counter(candidate).values()) >= num_folds:
            keys = candidate
            break
    splitter = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    folds = np.zeros(len(labels), np.int64)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(keys)), keys)):
        folds[held_out] = fold
    return folds
