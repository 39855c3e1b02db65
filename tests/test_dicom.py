"""DICOM series reading and writing: order by geometry, HU as pydicom computes it, clear errors."""

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_rescale
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    RLELossless,
)

from cspine_jax.data.dicom import DicomError, Series, load_series, read_series
from cspine_jax.data.dicom_writer import write_series

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # normal +z: superior


def make_series(
    numbering="ascending",
    *,
    z=12,
    y=40,
    x=48,
    orientation=AXIAL,
    dz=1.25,
    uid="1.2.826.0.1.3680043.8.498.1",
):
    """A (z, y, x) volume whose every slice and every row/column differ, superior first.

    numbering: "ascending" (file 1 is the most superior), "reverse" (file 1 the most
    inferior) or "shuffled" (no relation between file number and position).
    """
    k, j, i = np.meshgrid(np.arange(z), np.arange(y), np.arange(x), indexing="ij")
    hu = (100 * k + 7 * j + i - 500).astype(np.float32)
    orientation = np.asarray(orientation, np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    down = normal if normal[2] < 0 else -normal  # axis 0 runs inferior
    positions = np.array([-60.0, -70.0, 90.0]) + np.arange(z)[:, None] * dz * down
    numbers = {
        "ascending": np.arange(1, z + 1),
        "reverse": np.arange(z, 0, -1),
        "shuffled": np.random.default_rng(0).permutation(z) + 1,
    }[numbering]
    return Series(uid, hu, (dz, 0.7, 0.6), positions, orientation, numbers)


def assert_matches_files(series, folder):
    """Each slice equals pydicom's own modality LUT of the file its slice_number names."""
    for k, number in enumerate(series.slice_numbers):
        ds = pydicom.dcmread(Path(folder) / f"{number}.dcm")
        np.testing.assert_array_equal(series.hu[k], apply_rescale(ds.pixel_array, ds))
        np.testing.assert_allclose(series.positions[k], np.asarray(ds.ImagePositionPatient, float))
    assert (np.diff(series.positions[:, 2]) < 0).all(), "axis 0 must run superior -> inferior"


@pytest.mark.parametrize(
    "numbering, syntax",
    [
        ("ascending", ExplicitVRLittleEndian),
        ("reverse", ExplicitVRLittleEndian),
        ("shuffled", ImplicitVRLittleEndian),
        ("shuffled", RLELossless),
        ("reverse", JPEG2000Lossless),
    ],
)
def test_round_trip_orders_by_position(tmp_path, numbering, syntax):
    series = make_series(numbering)
    write_series(tmp_path, series, transfer_syntax=syntax)
    assert pydicom.dcmread(tmp_path / "1.dcm").file_meta.TransferSyntaxUID == syntax

    loaded = load_series(tmp_path)

    assert loaded.uid == series.uid
    np.testing.assert_array_equal(loaded.slice_numbers, series.slice_numbers)
    np.testing.assert_allclose(loaded.positions, series.positions, atol=1e-6)
    np.testing.assert_allclose(loaded.orientation, series.orientation)
    np.testing.assert_allclose(loaded.spacing, series.spacing, atol=1e-6)
    np.testing.assert_allclose(loaded.hu, series.hu, atol=0.5)
    assert loaded.hu.dtype == np.float32
    assert_matches_files(loaded, tmp_path)


def test_written_headers_are_ct_as_a_scanner_writes(tmp_path):
    series = make_series()
    write_series(tmp_path, series)
    write_series(tmp_path / "again", series)
    ds = pydicom.dcmread(tmp_path / "3.dcm")
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert (ds.Modality, ds.InstanceNumber, ds.StudyInstanceUID) == ("CT", 3, series.uid)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 16, 15, 1)
    assert (ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType) == (-1024, 1, "HU")
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    np.testing.assert_allclose(ds.PixelSpacing, series.spacing[1:])
    assert ds.SliceThickness == series.spacing[0]
    # UIDs are deterministic per study and slice, and unique per slice.
    again = pydicom.dcmread(tmp_path / "again" / "3.dcm")
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (
        ds.SOPInstanceUID,
        ds.SeriesInstanceUID,
    )
    assert pydicom.dcmread(tmp_path / "4.dcm").SOPInstanceUID != ds.SOPInstanceUID


