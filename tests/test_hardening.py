"""Bad input: every bad study, mask, CSV or DICOM header fails with one line naming the file
and the problem, and leaves no partial output; untrusted names and files cannot make the
package write outside its output folder or run code. (NaN in training, and kill -9: in
test_interruption.py.)

The DICOM header properties compare the loader with an oracle written here from the DICOM
standard: what a correct reader returns for the mutated files, or None where they are not
one valid CT series. The loader must agree both ways: load exactly what the oracle expects,
and raise DicomError wherever the oracle says None.
"""

import ast
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)
from pydicom.valuerep import DSfloat

from benchmarks.interruption import ROOT, train_cmd
from cspine_jax.data import cache, dicom, dicom_writer, nifti, prepare, rsna

PARAMS = {"grid": 16, "spacing_z": 4.0, "crop": 1.0, "windows": [[400.0, 1800.0]]}


def _dicoms(folder):
    """The `<n>.dcm` files of a study folder, by n."""
    return sorted(Path(folder).glob("*.dcm"), key=lambda p: int(p.stem))


def _rewrite(path, change):
    """Reads a DICOM file, applies `change(dataset)` and writes it back."""
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def _snapshot(root):
    """Every file under `root` with its size: what a run wrote shows up in a difference."""
    return {str(p): p.stat().st_size for p in Path(root).rglob("*") if p.is_file()}


def _one_line_naming(message, path):
    return "\n" not in message and f"{path}: " in message


# ------------------------------------------------------------------ bad studies in prepare
def _empty(study, other):
    for path in Path(study.image_dir).iterdir():
        path.unlink()
    return study.image_dir


def _truncated_pixels(study, other):
    victim = _dicoms(study.image_dir)[5]
    victim.write_bytes(victim.read_bytes()[:-100])
    return victim


def _truncated_header(study, other):
    victim = _dicoms(study.image_dir)[5]
    victim.write_bytes(victim.read_bytes()[:300])
    return victim


def _no_pixels(study, other):
    victim = _dicoms(study.image_dir)[5]
    _rewrite(victim, lambda ds: delattr(ds, "PixelData"))
    return victim


def _two_series(study, other):
    shutil.copy(_dicoms(other.image_dir)[0], Path(study.image_dir) / "9999.dcm")
    return study.image_dir


def _tilted_slice(study, other):
    victim = _dicoms(study.image_dir)[5]
    _rewrite(
        victim, lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0.996195, 0.087156])
    )  # 5 degrees
    return victim


def _missing_slice(study, other):
    _dicoms(study.image_dir)[5].unlink()
    return study.image_dir


def _duplicate_position(study, other):
    files = _dicoms(study.image_dir)
    position = pydicom.dcmread(files[4]).ImagePositionPatient
    _rewrite(files[5], lambda ds: setattr(ds, "ImagePositionPatient", position))
    return study.image_dir


def _mask_one_slice_short(study, other):
    series = dicom.load_series(study.image_dir)
    short = dicom.Series(
        series.uid,
        series.hu[1:],
        series.spacing,
        series.positions[1:],
        series.orientation,
        series.slice_numbers[1:],
    )
    nifti.write_mask(study.mask_path, np.zeros(short.shape, np.uint8), short)
    return study.mask_path


def _mask_empty_file(study, other):
    Path(study.mask_path).write_bytes(b"")
    return study.mask_path


def _mask_of_another_study(study, other):
    shutil.copy(other.mask_path, study.mask_path)
    return study.mask_path


DICOM_CORRUPTIONS = [  # (corrupt(study, another study) -> the path named, problem)
    (_empty, "no DICOM files"),
    (_truncated_pixels, "pixel data"),
    (_truncated_header, "unreadable DICOM file|no pixel data"),
    (_no_pixels, "no pixel data"),
    (_two_series, "several series"),
    (_tilted_slice, "inconsistent ImageOrientationPatient"),
    (_missing_slice, "inconsistent slice spacing"),
    (_duplicate_position, "duplicate slice position"),
]
MASK_CORRUPTIONS = [
    (_mask_one_slice_short, r"mask shape \(\d+, 64, 64\) .* != series shape"),
    (_mask_empty_file, "unreadable NIfTI"),
    (_mask_of_another_study, "mask shape|does not match study"),
]


