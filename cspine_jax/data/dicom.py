"""DICOM CT series: read an RSNA study folder into a Hounsfield volume, and write one back.

A study folder holds one axial CT series as `<n>.dcm` files, one slice per file. The file
number `n` is what the RSNA bounding-box CSV calls `slice_number`; it says nothing about
anatomy (some studies are numbered from the feet up), so slices are ordered by geometry:
ImagePositionPatient projected on the slice normal, most superior first.

Coordinates are DICOM patient coordinates (LPS, mm: x to the patient's left, y posterior,
z superior). Volumes are (z, y, x): axis 0 slices, axis 1 image rows, axis 2 image columns.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.pixels
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import DSfloat

# Positions closer than this along the normal are the same slice written twice.
_DUPLICATE_MM = 1e-3
# Gaps may deviate from the median by 10% or 0.1 mm, whichever is smaller; beyond that a
# slice is missing or the series mixes reconstructions, and a regular grid would lie.
_GAP_REL, _GAP_MM = 0.10, 0.1
# Scanners write direction cosines with ~6 decimals; differences beyond this are real.
_ORIENTATION_ATOL = 1e-4

# Stored value = HU - intercept, the usual CT convention.
_INTERCEPT = -1024.0
_BONE_WINDOW = (500.0, 2000.0)  # (center, width) HU
# Encapsulated syntaxes that keep the stored integers exactly, so write -> load round-trips.
_LOSSLESS_ENCAPSULATED = frozenset(
    {RLELossless, JPEG2000Lossless, JPEGLSLossless, JPEGLossless, JPEGLosslessSV1}
)


class DicomError(ValueError):
    """A DICOM folder or file that cannot be read as one CT volume; message `<path>: <problem>`."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {' '.join(str(problem).split())}")


