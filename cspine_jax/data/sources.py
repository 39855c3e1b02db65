"""Where training data comes from: a dataset folder or generated phantoms, and its cache.

With `config.data.dir` empty, the phantom set described by `config.data.phantom` is written
once under the cache root and reused by every later run with the same description. Either
way the folder is prepared once into a cache keyed by the folder and the grid parameters.
The cache root is `$CSPINE_CACHE` or `~/.cache/cspine_jax`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from cspine_jax.data import cache, phantom, prepare, rsna


def cache_root() -> str:
    return os.environ.get("CSPINE_CACHE", os.path.expanduser("~/.cache/cspine_jax"))


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def phantom_dir(phantom_config: Mapping[str, Any]) -> str:
    """Writes the described phantom set once (atomically); returns its folder."""
    spec = {k: phantom_config[k] for k in sorted(phantom_config)}
    key = _digest({**spec, "generator": phantom.GENERATOR_VERSION})
    out = os.path.join(cache_root(), f"phantoms-{spec['size']}-{key}")
    if not os.path.exists(os.path.join(out, "train.csv")):
        os.makedirs(cache_root(), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache_root(), prefix=".tmp-phantoms-")
        try:
            phantom.write_dataset(tmp, **spec)
            if os.path.exists(out):  # a concurrent run finished first
                shutil.rmtree(tmp)
            else:
                os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def prepared_cache(data_config: Mapping[str, Any], *, progress: bool = True) -> str:
    """The dataset folder (or phantoms) prepared on the config's grid; returns the cache."""
    data_dir = data_config["dir"] or phantom_dir(data_config["phantom"])
    params = prepare.preprocessing_params(data_config)
    key = _digest([os.path.abspath(data_dir), params, cache.FORMAT_VERSION])
    cache_dir = data_config["cache_dir"] or os.path.join(cache_root(), f"prepared-{key}")
    summary = prepare.prepare_dataset(
        data_dir,
        cache_dir,
        params,
        progress=progress,
        out_flag="--config.data.cache_dir",
        data_flag="--config.data.dir",
    )
    if summary.prepared or summary.failed:
        print("\n".join(summary.lines()))
    if not cache.read_entries(cache_dir):
        raise cache.CacheError(f"{cache_dir}: no study of {data_dir} could be prepared")
    return cache_dir


def test_dir(data_config: Mapping[str, Any]) -> str | None:
    """The run's test set, a folder nothing is selected on: `test_dir` where set (any
    RSNA-layout folder with labels); on phantoms, the `test_phantom` set (generated once, as
    the training phantoms are: their size, mask and box shares, its own seed and count);
    None on real data without a test_dir."""
    if data_config["test_dir"]:
        return data_config["test_dir"]
    if data_config["dir"] or not data_config["test_phantom"]["num_studies"]:
        return None
    spec = {**data_config["phantom"], **data_config["test_phantom"]}
    if spec["seed"] == data_config["phantom"]["seed"]:
        raise ValueError(
            f"data.test_phantom.seed={spec['seed']} is the training phantoms' seed: the test "
            "set would hold training studies"
        )
    return phantom_dir(spec)


def split_entries(
    entries: list[cache.Entry], data_config: Mapping[str, Any], seed: int
) -> tuple[list[cache.Entry], list[cache.Entry]]:
    """(train, held-out) entries: `data_config.fold` of a label-stratified K-fold split."""
    labels = np.stack([e.labels for e in entries])
    has_mask = np.array([e.has_mask for e in entries])
    folds = rsna.kfold_assignments(labels, has_mask, data_config["num_folds"], seed)
    train = [e for e, f in zip(entries, folds, strict=True) if f != data_config["fold"]]
    held_out = [e for e, f in zip(entries, folds, strict=True) if f == data_config["fold"]]
    return train, held_out
