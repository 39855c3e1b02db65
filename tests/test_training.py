"""Training: data-parallel equivalence, gradient accumulation, multi-process training, fresh
restore (kill -9 and exact resume: test_interruption.py).

The end-to-end runs use `python train.py --config=configs/tiny.py` in subprocesses, as a
user would, over one phantom set and cache shared by the whole session (conftest).
"""

import functools
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.interruption import latest_params, train_cmd
from configs import tiny
from cspine_jax import checkpoints, optim, trainer
from cspine_jax.data import cache, pipeline, sources
from cspine_jax.data.preprocess import Prepared
from cspine_jax.models import single
from tests.helpers import ROOT, run_train


def test_sharded_step_equals_single_device_step(data_env):
    _, cache_dir = data_env
    assert jax.device_count() == 8
    config = tiny.get_config()
    config.optim.batch_size = 8
    train, _ = sources.split_entries(cache.read_entries(cache_dir), config.data, config.seed)
    batch = next(
        pipeline.iterate(pipeline.train_dataset(train, config.data, seed=0, global_batch=8))
    )
    model = single.create_model(config, 0)
    graphdef, params = nnx.split(model)
    tx = optim.make_optimizer(config.optim)
    step_fn = trainer.make_train_step(graphdef, tx, config)

    grad_fn = trainer.make_grad_fn(graphdef, config)

    def on_mesh(devices):
        """(train step, gradient) functions over a data mesh of `devices`."""
        mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
        replicated = NamedSharding(mesh, P())
        step = jax.jit(step_fn, out_shardings=(replicated, replicated, replicated))
        grads = jax.jit(grad_fn, out_shardings=replicated)
        global_batch = trainer.to_global(batch, NamedSharding(mesh, P("data")))
        assert len(global_batch["image"].sharding.device_set) == len(devices)
        return (
            lambda state: step(*jax.device_put(state, replicated), global_batch),
            lambda params: grads(jax.device_put(params, replicated), global_batch),
        )

    (step_1, grads_1), (step_8, grads_8) = on_mesh(jax.devices()[:1]), on_mesh(jax.devices())
    state = (params, tx.init(params))
    for _ in range(3):  # leave the degenerate initial point (zero-initialised heads)
        *state, _ = step_1(state)
    before = jax.device_get(state[0])
    p1, _, m1 = jax.device_get(step_1(state))
    p8, _, m8 = jax.device_get(step_8(state))
    (_, _), g1 = jax.device_get(grads_1(state[0]))
    (_, _), g8 = jax.device_get(grads_8(state[0]))

    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    assert m1["skipped"] == 0 and m8["skipped"] == 0
    norm = float(m1["grad_norm"])
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(g1)[0]]
    rounding_level = []
    for name, a, b in zip(names, jax.tree.leaves(g1), jax.tree.leaves(g8), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * norm, err_msg=name)
        if np.abs(a).max() < 1e-6 * norm:
            rounding_level.append(name)
    # Adam divides by the gradient's own scale, so a coordinate whose gradient is at rounding
    # level moves by a noise-driven step on either mesh; every other parameter must agree
    # to 1e-5. Only the z-context attention's queries, keys and distance bias may be there:
    # their gradients vanish while its weights are near uniform (only the masked studies'
    # level loss trains them), beside the rate-scaled calibrations that set the norm.
    attention = re.compile(r"\['zcontext'\]\['blocks'\]\[\d+\]\['(query|key|bias)'\]")
    assert all(attention.match(name) for name in rounding_level), rounding_level
    changed = 0
    for name, a, b, old in zip(
        names, jax.tree.leaves(p1), jax.tree.leaves(p8), jax.tree.leaves(before), strict=True
    ):
        if name not in rounding_level:
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=name)
        changed += not np.array_equal(a, old)
    assert changed > 0.9 * len(names)  # the step really updated the model


def _random_studies(root, studies):
    """A cache on configs/tiny.py's grid of random studies, one per (has mask, has boxes,
    positive) in `studies`."""
    data = tiny.get_config().data
    grid, windows = data.grid, len(data.windows)
    cache.open_cache(root, {"grid": grid}, root)
    rng = np.random.default_rng(0)
    for i, (masked, boxed, positive) in enumerate(studies):
        z = 12 + i
        image = rng.integers(0, 256, (z, grid, grid, windows), dtype=np.uint8)
        mask = rng.integers(0, 10, (z, grid, grid), dtype=np.uint8) if masked else None
        fracture = np.zeros((z, grid, grid), np.uint8)
        if boxed:
            fracture[3:7, 8 + i : 14 + i, 10:18] = 1
        labels = np.array([positive, positive] + [0] * 6, np.float32)
        cache.write_entry(
            root,
            f"1.2.{i}",
            Prepared(image, mask, fracture, (4.0, 1.0, 1.0)),
            labels,
            has_boxes=boxed,
            extra={},
        )
    return cache.read_entries(root)


