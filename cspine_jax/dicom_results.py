"""One triaged study's results as DICOM objects of its study, for a PACS and its viewers.

Three objects, each a new series of the source study (its patient and study modules copied
from the source CT, the same StudyInstanceUID; new series and instance UIDs), each saying
it is research output (SeriesDescription; the SEG's ContentDescription, the SC's
ImageComments):

  SR   Comprehensive 3D SR, TID 1500 Measurement Report: one measurement group (TID 1501)
       per label, the patient (finding site: cervical spine) and C1..C7 (each vertebra), with
       the fracture probability and the run's decision threshold (unit "1") and whether a
       fracture is suspected (p >= threshold: SCT Yes / No); the algorithm (name
       `cspine_jax`, the package version, checkpoint step and where the thresholds come from)
       in each group; every source CT instance in its evidence (Current Requested
       Procedure Evidence Sequence). Not in a TID 1600 image library: highdicom builds one
       entry per slice at ~0.3 s each, minutes for a real study.
  SEG  Segmentation (BINARY) of the predicted vertebrae, segment k = Ck with its SCT code,
       on the source CT's own geometry: one frame per source slice holding a vertebra, each
       referencing the CT image it derives from.
  SC   the triage picture (`triage_figure`, the PNG predict writes) as a colour (RGB)
       Secondary Capture image.

The probability, threshold and decision concepts have no standard code: they are coded in
the private scheme `99CSPINEJAX` (DICOM's "99" prefix for local schemes). Files are named
`<SOPInstanceUID>.dcm` and written atomically: a temporary file in the same folder, renamed
into place, so a folder never holds a half-written object.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

import cspine_jax
from cspine_jax.data import dicom
from cspine_jax.data.rsna import LABEL_COLUMNS, VERTEBRAE

ALGORITHM = "cspine_jax"
MANUFACTURER = "cspine_jax (research software)"
# Fits a SeriesDescription (LO, 64 characters) after "cspine_jax <what>, ".
DISCLAIMER = "research use only, not for diagnosis"
_SCHEME = "99CSPINEJAX"
FRACTURE_PROBABILITY = hd.sr.CodedConcept("FRACPROB", _SCHEME, "Probability of fracture")
DECISION_THRESHOLD = hd.sr.CodedConcept("FRACTHRESH", _SCHEME, "Fracture decision threshold")
FRACTURE_SUSPECTED = hd.sr.CodedConcept("FRACSUSP", _SCHEME, "Fracture suspected")
# SNOMED CT 125605004 "Fracture of bone (disorder)": the finding each group is about.
FRACTURE = hd.sr.CodedConcept("125605004", "SCT", "Fracture of bone")
# Finding site of each label: the cervical spine for the patient, then C1 (atlas) .. C7.
SITES = {
    "patient_overall": codes.SCT.CervicalSpine,
    **{name: getattr(codes.SCT, f"{name}Vertebra") for name in VERTEBRAE},
}
# Series numbers of the three objects: after the source's usual 1..few.
_SERIES_NUMBERS = {"sr": 901, "seg": 902, "sc": 903}


@dataclasses.dataclass(frozen=True, eq=False)
class Triage:
    """What predict found in one study, as the DICOM results report it.

    Attributes:
      probs: (8,) float fracture probabilities `[patient_overall, C1..C7]`.
      thresholds: label -> decision threshold in [0, 1] (suspected where p >= threshold).
      thresholds_from: where the thresholds come from (the run's metrics.json, or why not).
      checkpoint_step: the checkpoint that scored the study.
      labels: (z, y, x) uint8 predicted vertebrae 0 (background), 1..7 (C1..C7) on the source
        CT's voxels, axis 0 in the series' (superior-first) order.
      picture: (rows, cols, 3) uint8 RGB triage picture.
    """

    probs: np.ndarray
    thresholds: Mapping[str, float]
    thresholds_from: str
    checkpoint_step: int
    labels: np.ndarray
    picture: np.ndarray

    def suspected(self) -> dict[str, bool]:
        """label -> probability at or above its threshold."""
        return {
            name: bool(p >= self.thresholds[name])
            for name, p in zip(LABEL_COLUMNS, self.probs, strict=True)
        }


def source_datasets(series: dicom.Series) -> list[Dataset]:
    """The source CT headers (no pixel data) in the series' slice order.

    Raises:
      ValueError: a series not read from files (`series.files` empty).
    """
    if not series.files:
        raise ValueError(f"Series {series.uid}: not read from files, nothing to reference")
    sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in series.files]
    for ds in sources:
        # Type 2 attributes of the patient and study modules the results copy: many exports
        # omit them rather than leave them empty; present and empty is what they mean.
        for keyword in _COPIED_TYPE_2:
            if keyword not in ds:
                setattr(ds, keyword, "")
    return sources


_COPIED_TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _algorithm_parameters(triage: Triage) -> list[str]:
    return [f"checkpoint step {triage.checkpoint_step}", f"thresholds: {triage.thresholds_from}"]


def _new_instance(kind: str) -> dict:
    """The keywords every result's constructor takes alike: a new series (its number by
    `kind`: "sr", "seg", "sc") holding one new instance, by this manufacturer."""
    return dict(
        series_instance_uid=hd.UID(),
        series_number=_SERIES_NUMBERS[kind],
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
    )


def structured_report(sources: Sequence[Dataset], triage: Triage) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 measurement report of `triage` on `sources` (the CT, slice order)."""
    algorithm = hd.sr.AlgorithmIdentification(
        name=ALGORITHM, version=cspine_jax.__version__, parameters=_algorithm_parameters(triage)
    )
    suspected = triage.suspected()
    groups = []
    for name, p in zip(LABEL_COLUMNS, triage.probs, strict=True):
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=hd.UID(), identifier=f"fracture {name}"
                ),
                finding_type=FRACTURE,
                algorithm_id=algorithm,
                finding_sites=[hd.sr.FindingSite(SITES[name])],
                measurements=[
                    hd.sr.Measurement(concept, float(value), codes.UCUM.NoUnits)
                    for concept, value in (
                        (FRACTURE_PROBABILITY, p),
                        (DECISION_THRESHOLD, triage.thresholds[name]),
                    )
                ],
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(
                        FRACTURE_SUSPECTED, codes.SCT.Yes if suspected[name] else codes.SCT.No
                    )
                ],
            )
        )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=ALGORITHM, model_name=cspine_jax.__version__
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=sources,
        content=report,
        **_new_instance("sr"),
        is_complete=True,
    )
    sr.SeriesDescription = f"{ALGORITHM} fracture SR, {DISCLAIMER}"
    return sr


