"""Whole-study inference latency: DICOM files -> fracture probabilities, one study at a time.

    python benchmarks/inference_latency.py [--workdir RUN | --config configs/default.py]
        [--runs 5] [--index -1]

Writes one full-size phantom study (512x512, the seed-0 study whose slice count is nearest
300, uncompressed Explicit VR Little Endian) into a temporary folder, then times, per run,
  read        dicom.load_series: parse, sort and decode the files into HU
  preprocess  preprocess.prepare_series: resample to the model grid and window
  model       evaluation.StudyPredictor: every slice encoded in chunks, pooled, host<->device
as a user's `predict` pays them, minus its picture. One untimed run first compiles the model
and warms the page cache, so the numbers are steady-state. The model is a checkpoint of
`--workdir` if given, else a freshly initialised model of `--config` (same cost, random
weights). The last line is `study_latency_s_median=<median over runs of the sum of stages>`.
"""

import os
import platform
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from pydicom.uid import ExplicitVRLittleEndian

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cspine_jax import checkpoints, evaluation  # noqa: E402
from cspine_jax.data import dicom, dicom_writer, phantom, prepare, preprocess  # noqa: E402
from cspine_jax.models import single  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")
_TARGET_SLICES = 300
_CANDIDATES = 64  # seed-0 studies searched for the slice count nearest the target

config_flags.DEFINE_config_file(
    "config",
    os.path.normpath(_DEFAULT_CONFIG),
    "Config of the fresh model (ignored with --workdir).",
)
flags.DEFINE_string("workdir", "", "Training run whose best checkpoint is timed.")
flags.DEFINE_integer("runs", 5, "Timed runs; each stage reports its median.")
flags.DEFINE_integer("index", -1, "Phantom study index; -1: the one nearest 300 slices.")
FLAGS = flags.FLAGS


def _study_index() -> int:
    """The seed-0 full-size study with a 512x512 matrix and the slice count nearest 300."""
    shapes = {i: phantom.plan_study(i, 0, "full").grid.shape for i in range(_CANDIDATES)}
    usual = {i: s for i, s in shapes.items() if s[1:] == (512, 512)}
    return min(usual, key=lambda i: (abs(usual[i][0] - _TARGET_SLICES), i))


def _model():
    """(model, config, description) from --workdir, else a fresh model of --config."""
    if FLAGS.workdir:
        model, config, step = checkpoints.load_model(FLAGS.workdir)
        return model, config, f"checkpoint step {step} of {os.path.abspath(FLAGS.workdir)}"
    config = FLAGS.config
    return single.create_model(config, config.seed), config, "freshly initialised"


def _run_once(
    folder: str, params: dict, predictor: evaluation.StudyPredictor
) -> tuple[dict[str, float], int, int]:
    """Stage seconds of one study, its source slice count and its prepared slice count."""
    times = {}
    start = time.perf_counter()
    series = dicom.load_series(folder)
    times["read"] = time.perf_counter() - start
    start = time.perf_counter()
    prepared = preprocess.prepare_series(series, **params)
    times["preprocess"] = time.perf_counter() - start
    start = time.perf_counter()
    predictor(prepared.image)  # returns host arrays: the device work is finished
    times["model"] = time.perf_counter() - start
    return times, series.hu.shape[0], prepared.image.shape[0]


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    index = _study_index() if FLAGS.index < 0 else FLAGS.index
    model, config, source = _model()
    params = prepare.preprocessing_params(config.data)
    predictor = evaluation.StudyPredictor(model, config.data.context)
    with tempfile.TemporaryDirectory() as tmp:
        study = phantom.generate_study(index, 0, "full", with_mask=False, with_boxes=False)
        folder = os.path.join(tmp, study.series.uid)
        dicom_writer.write_series(folder, study.series, transfer_syntax=ExplicitVRLittleEndian)
        series_shape, spacing = study.series.hu.shape, study.series.spacing
        del study
        _run_once(folder, params, predictor)  # compile, warm the page cache
        runs = [_run_once(folder, params, predictor) for _ in range(FLAGS.runs)]
    stages = {name: np.array([r[0][name] for r in runs]) for name in runs[0][0]}
    totals = sum(stages.values())
    prepared_slices = runs[0][2]

    device = jax.devices()[0]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"jax {jax.__version__} on {device.platform} ({device.device_kind})"
    )
    print(
        f"model: {source}; {single.param_count(model):,} parameters; widths "
        f"{tuple(config.model.widths)}, depths {tuple(config.model.depths)}, "
        f"dtype {config.model.dtype}"
    )
    print(
        f"study: phantom full #{index}, {series_shape[0]} slices of "
        f"{series_shape[1]}x{series_shape[2]}, spacing "
        + " x ".join(f"{s:.2f}" for s in spacing)
        + " mm (z, y, x); uncompressed"
    )
    print(
        f"grid: {prepared_slices} x {params['grid']} x {params['grid']} "
        f"({params['spacing_z']} mm slices, {len(params['windows'])} windows), "
        f"context {config.data.context}, chunk {predictor.chunk}; {FLAGS.runs} runs"
    )
    print(f"{'stage':<12}{'median s':>10}{'min s':>9}{'max s':>9}")
    for name, values in [*stages.items(), ("total", totals)]:
        print(f"{name:<12}{np.median(values):>10.3f}{values.min():>9.3f}{values.max():>9.3f}")
    print(f"study_latency_s_median={np.median(totals):.3f}")


if __name__ == "__main__":
    app.run(main)
