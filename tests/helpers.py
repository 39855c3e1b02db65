"""Helpers of the tests: tiny training runs started as a user starts them, a tiny
checkpoint with its output layers drawn at random, and z-context woken from its zero start.
The kill -9 loops of the interruption tests live in benchmarks/interruption.py, which the
soak benchmark shares.

    from tests.helpers import ROOT, run_train, save_random_heads_run
"""

from __future__ import annotations

import os
import subprocess

from benchmarks.interruption import ROOT, train_cmd

__all__ = ["ROOT", "run_train", "save_random_heads_run", "wake_context"]


def run_train(
    env: dict[str, str],
    workdir: str | os.PathLike,
    *overrides: str,
    devices: int = 1,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Runs `train_cmd` to completion on `devices` CPU devices; fails the test on an error."""
    result = subprocess.run(
        train_cmd(workdir, *overrides),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**env, "JAX_NUM_CPU_DEVICES": str(devices)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def save_random_heads_run(workdir: str, seed: int = 0) -> None:
    """Saves a tiny single-model checkpoint (step 2) into `workdir`, as the trainer saves it,
    with its segmentation output layer and its z-context's level and fracture read-outs drawn
    at random (they start at zero), the fracture read-out's bias at +4: the slices' logits,
    near the fracture map's prior logit (-4.6) otherwise, then give study probabilities
    spread over (0, 1), which differ by study and by level by well over 1e-4."""
    import grain
    import jax
    import numpy as np
    from flax import nnx

    from configs import tiny
    from cspine_jax import checkpoints, systems
    from cspine_jax.data import pipeline

    config = tiny.get_config()
    system = systems.get(config)
    params = jax.jit(lambda: nnx.state(system.create_model(config, config.seed)))()
    rng = np.random.default_rng(seed)
    zcontext = params["zcontext"]
    for layer, scale in (
        (params["decoder"]["out"], 0.5),
        (zcontext["level"], 0.5),
        (zcontext["fracture"], 0.5),
    ):
        kernel = layer["kernel"]
        kernel[...] = rng.normal(0.0, scale, kernel.shape).astype(np.float32)
    zcontext["fracture"]["bias"][...] = np.full(zcontext["fracture"]["bias"].shape, 4.0, np.float32)
    data = pipeline.iterate(grain.MapDataset.range(1))  # load_model never reads it back
    with checkpoints.manager(workdir) as mngr:
        checkpoints.save(
            mngr,
            2,
            system.build_state(config, params),
            data,
            config,
            {"val_loss": 0.5, "train_seconds": 1.0},
        )


def wake_context(model, seed: int = 0):
    """`model`'s z-context with random values in its zero-initialised parameters; returns
    `model`.

    At initialisation the distance biases are 0 (attention ignores z) and the level and
    fracture read-outs are 0 (every slice gets the same prior level logits whatever its
    neighbours), so a test of how the outputs depend on z, on padding or on other slices would
    pass vacuously. Works on a `SingleModel` or a bare `heads.ZContext`.
    """
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    zcontext = getattr(model, "zcontext", model)
    for block in zcontext.blocks:
        block.bias[...] = jnp.asarray(rng.normal(0.0, 1.0, block.bias.shape), jnp.float32)
    for head in (zcontext.level, zcontext.fracture):
        head.kernel[...] = jnp.asarray(rng.normal(0.0, 0.5, head.kernel.shape), jnp.float32)
    return model