def segmentation(sources: Sequence[Dataset], triage: Triage) -> hd.seg.Segmentation:
    """The predicted vertebrae C1..C7 of `triage` as a SEG on `sources` (the CT, slice order)."""
    if triage.labels.shape != (len(sources), sources[0].Rows, sources[0].Columns):
        raise ValueError(
            f"labels of shape {triage.labels.shape} for {len(sources)} slices of "
            f"{sources[0].Rows}x{sources[0].Columns}"
        )
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM,
        family=codes.DCM.ArtificialIntelligence,
        version=cspine_jax.__version__,
        parameters={"checkpoint step": str(triage.checkpoint_step)},
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=k,
            segment_label=name,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=SITES[name],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for k, name in enumerate(VERTEBRAE, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        # A label map with values 0..7 is split into one binary mask per segment.
        pixel_array=triage.labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        **_new_instance("seg"),
        manufacturer_model_name=ALGORITHM,
        software_versions=cspine_jax.__version__,
        device_serial_number="none",
        content_label="VERTEBRAE",
        content_description=f"predicted C1-C7, {DISCLAIMER}",
        # Every slice keeps a frame, empty or not: a study where the model finds no vertebra
        # still gets its (empty) segmentation.
        omit_empty_frames=False,
    )
    seg.SeriesDescription = f"{ALGORITHM} vertebrae, {DISCLAIMER}"
    return seg


def secondary_capture(sources: Sequence[Dataset], picture: np.ndarray) -> hd.sc.SCImage:
    """`picture` (rows, cols, 3) uint8 RGB as a Secondary Capture of the source study."""
    if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[2] != 3:
        raise ValueError(f"picture {picture.dtype} {picture.shape}: (rows, cols, 3) uint8 wanted")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=sources[0],
        pixel_array=picture,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=("F", "L"),  # replaced below: highdicom wants a value here
        **_new_instance("sc"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    # Three views side by side share no patient orientation along the picture's axes:
    # PatientOrientation (Type 2C) present and empty, for "unknown".
    sc.PatientOrientation = None
    sc.SeriesDescription = f"{ALGORITHM} triage picture, {DISCLAIMER}"
    sc.ImageComments = f"{ALGORITHM} {cspine_jax.__version__}: {DISCLAIMER}"
    # A body part that is not a paired structure: no Laterality needed (General Series).
    sc.BodyPartExamined = "CSPINE"
    sc.BurnedInAnnotation = "YES"  # probabilities and labels are drawn into the picture
    return sc


def save_atomically(ds: Dataset, path: str) -> str:
    """Writes `ds` (PS3.10 file) to `path` through a temporary file in the same folder, so
    `path` is either absent or complete; returns `path`."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            ds.save_as(f, enforce_file_format=True)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def write_results(series: dicom.Series, triage: Triage, out_dir: str) -> dict[str, str]:
    """Writes the SR, SEG and SC of `triage` on `series` into `out_dir` (created).

    Returns:
      {"sr", "seg", "sc"} -> absolute path of each file written.
    """
    sources = source_datasets(series)
    objects = {
        "sr": structured_report(sources, triage),
        "seg": segmentation(sources, triage),
        "sc": secondary_capture(sources, triage.picture),
    }
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for kind, ds in objects.items():
        name = dicom.file_stem(ds.SOPInstanceUID) + ".dcm"
        paths[kind] = save_atomically(ds, os.path.abspath(os.path.join(out_dir, name)))
    return paths