@dataclasses.dataclass(frozen=True, eq=False)
class Series:
    """One CT volume with its patient geometry.

    Attributes:
      uid: StudyInstanceUID (the RSNA study id).
      hu: (z, y, x) float32 Hounsfield units; axis 0 runs from the most superior slice down.
      spacing: (dz, dy, dx) mm; dz is the distance between slice positions along the normal,
        dy the row spacing (between rows), dx the column spacing (between columns).
      positions: (z, 3) float64 ImagePositionPatient (LPS mm) of each slice, in hu's order.
      orientation: (6,) float64 ImageOrientationPatient: row direction (the direction of
        increasing x index), then column direction (increasing y index).
      slice_numbers: (z,) int64 file number n of `n.dcm` for each slice, in hu's order.
    """

    uid: str
    hu: np.ndarray
    spacing: tuple[float, float, float]
    positions: np.ndarray
    orientation: np.ndarray
    slice_numbers: np.ndarray

    def __post_init__(self):
        coerced = {
            "hu": np.asarray(self.hu, np.float32),
            "spacing": tuple(float(s) for s in self.spacing),
            "positions": np.asarray(self.positions, np.float64),
            "orientation": np.asarray(self.orientation, np.float64),
            "slice_numbers": np.asarray(self.slice_numbers, np.int64),
        }
        for name, value in coerced.items():
            object.__setattr__(self, name, value)
        z = self.hu.shape[0] if self.hu.ndim == 3 else -1
        expected = {
            "hu": (self.hu.ndim, 3),
            "spacing": (len(self.spacing), 3),
            "positions": (self.positions.shape, (z, 3)),
            "orientation": (self.orientation.shape, (6,)),
            "slice_numbers": (self.slice_numbers.shape, (z,)),
        }
        for name, (got, want) in expected.items():
            if got != want:
                raise ValueError(f"Series {self.uid}: {name} has shape/ndim {got}, expected {want}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(z, y, x) voxels."""
        return self.hu.shape

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


def _slice_axis(normal: np.ndarray) -> np.ndarray:
    """The unit normal signed to point inferior (patient z decreasing): axis 0's direction.

    A normal with no z component (sagittal or coronal slices) keeps the order -normal.
    """
    return normal if normal[2] < 0 else -normal


def _floats(ds: Dataset, keyword: str, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or value == "":
        raise DicomError(path, f"missing {keyword}")
    try:
        return np.asarray(value, np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise DicomError(path, f"unreadable {keyword} {value!r}: {e}") from None


def _optional_float(ds: Dataset, keyword: str, default: float, path: Path) -> float:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DicomError(path, f"unreadable {keyword} {value!r}") from None


def _read_datasets(folder: Path) -> dict[Path, Dataset]:
    """Parse every `*.dcm` file in `folder` once (pixel bytes kept, not decoded)."""
    datasets, ignored = {}, []
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.suffix.lower() != ".dcm":
            ignored.append(path.name)
            continue
        try:
            datasets[path] = pydicom.dcmread(path)
        except InvalidDicomError:
            ignored.append(path.name)
        except Exception as e:  # any parse failure is reported with its file
            raise DicomError(path, f"unreadable DICOM file ({type(e).__name__}: {e})") from e
    if ignored:
        warnings.warn(f"{folder}: ignoring non-DICOM files {ignored}", stacklevel=3)
    if not datasets:
        raise DicomError(folder, "no DICOM files (*.dcm)")
    return datasets


def _slice_numbers(datasets: dict[Path, Dataset]) -> np.ndarray:
    """The n of each n.dcm, or InstanceNumber when the files are not named by number."""
    if all(p.stem.isdigit() for p in datasets):
        return np.array([int(p.stem) for p in datasets], np.int64)
    numbers = []
    for path, ds in datasets.items():
        if ds.get("InstanceNumber") in (None, ""):
            raise DicomError(path, "file not named <n>.dcm and no InstanceNumber")
        numbers.append(int(ds.InstanceNumber))
    return np.array(numbers, np.int64)


def _check_same(paths: list[Path], values: list, what: str, equal) -> None:
    for path, value in zip(paths[1:], values[1:], strict=True):
        if not equal(value, values[0]):
            raise DicomError(
                path,
                f"inconsistent {what}: {np.asarray(value).tolist()} vs "
                f"{np.asarray(values[0]).tolist()} in {paths[0].name}",
            )


def load_series(folder: str | os.PathLike) -> Series:
    """Read one CT series from a folder of `<n>.dcm` files into a Series (HU, most superior first).

    Each file is read from disk once: headers are parsed and validated, the slices sorted by
    position along the slice normal, then pixels decoded (any transfer syntax pydicom and its
    plugins decode) straight into the output volume as HU = stored * RescaleSlope +
    RescaleIntercept (missing tags: 1 and 0). Other files are skipped with a warning.

    Raises:
      DicomError: no DICOM files, several series, missing geometry or pixel data,
        inconsistent orientation / pixel spacing / matrix size, duplicate positions,
        irregular slice gaps, fewer than two slices, undecodable pixel data.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomError(folder, "not a directory")
    datasets = _read_datasets(folder)
    paths = list(datasets)
    dss = list(datasets.values())

    # Per-file checks first: a truncated header parses as a partial dataset, and "no pixel
    # data" names the culprit where a series UID comparison would not.
    for path, ds in datasets.items():
        if "PixelData" not in ds:
            raise DicomError(path, "no pixel data (not an image, or truncated)")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise DicomError(path, "multi-frame images are not supported (one slice per file)")
    series_uids = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in dss})
    if len(series_uids) > 1:
        raise DicomError(folder, f"several series in one folder: SeriesInstanceUID {series_uids}")
    if len(dss) < 2:
        raise DicomError(folder, "only one slice: a CT volume needs at least two")

    positions = np.stack([_floats(ds, "ImagePositionPatient", p) for p, ds in datasets.items()])
    orientations = [_floats(ds, "ImageOrientationPatient", p) for p, ds in datasets.items()]
    pixel_spacings = [_floats(ds, "PixelSpacing", p) for p, ds in datasets.items()]
    for path, pos, ori, ps in zip(paths, positions, orientations, pixel_spacings, strict=True):
        if pos.shape != (3,) or ori.shape != (6,) or ps.shape != (2,):
            raise DicomError(
                path, "ImagePositionPatient/ImageOrientationPatient/PixelSpacing need 3/6/2 values"
            )
    _check_same(
        paths,
        orientations,
        "ImageOrientationPatient",
        lambda a, b: np.allclose(a, b, atol=_ORIENTATION_ATOL, rtol=0),
    )
    _check_same(paths, pixel_spacings, "PixelSpacing", lambda a, b: np.allclose(a, b, rtol=1e-5))
    _check_same(
        paths,
        [(ds.get("Rows"), ds.get("Columns")) for ds in dss],
        "Rows/Columns",
        lambda a, b: a == b,
    )

    orientation = orientations[0]
    normal = np.cross(orientation[:3], orientation[3:])
    if not np.isfinite(normal).all() or np.linalg.norm(normal) < 0.5:
        raise DicomError(paths[0], f"degenerate ImageOrientationPatient {orientation.tolist()}")
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

    rows, cols = int(dss[0].Rows), int(dss[0].Columns)
    hu = np.empty((len(order), rows, cols), np.float32)
    for k, i in enumerate(order):
        ds = dss[i]
        try:
            # view_only: native pixels are read in place instead of copied (ignored when
            # the syntax is encapsulated and has to be decoded anyway).
            pixels = pydicom.pixels.pixel_array(ds, view_only=True)
        except Exception as e:  # decoder errors vary by plugin; all are fatal
            raise DicomError(paths[i], f"cannot decode pixel data ({type(e).__name__}: {e})") from e
        if pixels.shape != (rows, cols):
            raise DicomError(
                paths[i],
                f"pixel array shape {pixels.shape}, expected "
                f"{(rows, cols)} (one grey sample per pixel)",
            )
        slope = np.float32(_optional_float(ds, "RescaleSlope", 1.0, paths[i]))
        intercept = np.float32(_optional_float(ds, "RescaleIntercept", 0.0, paths[i]))
        # One pass over the slice when the slope is 1 (the usual CT case).
        if slope == 1:
            np.add(pixels, intercept, out=hu[k])
        else:
            np.multiply(pixels, slope, out=hu[k])
            hu[k] += intercept
        # Drop the pixel bytes now: holding every file's bytes to the end doubles peak memory.
        del ds.PixelData

    dy, dx = pixel_spacings[0]
    return Series(
        uid=str(dss[0].get("StudyInstanceUID") or folder.name),
        hu=hu,
        spacing=(dz, float(dy), float(dx)),
        positions=positions[order],
        orientation=orientation,
        slice_numbers=_slice_numbers(datasets)[order],
    )


def _ds(values) -> list[DSfloat]:
    # DS strings are limited to 16 characters; auto_format rounds instead of failing to write.
    return [DSfloat(float(v), auto_format=True) for v in np.ravel(values)]


def write_series(
    folder: str | os.PathLike,
    series: Series,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    unsigned: bool = False,
) -> None:
    """Write `series` as a scanner would: one CT Image Storage file `<n>.dcm` per slice.

    Stored value = round(HU + 1024) clipped to the storage range: int16 (BitsStored 16) or,
    with `unsigned`, uint16 with BitsStored 12 (HU -1024..3071). RescaleIntercept -1024,
    slope 1. UIDs are derived deterministically from the study uid. Files of the same name
    in `folder` are overwritten; other files are left alone.

    Args:
      folder: output folder (created).
      series: the volume; slice i goes to `{series.slice_numbers[i]}.dcm` at positions[i].
      transfer_syntax: Explicit/Implicit VR Little Endian, or a lossless encapsulated syntax
        with an encoder here (RLE Lossless always; JPEG 2000 Lossless with pylibjpeg-openjpeg;
        JPEG-LS / JPEG Lossless only where a plugin provides one).
      unsigned: store uint16 (PixelRepresentation 0) instead of int16.

    Raises:
      DicomError: unsupported transfer syntax, or an encoder plugin is missing.
      ValueError: non-finite HU values.
    """
    folder = Path(folder)
    ts = UID(transfer_syntax)
    if not ts.is_transfer_syntax:
        raise DicomError(folder, f"{ts} is not a transfer syntax UID")
    if ts.is_encapsulated:
        if ts not in _LOSSLESS_ENCAPSULATED:
            raise DicomError(
                folder,
                f"cannot write {ts.name}: only lossless syntaxes keep the "
                "stored values (RLE, JPEG 2000 / JPEG-LS / JPEG Lossless)",
            )
        try:
            encoder = pydicom.pixels.get_encoder(ts)
        except NotImplementedError:
            raise DicomError(folder, f"pydicom has no encoder for {ts.name}") from None
        if not encoder.is_available:
            raise DicomError(
                folder, f"no encoder plugin installed for {ts.name}: {encoder.missing_dependencies}"
            )
    elif not ts.is_little_endian or ts.is_deflated:
        raise DicomError(
            folder,
            f"cannot write {ts.name}: use a little endian or lossless encapsulated transfer syntax",
        )
    if not np.isfinite(series.hu).all():
        raise ValueError(f"Series {series.uid}: non-finite HU values")

    dtype, bits, lo, hi = (np.uint16, 12, 0, 4095) if unsigned else (np.int16, 16, -32768, 32767)
    stored = np.clip(np.rint(series.hu - _INTERCEPT), lo, hi).astype(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid(entropy_srcs=[series.uid, "series"])
    frame_uid = generate_uid(entropy_srcs=[series.uid, "frame of reference"])
    for pos, number, pixels in zip(series.positions, series.slice_numbers, stored, strict=True):
        sop_uid = generate_uid(entropy_srcs=[series.uid, "slice", str(number)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if ts.is_encapsulated else ts
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = series.uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientID = series.uid
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesNumber = 1
        ds.InstanceNumber = int(number)
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = _ds(pos)
        ds.ImageOrientationPatient = _ds(series.orientation)
        ds.SliceLocation = _ds(pos[2])[0]
        ds.SliceThickness = _ds(series.spacing[0])[0]
        ds.PixelSpacing = _ds(series.spacing[1:])
        ds.RescaleIntercept = _ds(_INTERCEPT)[0]
        ds.RescaleSlope = _ds(1.0)[0]
        ds.RescaleType = "HU"
        ds.WindowCenter = _ds(_BONE_WINDOW[0])[0]
        ds.WindowWidth = _ds(_BONE_WINDOW[1])[0]
        ds.set_pixel_data(pixels, "MONOCHROME2", bits, generate_instance_uid=False)
        if ts.is_encapsulated:
            ds.compress(ts, generate_instance_uid=False)
        ds.save_as(folder / f"{number}.dcm", enforce_file_format=True)
