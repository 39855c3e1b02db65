"""configs/rsna.py end to end: full-size phantoms (512^2, hundreds of slices, as the real
scans) prepared on its grid and region, then a few training steps and the final evaluation,
`train.py --config=configs/rsna.py` as a user starts it, with only the network shrunk and the
batch, slices and steps cut so that it runs on a CPU.

The patch stem and the sub-pixel segmentation reshape the batch's image axes; under the
trainer's explicitly sharded batch those reshapes must keep an inferable sharding (the fast
test below; the end-to-end run would not get past its first step otherwise).
"""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.interruption import ROOT, check_checkpoints
from configs import rsna
from cspine_jax.data import prepare, preprocess
from cspine_jax.models.backbone import space_to_depth
from cspine_jax.models.heads import depth_to_space

# Seed 2 with a third of them masked: a positive study with boxes and a mask, a negative with a
# mask and one without (so mask_oversample weighs the training draws).
PHANTOMS = ("--num_studies=3", "--seed=2", "--size=full", "--mask_fraction=0.34")
STEPS = 2
# The network and batch cut to CPU size; grid, region, spacing, context, stem, strides, dtype
# and the sampling weights stay rsna.py's. 3 folds of 3 studies: 2 train, 1 held out.
OVERRIDES = (
    "--config.model.widths=(8,16,16,16)",
    "--config.model.depths=(1,1,1,1)",
    "--config.model.decoder_width=8",
    "--config.model.z_width=16",
    "--config.model.z_heads=2",
    f"--config.optim.steps={STEPS}",
    "--config.optim.warmup_steps=1",
    "--config.optim.batch_size=2",
    "--config.data.num_slices=4",
    "--config.data.eval_slices=4",
    "--config.data.num_folds=3",
    "--config.data.workers=0",
    f"--config.checkpoint.every={STEPS}",
)


