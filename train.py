"""Trains the single-model fracture detector (or the two-stage baseline), then reports its
held-out results.

    python train.py                                   # embedded default: synthetic phantoms
    python train.py --config=configs/rsna.py --config.data.dir=/data/rsna --workdir=runs/rsna
    python train.py --config=configs/two_stage.py --workdir=runs/two_stage   # the baseline
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from cspine_jax import cli, systems

# Relative to this file, so that `python path/to/train.py` works from any folder.
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Training configuration.")
flags.DEFINE_string("workdir", "runs/default", "Checkpoints, TensorBoard logs and metrics.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file it touches at INFO
    config = cli.config("train.py")
    systems.check_config(config)
    workdir = flags.FLAGS.workdir
    systems.get(config).train_and_evaluate(config, workdir)
    # Where everything went: the run folder, its metrics and its report figures.
    print(f"run folder: {os.path.abspath(workdir)}")
    print(f"metrics: {os.path.abspath(os.path.join(workdir, 'metrics.json'))}")
    print(f"report figures: {os.path.abspath(os.path.join(workdir, 'eval'))}")


if __name__ == "__main__":
    cli.run(main, "train.py")
