"""DICOM CT series: read an RSNA study folder into a Hounsfield volume (or hand its slices one
by one to a consumer that resamples them as they are decoded). `dicom_writer` writes one.

A study folder holds one axial CT series, one slice per DICOM file. Files are recognised by
their content, not their name: RSNA names them `<n>.dcm`, PACS exports `IM0001`, `1.2.840...`
or anything else (see `_read_dicom`). The number `n` of a file named `<n>.dcm` (or `<n>`) is
what the RSNA bounding-box CSV calls `slice_number`; other names fall back to InstanceNumber.
It says nothing about anatomy (some studies are numbered from the feet up), so slices are
ordered by geometry: ImagePositionPatient projected on the slice normal, most superior first.

Coordinates are DICOM patient coordinates (LPS, mm: x to the patient's left, y posterior,
z superior). Volumes are (z, y, x): axis 0 slices, axis 1 image rows, axis 2 image columns.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pydicom
import pydicom.pixels
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)

_T = TypeVar("_T")

# Positions closer than this along the normal are the same slice written twice.
_DUPLICATE_MM = 1e-3
# Gaps may deviate from the median by 10% or 0.1 mm, whichever is smaller; beyond that a
# slice is missing or the series mixes reconstructions, and a regular grid would lie.
_GAP_REL, _GAP_MM = 0.10, 0.1
# Scanners write direction cosines with ~6 decimals; differences beyond this are real.
_ORIENTATION_ATOL = 1e-4
# Row and column cosines further than this from unit length or orthogonality are not a
# frame: the affine built from them would stretch or shear the volume.
_ORTHONORMAL_ATOL = 1e-3

# Value representations `_numbers` reads from an element's bytes.
_TEXT_NUMBERS = frozenset({"DS", "IS"})
_BINARY = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}  # struct codes
_PIXEL_DATA = 0x7FE00010
_SOP_CLASS_UID = 0x00080016
_DIRECTORY_RECORDS = 0x00041220  # DirectoryRecordSequence: the body of a DICOMDIR

# A DICOM file (PS3.10) opens with a 128-byte preamble and the magic "DICM".
_PREAMBLE, _MAGIC = 128, b"DICM"
# A dataset written without that header starts with its lowest group: File Meta (0002) or,
# for an image, Identifying (0008: SpecificCharacterSet, ImageType, SOPClassUID...). Any other
# start is not worth a parse: pydicom's forced read turns any bytes into some dataset.
_HEADERLESS_GROUPS = frozenset({0x0002, 0x0008})
# A file named by its slice number, `12` or `12.dcm`: ASCII digits only (str.isdigit takes
# "²", which int() refuses), so `1.2.840.113619.2.55.3.12` is a UID, never a number; 18 digits
# at most so that any match fits int64.
_NUMBERED = re.compile(r"([0-9]{1,18})(?:\.dcm)?", re.IGNORECASE)
# Keyword -> tag, looked up once rather than per element read.
_tag = functools.cache(Tag)


class DicomError(ValueError):
    """A DICOM folder or file that cannot be read as one CT volume; message `<path>: <problem>`."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {' '.join(str(problem).split())}")


