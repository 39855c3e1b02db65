"""Shared test set-up.

hypothesis is imported here, at start-up: its pytest plugin otherwise imports it in the
terminal summary, where CPython 3.11.7's parser can trip over a recursion-depth counter
left unbalanced earlier in the session ("AST constructor recursion depth mismatch").

JAX reads the CPU device count when its backend initialises, so it is fixed here, before
any test imports jax: 8 simulated CPU devices let the sharding tests run on one machine.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/cspine_jax/jax"))

import hypothesis  # noqa: E402, F401
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
