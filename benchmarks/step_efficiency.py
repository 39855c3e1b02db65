"""How efficiently the default model's training step uses the machine: GFLOP/s of the step,
of the same convolutions alone, and of the real training loop, side by side.

    python benchmarks/step_efficiency.py [--steps 10] [--loop_steps 20]
        [--config configs/default.py] [--config.<field>=...]

e.g. `--config.optim.batch_size=32`, or `--config.data.phantom.num_studies=24` for a quick
run on fewer phantoms. Each measurement compiles its program, runs 2 untimed steps, then
times its steps dispatched back to back and waited for once at the end:

  train step     `trainer.make_train_step` (in-plane warp, forward, losses, backward, AdamW)
                 jitted as `trainer.train_loop` jits it, on one fixed batch of the real
                 pipeline, --steps times. Below it, the step's nested parts, each compiled and
                 timed on its own: the warp; + the forward pass and losses; + the backward
                 pass (the step adds AdamW). XLA fuses each program its own way, so a part
                 alone may cost less or more than it does inside the step.
  conv stack     the model's convolutions alone: every `nnx.Conv` of the backbone and decoder,
                 found in the model and given the input shape it sees in the step (B * S
                 slices), each fed its own random stand-in input; forward, backward (kernel
                 gradients, and input gradients wherever the step needs them) and an SGD
                 update of the kernels, without biases, normalisation, activations, heads or
                 losses. --steps times.
  training loop  the compiled step again, fed by the real input pipeline (Grain over the
                 prepared phantom cache, `trainer.to_global` onto the 1-device mesh) as
                 `trainer.train_and_evaluate` feeds it, --loop_steps times; logging,
                 evaluations and checkpoints are left out.

FLOPs are XLA's cost analysis of each compiled program (the loop runs the step's program, so
it takes the step's count); GFLOP/s = FLOPs per step * steps / seconds. The phantoms and
their prepared cache are made once (`sources.prepared_cache`, ~1.5 min on 2 cores) and not
timed. The last line:
    step_gflops_per_s=X conv_stack_gflops_per_s=Y loop_gflops_per_s=Z
"""

import dataclasses
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cspine_jax import augment, optim, trainer  # noqa: E402
from cspine_jax.data import cache, pipeline, sources  # noqa: E402
from cspine_jax.models import single  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")
_WARMUP_STEPS = 2  # untimed, after compilation: first runs allocate and page memory in
_SGD_LR = 1e-6  # the conv stack's update: small, so its kernels stay finite

config_flags.DEFINE_config_file("config", os.path.normpath(_DEFAULT_CONFIG), "Model and data.")
flags.DEFINE_integer("steps", 10, "Timed steps of the train step (and its parts) and conv stack.")
flags.DEFINE_integer("loop_steps", 20, "Timed steps of the training loop.")
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Measurement:
    """A timed program: FLOPs of one step by XLA's count, and seconds per step."""

    flops: float
    seconds: float

    @property
    def gflops_per_s(self) -> float:
        return self.flops / self.seconds / 1e9