@pytest.fixture(scope="module")
def bad_dataset(phantom_dir, tmp_path_factory):
    """The tiny phantoms, every study but one broken its own way.

    Returns (folder, {uid: (path its error must name, problem regex)}, the good uid). The
    good study has junk files among its slices and lost its mask: both are allowed.
    """
    data = tmp_path_factory.mktemp("bad") / "rsna"
    shutil.copytree(phantom_dir, data)
    studies = rsna.load_index(str(data))
    masked = [s for s in studies if s.mask_path]
    unmasked = [s for s in studies if not s.mask_path]
    assert len(masked) >= len(MASK_CORRUPTIONS) + 1
    assert len(studies) >= len(MASK_CORRUPTIONS) + len(DICOM_CORRUPTIONS) + 1
    good, mask_victims = masked[0], masked[1 : len(MASK_CORRUPTIONS) + 1]
    dicom_victims = (masked[len(MASK_CORRUPTIONS) + 1 :] + unmasked)[: len(DICOM_CORRUPTIONS)]
    expected = {}
    for (corrupt, problem), study in zip(
        MASK_CORRUPTIONS + DICOM_CORRUPTIONS, mask_victims + dicom_victims, strict=True
    ):
        expected[study.uid] = (corrupt(study, good), problem)
    os.remove(good.mask_path)
    (Path(good.image_dir) / "notes.txt").write_text("not an image")
    (Path(good.image_dir) / "junk.dcm").write_bytes(b"not DICOM either" * 10)
    return str(data), expected, good.uid


def test_prepare_reports_each_bad_study_and_writes_nothing_for_it(bad_dataset, tmp_path):
    data, expected, good = bad_dataset
    out = tmp_path / "cache"
    with pytest.warns(UserWarning, match=r"ignoring non-DICOM files \['junk.dcm', 'notes.txt'\]"):
        summary = prepare.prepare_dataset(data, str(out), PARAMS, workers=0, progress=False)

    assert summary.prepared == [good]
    assert sorted(summary.failed) == sorted(expected)
    for uid, (named, problem) in expected.items():
        assert _one_line_naming(summary.failed[uid], named), summary.failed[uid]
        assert re.search(problem, summary.failed[uid]), summary.failed[uid]
    # No half entry, temporary folder or mask of a failed study anywhere in the cache.
    assert os.listdir(out / "studies") == [good]
    (entry,) = cache.read_entries(str(out))
    assert not entry.has_mask and entry.image().shape[1:] == (16, 16, 1)
    with open(out / "failures-0.json") as f:
        assert json.load(f) == summary.failed


# ------------------------------------------------------------------ label CSVs
def _set_field(path, row, column, value):
    """Sets `column` of data row `row` (1 = the first after the header) of a CSV file."""
    lines = [line.split(",") for line in Path(path).read_text().splitlines()]
    lines[row][lines[0].index(column)] = value
    Path(path).write_text("\n".join(",".join(v) for v in lines) + "\n")


def _drop_column(path, name):
    lines = [line.split(",") for line in Path(path).read_text().splitlines()]
    k = lines[0].index(name)
    Path(path).write_text("\n".join(",".join(v[:k] + v[k + 1 :]) for v in lines) + "\n")