@pytest.fixture(scope="module")
def accumulation(tmp_path_factory):
    """(step(k): the jitted train step with optim.grad_accum = k, a trained-for-3-steps
    state, {kind: a global batch of 4 from the pipeline}).

    "balanced": every study masked, negative and box-less, so each loss term's normaliser
    (studies with a mask, located studies, box pixels) is the same in every micro-batch.
    "mixed": studies with and without masks and boxes, positive and negative, unevenly
    spread over the micro-batches.
    """
    config = tiny.get_config()
    root = tmp_path_factory.mktemp("accumulation")
    balanced = _random_studies(str(root / "balanced"), [(True, False, False)] * 8)
    mixed = _random_studies(
        str(root / "mixed"),
        [
            (True, True, True),
            (False, False, False),
            (True, False, True),
            (False, True, True),
            (True, False, False),
            (False, False, True),
            (True, True, False),
            (False, False, False),
        ],
    )
    # Box-less studies give the fracture stream nothing to draw: balanced trains without it,
    # mixed with it (its slices are averaged per micro-batch too).
    without_stream = config.data.copy_and_resolve_references()
    without_stream.stream.slices = 0
    batches = {
        name: next(pipeline.iterate(pipeline.train_dataset(entries, data, seed=0, global_batch=4)))
        for name, entries, data in (
            ("balanced", balanced, without_stream),
            ("mixed", mixed, config.data),
        )
    }
    assert "stream_image" in batches["mixed"]
    assert batches["balanced"]["has_mask"].all()
    has_mask = batches["mixed"]["has_mask"]
    assert has_mask[:2].sum() != has_mask[2:].sum(), has_mask  # micro-batches differ
    graphdef, params = nnx.split(single.create_model(config, 0))
    tx = optim.make_optimizer(config.optim)

    @functools.cache
    def step(accum):
        accum_config = tiny.get_config()
        accum_config.optim.grad_accum = accum
        return jax.jit(trainer.make_train_step(graphdef, tx, accum_config))

    state = (params, tx.init(params))
    for _ in range(3):  # leave the zero-initialised heads and the warm-up's lr = 0
        *state, _ = step(1)(*state, batches["balanced"])
    return step, tuple(state), batches


# balanced: every micro-batch averages over as many studies and pixels as the others; mixed:
# masks, boxes and positives spread unevenly, so each term's denominator differs by micro-batch.
@pytest.mark.parametrize("kind", ["balanced", "mixed"])
@pytest.mark.parametrize("accum", [2, 4])
def test_accumulated_step_equals_one_step_on_the_global_batch(accumulation, accum, kind):
    step, state, batches = accumulation
    batch = batches[kind]
    p1, o1, m1 = jax.device_get(step(1)(*state, batch))
    pk, ok, mk = jax.device_get(step(accum)(*state, batch))

    assert m1.keys() == mk.keys() and mk["skipped"] == 0
    for name in m1:  # loss, its terms, the gradient norm
        np.testing.assert_allclose(mk[name], m1[name], rtol=1e-5, atol=1e-7, err_msg=name)
    norm = float(m1["grad_norm"])
    leaves = jax.tree_util.tree_flatten_with_path(o1)[0]
    mus = 0
    for (path, a), b in zip(leaves, jax.tree.leaves(ok), strict=True):
        if ".mu" in jax.tree_util.keystr(path):  # Adam's first moment: the same gradients
            mus += 1
            np.testing.assert_allclose(
                b, a, rtol=1e-5, atol=1e-6 * norm, err_msg=jax.tree_util.keystr(path)
            )
    assert mus == len(jax.tree.leaves(p1))
    before = jax.device_get(state[0])
    changed = 0
    for (path, a), b, old in zip(
        jax.tree_util.tree_flatten_with_path(p1)[0],
        jax.tree.leaves(pk),
        jax.tree.leaves(before),
        strict=True,
    ):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
        changed += not np.array_equal(a, old)
    assert changed > 0.9 * len(jax.tree.leaves(p1))  # the step really updated the model


