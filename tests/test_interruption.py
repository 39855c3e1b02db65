"""Interruption: kill -9 of training and of the prepare job at random moments (mid-save,
mid-deletion of a checkpoint, mid-study), then resume: no listed checkpoint and no cache
entry is ever half-written, and the result equals an uninterrupted run bitwise.

The kill loops live in benchmarks/interruption.py; benchmarks/interruption_soak.py runs
them many more times. Every test here starts and kills processes: the whole module is `slow`.
"""

import random
import shutil
import signal
import subprocess
import sys

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.interruption import (
    ROOT,
    assert_caches_equal,
    assert_entries_match,
    check_checkpoints,
    latest_params,
    prepare_cmd,
    soak_prepare,
    soak_training,
    train_cmd,
)
from cspine_jax import checkpoints
from tests.helpers import run_train

pytestmark = pytest.mark.slow

STEPS, EVERY = 16, 2
OVERRIDES = (f"--config.optim.steps={STEPS}", f"--config.checkpoint.every={EVERY}")


@pytest.fixture(scope="module")
def env(data_env):
    """The session's tiny data, on one CPU device like every run compared here."""
    return {**data_env[0], "JAX_NUM_CPU_DEVICES": "1"}


@pytest.fixture(scope="module")
def straight(env, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    workdir = tmp_path_factory.mktemp("straight")
    run_train(env, workdir, *OVERRIDES)
    return workdir


def _assert_same_params(a, b):
    step_a, params_a = latest_params(a)
    step_b, params_b = latest_params(b)
    assert step_a == step_b and params_a.keys() == params_b.keys()
    for name in params_a:
        np.testing.assert_array_equal(params_b[name], params_a[name], err_msg=name)
    return step_a


def test_training_killed_five_times_ends_bitwise_equal(env, straight, tmp_path):
    log = soak_training(tmp_path / "killed", env, OVERRIDES, kills=5, rng=random.Random(0))
    found = [f for f, _ in log]
    assert "finished" not in found and "saving" in found, log
    assert log[-1][1], "no checkpoint survived the kills: resuming was never tested"
    assert _assert_same_params(straight, tmp_path / "killed") == STEPS


# Saves three steps of a toy state keeping one (so each save deletes the step before), and
# kills itself half-way through the first deletion of files in the checkpoint folder.
_KILL_MID_DELETION = r"""
import os, signal, sys
from pathlib import Path

import grain, jax.numpy as jnp, ml_collections
from cspine_jax import checkpoints

folder, unlink, seen = Path(sys.argv[1]) / "checkpoints", os.unlink, []

def unlink_or_die(path, *args, dir_fd=None, **kwargs):
    full = path if dir_fd is None else os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    if ".orbax-checkpoint-tmp" not in str(full):
        seen.append(full)
        if len(seen) == half:
            os.kill(os.getpid(), signal.SIGKILL)
    return unlink(path, *args, dir_fd=dir_fd, **kwargs)

mngr = checkpoints.manager(sys.argv[1], keep=1)
data = iter(grain.MapDataset.range(8).to_iter_dataset())
for step in (1, 2, 3):
    state = {"params": {"w": jnp.full(3, float(step))}, "opt_state": {"count": jnp.int32(step)}}
    checkpoints.save(mngr, step, state, data, ml_collections.ConfigDict({"seed": 0}),
                     {"val_loss": 4.0 - step})
    if step == 1:
        mngr.wait_until_finished()
        half = sum(len(files) for _, _, files in os.walk(folder / "1")) // 2
        os.unlink = os.remove = unlink_or_die
checkpoints.close(mngr)
"""


def test_kill_half_way_through_deleting_a_step_leaves_every_listed_step_readable(env, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", _KILL_MID_DELETION, str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    mngr = checkpoints.manager(str(tmp_path), read_only=True)
    steps = mngr.all_steps()
    assert steps, "no step left at all"
    like = {"params": {"w": jnp.zeros(3)}, "opt_state": {"count": jnp.int32(0)}}
    for step in steps:  # every item of it: state, data iterator, config, metrics
        data = iter(grain.MapDataset.range(8).to_iter_dataset())
        assert float(checkpoints.restore(mngr, step, like, data)["params"]["w"][0]) == step
        assert checkpoints.saved_config(mngr, step).seed == 0
        assert mngr.metrics(step)["val_loss"] == 4.0 - step
    mngr.close()
    # The next run's manager clears what the kill left half-deleted.
    checkpoints.close(checkpoints.manager(str(tmp_path), keep=1))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        str(s) for s in sorted(steps)
    ]


def test_diverging_run_stops_in_one_line_and_keeps_its_checkpoints(env, straight, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    listed = check_checkpoints(workdir)
    # A NaN learning rate: every gradient finite, every update NaN.
    result = subprocess.run(
        train_cmd(
            workdir,
            f"--config.optim.steps={STEPS + 8}",
            f"--config.checkpoint.every={EVERY}",
            "--config.optim.lr=nan",
        ),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"train.py: error: loss, gradients or parameters not finite in steps {STEPS + 1}-"
            f"{STEPS + 2}; stopping with the last good parameters in {workdir}/checkpoints."
        )
    )
    assert check_checkpoints(workdir) == listed
    _assert_same_params(straight, workdir)


# The prepare CLI, killed just before it publishes its third study: all its files written,
# in a temporary folder not yet renamed into place.
_KILL_BEFORE_PUBLISHING = r"""
import os, signal, sys
from absl import app
from cspine_jax.data import prepare

rename, published = os.rename, []

def rename_or_die(src, dst, *args, **kwargs):
    if os.path.basename(src).startswith(".tmp-"):
        published.append(dst)
        if len(published) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst, *args, **kwargs)

os.rename = rename_or_die
prepare._define_flags()
app.run(lambda argv: sys.exit(prepare.main(argv)))
"""


def test_prepare_killed_mid_study_resumes_to_the_same_cache(env, phantom_dir, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "killed"
    result = subprocess.run(
        prepare_cmd(phantom_dir, reference),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    killed = subprocess.run(
        [sys.executable, "-c", _KILL_BEFORE_PUBLISHING, *prepare_cmd(phantom_dir, out)[3:]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (unpublished,) = [p for p in (out / "studies").iterdir() if p.name.startswith(".tmp-")]
    assert (unpublished / "meta.json").exists()  # complete, yet not an entry
    assert assert_entries_match(out, reference) == 2

    landed = soak_prepare(phantom_dir, out, reference, env, kills=3, rng=random.Random(0))
    assert landed >= 2
    assert_caches_equal(out, reference)
