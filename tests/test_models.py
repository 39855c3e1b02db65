"""SingleModel: shapes and sizes per config, z-context and pooling invariances, the level
gate on the segmentation, losses and the detached presence, a short overfit and bf16
compute. Chunked whole-study inference is tested against the forward pass in
tests/test_evaluation.py.

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
from tests.helpers import wake_context

B, S, GRID = 2, 4, 32
CONFIGS = dict(tiny=tiny.get_config, default=default.get_config, rsna=rsna.get_config)
# Trainable parameters expected per config: tiny ~ tens of thousands, rsna a few M at most.
PARAM_RANGES = dict(tiny=(2e4, 1e5), default=(2e5, 1.5e6), rsna=(2e6, 8e6))


def _tiny_config(dtype="float32"):
    c = tiny.get_config()
    c.data.grid = GRID
    c.model.dtype = dtype
    return c


def _positions(b, s):
    """Slice positions 0..s-1 of b studies: (b, s) float32."""
    return jnp.broadcast_to(jnp.arange(s, dtype=jnp.float32), (b, s))


def _batch(config, seed=0):
    """A batch with learnable structure: slice s of a study shows vertebra s + 1 as a bright
    square in channel s (GroupNorm would erase a plain intensity code) and sits at z = s;
    study 0 has a mask, a fracture on C2 and boxes, study 1 has neither."""
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
        z=np.asarray(_positions(B, S)),
    )
    return jax.tree.map(jnp.asarray, batch)


class _Jitted:
    """The project's style: nnx.split once, plain jax.jit over the state.

    `state` is the model as initialised; `awake` the same model with `wake_context` applied
    (same structure, so the same compiled programs take either).
    """

    def __init__(self, config, seed=0):
        self.config = config
        self.model = sn.create_model(config, seed)
        self.graphdef, self.state = nnx.split(self.model)
        _, self.awake = nnx.split(wake_context(sn.create_model(config, seed), seed + 1))
        merge = lambda state: nnx.merge(self.graphdef, state)  # noqa: E731
        self.forward = jax.jit(lambda state, image, valid, z: merge(state)(image, valid, z))
        self.locate = jax.jit(lambda state, *args: merge(state).locate(*args))
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
        lambda st, x, v, z: nnx.merge(graphdef, st)(x, v, z),
        state,
        jax.ShapeDtypeStruct((B, S, grid, grid, c), jnp.float32),
        jax.ShapeDtypeStruct((B, S), jnp.float32),
        jax.ShapeDtypeStruct((B, S), jnp.float32),
    )
    assert out["seg_logits"].shape == (B, S, grid // 2, grid // 2, 8)
    assert out["level_logits"].shape == (B, S, 7)
    assert out["fracture_logits"].shape == (B, S, grid // 2, grid // 2)
    assert out["slice_logits"].shape == (B, S, 7)
    assert out["presence"].shape == (B, S, 7)
    assert out["study_logits"].shape == (B, 8)
    assert all(v.dtype == jnp.float32 for v in out.values())


def test_forward_is_finite_and_presence_is_the_level_probability(net):
    batch = _batch(net.config)
    for state in (net.state, net.awake):
        out = net.forward(state, batch["image"], batch["valid"], batch["z"])
        assert out["seg_logits"].shape == (B, S, GRID // 2, GRID // 2, 8)
        assert all(bool(jnp.isfinite(v).all()) for v in out.values())
        assert bool(((out["presence"] >= 0) & (out["presence"] <= 1)).all())
        np.testing.assert_allclose(
            out["presence"], jax.nn.sigmoid(out["level_logits"]), rtol=1e-6, atol=1e-7
        )
    # Initialised, the levels are the prior on every slice.
    out = net.forward(net.state, batch["image"], batch["valid"], batch["z"])
    prior = np.log(heads.LEVEL_PRIOR / (1 - heads.LEVEL_PRIOR))
    np.testing.assert_allclose(out["level_logits"], prior, rtol=1e-5)


def test_study_logits_ignore_padding_and_permutations_of_slices_with_their_z(net):
    """Study logits are a function of the set of (slice, z) pairs of the valid slices: the
    same with padding rows (random images at random z) appended or interleaved, and with the
    slices shuffled together with their positions. Shuffling the images but not their z
    moves the slices, so it must change the result (the z-context sees distances)."""
    batch = _batch(net.config)
    rng = np.random.default_rng(1)
    z = jnp.asarray([[3.0, 5.0, 6.0, 11.0], [0.0, 9.0, 2.0, 30.0]])  # any order, any gaps
    base = net.forward(net.awake, batch["image"], batch["valid"], z)["study_logits"]

    noise = jnp.asarray(rng.normal(size=batch["image"][:, :2].shape), jnp.float32)
    padded = jnp.concatenate([batch["image"], noise], axis=1)
    valid = jnp.concatenate([batch["valid"], jnp.zeros((B, 2))], axis=1)
    padded_z = jnp.concatenate([z, jnp.asarray(rng.uniform(-10, 40, (B, 2)), jnp.float32)], 1)
    order = np.array([4, 2, 0, 5, 3, 1])  # padding rows 4, 5 now interleaved
    for image, v, zz in [
        (padded, valid, padded_z),
        (padded[:, order], valid[:, order], padded_z[:, order]),
    ]:
        moved = net.forward(net.awake, image, v, zz)["study_logits"]
        np.testing.assert_allclose(moved, base, rtol=1e-5, atol=1e-5)

    # Images shuffled, positions not: other (slice, z) pairs, other study logits.
    swapped = net.forward(net.awake, batch["image"][:, ::-1], batch["valid"], z)["study_logits"]
    assert float(jnp.abs(swapped - base).max()) > 1e-3


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


def _outputs(batch, study_logits, seg_logits=None, level_logits=None):
    h = GRID // 2
    if seg_logits is None:
        seg_logits = jnp.zeros((B, S, h, h, 8))
    if level_logits is None:
        level_logits = jnp.zeros((B, S, 7))
    return dict(
        seg_logits=seg_logits,
        level_logits=level_logits,
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
    assert float(terms["level"]) == 0.0
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
    # Level logits 0: log 2 per level; the slice's true levels at +-30: ~0.
    np.testing.assert_allclose(float(uniform["level"]), np.log(2), rtol=1e-5)
    levels = 60.0 * sn.level_targets(batch["mask"]) - 30.0
    _, known = sn.compute_loss(_outputs(batch, zeros, level_logits=levels), batch, config.loss)
    assert float(known["level"]) < 1e-6
    assert float(uniform["slice"]) > 0.0


def test_noisy_or_logit_matches_its_definition():
    logits = jnp.array([[-3.0, 0.0, 2.0], [-200.0, -200.0, -200.0]])
    p = jax.nn.sigmoid(logits)
    any_p = 1 - jnp.prod(1 - p, axis=-1)
    got = heads.noisy_or_logit(logits, axis=-1)
    np.testing.assert_allclose(jax.nn.sigmoid(got[0]), any_p[0], rtol=1e-6)
    assert bool(jnp.isfinite(got).all())


def test_loss_decreases_when_overfitting_a_tiny_batch(net):
    """40 Adam steps on one batch: the total loss under a third, every term down, the level
    term (the slowest: it waits for the embeddings to tell the slices apart) clearly, the
    study term too (the map's evidence is detached from it: z-context and the pool's
    calibration fit it)."""
    config = net.config
    batch = _batch(config)
    graphdef, params, rest = nnx.split(net.model, nnx.Param, ...)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(params):
            outputs = nnx.merge(graphdef, params, rest)(batch["image"], batch["valid"], batch["z"])
            return sn.compute_loss(outputs, batch, config.loss)

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, terms

    losses, terms = [], []
    for _ in range(40):
        params, opt_state, loss, term = step(params, opt_state, batch)
        losses.append(float(loss))
        terms.append({k: float(v) for k, v in term.items()})
    print("overfit losses", losses[0], losses[-1], terms[0], terms[-1])
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] / 3
    assert all(terms[-1][k] < terms[0][k] for k in terms[0])
    assert terms[-1]["level"] < 0.75 * terms[0]["level"]
    assert terms[-1]["study"] < 0.5 * terms[0]["study"]


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

    out = jitted.forward(jitted.state, batch["image"], batch["valid"], batch["z"])
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


def test_fracture_evidence_is_the_strongest_map_pixels_of_the_vertebra_around_them():
    """C2 fills rows 0-3 of an 8 x 8 slice. Its evidence is the mean of the 8 strongest
    fracture logits on or next to it: 8 flagged C2 pixels give their logit; a flagged pixel
    one row below C2 (a gap the segmentation calls background) counts as one of C2's; one
    flagged pixel 3 rows away, or on the slice but in no vertebra, hardly moves it."""
    seg = np.full((1, 8, 8, 8), -10.0, np.float32)
    seg[..., 0] = 10.0
    seg[0, :4, :, 2] = 10.0
    seg[0, :4, :, 0] = -10.0
    fracture = np.full((3, 8, 8), -10.0, np.float32)
    fracture[0, 1:3, 2:6] = 10.0  # 8 pixels of C2
    fracture[1, 4, 3] = 10.0  # just below C2
    fracture[2, 7, 3] = 10.0  # three rows away
    logits = np.asarray(
        heads.fracture_evidence(jnp.asarray(np.repeat(seg, 3, axis=0)), jnp.asarray(fracture))
    )
    assert logits.shape == (3, 7)
    np.testing.assert_allclose(logits[0, 1], 10.0, atol=1e-3)
    np.testing.assert_allclose(logits[1, 1], (10.0 - 7 * 10.0) / 8, atol=1e-3)
    gate = np.log(np.exp(-20.0) + heads._GATE_FLOOR)  # C2 there: e^-10 / e^10, floored
    np.testing.assert_allclose(logits[2, 1], (10.0 + gate - 7 * 10.0) / 8, atol=1e-3)
    assert (np.delete(logits, 1, axis=1) < -9.0).all()  # no other vertebra on the slice
    # k = 1: the single strongest pixel.
    one = heads.fracture_evidence(jnp.asarray(seg[:1].repeat(2, 0)), jnp.asarray(fracture[1:]), 1)
    np.testing.assert_allclose(np.asarray(one)[:, 1], [10.0, 10.0 + gate], atol=1e-3)


@pytest.mark.parametrize("knots", [heads.Z_KNOTS, (-3.0, 0.0, 0.5, 7.0)])
def test_hats_interpolate_like_np_interp(knots):
    """sum_j hats(x)_j * values_j is np.interp(x, knots, values), constant beyond the outer
    knots, at random points inside and outside the knots and at the knots themselves."""
    rng = np.random.default_rng(len(knots))
    k = np.asarray(knots)
    values = rng.normal(size=len(k))
    span = k[-1] - k[0]
    x = np.concatenate(
        [rng.uniform(k[0] - span, k[-1] + span, 300), rng.uniform(k[0], k[-1], 300), k]
    ).astype(np.float32)
    hats = np.asarray(heads._hats(jnp.asarray(x).reshape(1, -1), knots)).reshape(len(x), -1)
    assert hats.shape == (len(x), len(k))
    assert (hats >= 0).all()
    np.testing.assert_allclose(hats.sum(-1), 1.0, atol=1e-5)
    assert ((hats > 0).sum(-1) <= 2).all()  # at most the two knots around x
    np.testing.assert_allclose(hats @ values, np.interp(x, k, values), rtol=1e-5, atol=1e-5)


def _zcontext(layers, features=12, seed=0):
    module = heads.ZContext(features, 16, layers, 2, jnp.float32, nnx.Rngs(seed))
    return wake_context(module, seed + 1)


def _context_inputs(seed=0, num_slices=6, features=12):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(1, num_slices, features)), jnp.float32)
    z = jnp.asarray(np.sort(rng.uniform(0, 40, (1, num_slices))), jnp.float32)
    return x, z, jnp.ones((1, num_slices))


@pytest.mark.parametrize("layers", [0, 2])
def test_zcontext_reads_other_slices_only_with_attention(layers):
    """Changing slice 4's embedding changes every slice's outputs with z_layers > 0, only
    slice 4's own with z_layers = 0 (the no-context ablation)."""
    module = _zcontext(layers)
    x, z, valid = _context_inputs()
    level, fracture = module(x, z, valid)
    other = x.at[0, 4].add(1.0)
    level2, fracture2 = module(other, z, valid)
    assert float(jnp.abs(level2[0, 4] - level[0, 4]).max()) > 1e-3  # its own: always
    for a, b in [(level, level2), (fracture, fracture2)]:
        change = np.abs(np.asarray(b - a))[0].max(-1)  # (S,)
        others = np.delete(change, 4)
        if layers:
            assert (others > 1e-4).all(), change
        else:
            np.testing.assert_array_equal(others, 0.0)


