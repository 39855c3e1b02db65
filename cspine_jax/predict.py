"""Single-study triage: a DICOM folder -> fracture probabilities (JSON) and a picture (PNG).

    python -m cspine_jax.predict STUDY_DIR --workdir=RUN --out=OUT [--step=N]

Loads the run's best checkpoint (or `--step`), preprocesses the series exactly as the
training cache did, scores it with the run's whole-study predictor (`systems.get(config)`,
the code path of held-out evaluation) and writes
  OUT/<StudyInstanceUID>.json  `patient_overall`, `C1`..`C7` probabilities, the decisions
                               and run details;
  OUT/<StudyInstanceUID>.png   sagittal, coronal and axial views of the CT (bone window) with
                               the predicted vertebra labels and a fracture heat map
                               (`triage_figure`).

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
in source pixels); `picture_planes` in source voxel indices; times in seconds.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Sequence

import numpy as np

from cspine_jax import checkpoints, evaluation, report, saliency, systems, triage_figure
from cspine_jax.data import dicom, prepare, preprocess
from cspine_jax.data.rsna import LABEL_COLUMNS, VERTEBRAE
from cspine_jax.saliency import SUSPECT_THRESHOLD


def _file_stem(uid: str) -> str:
    # A uid falls back to the folder name, which may hold characters no file name should.
    return re.sub(r"[^\w.-]", "_", uid)


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


def predict_study(
    study_dir: str, workdir: str, out_dir: str, step: int | None = None
) -> dict[str, object]:
    """Scores one DICOM series and writes `<uid>.json` and `<uid>.png` into `out_dir`.

    Returns:
      The JSON record: `patient_overall`, `C1`..`C7` probabilities, the decisions and run
      details; `json` and `picture`: the paths written.

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
    model, config, step = checkpoints.load_model(workdir, step)
    thresholds, thresholds_from = decision_thresholds(workdir, step)
    t = lap("load_model", t)
    params = prepare.preprocessing_params(config.data)
    prepared = preprocess.prepare_series(series, **params)
    t = lap("preprocess", t)
    predictor = systems.get(config).make_predictor(model, config)
    # TypeError before the forward pass for a family without slice logits (two-stage).
    explain = saliency.FractureSaliency(predictor)
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
        f"checkpoint step {step} of {os.path.abspath(workdir)}; "
        f"{series.hu.shape[0]} slices of {series.hu.shape[1]}x{series.hu.shape[2]}, "
        "spacing {:.2f} x {:.2f} x {:.2f} mm (z, y, x); research use only, "
        "not a diagnosis".format(*series.spacing)
    )
    fig = triage_figure.study_figure(
        series.uid, probs, levels, views, planes, series.spacing, footnote, thresholds
    )
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, _file_stem(series.uid))
    report.save_png(fig, stem + ".png", dpi=150)
    lap("picture", t)

    record: dict[str, object] = {
        name: float(p) for name, p in zip(LABEL_COLUMNS, probs, strict=True)
    }
    record.update(
        StudyInstanceUID=series.uid,
        suspected=[VERTEBRAE[i] for i in np.flatnonzero(suspected[1:])],
        patient_overall_suspected=bool(suspected[0]),
        thresholds=thresholds,
        thresholds_from=thresholds_from,
        checkpoint_step=int(step),
        workdir=os.path.abspath(workdir),
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
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=2, allow_nan=False)
    return record


def main(argv: Sequence[str]) -> int:
    from absl import flags, logging

    if len(argv) != 2:
        print(
            f"usage: python -m cspine_jax.predict STUDY_DIR --workdir=RUN --out=OUT "
            f"(got {len(argv) - 1} positional arguments)",
            file=sys.stderr,
        )
        return 2
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file it touches at INFO
    # A bad study, run or thresholds file: one line from `cli.run`.
    record = predict_study(argv[1], flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.step)
    probs = "  ".join(f"{name} {record[name]:.3f}" for name in LABEL_COLUMNS)
    print(f"{record['StudyInstanceUID']}: {probs}  ({record['seconds']:.1f} s)")
    suspected = ", ".join(record["suspected"]) or "none"
    print(f"suspected levels: {suspected}; decision thresholds: {record['thresholds_from']}")
    print(f"wrote {record['json']}")
    print(f"wrote {record['picture']}")
    return 0


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Training run folder (its checkpoints/).", required=True)
    flags.DEFINE_string("out", None, "Output folder for <uid>.json and <uid>.png.", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step; default: the best by val loss.")


if __name__ == "__main__":
    from cspine_jax import cli

    _define_flags()
    cli.run(main, "predict")
