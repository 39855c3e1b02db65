"""The kill -9 loops of the interruption tests (tests/test_interruption.py), which
benchmarks/interruption_soak.py runs many more times: tiny training and prepare runs started
as a user starts them, killed at chosen moments, and their checkpoints and caches read back.

    from benchmarks.interruption import soak_training, train_cmd
"""

from __future__ import annotations

import filecmp
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

TRAIN_MOMENTS = ("saving", "running", "starting")
_POLL_S = 0.002  # Orbax keeps a tiny step in its temporary folder for ~0.3 s on 2 cores
_TMP_MARK = ".orbax-checkpoint-tmp"


def train_cmd(workdir: str | os.PathLike, *overrides: str) -> list[str]:
    """A tiny training run in `workdir`, as a user starts it."""
    return [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        *overrides,
    ]


def prepare_cmd(data: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """The prepare job on the tiny grid, one study at a time in one process."""
    return [
        sys.executable,
        "-m",
        "cspine_jax.data.prepare",
        f"--data={data}",
        f"--out={out}",
        "--workers=1",
        "--config=configs/tiny.py",
    ]


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    # Its own session: the kill reaches anything it started, and nothing else.
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _kill(proc: subprocess.Popen) -> bool:
    """kill -9 of the process group; False if the process had already exited."""
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait() == -signal.SIGKILL


def _wait_for(proc: subprocess.Popen, ready, timeout_s: float) -> bool:
    """Polls `ready()` until it holds; False if the process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(_POLL_S)
    raise TimeoutError(f"nothing happened in {timeout_s} s")


def _committed(workdir: Path) -> set[int]:
    """The steps in the run's checkpoint folder."""
    try:
        return {int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()}
    except FileNotFoundError:
        return set()


def _saving(workdir: Path, since: float) -> bool:
    """Whether a step is being written: a temporary step folder changed since `since` (one
    left by an earlier kill is older, until the run clears it)."""
    folder = workdir / "checkpoints"
    try:
        names = [n for n in os.listdir(folder) if _TMP_MARK in n]
        return any(os.stat(folder / n).st_mtime >= since for n in names)
    except FileNotFoundError:  # cleared between the listing and the stat
        return False


def kill_training(
    workdir: str | os.PathLike,
    env: dict[str, str],
    overrides: tuple[str, ...],
    moment: str,
    rng: random.Random,
    timeout_s: float = 600,
) -> str:
    """Starts (or resumes) the run in `workdir` and kills it at `moment` (TRAIN_MOMENTS).

    Returns what the kill found: "saving" (a step was being written), "running",
    "starting", or "finished" (the run ended before the moment came: nothing was killed).
    """
    workdir = Path(workdir)
    done, launched = max(_committed(workdir), default=0), time.time()
    proc = _start(train_cmd(workdir, *overrides), env)
    try:
        if moment == "saving":
            if not _wait_for(proc, lambda: _saving(workdir, launched), timeout_s):
                return "finished"
            time.sleep(rng.uniform(0.0, 0.05))  # early in the 0.1-0.4 s of a tiny save
        elif moment == "running":
            if not _wait_for(proc, lambda: max(_committed(workdir), default=0) > done, timeout_s):
                return "finished"
            time.sleep(rng.uniform(0.0, 0.6))
        elif moment == "starting":
            time.sleep(rng.uniform(0.5, 6.0))
        else:
            raise ValueError(f"unknown moment {moment!r}")
        saving = _saving(workdir, launched)
        if not _kill(proc):
            return "finished"
        if saving:
            return "saving"
        return "running" if moment == "saving" else moment  # that save had ended
    finally:
        if proc.poll() is None:
            _kill(proc)


def check_checkpoints(workdir: str | os.PathLike) -> list[int]:
    """Restores every step the checkpoint manager lists (state, config, metrics, data
    iterator state); returns the steps. Raises if one does not restore."""
    from cspine_jax import checkpoints

    with checkpoints.manager(str(workdir), read_only=True) as mngr:
        steps = mngr.all_steps()
        for step in steps:
            checkpoints.load_model(str(workdir), step)  # state and config
            assert checkpoints.BEST_METRIC in mngr.metrics(step), step
            data = list((Path(mngr.directory) / str(step) / "data").glob("*.json"))
            assert data, f"step {step}: no data iterator state"
            for path in data:
                json.loads(path.read_text())
    return list(steps)


def latest_params(workdir: str | os.PathLike) -> tuple[int, dict]:
    """The latest checkpoint's step and parameters as a flat {path: numpy array} dict."""
    import jax
    from flax import nnx

    from cspine_jax import checkpoints

    with checkpoints.manager(str(workdir), read_only=True) as mngr:
        step = mngr.latest_step()
    model, _, _ = checkpoints.load_model(str(workdir), step)
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    return step, {jax.tree_util.keystr(k): jax.device_get(v) for k, v in flat}


def soak_training(
    workdir: str | os.PathLike,
    env: dict[str, str],
    overrides: tuple[str, ...],
    kills: int,
    rng: random.Random,
) -> list[tuple[str, list[int]]]:
    """Kills the run in `workdir` `kills` times, checking its checkpoints after each, then
    runs it to the end. Returns (what each kill found, the steps listed after it)."""
    log = []
    for i in range(kills):
        found = kill_training(workdir, env, overrides, TRAIN_MOMENTS[i % len(TRAIN_MOMENTS)], rng)
        log.append((found, check_checkpoints(workdir)))
    result = subprocess.run(
        train_cmd(workdir, *overrides), cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_checkpoints(workdir)
    return log


def _entries(cache_dir: Path) -> list[str]:
    """The cache's finished study folders (temporary ones excluded)."""
    studies = cache_dir / "studies"
    if not studies.exists():
        return []
    return sorted(n for n in os.listdir(studies) if not n.startswith("."))


def assert_entries_match(cache_dir: str | os.PathLike, reference: str | os.PathLike) -> int:
    """Every finished study of `cache_dir` equals the reference's, file for file; returns
    how many there are."""
    cache_dir, reference = Path(cache_dir), Path(reference)
    entries = _entries(cache_dir)
    for uid in entries:
        ours, theirs = cache_dir / "studies" / uid, reference / "studies" / uid
        assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs)), uid
        for name in os.listdir(theirs):
            assert filecmp.cmp(ours / name, theirs / name, shallow=False), f"{uid}/{name}"
    return len(entries)


