"""What runs and tools report: decision thresholds saved with a run and applied where it is
used again, metrics.json as strict JSON, what evaluation prints, the phantom CLI's defaults
and summary, and no Orbax warning where reading a run read-only is expected.

A run chooses each label's decision threshold on its held-out fold and saves them in its
metrics.json (`evaluation.metrics_json`); `evaluate_run(..., data_dir=...)` (what
`evaluate.py --data` runs) applies them unchanged. Undefined values are `null` in the file,
with the reason in `undefined`. The checkpoint is a tiny one whose output layers are drawn at
random (`save_random_heads_run`), so probabilities differ by study and by level.
"""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn import metrics as skm

from configs import default
from cspine_jax import checkpoints, evaluation, metrics
from cspine_jax.data import cache, phantom, sources
from cspine_jax.data.phantom import __main__ as phantom_cli
from cspine_jax.data.rsna import LABEL_COLUMNS, VERTEBRAE
from tests.helpers import ROOT, save_random_heads_run


def _strict(text: str):
    """json.loads that fails on NaN / Infinity instead of reading them."""

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _one_class_values() -> dict[str, float]:
    """evaluate_run's dict on 6 studies where C3 has only negatives and C5 is neither in
    the masks nor predicted."""
    rng = np.random.default_rng(0)
    y = np.zeros((6, 8))
    y[[0, 1, 2], 0] = 1
    y[[0, 1], 1] = y[[1, 2], 2] = y[[0, 2], 4:] = 1
    p = rng.random((6, 8))
    values = {"step": 7.0, **evaluation.metrics.study_metrics(y, p, 0.4)}
    confusion = np.diag([50, 9, 8, 7, 6, 0, 4, 3])
    return {**values, **metrics.dice_iou(confusion)}


def test_metrics_json_is_strict_with_null_and_reason():
    values = _one_class_values()
    assert np.isnan(values["auc_C3"]) and np.isnan(values["dice_C5"])
    assert all(isinstance(v, float) for v in values.values())  # np.isfinite over values works
    record = evaluation.metrics_json(values)
    record = _strict(json.dumps(record, allow_nan=False))
    assert record["auc_C3"] is None and record["dice_C5"] is None and record["iou_C5"] is None
    assert record["undefined"] == {
        "auc_C3": "only negatives on these 6 studies",
        "dice_C5": "C5 neither in the masks nor predicted",
        "iou_C5": "C5 neither in the masks nor predicted",
    }
    assert record["threshold"] == 0.4
    assert record["thresholds"] == dict.fromkeys(LABEL_COLUMNS, 0.4)
    assert record["thresholds_from"] == "held-out fold"
    assert list(record["threshold_fallbacks"]) == ["C3"]
    assert "only negatives on the held-out fold" in record["threshold_fallbacks"]["C3"]
    assert record["step"] == 7 and isinstance(record["step"], int) and record["studies"] == 6
    assert not any(k.startswith("threshold_C") for k in record)
    # Every key of the dict is kept, in order, and reads back.
    kept = [k for k in values if not k.startswith("threshold_C")]
    assert [k for k in record if k in values] == kept
    back = evaluation.metrics_from_json(record)
    assert list(back) == list(values)
    assert back == pytest.approx(values, nan_ok=True)

    text = evaluation.format_table(values)
    assert "nan" not in text
    line = next(x for x in text.splitlines() if x.startswith("auc_C3 "))
    assert line.split(None, 1)[1] == "n/a (only negatives on these 6 studies)"
    assert "n/a (C5 neither in the masks nor predicted)" in text


def test_write_metrics_writes_strict_json(tmp_path):
    values = _one_class_values()
    path = evaluation.write_metrics(
        str(tmp_path / "metrics.json"), values, thresholds_from="/x/metrics.json"
    )
    text = open(path).read()
    assert "NaN" not in text and "Infinity" not in text
    record = _strict(text)
    assert record["thresholds_from"] == "/x/metrics.json"
    assert record["threshold_fallbacks"] == {}  # not chosen here: nothing derived
    with pytest.raises(ValueError, match="not strict JSON"):
        _strict(json.dumps(values))  # what writing the dict as it is gives


def test_read_run_thresholds(tmp_path):
    assert evaluation.read_run_thresholds(str(tmp_path)) is None
    chosen = dict(zip(LABEL_COLUMNS, np.linspace(0.1, 0.8, 8).tolist(), strict=True))
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"step": 4, "threshold": 0.1, "thresholds": chosen}))
    saved = evaluation.read_run_thresholds(str(tmp_path))
    assert saved.thresholds == chosen and saved.path == str(path) and saved.step == 4
    # Older runs: one threshold, NaN written bare.
    path.write_text('{"step": 4, "auc_C3": NaN, "threshold": 0.25}')
    saved = evaluation.read_run_thresholds(str(tmp_path))
    assert saved.thresholds == dict.fromkeys(LABEL_COLUMNS, 0.25)
    assert list(saved.fallbacks) == list(VERTEBRAE)
    for bad in ('{"step": 4}', "not json", '{"thresholds": {"C1": 0.5}}', '{"threshold": 2}'):
        path.write_text(bad)
        with pytest.raises(evaluation.ThresholdsError, match=str(path)):
            evaluation.read_run_thresholds(str(tmp_path))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    save_random_heads_run(workdir)
    return workdir