def test_zcontext_ignores_padding_and_is_equivariant_to_moving_slices_with_their_z():
    """Valid rows' outputs do not depend on padding rows (random content, random z, anywhere
    in the sequence); permuting (slice, z, valid) together permutes the outputs."""
    module = _zcontext(2)
    x, z, valid = _context_inputs()
    level, fracture = module(x, z, valid)

    rng = np.random.default_rng(3)
    rows = np.array([0, 6, 1, 2, 7, 3, 4, 5, 8])  # 6, 7, 8: padding
    padded_x = jnp.concatenate([x, jnp.asarray(rng.normal(0, 5, (1, 3, 12)), jnp.float32)], 1)
    padded_z = jnp.concatenate([z, jnp.asarray(rng.uniform(-50, 90, (1, 3)), jnp.float32)], 1)
    padded_v = jnp.concatenate([valid, jnp.zeros((1, 3))], 1)
    out = module(padded_x[:, rows], padded_z[:, rows], padded_v[:, rows])
    real = np.argsort(rows)[:6]  # where rows 0..5 went
    for got, want in zip(out, (level, fracture), strict=True):
        np.testing.assert_allclose(got[:, real], want, rtol=1e-5, atol=1e-5)

    perm = np.array([3, 0, 5, 1, 4, 2])
    moved = module(x[:, perm], z[:, perm], valid[:, perm])
    for got, want in zip(moved, (level, fracture), strict=True):
        np.testing.assert_allclose(got, want[:, perm], rtol=1e-5, atol=1e-5)


