"""What the core modules need of a model family, and where each family declares it.

Two families train and evaluate through the same code: the single model (`cspine_jax.trainer`,
`models.single`) and the two-stage baseline (`cspine_jax.baseline`). `checkpoints`,
`evaluation` and the CLIs never import a family: they look its `System` up by
`config.model.family`, so the baseline stays in its own package and a new family only adds a
line to `_FAMILIES`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from typing import Any, Protocol

import ml_collections
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class StudyPrediction:
    """Outputs for one study on its prepared grid (z' slices, most superior first).

    Attributes:
      probs: (8,) float32 probabilities `[patient_overall, C1..C7]`.
      slice_logits: (z', 7) per-slice fracture logits of C1..C7; None for the two-stage
        baseline, which scores vertebra stacks, not slices.
      presence: (z', 7) per-slice vertebra presence (single model: its z-context level
        probabilities; two-stage baseline: the share of the slice labelled as each vertebra).
      segmentation: (z', h, w) uint8 predicted labels (0 bg, 1-7 C1-C7) at the seg stride.
    """

    probs: np.ndarray
    slice_logits: np.ndarray | None
    presence: np.ndarray
    segmentation: np.ndarray


class Predictor(Protocol):
    """Compiled whole-study inference: (z', G, G, n_windows) uint8 prepared study -> its
    prediction, from every slice whatever their number."""

    def __call__(self, image: np.ndarray) -> StudyPrediction: ...


@dataclasses.dataclass(frozen=True)
class System:
    """A model family.

    Attributes:
      create_model: (config, seed) -> the initialised nnx model.
      build_state: (config, params) -> {params, opt_state}, the train state its final
        checkpoints hold (the optimizer state covers what the last training stage trains).
      make_predictor: (model, config) -> its whole-study `Predictor`.
      train_and_evaluate: (config, workdir, progress) -> held-out metrics; trains or resumes,
        then ends the run through `evaluation.finish_run`.
    """

    create_model: Callable[[ml_collections.ConfigDict, int], nnx.Module]
    build_state: Callable[[ml_collections.ConfigDict, Any], dict[str, Any]]
    make_predictor: Callable[[nnx.Module, ml_collections.ConfigDict], Predictor]
    train_and_evaluate: Callable[..., dict[str, float]]


class ConfigError(ValueError):
    """A config value that cannot work; the message names the `--config.` field."""


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for values no run can start with, before anything is written:
    a training section with no steps or an empty batch, a data folder that does not exist
    (an unknown family: `get`)."""
    sections = {name: config[name].optim for name in ("stage1", "stage2") if name in config}
    sections = sections or {"": config.optim}
    for name, optim in sections.items():
        prefix = f"--config.{name + '.' if name else ''}optim"
        for field in ("steps", "batch_size", "grad_accum"):
            if int(optim[field]) < 1:
                raise ConfigError(f"{prefix}.{field}={optim[field]}: must be at least 1")
        if optim.batch_size % optim.grad_accum:
            raise ConfigError(
                f"{prefix}.batch_size={optim.batch_size} does not split into "
                f"{prefix}.grad_accum={optim.grad_accum} micro-batches"
            )
    if config.data.dir and not os.path.isdir(config.data.dir):
        raise ConfigError(f"--config.data.dir={config.data.dir}: no such folder")


# config.model.family -> the module whose SYSTEM describes it.
_FAMILIES = {"single": "cspine_jax.trainer", "two_stage": "cspine_jax.baseline.trainer"}


def get(config: ml_collections.ConfigDict) -> System:
    """The System of `config.model.family`."""
    family = config.model.family
    if family not in _FAMILIES:
        raise ConfigError(f"model.family {family!r}: one of {sorted(_FAMILIES)}")
    return importlib.import_module(_FAMILIES[family]).SYSTEM
