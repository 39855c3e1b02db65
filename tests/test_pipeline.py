"""The Grain pipeline over a prepared cache: shapes, determinism, exact resume, sharding."""

import numpy as np
import pytest

from cspine_jax.data import cache, pipeline
from cspine_jax.data.preprocess import Prepared

GRID, WINDOWS, SLICES, CONTEXT = 16, 2, 5, 3
DATA = {
    "num_slices": SLICES,
    "context": CONTEXT,
    "positive_oversample": 1.0,
    "augment": {"flip": True, "rotate_deg": 10.0, "scale": 0.1, "shift": 0.05, "intensity": 0.05,
                "noise": 0.02},
}


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    """Eight studies whose slice z holds the value 10 * z + window everywhere."""
    root = str(tmp_path_factory.mktemp("cache"))
    cache.open_cache(root, {"grid": GRID})
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
        "warp": ((4, 4), np.float32),
        "study_index": ((4,), np.int32),
    }
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    angle, scale, shift = batch["warp"][:, 0], batch["warp"][:, 1], batch["warp"][:, 2:]
    assert (np.abs(angle) <= np.deg2rad(10.0)).all() and (np.abs(scale - 1) <= 0.1).all()
    assert (np.abs(shift) <= 0.05 * GRID).all() and len(np.unique(angle)) == 4  # one per study
    assert batch["mask"].max() <= 7  # thoracic labels are background for the seg head
    assert np.isfinite(batch["image"]).all()


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
        return _batches(pipeline.iterate(
            pipeline.train_dataset(entries, DATA, seed=seed, global_batch=2)), 3)

    _assert_same(first(3), first(3))
    a, b = first(3), first(4)
    assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("workers", [0, 2])
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
    global_batches = _batches(pipeline.iterate(
        pipeline.train_dataset(entries, DATA, seed=2, global_batch=4)), 3)
    shards = [
        _batches(pipeline.iterate(pipeline.train_dataset(
            entries, DATA, seed=2, global_batch=4, process_index=p, process_count=2)), 3)
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