def test_unsigned_storage_clips_to_12_bits(tmp_path):
    series = make_series()
    hu = series.hu.copy()
    hu[0, 0, :3] = [-3000.0, 3071.0, 5000.0]
    write_series(
        tmp_path,
        Series(
            series.uid,
            hu,
            series.spacing,
            series.positions,
            series.orientation,
            series.slice_numbers,
        ),
        unsigned=True,
    )
    ds = pydicom.dcmread(tmp_path / "1.dcm")
    assert (ds.PixelRepresentation, ds.BitsStored, ds.pixel_array.dtype) == (0, 12, np.uint16)

    loaded = load_series(tmp_path)
    np.testing.assert_array_equal(loaded.hu, np.clip(hu, -1024, 3071))
    assert_matches_files(loaded, tmp_path)


@pytest.mark.parametrize("unsigned", [False, True], ids=["int16", "uint16"])
def test_unused_high_bits_are_dropped_as_pydicom_does(tmp_path, unsigned):
    series = make_series()
    write_series(tmp_path, series, unsigned=unsigned)
    ds = pydicom.dcmread(tmp_path / "2.dcm")
    ds.BitsStored, ds.HighBit = 12, 11
    # Junk in the 4 unused bits (an old overlay, say) of every other pixel.
    raw = ds.pixel_array.view(np.uint16).copy()
    raw.reshape(-1)[::2] |= 0xA000
    ds.PixelData = raw.tobytes()
    ds.save_as(tmp_path / "2.dcm")

    loaded = load_series(tmp_path)
    np.testing.assert_allclose(loaded.hu, series.hu, atol=0.5)
    assert_matches_files(loaded, tmp_path)


def test_read_series_hands_slices_over_in_file_order(tmp_path):
    series = make_series("shuffled")
    write_series(tmp_path, series)
    seen = []

    def per_slice(stored):
        seen.append(stored.path.name)
        return stored.path.name, stored.pixels.copy()

    header, results = read_series(tmp_path, per_slice)
    assert seen == sorted(seen) and len(seen) == len(series.slice_numbers)
    assert [name for name, _ in results] == [f"{n}.dcm" for n in series.slice_numbers]
    assert header.shape == series.shape and header.uid == series.uid
    np.testing.assert_allclose(header.affine, series.affine, atol=1e-6)
    np.testing.assert_array_equal([pixels for _, pixels in results], series.hu + 1024)


def test_missing_rescale_tags_default_to_slope_1_intercept_0(tmp_path):
    write_series(tmp_path, make_series())
    bare = pydicom.dcmread(tmp_path / "2.dcm")
    del bare.RescaleSlope, bare.RescaleIntercept
    bare.save_as(tmp_path / "2.dcm")
    halved = pydicom.dcmread(tmp_path / "5.dcm")
    halved.RescaleSlope, halved.RescaleIntercept = 0.5, -10
    halved.save_as(tmp_path / "5.dcm")

    loaded = load_series(tmp_path)
    np.testing.assert_array_equal(loaded.hu[1], bare.pixel_array)
    np.testing.assert_array_equal(loaded.hu[4], halved.pixel_array * 0.5 - 10)
    assert_matches_files(loaded, tmp_path)


@pytest.mark.parametrize(
    "orientation",
    [(1.0, 0.0, 0.0, 0.0, -1.0, 0.0), (0.0, 1.0, 0.0, 1.0, 0.0, 0.0)],
    ids=["flipped-columns", "swapped-row-col"],
)
def test_normal_pointing_inferior_still_superior_first(tmp_path, orientation):
    series = make_series("shuffled", orientation=orientation)
    assert series.normal[2] == -1.0
    write_series(tmp_path, series)
    loaded = load_series(tmp_path)
    np.testing.assert_array_equal(loaded.slice_numbers, series.slice_numbers)
    np.testing.assert_allclose(loaded.hu, series.hu, atol=0.5)
    assert_matches_files(loaded, tmp_path)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ],
)
def test_decodes_other_transfer_syntaxes(tmp_path, name):
    """pydicom's own example files, made into a 2-slice series in their original syntax."""
    source = get_testdata_file(name)
    shutil.copy(source, tmp_path / "1.dcm")
    above = pydicom.dcmread(source)
    above.ImagePositionPatient = [
        float(v) + d for v, d in zip(above.ImagePositionPatient, (0, 0, 3.0), strict=True)
    ]
    above.save_as(tmp_path / "2.dcm")

    loaded = load_series(tmp_path)
    np.testing.assert_array_equal(loaded.slice_numbers, [2, 1])
    assert loaded.spacing[0] == pytest.approx(3.0)
    assert_matches_files(loaded, tmp_path)


