"""SingleModel: shapes and sizes per config, pooling invariances, chunked inference, losses,
a short overfit and bf16 compute.

Every jitted function is built once per module (fixtures) and called at one shape where
possible: compilation, not compute, is what costs time on the 2-core CI machine.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import default, rsna, tiny
from cspine_jax.data.rsna import NEGATIVE_WEIGHTS, POSITIVE_WEIGHTS
from cspine_jax.models import heads
from cspine_jax.models import single as sn

B, S, GRID = 2, 4, 32
CONFIGS = dict(tiny=tiny.get_config, default=default.get_config, rsna=rsna.get_config)
# Trainable parameters expected per config: tiny ~ tens of thousands, rsna a few M at most.
PARAM_RANGES = dict(tiny=(2e4, 1e5), default=(2e5, 1.5e6), rsna=(2e6, 8e6))


def _tiny_config(dtype="float32"):
    c = tiny.get_config()
    c.data.grid = GRID
    c.model.dtype = dtype
    return c


def _batch(config, seed=0):
    """A batch with learnable structure: slice s of a study shows vertebra s + 1 as a bright
    square in channel s (GroupNorm would erase a plain intensity code); study 0 has a mask, a
    fracture on C2 and boxes, study 1 has neither."""
    rng = np.random.default_rng(seed)
    c = sn.input_channels(config)
    mask = np.zeros((B, S, GRID, GRID), np.int32)
    image = rng.normal(0.0, 0.05, (B, S, GRID, GRID, c)).astype(np.float32)
    for s in range(S):
        mask[:, s, 8:24, 8:24] = s + 1
        image[:, s, 8:24, 8:24, s % c] += 1.0
    labels = np.zeros((B, 8), np.float32)
    labels[0, [0, 2]] = 1.0
    slice_fracture = np.zeros((B, S), np.float32)
    slice_fracture[0, 1] = 1.0
    fracture = np.zeros((B, S, GRID, GRID), np.int32)
    fracture[0, 1, 12:16, 8:24] = 1
    batch = dict(
        image=image,
        mask=mask,
        has_mask=np.array([1, 0], np.float32),
        slice_fracture=slice_fracture,
        fracture=fracture,
        has_boxes=np.array([1, 0], np.float32),
        labels=labels,
        valid=np.ones((B, S), np.float32),
    )
    return jax.tree.map(jnp.asarray, batch)


class _Jitted:
    """The project's style: nnx.split once, plain jax.jit over the state."""

    def __init__(self, config, seed=0):
        self.config = config
        self.model = sn.create_model(config, seed)
        self.graphdef, self.state = nnx.split(self.model)
        merge = lambda state: nnx.merge(self.graphdef, state)  # noqa: E731
        self.forward = jax.jit(lambda state, image, valid: merge(state)(image, valid))
        self.encode = jax.jit(lambda state, images: merge(state).encode_slices(images))
        self.pool = jax.jit(lambda state, *args: merge(state).pool(*args))


