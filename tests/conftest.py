"""Shared test set-up.

hypothesis is imported here, at start-up: its pytest plugin otherwise imports it in the
terminal summary, where CPython 3.11.7's parser can trip over a recursion-depth counter
left unbalanced earlier in the session ("AST constructor recursion depth mismatch").

JAX reads the CPU device count when its backend initialises, so it is fixed here, before
any test imports jax: 8 simulated CPU devices let the sharding tests run on one machine.

The end-to-end tests run `python train.py --config=configs/tiny.py` in subprocesses, as a user
would, over one tiny phantom set and cache made once per session (`data_env`); the helpers
that start and read those runs are in tests/helpers.py.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/cspine_jax/jax"))

import hypothesis  # noqa: E402, F401
import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def data_env(tmp_path_factory):
    """(subprocess environment, prepared cache) of the tiny phantoms, in a private cache root.

    Subprocesses find the phantoms and the cache through the environment's CSPINE_CACHE.
    """
    from configs import tiny
    from cspine_jax.data import sources

    root = str(tmp_path_factory.mktemp("cspine_cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CSPINE_CACHE", root)
        cache_dir = sources.prepared_cache(tiny.get_config().data, progress=False)
    env = {**os.environ, "CSPINE_CACHE": root, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    return env, cache_dir


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess environment of the CLI tests: CPU, one device, a private phantom/prepared
    cache root per test module."""
    env = {
        **os.environ,
        "CSPINE_CACHE": str(tmp_path_factory.mktemp("cspine_cache")),
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("XLA_FLAGS", None)
    return env


@pytest.fixture(scope="session")
def phantom_dir(data_env):
    """The RSNA-layout folder of the tiny phantoms behind `data_env`'s cache."""
    from configs import tiny
    from cspine_jax.data import sources

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CSPINE_CACHE", data_env[0]["CSPINE_CACHE"])
        return sources.phantom_dir(tiny.get_config().data.phantom)


@pytest.fixture(scope="session")
def awake_model():
    """(tiny config, its SingleModel) with z-context woken from its zero start
    (`helpers.wake_context`: otherwise how outputs depend on z, on padding or on other
    slices is vacuous) and the segmentation's output layer drawn at random (else every
    pixel logit starts equal). Shared: a test must not change it."""
    import numpy as np

    from configs import tiny
    from cspine_jax.models import single
    from tests.helpers import wake_context

    config = tiny.get_config()
    model = wake_context(single.create_model(config, config.seed), seed=1)
    kernel = model.decoder.out.kernel
    kernel[...] = np.random.default_rng(2).normal(0.0, 0.5, kernel.shape).astype(np.float32)
    return config, model
