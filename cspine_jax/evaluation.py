"""Whole-study inference and held-out evaluation, shared by training, evaluate.py and predict.

A study is scored from EVERY prepared slice, whatever their number: slices are encoded in
fixed-size chunks (one compiled program per chunk shape) and pooled once over a z length
rounded up to a bucket (a handful of compiled programs for all study lengths). The two-stage
baseline is scored alike (`baseline.predictor`): its segmenter reads every slice in chunks,
then its classifier reads the vertebra stacks that gives. Every run, of either family, ends in
`finish_run`, and `evaluate.py` reads a finished run back by the same `evaluate_run`.

Decisions use one threshold per label, chosen on the run's held-out fold (Youden's J,
`metrics.decision_thresholds`) and saved in its metrics.json; other studies are scored with
those (`read_run_thresholds`). metrics.json is strict JSON (`metrics_json`): an undefined
value is null, with the reason under `undefined`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from tensorboardX import SummaryWriter

from cspine_jax import checkpoints, metrics, report, systems
from cspine_jax.data import cache, pipeline, rsna, sources
from cspine_jax.metrics import ThresholdsError
from cspine_jax.models.heads import label_grid
from cspine_jax.systems import Predictor, StudyPrediction

_Z_BUCKET = 64
HELD_OUT = "held-out fold"  # `thresholds_from` of thresholds chosen on the run's held-out fold


def encode_chunks(encode, state, image: np.ndarray, chunk: int, context: int) -> list[np.ndarray]:
    """Every slice of a prepared study through the jitted `encode(state, (chunk, G, G, C))`,
    `chunk` slices at a time; its outputs concatenated along z (padding rows dropped)."""
    parts = []
    for start in range(0, image.shape[0], chunk):
        padded, centres = pipeline.chunk_inputs(image, start, chunk, context)
        parts.append([x[: len(centres)] for x in jax.device_get(encode(state, padded))])
    return [np.concatenate(x) for x in zip(*parts, strict=True)]


def pad_z(x: np.ndarray, length: int) -> np.ndarray:
    """Zero rows appended along z (axis 0) up to `length`."""
    return np.pad(x, [(0, length - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def z_axes(num_slices: int) -> tuple[np.ndarray, np.ndarray]:
    """(valid, position), each (L,) float32, of a study of `num_slices` slices padded to L,
    its length rounded up to `_Z_BUCKET`: 1 on its slices and 0 on the padding; each row's
    position in prepared slices (0 at the most superior)."""
    length = -(-num_slices // _Z_BUCKET) * _Z_BUCKET
    valid = (np.arange(length) < num_slices).astype(np.float32)
    return valid, np.arange(length, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class SinglePrediction(StudyPrediction):
    """A `StudyPrediction` of the single model with the per-slice outputs behind it, on the
    host, so that the saliency differentiates the same forward pass instead of running
    the encoder and z-context over the study a second time.

    Attributes:
      pixels: (z', h, w, 9) float16 each slice's pixel logits (8 classes, before z-context)
        and, last, its fracture map logits (`SingleModel.encode_slices`).
      embedding: (z', F) float32 slice embeddings, z-context's input.
      level_logits: (z', 7) float32 z-context level logits of C1..C7.
      context_fracture: (z', 7) float32 z-context fracture logits of C1..C7.
    """

    pixels: np.ndarray
    embedding: np.ndarray
    level_logits: np.ndarray
    context_fracture: np.ndarray


class StudyPredictor:
    """Compiled whole-study inference of the single model (process-local, any device count):
    a `systems.Predictor` whose predictions are `SinglePrediction`s.

    The model's three parts run as four programs (`models.single`): the per-slice encoder
    over chunks of `chunk` slices, z-context once over every slice, `locate` over chunks
    again, and the pool. Between them the pixel logits wait on the host in float16
    (z' x h x w x 9 values: 8 MB for a demo study, ~0.6 GB for 1,000 slices at h = 192),
    and stay in the prediction for the saliency. z-context and the pool run on the study's
    length rounded up to `_Z_BUCKET` (`z_axes`), so a handful of programs serve every study.
    """

    def __init__(self, model: nnx.Module, context: int, chunk: int = 32):
        graphdef, state = nnx.split(model)
        self.graphdef, self.state = graphdef, jax.device_get(state)
        self.context, self.chunk = context, chunk

        def encode(state, images):
            out = nnx.merge(graphdef, state).encode_slices(images)
            pixels = jnp.concatenate([out["pixel_logits"], out["fracture_logits"][..., None]], -1)
            return pixels.astype(jnp.float16), out["embedding"]

        def z_context(state, embedding, z, valid):
            level, fracture = nnx.merge(graphdef, state).context(
                embedding[None], z[None], valid[None]
            )
            return level[0], fracture[0]

        def locate(state, pixels, level, context_fracture):
            pixels = pixels.astype(jnp.float32)
            seg, slice_logits, presence = nnx.merge(graphdef, state).locate(
                pixels[..., :-1], pixels[..., -1], level, context_fracture
            )
            return jnp.argmax(seg, -1).astype(jnp.uint8), slice_logits, presence

        def pool(state, slice_logits, presence, valid):
            return jax.nn.sigmoid(nnx.merge(graphdef, state).pool(slice_logits, presence, valid))

        self.encode, self.context_fn = jax.jit(encode), jax.jit(z_context)
        self._locate, self._pool = jax.jit(locate), jax.jit(pool)

    def chunk_rows(self, x: np.ndarray, start: int, num_slices: int) -> np.ndarray:
        """Rows start .. start + chunk of `x` that are slices of the study (of `num_slices`),
        zero-padded to `chunk` rows: one compiled program serves every chunk."""
        return pad_z(x[start : min(start + self.chunk, num_slices)], self.chunk)

    def __call__(self, image: np.ndarray) -> SinglePrediction:
        """image: (z', G, G, n_windows) uint8 prepared study -> its prediction."""
        z = image.shape[0]
        pixels, embedding = encode_chunks(self.encode, self.state, image, self.chunk, self.context)
        valid, position = z_axes(z)
        level, context_fracture = (
            x[:z]
            for x in jax.device_get(
                self.context_fn(self.state, pad_z(embedding, len(valid)), position, valid)
            )
        )
        parts = []
        for start in range(0, z, self.chunk):
            chunk = [self.chunk_rows(x, start, z) for x in (pixels, level, context_fracture)]
            out = jax.device_get(self._locate(self.state, *chunk))
            parts.append([x[: min(self.chunk, z - start)] for x in out])
        segmentation, logits_z, presence_z = (np.concatenate(x) for x in zip(*parts, strict=True))
        probs = self._pool(
            self.state,
            pad_z(logits_z, len(valid))[None],
            pad_z(presence_z, len(valid))[None],
            valid[None],
        )
        return SinglePrediction(
            probs=np.asarray(probs[0], np.float32),
            slice_logits=logits_z,
            presence=presence_z,
            segmentation=segmentation,
            pixels=pixels,
            embedding=embedding,
            level_logits=level,
            context_fracture=context_fracture,
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
    thresholds: float | Mapping[str, float] | None = None,
    progress: bool = True,
) -> tuple[dict[str, float], Predictions]:
    """Every held-out metric of `entries` (all labelled) and the predictions behind them.

    `thresholds` (label -> decision threshold, or one for all labels) default to each
    label's Youden's J on these studies themselves (`metrics.decision_thresholds`); pass
    those a run chose on its held-out fold to evaluate another set fairly.
    """
    predictions = predict_entries(predictor, entries, progress)
    y_true = np.stack([e.labels for e in entries])
    if thresholds is None:
        thresholds = metrics.decision_thresholds(y_true, predictions.probs)
    values = metrics.study_metrics(y_true, predictions.probs, thresholds)
    if predictions.confusion.any():
        values.update(metrics.dice_iou(predictions.confusion))
    return values, predictions


def _is_count(key: str) -> bool:
    """Counts: integers in metrics.json and in the table."""
    return key in ("step", "studies") or key.startswith("positives_")


def format_table(*columns: Mapping[str, float], headers: Sequence[str] = ()) -> str:
    """Metric name / value lines, for terminals and logs, one value column per metrics dict
    (rows: the first's keys; `headers` above the columns where given); an undefined value
    reads `n/a (<why>)` (`metrics.undefined_reasons`)."""
    reasons = [metrics.undefined_reasons(values) for values in columns]
    width = max(len(k) for k in columns[0])

    def text(i: int, key: str) -> str:
        if key not in columns[i]:
            return "-"
        if key in reasons[i]:
            return f"n/a ({reasons[i][key]})"
        v = columns[i][key]
        return str(int(v)) if _is_count(key) else f"{v:.4f}"

    cells = [[text(i, key) for i in range(len(columns))] for key in columns[0]]
    col = [
        max([len(h) for h in headers[i : i + 1]] + [len(r[i]) for r in cells])
        for i in range(len(columns))
    ]
    lines = (
        [f"{'':<{width}}  " + "  ".join(f"{h:<{c}}" for h, c in zip(headers, col, strict=True))]
        if headers
        else []
    )
    lines += [
        f"{key:<{width}}  " + "  ".join(f"{v:<{c}}" for v, c in zip(row, col, strict=True)).rstrip()
        for key, row in zip(columns[0], cells, strict=True)
    ]
    return "\n".join(line.rstrip() for line in lines)


def _fallbacks_here(values: Mapping[str, float], where: str) -> dict[str, str]:
    """`metrics.threshold_fallbacks` of thresholds chosen on the studies `values` scores."""
    if "studies" not in values:
        return {}
    positives = {name: values[f"positives_{name}"] for name in rsna.LABEL_COLUMNS}
    return metrics.threshold_fallbacks(positives, values["studies"], where)


def metrics_json(
    values: Mapping[str, float],
    thresholds_from: str = HELD_OUT,
    threshold_fallbacks: Mapping[str, str] | None = None,
) -> dict[str, object]:
    """The strict-JSON form of a metrics dict (`evaluate_run`'s), as metrics.json holds it.

    The keys of `values` in their order, each undefined (non-finite) value as null with its
    reason in `undefined` (key -> why, `metrics.undefined_reasons`), counts as integers;
    after `threshold` (patient_overall's), `thresholds` (label -> decision threshold, from
    `threshold` and `threshold_C1`..`threshold_C7`), `thresholds_from` (where they were
    chosen: `HELD_OUT`, or the path of the run's metrics.json they were read from) and
    `threshold_fallbacks` (label -> why its threshold is a fallback; by default, for
    thresholds chosen on the held-out fold, derived from the counts in `values`, which are
    that fold's; else none). `metrics_from_json` reads it back.
    """
    reasons = metrics.undefined_reasons(values)
    if threshold_fallbacks is None:
        threshold_fallbacks = (
            _fallbacks_here(values, "the held-out fold") if thresholds_from == HELD_OUT else {}
        )
    vertebra_thresholds = {f"threshold_{v}" for v in rsna.VERTEBRAE}
    out: dict[str, object] = {}
    for key, v in values.items():
        if key in vertebra_thresholds:
            continue
        out[key] = None if key in reasons else int(v) if _is_count(key) else float(v)
        if key == "threshold":
            out["thresholds"] = metrics.thresholds_of(values)
            out["thresholds_from"] = thresholds_from
            out["threshold_fallbacks"] = dict(threshold_fallbacks or {})
    out["undefined"] = reasons
    return out


def metrics_from_json(record: Mapping[str, object]) -> dict[str, float]:
    """The metrics dict (floats, NaN where undefined) back from its `metrics_json` form."""
    out = {}
    for key, v in record.items():
        if key in ("thresholds_from", "threshold_fallbacks", "undefined"):
            continue
        if key == "thresholds":  # right after `threshold`, as study_metrics orders them
            out.update({f"threshold_{name}": float(v[name]) for name in rsna.VERTEBRAE})
        else:
            out[key] = float("nan") if v is None else float(v)
    return out


def write_metrics(path: str, values: Mapping[str, float], **kwargs) -> str:
    """Writes `metrics_json(values, **kwargs)` to `path` as strict JSON (a NaN or infinity
    left in it raises ValueError); returns the path."""
    record = metrics_json(values, **kwargs)
    text = json.dumps(record, indent=1, allow_nan=False)
    with open(path, "w") as f:
        f.write(text + "\n")
    return path


@dataclasses.dataclass(frozen=True)
class RunThresholds:
    """The decision thresholds a finished run chose on its held-out fold.

    Attributes:
      thresholds: label -> threshold, every label of `rsna.LABEL_COLUMNS`.
      path: the run's metrics.json they were read from.
      step: the checkpoint step they were chosen for (None if the file does not say).
      fallbacks: label -> why its threshold is a fallback (for a run with one `threshold`
        only: the vertebrae, which take it).
    """

    thresholds: dict[str, float]
    path: str
    step: int | None
    fallbacks: dict[str, str]

    def source(self, step: int) -> str:
        """Where the thresholds come from, for a prediction by checkpoint `step`: the file,
        and the step they were chosen for where that is another."""
        if self.step is None or self.step == step:
            return self.path
        return f"{self.path} (chosen for checkpoint step {self.step})"


def read_run_thresholds(workdir: str) -> RunThresholds | None:
    """The decision thresholds in `workdir/metrics.json`: its `thresholds`, or, written
    before there was one per label, its `threshold` for every label. None where the run has
    no metrics.json (it has not finished).

    Raises:
      ThresholdsError: the file holds no usable thresholds (names the file).
    """
    path = os.path.join(os.path.abspath(workdir), "metrics.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)  # an older run's file may hold bare NaN
        per_label = "thresholds" in record
        found = record["thresholds"] if per_label else record.get("threshold")
        if found is None:
            raise ValueError("neither 'thresholds' nor 'threshold'")
        thresholds = metrics.as_thresholds(found)
        step = record.get("step")
        step = None if step is None else int(step)
        fallbacks = dict(record.get("threshold_fallbacks") or {})
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ThresholdsError(f"{path}: no decision thresholds to apply: {e}") from None
    if not per_label:
        fallbacks = dict.fromkeys(rsna.VERTEBRAE, "the run saved one threshold, for all labels")
    return RunThresholds(thresholds, path, step, fallbacks)


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


def _checkpoint_note(workdir: str, step: int) -> str:
    """`step`'s validation loss and whether it is the run's best by it."""
    with checkpoints.manager(workdir, read_only=True) as mngr:
        best, saved = checkpoints.best_step(mngr), mngr.metrics(step) or {}
    loss = saved.get(checkpoints.BEST_METRIC)
    if loss is None:
        return f"no {checkpoints.BEST_METRIC} saved with it"
    rank = "the best" if best == step else f"not the best (step {best} is)"
    return f"{checkpoints.BEST_METRIC} {loss:.4f}, {rank} by {checkpoints.BEST_METRIC}"


def evaluate_run(
    workdir: str,
    data_dir: str | None = None,
    out_dir: str | None = None,
    step: int | None = None,
    progress: bool = True,
    writer: SummaryWriter | None = None,
) -> dict[str, float]:
    """Restores a run's best (or `step`) checkpoint and evaluates it.

    Without `data_dir`: the run's own held-out fold, exactly as training reported it, with
    each label's decision threshold chosen on it (`metrics.decision_thresholds`).
    With `data_dir`: every study of that RSNA-layout folder, prepared on the run's grid;
    labelled (train.csv) studies are scored with the decision thresholds the run chose on
    its held-out fold (`read_run_thresholds`: its metrics.json; a run without one has them
    chosen on these studies, and says so), unlabelled (test.csv) ones only get a submission.
    Writes metrics.json (`write_metrics`: strict JSON, with `thresholds` and
    `thresholds_from`), submission.csv and the report pictures into `out_dir` (default
    `workdir/eval`, or `workdir/eval-<folder name>` with `data_dir`); the pictures also into
    `writer` (default: a new one in `out_dir/tensorboard`). With `progress`, prints what it
    evaluates before scoring and the paths it wrote at the end.

    Returns:
      The metrics as floats (`metrics.study_metrics`' and `dice_iou`'s keys after `step`), NaN
      where undefined; empty for unlabelled studies. `metrics_json` gives their file form.
    """
    model, config, step = checkpoints.load_model(workdir, step)
    predictor = systems.get(config).make_predictor(model, config)
    say = print if progress else lambda *_: None
    say(
        f"evaluate: run {os.path.abspath(workdir)}, checkpoint step {step} "
        f"({_checkpoint_note(workdir, step)})"
    )
    thresholds, thresholds_from, fallbacks = None, HELD_OUT, None
    if data_dir is None:
        cache_dir = sources.prepared_cache(config.data, progress=progress)
        _, entries = sources.split_entries(cache.read_entries(cache_dir), config.data, config.seed)
        which = (
            f"the run's held-out fold (fold {config.data.fold} of {config.data.num_folds} of "
            f"{config.data.dir or 'its phantoms'}; cache {cache_dir})"
        )
    else:
        data_config = config.data.copy_and_resolve_references()
        data_config.update(dir=os.path.abspath(data_dir), cache_dir="")
        cache_dir = sources.prepared_cache(data_config, progress=progress)
        entries = cache.read_entries(cache_dir)
        which = f"every study of {os.path.abspath(data_dir)} (cache {cache_dir})"
        saved = read_run_thresholds(workdir)
        if saved is None:
            thresholds_from = (
                "these studies, the run having no metrics.json "
                f"({os.path.join(os.path.abspath(workdir), 'metrics.json')})"
            )
        else:
            thresholds, thresholds_from = saved.thresholds, saved.source(step)
            fallbacks = saved.fallbacks
    name = "eval" if data_dir is None else f"eval-{os.path.basename(os.path.abspath(data_dir))}"
    out_dir = os.path.abspath(out_dir or os.path.join(workdir, name))
    os.makedirs(out_dir, exist_ok=True)

    labelled = all(e.labels is not None for e in entries)
    say(f"evaluate: {len(entries)} {'labelled' if labelled else 'unlabelled'} studies, {which}")
    if labelled and thresholds is None:
        where = "the run's held-out fold" if thresholds_from == HELD_OUT else thresholds_from
        say(f"evaluate: decision thresholds: each label's Youden's J on {where}")
    elif labelled:
        say(f"evaluate: decision thresholds from {thresholds_from}")
    say(f"evaluate: output folder {out_dir}")
    written = []
    if labelled:
        values, predictions = evaluate_entries(predictor, entries, thresholds, progress)
        values = {"step": float(step), **values}
        if data_dir is not None and thresholds is None:  # chosen on these studies
            fallbacks = _fallbacks_here(values, "these studies")
        y_true = np.stack([e.labels for e in entries])
        own_writer = writer is None
        if own_writer:
            writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        figures = report.write_report(
            out_dir, y_true, predictions.probs, predictions.confusion, writer=writer, step=step
        )
        logdir = getattr(writer, "logdir", None)
        if own_writer:
            writer.close()
        written.append(
            write_metrics(
                os.path.join(out_dir, "metrics.json"),
                values,
                thresholds_from=thresholds_from,
                threshold_fallbacks=fallbacks,
            )
        )
    else:
        predictions, values = predict_entries(predictor, entries, progress), {}
    row_ids = None
    test_csv = os.path.join(data_dir or "", "test.csv")
    if data_dir is not None and os.path.exists(test_csv):
        with open(test_csv, newline="") as f:
            row_ids = [row["row_id"] for row in csv.DictReader(f)]
    written.append(os.path.join(out_dir, "submission.csv"))
    write_submission(written[-1], [e.uid for e in entries], predictions.probs, row_ids)
    for path in written:
        say(f"evaluate: wrote {path}")
    if labelled:
        names = ", ".join(os.path.basename(p) for p in figures.values())
        tensorboard = f"; TensorBoard images in {logdir}" if logdir else ""
        say(f"evaluate: figures in {out_dir} ({names}){tensorboard}")
    return values
