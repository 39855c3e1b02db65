"""How learnable are the phantoms' fractures? The single model's fracture map trained alone.

    python benchmarks/fracture_detector.py [--steps 800] [--seconds 0] [--batch 32]
        [--config.model.strides=1,2,2,2] [--config.model.image_skip=True]
        [--config.data.phantom.num_studies=720] [--eval_every 100]

The single model's accuracy depends first on one skill: marking fracture pixels on a slice.
This trains only that skill: SingleModel's backbone and segmentation decoder (its fracture
channel, `SingleModel.encode_slices`), on the fracture stream the single model trains on
(`pipeline.StreamSlices` over the training studies of the config's split: `--batch` slices
a step drawn independently, a share `data.stream.boxed` of them boxed, each with its own
flip, intensity jitter and in-plane warp), with the single model's box-weighted pixel BCE
(`single.fracture_map_loss`). `--config.*` overrides the default config (phantoms,
network), so the map alone and the one model (`benchmarks/map_side_by_side.py`) train on
the same data with the same stream settings.

Every --eval_every steps it prints held-out AUCs on the config's held-out studies, scored as
`benchmarks/map_scores.py` scores any map: slice (box slice or not) and study
(patient_overall over every slice). Training stops at --steps, or at --seconds of training
when given. The last line:
    detector_study_auc=<held-out study AUC> detector_slice_auc=<held-out slice AUC>
"""

import os
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import map_scores  # noqa: E402

from cspine_jax import augment, optim  # noqa: E402
from cspine_jax.data import cache, pipeline, sources  # noqa: E402
from cspine_jax.models import single  # noqa: E402


def map_fn(graphdef, params):
    """The trained map as `map_scores.MapFn`."""
    predict = jax.jit(
        lambda p, x: jax.nn.sigmoid(nnx.merge(graphdef, p).encode_slices(x)["fracture_logits"])
    )
    return lambda x: predict(params, x)


def train_detector(
    config, steps: int, seconds_limit: float, batch: int, eval_every: int
) -> dict[str, float]:
    """Trains the map alone on `config`'s data (see the module doc); returns its last
    held-out `study_auc`, `slice_auc` and the training `seconds`."""
    entries = cache.read_entries(sources.prepared_cache(config.data))
    train, held_out = sources.split_entries(entries, config.data, config.seed)
    pool = pipeline.FracturePool.of(train)
    stream = pipeline.StreamSlices(pool, batch, config.data, float(config.data.stream.boxed))
    batches = iter(
        grain.MapDataset.range(steps + 1)
        .random_map(stream, seed=config.seed)
        .to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    )
    x_held, y_held, _, z_held = map_scores.box_slices(
        held_out, np.random.default_rng(1), config.data.context
    )
    print(
        f"{len(train)} training studies ({len(pool.boxed)} boxed slices, {len(pool.clear)} "
        f"others), {len(held_out)} held-out; strides {tuple(config.model.strides)}, image skip "
        f"{config.model.image_skip}; {batch} slices a step; {jax.devices()[0].device_kind}"
    )

    model = single.create_model(config, config.seed)
    opt_config = config.optim.copy_and_resolve_references()
    opt_config.update(steps=steps, warmup_steps=30)
    tx = optim.make_optimizer(opt_config)
    graphdef, params = nnx.split(model)
    opt_state = tx.init(params)
    channels = single.input_channels(config) - 1

    @jax.jit
    def step(params, opt_state, batch):
        batch = augment.apply_stream_warps(jax.tree.map(lambda x: x[None], batch), channels)

        def loss_fn(p):
            logits = nnx.merge(graphdef, p).encode_slices(batch["stream_image"][0])
            ones = jnp.ones(batch["stream_image"].shape[:2])
            return single.ratio_value(
                single.fracture_map_loss(
                    logits["fracture_logits"][None], batch["stream_fracture"], ones, ones[:, 0]
                )
            )

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    print(f"{'step':>6} {'seconds':>8} {'loss':>7} {'held slice':>10} {'held study':>10}")
    clock, seconds, i = time.perf_counter(), 0.0, 0
    while i < steps and not (seconds_limit and seconds >= seconds_limit):
        i += 1
        params, opt_state, loss = step(params, opt_state, next(batches))
        if seconds_limit:
            jax.block_until_ready(loss)
        seconds += time.perf_counter() - clock
        clock = time.perf_counter()
        done = i == steps or (seconds_limit and seconds >= seconds_limit)
        if i % eval_every == 0 or done:
            predict = map_fn(graphdef, params)
            held = map_scores.slice_auc(predict, x_held, y_held, z_held)
            study = map_scores.study_auc(predict, held_out, config.data.context)
            print(
                f"{i:>6} {seconds:>8.0f} {float(loss):>7.4f} {held:>10.3f} {study:>10.3f}",
                flush=True,
            )
            clock = time.perf_counter()
    return {"study_auc": study, "slice_auc": held, "seconds": seconds, "steps": i}


def main(argv):
    del argv
    f = flags.FLAGS
    result = train_detector(f.config, f.steps, f.seconds, f.batch, f.eval_every)
    print(
        f"detector_study_auc={result['study_auc']:.3f} detector_slice_auc={result['slice_auc']:.3f}"
    )


if __name__ == "__main__":  # flags only as a script: map_side_by_side imports this module
    config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")
    )
    flags.DEFINE_integer("steps", 800, "training steps (at most)")
    flags.DEFINE_float("seconds", 0.0, "training seconds (at most; 0: no limit)")
    flags.DEFINE_integer("batch", 32, "stream slices per step")
    flags.DEFINE_integer("eval_every", 100, "steps between evaluations")
    app.run(main)
