"""Ablation of the single model's levers at the demo budget: one training run per row.

    python benchmarks/ablation.py [--out runs/ablation] [--rows name,name] [--list]

Each row is `python train.py` with a few config overrides, on the same phantoms, the same
train/held-out split and the same seed; a row whose run folder already holds a metrics.json
is read back, not rerun (delete the folder to rerun it). The table reads each run's final
whole-study evaluation of its held-out fold (`metrics.json`): competition loss, patient AUC,
mean C1-C7 AUC, mean C1-C7 Dice and its lowest level, the same run's test-set loss and AUCs
(`test_metrics.json`: studies nothing was selected on), and the training seconds of the best
checkpoint's run (`train_seconds`: compilation and input included, evaluations excluded).

Then the learning curves: every row's held-out checkpoint evaluations (validation loss and
patient AUC on `data.eval_slices` slices a study, from its TensorBoard log) against training
seconds, drawn into `<out>/learning_curves.png`, and the longest row's printed.

Rows run one after another: on 2 CPU cores each takes ~6-8 min (steps_x3 ~20 min).
"""

import glob
import json
import os
import subprocess
import sys
import time

from absl import app, flags
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cspine_jax.data.rsna import VERTEBRAE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (what it tests, config overrides). The first row is the default config.
ROWS = {
    "default": ("the default config", []),
    "no_z_context": (
        "z-context off: each slice's levels and fracture logits from itself alone",
        ["model.z_layers=0"],
    ),
    "two_slices": (
        "64 studies x 2 slices a step instead of 32 x 4",
        ["data.num_slices=2", "optim.batch_size=64"],
    ),
    "centre_crop": (
        "the central 75 % of the field of view instead of the spine region",
        ["data.region=centre"],
    ),
    "patch_stem": (
        "4 x 4 patch stem, stages at strides 4-32, wider first stages",
        ["model.stem_patch=4", "model.strides=(1,2,2,2)", "model.widths=(32,48,64,96)"],
    ),
    "no_mask_oversample": (
        "studies with a segmentation drawn at their share, not twice as often",
        ["data.mask_oversample=1.0"],
    ),
    "no_stream": (
        "no fracture stream: the map learns from the study bags' slices alone",
        ["data.stream.slices=0", "loss.stream=0.0"],
    ),
    "stream_heavy": (
        "the step's slices shifted to the stream: 16 studies x 4 slices + 96 stream slices",
        ["optim.batch_size=16", "data.stream.slices=96"],
    ),
    "image_skip": (
        "finer features: the input image into the decoder's finest level",
        ["model.image_skip=True"],
    ),
    "studies_x3": (
        "3x the phantoms (720; the held-out fold grows with them, the test set is the same)",
        ["data.phantom.num_studies=720"],
    ),
    "steps_x3": ("3x the steps (the learning curve out to 3x the budget)", ["optim.steps=1200"]),
}

flags.DEFINE_string("out", "runs/ablation", "Run folders, one per row.")
flags.DEFINE_list("rows", list(ROWS), "Rows to run or read, in order.")
flags.DEFINE_bool("list", False, "Print the rows and exit.")
FLAGS = flags.FLAGS


def run_row(name: str, overrides: list[str], workdir: str) -> float:
    """Trains one row unless its metrics.json exists; returns the wall seconds spent."""
    if os.path.exists(os.path.join(workdir, "metrics.json")):
        return 0.0
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--workdir={workdir}"]
    cmd += [f"--config.{o}" for o in overrides]
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - start


def row_values(workdir: str) -> dict[str, float]:
    """The table's numbers of one finished run: its held-out fold's, and its test set's
    (`test_` keys, NaN where the run has none)."""
    with open(os.path.join(workdir, "metrics.json")) as f:
        m = json.load(f)
    test = {}
    if os.path.exists(os.path.join(workdir, "test_metrics.json")):
        with open(os.path.join(workdir, "test_metrics.json")) as f:
            test = json.load(f)
    step = m["step"]
    with open(os.path.join(workdir, "checkpoints", str(step), "metrics", "metrics")) as f:
        seconds = json.load(f).get("train_seconds", float("nan"))
    dice = [m.get(f"dice_{v}") for v in VERTEBRAE]
    dice = [float("nan") if d is None else d for d in dice]
    return dict(
        loss=m["competition_loss"],
        auc=m["auc_patient_overall"],
        vertebra_auc=m["auc_mean_vertebra"],
        dice=sum(dice) / len(dice),
        dice_min=min(dice),
        seconds=seconds,
        step=step,
        test_loss=test.get("competition_loss", float("nan")),
        test_auc=test.get("auc_patient_overall", float("nan")),
        test_vertebra_auc=test.get("auc_mean_vertebra", float("nan")),
    )


