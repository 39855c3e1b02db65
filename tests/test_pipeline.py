"""The Grain pipeline over a prepared cache: shapes, determinism, exact resume, sharding."""

import numpy as np
import pytest

from cspine_jax.data import cache, pipeline
from cspine_jax.data.preprocess import Prepared

GRID, WINDOWS, SLICES, CONTEXT = 16, 2, 5, 3
DATA = {
    "num_slices": SLICES,
    "eval_slices": SLICES,
    "context": CONTEXT,
    "fracture_focus": 0.0,
    "positive_oversample": 1.0,
    "mask_oversample": 1.0,
    "stream": {"slices": 0, "boxed": 0.5},
    "augment": {
        "flip": True,
        "rotate_deg": 10.0,
        "scale": 0.1,
        "shift": 0.05,
        "intensity": 0.05,
        "noise": 0.02,
    },
}


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    """Eight studies whose slice z holds the value 10 * z + window everywhere."""
    root = str(tmp_path_factory.mktemp("cache"))
    cache.open_cache(root, {"grid": GRID}, root)
    rng = np.random.default_rng(0)
    for i in range(8):
        z = 9 + i
        image = (10 * np.arange(z)[:, None] + np.arange(WINDOWS)[None, :]).astype(np.uint8)
        image = np.broadcast_to(image[:, None, None, :], (z, GRID, GRID, WINDOWS)).copy()
        mask = None
        if i % 2 == 0:
            mask = rng.integers(0, 10, (z, GRID, GRID)).astype(np.uint8)  # 8, 9 are thoracic
        fracture = np.zeros((z, GRID, GRID), np.uint8)
        fracture[3, 4:6, 5:9] = 1
        labels = np.array([i % 3 == 0] + [i % 3 == 0] + [0] * 6, np.float32)
        prepared = Prepared(image, mask, fracture, (2.0, 1.0, 1.0))
        cache.write_entry(root, f"1.2.{i}", prepared, labels, has_boxes=i % 3 == 0, extra={})
    return cache.read_entries(root)


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    """Six studies whose every pixel is random (image, vertebra labels 0-19 with the thoracic
    8-19, scattered fracture pixels), so that any flip or misplaced slice shows; studies 1, 3
    and 5 have no mask."""
    root = str(tmp_path_factory.mktemp("textured"))
    cache.open_cache(root, {"grid": GRID}, root)
    rng = np.random.default_rng(1)
    for i in range(6):
        z = 9 + i
        image = rng.integers(0, 256, (z, GRID, GRID, WINDOWS)).astype(np.uint8)
        mask = rng.integers(0, 20, (z, GRID, GRID)).astype(np.uint8) if i % 2 == 0 else None
        fracture = (rng.random((z, GRID, GRID)) < 0.2).astype(np.uint8)
        labels = np.array([i % 3 == 0] + [i % 3 == 0] + [0] * 6, np.float32)
        prepared = Prepared(image, mask, fracture, (2.0, 1.0, 1.0))
        cache.write_entry(root, f"1.3.{i}", prepared, labels, has_boxes=True, extra={})
    return cache.read_entries(root)


