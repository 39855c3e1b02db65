"""How well a fracture map ranks held-out slices and studies, scored one way for every model.

`benchmarks/fracture_detector.py` (the map alone) and `benchmarks/map_side_by_side.py` (the
single model's map against it) score a map by the same rules: a slice by the mean of its
8 highest pixel probabilities, a study by the mean of its 2 highest slice scores over every
slice; slice AUC over box slices against other slices (`box_slices`), study AUC over
patient_overall.
"""

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from cspine_jax.data import cache, pipeline

# (N, G, G, C) float32 slices in [0, 1] -> (N, h, w) fracture probabilities.
MapFn = Callable[[np.ndarray], np.ndarray]


def box_slices(
    entries: Sequence[cache.Entry], rng, context: int, negatives_per_study: int = 12
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every box slice of the positive studies plus 4 others, and `negatives_per_study`
    random slices of each negative one: (N, G, G, K * W) uint8 stacks, (N, G, G) uint8 box
    masks, (N,) the index of each slice's study in `entries`, (N,) its relative position in
    the study (`pipeline.add_position`)."""
    inputs, targets, owners, positions = [], [], [], []
    for i, e in enumerate(entries):
        image, boxes = np.asarray(e.image()), np.asarray(e.fracture())
        on_box = boxes.any(axis=(1, 2))
        if e.labels[0] and on_box.any():
            z = np.concatenate([np.flatnonzero(on_box), rng.choice(np.flatnonzero(~on_box), 4)])
        elif e.labels[0]:
            continue  # a positive study without boxes: its fracture pixels are unknown
        else:
            z = rng.choice(len(image), negatives_per_study)
        inputs.append(pipeline.stack_context(image, z, context))
        targets.append(boxes[z])
        owners.append(np.full(len(z), i))
        positions.append(z / max(len(image) - 1, 1))
    return tuple(np.concatenate(x) for x in (inputs, targets, owners, positions))


def slice_scores(predict: MapFn, stacks: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Mean of each slice's 8 highest pixel probabilities; stacks (N, G, G, K * W) uint8 and
    positions (N,) as `box_slices` gives them."""
    probs = []
    for i in range(0, len(stacks), 64):
        x = stacks[i : i + 64].astype(np.float32) / np.float32(255.0)
        plane = np.broadcast_to(
            positions[i : i + 64, None, None, None].astype(np.float32), (*x.shape[:3], 1)
        )
        probs.append(np.asarray(predict(np.concatenate([x, plane], axis=-1))))
    probs = np.concatenate(probs)
    return np.sort(probs.reshape(len(probs), -1), axis=1)[:, -8:].mean(axis=1)


def study_auc(predict: MapFn, entries: Sequence[cache.Entry], context: int) -> float:
    """patient_overall AUC of the studies scored by their 2 highest slice scores."""
    scores = []
    for e in entries:
        image = np.asarray(e.image())
        z = np.arange(len(image))
        s = slice_scores(
            predict, pipeline.stack_context(image, z, context), z / max(len(image) - 1, 1)
        )
        scores.append(np.sort(s)[-2:].mean())
    return float(roc_auc_score([e.labels[0] for e in entries], scores))


def slice_auc(predict: MapFn, stacks: np.ndarray, boxes: np.ndarray, positions) -> float:
    """AUC of `slice_scores` over the slices with a box against the others."""
    return float(roc_auc_score(boxes.any(axis=(1, 2)), slice_scores(predict, stacks, positions)))
