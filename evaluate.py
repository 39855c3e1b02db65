"""Evaluates a trained run's best (or --step) checkpoint in a fresh process.

python evaluate.py --workdir=runs/default                  # the run's held-out fold
python evaluate.py --workdir=runs/default --data=/data/rsna --out=reports/rsna
"""

import os

from absl import app, flags, logging

from cspine_jax import cli, evaluation

flags.DEFINE_string("workdir", None, "Training run folder (checkpoints/ inside).", required=True)
flags.DEFINE_string("data", None, "RSNA-layout folder; default: the run's held-out fold.")
flags.DEFINE_string("out", None, "Output folder; default: <workdir>/eval[-<data name>].")
flags.DEFINE_integer("step", None, "Checkpoint step; default: best by validation loss.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file it touches at INFO
    data = flags.FLAGS.data
    if data is not None and not os.path.isdir(data):
        raise NotADirectoryError(f"--data={data}: no such folder")
    values = evaluation.evaluate_run(flags.FLAGS.workdir, data, flags.FLAGS.out, flags.FLAGS.step)
    if values:
        print(evaluation.format_table(values))


if __name__ == "__main__":
    cli.run(main, "evaluate.py")
