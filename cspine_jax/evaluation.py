"""Whole-study inference and held-out evaluation, shared by training, evaluate.py and predict.

A study is scored from EVERY prepared slice, whatever their number: slices are encoded in
fixed-size chunks (one compiled program per chunk shape) and pooled once over a z length
rounded up to a bucket (a handful of compiled programs for all study lengths). The two-stage
baseline is scored alike (`baseline.predictor`): its segmenter reads every slice in chunks,
then its classifier reads the vertebra stacks that gives. Every run, of either family, ends in
`finish_run`, and `evaluate.py` reads a finished run back by the same `evaluate_run`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from tensorboardX import SummaryWriter

from cspine_jax import checkpoints, metrics, report, systems
from cspine_jax.data import cache, pipeline, rsna, sources
from cspine_jax.models.heads import label_grid
from cspine_jax.systems import Predictor, StudyPrediction

_Z_BUCKET = 64


def encode_chunks(encode, state, image: np.ndarray, chunk: int, context: int) -> list[np.ndarray]:
    """Every slice of a prepared study through the jitted `encode(state, (chunk, G, G, C))`,
    `chunk` slices at a time; its outputs concatenated along z (padding rows dropped)."""
    parts = []
    for start in range(0, image.shape[0], chunk):
        padded, centres = pipeline.chunk_inputs(image, start, chunk, context)
        parts.append([x[: len(centres)] for x in jax.device_get(encode(state, padded))])
    return [np.concatenate(x) for x in zip(*parts, strict=True)]


class StudyPredictor:
    """Compiled whole-study inference of the single model (process-local, any device count):
    a `systems.Predictor`."""

    def __init__(self, model: nnx.Module, context: int, chunk: int = 32):
        graphdef, state = nnx.split(model)
        self.graphdef, self.state = graphdef, jax.device_get(state)
        self.context, self.chunk = context, chunk

        def encode(state, images):
            seg, slice_logits, presence, _ = nnx.merge(graphdef, state).encode_slices(images)
            return jnp.argmax(seg, -1).astype(jnp.uint8), slice_logits, presence

        def pool(state, slice_logits, presence, valid):
            return jax.nn.sigmoid(nnx.merge(graphdef, state).pool(slice_logits, presence, valid))

        self._encode, self._pool = jax.jit(encode), jax.jit(pool)

    def __call__(self, image: np.ndarray) -> StudyPrediction:
        """image: (z', G, G, n_windows) uint8 prepared study -> its prediction."""
        z = image.shape[0]
        segmentation, logits_z, presence_z = encode_chunks(
            self._encode, self.state, image, self.chunk, self.context
        )
        length = -(-z // _Z_BUCKET) * _Z_BUCKET
        pad = ((0, length - z), (0, 0))
        valid = (np.arange(length) < z).astype(np.float32)
        probs = self._pool(
            self.state, np.pad(logits_z, pad)[None], np.pad(presence_z, pad)[None], valid[None]
        )
        return StudyPrediction(
            probs=np.asarray(probs[0], np.float32),
            slice_logits=logits_z,
            presence=presence_z,
            segmentation=segmentation,
        )


@dataclasses.dataclass(frozen=True)
class Predictions:
    """Outputs over a list of entries.

    Attributes:
      probs: (n, 8) probabilities `[patient_overall, C1..C7]` in entry order.
      confusion: (8, 8) voxel counts of true (rows) vs predicted (columns) vertebra labels
        over the entries with masks (all zero when none has one).
    """

    probs: np.ndarray
    confusion: np.ndarray


def predict_entries(
    predictor: Predictor, entries: Sequence[cache.Entry], progress: bool = True
) -> Predictions:
    """Whole-study predictions of every entry."""
    probs, confusion = [], np.zeros((8, 8), np.int64)
    for entry in tqdm.tqdm(entries, desc="evaluate", unit="study", disable=not progress):
        prediction = predictor(entry.image())
        probs.append(prediction.probs)
        if entry.has_mask:
            true = label_grid(np.asarray(entry.mask()), prediction.segmentation.shape[-1])
            true = np.where(true <= pipeline.NUM_VERTEBRAE, true, 0)  # thoracic: background
            confusion += metrics.label_confusion(true, prediction.segmentation)
    return Predictions(np.stack(probs), confusion)


def evaluate_entries(
    predictor: Predictor,
    entries: Sequence[cache.Entry],
    threshold: float | None = None,
    progress: bool = True,
) -> tuple[dict[str, float], Predictions]:
    """Every held-out metric of `entries` (all labelled) and the predictions behind them.

    `threshold` (patient_overall decision threshold) defaults to Youden's J on these
    studies themselves; pass the validation fold's to evaluate another set fairly.
    """
    predictions = predict_entries(predictor, entries, progress)
    y_true = np.stack([e.labels for e in entries])
    if threshold is None:
        threshold = metrics.youden_threshold(y_true, predictions.probs)
    values = metrics.study_metrics(y_true, predictions.probs, threshold)
    if predictions.confusion.any():
        values.update(metrics.dice_iou(predictions.confusion))
    return values, predictions


def format_table(values: dict[str, float]) -> str:
    """Metric name / value lines, for terminals and logs."""
    width = max(len(k) for k in values)
    return "\n".join(f"{k:<{width}}  {v:.4f}" for k, v in values.items())


def write_submission(
    path: str, uids: Sequence[str], probs: np.ndarray, row_ids: Sequence[str] | None = None
) -> None:
    """Kaggle-format CSV `row_id,fractured` with row_id `<uid>_<label>`.

    With `row_ids` (from a test.csv) exactly those rows, in that order; else 8 per study.
    """
    values = {
        f"{uid}_{name}": float(p)
        for uid, row in zip(uids, probs, strict=True)
        for name, p in zip(rsna.LABEL_COLUMNS, row, strict=True)
    }
    rows = list(values) if row_ids is None else list(row_ids)
    missing = [r for r in rows if r not in values]
    if missing:
        raise ValueError(f"no prediction for row_id(s) {missing[:3]}...")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row_id", "fractured"])
        writer.writerows((r, f"{values[r]:.6f}") for r in rows)


def evaluate_run(
    workdir: str,
    data_dir: str | None = None,
    out_dir: str | None = None,
    step: int | None = None,
    progress: bool = True,
    writer: SummaryWriter | None = None,
) -> dict[str, float]:
    """Restores a run's best (or `step`) checkpoint and evaluates it.

    Without `data_dir`: the run's own held-out fold, exactly as training reported it.
    With `data_dir`: every study of that RSNA-layout folder, prepared on the run's grid;
    labelled (train.csv) studies are scored with the decision threshold the run chose on its
    held-out fold, unlabelled (test.csv) ones only get a submission.
    Writes metrics.json, submission.csv and the report pictures into `out_dir`
    (default `workdir/eval`, or `workdir/eval-<folder name>` with `data_dir`); the pictures
    also into `writer` (default: a new one in `out_dir/tensorboard`).
    """
    model, config, step = checkpoints.load_model(workdir, step)
    predictor = systems.get(config).make_predictor(model, config)
    threshold = None
    if data_dir is None:
        _, entries = sources.split_entries(
            cache.read_entries(sources.prepared_cache(config.data, progress=progress)),
            config.data,
            config.seed,
        )
    else:
        data_config = config.data.copy_and_resolve_references()
        data_config.update(dir=os.path.abspath(data_dir), cache_dir="")
        entries = cache.read_entries(sources.prepared_cache(data_config, progress=progress))
        run_metrics = os.path.join(workdir, "metrics.json")
        if os.path.exists(run_metrics):
            with open(run_metrics) as f:
                threshold = json.load(f)["threshold"]
    name = "eval" if data_dir is None else f"eval-{os.path.basename(os.path.abspath(data_dir))}"
    out_dir = out_dir or os.path.join(workdir, name)
    os.makedirs(out_dir, exist_ok=True)

    labelled = all(e.labels is not None for e in entries)
    if labelled:
        values, predictions = evaluate_entries(predictor, entries, threshold, progress)
        values = {"step": float(step), **values}
        y_true = np.stack([e.labels for e in entries])
        own_writer = writer is None
        if own_writer:
            writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        report.write_report(
            out_dir, y_true, predictions.probs, predictions.confusion, writer=writer, step=step
        )
        if own_writer:
            writer.close()
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(values, f, indent=1)
    else:
        predictions, values = predict_entries(predictor, entries, progress), {}
    row_ids = None
    test_csv = os.path.join(data_dir or "", "test.csv")
    if data_dir is not None and os.path.exists(test_csv):
        with open(test_csv, newline="") as f:
            row_ids = [row["row_id"] for row in csv.DictReader(f)]
    write_submission(
        os.path.join(out_dir, "submission.csv"),
        [e.uid for e in entries],
        predictions.probs,
        row_ids,
    )
    return values
