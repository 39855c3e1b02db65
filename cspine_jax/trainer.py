"""Training: the single model's run, and the pieces every run is built from.

`train_and_evaluate` reads top to bottom in sections: distributed set-up and mesh
(`start_run`), input (the prepared cache split into training and held-out studies, a Grain
pipeline sharded over processes), model and optimizer (`init_state`: `nnx.split` once, the
state initialised in one jit and replicated), the steps, checkpoints, evals, the loop
(`train_loop`) and the end of the run (`finish_run`). The step is a plain `jax.jit` over the
split state (`make_train_step`), with donated buffers: parameters and optimizer state
replicated over the `data` mesh axis, the batch sharded along it, so one program serves
1 device, 8 devices or several hosts.

The two-stage baseline (`cspine_jax.baseline.trainer`) trains each of its stages with the
same `start_run`, `init_state`, `make_train_step`, `train_loop` and `finish_run`. Each
family's module declares its `systems.System`; this one's is `SYSTEM` at the bottom.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tensorboardX import SummaryWriter  # TensorFlow-free event files

from cspine_jax import augment, checkpoints, evaluation, metrics, optim, systems, visualize
from cspine_jax.data import cache, pipeline, sources
from cspine_jax.models import single

Batch = dict[str, np.ndarray]


# ---------------------------------------------------------------------------- step
def make_loss_ratios(
    graphdef: nnx.GraphDef, config: ml_collections.ConfigDict, loss_fn: Callable | None = None
) -> Callable:
    """(params, batch) -> the loss terms as `single.Ratio`s: `loss_fn(model, batch)`, by default
    SingleModel's `loss_ratios` on the batch warped in-plane (`augment.apply_warp`, and each
    fracture-stream slice by its own warp)."""

    def single_model_loss(model, batch):
        channels = single.input_channels(config) - 1
        batch = augment.apply_warp(batch, channels)
        if "stream_image" in batch:
            batch = augment.apply_stream_warps(batch, channels)
        outputs = model(batch["image"], batch["valid"], batch["z"], batch.get("stream_image"))
        return single.loss_ratios(outputs, batch)

    loss_fn = loss_fn or single_model_loss
    return lambda params, batch: loss_fn(nnx.merge(graphdef, params), batch)


def make_grad_fn(
    graphdef: nnx.GraphDef, config: ml_collections.ConfigDict, loss_fn: Callable | None = None
) -> Callable:
    """(params, batch[, denominators]) -> ((loss, term values), gradients).

    The loss is sum_t config.loss[t] * num_t / den_t over the terms of `make_loss_ratios`,
    with den_t = denominators[t] where given (the whole batch's, under gradient
    accumulation), else the batch's own.
    """
    ratios_fn, weights = make_loss_ratios(graphdef, config, loss_fn), dict(config.loss)

    def loss(params, batch, denominators=None):
        ratios = ratios_fn(params, batch)
        if denominators is not None:
            ratios = {k: (num, denominators[k]) for k, (num, _) in ratios.items()}
        return single.weighted_loss(ratios, weights)

    return jax.value_and_grad(loss, has_aux=True)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    loss_fn: Callable | None = None,
) -> Callable:
    """(params, opt_state, batch) -> (params, opt_state, metrics), pure; the loss as in
    `make_grad_fn`.

    With `optim.grad_accum` = k the global batch is split into k micro-batches, each scaled by
    the whole batch's loss denominators, whose losses and gradients add up to the whole
    batch's. A step whose loss, gradients or updated parameters are not finite leaves
    parameters and optimizer state untouched and reports `skipped` = 1.
    """
    accum = int(config.optim.grad_accum)
    grad_fn = make_grad_fn(graphdef, config, loss_fn)
    ratios_fn = make_loss_ratios(graphdef, config, loss_fn)

    def step(params, opt_state, batch):
        if accum == 1:
            (loss, terms), grads = grad_fn(params, batch, None)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)
            # The denominators depend on the batch alone: XLA drops the forward pass behind
            # them, so this costs next to nothing.
            denominators = jax.tree.map(
                lambda x: x.sum(0),
                jax.lax.map(
                    lambda b: {k: den for k, (_, den) in ratios_fn(params, b).items()}, micro
                ),
            )

            def body(carry, micro_batch):
                (loss, terms), grads = grad_fn(params, micro_batch, denominators)
                return jax.tree.map(jnp.add, carry, (loss, terms, grads)), None

            zeros = jax.tree.map(
                jnp.zeros_like,
                jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), denominators),
            )
            zeros = (zeros[0][0], zeros[0][1], zeros[1])
            (loss, terms, grads), _ = jax.lax.scan(body, zeros, micro)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # Finite gradients can still give non-finite parameters (a learning rate of inf or
        # NaN, an overflowing update): those must not reach the state, nor a checkpoint.
        finite = jnp.isfinite(loss) & jnp.all(
            jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((grads, new_params))])
        )
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        params = jax.tree.map(keep, new_params, params)
        opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        out = {
            "loss": loss,
            **terms,
            "grad_norm": optax.tree.norm(grads),
            "skipped": 1.0 - finite.astype(jnp.float32),
        }
        return params, opt_state, out

    return step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
    """(params, batch) -> study probabilities (B, 8) and predicted labels (B, S, h, w)."""

    def step(params, batch):
        outputs = nnx.merge(graphdef, params)(batch["image"], batch["valid"], batch["z"])
        seg = jnp.argmax(outputs["seg_logits"], -1).astype(jnp.uint8)
        return jax.nn.sigmoid(outputs["study_logits"]), seg

    return step


# ---------------------------------------------------------------------------- set-up
def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """`jax.distributed.initialize` when config.distributed names several processes (gloo
    collectives on CPU); must run before anything touches the JAX backend."""
    dist = config.distributed
    if dist.num_processes > 1 and not jax.distributed.is_initialized():
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(dist.coordinator, dist.num_processes, dist.process_id)


@dataclasses.dataclass(frozen=True)
class Run:
    """The devices a run trains on.

    Attributes:
      data: sharding of a global batch along the `data` axis of a mesh over every device of
        every process.
      replicated: sharding of parameters and optimizer state (a full copy on every device).
      chief: whether this is process 0, which writes logs, reports and metrics.
    """

    data: NamedSharding
    replicated: NamedSharding
    chief: bool


def start_run(config: ml_collections.ConfigDict, batch_sizes: Sequence[int]) -> Run:
    """Distributed set-up (before anything touches the JAX backend) and the data-parallel
    mesh; every global batch size must split evenly over the devices. Writes nothing: the
    workdir appears with the first checkpoint, once the input has been read."""
    initialize_distributed(config)
    for batch_size in batch_sizes:
        if batch_size % jax.device_count():
            raise systems.ConfigError(
                f"batch_size {batch_size} not divisible by {jax.device_count()} devices"
            )
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    return Run(NamedSharding(mesh, P("data")), NamedSharding(mesh, P()), jax.process_index() == 0)


def init_state(
    run: Run, create_model: Callable[[], nnx.Module], build_state: Callable[[Any], dict[str, Any]]
) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """(graph, replicated train state) of `build_state(params of create_model())`.

    Initialised inside one jit: eagerly, every parameter's initialiser is its own program.
    """
    graphdef = nnx.graphdef(nnx.eval_shape(create_model))
    state = jax.jit(
        lambda: build_state(nnx.split(create_model())[1]), out_shardings=run.replicated
    )()
    return graphdef, state


def split_studies(
    config: ml_collections.ConfigDict, progress: bool
) -> tuple[str, list[cache.Entry], list[cache.Entry]]:
    """(cache dir, training entries, held-out entries) of config.data: the chief process
    prepares the cache once (generating phantoms if needed); every process then reads it."""
    chief = jax.process_index() == 0
    if chief:
        cache_dir = sources.prepared_cache(config.data, progress=progress)
        test_dir = sources.test_dir(config.data)
        if test_dir is not None:  # made and prepared now: a run fails before it trains
            sources.prepared_cache(
                {**config.data, "dir": test_dir, "cache_dir": ""}, progress=progress
            )
    multihost_utils.sync_global_devices("cache prepared")
    if not chief:
        cache_dir = sources.prepared_cache(config.data, progress=False)
    train_entries, held_out = sources.split_entries(
        cache.read_entries(cache_dir), config.data, config.seed
    )
    return cache_dir, train_entries, held_out


# ---------------------------------------------------------------------------- sharding
def to_global(batch: Batch, sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded along the batch axis."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def _pad_rows(batch: Batch, rows: int) -> Batch:
    """Pads a short last evaluation batch with copies marked study_index = -1."""
    missing = rows - len(batch["study_index"])
    if missing <= 0:
        return batch
    padded = {k: np.concatenate([v, np.repeat(v[:1], missing, axis=0)]) for k, v in batch.items()}
    padded["study_index"][-missing:] = -1
    return padded


# ---------------------------------------------------------------------------- the loop
def train_loop(
    name: str,
    stage: ml_collections.ConfigDict,
    config: ml_collections.ConfigDict,
    step_fn: Callable,
    state: dict[str, Any],
    train_iter,
    mngr,
    evaluate: Callable,
    sharding: NamedSharding,
    writer: SummaryWriter | None,
    *,
    progress: bool,
    seconds: float = 0.0,
) -> tuple[dict[str, Any], float]:
    """Trains `state` {params, opt_state} with `step_fn` from the latest checkpoint in `mngr`
    to `stage.optim.steps`; returns the final state and the training clock.

    Args:
      name: the progress bar's label and the TensorBoard prefix ("train": none, else
        "<name>/").
      stage: holds `optim` (steps, batch_size, the lr schedule) and `checkpoint.every`: the
        whole config for the single model, a stage's for the two-stage baseline.
      config: the run's config, saved with every checkpoint; `log.every` sets the logging.
      step_fn: (params, opt_state, batch) -> (params, opt_state, metrics), as from
        `make_train_step`; jitted here with the old state's buffers donated.
      train_iter: Grain iterator of this process's rows, checkpointed with the state.
      evaluate: params -> (results with `val_loss`, an (H, W, 3) picture or None); runs at
        every checkpoint, off the clock.
      writer: TensorBoard writer of the chief process, None elsewhere (no bar, no output).
      seconds: training time before this loop (two-stage: the stages before it).

    `train_seconds`, the wall time spent training (evaluations and saves excluded), goes into
    every checkpoint's metrics and carries over a resume.
    """
    step = mngr.latest_step() or 0
    if step:
        state = checkpoints.restore(mngr, step, state, train_iter)
        seconds = (mngr.metrics(step) or {}).get("train_seconds", seconds)
        if writer is not None:
            print(f"{name}: resumed from step {step}")
    replicated = NamedSharding(sharding.mesh, P())
    train_step = jax.jit(step_fn, donate_argnums=(0, 1), out_shardings=(replicated,) * 3)
    schedule = jax.jit(optim.lr_schedule(stage.optim))  # one program, not one per op
    tag = "" if name == "train" else f"{name}/"
    total, batch_size = stage.optim.steps, stage.optim.batch_size
    # Steps are dispatched ahead of the device and wait for it at each log: tqdm's default
    # moving-average rate swings between the two (ETA 4 min, then 1 h); smoothing=0 is the
    # mean rate since the start, which the waits keep honest.
    bar = tqdm.tqdm(
        total=total,
        initial=step,
        unit="step",
        desc=name,
        smoothing=0,
        disable=not (writer is not None and progress),
        dynamic_ncols=True,
    )
    pending, tick = [], time.perf_counter()
    clock = tick
    while step < total:
        state["params"], state["opt_state"], step_metrics = train_step(
            state["params"], state["opt_state"], to_global(next(train_iter), sharding)
        )
        step += 1
        pending.append(step_metrics)
        bar.update()
        if step % config.log.every == 0 or step == total:
            fetched = jax.device_get(pending)
            if all(m["skipped"] for m in fetched):
                bar.close()  # before the message, which must be the last line a user sees
                raise FloatingPointError(
                    f"{'' if name == 'train' else name + ': '}loss, gradients or parameters not "
                    f"finite in steps {step - len(fetched) + 1}-{step}; stopping with the last "
                    f"good parameters in {os.fspath(mngr.directory)}. "
                    "Lower optim.lr or check the data."
                )
            mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
            mean["examples_per_s"] = len(fetched) * batch_size / (time.perf_counter() - tick)
            mean["lr"] = float(schedule(step))
            pending, tick = [], time.perf_counter()
            if writer is not None:
                for k, v in mean.items():
                    writer.add_scalar(f"{tag}train/{k}", v, step)
            bar.set_postfix(loss=f"{mean['loss']:.4f}", ex_s=f"{mean['examples_per_s']:.1f}")
        if step % stage.checkpoint.every == 0 or step == total:
            jax.block_until_ready(state)  # stop the clock when the steps' work is done
            seconds += time.perf_counter() - clock
            result, picture = evaluate(state["params"])
            result["train_seconds"] = seconds
            bar.write(
                f"{name} step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.items())
            )
            if writer is not None:
                for k, v in result.items():
                    if np.isfinite(v):  # AUC is undefined on a one-class fold
                        writer.add_scalar(tag + k.replace("_", "/", 1), v, step)
                if picture is not None:
                    writer.add_image(
                        f"{tag}val/vertebrae_true_vs_pred", picture, step, dataformats="HWC"
                    )
            checkpoints.save(mngr, step, state, train_iter, config, result)
            clock = tick = time.perf_counter()  # evaluation time is not training time
    bar.close()
    mngr.wait_until_finished()
    return state, seconds


def finish_run(
    run: Run,
    config: ml_collections.ConfigDict,
    workdir: str,
    num_held_out: int,
    writer: SummaryWriter | None,
    *,
    progress: bool,
) -> dict[str, float]:
    """How every run ends, of either family: the chief restores the best checkpoint and
    evaluates it on every slice of every held-out study by evaluate.py's path
    (`evaluation.evaluate_run`: metrics.json, submission.csv and the report figures in
    workdir/eval), writes the metrics to workdir/metrics.json and TensorBoard; then scores
    the test set (`sources.test_dir`), if any, with the thresholds chosen on the held-out
    fold (workdir/test: its report; workdir/test_metrics.json: the same names as
    metrics.json) and prints both side by side; the other processes wait for it. Returns the
    held-out metrics (empty outside the chief)."""
    results = {}
    if run.chief:
        results = evaluation.evaluate_run(workdir, progress=progress, writer=writer)
        step = int(results["step"])
        evaluation.write_metrics(os.path.join(workdir, "metrics.json"), results)
        test, test_dir = {}, sources.test_dir(config.data)
        if test_dir is not None:
            test = evaluation.evaluate_run(
                workdir, test_dir, os.path.join(workdir, "test"), step, progress=progress
            )
            shutil.copyfile(
                os.path.join(workdir, "test", "metrics.json"),
                os.path.join(workdir, "test_metrics.json"),
            )
        for prefix, values in (("final", results), ("test", test)):
            for k, v in values.items():
                if np.isfinite(v):
                    writer.add_scalar(f"{prefix}/{k}", v, step)
        writer.close()
        columns = {f"held-out ({num_held_out} studies)": results}
        if test:
            columns[f"test ({int(test['studies'])} studies, never selected on)"] = test
        print(f"held-out results of the best checkpoint (step {step}){' and test' * bool(test)}:")
        print(evaluation.format_table(*columns.values(), headers=list(columns)))
    multihost_utils.sync_global_devices("evaluated")
    return results


# ---------------------------------------------------------------------------- the run
def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, progress: bool = True
) -> dict[str, float]:
    """Trains (or resumes) in `workdir`, then evaluates the best checkpoint on every slice of
    every held-out study. Returns the held-out metrics (also in `workdir/metrics.json`)."""
    # Distributed set-up and mesh: one data-parallel axis over every device of every process.
    global_batch = config.optim.batch_size
    run = start_run(config, [global_batch])
    num_processes = jax.process_count()

    # Input: the prepared cache, split into training and held-out studies.
    cache_dir, train_entries, held_out = split_studies(config, progress)
    train_iter = pipeline.iterate(
        pipeline.train_dataset(
            train_entries,
            config.data,
            seed=config.seed,
            global_batch=global_batch,
            process_index=jax.process_index(),
            process_count=num_processes,
        ),
        config.data.workers,
    )
    eval_ds = pipeline.eval_dataset(held_out, config.data, global_batch)
    held_out_labels = np.stack([e.labels for e in held_out])

    # Model and optimizer, split once into a static graph and replicated state.
    tx = optim.make_optimizer(config.optim)
    graphdef, state = init_state(
        run,
        lambda: single.create_model(config, config.seed),
        lambda params: build_state(config, params),
    )
    if run.chief:
        print(
            f"model: {single.param_count(state['params']):,} parameters; {jax.device_count()} "
            f"devices in {num_processes} process(es); {len(train_entries)} train / "
            f"{len(held_out)} held-out studies; cache {cache_dir}"
        )

    # Steps: the train step is jitted by `train_loop`; evaluation's here.
    eval_step = jax.jit(make_eval_step(graphdef), out_shardings=run.replicated)

    # Checkpoint: resume from the latest step, the data iterator rewound with it.
    mngr = checkpoints.manager(workdir, config.checkpoint.keep)
    writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if run.chief else None

    # Evals: held-out competition loss and AUC on evenly spaced slices, one picture.
    # Global row g of a batch holds local row g % L of process g // L (L rows each), i.e.
    # row (g % L) * P + g // L of the batch every process built.
    rows_per_process = global_batch // num_processes
    global_rows = np.array(
        [
            (g % rows_per_process) * num_processes + g // rows_per_process
            for g in range(global_batch)
        ]
    )

    def run_eval(params) -> tuple[dict[str, float], np.ndarray | None]:
        probs = np.zeros((len(held_out), 8), np.float32)
        picture = None
        for batch in pipeline.iterate(eval_ds):
            batch = _pad_rows(batch, global_batch)
            local = {k: v[jax.process_index() :: num_processes] for k, v in batch.items()}
            out, seg = jax.device_get(eval_step(params, to_global(local, run.data)))
            index = batch["study_index"][global_rows]
            probs[index[index >= 0]] = out[index >= 0]
            masked = np.flatnonzero(batch["has_mask"][global_rows] * (index >= 0))
            if picture is None and len(masked) and config.log.images:
                row = global_rows[masked[0]]
                s = int(np.argmax((batch["mask"][row] > 0).sum(axis=(1, 2))))
                centre = (config.data.context // 2) * len(config.data.windows)
                picture = visualize.truth_vs_prediction(
                    batch["image"][row, s, ..., centre], batch["mask"][row, s], seg[masked[0], s]
                )
        result = {
            "val_loss": metrics.competition_loss(held_out_labels, probs),
            "val_auc_patient_overall": metrics.auc(held_out_labels[:, 0], probs[:, 0]),
        }
        return result, picture

    # Loop.
    train_loop(
        "train",
        config,
        config,
        make_train_step(graphdef, tx, config),
        state,
        train_iter,
        mngr,
        run_eval,
        run.data,
        writer,
        progress=progress,
    )
    checkpoints.close(mngr)

    # Final: the best checkpoint on every slice of every held-out study.
    return finish_run(run, config, workdir, len(held_out), writer, progress=progress)


def build_state(config: ml_collections.ConfigDict, params: Any) -> dict[str, Any]:
    """The single model's train state: its parameters and their AdamW state."""
    return {"params": params, "opt_state": optim.make_optimizer(config.optim).init(params)}


SYSTEM = systems.System(
    create_model=single.create_model,
    build_state=build_state,
    make_predictor=lambda model, config: evaluation.StudyPredictor(model, config.data.context),
    train_and_evaluate=train_and_evaluate,
)