@pytest.mark.slow
def test_two_processes_train_like_one(data_env, tmp_path):
    env, _ = data_env
    # Fold 1: its held-out studies, in evaluation order, alternate negative and positive, so
    # scoring a study with another's probabilities changes the validation loss.
    overrides = ("--config.optim.steps=4", "--config.checkpoint.every=2", "--config.data.fold=1")
    run_train(env, tmp_path / "one", *overrides, devices=4)
    port = portpicker.pick_unused_port()
    # Without the shared compile cache: a process that loads the step from the cache reaches
    # gloo's first collective long before one that compiles it, and on a loaded 2-core
    # machine the wait outlasts gloo's fixed 30 s context timeout.
    two_env = {k: v for k, v in env.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    two_env["JAX_NUM_CPU_DEVICES"] = "2"
    procs = [
        subprocess.Popen(
            train_cmd(
                tmp_path / "two",
                *overrides,
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
                f"--config.distributed.coordinator=127.0.0.1:{port}",
            ),
            cwd=ROOT,
            env=two_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "4 devices in 2 process(es)" in outputs[0]
    _, one = latest_params(tmp_path / "one")
    _, two = latest_params(tmp_path / "two")
    # As in the 8-device test: Adam turns a coordinate whose gradient is rounding noise into a
    # noise-driven step, so at most two leaves may differ, and by far less than one Adam step
    # (lr 2e-3), while every other parameter agrees to 1e-5.
    noisy = [name for name in one if not np.allclose(two[name], one[name], rtol=1e-5, atol=1e-6)]
    assert len(noisy) <= 2, noisy
    for name in noisy:
        np.testing.assert_allclose(two[name], one[name], rtol=0, atol=1e-4, err_msg=name)
    # The held-out values that choose the best checkpoint, at every saved step: two processes
    # each evaluate their rows of every validation batch and must score the same studies.
    one_metrics, two_metrics = _saved_metrics(tmp_path / "one"), _saved_metrics(tmp_path / "two")
    assert list(one_metrics) == list(two_metrics) == [2, 4]
    for step, expected in one_metrics.items():
        got = two_metrics[step]
        assert got.keys() == expected.keys() and checkpoints.BEST_METRIC in got, got
        for key in expected.keys() - {"train_seconds"}:  # the clock is no result
            np.testing.assert_allclose(
                got[key], expected[key], rtol=1e-6, atol=1e-7, err_msg=f"step {step}: {key}"
            )


def _saved_metrics(workdir):
    """{step: the validation metrics saved with it} of a run's checkpoints."""
    with checkpoints.manager(str(workdir), read_only=True) as mngr:
        return {step: mngr.metrics(step) for step in sorted(mngr.all_steps())}


@pytest.mark.slow
def test_checkpoint_restores_in_a_fresh_process(data_env, tmp_path):
    env, _ = data_env
    result = run_train(
        env, tmp_path / "run", "--config.optim.steps=4", "--config.checkpoint.every=2"
    )
    assert "held-out results" in result.stdout
    probe = (
        "import json, sys; from cspine_jax import checkpoints;"
        "model, config, step = checkpoints.load_model(sys.argv[1]);"
        "k = model.backbone.stem.kernel[...];"
        "print(json.dumps({'step': step, 'sum': float(k.sum()), 'grid': config.data.grid}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "run")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    restored = json.loads(out.stdout.strip().splitlines()[-1])
    model, config, step = checkpoints.load_model(str(tmp_path / "run"))
    assert restored == {
        "step": step,
        "sum": float(model.backbone.stem.kernel[...].sum()),
        "grid": tiny.get_config().data.grid,
    }
    fresh = single.create_model(config, 123)
    assert float(fresh.backbone.stem.kernel[...].sum()) != restored["sum"]
    # Nor the untrained model of the run's own seed: the restored parameters are the trained
    # ones, not a re-initialisation that the saved config would reproduce.
    untrained = single.create_model(config, config.seed)
    assert float(untrained.backbone.stem.kernel[...].sum()) != restored["sum"]
    assert not np.allclose(
        untrained.backbone.stem.kernel[...], model.backbone.stem.kernel[...], rtol=0, atol=1e-5
    )


@pytest.mark.slow
def test_evaluate_reproduces_the_metrics_training_printed(data_env, tmp_path):
    env, _ = data_env
    run = tmp_path / "run"
    printed = run_train(env, run, "--config.optim.steps=4", "--config.checkpoint.every=2").stdout
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "evaluate.py"), f"--workdir={run}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run / "metrics.json") as f:
        trained = json.load(f)
    with open(run / "eval" / "metrics.json") as f:
        evaluated = json.load(f)
    assert evaluated.keys() == trained.keys()
    for key in ("competition_loss", "auc_mean_vertebra", "macro_f1", "dice_C2"):
        assert f"{key} " in printed
        np.testing.assert_allclose(evaluated[key], trained[key], rtol=1e-6, err_msg=key)
    for name in ("submission.csv", "roc.png", "reliability.png", "level_confusion.png"):
        assert (run / "eval" / name).stat().st_size > 0
    assert list((run / "eval" / "tensorboard").glob("events.out.tfevents.*"))
    with open(run / "eval" / "submission.csv") as f:
        rows = f.read().splitlines()
    assert rows[0] == "row_id,fractured" and len(rows) == 1 + 8 * 4  # 4 held-out studies

    # The test set (4 tiny phantoms of another seed): scored with the held-out thresholds,
    # saved with the same names, printed beside the held-out column.
    with open(run / "test_metrics.json") as f:
        test = json.load(f)
    assert test.keys() == trained.keys() and test["studies"] == 4
    assert test["thresholds"] == trained["thresholds"]
    assert test["thresholds_from"].startswith(str(run / "metrics.json"))
    assert "test (4 studies, never selected on)" in printed

    def study_uids(submission_rows):  # row_id: <uid>_patient_overall or <uid>_C<v>
        return {re.sub(r"_(patient_overall|C[1-7])$", "", r.split(",")[0]) for r in submission_rows}

    test_uids = study_uids((run / "test" / "submission.csv").read_text().splitlines()[1:])
    held_uids = study_uids(rows[1:])
    assert len(test_uids) == 4 and not test_uids & held_uids
