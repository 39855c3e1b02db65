"""The DICOM results of a triage (SR, SEG, SC) and their way to a PACS: valid for dciodvfy,
read back by highdicom with the values predict computed, stored in a real Orthanc; a failing
study or PACS is one line and exit status 1.

The CLI runs in subprocesses, as a user runs it, on a tiny checkpoint whose output layers are
drawn at random (`save_random_heads_run`: study probabilities spread over (0, 1), vertebrae
predicted), with saved thresholds of 0.5, over tiny phantoms.
"""

import csv
import json
import os
import subprocess
import sys

import highdicom as hd
import numpy as np
import portpicker
import pydicom
import pytest
from PIL import Image
from pydicom.sr.codedict import codes

from cspine_jax import dicom_results, pacs, predict, triage_figure
from cspine_jax.data import dicom, dicom_writer, phantom, preprocess
from cspine_jax.data.rsna import LABEL_COLUMNS, VERTEBRAE
from tests.dicom_checks import Orthanc, dciodvfy_errors
from tests.helpers import ROOT, save_random_heads_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny random-heads run whose metrics.json saved a threshold of 0.5 for every label."""
    workdir = tmp_path_factory.mktemp("run")
    save_random_heads_run(str(workdir))
    thresholds = dict.fromkeys(LABEL_COLUMNS, 0.5)
    (workdir / "metrics.json").write_text(
        json.dumps({"step": 2, "threshold": 0.5, "thresholds": thresholds})
    )
    return str(workdir)


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """(folder of study folders, the good study's folder, its Study with a vertebra mask,
    the broken study's folder: one slice truncated)."""
    root = tmp_path_factory.mktemp("train_images")
    good = phantom.generate_study(0, 0, "tiny", with_mask=True, with_boxes=False)
    good_dir = root / "a_good"
    dicom_writer.write_series(good_dir, good.series)
    broken_dir = root / "b_broken"
    dicom_writer.write_series(
        broken_dir, phantom.generate_study(1, 0, "tiny", with_mask=False, with_boxes=False).series
    )
    truncated = broken_dir / "5.dcm"
    truncated.write_bytes(truncated.read_bytes()[:700])
    return root, good_dir, good, broken_dir


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()
    assert server.process.returncode is not None


def _predict(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "cspine_jax.predict", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _one_line(result, *expected) -> str:
    """The whole of stderr of a failed predict: one line holding each of `expected`."""
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _sr_findings(path) -> dict[str, tuple[float, float, bool]]:
    """label -> (probability, threshold, suspected) of the SR's measurement groups."""
    sr = hd.sr.srread(path)
    sites = {
        (code.value, code.scheme_designator): name for name, code in dicom_results.SITES.items()
    }
    findings = {}
    for group in sr.content.get_image_measurement_groups():
        (site,) = group.finding_sites
        name = sites[(site.value.value, site.value.scheme_designator)]
        (p,) = group.get_measurements(name=dicom_results.FRACTURE_PROBABILITY)
        (t,) = group.get_measurements(name=dicom_results.DECISION_THRESHOLD)
        (decision,) = group.get_qualitative_evaluations(name=dicom_results.FRACTURE_SUSPECTED)
        assert decision.value in (codes.SCT.Yes, codes.SCT.No)
        findings[name] = (p.value, t.value, decision.value == codes.SCT.Yes)
    return findings


def _texts(items):
    """Every TextValue of an SR content tree (the algorithm's name, version, parameters)."""
    for item in items:
        if "TextValue" in item:
            yield item.TextValue
        yield from _texts(item.get("ContentSequence", []))


def _seg_labels(path, series: dicom.Series) -> np.ndarray:
    """(z, y, x) segment numbers of the SEG at `path`, frames matched to `series`' files."""
    seg = hd.seg.segread(path)
    for k, name in enumerate(VERTEBRAE, start=1):
        description = seg.get_segment_description(k)
        assert description.segment_label == name
        assert description.segmented_property_type == dicom_results.SITES[name]
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in series.files]
    return seg.get_pixels_by_source_instance(uids, combine_segments=True)


def test_phantom_ct_files_pass_dciodvfy(studies):
    _, good_dir, _, _ = studies
    assert dciodvfy_errors(good_dir / "1.dcm") == []


def test_results_are_valid_dicom_and_round_trip(studies, tmp_path):
    """SR, SEG and SC written from known values (the phantom's true vertebra mask as the
    labels): dciodvfy finds no error, and highdicom reads back each value, voxel for voxel."""
    _, good_dir, study, _ = studies
    series = dicom.load_series(good_dir)
    labels = np.where(study.labels_zyx <= 7, study.labels_zyx, 0).astype(np.uint8)
    assert set(np.unique(labels)) == set(range(8))
    rng = np.random.default_rng(0)
    triage = dicom_results.Triage(
        probs=np.linspace(0.05, 0.95, 8),
        thresholds=dict(zip(LABEL_COLUMNS, np.linspace(0.9, 0.1, 8).tolist(), strict=True)),
        thresholds_from="the test",
        checkpoint_step=7,
        labels=labels,
        picture=rng.integers(0, 256, (30, 50, 3), dtype=np.uint8),
    )
    out = tmp_path / "dicom"
    paths = dicom_results.write_results(series, triage, str(out))
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in paths.values())
    source = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    for path in paths.values():
        assert dciodvfy_errors(path) == [], path
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert os.path.basename(path) == f"{ds.SOPInstanceUID}.dcm"
        assert "research use only" in ds.SeriesDescription

    findings = _sr_findings(paths["sr"])
    assert list(findings) == list(LABEL_COLUMNS)
    suspected = triage.suspected()
    for name, p in zip(LABEL_COLUMNS, triage.probs, strict=True):
        np.testing.assert_allclose(findings[name][:2], (p, triage.thresholds[name]), rtol=1e-9)
        assert findings[name][2] == suspected[name]
    sr = pydicom.dcmread(paths["sr"])
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert {item.ReferencedSOPInstanceUID for item in evidence.ReferencedSOPSequence} == {
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in series.files
    }
    texts = set(_texts(sr.ContentSequence))
    assert {"cspine_jax", "checkpoint step 7", "thresholds: the test"} <= texts, texts

    np.testing.assert_array_equal(_seg_labels(paths["seg"], series), labels)
    seg = pydicom.dcmread(paths["seg"])
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    np.testing.assert_array_equal(pydicom.dcmread(paths["sc"]).pixel_array, triage.picture)


