"""The command lines a newcomer types: every mistake is one line on stderr, exit status 1,
naming the file, folder or flag; nothing is written before the input checks pass."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # each case starts a process


def _run(env, *args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _one_line(result, *expected):
    """The single stderr line of a failed command, checked for each of `expected`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr)
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


TRAIN = os.path.join(ROOT, "train.py")
EVALUATE = os.path.join(ROOT, "evaluate.py")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config=configs/tinny.py"], ["train.py: error:", "configs/tinny.py", "no such"]),
        (
            ["--config=configs/tiny.py", "--config.optim.step=5"],
            ["train.py: error:", "--config.optim.step", 'did you mean "steps"'],
        ),
        (["--config=configs/tiny.py", "--config.optim.steps=0"], ["--config.optim.steps=0"]),
        (["--config=configs/tiny.py", "--config.data.dir=/nope"], ["/nope", "no such folder"]),
    ],
    ids=["missing config", "misspelt field", "no steps", "missing data folder"],
)
def test_train_mistakes_are_one_line_and_write_nothing(data_env, tmp_path, args, expected):
    env, _ = data_env
    workdir = tmp_path / "run"
    _one_line(_run(env, TRAIN, *args, f"--workdir={workdir}"), *expected)
    assert not workdir.exists()


def test_train_finds_its_default_config_from_another_folder(data_env, tmp_path):
    env, _ = data_env
    workdir = tmp_path / "run"
    # The default config loads (else the line would name configs/default.py): its fields
    # are checked, and the first bad one is reported.
    line = _one_line(
        _run(env, TRAIN, "--config.optim.steps=0", f"--workdir={workdir}", cwd=tmp_path),
        "--config.optim.steps=0",
    )
    assert "default.py" not in line
    assert not workdir.exists()


def test_bad_data_is_one_line_before_any_workdir(data_env, phantom_dir, tmp_path):
    env, _ = data_env
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    (data / "train.csv").write_text("StudyInstanceUID,patient_overall\n1.2.3,1\n")
    workdir = tmp_path / "run"
    _one_line(
        _run(
            env,
            TRAIN,
            "--config=configs/tiny.py",
            f"--config.data.dir={data}",
            f"--workdir={workdir}",
        ),
        "train.csv",
    )
    assert not workdir.exists()


def test_evaluate_and_prepare_name_missing_folders(data_env, tmp_path):
    env, _ = data_env
    _one_line(_run(env, EVALUATE, f"--workdir={tmp_path / 'nothere'}"), "nothere", "no checkpoints")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    _one_line(
        _run(env, EVALUATE, f"--workdir={run}", "--data=/nope"), "--data=/nope", "no such folder"
    )
    _one_line(
        _run(env, "-m", "cspine_jax.data.prepare", "--data=/nope", f"--out={tmp_path / 'c'}"),
        "prepare: error:",
        "/nope",
        "no such folder",
    )
    assert not (tmp_path / "c").exists()


def test_a_cache_is_refused_for_other_studies_or_another_grid(data_env, phantom_dir, tmp_path):
    """A cache prepared from another folder, or on another grid, is refused in one line
    naming the train.py flag to change, instead of training on other studies."""
    env, _ = data_env
    copy = tmp_path / "copy"
    shutil.copytree(phantom_dir, copy)
    cache = tmp_path / "cache"
    prepared = _run(
        env,
        "-m",
        "cspine_jax.data.prepare",
        f"--data={copy}",
        f"--out={cache}",
        "--workers=1",
        "--config=configs/tiny.py",
    )
    assert prepared.returncode == 0, prepared.stderr
    assert str(cache) in prepared.stdout  # prepare says where the cache went

    # data.dir empty: the generated phantoms, not the folder this cache holds.
    line = _one_line(
        _run(
            env,
            TRAIN,
            "--config=configs/tiny.py",
            f"--config.data.cache_dir={cache}",
            f"--workdir={tmp_path / 'a'}",
        ),
        str(cache),
        f"--config.data.dir={copy}",
        "--config.data.cache_dir",
    )
    assert "--out" not in line
    # The same folder, another grid: prepare needs training's --config.
    _one_line(
        _run(
            env,
            TRAIN,
            "--config=configs/tiny.py",
            f"--config.data.cache_dir={cache}",
            f"--config.data.dir={copy}",
            "--config.data.grid=48",
            f"--workdir={tmp_path / 'b'}",
        ),
        str(cache),
        "--config",
        "--config.data.cache_dir",
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_does_not_import_evaluation():
    """Every entry point imports `cli`, and evaluation imports data.sources, which imports
    data.prepare, an entry point: were cli to import evaluation, which module a command
    found half-initialised would depend on the order of imports."""
    probe = "import sys, cspine_jax.cli; print('cspine_jax.evaluation' in sys.modules)"
    result = _run({**os.environ, "JAX_PLATFORMS": "cpu"}, "-c", probe)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "False"
