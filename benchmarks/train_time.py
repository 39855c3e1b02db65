"""Training time: the single model against the two-stage baseline, same data, same machine.

    python benchmarks/train_time.py [--out runs/train_time] [--eval_points 5]
        [--single configs/default.py] [--two_stage configs/two_stage.py]
        [--single_steps N] [--stage1_steps N] [--stage2_steps N] [--batch B] [--grid G]
        [--single.<field>=... --two_stage.<field>=...]

Trains both systems, each by its own training code (`trainer`, `baseline.trainer`), on the
same phantom training studies (configs/two_stage.py takes configs/default.py's data section;
the benchmark refuses two different ones), with a checkpoint at every 1/eval_points of each
run (of stage 2 for the baseline). Then, off the clock, it scores every checkpoint on the same
held-out studies by whole-study inference (`systems.System.make_predictor`, evaluate.py's path):
the held-out competition loss over training time. A checkpoint's time is its `train_seconds`:
the wall time spent training up to it, compilation and input pipeline included, evaluations
and saves excluded; for the baseline it counts stage 1, the stage-1 pass over every slice of
every training study, and stage 2.

Reports per system: parameters, steps, batch, examples/s, FLOPs per step (XLA cost analysis of
the compiled step; a GRU's scan body counts once), training seconds and the loss curve (table,
`<out>/train_time.csv`, `<out>/train_time.png`); then time-to-quality, the training time each
needs to first reach the baseline's final held-out loss (at evaluation points, no
interpolation), and their ratio. An --out that holds earlier runs resumes them. The last line:
    time_to_quality_ratio=<single / two-stage> single_final_loss=<x> two_stage_final_loss=<y>
with ratio=inf when the single model never reaches the baseline's final loss.

Budget of the defaults on 2 CPU cores, ~17 min (measured 16.9 min with 5 evaluation points on
a quiet machine): the single model (configs/default.py, 400 steps) ~5.5 min of training; the
baseline ~8 min (stage 1 300 steps ~4 min, locate ~0.3 min, stage 2 300 steps ~3.7 min); the
rest (each trainer's final evaluation, scoring 2 x 5 checkpoints, FLOP counts compiling each
step once more) ~3 min. The phantoms and their cache, ~1.5 min, are
made once and not counted. On an accelerator scale it up with the flags, e.g. --grid=256
--batch=32 --single_steps=4000 --stage1_steps=1500 --stage2_steps=3000.
"""

import csv
import math
import os
import platform
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from matplotlib.figure import Figure
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cspine_jax import (  # noqa: E402
    checkpoints,
    evaluation,
    metrics,
    optim,
    report,
    systems,
    trainer,
)
from cspine_jax.baseline import trainer as two_stage_trainer  # noqa: E402
from cspine_jax.baseline import vertebrae  # noqa: E402
from cspine_jax.data import cache, pipeline, sources  # noqa: E402
from cspine_jax.models import single as single_model  # noqa: E402

_CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
config_flags.DEFINE_config_file(
    "single", os.path.normpath(os.path.join(_CONFIGS, "default.py")), "Config of the single model."
)
config_flags.DEFINE_config_file(
    "two_stage",
    os.path.normpath(os.path.join(_CONFIGS, "two_stage.py")),
    "Config of the two-stage baseline.",
)
flags.DEFINE_string("out", "runs/train_time", "Both runs, the CSV and the PNG.")
flags.DEFINE_integer("eval_points", 5, "Checkpoints scored per run (stage 2 for the baseline).")
flags.DEFINE_integer("single_steps", 0, "Steps of the single model; 0: its config's.")
flags.DEFINE_integer("stage1_steps", 0, "Steps of the baseline's stage 1; 0: its config's.")
flags.DEFINE_integer("stage2_steps", 0, "Steps of the baseline's stage 2; 0: its config's.")
flags.DEFINE_integer(
    "batch",
    0,
    "Global batch of every run (studies per step; stage 2 of "
    "vertebra examples: 7x as many stacks); 0: configs'.",
)
flags.DEFINE_integer("grid", 0, "In-plane grid of both (data.grid); 0: the configs'.")
FLAGS = flags.FLAGS


# ---------------------------------------------------------------------------- pure parts
def time_to_quality(seconds: np.ndarray, losses: np.ndarray, target: float) -> float:
    """The first time of a loss curve at or below `target`; inf if it never gets there.

    seconds, losses: (n,) evaluation points in training order.
    """
    reached = np.flatnonzero(np.asarray(losses) <= target)
    return float(np.asarray(seconds)[reached[0]]) if len(reached) else math.inf