@pytest.fixture(scope="module")
def net():
    return _Jitted(_tiny_config())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_output_shapes_and_param_counts(name):
    config = CONFIGS[name]()
    model = nnx.eval_shape(lambda: sn.create_model(config))
    count = sn.param_count(model)
    print(f"{name}: {count:,} parameters")
    low, high = PARAM_RANGES[name]
    assert low <= count <= high

    graphdef, state = nnx.split(model)
    grid, c = config.data.grid, sn.input_channels(config)
    out = jax.eval_shape(
        lambda st, x, v: nnx.merge(graphdef, st)(x, v),
        state,
        jax.ShapeDtypeStruct((B, S, grid, grid, c), jnp.float32),
        jax.ShapeDtypeStruct((B, S), jnp.float32),
    )
    assert out["seg_logits"].shape == (B, S, grid // 2, grid // 2, 8)
    assert out["slice_logits"].shape == (B, S, 7)
    assert out["presence"].shape == (B, S, 7)
    assert out["study_logits"].shape == (B, 8)
    assert all(v.dtype == jnp.float32 for v in out.values())


def test_forward_is_finite_and_presence_is_a_probability(net):
    batch = _batch(net.config)
    out = net.forward(net.state, batch["image"], batch["valid"])
    assert out["seg_logits"].shape == (B, S, GRID // 2, GRID // 2, 8)
    assert all(bool(jnp.isfinite(v).all()) for v in out.values())
    assert bool(((out["presence"] >= 0) & (out["presence"] <= 1)).all())


def test_study_logits_ignore_slice_order_and_padding(net):
    batch = _batch(net.config)
    rng = np.random.default_rng(1)
    # Four real slices then two padded ones, vs the same slices shuffled with the padding
    # (now random noise, not zeros) interleaved.
    padded = jnp.concatenate([batch["image"], jnp.zeros_like(batch["image"][:, :2])], axis=1)
    valid = jnp.concatenate([batch["valid"], jnp.zeros((B, 2))], axis=1)
    order = np.array([4, 2, 0, 5, 3, 1])
    shuffled = (
        padded[:, order].at[:, [0, 3]].set(rng.normal(size=padded[:, :2].shape).astype(np.float32))
    )
    base = net.forward(net.state, padded, valid)["study_logits"]
    moved = net.forward(net.state, shuffled, valid[:, order])["study_logits"]
    np.testing.assert_allclose(moved, base, rtol=1e-5, atol=1e-5)

    unpadded = net.forward(net.state, batch["image"], batch["valid"])["study_logits"]
    np.testing.assert_allclose(unpadded, base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_slices", [3, 300])
def test_pool_is_order_and_padding_invariant_at_any_length(net, num_slices):
    rng = np.random.default_rng(num_slices)
    logits = jnp.asarray(rng.normal(0, 3, (B, num_slices, 7)), jnp.float32)
    presence = jnp.asarray(rng.uniform(size=(B, num_slices, 7)), jnp.float32)
    valid = jnp.ones((B, num_slices))
    study = net.pool(net.state, logits, presence, valid)
    assert study.shape == (B, 8) and bool(jnp.isfinite(study).all())

    perm = rng.permutation(num_slices)
    np.testing.assert_allclose(
        net.pool(net.state, logits[:, perm], presence[:, perm], valid), study, rtol=1e-5, atol=1e-5
    )
    # Padding with huge logits and full presence: only `valid` may keep them out.
    pad = lambda x, v: jnp.concatenate([x, jnp.full((B, 5, *x.shape[2:]), v)], axis=1)  # noqa: E731
    padded = net.pool(net.state, pad(logits, 1e4), pad(presence, 1.0), pad(valid, 0.0))
    np.testing.assert_allclose(padded, study, rtol=1e-6, atol=1e-6)


def test_pool_follows_presence(net):
    """A fracture logit on the slices where C3 is raises C3 far more than C5."""
    logits = jnp.full((1, 10, 7), -4.0).at[0, 2:4, :].set(4.0)
    presence = jnp.zeros((1, 10, 7)).at[0, 1:5, 2].set(1.0).at[0, 6:9, 4].set(1.0)
    study = net.pool(net.state, logits, presence, jnp.ones((1, 10)))
    assert float(study[0, 3]) > 2.0 > -2.0 > float(study[0, 5])
    # patient_overall is the noisy-OR of the vertebrae: at least the most likely one.
    assert float(study[0, 0]) >= float(study[0, 1:].max())


def test_chunked_encode_then_pool_equals_forward(net):
    batch = _batch(net.config)
    full = net.forward(net.state, batch["image"], batch["valid"])
    images = batch["image"].reshape(B * S, GRID, GRID, -1)
    chunks = [net.encode(net.state, images[i : i + 2]) for i in range(0, B * S, 2)]
    seg, slices, presence, fracture = (
        jnp.concatenate(parts) for parts in zip(*chunks, strict=True)
    )
    np.testing.assert_allclose(
        fracture.reshape(full["fracture_logits"].shape),
        full["fracture_logits"],
        rtol=1e-4,
        atol=1e-4,
    )
    np.testing.assert_allclose(
        seg.reshape(full["seg_logits"].shape), full["seg_logits"], rtol=1e-4, atol=1e-4
    )
    study = net.pool(net.state, slices.reshape(B, S, 7), presence.reshape(B, S, 7), batch["valid"])
    np.testing.assert_allclose(study, full["study_logits"], rtol=1e-4, atol=1e-4)


def _outputs(batch, study_logits, seg_logits=None):
    h = GRID // 2
    if seg_logits is None:
        seg_logits = jnp.zeros((B, S, h, h, 8))
    return dict(
        seg_logits=seg_logits,
        slice_logits=jnp.zeros((B, S, 7)) - 1.0,
        presence=jnp.ones((B, S, 7)),
        fracture_logits=jnp.zeros((B, S, h, h)),
        study_logits=study_logits,
    )


def test_study_loss_is_the_competition_metric():
    config = _tiny_config()
    batch = _batch(config)
    logits = np.array(
        [[2.0, -1.0, 3.0, -2.0, 0.5, -0.5, 0.0, 1.0], [-3.0, 0.2, -1.5, 2.5, -4.0, 1.5, -0.1, 0.3]],
        np.float32,
    )
    _, terms = sn.compute_loss(_outputs(batch, jnp.asarray(logits)), batch, config.loss)

    y = np.asarray(batch["labels"], np.float64)
    p = np.clip(1.0 / (1.0 + np.exp(-logits.astype(np.float64))), 1e-15, 1 - 1e-15)
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    w = np.where(y > 0, POSITIVE_WEIGHTS, NEGATIVE_WEIGHTS)
    expected = np.mean((w * bce).sum(1) / w.sum(1))
    np.testing.assert_allclose(float(terms["study"]), expected, rtol=1e-5)


def test_segmentation_terms_need_masks_and_reward_the_true_mask():
    config = _tiny_config()
    batch = _batch(config)
    zeros = jnp.zeros((B, 8))
    # Positive studies without boxes: nothing says where their fractures are.
    unmasked = dict(
        batch, has_mask=jnp.zeros((B,)), has_boxes=jnp.zeros((B,)), labels=jnp.ones((B, 8))
    )
    total, terms = sn.compute_loss(_outputs(batch, zeros), unmasked, config.loss)
    assert float(terms["seg_ce"]) == 0.0 and float(terms["seg_dice"]) == 0.0
    assert float(terms["slice"]) == 0.0 and float(terms["fracture_map"]) == 0.0
    assert np.isfinite(float(total))
    # A negative study has no fracture anywhere: its slices and pixels are supervised.
    negative = dict(unmasked, labels=jnp.zeros((B, 8)))
    _, terms = sn.compute_loss(_outputs(batch, zeros), negative, config.loss)
    assert float(terms["slice"]) > 0.0 and float(terms["fracture_map"]) > 0.0

    # Logits that are the (stride-2) mask itself: near-zero CE and Dice; uniform ones: not.
    truth = 30.0 * jax.nn.one_hot(batch["mask"][:, :, 1::2, 1::2], 8)
    _, perfect = sn.compute_loss(_outputs(batch, zeros, truth), batch, config.loss)
    _, uniform = sn.compute_loss(_outputs(batch, zeros), batch, config.loss)
    assert float(perfect["seg_ce"]) < 1e-6 and float(perfect["seg_dice"]) < 1e-6
    np.testing.assert_allclose(float(uniform["seg_ce"]), np.log(8), rtol=1e-5)
    assert float(uniform["seg_dice"]) > 0.5
    assert float(uniform["slice"]) > 0.0


def test_noisy_or_logit_matches_its_definition():
    logits = jnp.array([[-3.0, 0.0, 2.0], [-200.0, -200.0, -200.0]])
    p = jax.nn.sigmoid(logits)
    any_p = 1 - jnp.prod(1 - p, axis=-1)
    got = heads.noisy_or_logit(logits, axis=-1)
    np.testing.assert_allclose(jax.nn.sigmoid(got[0]), any_p[0], rtol=1e-6)
    assert bool(jnp.isfinite(got).all())


def test_loss_decreases_when_overfitting_a_tiny_batch(net):
    config = net.config
    batch = _batch(config)
    graphdef, params, rest = nnx.split(net.model, nnx.Param, ...)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(params):
            outputs = nnx.merge(graphdef, params, rest)(batch["image"], batch["valid"])
            return sn.compute_loss(outputs, batch, config.loss)

        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(30):
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    print("overfit losses", losses[0], losses[-1])
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.25 * losses[0]


def test_bfloat16_compute_keeps_float32_params_and_finite_outputs():
    jitted = _Jitted(_tiny_config("bfloat16"))
    params = jax.tree.leaves(nnx.state(jitted.model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    batch = _batch(jitted.config)
    jaxpr = jax.make_jaxpr(lambda st, x: nnx.merge(jitted.graphdef, st).encode_slices(x))(
        jitted.state, batch["image"][0]
    )
    convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert convs and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in convs)

    out = jitted.forward(jitted.state, batch["image"], batch["valid"])
    assert all(v.dtype == jnp.float32 and bool(jnp.isfinite(v).all()) for v in out.values())
    total, terms = sn.compute_loss(out, batch, jitted.config.loss)
    assert np.isfinite(float(total)) and all(np.isfinite(float(v)) for v in terms.values())


def test_fracture_map_loss_rewards_the_box_mask():
    batch = _batch(_tiny_config())
    h = GRID // 2
    # Cells of the stride-2 grid that hold a box pixel: rows 6..7, columns 4..11 of slice 1.
    target = np.zeros((B, S, h, h), np.float32)
    target[0, 1, 6:8, 4:12] = 1
    exact = jnp.asarray(np.where(target > 0, 20.0, -20.0))

    def loss(logits):
        return sn.ratio_value(
            sn.fracture_map_loss(logits, batch["fracture"], batch["valid"], batch["has_boxes"])
        )

    good, flat = loss(exact), loss(jnp.zeros((B, S, h, h)))
    assert float(good) < 1e-6 and abs(float(flat) - np.log(2)) < 1e-4
    # Silent everywhere: only the box cells cost (20 each), weighted BOX_PIXEL_WEIGHT times.
    silent = loss(jnp.full((B, S, h, h), -20.0))
    cells = np.asarray(batch["valid"] * batch["has_boxes"][:, None]).sum() * h * h
    boxed = sn.BOX_PIXEL_WEIGHT * target.sum()
    np.testing.assert_allclose(
        float(silent), 20.0 * boxed / (boxed + cells - target.sum()), rtol=1e-4
    )


def test_fracture_evidence_goes_to_the_vertebra_under_it():
    seg = np.full((1, 8, 8, 8), -10.0, np.float32)
    seg[..., 0] = 10.0
    seg[0, :4, :, 2] = 10.0  # C2 fills the top half (32 pixels) ...
    seg[0, :4, :, 0] = -10.0
    fracture = np.full((2, 8, 8), -10.0, np.float32)
    fracture[0, 1:3, 2:6] = 10.0  # ... where 8 of them are flagged,
    fracture[1, 1, 3] = 10.0  # or only one.
    logits = np.asarray(
        heads.fracture_evidence(jnp.asarray(np.repeat(seg, 2, axis=0)), jnp.asarray(fracture))
    )
    # Logit of the flagged share of C2's area (32 pixels + 1 in the denominator).
    np.testing.assert_allclose(logits[:, 1], [np.log(8 / 25), np.log(1 / 32)], rtol=1e-3)
    assert (np.delete(logits, 1, axis=1) < -9.0).all()
