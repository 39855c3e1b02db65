"""kill -9 soak: training and prepare killed at random moments, resumed, compared.

    python benchmarks/interruption_soak.py [--kills 30] [--prepare_kills 20] [--seed 0]

Training (`python train.py --config=configs/tiny.py`): a run killed `--kills` times, at
moments that cycle through "saving" (while Orbax has a step in its temporary folder),
"running" (a random moment after the run saved a new step) and "starting" (a random moment
of start-up: imports, restore, clean-up of the last kill's leftovers), is resumed to the
end. After every kill, every step the checkpoint manager lists must restore; at the end the
parameters must equal those of an uninterrupted run bitwise.

Prepare (`python -m cspine_jax.data.prepare`): killed `--prepare_kills` times at a random
point of the study after the next two it finishes (kills after the cache is complete do not
land: the tiny set has 12 studies); after every kill
each study entry in the cache must equal the uninterrupted run's, file for file, and the
rerun must complete to the same cache.

The last line is `interruption_soak=ok train_kills=N prepare_kills=M`; a failed check raises.
The kill loops live in benchmarks/interruption.py; tests/test_interruption.py runs them with a
handful of kills.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(
    0, ROOT
)  # run as a script from anywhere: `configs` and `benchmarks` are not installed

from benchmarks.interruption import (  # noqa: E402
    latest_params,
    prepare_cmd,
    soak_prepare,
    soak_training,
    train_cmd,
)


def main(argv):
    del argv
    from absl import flags, logging

    from configs import tiny
    from cspine_jax.data import sources

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # Orbax logs every restore, and read-only use
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this process only restores, on the host
    rng = random.Random(flags.FLAGS.seed)
    # A step saved every 2; a kill lands after 1-2 new saves: room for every kill to land.
    steps = flags.FLAGS.kills * 4 + 8
    overrides = (f"--config.optim.steps={steps}", "--config.checkpoint.every=2")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {
            **os.environ,
            "CSPINE_CACHE": str(tmp / "cache"),
            "JAX_PLATFORMS": "cpu",
            "JAX_NUM_CPU_DEVICES": "1",
        }
        os.environ["CSPINE_CACHE"] = env["CSPINE_CACHE"]
        data = sources.phantom_dir(tiny.get_config().data.phantom)

        reference = subprocess.run(
            prepare_cmd(data, tmp / "reference"), cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert reference.returncode == 0, reference.stderr[-3000:]
        landed = soak_prepare(
            data, tmp / "cache_killed", tmp / "reference", env, flags.FLAGS.prepare_kills, rng
        )
        print(
            f"prepare: {landed} of {flags.FLAGS.prepare_kills} kills landed mid-run; "
            "every entry complete after each, final cache identical"
        )

        start = time.perf_counter()
        straight = subprocess.run(
            train_cmd(tmp / "straight", *overrides),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert straight.returncode == 0, straight.stderr[-3000:]
        print(f"uninterrupted run: {steps} steps in {time.perf_counter() - start:.1f} s")
        log = soak_training(tmp / "killed", env, overrides, flags.FLAGS.kills, rng)
        for i, (found, steps_listed) in enumerate(log):
            print(f"kill {i + 1}: {found:<9} listed steps {steps_listed} all restore")
        step_a, a = latest_params(tmp / "straight")
        step_b, b = latest_params(tmp / "killed")
        assert step_a == step_b == steps
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "params differ"
        train_kills = sum(found != "finished" for found, _ in log)
        saving = sum(found == "saving" for found, _ in log)
        print(f"train: {train_kills} kills ({saving} while saving), parameters identical")
    print(f"interruption_soak=ok train_kills={train_kills} prepare_kills={landed}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_integer("kills", 30, "kill -9 of the training run.")
    flags.DEFINE_integer("prepare_kills", 20, "kill -9 of the prepare job.")
    flags.DEFINE_integer("seed", 0, "Seed of the kill moments.")
    app.run(main)
