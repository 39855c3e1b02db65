"""Write a CT volume as a DICOM series, one CT Image Storage file per slice, as a scanner
would: what the phantoms and the tests feed the reader (`dicom`).

Every Type 1 and Type 2 attribute of the CT Image IOD's modules is present (Type 2 ones empty
where a phantom has no value: PatientName, StudyDate, KVP, ...), so `dciodvfy` finds no error
in a file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pydicom.pixels
from pydicom.dataset import Dataset, FileMetaDataset
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

from cspine_jax.data.dicom import DicomError, Series

# Stored value = HU - intercept, the usual CT convention.
_INTERCEPT = -1024.0
_BONE_WINDOW = (500.0, 2000.0)  # (center, width) HU
# Type 2 attributes of the CT Image IOD's modules a phantom has no value for: written empty.
_EMPTY_TYPE_2 = (
    "PatientName",  # Patient
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",  # General Study
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "PositionReferenceIndicator",  # Frame of Reference
    "Manufacturer",  # General Equipment
    "KVP",  # CT Image
)
# Encapsulated syntaxes that keep the stored integers exactly, so write -> load round-trips.
_LOSSLESS_ENCAPSULATED = frozenset(
    {RLELossless, JPEG2000Lossless, JPEGLSLossless, JPEGLossless, JPEGLosslessSV1}
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
        # Type 2: present, and empty where a phantom has no value (a viewer or PACS then
        # knows it is unknown rather than left out).
        for keyword in _EMPTY_TYPE_2:
            setattr(ds, keyword, None)
        ds.Modality = "CT"
        ds.BodyPartExamined = "CSPINE"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesNumber = 1
        ds.InstanceNumber = int(number)
        ds.PatientPosition = "HFS"
        ds.AcquisitionNumber = 1
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