@dataclasses.dataclass(frozen=True, eq=False)
class SeriesHeader:
    """Where the voxels of one CT series lie, without the voxels: what is known before decoding.

    Attributes:
      uid: StudyInstanceUID (the RSNA study id).
      shape: (z, y, x) voxels; axis 0 runs from the most superior slice down.
      spacing: (dz, dy, dx) mm; dz is the distance between slice positions along the normal,
        dy the row spacing (between rows), dx the column spacing (between columns).
      positions: (z, 3) float64 ImagePositionPatient (LPS mm) of each slice, in axis-0 order.
      orientation: (6,) float64 ImageOrientationPatient: row direction (the direction of
        increasing x index), then column direction (increasing y index).
      slice_numbers: (z,) int64 slice number of each slice, in axis-0 order: n of files named
        `<n>.dcm` or `<n>`, else InstanceNumber (see `_slice_numbers`).
      files: (z,) the DICOM file of each slice, in axis-0 order (what results derived from
        the series reference); empty for a volume that was not read from files.
    """

    uid: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    positions: np.ndarray
    orientation: np.ndarray
    slice_numbers: np.ndarray
    files: tuple[Path, ...] = ()

    def __post_init__(self):
        coerced = {
            "shape": tuple(int(n) for n in self.shape),
            "spacing": tuple(float(s) for s in self.spacing),
            "positions": np.asarray(self.positions, np.float64),
            "orientation": np.asarray(self.orientation, np.float64),
            "slice_numbers": np.asarray(self.slice_numbers, np.int64),
            "files": tuple(Path(f) for f in self.files),
        }
        for name, value in coerced.items():
            object.__setattr__(self, name, value)
        z = self.shape[0] if len(self.shape) == 3 else -1
        expected = {
            "shape": (len(self.shape), 3),
            "spacing": (len(self.spacing), 3),
            "positions": (self.positions.shape, (z, 3)),
            "orientation": (self.orientation.shape, (6,)),
            "slice_numbers": (self.slice_numbers.shape, (z,)),
        }
        for name, (got, want) in expected.items():
            if got != want:
                raise ValueError(f"Series {self.uid}: {name} has shape/ndim {got}, expected {want}")
        if self.files and len(self.files) != z:
            raise ValueError(f"Series {self.uid}: {len(self.files)} files for {z} slices")

    @property
    def normal(self) -> np.ndarray:
        """(3,) unit slice normal cross(row, col) in LPS; not necessarily along axis 0."""
        n = np.cross(self.orientation[:3], self.orientation[3:])
        return n / np.linalg.norm(n)

    @property
    def affine(self) -> np.ndarray:
        """(4, 4) float64 map from a voxel index (z, y, x, 1) to its LPS position (mm).

        The z column is the mean step between consecutive positions, so it follows the real
        slice stack (a gantry tilt included) rather than the normal.
        """
        row, col = self.orientation[:3], self.orientation[3:]
        z = self.shape[0]
        if z > 1:
            step = (self.positions[-1] - self.positions[0]) / (z - 1)
        else:
            step = self.spacing[0] * _slice_axis(self.normal)
        a = np.eye(4)
        a[:3, 0] = step
        a[:3, 1] = col * self.spacing[1]
        a[:3, 2] = row * self.spacing[2]
        a[:3, 3] = self.positions[0]
        return a


