"""Trains the single-model fracture detector (or the two-stage baseline), then reports its
held-out results.

    python train.py                                   # embedded default: synthetic phantoms
    python train.py --config=configs/rsna.py --config.data.dir=/data/rsna --workdir=runs/rsna
    python train.py --config=configs/two_stage.py --workdir=runs/two_stage   # the baseline
"""

from absl import app, flags, logging
from ml_collections import config_flags

from cspine_jax import systems
from cspine_jax.data import cache, rsna

config_flags.DEFINE_config_file("config", "configs/default.py", "Training configuration.")
flags.DEFINE_string("workdir", "runs/default", "Checkpoints, TensorBoard logs and metrics.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file it touches at INFO
    config = flags.FLAGS.config
    try:
        systems.get(config).train_and_evaluate(config, flags.FLAGS.workdir)
    except (rsna.DatasetError, cache.CacheError, FloatingPointError) as e:
        # Bad data or a diverged run: the message names the file or the steps; a traceback
        # adds nothing for the user.
        raise SystemExit(f"train.py: error: {e}") from None


if __name__ == "__main__":
    app.run(main)
