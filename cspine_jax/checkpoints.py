"""Orbax checkpoints of a run: train state, data-iterator state and config, per step.

`workdir/checkpoints/<step>/` holds items `state` ({params, opt_state}), `data` (the Grain
iterator, one file per process) and `config` (JSON), plus the step's validation metrics.
Orbax writes each step into a temporary folder and renames it when complete, so a killed
save leaves the previous checkpoints readable.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers

from cspine_jax import optim
from cspine_jax.models import spine_net

BEST_METRIC = "val_loss"  # lower is better


def manager(workdir: str, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
    """Keeps the `keep` latest steps and the best step by validation loss."""
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1),
    ])
    # best_fn also makes Orbax write each step's metrics to disk, where best_step finds them.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=lambda m: m[BEST_METRIC], best_mode="min",
        create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options)


def best_step(mngr: ocp.CheckpointManager) -> int | None:
    """The kept step with the lowest validation loss (the latest if none has metrics)."""
    scored = [(m[BEST_METRIC], s) for s in mngr.all_steps()
              if (m := mngr.metrics(s)) is not None and BEST_METRIC in m]
    return min(scored)[1] if scored else mngr.latest_step()


def save(mngr: ocp.CheckpointManager, step: int, state: dict[str, Any],
         data_iterator: grain.DatasetIterator, config: ml_collections.ConfigDict,
         metrics: dict[str, float]) -> None:
    mngr.save(step, metrics=metrics, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(json.loads(config.to_json()))))


def restore(mngr: ocp.CheckpointManager, step: int, state: dict[str, Any],
            data_iterator: grain.DatasetIterator | None = None) -> dict[str, Any]:
    """The train state of `step`, shaped and sharded like `state`; also rewinds the
    data iterator in place when one is given."""
    # Leaves without a sharding (shapes from eval_shape) land on this process's first device:
    # Orbax would otherwise insist on the saving run's device topology.
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=getattr(x, "sharding", None) or local), state)
    items = {"state": ocp.args.StandardRestore(abstract)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return mngr.restore(step, args=ocp.args.Composite(**items))["state"]


def saved_config(mngr: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
    """The config a checkpoint was trained with."""
    restored = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(restored["config"])


def load_model(
    workdir: str, step: int | None = None
) -> tuple[spine_net.SpineNet, ml_collections.ConfigDict, int]:
    """The model of a run's best (or given) step, with the config it was trained with.

    Works in a fresh process: shapes come from the saved config, values from Orbax.
    """
    mngr = manager(workdir, read_only=True)
    try:
        step = best_step(mngr) if step is None else step
        if step is None:
            raise FileNotFoundError(f"{workdir}: no checkpoint to restore")
        config = saved_config(mngr, step)
        # Shapes only: Orbax fills in the values.
        graphdef, params = nnx.split(
            nnx.eval_shape(lambda: spine_net.create_model(config, config.seed)))
        tx = optim.make_optimizer(config.optim)
        opt_shape = jax.eval_shape(tx.init, params)
        state = restore(mngr, step, {"params": params, "opt_state": opt_shape})
    finally:
        mngr.close()
    return nnx.merge(graphdef, state["params"]), config, step