def test_sources_without_type_2_attributes_still_give_results(studies, tmp_path):
    """Many exports omit Type 2 attributes (absent, not empty); the results carry them empty
    and stay valid."""
    _, good_dir, study, _ = studies
    folder = tmp_path / "bare"
    folder.mkdir()
    for path in sorted(good_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        for keyword in ("PatientName", "StudyDate", "AccessionNumber", "ReferringPhysicianName"):
            delattr(ds, keyword)
        ds.save_as(folder / path.name)
    series = dicom.load_series(folder)
    triage = dicom_results.Triage(
        probs=np.full(8, 0.3),
        thresholds=dict.fromkeys(LABEL_COLUMNS, 0.5),
        thresholds_from="the test",
        checkpoint_step=1,
        labels=np.zeros(study.labels_zyx.shape, np.uint8),
        picture=np.zeros((8, 8, 3), np.uint8),
    )
    for path in dicom_results.write_results(series, triage, str(tmp_path / "dicom")).values():
        assert dciodvfy_errors(path) == [], path
        assert pydicom.dcmread(path).PatientName == ""


def test_writes_are_atomic(studies, tmp_path, monkeypatch):
    """A write that fails midway leaves no file behind, neither the target nor a temporary."""
    _, good_dir, _, _ = studies
    ds = pydicom.dcmread(good_dir / "1.dcm")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", fail)
    with pytest.raises(OSError, match="disk full"):
        dicom_results.save_atomically(ds, str(tmp_path / "x.dcm"))
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_several_studies_into_orthanc(env, run_dir, studies, orthanc, tmp_path):
    """Two studies in one call, one of them broken: the good one's JSON, picture and DICOM
    results (the SR's values the JSON's, the SEG predict's labels, the SC the PNG) reach a
    real Orthanc beside its CT; the broken one is a row of summary.csv with its error."""
    root, good_dir, _, broken_dir = studies
    series = dicom.load_series(good_dir)
    pacs.send([str(f) for f in series.files], "127.0.0.1", orthanc.dicom_port, orthanc.aet)
    out, dicom_out = tmp_path / "out", tmp_path / "dicom"
    result = _predict(
        env,
        f"--studies={root}",
        f"--workdir={run_dir}",
        f"--out={out}",
        f"--dicom_out={dicom_out}",
        f"--send=127.0.0.1:{orthanc.dicom_port}",
        f"--called_ae={orthanc.aet}",
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2, result.stderr
    assert errors[0].startswith("predict: error: ") and "5.dcm" in errors[0]
    assert errors[1] == "predict: 1 of 2 studies failed"

    with open(out / "summary.csv") as f:
        good, broken = csv.DictReader(f)
    assert list(good) == list(predict.SUMMARY_COLUMNS)
    assert broken["study"] == str(broken_dir) and "5.dcm" in broken["error"]
    assert broken["json"] == "" and broken["patient_overall"] == ""
    assert good["error"] == "" and good["uid"] == series.uid
    with open(good["json"]) as f:
        record = json.load(f)
    for name in LABEL_COLUMNS:
        assert float(good[name]) == pytest.approx(record[name], abs=1e-6)
    assert good["suspected"] == " ".join(record["suspected"])
    paths = record["dicom"]
    assert [good[f"dicom_{kind}"] for kind in ("sr", "seg", "sc")] == list(paths.values())
    assert sorted(os.listdir(dicom_out)) == sorted(os.path.basename(p) for p in paths.values())
    for path in paths.values():
        assert f"wrote {path}" in result.stdout
        stored = f"stored {path} at {orthanc.aet}@127.0.0.1:{orthanc.dicom_port}: status 0x0000"
        assert stored in result.stdout
        assert dciodvfy_errors(path) == [], path

    findings = _sr_findings(paths["sr"])
    for name in LABEL_COLUMNS:
        p, t, suspected = findings[name]
        assert p == pytest.approx(record[name], rel=1e-9)
        assert t == record["thresholds"][name]
        if name == "patient_overall":
            assert suspected == record["patient_overall_suspected"]
        else:
            assert suspected == (name in record["suspected"])
    # The labels predict computed: the run's segmentation on the source voxels (of a random
    # head, so maybe none; test_results_are_valid_dicom_and_round_trip has every vertebra).
    run = predict.load_run(run_dir)
    prepared = preprocess.prepare_series(series, **run.params)
    segmentation = run.predictor(prepared.image).segmentation
    expected = triage_figure.source_labels(series, prepared, segmentation)
    np.testing.assert_array_equal(_seg_labels(paths["seg"], series), expected)
    picture = np.asarray(Image.open(record["picture"]).convert("RGB"))
    np.testing.assert_array_equal(pydicom.dcmread(paths["sc"]).pixel_array, picture)

    (study,) = orthanc.get("/studies")
    assert orthanc.get(f"/studies/{study}")["MainDicomTags"]["StudyInstanceUID"] == series.uid
    series_of_study = orthanc.get(f"/studies/{study}/series")
    modalities = sorted(s["MainDicomTags"]["Modality"] for s in series_of_study)
    assert modalities == ["CT", "OT", "SEG", "SR"]


@pytest.mark.slow
@pytest.mark.parametrize("peer", ["closed port", "wrong called AE"])
def test_a_failed_send_is_one_line_and_keeps_the_files(
    env, run_dir, studies, orthanc, tmp_path, peer
):
    """Nothing listening, or a PACS refusing the association: one line naming the peer and
    what happened, exit status 1, the DICOM results complete in --dicom_out."""
    _, good_dir, _, _ = studies
    if peer == "closed port":
        port, called, expected = portpicker.pick_unused_port(), "ANY", "no association"
    else:
        port, called, expected = orthanc.dicom_port, "NOT_ORTHANC", "association rejected"
    dicom_out = tmp_path / "dicom"
    result = _predict(
        env,
        str(good_dir),
        f"--workdir={run_dir}",
        f"--out={tmp_path / 'out'}",
        f"--dicom_out={dicom_out}",
        f"--send=127.0.0.1:{port}",
        f"--called_ae={called}",
    )
    _one_line(result, "predict: error:", f"{called}@127.0.0.1:{port}", expected)
    files = os.listdir(dicom_out)
    assert len(files) == 3 and all(name.endswith(".dcm") for name in files), files
    with open(tmp_path / "out" / "summary.csv") as f:
        (row,) = csv.DictReader(f)
    assert expected in row["error"] and row["dicom_sr"]


@pytest.mark.slow
def test_a_folder_of_other_files_is_one_line(env, run_dir, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not a CT")
    result = _predict(env, str(notes), f"--workdir={run_dir}", f"--out={tmp_path / 'out'}")
    _one_line(result, "predict: error:", str(notes), "no DICOM files")


def test_send_flags_are_checked_before_the_run_loads(env, tmp_path):
    result = _predict(
        env, str(tmp_path), f"--workdir={tmp_path}", f"--out={tmp_path}", "--send=host:1"
    )
    _one_line(result, "predict: error:", "--send needs --dicom_out")
