"""submission.csv: the rows a test.csv asks for, in its order, with the whole-study predictor's
probabilities.

`evaluation.evaluate_run` (what `python evaluate.py --workdir=RUN --data=DIR` runs) scores an
RSNA-layout test folder (test_images/<uid>/ and test.csv, no labels) with a run's checkpoint.
The phantom generator writes no test.csv, so the tests build one from the tiny phantoms,
its rows shuffled across studies and labels and some left out, as Kaggle's test.csv may.
"""

import csv
import os
import shutil

import numpy as np
import pytest

from cspine_jax import checkpoints, evaluation
from cspine_jax.data import cache, rsna, sources
from cspine_jax.data.rsna import LABEL_COLUMNS
from tests.helpers import save_random_heads_run


def _read_submission(path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["row_id", "fractured"]
    return [r[0] for r in rows[1:]], np.array([float(r[1]) for r in rows[1:]])


def test_write_submission_follows_the_row_ids(tmp_path):
    uids = ["1.2.3", "1.2.4"]
    probs = np.arange(16, dtype=np.float32).reshape(2, 8) / 16 + 1e-3
    row_ids = ["1.2.4_C3", "1.2.3_patient_overall", "1.2.4_patient_overall", "1.2.3_C7"]
    path = tmp_path / "submission.csv"
    evaluation.write_submission(str(path), uids, probs, row_ids)
    ids, values = _read_submission(path)
    assert ids == row_ids
    np.testing.assert_allclose(
        values, [probs[1, 3], probs[0, 0], probs[1, 0], probs[0, 7]], atol=5e-7
    )

    evaluation.write_submission(str(path), uids, probs)  # no test.csv: 8 rows per study
    ids, values = _read_submission(path)
    assert ids == [f"{uid}_{name}" for uid in uids for name in LABEL_COLUMNS]
    np.testing.assert_allclose(values, probs.ravel(), atol=5e-7)

    with pytest.raises(ValueError, match="1.2.5_C1"):
        evaluation.write_submission(str(path), uids, probs, ["1.2.3_C1", "1.2.5_C1"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny run whose probabilities differ by study and by level."""
    workdir = str(tmp_path_factory.mktemp("run"))
    save_random_heads_run(workdir)
    return workdir


@pytest.fixture(scope="module")
def rsna_test_folder(phantom_dir, tmp_path_factory):
    """(RSNA-layout folder with test_images/ and test.csv only, test.csv's rows as
    (StudyInstanceUID, prediction_type) in file order)."""
    uids = [s.uid for s in rsna.load_index(phantom_dir)][:3]
    folder = tmp_path_factory.mktemp("data") / "rsna_test"
    for uid in uids:
        shutil.copytree(
            os.path.join(phantom_dir, "train_images", uid), folder / "test_images" / uid
        )
    pairs = [(uid, name) for uid in uids for name in LABEL_COLUMNS]
    rng = np.random.default_rng(0)
    pairs = [pairs[i] for i in rng.permutation(len(pairs))[: len(pairs) - 5]]
    with open(folder / "test.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(rsna.TEST_COLUMNS)
        writer.writerows((uid, name, f"{uid}_{name}") for uid, name in pairs)
    return str(folder), pairs


def test_evaluate_run_writes_test_csvs_rows_with_the_predictors_probabilities(
    checkpoint, rsna_test_folder, tmp_path, monkeypatch
):
    monkeypatch.setenv("CSPINE_CACHE", str(tmp_path / "cache"))
    folder, pairs = rsna_test_folder
    out = tmp_path / "out"
    values = evaluation.evaluate_run(checkpoint, data_dir=folder, out_dir=str(out), progress=False)
    assert values == {}  # unlabelled studies: a submission, no metrics
    ids, values = _read_submission(out / "submission.csv")
    assert ids == [f"{uid}_{name}" for uid, name in pairs]

    # The predictor of the same checkpoint, on the same prepared studies.
    model, config, _ = checkpoints.load_model(checkpoint)
    data_config = config.data.copy_and_resolve_references()
    data_config.update(dir=os.path.abspath(folder), cache_dir="")
    entries = cache.read_entries(sources.prepared_cache(data_config, progress=False))
    predictor = evaluation.StudyPredictor(model, config.data.context)
    probs = {e.uid: predictor(e.image()).probs for e in entries}
    assert len(probs) == 3
    expected = np.array([probs[uid][LABEL_COLUMNS.index(name)] for uid, name in pairs])
    atol = 1e-5
    np.testing.assert_allclose(values, expected, rtol=0, atol=atol)
    # Every row's value differs from every other's by more than twice the tolerance, so a
    # row scored from another study or label would fail.
    gaps = np.abs(expected[:, None] - expected[None, :]) + np.eye(len(expected))
    assert gaps.min() > 2 * atol, np.sort(expected)