CSV_CASES = {  # id: (file, corrupt(path), message regex after "<file>:")
    "missing label column": (
        "train.csv",
        lambda p: _drop_column(p, "C3"),
        r" missing column\(s\) C3",
    ),
    "non-binary label": (
        "train.csv",
        lambda p: _set_field(p, 2, "C4", "0.5"),
        r"3: label '0.5' is not 0 or 1",
    ),
    "NaN label": (
        "train.csv",
        lambda p: _set_field(p, 4, "patient_overall", "nan"),
        r"5: label 'nan' is not 0 or 1",
    ),
    "binary file": (
        "train.csv",
        lambda p: Path(p).write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" * 9),
        " not a CSV text file",
    ),
    "unsafe study id": (
        "train.csv",
        lambda p: _set_field(p, 1, "StudyInstanceUID", "../../1.2.3"),
        r"2: StudyInstanceUID '../../1.2.3' is not a safe identifier",
    ),
    "missing box column": (
        "train_bounding_boxes.csv",
        lambda p: _drop_column(p, "height"),
        r" missing column\(s\) height",
    ),
    "unknown box study": (
        "train_bounding_boxes.csv",
        lambda p: _set_field(p, 1, "StudyInstanceUID", "9.9.9"),
        "2: unknown StudyInstanceUID 9.9.9",
    ),
    "NaN box": (
        "train_bounding_boxes.csv",
        lambda p: _set_field(p, 1, "x", "nan"),
        "2: box .* is not finite",
    ),
    "negative box": (
        "train_bounding_boxes.csv",
        lambda p: _set_field(p, 3, "width", "-4"),
        "4: box .* width, height >= 0",
    ),
}


def _csv_layout(phantom_dir, data):
    """An RSNA folder with the phantoms' images (linked) and copies of their CSVs."""
    data.mkdir()
    for item in ("train_images", "segmentations"):
        os.symlink(os.path.join(phantom_dir, item), data / item)
    for item in ("train.csv", "train_bounding_boxes.csv"):
        shutil.copy(os.path.join(phantom_dir, item), data / item)


@pytest.mark.parametrize("name", list(CSV_CASES))
def test_bad_csv_is_one_line_naming_file_and_row_and_writes_nothing(phantom_dir, tmp_path, name):
    csv_name, corrupt, problem = CSV_CASES[name]
    data = tmp_path / "rsna"
    _csv_layout(phantom_dir, data)
    corrupt(data / csv_name)
    with pytest.raises(rsna.DatasetError) as err:
        prepare.prepare_dataset(
            str(data), str(tmp_path / "cache"), PARAMS, workers=0, progress=False
        )
    message = str(err.value)
    assert "\n" not in message
    assert re.match(re.escape(f"{data / csv_name}:") + problem, message), message
    assert not (tmp_path / "cache").exists()