def assert_caches_equal(cache_dir: str | os.PathLike, reference: str | os.PathLike) -> None:
    """The same finished studies, files and reports, and no temporary folder."""
    cache_dir, reference = Path(cache_dir), Path(reference)
    assert _entries(cache_dir) == _entries(reference)
    assert assert_entries_match(cache_dir, reference) == len(_entries(reference))
    assert sorted(os.listdir(cache_dir / "studies")) == _entries(reference), "leftovers"
    for name in os.listdir(reference):
        if name.endswith(".json"):
            assert filecmp.cmp(cache_dir / name, reference / name, shallow=False), name


def kill_prepare(
    data: str | os.PathLike,
    out: str | os.PathLike,
    env: dict[str, str],
    rng: random.Random,
    timeout_s: float = 300,
) -> bool:
    """Runs prepare into `out` and kills it at a random point of the study after the next
    two it finishes; False if it completed first.

    The delay is a random fraction of the time the second of those two studies took, not a
    fixed span: on a fast machine a fixed 0.15 s let a tiny-phantom prepare run to its end
    before the kill, and on a slow one it never got past the start of a study.
    """
    done = len(_entries(Path(out)))
    proc = _start(prepare_cmd(data, out), env)
    try:
        if not _wait_for(proc, lambda: len(_entries(Path(out))) > done, timeout_s):
            return False
        first = time.monotonic()
        if not _wait_for(proc, lambda: len(_entries(Path(out))) > done + 1, timeout_s):
            return False
        time.sleep(rng.uniform(0.0, 1.0) * (time.monotonic() - first))
        return _kill(proc)
    finally:
        if proc.poll() is None:
            _kill(proc)


def soak_prepare(
    data: str | os.PathLike,
    out: str | os.PathLike,
    reference: str | os.PathLike,
    env: dict[str, str],
    kills: int,
    rng: random.Random,
) -> int:
    """Kills prepare `kills` times (checking the cache after each), reruns it to the end and
    compares the cache with `reference`; returns how many kills landed."""
    landed = 0
    for _ in range(kills):
        landed += kill_prepare(data, out, env, rng)
        assert_entries_match(out, reference)
    result = subprocess.run(
        prepare_cmd(data, out), cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_caches_equal(out, reference)
    return landed
