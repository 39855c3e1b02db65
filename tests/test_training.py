"""Training: data-parallel equivalence, multi-process training, fresh restore (kill -9 and
exact resume: test_interruption.py).

The end-to-end runs use `python train.py --config=configs/tiny.py` in subprocesses, as a
user would, over one phantom set and cache shared by the whole session (conftest).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import portpicker
from conftest import ROOT, latest_params, run_train, train_cmd
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import tiny
from cspine_jax import checkpoints, optim, trainer
from cspine_jax.data import cache, pipeline, sources
from cspine_jax.models import spine_net


def test_sharded_step_equals_single_device_step(data_env):
    _, cache_dir = data_env
    assert jax.device_count() == 8
    config = tiny.get_config()
    config.optim.batch_size = 8
    train, _ = sources.split_entries(cache.read_entries(cache_dir), config.data, config.seed)
    batch = next(pipeline.iterate(pipeline.train_dataset(train, config.data, seed=0,
                                                         global_batch=8)))
    model = spine_net.create_model(config, 0)
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
        return (lambda state: step(*jax.device_put(state, replicated), global_batch),
                lambda params: grads(jax.device_put(params, replicated), global_batch))

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
    # Adam divides by the gradient's own scale, so a coordinate whose gradient is pure
    # rounding noise moves by a noise-driven step on either mesh; every other parameter
    # must agree to 1e-5.
    assert len(rounding_level) <= 2, rounding_level
    changed = 0
    for name, a, b, old in zip(names, jax.tree.leaves(p1), jax.tree.leaves(p8),
                               jax.tree.leaves(before), strict=True):
        if name not in rounding_level:
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=name)
        changed += not np.array_equal(a, old)
    assert changed > 0.9 * len(names)  # the step really updated the model


def test_two_processes_train_like_one(data_env, tmp_path):
    env, _ = data_env
    overrides = ("--config.optim.steps=4", "--config.checkpoint.every=4")
    run_train(env, tmp_path / "one", *overrides, devices=4)
    port = portpicker.pick_unused_port()
    # Without the shared compile cache: a process that loads the step from the cache reaches
    # gloo's first collective long before one that compiles it, and on a loaded 2-core
    # machine the wait outlasts gloo's fixed 30 s context timeout.
    two_env = {k: v for k, v in env.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    two_env["JAX_NUM_CPU_DEVICES"] = "2"
    procs = [subprocess.Popen(
        train_cmd(tmp_path / "two", *overrides, "--config.distributed.num_processes=2",
                  f"--config.distributed.process_id={i}",
                  f"--config.distributed.coordinator=127.0.0.1:{port}"),
        cwd=ROOT, env=two_env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "4 devices in 2 process(es)" in outputs[0]
    _, one = latest_params(tmp_path / "one")
    _, two = latest_params(tmp_path / "two")
    # As in the 8-device test: Adam turns a coordinate whose gradient is rounding noise into a
    # noise-driven step, so at most two leaves may differ, and by far less than one Adam step
    # (lr 2e-3), while every other parameter agrees to 1e-5.
    noisy = [name for name in one
             if not np.allclose(two[name], one[name], rtol=1e-5, atol=1e-6)]
    assert len(noisy) <= 2, noisy
    for name in noisy:
        np.testing.assert_allclose(two[name], one[name], rtol=0, atol=1e-4, err_msg=name)


def test_checkpoint_restores_in_a_fresh_process(data_env, tmp_path):
    env, _ = data_env
    result = run_train(env, tmp_path / "run", "--config.optim.steps=4",
                       "--config.checkpoint.every=2")
    assert "held-out results" in result.stdout
    probe = (
        "import json, sys; from cspine_jax import checkpoints;"
        "model, config, step = checkpoints.load_model(sys.argv[1]);"
        "k = model.backbone.stem.kernel[...];"
        "print(json.dumps({'step': step, 'sum': float(k.sum()), 'grid': config.data.grid}))"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "run")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    restored = json.loads(out.stdout.strip().splitlines()[-1])
    model, config, step = checkpoints.load_model(str(tmp_path / "run"))
    assert restored == {"step": step, "sum": float(model.backbone.stem.kernel[...].sum()),
                        "grid": tiny.get_config().data.grid}
    fresh = spine_net.create_model(config, 123)
    assert float(fresh.backbone.stem.kernel[...].sum()) != restored["sum"]


def test_evaluate_reproduces_the_metrics_training_printed(data_env, tmp_path):
    env, _ = data_env
    run = tmp_path / "run"
    printed = run_train(env, run, "--config.optim.steps=4", "--config.checkpoint.every=2").stdout
    result = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"),
                             f"--workdir={run}"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
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