@pytest.mark.parametrize(
    "syntax, problem",
    [(JPEGBaseline8Bit, "lossless"), (JPEGLossless, "encoder"), (ExplicitVRBigEndian, "write")],
)
def test_write_rejects_syntaxes_it_cannot_encode(tmp_path, syntax, problem):
    with pytest.raises(DicomError, match=problem) as err:
        write_series(tmp_path / "out", make_series(), transfer_syntax=syntax)
    assert str(tmp_path / "out") in str(err.value)
    assert not (tmp_path / "out").exists()


def _edit(path, **changes):
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def _load_error_cases():
    """(id, corrupt(folder) -> the path the message must start with, problem regex)."""

    def other_series(d):
        other = make_series(uid="1.2.826.0.1.3680043.8.498.2")
        write_series(
            d,
            Series(
                other.uid, other.hu[:1], other.spacing, other.positions[:1], other.orientation, [99]
            ),
        )
        return d

    def truncated(d):
        data = (d / "4.dcm").read_bytes()
        (d / "4.dcm").write_bytes(data[:-100])
        return d / "4.dcm"

    def missing_slice(d):
        (d / "6.dcm").unlink()
        return d

    def edited(number, named, **changes):
        def corrupt(d):
            _edit(d / f"{number}.dcm", **changes)
            return {"folder": d, "file": d / f"{number}.dcm"}[named]

        return corrupt

    return [
        ("several series", other_series, "several series"),
        (
            "duplicate position",
            edited(5, "folder", ImagePositionPatient=[-60.0, -70.0, 90.0 - 1.25 * 5]),
            "duplicate slice position .* 5.dcm and 6.dcm",
        ),
        ("gap", missing_slice, "inconsistent slice spacing: 2.5000 mm between 5.dcm and 7.dcm"),
        ("pixel spacing", edited(3, "file", PixelSpacing=[0.7, 0.65]), "inconsistent PixelSpacing"),
        ("rows", edited(3, "file", Rows=20), "inconsistent Rows/Columns"),
        (
            "orientation",
            edited(3, "file", ImageOrientationPatient=[1, 0, 0, 0, 0.995, 0.0998]),
            "inconsistent ImageOrientationPatient",
        ),
        (
            "no position",
            edited(7, "file", ImagePositionPatient=None),
            "missing ImagePositionPatient",
        ),
        (
            "no orientation",
            edited(7, "file", ImageOrientationPatient=None),
            "missing ImageOrientationPatient",
        ),
        ("no pixel spacing", edited(7, "file", PixelSpacing=None), "missing PixelSpacing"),
        ("no pixels", edited(8, "file", PixelData=None), "no pixel data"),
        ("truncated", truncated, "cannot decode pixel data"),
    ]