@pytest.fixture(scope="module")
def rsna_run(tmp_path_factory):
    """(phantom folder, cache, workdir, train.py's stdout) of one run."""
    root = tmp_path_factory.mktemp("rsna")
    data, cache_dir, workdir = root / "phantoms", root / "cache", root / "run"
    env = {**os.environ, "CSPINE_CACHE": str(root), "JAX_PLATFORMS": "cpu"}
    env.update(JAX_NUM_CPU_DEVICES="1", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    phantoms = subprocess.run(
        [sys.executable, "-m", "cspine_jax.data.phantom", f"--out={data}", "--workers=1"]
        + list(PHANTOMS),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert phantoms.returncode == 0, phantoms.stderr[-3000:]
    train = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            "--config=configs/rsna.py",
            f"--workdir={workdir}",
            f"--config.data.dir={data}",
            f"--config.data.cache_dir={cache_dir}",
            *OVERRIDES,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    yield data, cache_dir, workdir, train.stdout
    shutil.rmtree(root)  # ~1 GB of phantoms and cache; pytest would keep three runs' worth


@pytest.mark.slow
def test_prepare_puts_full_size_studies_on_the_rsna_grid(rsna_run):
    data, cache_dir, _, _ = rsna_run
    config = rsna.get_config()
    grid, spacing_z = config.data.grid, config.data.spacing_z
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["params"] == prepare.preprocessing_params(config.data)
    assert manifest["params"]["region"] == "spine" and grid == 384
    assert manifest["source"] == str(data)

    uids = sorted(os.listdir(data / "train_images"))
    masked = {name.removesuffix(".nii") for name in os.listdir(data / "segmentations")}
    assert len(uids) == 3 and masked and masked < set(uids)
    assert sorted(os.listdir(cache_dir / "studies")) == uids
    boxed = 0
    for uid in uids:
        files = os.listdir(data / "train_images" / uid)
        study = cache_dir / "studies" / uid
        meta = json.loads((study / "meta.json").read_text())
        assert meta["source_shape"] == [len(files), 512, 512]  # full size: the real scans'
        assert len(files) >= 200
        dz = meta["source_spacing"][0]
        # Every spacing_z mm from the first slice to the last.
        depth = math.floor((len(files) - 1) * dz / spacing_z + 1e-6) + 1
        assert depth == len(preprocess.slice_positions(len(files), dz, spacing_z)) >= 100
        assert meta["num_slices"] == depth
        side = config.data.region_mm / grid
        np.testing.assert_allclose(meta["spacing"], [spacing_z, side, side])
        image = np.load(study / "image.npy", mmap_mode="r")
        assert image.shape == (depth, grid, grid, len(config.data.windows))
        assert image.dtype == np.uint8 and image.max() > 0
        assert np.load(study / "fracture.npy", mmap_mode="r").shape == (depth, grid, grid)
        assert meta["has_mask"] == (uid in masked) == (study / "mask.npy").exists()
        if meta["has_mask"]:
            mask = np.load(study / "mask.npy", mmap_mode="r")
            assert mask.shape == (depth, grid, grid)
            # The spine region holds the vertebrae: all seven on the grid.
            assert set(range(1, 8)) <= set(np.unique(mask))
        boxed += meta["has_boxes"]
    assert boxed == 1


@pytest.mark.slow
def test_training_saves_the_rsna_model_and_evaluates_it(rsna_run):
    from cspine_jax import checkpoints

    _, _, workdir, stdout = rsna_run
    assert "2 train / 1 held-out studies" in stdout
    assert check_checkpoints(workdir) == [STEPS]
    model, config, step = checkpoints.load_model(str(workdir))
    assert step == STEPS
    # rsna.py's design, under the CPU overrides.
    assert config.model.stem_patch == 4 and tuple(config.model.strides) == (1, 2, 2, 2)
    assert config.model.dtype == "bfloat16" and config.data.mask_oversample > 1
    assert config.data.grid == 384 and config.data.num_slices == 4
    assert model.backbone.feature_strides == (4, 4, 8, 16, 32)

    values = json.loads((workdir / "metrics.json").read_text())
    assert values["step"] == STEPS and values["studies"] == 1
    assert math.isfinite(values["competition_loss"]) and values["competition_loss"] > 0
    expected = {"auc_patient_overall", "specificity", "thresholds", "undefined", "macro_f1"}
    expected |= {f"dice_C{v}" for v in range(1, 8)}
    assert expected <= values.keys(), sorted(expected - values.keys())
    for name in ("submission.csv", "metrics.json", "roc.png"):
        assert (workdir / "eval" / name).exists(), name


def test_patch_reshapes_keep_the_batch_sharding():
    """space_to_depth and depth_to_space, and their gradients, on a batch sharded along N as
    the trainer shards it: the same values as unsharded, the sharding kept."""
    devices = jax.device_count()
    mesh = jax.make_mesh((devices,), ("data",))
    x = np.random.default_rng(0).normal(size=(devices, 8, 12, 3)).astype(np.float32)
    sharded = jax.device_put(x, NamedSharding(mesh, P("data")))

    def round_trip(x):
        patches = space_to_depth(x, 4)
        return patches, depth_to_space(patches, 4)

    patches, back = jax.jit(round_trip)(sharded)
    assert patches.shape == (devices, 2, 3, 48)
    np.testing.assert_array_equal(np.asarray(back), x)
    np.testing.assert_array_equal(np.asarray(patches)[0, 1, 2, :3], x[0, 4, 8])
    assert patches.sharding.spec[0] == back.sharding.spec[0] == "data"
    weights = np.arange(3.0, dtype=np.float32)
    with jax.set_mesh(mesh):  # the loss's cotangent is made on the mesh, as in a train step
        grad = jax.jit(jax.grad(lambda x: (round_trip(x)[1] * weights).sum()))(sharded)
    np.testing.assert_array_equal(np.asarray(grad), np.broadcast_to(weights, x.shape))
