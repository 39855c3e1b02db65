"""The two-stage baseline: model shapes and sizes, stage-2 learning, the stage-1 -> vertebra
stack assignment, the benchmark's time-to-quality, and evaluate.py's path on its checkpoint."""

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny, two_stage_tiny
from cspine_jax import checkpoints, evaluation, metrics, optim, systems
from cspine_jax.baseline import trainer as baseline_trainer
from cspine_jax.baseline import two_stage, vertebrae
from cspine_jax.baseline.predictor import TwoStagePredictor
from cspine_jax.data import cache, pipeline, sources
from cspine_jax.models import heads, single

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "train_time", os.path.join(ROOT, "benchmarks", "train_time.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gru_params(inputs: int, hidden: int) -> int:
    """nnx.GRUCell: input kernel and bias, recurrent kernel (no bias), for 3 gates."""
    return 3 * hidden * (inputs + 1) + 3 * hidden * hidden


def _abstract(create, config):
    """(graphdef, state) of a model's shapes: no initialiser runs."""
    return nnx.split(nnx.eval_shape(lambda: create(config, 0)))


def _init(config):
    """The two-stage model's parameters, initialised in one program (eagerly, each
    initialiser would compile on its own)."""
    return jax.jit(lambda: nnx.state(two_stage.create_model(config, 0)))()


def test_shapes_and_parameter_counts():
    config = two_stage_tiny.get_config()
    graphdef, state = _abstract(two_stage.create_model, config)
    model = nnx.merge(graphdef, state)
    grid, channels = config.data.grid, single.input_channels(config)
    labels = jax.eval_shape(
        lambda s, x: nnx.merge(graphdef, s).locate(x),
        state,
        jax.ShapeDtypeStruct((3, grid, grid, channels), jnp.float32),
    )
    assert labels.shape == (3, grid // 2, grid // 2) and labels.dtype == jnp.uint8
    stacks = config.model.stacks
    logits = jax.eval_shape(
        lambda s, x, f: nnx.merge(graphdef, s).classifier(x, f),
        state,
        jax.ShapeDtypeStruct(
            (2, 7, stacks.num_slices, stacks.crop, stacks.crop, channels), jnp.float32
        ),
        jax.ShapeDtypeStruct((2, 7), jnp.float32),
    )
    assert logits.shape == (2, 8) and logits.dtype == jnp.float32

    # Stage 1 is exactly SingleModel's backbone + decoder (same data and widths: configs/tiny.py),
    # so the comparison is like for like.
    one = nnx.merge(*_abstract(single.create_model, tiny.get_config()))
    assert single.param_count(model.segmenter) == (
        single.param_count(one.backbone) + single.param_count(one.decoder)
    )
    cls = config.model.classifier
    width, hidden = cls.widths[-1], cls.hidden
    head = (
        2 * width  # GroupNorm scale and bias
        + 2 * width * hidden
        + hidden  # embed
        + 7 * hidden  # level embedding
        + 2 * _gru_params(hidden, hidden)  # both directions
        + 4 * hidden
        + 1  # out
        + 2 * hidden
        + 1  # slice_out
        + 7
        + 2
    )  # per-level bias, overall affine
    assert single.param_count(model.classifier) == (
        single.param_count(model.classifier.backbone) + head
    )
    # Parameters are the whole state: no RNG or other state to checkpoint.
    assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("example", ["vertebra", "study"])
def test_stage2_loss_decreases_on_a_tiny_overfit(example):
    config = two_stage_tiny.get_config()
    config.stage2.example = example
    config.stage2.optim.update(lr=3e-3, warmup_steps=1, steps=1000)
    graphdef, _ = _abstract(two_stage.create_model, config)
    params = _init(config)
    initial = jax.device_get(params)
    tx, step = baseline_trainer.make_stage_step(
        config, "classifier", nnx.graphdef(nnx.merge(graphdef, params).classifier)
    )
    rng = np.random.default_rng(0)
    stacks = config.model.stacks
    shape = (stacks.num_slices, stacks.crop, stacks.crop, single.input_channels(config))
    if example == "study":
        labels = np.zeros((4, 8), np.float32)
        labels[0, [0, 2]] = labels[1, [0, 6, 7]] = 1.0  # two positive, two negative studies
        batch = {
            "image": rng.random((4, 7, *shape), np.float32),
            "found": np.ones((4, 7), np.float32),
            "warp": np.tile(pipeline.NO_WARP, (4, 7, 1)),
            "labels": labels,
            "slice_fracture": np.zeros((4, 7, stacks.num_slices), np.float32),
            "has_boxes": np.ones(4, np.float32),
        }
        batch["slice_fracture"][0, 1, 1] = batch["slice_fracture"][1, 5, 2] = 1.0
    else:  # eight stacks of four levels, half of them fractured
        batch = {
            "image": rng.random((8, *shape), np.float32),
            "warp": np.tile(pipeline.NO_WARP, (8, 1)),
            "level": np.array([0, 1, 2, 6] * 2, np.int32),
            "label": np.array([1, 0, 1, 0, 0, 1, 0, 1], np.float32),
            "slice_fracture": np.zeros((8, stacks.num_slices), np.float32),
            "has_boxes": np.ones(8, np.float32),
        }
        batch["slice_fracture"][0, 1] = batch["slice_fracture"][2, 3] = 1.0
    step = jax.jit(step)
    opt_state = tx.init(params["classifier"])
    losses = []
    for _ in range(40):
        params, opt_state, out = step(params, opt_state, batch)
        losses.append(float(out["loss"]))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], [round(x, 3) for x in losses]
    assert step._cache_size() == 1  # one compiled program for every step
    # Stage 2 trains the classifier only.
    for a, b in zip(
        jax.tree.leaves(params["segmenter"]), jax.tree.leaves(initial["segmenter"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_vertebra_loss_is_the_competitions_vertebra_weighting():
    config = two_stage_tiny.get_config()
    classifier = nnx.merge(_abstract(two_stage.create_model, config)[0], _init(config)).classifier
    stacks = config.model.stacks
    shape = (3, stacks.num_slices, stacks.crop, stacks.crop, single.input_channels(config))
    batch = {
        "image": np.zeros(shape, np.float32),
        "warp": np.tile(pipeline.NO_WARP, (3, 1)),
        "level": np.array([0, 3, 6], np.int32),
        "label": np.array([1, 0, 0], np.float32),
        "slice_fracture": np.zeros((3, stacks.num_slices), np.float32),
        "has_boxes": np.zeros(3, np.float32),
    }
    # A silent output: every logit is its level's prior.
    prior = two_stage.VERTEBRA_PRIOR
    classifier.bias[...] = jnp.full((7,), math.log(prior / (1 - prior)))
    classifier.out.kernel[...] = jnp.zeros_like(classifier.out.kernel[...])
    loss = float(
        single.weighted_loss(
            two_stage.vertebra_loss(classifier, batch), {"study": 1.0, "slice": 1.0}
        )[0]
    )
    expected = (2 * -math.log(prior) + 2 * -math.log(1 - prior)) / (2 + 1 + 1)
    assert loss == pytest.approx(expected, rel=1e-5)


def test_study_logits_are_the_vertebra_logits_of_its_stacks():
    config = two_stage_tiny.get_config()
    model = nnx.merge(_abstract(two_stage.create_model, config)[0], _init(config))
    kernel = model.classifier.out.kernel
    kernel[...] = jax.random.normal(jax.random.key(1), kernel[...].shape)
    stacks = config.model.stacks
    image = np.random.default_rng(0).random(
        (2, 7, stacks.num_slices, stacks.crop, stacks.crop, single.input_channels(config)),
        np.float32,
    )
    found = np.ones((2, 7), np.float32)
    found[1, 4] = 0.0
    study = np.asarray(model.classifier(image, found))
    alone = np.asarray(model.classifier.vertebra_logits(image[1], jnp.arange(7))[0])
    np.testing.assert_allclose(
        study[1, [1, 2, 3, 4, 6, 7]], alone[[0, 1, 2, 3, 5, 6]], rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(study[1, 5], model.classifier.bias[...][4])  # not found: prior
    assert np.ptp(alone) > 1e-3  # the test means something: stacks give different logits


def test_stage1_outputs_give_each_vertebra_its_slices_and_box():
    # Ground-truth-like labels at the segmentation stride: C1..C6 on 4 slices each, each in
    # its own box; a stray pixel of C3 far below it; C7 nowhere (a scan cut above it).
    z, h = 30, 16
    truth = np.zeros((z, h, h), np.uint8)
    for v in range(6):
        truth[2 + 4 * v : 6 + 4 * v, 2 + v : 10 + v, 4:12] = v + 1
    truth[28, 0, 0] = 3
    located = vertebrae.locate(truth, min_area=0.01)  # 2.6 of 256 pixels

    slices = vertebrae.vertebra_slices(located.area, 0.01)
    for v in range(6):
        np.testing.assert_array_equal(
            slices[v], np.arange(2 + 4 * v, 6 + 4 * v), err_msg=f"C{v + 1}"
        )
        np.testing.assert_allclose(
            located.boxes[v], np.array([2 + v, 4, 10 + v, 12]) / h, err_msg=f"C{v + 1}"
        )
        np.testing.assert_allclose(located.area[2 + 4 * v, v], 64 / 256)
    assert len(slices[6]) == 0
    np.testing.assert_array_equal(located.boxes[6], [0, 0, 1, 1])

    # Stacks: every sampled slice is one of the vertebra's, evenly spread, ascending.
    image = np.broadcast_to(
        np.arange(z, dtype=np.uint8)[:, None, None, None], (z, 32, 32, 1)
    ).copy()
    config = {"num_slices": 6, "crop": 8, "margin": 0.1, "min_area": 0.01}
    stacks, found, warps, _ = vertebrae.study_stacks(image, located, config, context=1)
    assert stacks.shape == (7, 6, 8, 8, 2)
    np.testing.assert_array_equal(warps, np.tile(pipeline.NO_WARP, (7, 1)))
    np.testing.assert_array_equal(found, [1, 1, 1, 1, 1, 1, 0])
    for v in range(6):
        picked = np.rint(stacks[v, :, 0, 0, 0] * 255).astype(int)
        assert set(picked) == set(slices[v]) and np.all(np.diff(picked) >= 0), (v, picked)
    assert not stacks[6].any()
    jittered, *_ = vertebrae.study_stacks(
        image, located, config, context=1, rng=np.random.default_rng(0)
    )
    assert np.isin(np.rint(jittered[0, :, 0, 0, 0] * 255), slices[0]).all()
    # In training a stack is drawn to the boxed fracture slices, as the single model's are.
    boxed = np.zeros(z, bool)
    boxed[3] = True
    one = {**config, "num_slices": 1}
    for seed in range(5):
        focused, *_ = vertebrae.study_stacks(
            image,
            located,
            one,
            context=1,
            rng=np.random.default_rng(seed),
            focus=boxed,
            focus_prob=1.0,
        )
        assert np.rint(focused[0, 0, 0, 0, 0] * 255) == 3


def test_vertebra_examples_mix_studies_and_carry_their_level_label(data_env):
    """Stage 2's vertebra examples: every vertebra stage 1 found, once an epoch, with its own
    study's C1..C7 label; a batch draws its stacks from many studies."""
    config = two_stage_tiny.get_config()
    entries = cache.read_entries(data_env[1])
    rng = np.random.default_rng(0)
    located = {}
    for e in entries:
        area = np.zeros((e.num_slices, 7), np.float32)
        for v in range(7):
            if rng.random() < 0.8:  # stage 1 misses ~1 in 5 vertebrae
                area[v : v + 3, v] = 0.1
        located[e.uid] = vertebrae.Located(area, np.tile([0.2, 0.2, 0.8, 0.8], (7, 1)))
    found = {
        (i, v) for i, e in enumerate(entries) for v in range(7) if located[e.uid].area[:, v].any()
    }
    batch_size = 8
    ds = vertebrae.vertebra_train_dataset(
        entries, located, config.data, config.model.stacks, seed=0, global_batch=batch_size
    )
    stacks = config.model.stacks
    seen = []
    for t in range(len(found) // batch_size):
        batch = ds[t]
        assert batch["image"].shape == (
            batch_size,
            stacks.train_slices,
            stacks.crop,
            stacks.crop,
            single.input_channels(config),
        )
        assert batch["warp"].shape == (batch_size, 4)
        for i, v, label in zip(batch["study_index"], batch["level"], batch["label"], strict=True):
            assert label == entries[i].labels[1 + v]
            seen.append((int(i), int(v)))
        assert len(set(batch["study_index"].tolist())) >= batch_size // 2
    assert len(seen) == len(set(seen)) and set(seen) <= found  # an epoch: each pair once
    # Process shards of a global batch are its halves, interleaved.
    halves = [
        vertebrae.vertebra_train_dataset(
            entries,
            located,
            config.data,
            config.model.stacks,
            seed=0,
            global_batch=batch_size,
            process_index=p,
            process_count=2,
        )[0]["study_index"]
        for p in range(2)
    ]
    np.testing.assert_array_equal(np.stack(halves, 1).ravel(), ds[0]["study_index"])


def test_crop_box_resamples_the_box():
    rows = np.arange(32, dtype=np.float32)
    stacks = np.broadcast_to(rows[None, :, None, None], (2, 32, 32, 1))
    box = np.array([8, 4, 24, 20]) / 32  # 16 x 16 pixels
    crop = vertebrae.crop_box(stacks, box, margin=0.0, size=16)
    np.testing.assert_allclose(crop[0, :, 0, 0], np.arange(8, 24))  # same scale: exact pixels
    half = vertebrae.crop_box(stacks, box, margin=0.0, size=8)  # at least 8 px: downsampled
    np.testing.assert_allclose(half[0, :, 0, 0], np.arange(8.5, 24, 2))
    small = vertebrae.crop_box(stacks, np.array([15, 15, 17, 17]) / 32, margin=0.0, size=8)
    np.testing.assert_allclose(small[0, :, 0, 0], np.arange(12, 20))  # never upsampled


def test_time_to_quality_on_synthetic_curves():
    bench = _load_benchmark()
    seconds = np.array([10.0, 20.0, 30.0, 40.0])
    two = (np.array([100.0, 200.0, 300.0]), np.array([0.60, 0.50, 0.45]))
    single = (seconds, np.array([0.70, 0.55, 0.45, 0.40]))  # reaches 0.45 exactly at 30 s
    assert bench.time_to_quality(*single, 0.45) == 30.0
    assert bench.quality_ratio(single, two) == (30.0, 300.0, 0.1)
    # A baseline whose loss was already this low earlier counts from then.
    dip = (two[0], np.array([0.60, 0.44, 0.45]))
    assert bench.quality_ratio(single, dip)[1:] == (200.0, 30.0 / 200.0)
    never = (seconds, np.array([0.7, 0.6, 0.5, 0.46]))
    t_single, _, ratio = bench.quality_ratio(never, two)
    assert t_single == math.inf and ratio == math.inf


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A stage-2 checkpoint of a tiny two-stage model, saved as the trainer saves it, whose
    stage 1 puts C1 on every slice and whose stage 2 reads its stack, on tiny phantoms."""
    root = str(tmp_path_factory.mktemp("cspine_cache"))
    os.environ["CSPINE_CACHE"] = root
    config = two_stage_tiny.get_config()
    train, _ = sources.split_entries(
        cache.read_entries(sources.prepared_cache(config.data, progress=False)),
        config.data,
        config.seed,
    )
    params = _init(config)
    bias = np.zeros(heads.NUM_CLASSES + 1, np.float32)
    bias[1] = 10.0  # C1 everywhere
    params["segmenter"]["decoder"]["out"]["bias"][...] = bias
    kernel = params["classifier"]["out"]["kernel"]
    kernel[...] = np.random.default_rng(0).normal(0.0, 1.0, kernel.shape).astype(np.float32)
    tx = optim.make_optimizer(config.stage2.optim)
    state = {"params": params, "opt_state": tx.init(params["classifier"])}
    workdir = str(tmp_path_factory.mktemp("two_stage"))
    data = pipeline.iterate(pipeline.eval_dataset(train, config.data, 4))
    with checkpoints.manager(workdir) as mngr:
        checkpoints.save(mngr, 2, state, data, config, {"val_loss": 0.5, "train_seconds": 1.0})
    yield config, workdir
    del os.environ["CSPINE_CACHE"]


def test_evaluate_path_scores_a_two_stage_checkpoint(run):
    config, workdir = run
    model, saved, step = checkpoints.load_model(workdir)
    assert isinstance(model, two_stage.TwoStageModel) and saved.model.family == "two_stage"
    assert step == 2
    values = evaluation.evaluate_run(workdir, progress=False)  # what evaluate.py runs

    # The same metrics.json keys as the single model's evaluation.
    y = np.array([[1, 1, 0, 0, 0, 0, 0, 0], [0] * 8], np.float32)
    single_keys = {
        "step",
        *metrics.study_metrics(y, np.full((2, 8), 0.5), 0.5),
        *metrics.dice_iou(np.eye(8)),
    }
    assert set(values) == single_keys
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        assert evaluation.metrics_from_json(json.load(f)) == pytest.approx(values, nan_ok=True)
    _, held_out = sources.split_entries(
        cache.read_entries(sources.prepared_cache(config.data, progress=False)),
        config.data,
        config.seed,
    )
    with open(os.path.join(workdir, "eval", "submission.csv"), newline="") as f:
        assert len(list(csv.reader(f))) == 1 + 8 * len(held_out)

    # Stage 1 -> C1's stack -> stage 2: only C1 is found, and only its probability depends
    # on the study; the others are the prior.
    predictor = systems.get(saved).make_predictor(model, saved)
    assert isinstance(predictor, TwoStagePredictor)
    predictions = [predictor(e.image()) for e in held_out]
    probs = np.stack([p.probs for p in predictions])
    assert (predictions[0].segmentation == 1).all() and predictions[0].slice_logits is None
    assert np.ptp(probs[:, 1]) > 1e-4
    np.testing.assert_allclose(probs[:, 2:], two_stage.VERTEBRA_PRIOR, rtol=1e-5)


def _train_two_stage(env, workdir, *overrides):
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config=configs/two_stage_tiny.py",
        f"--workdir={workdir}",
        *overrides,
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_train_py_runs_both_stages_and_resumes_stage2(data_env, tmp_path):
    """`python train.py --config=configs/two_stage_tiny.py` end to end: stage 1, locate,
    stage 2, held-out evaluation; the clock carries from stage 1 into stage 2; a longer
    second run keeps stage 1 and the locate pass and resumes stage 2 where it stopped."""
    env, _ = data_env
    workdir = tmp_path / "two_stage"
    config = two_stage_tiny.get_config()
    first = _train_two_stage(env, workdir)
    assert "held-out results" in first.stdout
    with (
        checkpoints.manager(str(workdir / "stage1"), read_only=True) as stage1,
        checkpoints.manager(str(workdir), read_only=True) as stage2,
    ):
        assert stage1.latest_step() == config.stage1.optim.steps
        assert stage2.latest_step() == config.stage2.optim.steps
        stage1_seconds = stage1.metrics(stage1.latest_step())["train_seconds"]
        stage2_first = stage2.metrics(2)["train_seconds"]
        stage2_last = stage2.metrics(stage2.latest_step())["train_seconds"]
    located = vertebrae.load_located(str(workdir / "stage1" / "located.npz"), [])[1]
    # Stage 2's clock starts after stage 1 and the locate pass, and keeps running.
    assert stage1_seconds + located <= stage2_first < stage2_last
    with open(workdir / "metrics.json") as f:
        assert json.load(f)["step"] == config.stage2.optim.steps

    steps = config.stage2.optim.steps + 2
    second = _train_two_stage(env, workdir, f"--config.stage2.optim.steps={steps}")
    assert f"stage1: resumed from step {config.stage1.optim.steps}" in second.stdout
    assert f"stage2: resumed from step {config.stage2.optim.steps}" in second.stdout
    with checkpoints.manager(str(workdir), read_only=True) as stage2:
        assert stage2.latest_step() == steps
        assert stage2.metrics(steps)["train_seconds"] > stage2_last
