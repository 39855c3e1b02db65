"""The optimizer: AdamW with warm-up and cosine decay after global-norm clipping."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax


def lr_schedule(optim: Mapping[str, Any]) -> optax.Schedule:
    """Linear warm-up from 0 to `lr`, then cosine decay to lr / 100 at `steps`."""
    return optax.warmup_cosine_decay_schedule(
        0.0,
        optim["lr"],
        optim["warmup_steps"],
        max(optim["steps"], optim["warmup_steps"] + 1),
        end_value=optim["lr"] * 0.01,
    )


def make_optimizer(optim: Mapping[str, Any]) -> optax.GradientTransformation:
    """AdamW over `lr_schedule`, after clipping the global gradient norm to `clip_norm`.

    Weight decay applies to kernels only (ndim > 1): decaying norms and biases only hurts.
    """
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(optim["clip_norm"]),
        optax.adamw(lr_schedule(optim), weight_decay=optim["weight_decay"], mask=decay_mask),
    )