def _labels_and_probs(workdir: str, folder: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of every study of `folder`, in evaluate_run's order, by the
    whole-study predictor of `workdir`'s checkpoint."""
    model, config, _ = checkpoints.load_model(workdir)
    data_config = config.data.copy_and_resolve_references()
    data_config.update(dir=os.path.abspath(folder), cache_dir="")
    entries = cache.read_entries(sources.prepared_cache(data_config, progress=False))
    predictor = evaluation.StudyPredictor(model, config.data.context)
    return np.stack([e.labels for e in entries]), np.stack(
        [predictor(e.image()).probs for e in entries]
    )


def _between_probabilities(probs: np.ndarray) -> dict[str, float]:
    """A threshold per label halfway between two of its probabilities, another rank for
    each label, so decisions differ by label and sit far from any probability."""
    out = {}
    for j, name in enumerate(LABEL_COLUMNS):
        values = np.unique(probs[:, j])
        k = 2 + (3 * j) % (len(values) - 3)
        out[name] = float((values[k] + values[k + 1]) / 2)
    return out


def test_evaluate_run_with_data_applies_the_runs_saved_thresholds(
    run, phantom_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("CSPINE_CACHE", str(tmp_path / "cache"))
    y, probs = _labels_and_probs(run, phantom_dir)
    assert len(y) == 12 and 0 < y[:, 0].sum() < 12
    chosen = _between_probabilities(probs)
    assert chosen != metrics.decision_thresholds(y, probs)  # not what these studies give
    run_metrics = os.path.join(run, "metrics.json")
    with open(run_metrics, "w") as f:
        json.dump({"step": 2, "threshold": chosen["patient_overall"], "thresholds": chosen}, f)

    out = tmp_path / "eval"
    values = evaluation.evaluate_run(run, data_dir=phantom_dir, out_dir=str(out), progress=False)
    assert metrics.thresholds_of(values) == chosen
    expected = metrics.study_metrics(y, probs, chosen)
    for key in ("sensitivity", "specificity", "macro_f1", "exact_match"):
        assert values[key] == expected[key], key
    # The decisions, label by label, follow the saved thresholds.
    pred = probs >= np.array([chosen[name] for name in LABEL_COLUMNS])
    y = y > 0.5
    assert values["macro_f1"] == pytest.approx(
        skm.f1_score(y[:, 1:], pred[:, 1:], average="macro", zero_division=0)
    )
    assert values["sensitivity"] == pytest.approx(pred[y[:, 0], 0].mean())
    assert values["specificity"] == pytest.approx(1 - pred[~y[:, 0], 0].mean())
    record = _strict((out / "metrics.json").read_text())
    assert record["thresholds"] == chosen and record["threshold"] == chosen["patient_overall"]
    assert record["thresholds_from"] == run_metrics
    assert record["threshold_fallbacks"] == {}

    # A run written before per-label thresholds: its one threshold for every label.
    with open(run_metrics, "w") as f:
        json.dump({"step": 2, "threshold": chosen["C3"], "auc_C1": float("nan")}, f)
    capsys.readouterr()
    values = evaluation.evaluate_run(run, data_dir=phantom_dir, out_dir=str(out), progress=True)
    assert metrics.thresholds_of(values) == dict.fromkeys(LABEL_COLUMNS, chosen["C3"])
    record = _strict((out / "metrics.json").read_text())
    assert record["thresholds"] == dict.fromkeys(LABEL_COLUMNS, chosen["C3"])
    assert record["thresholds_from"] == run_metrics
    assert list(record["threshold_fallbacks"]) == list(VERTEBRAE)
    # What it printed: the run, checkpoint, studies and output folder, then what it wrote.
    printed = [line for line in capsys.readouterr().out.splitlines() if line]
    assert printed[0] == f"evaluate: run {os.path.abspath(run)}, checkpoint step 2 " + (
        "(val_loss 0.5000, the best by val_loss)"
    )
    assert printed[1].startswith(f"evaluate: 12 labelled studies, every study of {phantom_dir}")
    assert printed[2] == f"evaluate: decision thresholds from {run_metrics}"
    assert printed[3] == f"evaluate: output folder {out}"
    assert f"evaluate: wrote {out / 'metrics.json'}" in printed
    assert f"evaluate: wrote {out / 'submission.csv'}" in printed
    assert printed[-1].startswith(f"evaluate: figures in {out} (roc.png, ")
    os.remove(run_metrics)


def test_phantom_cli_summary(tmp_path):
    phantom.write_dataset(
        tmp_path, 3, seed=8, size="tiny", workers=1, mask_fraction=0.5, box_fraction=1.0
    )
    line = phantom_cli.summary(tmp_path)
    assert line.startswith(f"wrote {tmp_path}: 3 studies in train_images/")
    masks = len(os.listdir(tmp_path / "segmentations"))
    assert f"{masks} masks in segmentations/" in line and "\n" not in line


@pytest.mark.slow
def test_phantom_cli_defaults_are_the_default_configs():
    result = subprocess.run(
        [sys.executable, "-m", "cspine_jax.data.phantom", "--helpshort"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = result.stdout + result.stderr
    config = default.get_config().data.phantom
    for name in ("box_fraction", "mask_fraction"):
        block = text[text.index(f"--{name}:") :]
        assert f"(default: '{config[name]}')" in block.split("--", 2)[1], (name, text)


def test_reading_a_run_logs_no_read_only_warning(run, caplog):
    caplog.set_level(logging.INFO)
    with checkpoints.manager(run, read_only=True) as mngr:
        assert checkpoints.best_step(mngr) == 2
    checkpoints.load_model(run)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings, warnings
    # The filter is gone again: the same message outside the read-only manager still shows.
    from absl import logging as absl_logging

    absl_logging.warning("Given directory is read only=%s", "elsewhere")
    assert any("read only=elsewhere" in r.getMessage() for r in caplog.records)
