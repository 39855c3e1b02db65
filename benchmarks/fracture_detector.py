"""How learnable are the phantoms' fractures? The backbone + decoder's fracture map alone.

    python benchmarks/fracture_detector.py [--steps 800] [--strides 2,2,2,2] [--no-warp]
        [--extra_studies 0] [--loss weighted|mil] [--slices_per_study 1] [--eval_every 100]

The single model's accuracy depends first on one skill: marking fracture pixels on a slice.
This trains only that skill, on the default config's prepared phantoms: SingleModel's backbone
and segmentation decoder (`models.backbone`, `models.heads.SegDecoder`, its fracture channel),
on 2.5D slices (config.data.context, both HU windows) drawn half from box slices of the
training studies, half from other slices, with the train step's in-plane warp
(`augment.apply_warp`, one per slice) unless --no-warp. Targets are the box masks at the
decoder's stride; --loss weighted is the single model's `single.fracture_map_loss` (pixel
BCE, box pixels weighted 20x), --loss mil asks only the top-4 logits inside each slice's boxes
to fire (multiple instance) plus the hardest 2 % of negative pixels. --extra_studies N adds
N training studies from a second phantom set (seed 1), generated once. --slices_per_study K
draws a step's slices as K slices from each of batch / K studies, as a training batch of
whole-study bags does (the single model's `num_slices`), instead of independently.

Every --eval_every steps it prints held-out AUCs on the default fold's held-out studies:
slice (box slice or not, scored by the mean of the slice's 8 highest pixel probabilities) and
study (patient_overall, scored by the mean of the study's 2 highest slice scores over every
slice), and the training slices' AUC (memorising or underfitting). The last line:
    detector_study_auc=<held-out study AUC> detector_slice_auc=<held-out slice AUC>
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from sklearn.metrics import roc_auc_score

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from configs import default  # noqa: E402
from cspine_jax import augment, optim  # noqa: E402
from cspine_jax.data import cache, pipeline, sources  # noqa: E402
from cspine_jax.models import single  # noqa: E402
from cspine_jax.models.backbone import Backbone  # noqa: E402
from cspine_jax.models.heads import NUM_CLASSES, SegDecoder  # noqa: E402

flags.DEFINE_integer("steps", 800, "training steps")
flags.DEFINE_integer("batch", 32, "slices per step, half of them box slices")
flags.DEFINE_integer(
    "slices_per_study",
    1,
    "a step's slices come from batch / this many studies "
    "(half of them positive), this many each; 1: independent slices",
)
flags.DEFINE_list("strides", ["2", "2", "2", "2"], "backbone stage strides (config.model)")
flags.DEFINE_bool("warp", True, "in-plane warp (rotation, scale, shift of config.data.augment)")
flags.DEFINE_integer("extra_studies", 0, "training studies added from phantom seed 1")
flags.DEFINE_enum("loss", "weighted", ["weighted", "mil"], "pixel loss")
flags.DEFINE_integer("eval_every", 100, "steps between evaluations")
F = flags.FLAGS


class Detector(nnx.Module):
    """(N, H, W, C) slices -> (N, H/2, W/2) fracture logits."""

    def __init__(self, model_config, in_features: int, strides, rngs: nnx.Rngs):
        self.backbone = Backbone(
            in_features, model_config.widths, model_config.depths, strides, 16, jnp.float32, rngs
        )
        self.decoder = SegDecoder(
            (model_config.widths[0], *model_config.widths),
            self.backbone.feature_strides,
            model_config.decoder_width,
            16,
            jnp.float32,
            rngs,
        )

    def __call__(self, x):
        return self.decoder(self.backbone(x))[..., NUM_CLASSES]


def box_slices(entries, rng, negatives_per_study: int = 12):
    """Every box slice of the positive studies plus a few others, and random slices of the
    negative ones: (N, G, G, C) uint8 inputs, (N, G, G) uint8 box masks, (N,) the index of
    each slice's study in `entries`."""
    inputs, targets, owners = [], [], []
    for i, e in enumerate(entries):
        image, boxes = np.asarray(e.image()), np.asarray(e.fracture())
        on_box = boxes.any(axis=(1, 2))
        if e.labels[0] and on_box.any():
            z = np.concatenate([np.flatnonzero(on_box), rng.choice(np.flatnonzero(~on_box), 4)])
        elif e.labels[0]:
            continue  # a positive study without boxes: its fracture pixels are unknown
        else:
            z = rng.choice(len(image), negatives_per_study)
        inputs.append(pipeline.stack_context(image, z, default.get_config().data.context))
        targets.append(boxes[z])
        owners.append(np.full(len(z), i))
    return np.concatenate(inputs), np.concatenate(targets), np.concatenate(owners)


def pixel_loss(logits, boxes, kind: str):
    if kind == "weighted":
        ones = jnp.ones(len(logits))
        return single.ratio_value(
            single.fracture_map_loss(logits[:, None], boxes[:, None], ones[:, None], ones)
        )
    target = single.box_cells(boxes[:, None], logits.shape[1])[:, 0].astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(logits, target)
    inside = jnp.where(target > 0, logits, -1e9).reshape(len(target), -1)
    has_box = target.reshape(len(target), -1).max(-1)
    positive = (has_box * jax.nn.softplus(-jax.lax.top_k(inside, 4)[0].mean(-1))).sum()
    negative = jax.lax.top_k((bce * (1 - target)).reshape(-1), int(0.02 * bce.size))[0].mean()
    return 0.5 * (positive / jnp.maximum(has_box.sum(), 1.0) + negative)