@dataclasses.dataclass(frozen=True, eq=False)
class Series:
    """One CT volume with its patient geometry.

    Attributes:
      uid: StudyInstanceUID (the RSNA study id).
      hu: (z, y, x) float32 Hounsfield units; axis 0 runs from the most superior slice down.
      spacing, positions, orientation, slice_numbers, files: as in `SeriesHeader`.
    """

    uid: str
    hu: np.ndarray
    spacing: tuple[float, float, float]
    positions: np.ndarray
    orientation: np.ndarray
    slice_numbers: np.ndarray
    files: tuple[Path, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "hu", np.asarray(self.hu, np.float32))
        # The header validates and coerces the geometry; the series keeps the coerced values.
        for name in ("spacing", "positions", "orientation", "slice_numbers", "files"):
            object.__setattr__(self, name, getattr(self.header, name))

    @functools.cached_property
    def header(self) -> SeriesHeader:
        """The geometry alone (what `read_series` returns before decoding)."""
        return SeriesHeader(
            self.uid,
            self.hu.shape,
            self.spacing,
            self.positions,
            self.orientation,
            self.slice_numbers,
            self.files,
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """(z, y, x) voxels."""
        return self.hu.shape

    @property
    def normal(self) -> np.ndarray:
        """(3,) unit slice normal cross(row, col) in LPS; not necessarily along axis 0."""
        return self.header.normal

    @property
    def affine(self) -> np.ndarray:
        """(4, 4) float64 map from a voxel index (z, y, x, 1) to its LPS position (mm)."""
        return self.header.affine


@dataclasses.dataclass(frozen=True, eq=False)
class StoredSlice:
    """One decoded slice before the modality rescale: HU = pixels * slope + intercept.

    The rescale is affine and the same over the whole slice, so it commutes with any linear
    resampling whose weights sum to 1: a reader may resample `pixels` first and rescale the
    (smaller) result.

    Attributes:
      path: the file it came from.
      pixels: (y, x) integer stored values, read-only (it may view the file's bytes).
      slope, intercept: RescaleSlope and RescaleIntercept (1 and 0 where missing).
      pixel_spacing: (dy, dx) mm, the file's PixelSpacing, for a reader that resamples to a
        physical pixel size as it decodes; None where it is unusable (`read_series` then
        rejects the series once it has read every file).
    """

    path: Path
    pixels: np.ndarray
    slope: float
    intercept: float
    pixel_spacing: tuple[float, float] | None = None

    def rescale(self, values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """float32 `values * slope + intercept` (HU) into `out` (may be `values` itself).

        values: `pixels`, or a linear resampling of them with weights summing to 1.
        """
        out = np.empty(values.shape, np.float32) if out is None else out
        # One pass over the data when the slope is 1 (the usual CT case).
        if self.slope == 1:
            np.add(values, np.float32(self.intercept), out=out)
        else:
            np.multiply(values, np.float32(self.slope), out=out)
            out += np.float32(self.intercept)
        return out


def file_stem(uid: str) -> str:
    """A header UID (or a folder name standing in for one) as a file name: only letters,
    digits, `.`, `-` and `_` are kept, others become `_`, so it cannot leave its folder."""
    return re.sub(r"[^\w.-]", "_", uid)


def _slice_axis(normal: np.ndarray) -> np.ndarray:
    """The unit normal signed to point inferior (patient z decreasing): axis 0's direction.

    A normal with no z component (sagittal or coronal slices) keeps the order -normal.
    """
    return normal if normal[2] < 0 else -normal


def _numbers(ds: Dataset, keyword: str, path: Path) -> tuple[float, ...] | None:
    """The values of a numeric element (DS, IS or binary), None if absent or empty.

    Read from the element's bytes while pydicom has not converted it: its conversion runs a
    chain of hooks (~12 us an element, ~0.2 ms a slice for the tags read here, more than half
    the cost of parsing the file), where these VRs are plain ASCII decimals or packed numbers.
    """
    tag = _tag(keyword)
    elem = ds.get_item(tag)
    if elem is None or elem.value is None:
        return None
    raw_vr = (elem.VR or dictionary_VR(tag)) if isinstance(elem, RawDataElement) else None
    try:
        if raw_vr in _TEXT_NUMBERS:
            text = elem.value.strip(b" \0")
            values = tuple(float(v) for v in text.split(b"\\")) if text else ()
        elif raw_vr in _BINARY:
            code = _BINARY[raw_vr]
            count = len(elem.value) // struct.calcsize(code)
            order = "<" if elem.is_little_endian else ">"
            values = struct.unpack(f"{order}{count}{code}", elem.value)
        else:  # converted already, or a VR left to pydicom
            value = ds[tag].value
            empty = value is None or isinstance(value, str | bytes) and not value.strip()
            values = () if empty else tuple(np.asarray(value, np.float64).reshape(-1).tolist())
    except (TypeError, ValueError, struct.error) as e:
        raise DicomError(path, f"unreadable {keyword} {elem.value!r}: {e}") from None
    return values or None


def _text(ds: Dataset, keyword: str) -> str:
    """A one-valued UI or CS element as text, "" if absent; from its bytes as in `_numbers`."""
    tag = _tag(keyword)
    elem = ds.get_item(tag)
    if elem is None or elem.value is None:
        return ""
    if isinstance(elem, RawDataElement) and (elem.VR or dictionary_VR(tag)) in ("UI", "CS"):
        return elem.value.strip(b" \0").decode("ascii", "replace")
    return str(ds[tag].value)


def _floats(ds: Dataset, keyword: str, path: Path) -> np.ndarray:
    values = _numbers(ds, keyword, path)
    if values is None:
        raise DicomError(path, f"missing {keyword}")
    if not all(map(math.isfinite, values)):  # NaN sorts and compares silently wrong
        raise DicomError(path, f"non-finite {keyword} {list(values)}")
    return np.array(values)


def _optional_number(ds: Dataset, keyword: str, default: float | None, path: Path) -> float | None:
    values = _numbers(ds, keyword, path)
    if values is None:
        return default
    if len(values) != 1:
        raise DicomError(path, f"unreadable {keyword} {list(values)}: one value expected")
    return values[0]


def _check_image(ds: Dataset, path: Path, rows: float, cols: float) -> None:
    """Raises unless the file holds one grey image whose values mean what they say.

    pydicom decodes some headers it should not: colour or palette images with one sample,
    HighBit not at BitsStored - 1 (it ignores HighBit), a rescale to NaN, inf or a constant.
    """
    if rows < 1 or cols < 1:
        raise DicomError(path, f"Rows/Columns {rows:g}/{cols:g}: no image")
    samples = _optional_number(ds, "SamplesPerPixel", 1, path)
    photometric = _text(ds, "PhotometricInterpretation")
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(
            path,
            f"not a grey image: PhotometricInterpretation {photometric}, "
            f"SamplesPerPixel {samples:g}",
        )
    bits, stored = (_optional_number(ds, k, 0, path) for k in ("BitsAllocated", "BitsStored"))
    if (
        bits not in (8, 16, 32)
        or not 1 <= stored <= bits
        or (_optional_number(ds, "HighBit", stored - 1, path) != stored - 1)
    ):
        raise DicomError(
            path,
            f"unsupported pixel layout: BitsAllocated {bits:g}, BitsStored "
            f"{stored:g}, HighBit {ds.get('HighBit')}",
        )
    slope = _optional_number(ds, "RescaleSlope", 1.0, path)
    intercept = _optional_number(ds, "RescaleIntercept", 0.0, path)
    # Any stored value (32 bits at most) must map to a finite float32 HU; NaN fails too.
    if slope == 0 or not abs(slope) * 2.0**32 + abs(intercept) < np.finfo(np.float32).max:
        raise DicomError(path, f"unusable RescaleSlope {slope} / RescaleIntercept {intercept}")


def _read_dicom(path: Path) -> Dataset | None:
    """The file's dataset, or None when the file is not DICOM.

    A file is DICOM when it has the 128-byte preamble followed by "DICM" (PS3.10), or when,
    without them, it starts with an element of group 0002 or 0008 and pydicom's forced read
    gives a dataset holding SOPClassUID or PixelData, as every image has (ACR-NEMA style
    exports and some PACS write the bare dataset). The first 132 bytes decide which, so a
    non-DICOM file costs one short read and no parse. Text never passes: its first two bytes
    are printable, never the group 0002 or 0008 of a tag.

    Raises:
      DicomError: a file with the DICOM header that pydicom cannot parse. A headerless file
        that cannot be parsed is not DICOM (None): only the parse said it might be.
    """
    with open(path, "rb") as fp:
        head = fp.read(_PREAMBLE + len(_MAGIC))
        fp.seek(0)
        if head[_PREAMBLE:] == _MAGIC:
            try:
                return pydicom.dcmread(fp)
            except InvalidDicomError:
                return None
            except Exception as e:  # any parse failure is reported with its file
                raise DicomError(path, f"unreadable DICOM file ({type(e).__name__}: {e})") from e
        if len(head) < 4 or int.from_bytes(head[:2], "little") not in _HEADERLESS_GROUPS:
            return None
        # pydicom warns about what it makes of garbage (an "encoding" of random text, say):
        # held back until the dataset proves to be DICOM, else they would blame a file that
        # is skipped as not DICOM.
        with warnings.catch_warnings(record=True) as parse_warnings:
            warnings.simplefilter("always")
            try:
                ds = pydicom.dcmread(fp, force=True)
            except Exception:  # garbage that only looked like a tag
                return None
    if _SOP_CLASS_UID not in ds and _PIXEL_DATA not in ds:
        return None
    for w in parse_warnings:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    meta = ds.file_meta
    if "TransferSyntaxUID" not in meta:
        # pydicom decodes pixels by the transfer syntax only; without a meta group the
        # encoding the parse found is the syntax (bare datasets cannot be encapsulated).
        # Big endian is out: its first tag would read as group 0800 above.
        implicit, little = ds.original_encoding
        if little:
            meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


def _is_directory(ds: Dataset) -> bool:
    """A DICOMDIR: the index a CD or PACS export puts beside (or above) its images."""
    meta = getattr(ds, "file_meta", None) or {}
    return (
        meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage
        or _DIRECTORY_RECORDS in ds
    )


def _read_datasets(
    folder: Path, per_slice: Callable[[StoredSlice], _T]
) -> tuple[dict[Path, Dataset], list[_T]]:
    """Parse every DICOM file in `folder` once, decoding its pixels as it is read.

    Which files are DICOM is decided by content (`_read_dicom`), whatever their names. A
    DICOMDIR is skipped without a word: it indexes the images and holds none. Other files are
    skipped with one warning naming them all.

    Each file's slice goes to `per_slice` straight away and the dataset drops its pixel bytes
    then, so unless `per_slice` keeps them one file's bytes are alive at a time: holding them
    all until the headers are sorted costs as much memory as the volume, and the page faults
    to map it.

    Returns:
      The header datasets by path (sorted by name), and `per_slice` of each, in that order.

    Raises:
      DicomError: as `read_series` for a file; for the folder, no DICOM files (naming a
        sub-folder to pass instead where it has some: a dataset root or `train_images/`
        given for one study).
    """
    datasets, results, ignored, subfolders = {}, [], [], []
    first = None  # (path, [rows, columns]) of the first DICOM file
    # scandir: the listing says which entries are files, without a stat call per file.
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir():
            if not entry.name.startswith("."):  # .git, .ipynb_checkpoints: not studies
                subfolders.append(entry.name)
            continue
        if not entry.is_file():
            continue
        path = Path(entry.path)
        ds = _read_dicom(path)
        if ds is None:
            ignored.append(path.name)
            continue
        if _is_directory(ds):
            continue
        # Per-file checks first: a truncated header parses as a partial dataset, and "no
        # pixel data" names the culprit where a series UID comparison would not.
        if _PIXEL_DATA not in ds:
            raise DicomError(path, "no pixel data (not an image, or truncated)")
        if _optional_number(ds, "NumberOfFrames", 1, path) != 1:
            raise DicomError(path, "multi-frame images are not supported (one slice per file)")
        size = [
            _optional_number(ds, "Rows", None, path),
            _optional_number(ds, "Columns", None, path),
        ]
        if None in size:
            raise DicomError(path, "missing Rows/Columns")
        first = first or (path, size)
        if size != first[1]:
            raise DicomError(
                path, f"inconsistent Rows/Columns: {size} vs {first[1]} in {first[0].name}"
            )
        _check_image(ds, path, *size)
        results.append(per_slice(_decode(ds, path, int(size[0]), int(size[1]))))
        del ds[_PIXEL_DATA]
        datasets[path] = ds
    if not datasets and subfolders:  # the hint alone: files beside the studies are no news
        n = len(subfolders)
        raise DicomError(
            folder,
            f"no DICOM files here, but {n} sub-folder{'s' * (n > 1)} (one study each?): "
            f"pass one study's folder, e.g. {folder / subfolders[0]}",
        )
    # The error before the warning: a folder of other files alone is one line, not two.
    if not datasets:
        raise DicomError(folder, "no DICOM files")
    if ignored:
        warnings.warn(f"{folder}: ignoring non-DICOM files {ignored}", stacklevel=3)
    return datasets, results


def _slice_numbers(datasets: dict[Path, Dataset]) -> np.ndarray:
    """Each file's slice number: n when every file is named `<n>.dcm` or `<n>` (the RSNA
    layout, where the bounding boxes use n), else InstanceNumber.

    Names that number two files alike (`1.dcm` and `01.dcm`) say nothing: InstanceNumber then.
    """
    named = [_NUMBERED.fullmatch(p.name) for p in datasets]
    if all(named):
        numbers = [int(m[1]) for m in named]
        if len(set(numbers)) == len(numbers):
            return np.array(numbers, np.int64)
    numbers = {}
    for path, ds in datasets.items():
        number = _optional_number(ds, "InstanceNumber", None, path)
        if number is None:
            raise DicomError(path, "file not named by its slice number and no InstanceNumber")
        if number in numbers:  # the bounding boxes would not know which slice they mean
            raise DicomError(path, f"InstanceNumber {number:g} also in {numbers[number].name}")
        numbers[number] = path
    return np.array(list(numbers), np.int64)


def _check_same(paths: list[Path], values: np.ndarray, what: str, same) -> None:
    """Raises naming the first file whose row of `values` (n files, k) is not `same` as the
    first file's; same(values, values[0]) -> (n,) bool, over all files at once."""
    if (bad := np.flatnonzero(~same(values, values[0]))).size:
        i = bad[0]
        raise DicomError(
            paths[i],
            f"inconsistent {what}: {values[i].tolist()} vs {values[0].tolist()} in {paths[0].name}",
        )


def read_series(
    folder: str | os.PathLike, per_slice: Callable[[StoredSlice], _T]
) -> tuple[SeriesHeader, list[_T]]:
    """Read one CT series from a folder of DICOM files, handing each slice to `per_slice`.

    Each file is read from disk once, and its pixels decoded (any transfer syntax pydicom and
    its plugins decode) and passed to `per_slice` as it is read, in file name order; then the
    headers are validated and the slices sorted by position along the slice normal, most
    superior first. Files are DICOM by content, whatever their names (`_read_dicom`); a
    DICOMDIR is skipped, other files with a warning.

    Returns:
      (header, results): `per_slice` of every slice, in the header's (superior-first) order.

    Raises:
      DicomError: no DICOM files (with a hint where the folder holds sub-folders: one
        study's folder is wanted), several series or studies, missing or non-finite
        geometry, non-positive pixel spacing, cosines that are not an orthonormal frame,
        inconsistent orientation / pixel spacing / matrix size, duplicate positions,
        irregular slice gaps, a slice off the stack's line, fewer than two slices, missing
        or undecodable pixel data or pixel data of another size than the header says, an
        image that is not grey, an unsupported bit layout, an unusable rescale.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomError(folder, "not a directory")
    datasets, results = _read_datasets(folder, per_slice)
    paths = list(datasets)
    dss = list(datasets.values())

    for what, keyword in (("series", "SeriesInstanceUID"), ("studies", "StudyInstanceUID")):
        uids = sorted({_text(ds, keyword) for ds in dss})
        if len(uids) > 1:
            raise DicomError(folder, f"several {what} in one folder: {keyword} {uids}")
    if len(dss) < 2:
        raise DicomError(folder, "only one slice: a CT volume needs at least two")

    # Stacked only once every file has passed the value-count check below.
    positions = [_floats(ds, "ImagePositionPatient", p) for p, ds in datasets.items()]
    orientations = [_floats(ds, "ImageOrientationPatient", p) for p, ds in datasets.items()]
    pixel_spacings = [_floats(ds, "PixelSpacing", p) for p, ds in datasets.items()]
    for path, pos, ori, ps in zip(paths, positions, orientations, pixel_spacings, strict=True):
        if pos.shape != (3,) or ori.shape != (6,) or ps.shape != (2,):
            raise DicomError(
                path, "ImagePositionPatient/ImageOrientationPatient/PixelSpacing need 3/6/2 values"
            )
        if (ps <= 0).any():
            raise DicomError(path, f"PixelSpacing {ps.tolist()} is not positive")
        row, col = ori[:3], ori[3:]
        if max(abs(np.linalg.norm(row) - 1), abs(np.linalg.norm(col) - 1), abs(row @ col)) > (
            _ORTHONORMAL_ATOL
        ):
            raise DicomError(
                path, f"ImageOrientationPatient {ori.tolist()} is not two orthogonal unit vectors"
            )
    positions = np.stack(positions)
    _check_same(
        paths,
        np.stack(orientations),
        "ImageOrientationPatient",
        lambda v, first: np.isclose(v, first, atol=_ORIENTATION_ATOL, rtol=0).all(axis=1),
    )
    _check_same(
        paths,
        np.stack(pixel_spacings),
        "PixelSpacing",
        lambda v, first: np.isclose(v, first, rtol=1e-5).all(axis=1),
    )

    orientation = orientations[0]
    normal = np.cross(orientation[:3], orientation[3:])
    normal /= np.linalg.norm(normal)
    along = positions @ _slice_axis(normal)
    order = np.argsort(along, kind="stable")
    gaps = np.diff(along[order])
    names = [paths[i].name for i in order]
    if (dup := np.flatnonzero(gaps < _DUPLICATE_MM)).size:
        i = dup[0]
        raise DicomError(
            folder,
            f"duplicate slice position {positions[order[i]].tolist()} in "
            f"{names[i]} and {names[i + 1]}",
        )
    dz = float(np.median(gaps))
    if (bad := np.flatnonzero(np.abs(gaps - dz) > min(_GAP_REL * dz, _GAP_MM))).size:
        i = bad[0]
        raise DicomError(
            folder,
            f"inconsistent slice spacing: {gaps[i]:.4f} mm between "
            f"{names[i]} and {names[i + 1]}, median {dz:.4f} mm",
        )
    # Evenly spaced along the normal, each slice must also lie where the stack puts it
    # in-plane: the first slice's position plus k steps. One that does not (edited, or from
    # another reconstruction) would be misplaced by the volume's single affine.
    stack = positions[order]
    off = np.linalg.norm(stack - np.linspace(stack[0], stack[-1], len(stack)), axis=1)
    if (bad := np.flatnonzero(off > _GAP_MM)).size:
        i = bad[0]
        raise DicomError(
            paths[order[i]],
            f"ImagePositionPatient {stack[i].tolist()} is {off[i]:.3f} mm off the line "
            f"from {names[0]} to {names[-1]}",
        )

    rows, cols = (int(_optional_number(dss[0], k, None, paths[0])) for k in ("Rows", "Columns"))
    dy, dx = pixel_spacings[0]
    header = SeriesHeader(
        uid=_text(dss[0], "StudyInstanceUID") or folder.name,
        shape=(len(order), rows, cols),
        spacing=(dz, float(dy), float(dx)),
        positions=positions[order],
        orientation=orientation,
        slice_numbers=_slice_numbers(datasets)[order],
        files=tuple(paths[i] for i in order),
    )
    return header, [results[i] for i in order]


def _decode(ds: Dataset, path: Path, rows: int, cols: int) -> StoredSlice:
    return StoredSlice(
        path,
        _stored_pixels(ds, path, rows, cols),
        _optional_number(ds, "RescaleSlope", 1.0, path),
        _optional_number(ds, "RescaleIntercept", 0.0, path),
        _pixel_spacing(ds, path),
    )


def _pixel_spacing(ds: Dataset, path: Path) -> tuple[float, float] | None:
    """PixelSpacing as (dy, dx) mm, None where unusable: `read_series` checks it after every
    file is read, and says what is wrong in the order it checks the series."""
    try:
        values = _numbers(ds, "PixelSpacing", path)
    except DicomError:
        return None
    if values is None or len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        return None
    return float(values[0]), float(values[1])


def _stored_pixels(ds: Dataset, path: Path, rows: int, cols: int) -> np.ndarray:
    """(rows, cols) stored values of one single-frame slice, as pydicom's pixel_array gives them.

    Native little endian grey pixels are their own bytes: they are viewed in place, with the
    unused high bits corrected as pydicom does. pydicom's generic decoder costs ~0.4 ms a
    slice of set-up for that (more than parsing the file), so it is kept for the rest:
    encapsulated syntaxes, big endian, colour, bit-packed.
    """
    meta = getattr(ds, "file_meta", None) or {}
    syntax = meta.get("TransferSyntaxUID")
    bits, stored, signed, samples = (
        _optional_number(ds, keyword, default, path)
        for keyword, default in [
            ("BitsAllocated", 0),
            ("BitsStored", 0),
            ("PixelRepresentation", -1),
            ("SamplesPerPixel", 1),
        ]
    )
    if (
        syntax is not None
        and not syntax.is_encapsulated
        and syntax.is_little_endian
        and samples == 1
        and bits in (8, 16, 32)
        and 0 < stored <= bits
        and signed in (0, 1)
    ):
        bits, stored = int(bits), int(stored)
        dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
        data = ds.get_item(_PIXEL_DATA).value  # the bytes as read, without a conversion
        size = rows * cols * dtype.itemsize
        # Longer is as wrong as shorter: the header then misstates the image (only a pad
        # byte to an even length is allowed).
        if len(data) != size + size % 2:
            raise DicomError(
                path,
                f"cannot decode pixel data ({len(data)} bytes, expected "
                f"{rows * cols * dtype.itemsize} for {rows}x{cols} {bits}-bit pixels)",
            )
        pixels = np.frombuffer(data, dtype, rows * cols).reshape(rows, cols)
        if stored < bits:
            # The unused high bits may hold anything (overlays, in old files). Shifting them
            # out and back, as pydicom does, sign-extends signed values and zeroes them for
            # unsigned ones; where all values already lie in the stored range that changes
            # nothing, and two reductions are cheaper than two shifted copies.
            top = 1 << (stored - 1 if signed else stored)
            if (signed and pixels.min() < -top) or pixels.max() >= top:
                shift = bits - stored
                pixels = np.right_shift(np.left_shift(pixels, shift), shift)
        return pixels
    try:
        # view_only: native pixels are read in place instead of copied (ignored when the
        # syntax is encapsulated and has to be decoded anyway).
        pixels = pydicom.pixels.pixel_array(ds, view_only=True)
    except Exception as e:  # decoder errors vary by plugin; all are fatal
        raise DicomError(path, f"cannot decode pixel data ({type(e).__name__}: {e})") from e
    if pixels.shape != (rows, cols):
        raise DicomError(
            path,
            f"pixel array shape {pixels.shape}, expected "
            f"{(rows, cols)} (one grey sample per pixel)",
        )
    return pixels


def load_series(folder: str | os.PathLike) -> Series:
    """Read one CT series from a folder of DICOM files into a Series (HU, most superior first).

    `read_series`, then every slice rescaled into the output volume as HU = stored *
    RescaleSlope + RescaleIntercept (missing tags: 1 and 0).

    Raises:
      DicomError: as `read_series`.
    """
    header, stored = read_series(folder, lambda s: s)
    hu = np.empty(header.shape, np.float32)
    for k, s in enumerate(stored):
        s.rescale(s.pixels, out=hu[k])
    return Series(
        header.uid,
        hu,
        header.spacing,
        header.positions,
        header.orientation,
        header.slice_numbers,
        header.files,
    )