# ---------------------------------------------------------------------------- timing
def cost_flops(compiled: jax.stages.Compiled) -> float:
    """FLOPs of one run of a compiled program by XLA's cost analysis (a dict in jax 0.10, a
    list of one dict per program in older versions)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis["flops"])


def time_steps(step: Callable[[Any], Any], carry: Any, steps: int) -> tuple[float, Any]:
    """(seconds per step, last carry) of `carry = step(carry)`, `steps` times after
    `_WARMUP_STEPS` untimed ones; dispatched back to back, as the training loop dispatches,
    and waited for once at the end."""
    for _ in range(_WARMUP_STEPS):
        carry = step(carry)
    jax.block_until_ready(carry)
    start = time.perf_counter()
    for _ in range(steps):
        carry = step(carry)
    jax.block_until_ready(carry)
    return (time.perf_counter() - start) / steps, carry


def measure_pure(fn: Callable, args: tuple, steps: int) -> Measurement:
    """Compiles `fn(*args)` and times `steps` calls on the same arguments."""
    compiled = jax.jit(fn).lower(*args).compile()
    seconds, _ = time_steps(lambda _: compiled(*args), None, steps)
    return Measurement(cost_flops(compiled), seconds)


# ---------------------------------------------------------------------------- X: the step
def compile_step(
    graphdef: nnx.GraphDef,
    config: ml_collections.ConfigDict,
    run: trainer.Run,
    state: dict[str, Any],
    batch: dict[str, jax.Array],
) -> jax.stages.Compiled:
    """The real train step, jitted as `trainer.train_loop` jits it (old state donated,
    outputs replicated) and compiled for `batch`'s shapes. X and the loop both call this
    executable directly: what the jitted function would dispatch, compiled once."""
    step_fn = trainer.make_train_step(graphdef, optim.make_optimizer(config.optim), config)
    jitted = jax.jit(step_fn, donate_argnums=(0, 1), out_shardings=(run.replicated,) * 3)
    return jitted.lower(state["params"], state["opt_state"], batch).compile()


def run_step(step: jax.stages.Compiled, next_batch: Callable[[], dict]) -> Callable:
    """carry (params, opt_state) -> the next one, by one call of the compiled step."""

    def advance(carry):
        params, opt_state, _ = step(*carry, next_batch())
        return params, opt_state

    return advance


def step_parts(graphdef: nnx.GraphDef, config: ml_collections.ConfigDict) -> dict:
    """The step's nested parts, each (params, batch) -> outputs: the warp; the warp, forward
    pass and weighted loss; the loss and its gradients (`trainer.make_grad_fn`)."""
    channels = single.input_channels(config) - 1
    ratios = trainer.make_loss_ratios(graphdef, config)
    grads = trainer.make_grad_fn(graphdef, config)
    return {
        "warp": lambda params, batch: augment.apply_warp(batch, channels),
        "+ forward, losses": lambda params, batch: single.weighted_loss(
            ratios(params, batch), dict(config.loss)
        ),
        "+ backward": grads,
    }


# ---------------------------------------------------------------------------- Y: conv stack
@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """One `nnx.Conv` of the model as it runs in the step.

    name: its path in the model; input_shape: (N, H, W, C) it receives; kernel_shape: HWIO;
    dtype: the compute dtype; reads_image: whether its input is the network's input (no
    gradient: the image is data, not a parameter).
    """

    name: str
    input_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    padding: str
    input_dilation: tuple[int, ...]
    kernel_dilation: tuple[int, ...]
    groups: int
    dtype: Any
    reads_image: bool

    def __call__(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """The convolution alone (no bias), in the compute dtype, as `nnx.Conv` runs it."""
        return jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=self.strides,
            padding=self.padding,
            lhs_dilation=self.input_dilation,
            rhs_dilation=self.kernel_dilation,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.groups,
        )


def _per_dim(value: int | tuple[int, ...] | None, dims: int) -> tuple[int, ...]:
    """An `nnx.Conv` stride or dilation (int, tuple or None for 1) as one int per dim."""
    value = 1 if value is None else value
    return (value,) * dims if isinstance(value, int) else tuple(value)


def model_convs(config: ml_collections.ConfigDict, image_shape: tuple[int, ...]) -> list[ConvLayer]:
    """Every `nnx.Conv` of the model, as `ConvLayer`s in call order, with the input shapes of
    a forward pass on a (B, S, H, W, C) image, traced abstractly (no compute)."""
    abstract = nnx.eval_shape(lambda: single.create_model(config, config.seed))
    graphdef, params = nnx.split(abstract)
    slices = (math.prod(image_shape[:2]), *image_shape[2:])  # the model folds S into B
    layers = []

    def forward(params, image, valid, z):
        model = nnx.merge(graphdef, params)
        names = {
            id(node): "/".join(map(str, path))
            for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Conv)
        }
        conv_call = nnx.Conv.__call__

        def recording(conv, x, *args, **kwargs):
            dims = len(conv.kernel_size)
            if conv.padding not in ("SAME", "VALID"):
                raise NotImplementedError(f"{names[id(conv)]}: padding {conv.padding!r}")
            layers.append(
                ConvLayer(
                    name=names[id(conv)],
                    input_shape=tuple(x.shape),
                    kernel_shape=tuple(conv.kernel.shape),
                    strides=_per_dim(conv.strides, dims),
                    padding=conv.padding,
                    input_dilation=_per_dim(conv.input_dilation, dims),
                    kernel_dilation=_per_dim(conv.kernel_dilation, dims),
                    groups=conv.feature_group_count,
                    dtype=jnp.dtype(conv.dtype or x.dtype),
                    # Nothing else in the network has the input slices' shape.
                    reads_image=tuple(x.shape) == slices,
                )
            )
            return conv_call(conv, x, *args, **kwargs)

        with mock.patch.object(nnx.Conv, "__call__", recording):
            return model(image, valid, z)

    jax.eval_shape(
        forward,
        params,
        jax.ShapeDtypeStruct(image_shape, jnp.float32),
        jax.ShapeDtypeStruct(image_shape[:2], jnp.float32),
        jax.ShapeDtypeStruct(image_shape[:2], jnp.float32),
    )
    return layers


def conv_stack(layers: list[ConvLayer], seed: int = 0) -> tuple[Callable, tuple]:
    """(step, (kernels, activations, images)) of the convolutions alone: each layer reads a
    stand-in input of its shape (random), `images` for the layers that read the image and
    `activations` for the others; the loss is the sum of every output.

    step(kernels, activations, images) -> (SGD-updated kernels, activation gradients, loss).
    It returns the activations' gradients because the real backward computes them too (to
    reach the layers below) and XLA would drop them unused; the image needs none.
    """
    rng = np.random.default_rng(seed)

    def normal(shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape, np.float32))

    kernels = {
        c.name: normal(c.kernel_shape, 1 / math.sqrt(math.prod(c.kernel_shape[:-1])))
        for c in layers
    }
    activations = {c.name: normal(c.input_shape) for c in layers if not c.reads_image}
    images = {c.name: normal(c.input_shape) for c in layers if c.reads_image}

    def loss(kernels, activations, images):
        total = jnp.float32(0.0)
        for c in layers:
            x = images[c.name] if c.reads_image else activations[c.name]
            total += c(x, kernels[c.name]).sum(dtype=jnp.float32)
        return total

    def step(kernels, activations, images):
        value, (kernel_grads, activation_grads) = jax.value_and_grad(loss, argnums=(0, 1))(
            kernels, activations, images
        )
        kernels = jax.tree.map(lambda k, g: k - _SGD_LR * g, kernels, kernel_grads)
        return kernels, activation_grads, value

    return step, (kernels, activations, images)


def measure_conv_stack(layers: list[ConvLayer], steps: int) -> Measurement:
    """Y: the conv stack's training step, its kernels donated as the step's state is."""
    step, (kernels, activations, images) = conv_stack(layers)
    compiled = jax.jit(step, donate_argnums=0).lower(kernels, activations, images).compile()
    seconds, _ = time_steps(
        lambda out: compiled(out[0], activations, images), (kernels, None, None), steps
    )
    return Measurement(cost_flops(compiled), seconds)


# ---------------------------------------------------------------------------- Z: the loop
def measure_loop(
    step: jax.stages.Compiled,
    state: dict[str, Any],
    dataset,
    workers: int,
    sharding: jax.sharding.NamedSharding,
    steps: int,
) -> tuple[float, float]:
    """(seconds per step, host seconds per step spent getting the batch) of the training
    loop: the real pipeline's batches, made global, fed to the compiled step back to back.

    Getting a batch overlaps the previous step's compute (dispatch is asynchronous): it
    only costs time where it takes longer than a step.
    """
    batches, waits = pipeline.iterate(dataset, workers), []

    def next_batch():
        start = time.perf_counter()
        batch = trainer.to_global(next(batches), sharding)
        waits.append(time.perf_counter() - start)
        return batch

    seconds, _ = time_steps(
        run_step(step, next_batch), (state["params"], state["opt_state"]), steps
    )
    return seconds, float(np.mean(waits[_WARMUP_STEPS:]))


# ---------------------------------------------------------------------------- main
def training_studies(config: ml_collections.ConfigDict) -> list[cache.Entry]:
    """The training studies of config.data, as `trainer.split_studies` splits them (the
    cache prepared, and phantoms generated, on first use)."""
    cache_dir = sources.prepared_cache(config.data, progress=False)
    train, _ = sources.split_entries(cache.read_entries(cache_dir), config.data, config.seed)
    return train


def _row(name: str, m: Measurement) -> str:
    return f"{name:<22}{m.flops / 1e9:>12.2f}{m.seconds * 1e3:>10.1f}{m.gflops_per_s:>10.1f}"


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    config = FLAGS.config
    batch_size = config.optim.batch_size
    run = trainer.start_run(config, [batch_size])
    dataset = pipeline.train_dataset(
        training_studies(config), config.data, seed=config.seed, global_batch=batch_size
    )
    fixed_batch = trainer.to_global(dataset[0], run.data)

    # X: the step on one fixed batch, then its parts on the state it leaves.
    graphdef, state = trainer.init_state(
        run,
        lambda: single.create_model(config, config.seed),
        lambda params: trainer.build_state(config, params),
    )
    step = compile_step(graphdef, config, run, state, fixed_batch)
    seconds, (params, opt_state) = time_steps(
        run_step(step, lambda: fixed_batch), (state["params"], state["opt_state"]), FLAGS.steps
    )
    x = Measurement(cost_flops(step), seconds)
    parts = {
        name: measure_pure(fn, (params, fixed_batch), FLAGS.steps)
        for name, fn in step_parts(graphdef, config).items()
    }

    # Y: the model's convolutions alone.
    layers = model_convs(config, fixed_batch["image"].shape)
    y = measure_conv_stack(layers, FLAGS.steps)

    # Z: the loop, the same compiled step fed by the pipeline.
    state = {"params": params, "opt_state": opt_state}
    seconds, wait = measure_loop(
        step, state, dataset, config.data.workers, run.data, FLAGS.loop_steps
    )
    z = Measurement(x.flops, seconds)

    device = jax.devices()[0]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(os.cpu_count); jax {jax.__version__} on {device.platform} ({device.device_kind}), "
        f"{jax.device_count()} device(s)"
    )
    b, s, h, w, c = fixed_batch["image"].shape
    print(
        f"model: {single.param_count(params):,} parameters, widths {tuple(config.model.widths)}"
        f", dtype {config.model.dtype}; batch {b} studies x {s} slices of {h}x{w}x{c}"
    )
    backbone = sum(layer.name.startswith("backbone") for layer in layers)
    print(
        f"conv stack: the model's {len(layers)} convolutions ({backbone} backbone, "
        f"{len(layers) - backbone} decoder) on {b * s} slices"
    )
    print(
        f"timed: {FLAGS.steps} steps (step, parts, conv stack), {FLAGS.loop_steps} steps "
        f"(loop), each after compilation and {_WARMUP_STEPS} untimed steps\n"
    )
    print(f"{'program':<22}{'GFLOP/step':>12}{'ms/step':>10}{'GFLOP/s':>10}")
    print(_row("train step", x))
    for name, part in parts.items():
        print(_row(f"  {name}", part))
    print(_row("conv stack", y))
    print(_row("training loop", z))
    print(
        f"\nthe conv stack holds {y.flops / x.flops:.0%} of the step's FLOPs and takes "
        f"{y.seconds / x.seconds:.0%} of its time; the loop spends {wait * 1e3:.1f} ms a step "
        f"getting its batch (overlapping the step) and runs at {x.seconds / z.seconds:.0%} of "
        "the step's rate"
    )
    print(
        f"step_gflops_per_s={x.gflops_per_s:.1f} conv_stack_gflops_per_s={y.gflops_per_s:.1f} "
        f"loop_gflops_per_s={z.gflops_per_s:.1f}"
    )


if __name__ == "__main__":
    app.run(main)
