"""The segmentation grid: the evaluation's Dice and the training loss score the same pixels.

The segmentation comes out at a coarser stride than the labels; `heads.label_grid` picks the
label of each output cell (the pixel at its centre). The loss (`single.segmentation_losses`)
and the evaluation's voxel confusion (`evaluation.predict_entries`) must both take it: a Dice
computed on other pixels than the ones trained would misreport the segmentation.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from cspine_jax import checkpoints, evaluation, metrics, systems
from cspine_jax.data import cache, pipeline, sources
from cspine_jax.data.rsna import LABEL_COLUMNS
from cspine_jax.models import heads, single
from tests.helpers import save_random_heads_run

GRID, SIZE, SLICES = 32, 16, 3  # labels on 32 x 32, segmentation on 16 x 16 (stride 2)


def test_label_grid_takes_the_pixel_at_each_cells_centre():
    image = np.arange(8 * 8).reshape(8, 8)
    # Cells of 2 x 2 pixels: cell (i, j) takes pixel (2i + 1, 2j + 1).
    two = heads.label_grid(image, 4)
    assert two.shape == (4, 4)
    assert two.tolist() == [[(2 * i + 1) * 8 + 2 * j + 1 for j in range(4)] for i in range(4)]
    # Cells of 4 x 4 pixels: pixel (4i + 2, 4j + 2).
    assert heads.label_grid(image, 2).tolist() == [[18, 22], [50, 54]]
    # Same grid: every pixel.
    np.testing.assert_array_equal(heads.label_grid(image, 8), image)
    # Leading axes are kept, and jax arrays give the same pixels.
    stack = np.stack([image, image + 100, image + 200]).reshape(3, 1, 8, 8)
    on_device = heads.label_grid(jnp.asarray(stack), 4)
    assert on_device.shape == (3, 1, 4, 4)
    np.testing.assert_array_equal(on_device, heads.label_grid(stack, 4))
    np.testing.assert_array_equal(on_device[2, 0], two + 200)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """What `predict_entries` reads of a `cache.Entry`; the image's value names the study."""

    key: int
    labels_volume: np.ndarray | None

    @property
    def has_mask(self) -> bool:
        return self.labels_volume is not None

    def image(self) -> np.ndarray:
        return np.full((SLICES, GRID, GRID, 2), self.key, np.uint8)

    def mask(self) -> np.ndarray | None:
        return self.labels_volume


def _predictor(segmentations: dict[int, np.ndarray]):
    """A `systems.Predictor` returning the given segmentation of each study."""

    def predict(image: np.ndarray) -> systems.StudyPrediction:
        return systems.StudyPrediction(
            probs=np.full(8, 0.5, np.float32),
            slice_logits=np.zeros((SLICES, 7), np.float32),
            presence=np.zeros((SLICES, 7), np.float32),
            segmentation=segmentations[int(image[0, 0, 0, 0])],
        )

    return predict


def _cervical(labels: np.ndarray) -> np.ndarray:
    """Thoracic labels (8 and up) as background, as the pipeline and the evaluation treat them."""
    return np.where(labels <= 7, labels, 0).astype(np.uint8)


def test_evaluation_dice_and_the_loss_score_the_same_pixels():
    rng = np.random.default_rng(0)
    # Labels random per pixel (thoracic 8 and 9 included): any other choice of pixel than the
    # grid's gives other labels.
    masks = [rng.integers(0, 10, (SLICES, GRID, GRID)).astype(np.uint8) for _ in range(2)]
    entries = [_Entry(1, masks[0]), _Entry(2, None), _Entry(3, masks[1])]
    aligned = {
        1: _cervical(heads.label_grid(masks[0], SIZE)),
        2: np.zeros((SLICES, SIZE, SIZE)),
        3: _cervical(heads.label_grid(masks[1], SIZE)),
    }
    # The same segmentation one label pixel off: each cell's pixel left of its centre.
    shifted = {
        1: _cervical(masks[0][:, 1::2, ::2]),
        2: aligned[2],
        3: _cervical(masks[1][:, 1::2, ::2]),
    }
    assert aligned[1].shape == shifted[1].shape == (SLICES, SIZE, SIZE)

    # The evaluation: a segmentation equal to the label grid is a perfect diagonal.
    confusion = evaluation.predict_entries(_predictor(aligned), entries, progress=False).confusion
    assert confusion.sum() == 2 * SLICES * SIZE * SIZE  # the masked studies' cells, once each
    np.testing.assert_array_equal(confusion, np.diag(np.diag(confusion)))
    dice = metrics.dice_iou(confusion)
    assert all(dice[f"dice_C{v}"] == 1.0 for v in range(1, 8)), dice
    off = evaluation.predict_entries(_predictor(shifted), entries, progress=False).confusion
    assert off.sum() == confusion.sum() and (off - np.diag(np.diag(off))).sum() > off.sum() / 2
    off_dice = metrics.dice_iou(off)
    assert all(off_dice[f"dice_C{v}"] < 0.5 for v in range(1, 8)), off_dice

    # The loss on the batch the pipeline builds (thoracic already background): ~0 for the
    # aligned segmentation as confident logits, large for the shifted one.
    batch_mask = jnp.asarray(np.stack([_cervical(m) for m in masks]), jnp.int32)
    valid, has_mask = jnp.ones((2, SLICES)), jnp.ones(2)

    def losses(segmentations):
        seg = np.stack([segmentations[1], segmentations[3]]).astype(np.int32)
        logits = 30.0 * jnp.asarray(np.eye(heads.NUM_CLASSES, dtype=np.float32)[seg])
        return [
            float(single.ratio_value(r))
            for r in single.segmentation_losses(logits, batch_mask, valid, has_mask)
        ]

    ce, dice_loss = losses(aligned)
    assert ce < 1e-6 and dice_loss < 1e-6, (ce, dice_loss)
    ce, dice_loss = losses(shifted)
    assert ce > 10 and dice_loss > 0.5, (ce, dice_loss)


