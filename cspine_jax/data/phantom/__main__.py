"""Writes procedural CT phantoms of the cervical spine in the RSNA 2022 layout.

`python -m cspine_jax.data.phantom --out DIR --num_studies N --seed S --size demo`
(sizes: tiny, demo, full; see `cspine_jax.data.phantom`). The shares of studies with a mask
and with boxes default to those of the phantoms `train.py` generates (`configs/default.py`,
`data.phantom`). `--fov_scale F --off_centre O` frame each study as real scans do (a field of
view up to F times the size's, the patient up to O of its width off its centre; `Framing`),
e.g. to evaluate a run on off-centre studies (`evaluate.py --data`).
"""

from __future__ import annotations

import csv
import os

from absl import flags

from cspine_jax import cli
from cspine_jax.data.phantom.plan import SIZES, Framing
from cspine_jax.data.phantom.writer import write_dataset


def summary(out: str | os.PathLike) -> str:
    """One line: the folder and what its train.csv, train_images/, segmentations/ and
    train_bounding_boxes.csv hold."""
    out = os.path.abspath(out)
    with open(os.path.join(out, "train.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    positives = sum(int(r["patient_overall"]) for r in rows)
    with open(os.path.join(out, "train_bounding_boxes.csv"), newline="") as f:
        boxes = [r["StudyInstanceUID"] for r in csv.DictReader(f)]
    masks = len(os.listdir(os.path.join(out, "segmentations")))
    return (
        f"wrote {out}: {len(rows)} studies in train_images/ ({positives} with a fracture), "
        f"train.csv, {masks} masks in segmentations/, train_bounding_boxes.csv "
        f"({len(boxes)} boxes on {len(set(boxes))} studies)"
    )


def _cli():
    flags.DEFINE_string("out", None, "Output folder (RSNA layout).", required=True)
    flags.DEFINE_integer("num_studies", 100, "Number of studies.")
    flags.DEFINE_integer("seed", 0, "Dataset seed.")
    flags.DEFINE_enum("size", "demo", list(SIZES), "Phantom size.")
    flags.DEFINE_integer("workers", None, "Worker processes (default: all cores).")
    flags.DEFINE_float(
        "mask_fraction", 0.3, "Share of studies with a segmentation (as configs/default.py)."
    )
    flags.DEFINE_float(
        "box_fraction", 1.0, "Share of positive studies with boxes (as configs/default.py)."
    )
    flags.DEFINE_float(
        "fov_scale", 1.0, "Fields of view widened by up to this factor (drawn per study)."
    )
    flags.DEFINE_float(
        "off_centre",
        0.0,
        "Patients moved off the field of view's centre by up to this share of its width.",
    )
    FLAGS = flags.FLAGS

    def main(argv):
        del argv
        framing = None
        if FLAGS.fov_scale != 1.0 or FLAGS.off_centre != 0.0:
            framing = Framing((1.0, FLAGS.fov_scale), (0.0, FLAGS.off_centre))
        out = write_dataset(
            FLAGS.out,
            FLAGS.num_studies,
            FLAGS.seed,
            FLAGS.size,
            FLAGS.workers,
            FLAGS.mask_fraction,
            FLAGS.box_fraction,
            framing,
        )
        print(summary(out))

    cli.run(main, "phantom")


if __name__ == "__main__":
    _cli()