@pytest.mark.parametrize(
    "corrupt, problem",
    [c[1:] for c in _load_error_cases()],
    ids=[c[0] for c in _load_error_cases()],
)
def test_load_errors_name_the_path(tmp_path, corrupt, problem):
    write_series(tmp_path, make_series())
    named = corrupt(tmp_path)
    with pytest.raises(DicomError, match=problem) as err:
        load_series(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{named}: ") and "\n" not in message


def test_empty_and_single_slice_folders(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    # Other files alone: the error only, no warning before it (the CLI's stderr is one line).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DicomError, match="no DICOM files"):
            load_series(tmp_path)
    series = make_series()
    write_series(
        tmp_path,
        Series(
            series.uid, series.hu[:1], series.spacing, series.positions[:1], series.orientation, [1]
        ),
    )
    with pytest.warns(UserWarning), pytest.raises(DicomError, match=f"{tmp_path}: only one"):
        load_series(tmp_path)


def test_non_dicom_files_are_ignored_with_a_warning(tmp_path):
    series = make_series("reverse")
    write_series(tmp_path, series)
    (tmp_path / "junk.dcm").write_bytes(b"this is not DICOM" * 20)
    (tmp_path / "README").write_text("study notes")
    (tmp_path / "sub").mkdir()
    with pytest.warns(UserWarning, match=r"junk\.dcm.*README|README.*junk\.dcm"):
        loaded = load_series(tmp_path)
    np.testing.assert_array_equal(loaded.slice_numbers, series.slice_numbers)


def test_clean_folder_loads_without_warnings(tmp_path):
    write_series(tmp_path, make_series())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_series(tmp_path)


def test_files_not_named_by_number_use_instance_number(tmp_path):
    series = make_series("shuffled")
    write_series(tmp_path, series)
    for path in list(tmp_path.glob("*.dcm")):
        path.rename(tmp_path / f"IM{path.stem}.dcm")
    np.testing.assert_array_equal(load_series(tmp_path).slice_numbers, series.slice_numbers)


def test_series_rejects_inconsistent_shapes():
    series = make_series()
    with pytest.raises(ValueError, match="positions"):
        Series(
            series.uid,
            series.hu,
            series.spacing,
            series.positions[1:],
            series.orientation,
            series.slice_numbers,
        )
    with pytest.raises(ValueError, match="slice_numbers"):
        Series(
            series.uid,
            series.hu,
            series.spacing,
            series.positions,
            series.orientation,
            series.slice_numbers[:-1],
        )


def _rename_all(folder, name_of):
    """Renames every `<n>.dcm` in `folder` to name_of(n, k), k its index in n order."""
    paths = sorted(Path(folder).glob("*.dcm"), key=lambda p: int(p.stem))
    for k, path in enumerate(paths):
        path.rename(Path(folder) / name_of(int(path.stem), k))


def assert_same_series(loaded, expected):
    assert loaded.uid == expected.uid
    np.testing.assert_array_equal(loaded.hu, expected.hu)
    np.testing.assert_array_equal(loaded.positions, expected.positions)
    np.testing.assert_array_equal(loaded.orientation, expected.orientation)
    assert loaded.spacing == expected.spacing


# UID names whose last component is unrelated to the slice: read as a number, it would
# give the wrong slice_numbers.
_UID_TAILS = np.random.default_rng(1).permutation(np.arange(500, 512))

PACS_NAMES = {
    # IM1, IM2...: numbered in listing order, not by InstanceNumber.
    "IM": lambda n, k: f"IM{k + 1}",
    "uid": lambda n, k: f"1.2.840.113619.2.55.3.{_UID_TAILS[k]}",
    "bare-integer": lambda n, k: f"{n:04d}",
}


@pytest.mark.parametrize("style", list(PACS_NAMES))
def test_pacs_file_names_load_like_the_original(tmp_path, style):
    series = make_series("shuffled")
    write_series(tmp_path / "orig", series)
    original = load_series(tmp_path / "orig")
    shutil.copytree(tmp_path / "orig", tmp_path / style)
    _rename_all(tmp_path / style, PACS_NAMES[style])
    assert not list((tmp_path / style).glob("*.dcm"))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_series(tmp_path / style)

    assert_same_series(loaded, original)
    # IM and UID names carry no slice number: InstanceNumber, which write_series sets to the
    # original file number; bare integers are the number (0007 -> 7).
    np.testing.assert_array_equal(loaded.slice_numbers, original.slice_numbers)
    np.testing.assert_array_equal(loaded.slice_numbers, series.slice_numbers)


def test_numbered_names_with_and_without_extension_mix(tmp_path):
    series = make_series("shuffled")
    write_series(tmp_path, series)
    instance = pydicom.dcmread(tmp_path / "3.dcm")
    instance.InstanceNumber = 99  # the name wins over InstanceNumber for numbered files
    instance.save_as(tmp_path / "3.dcm")
    _rename_all(tmp_path, lambda n, k: f"{n}" if n % 2 else f"{n}.dcm")
    np.testing.assert_array_equal(load_series(tmp_path).slice_numbers, series.slice_numbers)


def test_names_numbering_two_files_alike_fall_back_to_instance_number(tmp_path):
    series = make_series("shuffled")
    write_series(tmp_path, series)
    (tmp_path / "1.dcm").rename(tmp_path / "0001")  # 0001 and 1.dcm would both be 1
    (tmp_path / "2.dcm").rename(tmp_path / "1.dcm")
    edited = pydicom.dcmread(tmp_path / "1.dcm")
    assert edited.InstanceNumber == 2
    np.testing.assert_array_equal(load_series(tmp_path).slice_numbers, series.slice_numbers)


def test_files_are_dicom_by_content_not_name(tmp_path):
    series = make_series("reverse")
    write_series(tmp_path / "orig", series)
    original = load_series(tmp_path / "orig")
    shutil.copytree(tmp_path / "orig", tmp_path / "study")
    study = tmp_path / "study"
    _rename_all(study, PACS_NAMES["IM"])
    (study / "notes.txt").write_text("radiologist's notes")
    (study / "junk.dcm").write_bytes(b"this is not DICOM" * 20)
    (study / "README").write_text("exported from PACS")

    with pytest.warns(UserWarning) as record:
        loaded = load_series(study)

    messages = [str(w.message) for w in record]
    assert messages == [f"{study}: ignoring non-DICOM files ['README', 'junk.dcm', 'notes.txt']"]
    assert_same_series(loaded, original)
    np.testing.assert_array_equal(loaded.slice_numbers, series.slice_numbers)


def _headerless(path, **changes):
    """Rewrites `path` as its bare dataset: no preamble, no "DICM", no file meta group."""
    ds = pydicom.dcmread(path, force=True)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.preamble = None
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    data = path.read_bytes()
    assert data[:2] == b"\x08\x00" and data[128:132] != b"DICM"  # group 0008 first


def test_headerless_datasets_are_dicom_when_they_hold_an_image(tmp_path):
    series = make_series("shuffled")
    write_series(tmp_path / "orig", series)
    original = load_series(tmp_path / "orig")
    shutil.copytree(tmp_path / "orig", tmp_path / "study")
    study = tmp_path / "study"
    for path in study.glob("*.dcm"):
        _headerless(path)
    _rename_all(study, PACS_NAMES["uid"])
    # Starts like a dataset (group 0008) but is none; and a dataset that is no image.
    (study / "tagged").write_bytes(b"\x08\x00\x05\x00" + b"not a dataset at all" * 20)
    shutil.copy(next(study.iterdir()), study / "bare")
    _headerless(study / "bare", SOPClassUID=None, PixelData=None)

    with pytest.warns(UserWarning) as record:
        loaded = load_series(study)

    # Only the skip: what pydicom made of the garbage is no concern of a skipped file.
    messages = [str(w.message) for w in record]
    assert messages == [f"{study}: ignoring non-DICOM files ['bare', 'tagged']"]

    assert_same_series(loaded, original)
    np.testing.assert_array_equal(loaded.slice_numbers, series.slice_numbers)


def test_headerless_image_without_pixels_is_an_error(tmp_path):
    write_series(tmp_path, make_series())
    _headerless(tmp_path / "4.dcm", PixelData=None)
    with pytest.raises(DicomError, match="no pixel data") as err:
        load_series(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / '4.dcm'}: ")


def test_dicomdir_is_skipped_without_a_warning(tmp_path):
    write_series(tmp_path / "orig", make_series())
    original = load_series(tmp_path / "orig")
    shutil.copytree(tmp_path / "orig", tmp_path / "study")
    shutil.copy(get_testdata_file("DICOMDIR"), tmp_path / "study" / "DICOMDIR")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_series(tmp_path / "study")
    assert_same_series(loaded, original)

    # A CD export: DICOMDIR at the top, the images in a folder below.
    (tmp_path / "cd").mkdir()
    shutil.copy(get_testdata_file("DICOMDIR"), tmp_path / "cd" / "DICOMDIR")
    shutil.copytree(tmp_path / "orig", tmp_path / "cd" / "DICOM")
    with pytest.raises(DicomError, match="1 sub-folder .*e.g. .*cd/DICOM$"):
        load_series(tmp_path / "cd")


def test_folder_of_studies_hints_at_one_study(tmp_path):
    parent = tmp_path / "train_images"
    write_series(parent / "1.2.826.0.1.3680043.8.498.1", make_series())
    write_series(parent / "1.2.826.0.1.3680043.8.498.2", make_series())
    (parent / ".ipynb_checkpoints").mkdir()  # hidden: neither counted nor suggested

    with pytest.raises(DicomError) as err:
        load_series(parent)

    message = str(err.value)
    assert message == (
        f"{parent}: no DICOM files here, but 2 sub-folders (one study each?): pass one "
        f"study's folder, e.g. {parent / '1.2.826.0.1.3680043.8.498.1'}"
    )
    assert "\n" not in message
    # Without sub-folders there is nothing to suggest.
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomError, match=r"no DICOM files$"):
        load_series(tmp_path / "empty")


def test_each_slice_is_parsed_once_and_other_files_not_at_all(tmp_path, monkeypatch):
    series = make_series()
    write_series(tmp_path, series)
    _rename_all(tmp_path, PACS_NAMES["uid"])
    slices = sorted(p.name for p in tmp_path.iterdir())
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 4096)  # an empty preamble, no DICM
    (tmp_path / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    parsed = []
    dcmread = pydicom.dcmread

    def counting(fp, *args, **kwargs):
        parsed.append(Path(getattr(fp, "name", fp)).name)
        return dcmread(fp, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    with pytest.warns(UserWarning, match=r"\['junk.dcm', 'notes.txt', 'scan.png'\]"):
        load_series(tmp_path)
    assert parsed == slices