def test_study_predictor_is_the_models_forward_pass_over_every_slice(awake_model):
    """`StudyPredictor` (chunks, z-context and the pool over a bucket-padded length) against
    the model's own forward pass over every slice of the study at once, all of them valid at
    their true z. 37 slices: three chunks of 16, the last one padded, and a z length padded
    to the bucket (64) for z-context and the pool, which the padding must not reach."""
    config, model = awake_model
    context, windows = config.data.context, len(config.data.windows)
    z, chunk = 37, 16
    image = np.random.default_rng(0).integers(0, 256, (z, GRID, GRID, windows), np.uint8)
    got = evaluation.StudyPredictor(model, context, chunk)(image)

    inputs = pipeline.slice_inputs(image, np.arange(z), context)[None]
    position = np.arange(z, dtype=np.float32)[None]
    full = jax.device_get(model(inputs, np.ones((1, z), np.float32), position))
    encoded = jax.device_get(model.encode_slices(inputs[0]))
    # Pixel logits wait on the host in float16: tolerances downstream of them are float16's.
    np.testing.assert_allclose(got.embedding, encoded["embedding"], rtol=1e-5, atol=1e-5)
    pixels = np.concatenate([encoded["pixel_logits"], encoded["fracture_logits"][..., None]], -1)
    np.testing.assert_allclose(got.pixels, pixels, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(got.level_logits, full["level_logits"][0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.presence, full["presence"][0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.slice_logits, full["slice_logits"][0], rtol=0, atol=2e-2)
    study = jax.nn.sigmoid(full["study_logits"][0])
    np.testing.assert_allclose(got.probs, study, rtol=0, atol=2e-3)
    labels = np.argmax(full["seg_logits"][0], -1)
    assert got.segmentation.shape == labels.shape and (got.segmentation == labels).mean() > 0.99
    # What the tolerances rule out: levels that do not depend on the other slices.
    assert np.ptp(full["level_logits"][0], axis=0).min() > 0.1


def test_a_runs_thresholds_are_youdens_j_on_its_held_out_predictions(
    data_env, tmp_path, monkeypatch
):
    """The decision thresholds a run saves (`evaluate_run` on its held-out fold, which
    `trainer.finish_run` writes into metrics.json) are `metrics.decision_thresholds` of the
    held-out labels and of the whole-study predictor's probabilities, not a fallback."""
    env, cache_dir = data_env
    monkeypatch.setenv("CSPINE_CACHE", env["CSPINE_CACHE"])
    workdir = tmp_path / "run"
    save_random_heads_run(str(workdir))
    values = evaluation.evaluate_run(str(workdir), progress=False)
    with open(workdir / "eval" / "metrics.json") as f:
        saved = json.load(f)["thresholds"]

    model, config, _ = checkpoints.load_model(str(workdir))
    _, held_out = sources.split_entries(cache.read_entries(cache_dir), config.data, config.seed)
    predictor = evaluation.StudyPredictor(model, config.data.context)
    probs = np.stack([predictor(entry.image()).probs for entry in held_out])
    y_true = np.stack([entry.labels for entry in held_out])
    # Both classes among the held-out studies: patient_overall's threshold is its own.
    assert 0 < y_true[:, 0].sum() < len(held_out), y_true[:, 0]
    expected = metrics.decision_thresholds(y_true, probs)
    assert saved.keys() == expected.keys()
    for name in LABEL_COLUMNS:
        np.testing.assert_allclose(saved[name], expected[name], rtol=1e-6, err_msg=name)
    assert values["threshold"] == saved["patient_overall"]
    assert saved["patient_overall"] != metrics.FALLBACK_THRESHOLD
