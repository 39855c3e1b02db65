"""The one model's fracture map against the same map trained alone, same data, same seconds.

    python benchmarks/map_side_by_side.py [--workdir=runs/side_by_side] [--config.*=...]

Trains the single model (`train.py`'s run, `--config` as train.py takes it, default
configs/default.py) in `--workdir` (or reuses a finished run there), scores its fracture map
(`SingleModel.encode_slices`) on the held-out studies as `benchmarks/map_scores.py` scores
any map, then trains the map alone (`fracture_detector.train_detector`: the same backbone
and decoder, the same fracture stream) for the single model's training seconds and scores
it alike. Prints a table of both; the last line:
    single_map_study_auc=<a> single_map_slice_auc=<b> detector_study_auc=<c> detector_slice_auc=<d>
"""

import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import fracture_detector  # noqa: E402
import map_scores  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from cspine_jax import checkpoints, trainer  # noqa: E402
from cspine_jax.data import cache, sources  # noqa: E402

config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")
)
flags.DEFINE_string("workdir", "runs/side_by_side", "The single model's run folder.")
flags.DEFINE_integer("eval_every", 200, "detector steps between its evaluations")
F = flags.FLAGS


def single_map_aucs(workdir: str, config) -> dict[str, float]:
    """Held-out slice and study AUC of the fracture map of the run's best checkpoint."""
    model, _, step = checkpoints.load_model(workdir)
    graphdef, params = nnx.split(model)
    predict = fracture_detector.map_fn(graphdef, params)
    entries = cache.read_entries(sources.prepared_cache(config.data, progress=False))
    _, held_out = sources.split_entries(entries, config.data, config.seed)
    x, y, _, z = map_scores.box_slices(held_out, np.random.default_rng(1), config.data.context)
    with checkpoints.manager(workdir, read_only=True) as mngr:
        seconds = (mngr.metrics(step) or {}).get("train_seconds", float("nan"))
    return {
        "study_auc": map_scores.study_auc(predict, held_out, config.data.context),
        "slice_auc": map_scores.slice_auc(predict, x, y, z),
        "seconds": seconds,
        "steps": step,
    }


def main(argv):
    del argv
    config = F.config
    if not os.path.exists(os.path.join(F.workdir, "metrics.json")):
        trainer.train_and_evaluate(config, F.workdir)
    single = single_map_aucs(F.workdir, config)
    detector = fracture_detector.train_detector(
        config,
        steps=10**9,
        seconds_limit=single["seconds"],
        batch=int(config.data.stream.slices),
        eval_every=F.eval_every,
    )
    print(f"\nheld-out fracture map, {jax.devices()[0].device_kind}")
    print(f"{'':<34} {'steps':>6} {'train s':>8} {'slice AUC':>9} {'study AUC':>9}")
    for name, r in (("single model (best checkpoint)", single), ("map alone", detector)):
        print(
            f"{name:<34} {r['steps']:>6} {r['seconds']:>8.0f} {r['slice_auc']:>9.3f} "
            f"{r['study_auc']:>9.3f}"
        )
    print(
        f"single_map_study_auc={single['study_auc']:.3f} "
        f"single_map_slice_auc={single['slice_auc']:.3f} "
        f"detector_study_auc={detector['study_auc']:.3f} "
        f"detector_slice_auc={detector['slice_auc']:.3f}"
    )


if __name__ == "__main__":
    app.run(main)
