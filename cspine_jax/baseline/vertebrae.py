"""Vertebra-wise slice stacks: the input of the two-stage baseline's classifier (stage 2).

Stage 1 (a segmenter) labels every prepared slice of a study: `Located` holds, per slice, the
share of its pixels labelled as each vertebra and, per vertebra, the in-plane box of those
pixels. A vertebra's stack is T slices sampled along the slices where stage 1 finds it (one
per equal bin, as `pipeline.sample_centres`; in training jittered and drawn to boxed fracture
slices as the single model's are), each with its K neighbours as channels, cropped in-plane to
the vertebra's box and resampled to c x c pixels. Training and inference build stacks with the
same function, `vertebra_stack`.

A study example (`SampleStudyStacks`: evaluation, and training with stage2.example 'study'),
with leading batch dim B after batching:
  image:        float32 (7, T, c, c, K * n_windows + 1) windowed HU in ~[0, 1], then the
                slice's relative z position (`pipeline.add_position`)
  found:        float32 (7,) 1 where stage 1 found the vertebra (else its stack is all zeros)
  warp:         float32 (7, 4) each stack's in-plane warp, applied in the train step
                (`augment.apply_warp`); `pipeline.NO_WARP` outside training
  labels:       float32 (8,) [patient_overall, C1..C7] (zeros for unlabelled studies)
  study_index:  int32   () the study's index in the entry list given to the dataset
A vertebra example (`SampleVertebraStack`: training with stage2.example 'vertebra') is one found
vertebra's stack: image (T, c, c, C), warp (4,), level int32 () 0-6, label float32 () its
C1..C7 label, study_index.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from cspine_jax.data import cache, pipeline
from cspine_jax.data.rsna import NUM_VERTEBRAE


@dataclasses.dataclass(frozen=True)
class Located:
    """Stage 1's reading of one study.

    Attributes:
      area: (z', 7) float32 share of each slice's pixels labelled C1..C7.
      boxes: (7, 4) float32 (y0, x0, y1, x1) as fractions of the field of view: the box of the
        pixels labelled as each vertebra on its slices; the whole field where it has none.
    """

    area: np.ndarray
    boxes: np.ndarray


def vertebra_slices(area: np.ndarray, min_area: float) -> list[np.ndarray]:
    """(z', 7) area -> for each of C1..C7 the (ascending) slices where it covers at least
    `min_area` of the slice: a vertebra is on a slice if stage 1 labels a blob of it there,
    not a few stray pixels."""
    return [np.flatnonzero(area[:, v] >= min_area) for v in range(NUM_VERTEBRAE)]


def locate(segmentation: np.ndarray, min_area: float) -> Located:
    """Stage 1's labels of a study (z', h, w) (0 bg, 1-7 C1-C7, any stride) -> `Located`.

    From the labels, not from a thresholded class probability: a segmenter still learning
    spreads its probabilities (C3 at 0.35 where it is, 0.2 where it is not) while its argmax is
    already in place.
    """
    segmentation = np.asarray(segmentation)
    h, w = segmentation.shape[1:]
    area = np.stack(
        [(segmentation == v + 1).mean(axis=(1, 2)) for v in range(NUM_VERTEBRAE)], axis=-1
    ).astype(np.float32)
    boxes = np.tile(np.array([0.0, 0.0, 1.0, 1.0], np.float32), (NUM_VERTEBRAE, 1))
    for v, slices in enumerate(vertebra_slices(area, min_area)):
        pixels = (segmentation[slices] == v + 1).any(axis=0)
        if pixels.any():
            rows, cols = np.flatnonzero(pixels.any(axis=1)), np.flatnonzero(pixels.any(axis=0))
            boxes[v] = np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1]) / [h, w, h, w]
    return Located(area, boxes)


def crop_box(stacks: np.ndarray, box: np.ndarray, margin: float, size: int) -> np.ndarray:
    """(T, G, G, C) -> (T, size, size, C): the square around `box` (fractions (y0, x0, y1, x1)),
    widened by `margin` times its side on each side, resampled bilinearly.

    The square is at least `size` pixels (a small vertebra is not upsampled: that adds no
    detail) and at most the image; beyond the image the edge pixels repeat.
    """
    g = stacks.shape[1]
    y0, x0, y1, x1 = np.asarray(box, np.float64) * g
    side = min(max(max(y1 - y0, x1 - x0) * (1 + 2 * margin), size), g)

    def taps(centre: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Lower and upper source pixel of each output pixel, and the upper one's weight."""
        pos = centre - side / 2 + (np.arange(size) + 0.5) * side / size - 0.5
        pos = pos.clip(0, g - 1)
        lo = np.floor(pos).astype(np.int64)
        return lo, np.minimum(lo + 1, g - 1), (pos - lo).astype(np.float32)

    lo, hi, wt = taps((y0 + y1) / 2)
    rows = stacks[:, lo] * (1 - wt)[:, None, None] + stacks[:, hi] * wt[:, None, None]
    lo, hi, wt = taps((x0 + x1) / 2)
    return rows[:, :, lo] * (1 - wt)[:, None] + rows[:, :, hi] * wt[:, None]


def vertebra_stack(
    image: np.ndarray,
    slices: np.ndarray,
    box: np.ndarray,
    stacks_config: Mapping[str, Any],
    context: int,
    rng: np.random.Generator | None = None,
    augment: Mapping[str, Any] | None = None,
    focus: np.ndarray | None = None,
    focus_prob: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stack of one vertebra of a prepared study (z', G, G, W) uint8, found by stage 1 on
    `slices` (ascending, non-empty) within `box` -> ((T, c, c, K * W + 1) float32, warp (4,),
    the stack's slice indices (T,)).

    `stacks_config`: num_slices (T), crop (c; 0 keeps the whole G x G slice), margin. With
    `rng` the slices are jittered within their bins, a bin holding `focus` ((z',) flags:
    boxed fracture slices) takes one of those with probability `focus_prob`, and with
    `augment` (`data.augment`) the stack gets the single model's augmentation: flip and
    intensity here, and a warp for the train step.
    """
    centres = slices[
        pipeline.sample_centres(
            len(slices),
            int(stacks_config["num_slices"]),
            rng,
            None if focus is None else focus[slices],
            focus_prob,
        )
    ]
    stack = pipeline.stack_context(image, centres, context).astype(np.float32) / 255.0
    if stacks_config["crop"]:
        stack = crop_box(stack, box, stacks_config["margin"], int(stacks_config["crop"]))
    warp = pipeline.NO_WARP
    if augment is not None:
        stack, _, warp = pipeline._augment(stack, (), rng, augment)
    return pipeline.add_position(stack, centres, image.shape[0]), warp, centres


def study_stacks(
    image: np.ndarray,
    located: Located,
    stacks_config: Mapping[str, Any],
    context: int,
    rng: np.random.Generator | None = None,
    augment: Mapping[str, Any] | None = None,
    focus: np.ndarray | None = None,
    focus_prob: float = 0.0,
) -> tuple[np.ndarray, ...]:
    """A prepared study (z', G, G, W) uint8 and stage 1's `located` -> the seven vertebra
    stacks (7, T, c, c, K * W + 1) float32, found (7,) float32, warps (7, 4) float32 and the
    stacks' slice indices (7, T) int64.

    Each stack as `vertebra_stack` (same arguments; `stacks_config` also has min_area); a
    vertebra stage 1 did not find has an all-zero stack (and slice indices 0).
    """
    count, crop = int(stacks_config["num_slices"]), int(stacks_config["crop"])
    size = crop or image.shape[1]
    out = np.zeros((NUM_VERTEBRAE, count, size, size, context * image.shape[-1] + 1), np.float32)
    found = np.zeros(NUM_VERTEBRAE, np.float32)
    warps = np.tile(pipeline.NO_WARP, (NUM_VERTEBRAE, 1))
    centres = np.zeros((NUM_VERTEBRAE, count), np.int64)
    for v, slices in enumerate(vertebra_slices(located.area, stacks_config["min_area"])):
        if len(slices):
            out[v], warps[v], centres[v] = vertebra_stack(
                image,
                slices,
                located.boxes[v],
                stacks_config,
                context,
                rng,
                augment,
                focus,
                focus_prob,
            )
            found[v] = 1.0
    return out, found, warps, centres


def boxed_slices(entry: cache.Entry) -> np.ndarray | None:
    """(z',) bool: the slices a fracture box touches; None for a study without boxes, whose
    box volume (all zeros) is then not read."""
    return entry.slice_fracture() > 0 if entry.has_boxes else None


def slice_labels(
    entry: cache.Entry, boxed: np.ndarray | None, level: int, centres: np.ndarray
) -> np.ndarray:
    """(T,) float32: 1 where a fracture box touches the slice (`boxed`, `boxed_slices` of the
    study) and vertebra `level` (0-6) is fractured. Boxes do not say which vertebra they are
    on: a boxed slice of a fractured vertebra's stack counts as its fracture, one of an intact
    vertebra's stack does not."""
    if entry.labels is None or boxed is None:
        return np.zeros(len(centres), np.float32)
    return (boxed[centres] * entry.labels[1 + level]).astype(np.float32)


class SampleStudyStacks(grain.transforms.RandomMap):
    """cache.Entry (+ its index) -> one stage-2 example of the whole study (see module doc).

    In training the stacks have `train_slices` slices where the stacks config sets it (else
    num_slices, as outside training): the GRU reads any length."""

    def __init__(
        self,
        located: Mapping[str, Located],
        data_config: Mapping[str, Any],
        stacks_config: Mapping[str, Any],
        train: bool,
    ):
        self.located = dict(located)
        self.stacks = dict(stacks_config)
        if train and self.stacks["train_slices"]:
            self.stacks["num_slices"] = self.stacks["train_slices"]
        self.context, self.augment, self.fracture_focus = pipeline.sampling_fields(
            data_config, train
        )

    def random_map(
        self, element: tuple[int, cache.Entry], rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        index, entry = element
        train = self.augment is not None
        boxed = boxed_slices(entry)  # once: the slice labels and the focus both use it
        stacks, found, warps, centres = study_stacks(
            entry.image(),
            self.located[entry.uid],
            self.stacks,
            self.context,
            rng if train else None,
            self.augment,
            boxed if train else None,
            self.fracture_focus,
        )
        slices = np.stack([slice_labels(entry, boxed, v, centres[v]) for v in range(NUM_VERTEBRAE)])
        return {
            **pipeline.study_fields(index, entry),
            "image": stacks,
            "found": found,
            "warp": warps,
            "slice_fracture": slices * found[:, None],
        }


class SampleVertebraStack(SampleStudyStacks):
    """(index, cache.Entry, vertebra 0-6) -> one stage-2 training example of one vertebra:
    image (T, c, c, C), warp (4,), level int32 (), label float32 () (1: that vertebra is
    fractured), slice_fracture (T,) (`slice_labels`), has_boxes (), study_index int32 ()."""

    def __init__(
        self,
        located: Mapping[str, Located],
        data_config: Mapping[str, Any],
        stacks_config: Mapping[str, Any],
    ):
        super().__init__(located, data_config, stacks_config, train=True)

    def random_map(
        self, element: tuple[int, cache.Entry, int], rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        index, entry, v = element
        located = self.located[entry.uid]
        slices = vertebra_slices(located.area, self.stacks["min_area"])[v]
        boxed = boxed_slices(entry)
        stack, warp, centres = vertebra_stack(
            entry.image(),
            slices,
            located.boxes[v],
            self.stacks,
            self.context,
            rng,
            self.augment,
            boxed,
            self.fracture_focus,
        )
        label = 0.0 if entry.labels is None else entry.labels[1 + v]
        return {
            "image": stack,
            "warp": warp,
            "level": np.int32(v),
            "label": np.float32(label),
            "slice_fracture": slice_labels(entry, boxed, v, centres),
            "has_boxes": np.float32(entry.has_boxes),
            "study_index": np.int32(index),
        }


def vertebra_train_dataset(
    entries: Sequence[cache.Entry],
    located: Mapping[str, Located],
    data_config: Mapping[str, Any],
    stacks_config: Mapping[str, Any],
    *,
    seed: int,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Infinite, shuffled batches of single vertebra stacks (`SampleVertebraStack`): every vertebra
    stage 1 found in every study, shuffled across studies, so that a batch of B stacks comes
    from ~B studies (a detector trained on a few studies' slices a step does not learn:
    README). Sharded over processes as `pipeline.train_dataset`."""
    min_area = stacks_config["min_area"]
    elements = [
        (i, e, v)
        for i, e in enumerate(entries)
        for v, slices in enumerate(vertebra_slices(located[e.uid].area, min_area))
        if len(slices)
    ]
    return pipeline.train_stream(
        elements,
        SampleVertebraStack(located, data_config, stacks_config),
        seed=seed,
        global_batch=global_batch,
        process_index=process_index,
        process_count=process_count,
    )


def save_located(path: str, located: Mapping[str, Located], seconds: float) -> None:
    """Writes stage 1's output for `located` studies (and the seconds it took) as one .npz,
    atomically."""
    arrays = {"seconds": np.float64(seconds)}
    for uid, loc in located.items():
        arrays[f"{uid}.area"], arrays[f"{uid}.boxes"] = loc.area, loc.boxes
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_located(path: str, uids: Sequence[str]) -> tuple[dict[str, Located], float]:
    """The `Located` of each of `uids` from `save_located`'s file, and its seconds."""
    with np.load(path, allow_pickle=False) as f:
        return (
            {uid: Located(f[f"{uid}.area"], f[f"{uid}.boxes"]) for uid in uids},
            float(f["seconds"]),
        )
