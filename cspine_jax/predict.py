"""Study triage: DICOM folders -> fracture probabilities (JSON), a picture (PNG) and, on
request, DICOM results sent to a PACS.

    python -m cspine_jax.predict STUDY_DIR [STUDY_DIR ...] --workdir=RUN --out=OUT [--step=N]
        [--studies=DIR] [--dicom_out=DIR [--send=HOST:PORT --called_ae=AE [--calling_ae=AE]]]

Studies are the folders given, and with `--studies` every sub-folder of DIR (a folder of
study folders, as RSNA's `train_images/`). The run is loaded once for all of them. A study
that fails (not a readable CT series, a refused store) is reported in one line on stderr and
as a row of OUT/summary.csv with its error, and the others go on; the exit status is then 1.

Loads the run's best checkpoint (or `--step`), preprocesses the series exactly as the
training cache did, scores it with the run's whole-study predictor (`systems.get(config)`,
the code path of held-out evaluation) and writes
  OUT/<StudyInstanceUID>.json  `patient_overall`, `C1`..`C7` probabilities, the decisions
                               and run details;
  OUT/<StudyInstanceUID>.png   sagittal, coronal and axial views of the CT (bone window) with
                               the predicted vertebra labels and a fracture heat map
                               (`triage_figure`);
  OUT/summary.csv              one row per study: folder, uid, probabilities, suspected
                               levels, the paths written, the error (empty if none);
  DICOM_OUT/<SOPInstanceUID>.dcm  with `--dicom_out`: the SR, SEG and SC of the study
                               (`dicom_results`), sent to `--send` by C-STORE (`pacs`).

Decisions are the run's own: a level is `suspected` where its probability reaches the
decision threshold the run chose for it on its held-out fold (p >= t; `thresholds` in the
run's metrics.json, or its single `threshold` for every label, `evaluation.read_run_thresholds`).
A run without metrics.json (still training, or stopped) has none: every label then takes
`saliency.SUSPECT_THRESHOLD` (0.5), and the JSON's `thresholds_from` and a printed note say so.

The heat map is the gradient saliency (`saliency.FractureSaliency`) of the study fracture
logits of the suspected levels (else the most likely one) with respect to the input image,
computed chunk by chunk so memory stays bounded whatever the study length; it needs the
single model's slice logits, so a two-stage run is not supported. Errors (not a DICOM series,
no checkpoint, a metrics.json without thresholds) print one line and exit with status 1.

JSON: probabilities and `thresholds` (label -> decision threshold) in [0, 1];
`thresholds_from` (the run's metrics.json, or why the fallback); `suspected` (levels at or
above their threshold), `patient_overall_suspected`; `source_spacing_mm` (dz, dy, dx) and
`prepared_spacing_mm` (spacing_z, dy, dx) in mm, voxel order (z, y, x); `placement`, where
the model's grid lay on the source slices (`preprocess.Placement.to_json`: the spine found,
in source pixels); `picture_planes` in source voxel indices; times in seconds; with
`--dicom_out`, `dicom`: {"sr", "seg", "sc"} -> the DICOM files written.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from cspine_jax import (
    checkpoints,
    cli,
    dicom_results,
    evaluation,
    pacs,
    report,
    saliency,
    systems,
    triage_figure,
)
from cspine_jax.data import dicom, prepare, preprocess
from cspine_jax.data.rsna import LABEL_COLUMNS, VERTEBRAE
from cspine_jax.saliency import SUSPECT_THRESHOLD

# A study's failure is a row of the summary and the others go on: the errors a study's own
# data, or the PACS it goes to, can cause. Any other exception is a bug and stops the run.
STUDY_ERRORS = (*cli.USER_ERRORS, pacs.StoreError)
SUMMARY_COLUMNS = (
    "study",
    "uid",
    *LABEL_COLUMNS,
    "suspected",
    "json",
    "picture",
    *(f"dicom_{kind}" for kind in ("sr", "seg", "sc")),
    "error",
)


def decision_thresholds(workdir: str, step: int) -> tuple[dict[str, float], str]:
    """(label -> threshold, where they come from) for the run's `step`: the thresholds the
    run saved in its metrics.json, else `SUSPECT_THRESHOLD` for every label.

    Raises:
      evaluation.ThresholdsError: the run's metrics.json holds no usable thresholds.
    """
    saved = evaluation.read_run_thresholds(workdir)
    if saved is None:
        path = os.path.join(os.path.abspath(workdir), "metrics.json")
        return dict.fromkeys(LABEL_COLUMNS, SUSPECT_THRESHOLD), (
            f"fallback {SUSPECT_THRESHOLD}: {path} not found (the run has not finished)"
        )
    return saved.thresholds, saved.source(step)


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedRun:
    """A run's checkpoint ready to score studies: loaded once for any number of them.

    Attributes:
      workdir: the run folder (absolute).
      step: the checkpoint step loaded.
      predictor: the run's whole-study predictor (`systems.get(config).make_predictor`).
      explain: its fracture saliency (`saliency.FractureSaliency`).
      params: the run's preprocessing parameters (`prepare.preprocessing_params`).
      thresholds, thresholds_from: as `decision_thresholds`.
      seconds: how long loading took.
    """

    workdir: str
    step: int
    predictor: Any
    explain: saliency.FractureSaliency
    params: Mapping[str, Any]
    thresholds: dict[str, float]
    thresholds_from: str
    seconds: float


def load_run(workdir: str, step: int | None = None) -> LoadedRun:
    """Loads `workdir`'s best checkpoint (or `step`) and its decision thresholds.

    Raises:
      FileNotFoundError: `workdir` has no checkpoint (or not `step`).
      evaluation.ThresholdsError: the run's metrics.json holds no usable thresholds.
      TypeError: a model family without slice logits (two-stage): no saliency.
    """
    start = time.perf_counter()
    model, config, step = checkpoints.load_model(workdir, step)
    thresholds, thresholds_from = decision_thresholds(workdir, step)
    predictor = systems.get(config).make_predictor(model, config)
    return LoadedRun(
        workdir=os.path.abspath(workdir),
        step=int(step),
        predictor=predictor,
        explain=saliency.FractureSaliency(predictor),
        params=prepare.preprocessing_params(config.data),
        thresholds=thresholds,
        thresholds_from=thresholds_from,
        seconds=time.perf_counter() - start,
    )


def predict_study(
    study_dir: str,
    workdir: str,
    out_dir: str,
    step: int | None = None,
    *,
    run: LoadedRun | None = None,
    dicom_out: str | None = None,
) -> dict[str, object]:
    """Scores one DICOM series and writes `<uid>.json` and `<uid>.png` into `out_dir`, and
    with `dicom_out` its SR, SEG and SC (`dicom_results`) into that folder.

    run: `load_run(workdir, step)` done already (several studies); None loads it here.

    Returns:
      The JSON record: `patient_overall`, `C1`..`C7` probabilities, the decisions and run
      details; `json` and `picture`: the paths written; with `dicom_out`, `dicom`: {"sr",
      "seg", "sc"} -> path.

    Raises:
      dicom.DicomError: `study_dir` is not one readable CT series.
      FileNotFoundError: `workdir` has no checkpoint (or not `step`).
      evaluation.ThresholdsError: the run's metrics.json holds no usable thresholds.
    """
    start = time.perf_counter()
    timings = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 3)
        return now

    series = dicom.load_series(study_dir)
    t = lap("read", start)
    if run is None:
        run = load_run(workdir, step)
        t = lap("load_model", t)
    step, thresholds, thresholds_from = run.step, run.thresholds, run.thresholds_from
    params, predictor, explain = run.params, run.predictor, run.explain
    prepared = preprocess.prepare_series(series, **params)
    t = lap("preprocess", t)
    prediction = predictor(prepared.image)
    t = lap("predict", t)
    probs = prediction.probs
    suspected = probs >= np.array([thresholds[name] for name in LABEL_COLUMNS])
    levels = saliency.suspected_levels(probs, thresholds)
    heat = explain(prepared.image, levels, prediction)
    t = lap("saliency", t)
    views, planes = triage_figure.study_views(
        series, prepared, prediction.segmentation, heat, levels, params["windows"]
    )
    footnote = (
        f"checkpoint step {step} of {run.workdir}; "
        f"{series.hu.shape[0]} slices of {series.hu.shape[1]}x{series.hu.shape[2]}, "
        "spacing {:.2f} x {:.2f} x {:.2f} mm (z, y, x); research use only, "
        "not a diagnosis".format(*series.spacing)
    )
    fig = triage_figure.study_figure(
        series.uid, probs, levels, views, planes, series.spacing, footnote, thresholds
    )
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, dicom.file_stem(series.uid))
    report.save_png(fig, stem + ".png", dpi=150)
    t = lap("picture", t)
    written = {}
    if dicom_out is not None:
        triage = dicom_results.Triage(
            probs=probs,
            thresholds=thresholds,
            thresholds_from=thresholds_from,
            checkpoint_step=step,
            labels=triage_figure.source_labels(series, prepared, prediction.segmentation),
            # The PNG as written, so the DICOM picture is the same pixels.
            picture=np.asarray(Image.open(stem + ".png").convert("RGB")),
        )
        written = dicom_results.write_results(series, triage, dicom_out)
        lap("dicom", t)

    record: dict[str, object] = {
        name: float(p) for name, p in zip(LABEL_COLUMNS, probs, strict=True)
    }
    record.update(
        StudyInstanceUID=series.uid,
        suspected=[VERTEBRAE[i] for i in np.flatnonzero(suspected[1:])],
        patient_overall_suspected=bool(suspected[0]),
        thresholds=thresholds,
        thresholds_from=thresholds_from,
        checkpoint_step=step,
        workdir=run.workdir,
        num_slices=int(series.hu.shape[0]),
        source_spacing_mm=list(series.spacing),
        prepared_slices=int(prepared.image.shape[0]),
        prepared_spacing_mm=list(prepared.spacing),
        placement=prepared.placement.to_json(),
        picture_planes=planes,
        seconds=round(time.perf_counter() - start, 3),
        timings_s=timings,
        picture=os.path.abspath(stem + ".png"),
        json=os.path.abspath(stem + ".json"),
    )
    if written:
        record["dicom"] = written
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=2, allow_nan=False)
    return record


def _study_dirs(args: Sequence[str], studies: str | None) -> list[str]:
    """The study folders given as arguments, then every sub-folder of `studies` by name."""
    dirs = list(args)
    if studies is not None:
        if not os.path.isdir(studies):
            cli.fail("predict", f"--studies={studies}: no such folder")
        dirs += [
            entry.path
            for entry in sorted(os.scandir(studies), key=lambda e: e.name)
            if entry.is_dir() and not entry.name.startswith(".")
        ]
        if len(dirs) == len(args):
            cli.fail("predict", f"--studies={studies}: no study folders in it")
    return dirs


def _summary_row(study: str, record: Mapping[str, Any] | None, error: str) -> dict[str, str]:
    """One row of summary.csv (`SUMMARY_COLUMNS`); `record` None where the study failed
    before it was scored."""
    row = dict.fromkeys(SUMMARY_COLUMNS, "")
    row.update(study=os.path.abspath(study), uid=os.path.basename(os.path.normpath(study)))
    if record is not None:
        row.update({name: f"{record[name]:.6f}" for name in LABEL_COLUMNS})
        row.update(
            uid=record["StudyInstanceUID"],
            suspected=" ".join(record["suspected"]),
            json=record["json"],
            picture=record["picture"],
        )
        row.update({f"dicom_{kind}": path for kind, path in record.get("dicom", {}).items()})
    row["error"] = error
    return row


def write_summary(rows: Sequence[Mapping[str, str]], out_dir: str) -> str:
    """Writes `rows` as `out_dir`/summary.csv, atomically; returns its absolute path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(out_dir, "summary.csv"))
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".summary", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def main(argv: Sequence[str]) -> int:
    from absl import flags, logging
    from tqdm import tqdm

    FLAGS = flags.FLAGS
    studies = _study_dirs(argv[1:], FLAGS.studies)
    if not studies:
        print(
            "usage: python -m cspine_jax.predict STUDY_DIR [STUDY_DIR ...] --workdir=RUN "
            "--out=OUT (or --studies=DIR)",
            file=sys.stderr,
        )
        return 2
    peer = None
    if FLAGS.send is not None:
        if FLAGS.dicom_out is None:
            cli.fail("predict", "--send needs --dicom_out (the folder of the files it sends)")
        if not FLAGS.called_ae:
            cli.fail("predict", "--send needs --called_ae (the PACS's AE title)")
        try:
            peer = pacs.parse_peer(FLAGS.send)
        except ValueError as e:
            cli.fail("predict", f"--send: {e}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file it touches at INFO
    # A missing run or bad thresholds file: one line from `cli.run`, before any study.
    run = load_run(FLAGS.workdir, FLAGS.step)
    rows, failed = [], 0
    # tqdm.write keeps the bar (shown on a terminal, for several studies) below the lines.
    say = tqdm.write
    for study in tqdm(studies, desc="studies", unit="study", disable=len(studies) == 1 or None):
        record, error = None, ""
        try:
            record = predict_study(
                study, FLAGS.workdir, FLAGS.out, run=run, dicom_out=FLAGS.dicom_out
            )
            probs = "  ".join(f"{name} {record[name]:.3f}" for name in LABEL_COLUMNS)
            say(f"{record['StudyInstanceUID']}: {probs}  ({record['seconds']:.1f} s)")
            suspected = ", ".join(record["suspected"]) or "none"
            say(f"suspected levels: {suspected}; decision thresholds: {record['thresholds_from']}")
            say(f"wrote {record['json']}")
            say(f"wrote {record['picture']}")
            for kind, path in record.get("dicom", {}).items():
                say(f"wrote {path} (DICOM {kind.upper()})")
            if peer is not None:
                paths = list(record["dicom"].values())
                pacs.send(paths, *peer, FLAGS.called_ae, FLAGS.calling_ae, report=say)
        except STUDY_ERRORS as e:
            failed += 1
            error = " ".join(str(e).split())  # one line, as `cli.fail` prints it
            say(f"predict: error: {error}", file=sys.stderr)
        rows.append(_summary_row(study, record, error))
    say(f"wrote {write_summary(rows, FLAGS.out)}")
    if failed and len(studies) > 1:
        say(f"predict: {failed} of {len(studies)} studies failed", file=sys.stderr)
    return 1 if failed else 0


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Training run folder (its checkpoints/).", required=True)
    flags.DEFINE_string(
        "out", None, "Output folder for <uid>.json, <uid>.png and summary.csv.", required=True
    )
    flags.DEFINE_integer("step", None, "Checkpoint step; default: the best by val loss.")
    flags.DEFINE_string(
        "studies", None, "A folder of study folders (as train_images/): each is scored."
    )
    flags.DEFINE_string(
        "dicom_out", None, "Folder for each study's DICOM SR, SEG and SC (<SOPInstanceUID>.dcm)."
    )
    flags.DEFINE_string("send", None, "HOST:PORT of a PACS to C-STORE the DICOM results to.")
    flags.DEFINE_string("called_ae", None, "AE title of the PACS (with --send).")
    flags.DEFINE_string("calling_ae", pacs.CALLING_AE, "Our AE title (with --send).")


if __name__ == "__main__":
    _define_flags()
    cli.run(main, "predict")
