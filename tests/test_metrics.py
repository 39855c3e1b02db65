"""Study-level metrics against the formula and scikit-learn."""

import numpy as np
import pytest
from sklearn import metrics as skm

from cspine_jax import metrics

W_NEG = np.array([7, 1, 1, 1, 1, 1, 1, 1], np.float64)
W_POS = np.array([14, 2, 2, 2, 2, 2, 2, 2], np.float64)


def _direct(y, p):
    """The competition formula, written out study by study."""
    losses = []
    for yi, pi in zip(y, np.clip(p, 1e-15, 1 - 1e-15), strict=True):
        w = np.where(yi == 1, W_POS, W_NEG)
        bce = -(yi * np.log(pi) + (1 - yi) * np.log(1 - pi))
        losses.append((w * bce).sum() / w.sum())
    return float(np.mean(losses))


def test_competition_loss_on_hand_made_cases():
    y = np.array([[1, 0, 1, 0, 0, 0, 0, 1], [0] * 8, [1, 1, 1, 1, 1, 1, 1, 1]], np.float64)
    assert metrics.competition_loss(y, y) == pytest.approx(0.0, abs=1e-12)
    worst = metrics.competition_loss(y, 1 - y)
    # Every label at the clip (1 - 1e-15 is not exact in float64, hence rel 1e-4).
    assert worst == pytest.approx(-np.log(1e-15), rel=1e-4)
    assert worst == pytest.approx(_direct(y, 1 - y), rel=1e-12)
    assert metrics.competition_loss(y, np.full_like(y, 0.5)) == pytest.approx(0.693147, abs=1e-6)
    rng = np.random.default_rng(0)
    p = rng.random(y.shape)
    assert metrics.competition_loss(y, p) == pytest.approx(_direct(y, p), rel=1e-12)
    # A positive study's weights make its patient_overall error count double.
    only_overall_wrong = y.copy()
    only_overall_wrong[:, 0] = 1 - y[:, 0]
    per_study = [
        _direct(y[i : i + 1], np.clip(only_overall_wrong[i : i + 1], 0.2, 0.8)) for i in range(3)
    ]
    assert per_study[0] > per_study[1]
    with pytest.raises(ValueError, match=r"\(n, 8\)"):
        metrics.competition_loss(y[:, :7], p[:, :7])


def test_study_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(1)
    y = (rng.random((200, 8)) < 0.3).astype(np.float64)
    y[:, 0] = y[:, 1:].max(axis=1)
    p = np.clip(0.6 * y + 0.5 * rng.random(y.shape), 0, 1)
    out = metrics.study_metrics(y, p, threshold=0.5)
    for j, name in enumerate(("patient_overall", "C1", "C2", "C3", "C4", "C5", "C6", "C7")):
        assert out[f"auc_{name}"] == pytest.approx(skm.roc_auc_score(y[:, j], p[:, j]))
    assert out["auc_mean_vertebra"] == pytest.approx(
        np.mean([skm.roc_auc_score(y[:, j], p[:, j]) for j in range(1, 8)])
    )
    pred = p[:, 1:] >= 0.5
    assert out["macro_f1"] == pytest.approx(skm.f1_score(y[:, 1:], pred, average="macro"))
    assert out["exact_match"] == pytest.approx(skm.accuracy_score(y[:, 1:], pred))
    assert out["coverage_error"] == pytest.approx(skm.coverage_error(y[:, 1:], p[:, 1:]))
    tn, fp, fn, tp = skm.confusion_matrix(y[:, 0], p[:, 0] >= 0.5).ravel()
    assert out["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert out["specificity"] == pytest.approx(tn / (tn + fp))
    assert out["competition_loss"] == pytest.approx(_direct(y, p))


def test_auc_is_undefined_for_one_class_and_youden_picks_the_gap():
    assert np.isnan(metrics.auc(np.zeros(5), np.linspace(0, 1, 5)))
    y = np.zeros((6, 8))
    y[3:, 0] = 1
    p = np.zeros((6, 8))
    p[:, 0] = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]
    threshold = metrics.youden_threshold(y, p)
    assert 0.3 < threshold <= 0.7


def test_dice_and_iou_from_the_label_confusion():
    true = np.array([0, 1, 1, 2, 2, 2, 0, 0])
    pred = np.array([0, 1, 2, 2, 2, 0, 0, 1])
    confusion = metrics.label_confusion(true, pred)
    assert confusion.sum() == len(true) and confusion[2, 2] == 2
    out = metrics.dice_iou(confusion)
    assert out["dice_C1"] == pytest.approx(2 * 1 / (2 + 2))
    assert out["iou_C1"] == pytest.approx(1 / 3)
    assert out["dice_C2"] == pytest.approx(2 * 2 / (3 + 3))
    assert np.isnan(out["dice_C5"]) and np.isnan(out["iou_C5"])
