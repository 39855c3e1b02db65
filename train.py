"""Trains the single-model fracture detector, then reports its held-out results.

    python train.py                                   # embedded default: synthetic phantoms
    python train.py --config=configs/rsna.py --config.data.dir=/data/rsna --workdir=runs/rsna
"""

from absl import app, flags, logging
from ml_collections import config_flags

from cspine_jax import trainer

config_flags.DEFINE_config_file("config", "configs/default.py", "Training configuration.")
flags.DEFINE_string("workdir", "runs/default", "Checkpoints, TensorBoard logs and metrics.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file it touches at INFO
    trainer.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