def quality_ratio(
    single: tuple[np.ndarray, np.ndarray], two_stage: tuple[np.ndarray, np.ndarray]
) -> tuple[float, float, float]:
    """(single time, two-stage time, single / two-stage) to reach the two-stage curve's final
    loss; curves are (seconds, losses)."""
    target = float(two_stage[1][-1])
    t_single, t_two = time_to_quality(*single, target), time_to_quality(*two_stage, target)
    return t_single, t_two, t_single / t_two


def _every(steps: int, points: int) -> int:
    return max(1, math.ceil(steps / points))


def benchmark_configs(
    single: ml_collections.ConfigDict,
    two: ml_collections.ConfigDict,
    eval_points: int,
    single_steps: int = 0,
    stage1_steps: int = 0,
    stage2_steps: int = 0,
    batch: int = 0,
    grid: int = 0,
) -> tuple[ml_collections.ConfigDict, ...]:
    """Copies of both configs with the benchmark's overrides (0 keeps a value) and checkpoints
    at `eval_points` evenly spaced steps, all kept."""
    single, two = single.copy_and_resolve_references(), two.copy_and_resolve_references()
    for optim_config, steps in (
        (single.optim, single_steps),
        (two.stage1.optim, stage1_steps),
        (two.stage2.optim, stage2_steps),
    ):
        optim_config.steps = steps or optim_config.steps
        optim_config.warmup_steps = min(optim_config.warmup_steps, optim_config.steps // 4)
        optim_config.batch_size = batch or optim_config.batch_size
    if batch and two.stage2.example == "vertebra":
        two.stage2.optim.batch_size = 7 * batch  # the stacks of `batch` studies
    for config in (single, two):
        config.data.grid = grid or config.data.grid
    if single.data.to_dict() != two.data.to_dict():
        raise ValueError(
            "the two systems must train on the same data: their data sections "
            f"differ:\n{single.data}\nvs\n{two.data}"
        )
    single.checkpoint.update(every=_every(single.optim.steps, eval_points), keep=eval_points + 1)
    two.stage1.checkpoint.update(every=two.stage1.optim.steps)
    two.stage2.checkpoint.update(
        every=_every(two.stage2.optim.steps, eval_points), keep=eval_points + 1
    )
    return single, two


# ---------------------------------------------------------------------------- measurements
def loss_curve(workdir: str, held_out: list[cache.Entry]) -> tuple[np.ndarray, ...]:
    """(steps, train seconds, held-out competition losses) of every checkpoint of a run.

    One predictor for all checkpoints: its compiled programs stay, only the weights change.
    """
    mngr = checkpoints.manager(workdir, read_only=True)
    steps = sorted(mngr.all_steps())
    seconds = [mngr.metrics(s)["train_seconds"] for s in steps]
    mngr.close()
    labels, losses, predictor = np.stack([e.labels for e in held_out]), [], None
    for step in steps:
        model, config, _ = checkpoints.load_model(workdir, step)
        if predictor is None:
            predictor = systems.get(config).make_predictor(model, config)
        else:
            predictor.state = jax.device_get(nnx.state(model))
        probs = evaluation.predict_entries(predictor, held_out, progress=False).probs
        losses.append(metrics.competition_loss(labels, probs))
        print(
            f"  {os.path.basename(workdir)} step {step}: {seconds[len(losses) - 1]:.1f} s, "
            f"held-out loss {losses[-1]:.4f}",
            flush=True,
        )
    return np.array(steps), np.array(seconds), np.array(losses)


def _shapes(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


def step_flops(step_fn, *args) -> float:
    """FLOPs of one call of `step_fn(*args)` by XLA's cost analysis of the compiled program."""
    return float(jax.jit(step_fn).lower(*args).compile().cost_analysis()["flops"])


def single_flops(config: ml_collections.ConfigDict, train: list[cache.Entry]) -> float:
    """FLOPs of one training step of the single model."""
    graphdef, state = checkpoints.state_shapes(config)
    batch = pipeline.train_dataset(
        train, config.data, seed=0, global_batch=config.optim.batch_size
    )[0]
    step = trainer.make_train_step(graphdef, optim.make_optimizer(config.optim), config)
    return step_flops(step, state["params"], state["opt_state"], _shapes(batch))


def two_stage_flops(
    config: ml_collections.ConfigDict, train: list[cache.Entry], located: dict
) -> dict[str, float]:
    """FLOPs of one step of each stage, and of stage 1 per located slice."""
    graphdef, state = checkpoints.state_shapes(config)
    params, abstract = state["params"], nnx.merge(graphdef, state["params"])
    out = {}
    for name, part, dataset in (
        (
            "stage1",
            "segmenter",
            pipeline.train_dataset(
                [e for e in train if e.has_mask],
                config.data,
                seed=0,
                global_batch=config.stage1.optim.batch_size,
            ),
        ),
        ("stage2", "classifier", two_stage_trainer.stage2_dataset(config, train, located)),
    ):
        tx, step = two_stage_trainer.make_stage_step(
            config, part, nnx.graphdef(getattr(abstract, part))
        )
        batch = dataset[0]
        out[name] = step_flops(step, params, jax.eval_shape(tx.init, params[part]), _shapes(batch))
    chunk = 32
    images = jax.ShapeDtypeStruct(
        (chunk, config.data.grid, config.data.grid, single_model.input_channels(config)), np.float32
    )
    out["locate_per_slice"] = (
        step_flops(lambda p, x: nnx.merge(graphdef, p).locate(x), params, images) / chunk
    )
    return out


# ---------------------------------------------------------------------------- report
def curve_figure(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    target: float,
    prior_loss: float,
    stage_marks: dict[str, float],
) -> Figure:
    """Held-out competition loss against training time, one line per system."""
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, (seconds, losses) in curves.items():
        ax.plot(seconds / 60, losses, marker="o", lw=1.6, label=name)
    ax.axhline(target, ls="--", color="0.4", lw=1, label=f"two-stage final loss {target:.4f}")
    ax.axhline(
        prior_loss,
        ls=":",
        color="tab:red",
        lw=1,
        label=f"constant training prevalence {prior_loss:.4f}",
    )
    for label, seconds in stage_marks.items():
        ax.axvline(seconds / 60, ls=":", color="0.6", lw=1)
        ax.annotate(
            label,
            (seconds / 60, 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=8,
            color="0.4",
        )
    ax.set(
        xlabel="training time (min; evaluations excluded)",
        ylabel="held-out competition loss",
        title="Single model vs two-stage pipeline",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def main(argv):
    del argv
    start = time.perf_counter()
    logging.set_verbosity(logging.ERROR)
    single, two = benchmark_configs(
        FLAGS.single,
        FLAGS.two_stage,
        FLAGS.eval_points,
        FLAGS.single_steps,
        FLAGS.stage1_steps,
        FLAGS.stage2_steps,
        FLAGS.batch,
        FLAGS.grid,
    )
    out = FLAGS.out
    runs = {"single": os.path.join(out, "single"), "two-stage": os.path.join(out, "two_stage")}
    os.makedirs(out, exist_ok=True)
    device = jax.devices()[0]
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax "
        f"{jax.__version__} on {device.platform} ({device.device_kind}), "
        f"{jax.device_count()} device(s)"
    )
    print(f"machine: {machine}", flush=True)

    # Train: each system by its own code, in turn (never sharing the machine).
    trainer.train_and_evaluate(single, runs["single"], progress=False)
    two_stage_trainer.train_and_evaluate(two, runs["two-stage"], progress=False)

    # Score every checkpoint on the same held-out studies, off the clock.
    train, held_out = sources.split_entries(
        cache.read_entries(sources.prepared_cache(single.data, progress=False)),
        single.data,
        single.seed,
    )
    print(f"scoring checkpoints on {len(held_out)} held-out studies", flush=True)
    curves = {name: loss_curve(path, held_out) for name, path in runs.items()}
    # What learning nothing scores: every held-out study predicted at the training prevalence.
    labels = np.stack([e.labels for e in held_out])
    prior = np.stack([e.labels for e in train]).mean(axis=0)
    prior_loss = metrics.competition_loss(labels, np.broadcast_to(prior, labels.shape))

    # Costs.
    located, locate_seconds = vertebrae.load_located(
        os.path.join(runs["two-stage"], "stage1", "located.npz"), [e.uid for e in train]
    )
    flops = {"single": single_flops(single, train), **two_stage_flops(two, train, located)}
    mngr = checkpoints.manager(os.path.join(runs["two-stage"], "stage1"), read_only=True)
    stage1_seconds = mngr.metrics(mngr.latest_step())["train_seconds"]
    mngr.close()
    located_slices = sum(e.num_slices for e in train)
    single_seconds = curves["single"][1][-1]
    stage2_seconds = curves["two-stage"][1][-1] - stage1_seconds - locate_seconds
    two_params = checkpoints.state_shapes(two)[1]["params"]
    seg_params = single_model.param_count(two_params["segmenter"])
    cls_params = single_model.param_count(two_params["classifier"])
    rows = [  # name, parameters, steps, batch, seconds, FLOPs per step
        (
            "single",
            single_model.param_count(checkpoints.state_shapes(single)[1]["params"]),
            single.optim.steps,
            single.optim.batch_size,
            single_seconds,
            flops["single"],
        ),
        (
            "two-stage: stage 1",
            seg_params,
            two.stage1.optim.steps,
            two.stage1.optim.batch_size,
            stage1_seconds,
            flops["stage1"],
        ),
        # A "step" of the locate pass is one slice through the segmenter.
        ("two-stage: locate", None, located_slices, 1, locate_seconds, flops["locate_per_slice"]),
        (
            "two-stage: stage 2",
            cls_params,
            two.stage2.optim.steps,
            two.stage2.optim.batch_size,
            stage2_seconds,
            flops["stage2"],
        ),
    ]
    print(
        f"\n{'system':<20}{'params':>10}{'steps':>8}{'batch':>6}{'ex/s':>8}"
        f"{'GFLOP/step':>12}{'TFLOP':>8}{'train s':>9}"
    )
    for name, params, steps, batch, seconds, step_flop in rows:
        print(
            f"{name:<20}{'' if params is None else f'{params:,}':>10}{steps:>8}{batch:>6}"
            f"{steps * batch / seconds:>8.1f}{step_flop / 1e9:>12.3f}"
            f"{steps * step_flop / 1e12:>8.2f}{seconds:>9.1f}"
        )
    print(
        f"{'two-stage: total':<20}{seg_params + cls_params:>10,}{'':>34}"
        f"{sum(r[2] * r[5] for r in rows[1:]) / 1e12:>8.2f}{curves['two-stage'][1][-1]:>9.1f}"
    )
    print(
        "(locate: steps = training slices read by stage 1, ex/s = slices/s; stage 2: "
        f"an example is {'a vertebra stack' if two.stage2.example == 'vertebra' else 'a study'})"
    )

    # Curves.
    csv_path = os.path.join(out, "train_time.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["system", "step", "train_seconds", "held_out_competition_loss"])
        for name, (steps, seconds, losses) in curves.items():
            writer.writerows(
                (name, int(s), f"{t:.2f}", f"{v:.6f}")
                for s, t, v in zip(steps, seconds, losses, strict=True)
            )
    print(f"\n{'system':<12}{'step':>7}{'train s':>10}{'held-out loss':>15}")
    for name, (steps, seconds, losses) in curves.items():
        for s, t, v in zip(steps, seconds, losses, strict=True):
            print(f"{name:<12}{int(s):>7}{t:>10.1f}{v:>15.4f}")

    # Time to quality.
    pairs = {name: (seconds, losses) for name, (_, seconds, losses) in curves.items()}
    target = float(pairs["two-stage"][1][-1])
    t_single, t_two, ratio = quality_ratio(pairs["single"], pairs["two-stage"])
    png_path = report.save_png(
        curve_figure(
            pairs,
            target,
            prior_loss,
            {
                "two-stage: stage 1 done": stage1_seconds,
                "two-stage: locate done": stage1_seconds + locate_seconds,
            },
        ),
        os.path.join(out, "train_time.png"),
    )
    print(f"\nreference: a constant prediction at the training prevalence scores {prior_loss:.4f}")
    print(f"target: the two-stage pipeline's final held-out loss {target:.4f}")
    print(
        f"time to reach it: single {t_single:.1f} s, two-stage {t_two:.1f} s "
        f"(single / two-stage = {ratio:.3f}; < 1: the single model gets there sooner)"
    )
    print(
        f"curves: {csv_path}, {png_path}; the whole benchmark took "
        f"{(time.perf_counter() - start) / 60:.1f} min"
    )
    print(
        f"time_to_quality_ratio={ratio:.3f} single_final_loss={pairs['single'][1][-1]:.4f} "
        f"two_stage_final_loss={target:.4f}"
    )


if __name__ == "__main__":
    app.run(main)