def slice_scores(predict, params, inputs) -> np.ndarray:
    """Mean of each slice's 8 highest pixel probabilities."""
    probs = np.concatenate(
        [
            np.asarray(predict(params, inputs[i : i + 64].astype(np.float32) / 255))
            for i in range(0, len(inputs), 64)
        ]
    )
    return np.sort(probs.reshape(len(probs), -1), axis=1)[:, -8:].mean(axis=1)


def main(argv):
    del argv
    config = default.get_config()
    entries = cache.read_entries(sources.prepared_cache(config.data))
    train, held_out = sources.split_entries(entries, config.data, config.seed)
    if F.extra_studies:
        extra = config.data.copy_and_resolve_references()
        extra.phantom.update(seed=1, num_studies=F.extra_studies)
        train = train + cache.read_entries(sources.prepared_cache(extra))
    x_train, y_train, owner = box_slices(train, np.random.default_rng(0))
    x_held, y_held, _ = box_slices(held_out, np.random.default_rng(1))
    rows_of = [np.flatnonzero(owner == i) for i in range(len(train))]
    studies = {
        label: [i for i, e in enumerate(train) if len(rows_of[i]) and e.labels[0] == label]
        for label in (0, 1)
    }
    positives = np.flatnonzero(y_train.any(axis=(1, 2)))
    negatives = np.flatnonzero(~y_train.any(axis=(1, 2)))
    print(
        f"{len(train)} training studies ({len(x_train)} slices, {len(positives)} with boxes), "
        f"{len(held_out)} held-out; strides {F.strides}, warp {F.warp}, loss {F.loss}; "
        f"{jax.devices()[0].device_kind}"
    )

    channels = x_train.shape[-1]
    model = Detector(config.model, channels, tuple(int(s) for s in F.strides), nnx.Rngs(0))
    opt_config = config.optim.copy_and_resolve_references()
    opt_config.update(steps=F.steps, warmup_steps=30)
    tx = optim.make_optimizer(opt_config)
    graphdef, params = nnx.split(model)
    opt_state = tx.init(params)
    aug = config.data.augment

    @jax.jit
    def step(params, opt_state, x, boxes, warp):
        if F.warp:
            warped = augment.apply_warp(
                {"image": x[:, None], "fracture": boxes[:, None], "warp": warp}, channels
            )
            x, boxes = warped["image"][:, 0], warped["fracture"][:, 0]
        loss, grads = jax.value_and_grad(
            lambda p: pixel_loss(nnx.merge(graphdef, p)(x), boxes, F.loss)
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    predict = jax.jit(lambda p, x: jax.nn.sigmoid(nnx.merge(graphdef, p)(x)))

    def study_auc(params):
        scores = []
        for e in held_out:
            image = np.asarray(e.image())
            s = slice_scores(
                predict,
                params,
                pipeline.stack_context(image, np.arange(len(image)), config.data.context),
            )
            scores.append(np.sort(s)[-2:].mean())
        return roc_auc_score([e.labels[0] for e in held_out], scores)

    rng = np.random.default_rng(2)
    half, shift = F.batch // 2, aug.shift * x_train.shape[1]
    print(
        f"{'step':>6} {'seconds':>8} {'loss':>7} {'train slice':>11} {'held slice':>10} "
        f"{'held study':>10}"
    )
    clock, seconds = time.perf_counter(), 0.0
    for i in range(1, F.steps + 1):
        if F.slices_per_study == 1:
            idx = np.concatenate([rng.choice(positives, half), rng.choice(negatives, half)])
        else:  # half the studies positive, each giving slices_per_study of its slices
            picked = [rng.choice(studies[label], half // F.slices_per_study) for label in (1, 0)]
            idx = np.concatenate(
                [rng.choice(rows_of[i], F.slices_per_study) for i in np.concatenate(picked)]
            )
        x = x_train[idx].astype(np.float32) / 255
        boxes = y_train[idx].astype(np.int32)
        if aug.flip and rng.random() < 0.5:
            x, boxes = x[:, :, ::-1], boxes[:, :, ::-1]
        warp = np.stack(
            [
                np.deg2rad(rng.uniform(-aug.rotate_deg, aug.rotate_deg, len(idx))),
                1 + rng.uniform(-aug.scale, aug.scale, len(idx)),
                rng.uniform(-shift, shift, len(idx)),
                rng.uniform(-shift, shift, len(idx)),
            ],
            1,
        ).astype(np.float32)
        params, opt_state, loss = step(
            params, opt_state, np.ascontiguousarray(x), np.ascontiguousarray(boxes), warp
        )
        if i % F.eval_every == 0 or i == F.steps:
            loss = float(loss)
            seconds += time.perf_counter() - clock
            train_auc = roc_auc_score(
                y_train[:2000].any(axis=(1, 2)), slice_scores(predict, params, x_train[:2000])
            )
            slice_auc = roc_auc_score(
                y_held.any(axis=(1, 2)), slice_scores(predict, params, x_held)
            )
            study = study_auc(params)
            print(
                f"{i:>6} {seconds:>8.0f} {loss:>7.4f} {train_auc:>11.3f} {slice_auc:>10.3f} "
                f"{study:>10.3f}",
                flush=True,
            )
            clock = time.perf_counter()
    print(f"detector_study_auc={study:.3f} detector_slice_auc={slice_auc:.3f}")


if __name__ == "__main__":
    app.run(main)
