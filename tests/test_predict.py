"""Single-study triage CLI, its fracture saliency, the triage picture's geometry, and the
evaluation report pictures.

The CLI runs in a subprocess, as a user runs it, against a tiny run trained once for the
module (`python train.py --config=configs/tiny.py`, 2 steps) on a tiny phantom study, and
against a tiny checkpoint whose output layers are drawn at random (`save_random_heads_run`):
two training steps leave those layers near their zero start, so every study and level gets
nearly the same probability, too alike for a comparison of probabilities to tell them apart.
"""

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from matplotlib import image as mpimg

from cspine_jax import checkpoints, evaluation, report, saliency, triage_figure
from cspine_jax.data import dicom, dicom_writer, phantom, pipeline, prepare, preprocess
from cspine_jax.data.rsna import LABEL_COLUMNS, VERTEBRAE
from tests.helpers import save_random_heads_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_run(env, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config=configs/tiny.py",
            f"--workdir={workdir}",
            "--config.optim.steps=2",
            "--config.checkpoint.every=2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """(folder of <n>.dcm files, its Series)."""
    study = phantom.generate_study(0, 0, "tiny", with_mask=False, with_boxes=False)
    folder = tmp_path_factory.mktemp("study") / "study0"
    dicom_writer.write_series(folder, study.series)
    return str(folder), study.series


def _predict(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "cspine_jax.predict", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _predict_into(env, study, workdir, out):
    """The JSON record of one CLI run on `study` (folder, Series)."""
    folder, series = study
    result = _predict(env, folder, f"--workdir={workdir}", f"--out={out}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # After the result line, the decision and the paths written, then the summary.
    lines = result.stdout.strip().splitlines()
    assert lines[-5].startswith(f"{series.uid}: patient_overall "), result.stdout
    assert lines[-4].startswith("suspected levels: "), result.stdout
    assert lines[-3:] == [
        f"wrote {out / series.uid}.json",
        f"wrote {out / series.uid}.png",
        f"wrote {out / 'summary.csv'}",
    ]
    with open(out / f"{series.uid}.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def predicted(env, tiny_run, tiny_study, tmp_path_factory):
    """(output folder, its JSON record) of one CLI run of the trained run on the tiny study."""
    out = tmp_path_factory.mktemp("predicted")
    return out, _predict_into(env, tiny_study, tiny_run, out)


@pytest.mark.slow
def test_cli_writes_probabilities_and_picture(predicted, tiny_study):
    out, record = predicted
    _, series = tiny_study
    probs = np.array([record[name] for name in LABEL_COLUMNS])
    assert probs.dtype == np.float64 and np.all((probs >= 0) & (probs <= 1)), record
    assert record["checkpoint_step"] == 2
    assert record["num_slices"] == series.hu.shape[0]
    assert record["seconds"] > 0

    png = out / f"{series.uid}.png"
    assert png.stat().st_size > 10_000
    picture = mpimg.imread(png)
    # Three panels side by side at 150 dpi: wider than tall, and not a blank canvas.
    assert picture.ndim == 3 and picture.shape[2] in (3, 4)
    assert 800 <= picture.shape[0] <= 2500 and 1500 <= picture.shape[1] <= 6000
    assert picture[..., :3].std() > 0.05


def _study_predictor_probs(workdir: str, folder: str) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, those of the study upside down) by evaluation's whole-study predictor
    of `workdir`'s best checkpoint, on `folder` prepared as predict prepares it."""
    model, config, _ = checkpoints.load_model(workdir)
    params = prepare.preprocessing_params(config.data)
    image = preprocess.prepare_series(dicom.load_series(folder), **params).image
    predictor = evaluation.StudyPredictor(model, config.data.context)
    return predictor(image).probs, predictor(image[::-1]).probs


def _written(record) -> np.ndarray:
    return np.array([record[name] for name in LABEL_COLUMNS])


@pytest.mark.slow
def test_cli_probabilities_are_the_whole_study_predictors(predicted, tiny_run, tiny_study):
    """The trained run: the JSON's probabilities are evaluation's on the same study, its
    decisions by the thresholds the run saved when it finished."""
    _, record = predicted
    expected, _ = _study_predictor_probs(tiny_run, tiny_study[0])
    np.testing.assert_allclose(_written(record), expected, rtol=0, atol=1e-5)
    saved = evaluation.read_run_thresholds(tiny_run)
    assert record["thresholds"] == saved.thresholds
    assert record["thresholds_from"] == os.path.join(tiny_run, "metrics.json")
    t = np.array([saved.thresholds[name] for name in LABEL_COLUMNS])
    assert record["suspected"] == [VERTEBRAE[i] for i in np.flatnonzero(expected[1:] >= t[1:])]


@pytest.mark.slow
def test_cli_probabilities_tell_studies_and_levels_apart(env, tiny_study, tmp_path):
    """A checkpoint whose probabilities differ by study and by level: the JSON's are
    evaluation's, closer than any other input or level would give."""
    folder, _ = tiny_study
    workdir = str(tmp_path / "run")
    save_random_heads_run(workdir)
    out = tmp_path / "out"
    out.mkdir()
    record = _predict_into(env, tiny_study, workdir, out)
    expected, upside_down = _study_predictor_probs(workdir, folder)
    np.testing.assert_allclose(_written(record), expected, rtol=0, atol=1e-5)
    assert record["checkpoint_step"] == 2
    # What the tolerance rules out: another input, or another level's probability.
    assert np.abs(upside_down - expected).max() > 1e-3
    gaps = np.abs(expected[:, None] - expected[None, :]) + np.eye(len(expected))
    assert gaps.min() > 1e-4, expected
    # A run without metrics.json (not finished) has no thresholds: 0.5, and the JSON says so.
    assert record["thresholds"] == dict.fromkeys(LABEL_COLUMNS, saliency.SUSPECT_THRESHOLD)
    assert "fallback 0.5" in record["thresholds_from"] and "not found" in record["thresholds_from"]
    suspected = np.flatnonzero(expected[1:] >= saliency.SUSPECT_THRESHOLD)
    assert record["suspected"] == [VERTEBRAE[i] for i in suspected]


@pytest.mark.slow
def test_cli_decides_by_the_runs_saved_thresholds(env, tiny_study, tmp_path):
    """Each level is suspected where its probability reaches the threshold the run saved for
    it: thresholds just below C2's and C5's probabilities, just above the others'."""
    folder, _ = tiny_study
    workdir = tmp_path / "run"
    save_random_heads_run(str(workdir))
    expected, _ = _study_predictor_probs(str(workdir), folder)
    chosen = {
        name: float(p / 2 if name in ("patient_overall", "C2", "C5") else (1 + p) / 2)
        for name, p in zip(LABEL_COLUMNS, expected, strict=True)
    }
    with open(workdir / "metrics.json", "w") as f:
        json.dump({"step": 2, "threshold": chosen["patient_overall"], "thresholds": chosen}, f)
    out = tmp_path / "out"
    record = _predict_into(env, tiny_study, workdir, out)
    assert record["thresholds"] == chosen
    assert record["thresholds_from"] == str(workdir / "metrics.json")
    assert record["suspected"] == ["C2", "C5"] and record["patient_overall_suspected"] is True


def _error_line(result) -> str:
    """The one line on the whole of a failed run's stderr (no warning or traceback beside
    it), which exited with status 1."""
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("predict: error: "), result.stderr
    return lines[0]


@pytest.mark.slow
def test_cli_errors_are_one_line_and_exit_1(env, tiny_study, tmp_path):
    out = tmp_path / "out"
    folder, _ = tiny_study
    run = str(tmp_path / "run")  # a run to score with: only the study is at fault
    save_random_heads_run(run)

    # A folder of studies (an RSNA train_images/): the hint names one study's folder.
    studies = tmp_path / "train_images"
    shutil.copytree(folder, studies / "study0")
    line = _error_line(_predict(env, str(studies), f"--workdir={run}", f"--out={out}"))
    assert "sub-folder" in line and f"e.g. {studies / 'study0'}" in line, line

    # A study with a file cut short (a copy interrupted): that file, named.
    truncated = tmp_path / "truncated"
    shutil.copytree(folder, truncated)
    broken = sorted(truncated.glob("*.dcm"))[len(list(truncated.glob("*.dcm"))) // 2]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    line = _error_line(_predict(env, str(truncated), f"--workdir={run}", f"--out={out}"))
    assert str(broken) in line, line

    line = _error_line(_predict(env, folder, f"--workdir={tmp_path / 'no_run'}", f"--out={out}"))
    assert "no checkpoint" in line, line
    # Nothing written but the summary, whose rows are the failures.
    assert {p.name for p in out.iterdir()} <= {"summary.csv"}
    with open(out / "summary.csv") as f:
        assert all(row["error"] for row in csv.DictReader(f))


def test_unstack_context_is_the_adjoint_of_stack_context():
    rng = np.random.default_rng(0)
    z, g, windows, context = 7, 4, 2, 5
    volume = rng.normal(size=(z, g, g, windows)).astype(np.float32)
    centres = np.array([0, 1, 3, 6, 6])  # edges clamp, repeats accumulate
    grads = rng.normal(size=(len(centres), g, g, context * windows)).astype(np.float32)
    forward = np.sum(pipeline.stack_context(volume, centres, context) * grads)
    volume_grads = np.zeros_like(volume)
    saliency.unstack_context(grads, centres, context, volume_grads)
    backward = np.sum(volume * volume_grads)
    np.testing.assert_allclose(forward, backward, rtol=1e-5)


@pytest.mark.slow
def test_saliency_is_finite_nonzero_and_independent_of_the_chunk(tiny_run, tiny_study):
    model, config, _ = checkpoints.load_model(tiny_run)
    _, series = tiny_study
    image = preprocess.prepare_series(series, **prepare.preprocessing_params(config.data)).image
    levels = np.zeros(7, np.float32)
    levels[[1, 4]] = 1.0
    chunked = saliency.FractureSaliency(
        evaluation.StudyPredictor(model, config.data.context, chunk=8)
    )
    assert image.shape[0] % 8, "the last chunk should need padding"
    heat = chunked(image, levels)
    assert heat.shape == image.shape[:3]
    assert np.isfinite(heat).all() and heat.max() > 0
    whole = saliency.FractureSaliency(
        evaluation.StudyPredictor(model, config.data.context, chunk=image.shape[0])
    )
    np.testing.assert_allclose(heat, whole(image, levels), rtol=1e-4, atol=1e-6 * heat.max())
    chunked(image[:-3], levels)  # another study length: no new chunk programs
    per_chunk = [chunked.predictor.encode, chunked.predictor._locate]
    per_chunk += [chunked._locate_grad, chunked._input_grad]
    assert [f._cache_size() for f in per_chunk] == [1, 1, 1, 1]


def test_saliency_is_autodiff_of_the_models_forward_pass(awake_model):
    """The chunked backward pass through the prediction's own per-slice outputs equals
    jax.grad of the model's forward pass over the whole study (every path open:
    detach=False), for a study of two chunks, the last one padded."""
    config, model = awake_model
    context, windows = config.data.context, len(config.data.windows)
    z, grid = 11, config.data.grid
    image = np.random.default_rng(0).integers(0, 256, (z, grid, grid, windows), np.uint8)
    levels = np.zeros(7, np.float32)
    levels[[1, 4]] = 1.0
    explain = saliency.FractureSaliency(evaluation.StudyPredictor(model, context, chunk=8))
    heat = explain(image, levels)

    graphdef, state = nnx.split(model)
    ones, position = jnp.ones((1, z)), jnp.arange(z, dtype=jnp.float32)[None]

    def selected(stacks):
        out = nnx.merge(graphdef, state)(stacks[None], ones, position, detach=False)
        return jnp.sum(out["study_logits"][0, 1:] * levels)

    stacks = pipeline.slice_inputs(image, np.arange(z), context)
    grads = np.asarray(jax.jit(jax.grad(selected))(stacks))
    volume = np.zeros(image.shape, np.float32)
    saliency.unstack_context(grads, np.arange(z), context, volume)
    expected = np.abs(volume).sum(axis=-1)
    # The saliency runs back from float16 pixel logits (`StudyPredictor`): float16's tolerance.
    np.testing.assert_allclose(heat, expected, rtol=0, atol=2e-3 * expected.max())
    assert expected.max() > 0


def test_saliency_needs_the_single_models_slice_logits():
    class NoSliceLogits:  # what a two-stage run's predictor lacks
        def __call__(self, image):
            raise AssertionError("not reached")

    with pytest.raises(TypeError, match="slice logits"):
        saliency.FractureSaliency(NoSliceLogits())


def test_spine_course_follows_the_labels():
    mask = np.zeros((20, 16, 16), bool)
    for z in range(20):
        if z % 4:  # slices without labels are interpolated
            mask[z, 4 + z // 4, 7:10] = True
    course = triage_figure.spine_course(mask, spacing_z=2.0)
    assert course.shape == (20, 2)
    np.testing.assert_allclose(course[:, 1], 8.0, atol=1e-6)
    assert np.all(np.diff(course[2:-2, 0]) > 0)  # moves down the rows as the labels do
    assert triage_figure.spine_course(np.zeros_like(mask), 2.0) is None


@pytest.mark.parametrize(
    "start, step",
    [((0.0, 0.0), (2.0, 2.0)), ((10.0, 10.0), (1.0, 1.0)), ((-4.0, 13.0), (2.0, 1.5))],
    ids=["whole-field-of-view", "central-half", "off-centre-past-the-edges"],
)
def test_views_put_labels_and_heat_where_the_grid_saw_them(start, step):
    """A label cell and a heat peak of the model's grid land on the source pixels that grid
    cell covers, wherever the grid lies on the source slices (its placement): the whole field
    of view, its central half (a crop), or a square off the centre reaching past two edges
    (a spine region)."""
    z, n, grid, h = 4, 40, 20, 10  # source 40 px; prepared 20 px; segmentation 10 px
    hu = np.full((z, n, n), 400.0, np.float32)  # bone everywhere: every view has a body
    series = dicom.Series(
        "1.2.3",
        hu,
        (2.0, 1.0, 1.0),
        np.array([[0.0, 0.0, -2.0 * k] for k in range(z)]),
        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        np.arange(1, z + 1),
    )
    placement = preprocess.Placement(grid, (n, n), start, step)
    image = np.full((z, grid, grid, 1), 200, np.uint8)
    prepared = preprocess.Prepared(
        image, None, np.zeros((z, grid, grid), np.uint8), (2.0, *step), placement
    )
    segmentation = np.zeros((z, h, h), np.uint8)
    segmentation[:, 5, 5] = 3  # prepared pixels 10..11
    heat = np.zeros((z, grid, grid), np.float32)
    heat[:, 10, 10] = 1.0
    levels = np.zeros(7, np.float32)
    levels[2] = 1.0
    views, _ = triage_figure.study_views(
        series, prepared, segmentation, heat, levels, [(400.0, 1800.0)]
    )
    axial = next(v for v in views if v.name == "axial")
    # Source pixels whose centre falls in segmentation cell 5, i.e. prepared pixels 10..11:
    # [start + 10 step, start + 12 step) along each axis.
    centres = np.arange(n) + 0.5
    inside = [
        (centres >= s + 10 * d) & (centres < s + 12 * d) for s, d in zip(start, step, strict=True)
    ]
    cell = np.outer(*inside)
    assert cell.any()
    np.testing.assert_array_equal(axial.labels == 3, cell)
    assert (axial.labels[~cell] == 0).all()
    peak = np.unravel_index(np.argmax(axial.heat), axial.heat.shape)
    assert cell[peak]  # the heat sits on the labelled cell
    # Beyond the grid's square [start, start + grid * step): no heat at all.
    covered = [(centres >= s) & (centres <= s + grid * d) for s, d in zip(start, step, strict=True)]
    assert (axial.heat[~np.outer(*covered)] == 0).all()
    assert np.outer(*covered).all() == (start == (0.0, 0.0))


def test_report_figures_render(tmp_path):
    import matplotlib.pyplot as plt
    from tensorboardX import SummaryWriter

    rng = np.random.default_rng(1)
    y_true = (rng.random((40, 8)) < 0.3).astype(np.float32)
    y_true[:, 3] = 0  # one class only: listed, not plotted
    probs = np.clip(0.5 * y_true + 0.5 * rng.random((40, 8)), 0, 1)
    confusion = rng.integers(0, 100, (8, 8)) + np.diag(np.full(8, 1000))
    writer = SummaryWriter(str(tmp_path / "tb"))
    paths = report.write_report(tmp_path / "report", y_true, probs, confusion, writer, step=5)
    writer.close()
    assert sorted(paths) == ["level_confusion", "reliability", "roc"]
    for path in paths.values():
        assert os.path.getsize(path) > 5_000
        assert mpimg.imread(path).shape[0] > 300
    assert any(name.startswith("events") for name in os.listdir(tmp_path / "tb"))
    assert os.path.getsize(next((tmp_path / "tb").iterdir())) > 20_000  # three images
    assert plt.get_fignums() == []  # no figure left in pyplot's global registry