def test_zcontext_sees_relative_z_only():
    """All z shifted by a constant: the same outputs (the bias is on distances). Distances
    doubled: other outputs (z does matter)."""
    module = _zcontext(2)
    x, z, valid = _context_inputs()
    level, fracture = module(x, z, valid)
    for shift in (37.5, -1000.0):
        shifted = module(x, z + shift, valid)
        for got, want in zip(shifted, (level, fracture), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    stretched, _ = module(x, 2.0 * z, valid)
    assert float(jnp.abs(stretched - level).max()) > 1e-3


def test_level_targets_need_a_share_of_the_slice():
    """C_v is on a slice from LEVEL_MIN_SHARE of its pixels: a sliver below that is not."""
    h, w = 40, 50
    need = int(np.ceil(sn.LEVEL_MIN_SHARE * h * w))
    assert 1 < need < 100
    mask = np.zeros((1, 3, h, w), np.int32)
    mask[0, 0, :10, :10] = 2  # C2: 100 pixels
    mask[0, 0, 20, : need - 1] = 3  # C3: a sliver just below the share
    mask[0, 0, 30, :need] = 4  # C4: just enough
    mask[0, 1, 5:15, 5:25] = 7  # C7 only
    # slice 2: background only
    got = np.asarray(sn.level_targets(jnp.asarray(mask)))
    want = np.zeros((1, 3, 7), np.float32)
    want[0, 0, [1, 3]] = 1.0  # C2, C4
    want[0, 1, 6] = 1.0  # C7
    np.testing.assert_array_equal(got, want)


def test_level_loss_counts_the_valid_slices_of_masked_studies_only():
    rng = np.random.default_rng(0)
    b, s, h = 3, 4, 8
    logits = rng.normal(0, 2, (b, s, 7)).astype(np.float32)
    mask = rng.integers(0, 8, (b, s, h, h)).astype(np.int32)
    mask[:, :, :4] = 0  # some levels missing from some slices
    mask[0, 1] = 0
    valid = np.ones((b, s), np.float32)
    valid[0, 3] = valid[2, 2:] = 0.0
    has_mask = np.array([1.0, 0.0, 1.0], np.float32)
    num, den = sn.level_loss(*map(jnp.asarray, (logits, mask, valid, has_mask)))

    target = np.asarray(sn.level_targets(jnp.asarray(mask)))
    bce = np.logaddexp(0.0, logits) - logits * target  # softplus(x) - y x
    counted = (valid * has_mask[:, None]) > 0
    assert counted.sum() == 5
    np.testing.assert_allclose(float(den), counted.sum())
    np.testing.assert_allclose(float(num) / float(den), bce.mean(-1)[counted].mean(), rtol=1e-5)

    # Whatever the logits of unmasked studies and padded slices: the same loss.
    noise = np.where(counted[..., None], logits, rng.normal(0, 50, logits.shape))
    again = sn.level_loss(*map(jnp.asarray, (noise.astype(np.float32), mask, valid, has_mask)))
    np.testing.assert_allclose(float(again[0]), float(num), rtol=1e-6)


def test_segmentation_is_gated_by_the_slice_level(net):
    """seg = pixel logits + log_sigmoid(level) on C1..C7: a slice whose C3 level logit is -30
    has no C3 pixel even where every pixel logit says C3 by up to 25 nats; with the C3 level
    at +3, those pixels are C3."""
    rng = np.random.default_rng(0)
    n, h = 3, GRID // 2
    pixels = rng.normal(0, 3, (n, h, h, 8)).astype(np.float32)
    # Every pixel says C3, by 1 to 25 nats over the background, the runner-up.
    pixels[..., 0] = np.delete(pixels, 3, axis=-1).max(-1)
    pixels[..., 3] = pixels[..., 0] + rng.uniform(1, 25, (n, h, h))
    fracture = rng.normal(0, 2, (n, h, h)).astype(np.float32)
    level = rng.normal(0, 3, (n, 7)).astype(np.float32)
    level[0, 2] = -30.0
    level[1, 2] = 3.0
    level[2] = 5.0  # every level certain: the pixel logits decide
    context_fracture = rng.normal(size=(n, 7)).astype(np.float32)
    seg, slice_logits, presence = net.locate(
        net.awake, *map(jnp.asarray, (pixels, fracture, level, context_fracture))
    )
    labels = np.asarray(jnp.argmax(seg, -1))
    assert not (labels[0] == 3).any()
    assert (labels[1:] == 3).all()

    gate = np.concatenate([np.zeros((n, 1)), -np.logaddexp(0.0, -level)], -1)  # log_sigmoid
    np.testing.assert_allclose(seg, pixels + gate[:, None, None], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(presence, jax.nn.sigmoid(level), rtol=1e-6)
    np.testing.assert_allclose(
        slice_logits,
        heads.fracture_evidence(seg, jnp.asarray(fracture)) + context_fracture,
        rtol=1e-5,
        atol=1e-5,
    )


def test_z_layers_zero_builds_no_attention():
    config = tiny.get_config()
    config.model.z_layers = 0
    model = nnx.eval_shape(lambda: sn.create_model(config))
    assert len(model.zcontext.blocks) == 0
    assert sn.param_count(model) < sn.param_count(
        nnx.eval_shape(lambda: sn.create_model(tiny.get_config()))
    )


def test_attention_keys_have_no_bias_and_query_value_biases_matter():
    """A key bias would add the same q . b_k to every score of a query, which softmax
    ignores: its gradient would be rounding noise, and Adam would turn it into steps that
    differ between summation orders (sharded vs single-device steps). The query and value
    biases do change the output."""
    module = _zcontext(2)
    assert all(block.key.bias is None for block in module.blocks)
    x, z, valid = _context_inputs()
    level, _ = module(x, z, valid)
    rng = np.random.default_rng(5)
    for name in ("query", "value"):
        moved = _zcontext(2)
        for block in moved.blocks:
            bias = getattr(block, name).bias
            bias[...] = bias[...] + jnp.asarray(rng.normal(0, 1, bias.shape), jnp.float32)
        got, _ = moved(x, z, valid)
        assert float(jnp.abs(got - level).max()) > 1e-3, name


@pytest.mark.parametrize("detach_map", [True, False])
def test_fracture_losses_do_not_reach_the_level_logits(awake_model, detach_map):
    """`detach_presence`: the study and slice losses leave the level read-out of z-context
    untouched, whether or not the map is detached too (`detach_map`, which alone would cut
    the path through the segmentation); with every path open (detach=False) they reach it."""
    config, shared = awake_model
    assert config.model.detach_presence
    model = nnx.merge(*nnx.split(shared))  # a copy: the fixture is shared
    model.detach_map = detach_map
    graphdef, state = nnx.split(model)
    batch = _batch(_tiny_config())

    def fracture_losses(state, detach):
        out = nnx.merge(graphdef, state)(batch["image"], batch["valid"], batch["z"], detach=detach)
        located = jnp.ones(B)
        study = sn.study_loss(out["study_logits"], batch["labels"])
        slices = sn.slice_loss(
            out["slice_logits"], batch["slice_fracture"], batch["valid"], located
        )
        return sn.ratio_value(study) + sn.ratio_value(slices)

    for detach, reaches in ((True, False), (False, True)):
        grads = jax.grad(fracture_losses)(state, detach)
        level = np.abs(np.asarray(grads["zcontext"]["level"]["kernel"][...])).max()
        fracture = np.abs(np.asarray(grads["zcontext"]["fracture"]["kernel"][...])).max()
        assert fracture > 0, detach  # the losses do reach z-context, through its fracture head
        assert (level > 0) == reaches, (detach, level)