def _batches(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_shapes_and_dtypes(entries):
    batch = next(pipeline.iterate(pipeline.train_dataset(entries, DATA, seed=0, global_batch=4)))
    expected = {
        "image": ((4, SLICES, GRID, GRID, CONTEXT * WINDOWS + 1), np.float32),
        "mask": ((4, SLICES, GRID, GRID), np.int32),
        "has_mask": ((4,), np.float32),
        "fracture": ((4, SLICES, GRID, GRID), np.int32),
        "slice_fracture": ((4, SLICES), np.float32),
        "has_boxes": ((4,), np.float32),
        "labels": ((4, 8), np.float32),
        "valid": ((4, SLICES), np.float32),
        "z": ((4, SLICES), np.float32),
        "warp": ((4, 4), np.float32),
        "study_index": ((4,), np.int32),
    }
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    angle, scale, shift = batch["warp"][:, 0], batch["warp"][:, 1], batch["warp"][:, 2:]
    assert (np.abs(angle) <= np.deg2rad(10.0)).all() and (np.abs(scale - 1) <= 0.1).all()
    assert (np.abs(shift) <= 0.05 * GRID).all() and len(np.unique(angle)) == 4  # one per study
    assert batch["mask"].max() <= 7  # thoracic labels are background for the seg head
    assert np.isfinite(batch["image"]).all()


def test_fracture_stream_draws_located_slices_across_studies(entries):
    """Each example carries stream.slices / B slices of any training study whose fractures
    are located, each the cached slice at its centre (read back from the position channel;
    augmentation off) with its box map: about `boxed` of them boxed, a positive study without
    boxes never drawn, slices of many studies in one batch."""
    aug = {**DATA["augment"], "flip": False, "intensity": 0.0, "noise": 0.0}
    data = {**DATA, "augment": aug, "stream": {"slices": 8, "boxed": 0.75}}
    no_boxes = cache.Entry(**{**entries[0].__dict__, "has_boxes": False})  # positive, unknown
    studies = [no_boxes, *entries[1:]]
    pool = pipeline.FracturePool.of(studies)
    assert 0 not in pool.boxed[:, 0] and 0 not in pool.clear[:, 0]
    assert len(pool.boxed) + len(pool.clear) == sum(e.num_slices for e in entries[1:])
    it = pipeline.iterate(pipeline.train_dataset(studies, data, seed=3, global_batch=4))
    boxed, owners = [], set()
    for batch in _batches(it, 10):
        assert batch["stream_image"].shape == (4, 2, GRID, GRID, CONTEXT * WINDOWS + 1)
        assert batch["stream_fracture"].shape == (4, 2, GRID, GRID)
        assert batch["stream_warp"].shape == (4, 2, 4)
        for image, fracture in zip(
            batch["stream_image"].reshape(8, GRID, GRID, -1),
            batch["stream_fracture"].reshape(8, GRID, GRID),
            strict=True,
        ):
            # Slice z holds 10 * z + window: the image names its slice, the position channel
            # z / (num_slices - 1) then the study (each has its own length).
            z = int(round(image[0, 0, (CONTEXT // 2) * WINDOWS] * 255)) // 10
            position = image[0, 0, -1]
            if z:
                owners.add(int(round(z / position)) + 1)
            assert fracture.any() == (z == 3)  # every study's box is on slice 3
            boxed.append(fracture.any())
    assert owners <= {e.num_slices for e in entries[1:]}
    assert 0.6 < np.mean(boxed) < 0.9
    assert len(owners) > 3


def test_training_batch_is_the_cache_at_the_sampled_slices_flipped_alike(textured):
    """Every row and slice of a training batch: the cached image, mask and fracture map at the
    slice's centre (read back from the position channel) and its neighbours, all flipped or
    none; thoracic labels background; has_mask 1 exactly for the studies with a mask.

    Intensity changes and noise are off, so the image must equal the cache exactly; the flip
    is recovered from the image (random pixels match one orientation only)."""
    data = {**DATA, "augment": {**DATA["augment"], "intensity": 0.0, "noise": 0.0}}
    it = pipeline.iterate(pipeline.train_dataset(textured, data, seed=5, global_batch=6))
    offsets = np.arange(CONTEXT) - CONTEXT // 2
    flips, thoracic = [], 0
    for batch in _batches(it, 3):
        for row, index in enumerate(batch["study_index"]):
            entry = textured[index]
            z = entry.num_slices
            position = batch["image"][row, :, :, :, -1]
            assert (position == position[:, :1, :1]).all()  # constant in-plane
            centres = np.rint(position[:, 0, 0] * (z - 1)).astype(int)
            np.testing.assert_allclose(position[:, 0, 0], centres / (z - 1), atol=1e-6)
            assert ((0 <= centres) & (centres < z)).all()
            np.testing.assert_array_equal(batch["z"][row], centres)  # the slices' positions

            source = np.clip(centres[:, None] + offsets[None, :], 0, z - 1)  # (S, K)
            cached = np.asarray(entry.image())[source]  # (S, K, G, G, W)
            image = cached.transpose(0, 2, 3, 1, 4).reshape(SLICES, GRID, GRID, -1) / 255.0
            got = batch["image"][row, ..., :-1]
            flipped = np.allclose(got, image[:, :, ::-1], rtol=0, atol=1e-6)
            unflipped = np.allclose(got, image, rtol=0, atol=1e-6)
            assert flipped != unflipped, f"row {row}: not the cached slices, nor their flip"
            flips.append(flipped)
            flip = (lambda x: x[:, :, ::-1]) if flipped else (lambda x: x)

            fracture = flip(np.asarray(entry.fracture())[centres])
            np.testing.assert_array_equal(batch["fracture"][row], fracture)
            np.testing.assert_array_equal(batch["slice_fracture"][row], fracture.any(axis=(1, 2)))
            assert batch["has_mask"][row] == float(entry.has_mask)
            if entry.has_mask:
                cached_mask = flip(np.asarray(entry.mask())[centres])
                thoracic += int((cached_mask > 7).sum())
                np.testing.assert_array_equal(
                    batch["mask"][row], np.where(cached_mask <= 7, cached_mask, 0)
                )
            else:
                assert not batch["mask"][row].any()
            np.testing.assert_array_equal(batch["labels"][row], entry.labels)
    assert any(flips) and not all(flips), flips  # both orientations were checked
    assert thoracic > 0  # thoracic labels were sampled and became background
    assert {e.has_mask for e in textured} == {True, False}


def test_context_channels_are_neighbouring_slices(entries):
    ds = pipeline.eval_dataset(entries, DATA, batch_size=8)
    batch = next(pipeline.iterate(ds))
    for row, index in enumerate(batch["study_index"]):
        z = entries[index].num_slices
        centres = pipeline.sample_centres(z, SLICES, None)
        for s, centre in enumerate(centres):
            for k, offset in enumerate(range(-(CONTEXT // 2), CONTEXT // 2 + 1)):
                source = min(max(centre + offset, 0), z - 1)
                for w in range(WINDOWS):
                    value = batch["image"][row, s, 0, 0, k * WINDOWS + w] * 255
                    assert round(float(value)) == 10 * source + w
        np.testing.assert_array_equal(batch["slice_fracture"][row], centres == 3)
        boxed = batch["fracture"][row][centres == 3]
        assert all(m.sum() == 8 and m[4:6, 5:9].all() for m in boxed)
        np.testing.assert_allclose(batch["image"][row, :, 5, 7, -1], centres / (z - 1))
        np.testing.assert_array_equal(batch["z"][row], centres)
    # One deterministic pass covers every study once.
    assert sorted(batch["study_index"].tolist()) == list(range(8))


def test_evaluation_examples_take_eval_slices(entries):
    data = {**DATA, "eval_slices": 7}
    evaluation = next(pipeline.iterate(pipeline.eval_dataset(entries, data, batch_size=8)))
    training = pipeline.train_dataset(entries, data, seed=0, global_batch=4)[0]
    assert evaluation["image"].shape[1] == 7 and evaluation["valid"].shape == (8, 7)
    assert training["image"].shape[1] == SLICES


def test_deterministic_per_seed(entries):
    def first(seed):
        return _batches(
            pipeline.iterate(pipeline.train_dataset(entries, DATA, seed=seed, global_batch=2)), 3
        )

    _assert_same(first(3), first(3))
    a, b = first(3), first(4)
    assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))


# workers=2 starts Grain worker processes: slow.
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resumes_exactly_from_saved_state(entries, workers):
    ds = pipeline.train_dataset(entries, DATA, seed=1, global_batch=2)
    reference = _batches(pipeline.iterate(ds), 7)
    it = pipeline.iterate(ds, workers=workers)
    _assert_same(_batches(it, 4), reference[:4])
    state = it.get_state()
    _assert_same(_batches(it, 1), reference[4:5])
    if workers:
        it.close()
    resumed = pipeline.iterate(ds, workers=workers)
    resumed.set_state(state)
    _assert_same(_batches(resumed, 3), reference[4:7])
    if workers:
        resumed.close()


def test_processes_split_each_global_batch(entries):
    global_batches = _batches(
        pipeline.iterate(pipeline.train_dataset(entries, DATA, seed=2, global_batch=4)), 3
    )
    shards = [
        _batches(
            pipeline.iterate(
                pipeline.train_dataset(
                    entries, DATA, seed=2, global_batch=4, process_index=p, process_count=2
                )
            ),
            3,
        )
        for p in range(2)
    ]
    for step, full in enumerate(global_batches):
        # Process p holds elements p, p + 2 of the global step: interleaved rows.
        for p in range(2):
            for key in full:
                np.testing.assert_array_equal(shards[p][step][key], full[key][p::2])


def test_positive_oversampling(entries):
    positives = sum(e.labels[0] > 0 for e in entries)
    order = pipeline.oversampled(entries, 3.0, seed=0)
    assert len(order) == len(entries) + 2 * positives
    assert pipeline.oversampled(entries, 1.0, seed=0) == list(range(len(entries)))


def test_masked_oversampling_multiplies_with_positive(entries):
    masked = sum(e.has_mask for e in entries)
    both = sum(e.has_mask and e.labels[0] > 0 for e in entries)
    positives = sum(e.labels[0] > 0 for e in entries)
    assert 0 < masked < len(entries)
    order = pipeline.oversampled(entries, 1.0, seed=0, masked_factor=2.0)
    assert len(order) == len(entries) + masked
    assert all(order.count(i) == 1 + e.has_mask for i, e in enumerate(entries))
    # Both factors: a positive masked study is repeated 3 x 2 = 6 times.
    order = pipeline.oversampled(entries, 3.0, seed=0, masked_factor=2.0)
    assert len(order) == len(entries) + 2 * positives + masked + 2 * both