def held_out_curve(workdir: str) -> dict[str, list[float]]:
    """A run's checkpoint evaluations from its TensorBoard log: step, train seconds,
    validation loss and patient AUC, in step order."""
    events = glob.glob(os.path.join(workdir, "tensorboard", "events*"))
    ea = EventAccumulator(events[0], size_guidance={"scalars": 0})
    ea.Reload()
    by_step = {
        tag: {e.step: e.value for e in ea.Scalars(tag)}
        for tag in ("train/seconds", "val/loss", "val/auc_patient_overall")
    }
    steps = sorted(by_step["val/loss"])
    return dict(
        step=steps,
        seconds=[by_step["train/seconds"][s] for s in steps],
        loss=[by_step["val/loss"][s] for s in steps],
        auc=[by_step["val/auc_patient_overall"].get(s, float("nan")) for s in steps],
    )


def curves_figure(curves: dict[str, dict[str, list[float]]], path: str) -> None:
    """Validation loss and patient AUC against training seconds, one line per row."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, auc_ax = fig.subplots(1, 2)
    for name, c in curves.items():
        loss_ax.plot(c["seconds"], c["loss"], marker="o", label=name)
        auc_ax.plot(c["seconds"], c["auc"], marker="o", label=name)
    loss_ax.set(xlabel="training seconds", ylabel="held-out competition loss (eval_slices)")
    auc_ax.set(xlabel="training seconds", ylabel="held-out patient AUC (eval_slices)")
    loss_ax.legend(fontsize=8)
    fig.savefig(path, dpi=90)


def main(argv):
    del argv
    if FLAGS.list:
        for name, (what, overrides) in ROWS.items():
            print(f"{name:16s} {what}: {' '.join(overrides) or '-'}")
        return
    unknown = [r for r in FLAGS.rows if r not in ROWS]
    if unknown:
        raise app.UsageError(f"unknown rows {unknown}; --list shows them")
    results = {}
    for name in FLAGS.rows:
        workdir = os.path.join(FLAGS.out, name)
        run_row(name, ROWS[name][1], workdir)
        results[name] = row_values(workdir)
    print(
        "| row | held-out loss | patient AUC | mean C1-C7 AUC | mean Dice (min) | test loss | "
        "test patient AUC | test mean C1-C7 AUC | train s |"
    )
    print("|" + "---|" * 9)
    for name, v in results.items():
        print(
            f"| {name} | {v['loss']:.3f} | {v['auc']:.3f} | {v['vertebra_auc']:.3f} | "
            f"{v['dice']:.3f} ({v['dice_min']:.2f}) | {v['test_loss']:.3f} | "
            f"{v['test_auc']:.3f} | {v['test_vertebra_auc']:.3f} | {v['seconds']:.0f} |"
        )
    curves = {name: held_out_curve(os.path.join(FLAGS.out, name)) for name in results}
    path = os.path.join(FLAGS.out, "learning_curves.png")
    curves_figure(curves, path)
    longest = max(curves, key=lambda name: len(curves[name]["step"]))
    print(f"\nheld-out curve of {longest} (validation on eval_slices slices a study):")
    print("| step | train s | val loss | val patient AUC |")
    print("|---|---|---|---|")
    c = curves[longest]
    for row in zip(c["step"], c["seconds"], c["loss"], c["auc"], strict=True):
        print("| {} | {:.0f} | {:.4f} | {:.3f} |".format(*row))
    print(f"figure: {path}")


if __name__ == "__main__":
    app.run(main)