def test_study_without_images_is_named(phantom_dir, tmp_path):
    data = tmp_path / "rsna"
    _csv_layout(phantom_dir, data)
    _set_field(data / "train.csv", 1, "StudyInstanceUID", "1.2.999")
    with pytest.raises(rsna.DatasetError) as err:
        prepare.prepare_dataset(
            str(data), str(tmp_path / "cache"), PARAMS, workers=0, progress=False
        )
    folder = data / "train_images" / "1.2.999"
    assert str(err.value) == f"{folder}: no image folder for study 1.2.999"
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_train_cli_reports_bad_data_in_one_line(data_env, phantom_dir, tmp_path):
    env, _ = data_env
    data = tmp_path / "rsna"
    shutil.copytree(phantom_dir, data, ignore=shutil.ignore_patterns("*.dcm", "*.nii"))
    _set_field(data / "train.csv", 2, "C1", "2")
    result = subprocess.run(
        train_cmd(tmp_path / "run", f"--config.data.dir={data}"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"train.py: error: {data / 'train.csv'}:3: label '2' is not 0 or 1"
    )


# ------------------------------------------------------------------ DICOM headers
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
Z, Y, X = 4, 6, 5
DELETE = "<delete>"
F32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class Add:
    """A mutation adding `values` to the tag's current values (positions, cosines)."""

    values: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Tilt:
    """A mutation replacing ImageOrientationPatient by the axial frame turned about x."""

    degrees: float


@pytest.fixture(scope="module")
def written_series(tmp_path_factory):
    """A 4-slice series written as int16, numbered from the feet up; some stored values
    are negative, one needs more than 12 bits."""
    k, j, i = np.meshgrid(np.arange(Z), np.arange(Y), np.arange(X), indexing="ij")
    hu = (500.0 * k + 40.0 * j + 3.0 * i - 1000.0).astype(np.float32)
    hu[0, 0, :3] = [-2000.0, 3000.0, -1024.0]
    positions = np.array([-60.0, -70.0, 90.0]) + np.arange(Z)[:, None] * [0.0, 0.0, -1.25]
    series = dicom.Series(
        "1.2.826.0.1.3680043.8.498.77", hu, (1.25, 0.7, 0.6), positions, AXIAL, np.arange(Z, 0, -1)
    )
    folder = tmp_path_factory.mktemp("series") / "study"
    dicom_writer.write_series(folder, series)
    return folder, series


def _encode(value):
    """A Python value as pydicom stores it: decimal strings <= 16 characters, 'nan'/'inf'."""
    if isinstance(value, float):
        return DSfloat(value, auto_format=True) if math.isfinite(value) else str(value)
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


def _mutate(folder, target, keyword, value):
    """Applies one header change to file `target` (its index by number) or to every file."""
    files = _dicoms(folder)
    for path in files if target is None else [files[target]]:
        ds = pydicom.dcmread(path)
        if keyword == "TransferSyntaxUID":
            ds.file_meta.TransferSyntaxUID = value
            if value.is_encapsulated:  # the same native bytes, labelled as compressed
                ds.PixelData = encapsulate([ds.PixelData])
        elif value == DELETE:
            if keyword in ds:
                delattr(ds, keyword)
        elif isinstance(value, Add):
            current = ds.get(keyword)
            if current is not None and len(current) == len(value.values):
                setattr(
                    ds,
                    keyword,
                    _encode([float(a) + b for a, b in zip(current, value.values, strict=True)]),
                )
        elif isinstance(value, Tilt):
            t = math.radians(value.degrees)
            setattr(ds, keyword, _encode([1.0, 0.0, 0.0, 0.0, math.cos(t), math.sin(t)]))
        else:
            setattr(ds, keyword, _encode(value))
        ds.save_as(path)


def _floats_or_none(ds, keyword, n):
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    values = np.asarray(value, np.float64).reshape(-1)
    return values if values.shape == (n,) and np.isfinite(values).all() else None


def _stored_values(ds):
    """(rows, cols) int64 stored values per PS3.5 8 (native data), or None if the pixel
    attributes are not those of one grey single-frame image matching the bytes."""
    rows, cols = ds.get("Rows"), ds.get("Columns")
    bits, stored = ds.get("BitsAllocated"), ds.get("BitsStored")
    signed = ds.get("PixelRepresentation")
    if (
        ds.file_meta.TransferSyntaxUID.is_encapsulated
        or not rows
        or not cols
        or bits not in (8, 16, 32)
        or signed not in (0, 1)
        or stored is None
        or not 1 <= stored <= bits
        or ds.get("HighBit", stored - 1) != stored - 1
        or ds.get("SamplesPerPixel", 1) != 1
        or ds.get("NumberOfFrames", 1) != 1
        or ds.get("PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2")
    ):
        return None
    size = rows * cols * bits // 8
    if len(ds.PixelData) != size + size % 2:
        return None
    dtype = f"<{'i' if signed else 'u'}{bits // 8}"
    values = np.frombuffer(ds.PixelData, dtype, rows * cols).reshape(rows, cols).astype(np.int64)
    values &= (1 << stored) - 1  # bits above BitsStored are not part of the value
    if signed:
        values = np.where(values >= 1 << (stored - 1), values - (1 << stored), values)
    return values


def _expected(folder):
    """What a correct reader returns for the files in `folder`, or None if they are not one
    valid CT series. Tolerances are far from the mutations' sizes, which are either tiny
    (1e-7: allowed noise) or large (>= 0.1: a different geometry)."""
    slices = []
    for path in _dicoms(folder):
        ds = pydicom.dcmread(path)
        values = _stored_values(ds)
        slope, intercept = (
            float(ds.get(k)) if ds.get(k) not in (None, "") else default
            for k, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0))
        )
        position = _floats_or_none(ds, "ImagePositionPatient", 3)
        cosines = _floats_or_none(ds, "ImageOrientationPatient", 6)
        spacing = _floats_or_none(ds, "PixelSpacing", 2)
        if (
            values is None
            or position is None
            or cosines is None
            or spacing is None
            or not (math.isfinite(slope) and math.isfinite(intercept) and slope != 0)
            or abs(slope) * 2.0**32 + abs(intercept) >= F32_MAX
            or (spacing <= 0).any()
        ):
            return None
        row, col = cosines[:3], cosines[3:]
        if max(abs(np.linalg.norm(row) - 1), abs(np.linalg.norm(col) - 1), abs(row @ col)) > 1e-5:
            return None
        slices.append(
            dict(
                number=int(path.stem),
                hu=values * slope + intercept,
                position=position,
                cosines=cosines,
                spacing=spacing,
                series=str(ds.get("SeriesInstanceUID", "")),
                study=str(ds.get("StudyInstanceUID", "")),
            )
        )
    first = slices[0]
    for s in slices[1:]:
        if (
            s["series"] != first["series"]
            or s["study"] != first["study"]
            or s["hu"].shape != first["hu"].shape
            or np.abs(s["cosines"] - first["cosines"]).max() > 1e-5
            or np.abs(s["spacing"] / first["spacing"] - 1).max() > 1e-6
        ):
            return None
    normal = np.cross(first["cosines"][:3], first["cosines"][3:])
    # Cosines may be off unit length within the header's tolerance: gaps are measured
    # along the unit normal.
    normal /= np.linalg.norm(normal)
    down = normal if normal[2] < 0 else -normal  # superior first
    slices.sort(key=lambda s: s["position"] @ down)
    positions = np.stack([s["position"] for s in slices])
    gaps = np.diff(positions @ down)
    # Evenly spaced on one straight line: each position where the first, the last and the
    # slice count put it.
    line = positions[0] + np.linspace(0, 1, len(slices))[:, None] * (positions[-1] - positions[0])
    if gaps.min() < 1e-3 or np.abs(positions - line).max() > 1e-5:
        return None
    return dict(
        hu=np.stack([s["hu"] for s in slices]),
        positions=positions,
        spacing=(float(np.median(gaps)), *first["spacing"]),
        orientation=first["cosines"],
        slice_numbers=[s["number"] for s in slices],
        uid=first["study"] or Path(folder).name,
    )


