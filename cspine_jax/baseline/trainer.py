"""Training of the two-stage baseline, the training-time benchmark's reference (the single
model's training is `trainer`). In the spirit of the RSNA 2022 winners:

  stage 1  the segmenter (2.5D backbone + SegDecoder) on the training studies with masks,
           SingleModel's segmentation CE + Dice on `pipeline` batches (S slices per study);
  locate   the trained segmenter over every prepared slice of every training study: per-slice
           vertebra presence and per-vertebra boxes (`vertebrae.Located`), kept on disk;
  stage 2  the classifier (its own backbone + BiGRU) on the vertebra stacks of the training
           studies (`vertebrae`; `stage2.example`: single stacks shuffled across studies
           with their C1..C7 labels, or each study's seven stacks with the competition's
           weighted log loss), plus a per-slice BCE on the boxed slices.

Both stages run the single model's machinery: one data-parallel mesh and the same sharded jit
step (`trainer.make_train_step` with the stage's loss), AdamW (`optim`), Orbax checkpoints with
the data iterator (`checkpoints`), tqdm and TensorBoard. A stage trains one part of the
TwoStageModel's parameters and passes the other through, so every checkpoint holds the whole
model.

  workdir/stage1/checkpoints/  stage 1; val_loss: segmentation loss of the held-out masked studies
  workdir/stage1/located.npz   the locate pass
  workdir/checkpoints/         stage 2, read by evaluate.py; val_loss: held-out competition loss by
                               whole-study inference (stage 1 read every slice of those studies)
  workdir/metrics.json, eval/, tensorboard/   as the single model's run (`trainer.finish_run`)

`train_seconds` in every checkpoint's metrics is the wall time spent training so far: in stage 2,
stage 1 and the locate pass included; evaluations and saves are off the clock. Re-running with
the same workdir resumes where the last run stopped. The locate pass and the evaluations run in
each process on its own devices, on all the studies they need.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx
from jax.sharding import NamedSharding
from tensorboardX import SummaryWriter

from cspine_jax import checkpoints, metrics, optim, systems, trainer
from cspine_jax.baseline import two_stage, vertebrae
from cspine_jax.baseline.predictor import TwoStagePredictor
from cspine_jax.data import pipeline
from cspine_jax.models import single


# ---------------------------------------------------------------------------- steps
def make_stage_step(
    config: ml_collections.ConfigDict, part: str, graphdef: nnx.GraphDef
) -> tuple[optax.GradientTransformation, Callable]:
    """The optimizer and train step of the stage that trains `part` ('segmenter': stage 1,
    'classifier': stage 2); `graphdef` is that part's.

    The step is `trainer.make_train_step` with the stage's loss, on the part's parameters:
    (params, opt_state, batch) -> (params, opt_state, metrics), `params` the whole model's
    (the other part passes through unchanged), `opt_state` the part's.
    """
    if part == "segmenter":
        stage, loss_fn = config.stage1, two_stage.segmenter_loss
    else:
        stage, loss_fn = config.stage2, _STAGE2_LOSSES[stage2_example(config)]
    tx = optim.make_optimizer(stage.optim)
    part_step = trainer.make_train_step(graphdef, tx, stage, loss_fn)

    def step(params, opt_state, batch):
        params[part], opt_state, out = part_step(params[part], opt_state, batch)
        return params, opt_state, out

    return tx, step


# The loss of each kind of stage-2 example (config.stage2.example).
_STAGE2_LOSSES = {"study": two_stage.classifier_loss, "vertebra": two_stage.vertebra_loss}


def stage2_example(config: ml_collections.ConfigDict) -> str:
    """config.stage2.example, checked: 'study' or 'vertebra'."""
    if config.stage2.example not in _STAGE2_LOSSES:
        raise ValueError(
            f"stage2.example {config.stage2.example!r}: one of {sorted(_STAGE2_LOSSES)}"
        )
    return config.stage2.example


def stage2_dataset(
    config: ml_collections.ConfigDict,
    entries: list,
    located: dict,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Stage 2's training batches by `config.stage2.example`: 'vertebra', single vertebra
    stacks shuffled across studies (`vertebrae.vertebra_train_dataset`); 'study', the seven
    stacks of each study (`vertebrae.SampleStudyStacks`). batch_size counts examples."""
    kwargs = dict(
        seed=config.seed,
        global_batch=config.stage2.optim.batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    if stage2_example(config) == "vertebra":
        return vertebrae.vertebra_train_dataset(
            entries, located, config.data, config.model.stacks, **kwargs
        )
    return pipeline.train_dataset(
        entries,
        config.data,
        sample=vertebrae.SampleStudyStacks(located, config.data, config.model.stacks, train=True),
        **kwargs,
    )


# ---------------------------------------------------------------------------- the run
def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, progress: bool = True
) -> dict[str, float]:
    """Trains (or resumes) both stages in `workdir`, then evaluates the best stage-2 checkpoint
    on every slice of every held-out study. Returns the held-out metrics (also in
    `workdir/metrics.json`)."""
    # Distributed set-up, mesh and input: as the single model's.
    run = trainer.start_run(
        config,
        [config.stage1.optim.batch_size, config.stage2.optim.batch_size],
    )
    num_processes = jax.process_count()
    cache_dir, train_entries, held_out = trainer.split_studies(config, progress)
    masked = [e for e in train_entries if e.has_mask]
    masked_held_out = [e for e in held_out if e.has_mask]
    if not masked or not masked_held_out:
        raise ValueError(
            "stage 1 needs studies with masks in both the training and the held-out studies"
        )

    # Model: both stages in one parameter tree; each stage's step trains its part.
    abstract = nnx.eval_shape(lambda: two_stage.create_model(config, config.seed))
    seg_graphdef, cls_graphdef = nnx.graphdef(abstract.segmenter), nnx.graphdef(abstract.classifier)
    tx1, step1 = make_stage_step(config, "segmenter", seg_graphdef)
    tx2, step2 = make_stage_step(config, "classifier", cls_graphdef)
    graphdef, state = trainer.init_state(
        run,
        lambda: two_stage.create_model(config, config.seed),
        lambda params: {"params": params, "opt_state": tx1.init(params["segmenter"])},
    )
    writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if run.chief else None
    if run.chief:
        print(
            f"two-stage model: {single.param_count(state['params']['segmenter']):,} "
            f"segmenter + {single.param_count(state['params']['classifier']):,} "
            f"classifier parameters; {jax.device_count()} devices in {num_processes} "
            f"process(es); {len(train_entries)} train ({len(masked)} with masks) / "
            f"{len(held_out)} held-out studies; cache {cache_dir}"
        )

    # Stage 1: the segmenter on the studies with masks; evals: held-out segmentation loss.
    seg_terms = jax.jit(
        lambda params, batch: single.weighted_loss(
            two_stage.segmenter_loss(nnx.merge(seg_graphdef, params["segmenter"]), batch),
            config.stage1.loss,
        )[1]
    )

    def evaluate_stage1(params) -> tuple[dict[str, float], None]:
        params, sums = jax.device_get(params), {}
        for batch in pipeline.iterate(
            pipeline.eval_dataset(masked_held_out, config.data, config.stage1.optim.batch_size)
        ):
            for k, v in jax.device_get(seg_terms(params, batch)).items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(batch["study_index"])
        result = {f"val_{k}": v / len(masked_held_out) for k, v in sums.items()}
        return {
            "val_loss": sum(config.stage1.loss[k] * result[f"val_{k}"] for k in sums),
            **result,
        }, None

    mngr = checkpoints.manager(os.path.join(workdir, "stage1"), config.stage1.checkpoint.keep)
    state, seconds = trainer.train_loop(
        "stage1",
        config.stage1,
        config,
        step1,
        state,
        pipeline.iterate(
            pipeline.train_dataset(
                masked,
                config.data,
                seed=config.seed,
                global_batch=config.stage1.optim.batch_size,
                process_index=jax.process_index(),
                process_count=num_processes,
            ),
            config.data.workers,
        ),
        mngr,
        evaluate_stage1,
        run.data,
        writer,
        progress=progress,
    )
    checkpoints.close(mngr)

    # Locate: stage 1 over every slice of every training study, on the clock; the held-out
    # studies alike (once, for stage 2's evals), off the clock.
    locator = TwoStagePredictor(nnx.merge(graphdef, jax.device_get(state["params"])), config)

    def locate(entries, desc):
        return {
            e.uid: locator.locate(e.image())[0]
            for e in tqdm.tqdm(
                entries, desc=desc, unit="study", disable=not (run.chief and progress)
            )
        }

    located_path = os.path.join(workdir, "stage1", "located.npz")
    if os.path.exists(located_path):
        located, locate_seconds = vertebrae.load_located(
            located_path, [e.uid for e in train_entries]
        )
    else:
        start = time.perf_counter()
        located = locate(train_entries, "locate")
        locate_seconds = time.perf_counter() - start
        if run.chief:
            vertebrae.save_located(located_path, located, locate_seconds)
    held_out_located = locate(held_out, "locate held-out")
    seconds += locate_seconds

    # Stage 2: the classifier on vertebra stacks; evals: held-out competition loss.
    stacks = config.model.stacks
    state = build_state(config, state["params"], run.replicated)
    classify = jax.jit(
        lambda params, batch: jax.nn.sigmoid(
            nnx.merge(cls_graphdef, params["classifier"])(batch["image"], batch["found"])
        )
    )
    eval_ds = pipeline.eval_dataset(
        held_out,
        config.data,
        config.stage2.optim.batch_size,
        sample=vertebrae.SampleStudyStacks(held_out_located, config.data, stacks, train=False),
    )
    held_out_labels = np.stack([e.labels for e in held_out])

    def evaluate_stage2(params) -> tuple[dict[str, float], None]:
        params, probs = jax.device_get(params), np.zeros((len(held_out), 8), np.float32)
        for batch in pipeline.iterate(eval_ds):
            probs[batch["study_index"]] = jax.device_get(classify(params, batch))
        return {
            "val_loss": metrics.competition_loss(held_out_labels, probs),
            "val_auc_patient_overall": metrics.auc(held_out_labels[:, 0], probs[:, 0]),
        }, None

    mngr = checkpoints.manager(workdir, config.stage2.checkpoint.keep)
    trainer.train_loop(
        "stage2",
        config.stage2,
        config,
        step2,
        state,
        pipeline.iterate(
            stage2_dataset(config, train_entries, located, jax.process_index(), num_processes),
            config.data.workers,
        ),
        mngr,
        evaluate_stage2,
        run.data,
        writer,
        progress=progress,
        seconds=seconds,
    )
    checkpoints.close(mngr)

    # Final: the best stage-2 checkpoint on every slice of every held-out study, as the single
    # model's run ends.
    return trainer.finish_run(run, config, workdir, len(held_out), writer, progress=progress)


def build_state(
    config: ml_collections.ConfigDict, params: Any, sharding: NamedSharding | None = None
) -> dict[str, Any]:
    """The state stage 2 trains and every final checkpoint holds: the whole model's
    parameters and the AdamW state of the classifier's (placed by `sharding` when given)."""
    tx = optim.make_optimizer(config.stage2.optim)
    init = tx.init if sharding is None else jax.jit(tx.init, out_shardings=sharding)
    return {"params": params, "opt_state": init(params["classifier"])}


SYSTEM = systems.System(
    create_model=two_stage.create_model,
    build_state=build_state,
    make_predictor=TwoStagePredictor,
    train_and_evaluate=train_and_evaluate,
)
