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
    out = metrics.study_metrics(y, p, thresholds=0.5)
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
    assert out["mean_prob_fractured"] == pytest.approx(p[y[:, 0] > 0, 0].mean())
    assert out["mean_prob_intact"] == pytest.approx(p[y[:, 0] == 0, 0].mean())
    assert out["competition_loss"] == pytest.approx(_direct(y, p))


def test_auc_is_undefined_for_one_class_and_youden_picks_the_gap():
    assert np.isnan(metrics.auc(np.zeros(5), np.linspace(0, 1, 5)))
    y = np.zeros((6, 8))
    y[3:, 0] = 1
    p = np.zeros((6, 8))
    p[:, 0] = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]
    threshold = metrics.decision_thresholds(y, p)["patient_overall"]
    assert 0.3 < threshold <= 0.7


def _youden_by_search(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """(best J, J of each candidate threshold) over every predicted value as threshold."""
    y = y > 0.5
    candidates = np.unique(p)
    j = [np.mean(p[y] >= t) - np.mean(p[~y] >= t) for t in candidates]
    return max(j), dict(zip(candidates.tolist(), j, strict=True))


def _labels_and_probs(seed: int = 2, n: int = 300):
    """y (n, 8) with patient_overall = any vertebra; p where each label separates its
    classes around its own level: patient_overall around 0.7, C3 around 0.1."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 8)) < 0.25).astype(np.float64)
    y[:, 0] = y[:, 1:].max(axis=1)
    centre = np.array([0.7, 0.5, 0.4, 0.1, 0.6, 0.3, 0.5, 0.8])
    p = np.clip(centre + np.where(y > 0.5, 0.08, -0.08) + rng.normal(0, 0.05, y.shape), 0, 1)
    return y, p


def test_decision_thresholds_are_each_labels_youden():
    y, p = _labels_and_probs()
    thresholds = metrics.decision_thresholds(y, p)
    assert list(thresholds) == ["patient_overall", "C1", "C2", "C3", "C4", "C5", "C6", "C7"]
    for j, (name, t) in enumerate(thresholds.items()):
        best, by_threshold = _youden_by_search(y[:, j], p[:, j])
        assert t in by_threshold, name  # one of the label's own predicted values
        assert by_threshold[t] == pytest.approx(best, abs=1e-12), name
    assert thresholds["patient_overall"] == metrics.youden(y[:, 0], p[:, 0])
    # C3's decision sits near 0.1, far from patient_overall's near 0.7.
    assert thresholds["C3"] < 0.25 and thresholds["patient_overall"] > 0.55

    per_label = metrics.study_metrics(y, p, thresholds)
    shared = metrics.study_metrics(y, p, thresholds["patient_overall"])
    assert per_label["threshold"] == shared["threshold"] == thresholds["patient_overall"]
    assert [per_label[f"threshold_C{v}"] for v in range(1, 8)] == [
        thresholds[f"C{v}"] for v in range(1, 8)
    ]
    assert per_label["macro_f1"] > shared["macro_f1"] + 0.2
    assert per_label["macro_f1"] > 0.8 and per_label["exact_match"] > shared["exact_match"]
    # Each vertebra decides by its own threshold; sensitivity/specificity by patient_overall's.
    pred = p[:, 1:] >= np.array([thresholds[f"C{v}"] for v in range(1, 8)])
    assert per_label["macro_f1"] == pytest.approx(skm.f1_score(y[:, 1:], pred, average="macro"))
    assert per_label["exact_match"] == pytest.approx(skm.accuracy_score(y[:, 1:], pred))
    tn, fp, fn, tp = skm.confusion_matrix(y[:, 0], p[:, 0] >= thresholds["patient_overall"]).ravel()
    assert per_label["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert per_label["specificity"] == pytest.approx(tn / (tn + fp))
    assert per_label["sensitivity"] == shared["sensitivity"]


def test_one_class_labels_fall_back_and_say_why():
    y, p = _labels_and_probs(n=40)
    y[:, 3] = 0  # C3: only negatives
    thresholds = metrics.decision_thresholds(y, p)
    assert thresholds["C3"] == thresholds["patient_overall"]
    assert metrics.youden(y[:, 3], p[:, 3]) is None
    positives = {name: y[:, j].sum() for j, name in enumerate(metrics.LABEL_COLUMNS)}
    fallbacks = metrics.threshold_fallbacks(positives, len(y), "the held-out fold")
    assert list(fallbacks) == ["C3"] and "only negatives on the held-out fold" in fallbacks["C3"]
    none_positive = np.zeros_like(y)
    fallback = metrics.decision_thresholds(none_positive, p)["patient_overall"]
    assert fallback == metrics.FALLBACK_THRESHOLD == 0.5

    values = metrics.study_metrics(y, p, thresholds)
    assert np.isnan(values["auc_C3"]) and values["positives_C3"] == 0 and values["studies"] == 40
    reasons = metrics.undefined_reasons(values)
    assert reasons == {"auc_C3": "only negatives on these 40 studies"}
    # No positive study at all: sensitivity is undefined, not 0.
    negatives = metrics.study_metrics(none_positive, p, 0.5)
    assert np.isnan(negatives["sensitivity"]) and np.isnan(negatives["auc_mean_vertebra"])
    background_only = np.zeros((8, 8))
    background_only[0, 0] = 5
    reasons = metrics.undefined_reasons({**negatives, **metrics.dice_iou(background_only)})
    assert reasons["sensitivity"].startswith("no positive")
    assert reasons["mean_prob_fractured"].startswith("no positive")
    assert reasons["auc_C7"] == "only negatives on these 40 studies"
    assert "auc_mean_vertebra" in reasons and "specificity" not in reasons
    assert reasons["dice_C4"] == "C4 neither in the masks nor predicted"
    with pytest.raises(ValueError, match="C7"):
        metrics.study_metrics(y, p, {k: v for k, v in thresholds.items() if k != "C7"})
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        metrics.study_metrics(y, p, {**thresholds, "C2": float("nan")})


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