def _check_load(folder):
    """Loads `folder`; returns "loaded" or "rejected" after checking the loader against the
    oracle."""
    expected = _expected(folder)
    try:
        series = dicom.load_series(folder)
    except dicom.DicomError as e:
        message = str(e)
        assert "\n" not in message and message.startswith(str(folder)), message
        assert expected is None, f"rejected a valid series: {message}"
        return "rejected"
    assert expected is not None, "loaded files that are not one valid CT series"
    np.testing.assert_allclose(series.hu, expected["hu"], rtol=1e-6, atol=0)
    np.testing.assert_array_equal(series.slice_numbers, expected["slice_numbers"])
    np.testing.assert_allclose(series.positions, expected["positions"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(series.spacing, expected["spacing"], rtol=1e-9)
    np.testing.assert_allclose(series.orientation, expected["orientation"], rtol=0, atol=1e-6)
    assert series.uid == expected["uid"]
    return "loaded"


def _one_of(*values):
    return st.sampled_from(values)


MUTATIONS = {  # keyword: its values (or changes); DELETE removes it
    "Rows": _one_of(Y, Y // 2, 2 * Y, 0, DELETE),
    "Columns": _one_of(X, 2 * X, 1, DELETE),
    "BitsAllocated": _one_of(16, 8, 32, 12, DELETE),
    "BitsStored": _one_of(16, 12, 8, 17, 0, DELETE),
    "HighBit": _one_of(15, 11, 7, 14, DELETE),
    "PixelRepresentation": _one_of(1, 0, 2, DELETE),
    "SamplesPerPixel": _one_of(1, 3, DELETE),
    "PhotometricInterpretation": _one_of(
        "MONOCHROME2", "MONOCHROME1", "RGB", "PALETTE COLOR", DELETE
    ),
    "NumberOfFrames": _one_of(1, 2),
    "RescaleSlope": _one_of(1.0, 2.0, 0.5, -1.0, 0.0, math.nan, math.inf, 1e30, DELETE),
    "RescaleIntercept": _one_of(-1024.0, 0.0, 100.5, math.nan, -math.inf, 1e38, DELETE),
    "ImagePositionPatient": st.one_of(
        st.builds(
            lambda v: Add(tuple(v)),
            st.lists(_one_of(0.0, 1e-7, 0.3, 1.25, -1.25, 50.0), min_size=3, max_size=3),
        ),
        _one_of([math.nan, 0.0, 0.0], [0.0, 0.0], DELETE),
    ),
    "ImageOrientationPatient": st.one_of(
        _one_of(
            Add((0, 0, 0, 0, 0, 1e-7)),
            Add((0, 0, 0, 0, 0, 0.1)),
            Add((1.0,) + (0,) * 5),
            Tilt(20.0),
            Tilt(90.0),
            [0.5, 0.866, 0.0, 0.0, 1.0, 0.0],
            [math.nan, 0.0, 0.0, 0.0, 1.0, 0.0],
            [1.0, 0.0, 0.0, 0.0, 1.0],
            DELETE,
        )
    ),
    "PixelSpacing": _one_of(
        [0.7, 0.6],
        [0.35, 0.35],
        [0.7, 0.6000001],
        [0.0, 0.0],
        [-0.7, 0.6],
        [math.nan, 0.6],
        [0.7],
        DELETE,
    ),
    "SliceThickness": _one_of(0.0, -3.0, 99.0, DELETE),
    "SliceLocation": _one_of(0.0, 1e6, DELETE),
    "InstanceNumber": _one_of(1, 99, DELETE),
    "SeriesInstanceUID": _one_of("1.2.3.4", DELETE),
    "StudyInstanceUID": _one_of("1.2.3.5", DELETE),
    "TransferSyntaxUID": _one_of(
        ImplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless, JPEGBaseline8Bit
    ),
}


@st.composite
def _mutation(draw):
    keyword = draw(st.sampled_from(sorted(MUTATIONS)))
    target = draw(st.none() | st.integers(0, Z - 1))  # None: every file
    return target, keyword, draw(MUTATIONS[keyword])


def test_header_mutations_load_exactly_or_raise_one_line(written_series):
    source, _ = written_series
    outcomes = []

    @hypothesis.settings(max_examples=100, deadline=None, database=None)
    @hypothesis.given(st.lists(_mutation(), min_size=1, max_size=3))
    # Cosines off unit length by less than the header tolerance: spacing along the unit normal.
    @hypothesis.example(
        [
            (None, "ImageOrientationPatient", Tilt(degrees=20.0)),
            (None, "ImageOrientationPatient", Add(values=(0, 0, 0, 0, 0, 1e-07))),
        ]
    )
    def check(mutations):
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the invalid values written
            folder = Path(tmp) / "study"
            shutil.copytree(source, folder)
            for mutation in mutations:
                _mutate(folder, *mutation)
            outcomes.append(_check_load(folder))

    check()
    # Both sides were exercised: the property is not vacuous.
    assert outcomes.count("loaded") >= 10 and outcomes.count("rejected") >= 10, outcomes


VALID_VARIANTS = {  # id: mutations that leave one valid CT series
    "irrelevant tags deleted": [
        (None, k, DELETE)
        for k in (
            "SliceThickness",
            "SliceLocation",
            "InstanceNumber",
            "WindowCenter",
            "WindowWidth",
            "SamplesPerPixel",
        )
    ],
    "per-slice rescale": [
        (1, "RescaleSlope", 2.0),
        (2, "RescaleIntercept", DELETE),
        (3, "RescaleSlope", -1.0),
    ],
    "12 of 16 bits stored": [(None, "BitsStored", 12), (None, "HighBit", 11)],
    "one slice unsigned": [(0, "PixelRepresentation", 0)],
    "8-bit pixels, twice the columns": [
        (None, "BitsAllocated", 8),
        (None, "BitsStored", 8),
        (None, "HighBit", 7),
        (None, "Columns", 2 * X),
    ],
    "MONOCHROME1": [(None, "PhotometricInterpretation", "MONOCHROME1")],
    "moved and resampled": [
        (None, "ImagePositionPatient", Add((3.0, -2.0, 50.0))),
        (None, "PixelSpacing", [0.35, 0.35]),
    ],
    "gantry-tilted frame": [(None, "ImageOrientationPatient", Tilt(20.0))],
    "scanner rounding": [
        (2, "ImagePositionPatient", Add((1e-7, 0.0, 1e-7))),
        (1, "ImageOrientationPatient", Add((0, 0, 0, 0, 0, 1e-7))),
        (3, "PixelSpacing", [0.7, 0.6000001]),
    ],
    "implicit VR": [(None, "TransferSyntaxUID", ImplicitVRLittleEndian)],
    "no study uid": [(None, "StudyInstanceUID", DELETE)],
}
INVALID_VARIANTS = {  # id: mutations after which the folder is not one valid CT series
    "fewer rows than the pixel data": [(None, "Rows", Y // 2)],
    "no rows": [(2, "Rows", DELETE)],
    "NaN slope": [(1, "RescaleSlope", math.nan)],
    "zero slope": [(1, "RescaleSlope", 0.0)],
    "infinite intercept": [(1, "RescaleIntercept", -math.inf)],
    "NaN position": [(2, "ImagePositionPatient", [math.nan, 0.0, 0.0])],
    "all positions NaN": [(None, "ImagePositionPatient", [math.nan, 0.0, 0.0])],
    "slice off the line": [(1, "ImagePositionPatient", Add((0.0, 0.3, 0.0)))],
    "zero pixel spacing": [(None, "PixelSpacing", [0.0, 0.0])],
    "negative pixel spacing": [(None, "PixelSpacing", [-0.7, 0.6])],
    "scaled cosines": [(None, "ImageOrientationPatient", Add((1.0,) + (0,) * 5))],
    "oblique cosines": [(None, "ImageOrientationPatient", [0.5, 0.866, 0.0, 0.0, 1.0, 0.0])],
    "colour": [(None, "PhotometricInterpretation", "RGB")],
    "no photometric": [(None, "PhotometricInterpretation", DELETE)],
    "high bit not stored - 1": [(None, "HighBit", 14)],
    "two studies": [(3, "StudyInstanceUID", "1.2.3.5")],
    "two frames": [(0, "NumberOfFrames", 2)],
    "compressed label on raw bytes": [(1, "TransferSyntaxUID", RLELossless)],
}


@pytest.mark.parametrize(
    "valid, mutations",
    [(True, m) for m in VALID_VARIANTS.values()] + [(False, m) for m in INVALID_VARIANTS.values()],
    ids=[*VALID_VARIANTS, *INVALID_VARIANTS],
)
def test_header_variants(written_series, tmp_path, valid, mutations):
    source, _ = written_series
    folder = tmp_path / "study"
    shutil.copytree(source, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mutation in mutations:
            _mutate(folder, *mutation)
        assert (_expected(folder) is not None) == valid  # the oracle agrees with the id
        assert _check_load(folder) == ("loaded" if valid else "rejected")


def test_oracle_reads_the_written_series_as_written(written_series):
    folder, series = written_series
    expected = _expected(folder)
    np.testing.assert_array_equal(expected["hu"], series.hu)
    np.testing.assert_array_equal(expected["slice_numbers"], series.slice_numbers)


@hypothesis.settings(max_examples=40, deadline=None, database=None)
@hypothesis.given(cut=st.floats(0.0, 1.0, exclude_max=True), victim=st.integers(1, Z - 2))
def test_any_truncation_of_a_slice_is_reported(written_series, cut, victim):
    source, _ = written_series
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a file cut inside its preamble is not DICOM at all
        folder = Path(tmp) / "study"
        shutil.copytree(source, folder)
        path = _dicoms(folder)[victim]
        data = path.read_bytes()
        path.write_bytes(data[: int(cut * len(data))])
        with pytest.raises(dicom.DicomError) as err:
            dicom.load_series(folder)
        message = str(err.value)
        # The file itself, or (ignored as not DICOM) the gap it leaves in the folder.
        assert "\n" not in message
        assert message.startswith(f"{path}: ") or "inconsistent slice spacing" in message


# ------------------------------------------------------------------ untrusted input
_UNSAFE_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
    "torch",
}


def _python_files():
    files = sorted(Path(ROOT, "cspine_jax").rglob("*.py"))
    return files + [Path(ROOT, name) for name in ("train.py", "evaluate.py")]


def test_nothing_unpickles_or_evaluates_data():
    np_loads = 0
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {n.split(".")[0] for n in names} & _UNSAFE_MODULES, where
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                assert name not in ("eval", "exec", "read_pickle", "load_pickle"), where
                owner = getattr(func, "value", None)
                if (
                    name == "load"
                    and isinstance(owner, ast.Name)
                    and owner.id in ("np", "numpy", "jnp")
                ):
                    np_loads += 1
                    flags = {k.arg: k.value for k in node.keywords}
                    assert isinstance(flags.get("allow_pickle"), ast.Constant), where
                    assert flags["allow_pickle"].value is False, where
    assert np_loads >= 3  # the cache's arrays: the scan does see them


@pytest.mark.parametrize(
    "uid", ["../escape", "/tmp/escape", "a\x00b", "..", ".hidden", "a/../../b", "x" * 200]
)
def test_unsafe_study_ids_are_refused_before_anything_is_written(phantom_dir, tmp_path, uid):
    data = tmp_path / "rsna"
    data.mkdir()
    os.symlink(os.path.join(phantom_dir, "train_images"), data / "train_images")
    first, *rest = Path(phantom_dir, "train.csv").read_text().splitlines(keepends=True)
    (data / "train.csv").write_text(first + f"{uid},0,0,0,0,0,0,0,0\n" + "".join(rest))
    before = _snapshot(tmp_path)
    with pytest.raises(
        rsna.DatasetError, match="train.csv:2: StudyInstanceUID .* is not a safe identifier"
    ):
        prepare.prepare_dataset(
            str(data), str(tmp_path / "cache"), PARAMS, workers=0, progress=False
        )
    assert _snapshot(tmp_path) == before


def test_crafted_headers_and_file_names_write_only_into_the_cache(phantom_dir, tmp_path):
    """Header UIDs and file names are data: the cache is named by the CSV's checked ids."""
    data = tmp_path / "rsna"
    shutil.copytree(phantom_dir, data)
    study = rsna.load_index(str(data))[1]
    crafted = {"StudyInstanceUID": "../../../escape", "SeriesInstanceUID": "/tmp/escape\x00"}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Invalid value for VR UI")  # they are not UIDs
        for path in _dicoms(study.image_dir):
            _rewrite(path, lambda ds: [setattr(ds, k, v) for k, v in crafted.items()])
    for name in ("..dcm", "-rf.dcm", "$(touch pwned).dcm", "a b;c.dcm"):
        (Path(study.image_dir) / name).write_bytes(b"not DICOM")
    before = _snapshot(tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Invalid value for VR UI")
        with pytest.warns(UserWarning, match="ignoring non-DICOM files"):
            summary = prepare.prepare_dataset(
                str(data), str(tmp_path / "cache"), PARAMS, workers=0, progress=False
            )
    assert study.uid in summary.prepared and not summary.failed
    written = set(_snapshot(tmp_path)) - set(before)
    assert written and all(p.startswith(f"{tmp_path / 'cache'}/") for p in written)
    assert {
        Path(p).relative_to(tmp_path / "cache").parts[1] for p in written if "/studies/" in p
    } == set(summary.prepared)
    assert not list(Path("/tmp").glob("escape*")) and not (Path(ROOT) / "pwned").exists()


@pytest.mark.parametrize("uid", ["../../escape", "/etc/passwd", "a\x00b", "..", ".", "a/b"])
def test_prediction_files_stay_in_the_output_folder(tmp_path, uid):
    stem = dicom.file_stem(uid)
    for suffix in (".json", ".png"):
        path = os.path.join(tmp_path, stem + suffix)
        assert os.path.dirname(os.path.normpath(path)) == str(tmp_path)
        assert "\x00" not in path
