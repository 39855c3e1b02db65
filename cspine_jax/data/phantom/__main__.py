"""Writes procedural CT phantoms of the cervical spine in the RSNA 2022 layout.

`python -m cspine_jax.data.phantom --out DIR --num_studies N --seed S --size demo`
(sizes: tiny, demo, full; see `cspine_jax.data.phantom`).
"""

from __future__ import annotations

from absl import app, flags

from cspine_jax.data.phantom.plan import SIZES
from cspine_jax.data.phantom.writer import write_dataset


def _cli():
    flags.DEFINE_string("out", None, "Output folder (RSNA layout).", required=True)
    flags.DEFINE_integer("num_studies", 100, "Number of studies.")
    flags.DEFINE_integer("seed", 0, "Dataset seed.")
    flags.DEFINE_enum("size", "demo", list(SIZES), "Phantom size.")
    flags.DEFINE_integer("workers", None, "Worker processes (default: all cores).")
    flags.DEFINE_float("mask_fraction", 0.3, "Share of studies with a segmentation.")
    flags.DEFINE_float("box_fraction", 0.5, "Share of positive studies with boxes.")
    FLAGS = flags.FLAGS

    def main(argv):
        del argv
        write_dataset(
            FLAGS.out,
            FLAGS.num_studies,
            FLAGS.seed,
            FLAGS.size,
            FLAGS.workers,
            FLAGS.mask_fraction,
            FLAGS.box_fraction,
        )

    app.run(main)


if __name__ == "__main__":
    _cli()
