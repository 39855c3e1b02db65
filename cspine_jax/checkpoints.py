"""Orbax checkpoints of a run: train state, data-iterator state and config, per step.

`workdir/checkpoints/<step>/` holds items `state` ({params, opt_state}), `data` (the Grain
iterator, one file per process) and `config` (JSON), plus the step's validation metrics.
Orbax writes each step into a temporary folder and renames it when complete, so a killed
save leaves the previous checkpoints readable; steps it drops are first renamed into
`checkpoints/deleted/`, so a killed deletion leaves no half step behind either.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers

from cspine_jax import systems

BEST_METRIC = "val_loss"  # lower is better
# Orbax deletes a step it no longer keeps file by file, in place: killed half-way, that
# leaves a listed step which no longer restores. Renamed into this subfolder instead (one
# atomic rename), a step leaves the listing at once; the folder is emptied between saves.
_DELETED = "deleted"


def manager(workdir: str, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
    """Keeps the `keep` latest steps and the best step by validation loss."""
    policy = checkpoint_managers.AnyPreservationPolicy(
        [
            checkpoint_managers.LatestN(n=keep),
            checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1),
        ]
    )
    # best_fn also makes Orbax write each step's metrics to disk, where best_step finds them.
    # A reader needs no other process: without this, Orbax would wait at a barrier for all
    # of them (the end of a multi-process run evaluates on the chief alone).
    processes = ocp.options.MultiprocessingOptions()
    if read_only and jax.process_count() > 1:
        processes = ocp.options.MultiprocessingOptions(
            primary_host=jax.process_index(),
            active_processes={jax.process_index()},
            barrier_sync_key_prefix=f"reader{jax.process_index()}",
        )
    options = ocp.CheckpointManagerOptions(
        # A reader saves nothing; Orbax would set this itself, with a warning.
        save_interval_steps=0 if read_only else 1,
        preservation_policy=policy,
        best_fn=lambda m: m[BEST_METRIC],
        best_mode="min",
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
        todelete_subdir=None if read_only else _DELETED,
        multiprocessing_options=processes,
    )
    with _without_read_only_notice() if read_only else contextlib.nullcontext():
        mngr = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"), options=options
        )
    if not read_only:
        _purge_deleted(mngr)
    return mngr


class _ReadOnlyNotice(logging.Filter):
    """Orbax's WARNING 'Given directory is read only=...' on every read-only manager:
    expected for a reader (`load_model`, evaluation), not a problem to report."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


@contextlib.contextmanager
def _without_read_only_notice():
    """Meanwhile the absl logger, which Orbax logs through, drops `_ReadOnlyNotice`."""
    logger, notice = logging.getLogger("absl"), _ReadOnlyNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def _purge_deleted(mngr: ocp.CheckpointManager) -> None:
    """Removes the steps Orbax set aside. Only while no save is in flight: Orbax moves steps
    there from its background thread, and only on the primary process."""
    if jax.process_index() == 0:
        shutil.rmtree(os.path.join(mngr.directory, _DELETED), ignore_errors=True)


def best_step(mngr: ocp.CheckpointManager) -> int | None:
    """The kept step with the lowest validation loss (the latest if none has metrics)."""
    scored = [
        (m[BEST_METRIC], s)
        for s in mngr.all_steps()
        if (m := mngr.metrics(s)) is not None and BEST_METRIC in m
    ]
    return min(scored)[1] if scored else mngr.latest_step()


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    state: dict[str, Any],
    data_iterator: grain.DatasetIterator,
    config: ml_collections.ConfigDict,
    metrics: dict[str, float],
) -> None:
    """Saves `step` in the background, once the previous save and its deletions are done."""
    mngr.wait_until_finished()  # Orbax would wait here too; the purge then races nothing
    _purge_deleted(mngr)
    mngr.save(
        step,
        metrics=metrics,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(json.loads(config.to_json())),
        ),
    )


def close(mngr: ocp.CheckpointManager) -> None:
    """Waits for the last save, removes the steps it dropped and closes the manager."""
    mngr.wait_until_finished()
    _purge_deleted(mngr)
    mngr.close()


def restore(
    mngr: ocp.CheckpointManager,
    step: int,
    state: dict[str, Any],
    data_iterator: grain.DatasetIterator | None = None,
) -> dict[str, Any]:
    """The train state of `step`, shaped and sharded like `state`; also rewinds the
    data iterator in place when one is given."""
    # Leaves without a sharding (shapes from eval_shape) land on this process's first device:
    # Orbax would otherwise insist on the saving run's device topology.
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=getattr(x, "sharding", None) or local
        ),
        state,
    )
    items = {"state": ocp.args.StandardRestore(abstract)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return mngr.restore(step, args=ocp.args.Composite(**items))["state"]


def saved_config(mngr: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
    """The config a checkpoint was trained with."""
    restored = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(restored["config"])


def state_shapes(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """The model graph and the shapes of the {params, opt_state} its checkpoints hold, by
    `config.model.family` (`systems`)."""
    system = systems.get(config)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: system.create_model(config, config.seed)))
    return graphdef, jax.eval_shape(lambda p: system.build_state(config, p), params)


def load_model(
    workdir: str, step: int | None = None
) -> tuple[nnx.Module, ml_collections.ConfigDict, int]:
    """The model of a run's best (or given) step, with the config it was trained with.

    Works in a fresh process: shapes come from the saved config, values from Orbax.
    """
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"{workdir}: no checkpoints here (not a training run's folder)")
    mngr = manager(workdir, read_only=True)
    try:
        step = best_step(mngr) if step is None else step
        if step is None:
            raise FileNotFoundError(f"{workdir}: no checkpoint to restore")
        config = saved_config(mngr, step)
        graphdef, shapes = state_shapes(config)  # Orbax fills in the values
        state = restore(mngr, step, shapes)
    finally:
        mngr.close()
    return nnx.merge(graphdef, state["params"]), config, step
