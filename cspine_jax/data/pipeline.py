"""Grain input pipeline: prepared studies -> batches of 2.5D slice stacks.

One example is one study: S slice centres drawn along z (evenly spaced bins, jittered in
training; S = `num_slices`, outside training `eval_slices` where the config has it), each
with its K neighbours stacked as channels. Every transform is a `MapDataset` transform
keyed by the element's index, so the stream is a pure function of (seed, step): deterministic
for any worker count, and an iterator state of a few integers restores it exactly.

Example (leading batch dim B after batching):
  image:          float32 (S, G, G, K * n_windows + 1) windowed HU in ~[0, 1], channel
                  order (slice offset -K//2..K//2, window), then the slice's relative z
                  position (0 superior .. 1 inferior; see `add_position`)
  mask:           int32   (S, G, G) centre-slice vertebra label, 0 bg / 1-7 C1-C7 (thoracic -> 0)
  has_mask:       float32 ()  1 where the study has a segmentation
  fracture:       int32   (S, G, G) 1 inside the centre slice's fracture boxes
  slice_fracture: float32 (S,) 1 where a fracture box touches the slice
  has_boxes:      float32 ()
  labels:         float32 (8,) [patient_overall, C1..C7] (zeros for unlabelled studies)
  valid:          float32 (S,) 1 for real slices
  z:              float32 (S,) each slice's index in the prepared study (its z position in
                  units of spacing_z, for the model's z-context)
  warp:           float32 (4,) in-plane warp the train step applies (`augment.apply_warp`):
                  rotation (rad), scale, shift y, x (pixels); `NO_WARP` outside training
  study_index:    int32   () the study's index in the entry list given to the dataset
Training examples also carry the fracture stream (`data.stream`): F = stream.slices / B
slices drawn independently across every training study whose fractures are located, a
share `stream.boxed` of them touched by a box (`FracturePool`, `StreamSlices`):
  stream_image:    float32 (F, G, G, C) as `image`, each slice flipped and jittered alone
  stream_fracture: int32   (F, G, G) 1 inside the slice's fracture boxes
  stream_warp:     float32 (F, 4) each slice's own in-plane warp
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from cspine_jax.data import cache
from cspine_jax.data.rsna import NUM_VERTEBRAE

# The `warp` of an example that is not warped: angle, scale, shift y, shift x.
NO_WARP = np.array([0.0, 1.0, 0.0, 0.0], np.float32)


def sample_centres(
    num_slices: int,
    count: int,
    rng: np.random.Generator | None,
    focus: np.ndarray | None = None,
    focus_prob: float = 0.0,
) -> np.ndarray:
    """(count,) int64 slice indices, one per equal bin along z; bin middles when rng is None.

    With `focus` ((num_slices,) flags, e.g. slices a fracture box touches), a bin holding
    flagged slices takes one of them with probability `focus_prob`: the study is still seen
    from top to bottom, but its fracture is rarely skipped by the sampling.
    """
    edges = np.linspace(0.0, num_slices, count + 1)
    fraction = 0.5 if rng is None else rng.random(count)
    centres = np.floor(edges[:-1] + fraction * (edges[1:] - edges[:-1]))
    centres = centres.astype(np.int64).clip(0, num_slices - 1)
    if rng is not None and focus is not None and focus_prob > 0 and focus.any():
        flagged = np.flatnonzero(focus)
        bins = np.searchsorted(edges, flagged + 0.5) - 1
        draws = rng.random(count)
        for b in np.unique(bins):
            if draws[b] < focus_prob:
                centres[b] = rng.choice(flagged[bins == b])
    return centres


def stack_context(image: np.ndarray, centres: np.ndarray, context: int) -> np.ndarray:
    """(z', G, G, W) uint8 volume -> (S, G, G, K * W) stacks around `centres` (edge-clamped)."""
    offsets = np.arange(context) - context // 2
    index = (centres[:, None] + offsets[None, :]).clip(0, image.shape[0] - 1)
    stacks = np.asarray(image[index.ravel()]).reshape(len(centres), context, *image.shape[1:])
    s, k, h, w, c = stacks.shape
    return stacks.transpose(0, 2, 3, 1, 4).reshape(s, h, w, k * c)


def add_position(stacks: np.ndarray, centres: np.ndarray, num_slices: int) -> np.ndarray:
    """(S, G, G, C) float32 -> (S, G, G, C + 1): a last channel holding each slice's relative
    position along the study, 0 at the most superior slice and 1 at the most inferior.

    Three adjacent axial slices rarely tell C4 from C5; where the slice sits in the scan
    does, so the segmentation (hence the vertebra presence that pools the study) gets it.
    """
    position = centres.astype(np.float32) / np.float32(max(num_slices - 1, 1))
    plane = np.broadcast_to(position[:, None, None, None], (*stacks.shape[:3], 1))
    return np.concatenate([stacks, plane], axis=-1)


def slice_inputs(image: np.ndarray, centres: np.ndarray, context: int) -> np.ndarray:
    """The model's input for `centres` of a prepared (z', G, G, W) uint8 study:
    (S, G, G, K * W + 1) float32 windowed stacks in [0, 1] plus the position channel."""
    stacks = stack_context(image, centres, context).astype(np.float32) / np.float32(255.0)
    return add_position(stacks, centres, image.shape[0])


def chunk_inputs(
    image: np.ndarray, start: int, chunk: int, context: int
) -> tuple[np.ndarray, np.ndarray]:
    """Slices start .. start + chunk of a prepared study as model input, zero-padded to
    `chunk` rows so one compiled program serves every chunk: ((chunk, G, G, C), centres)."""
    centres = np.arange(start, min(start + chunk, image.shape[0]))
    inputs = slice_inputs(image, centres, context)
    padded = np.zeros((chunk, *inputs.shape[1:]), np.float32)
    padded[: len(centres)] = inputs
    return padded, centres


def _augment(
    image: np.ndarray,
    labels: tuple[np.ndarray, ...],
    rng: np.random.Generator,
    aug: Mapping[str, Any],
) -> tuple[np.ndarray, tuple[np.ndarray, ...], np.ndarray]:
    """One random flip and intensity change for the whole study, and its in-plane warp.

    image (S, G, G, C) float32; labels: (S, G, G) integer maps flipped alike. The warp
    (rotation, scale, shift; `augment.apply_warp`) is only drawn here: the train step applies
    it on the device, where it is cheap. Returns (image, labels, warp (4,) float32).
    """
    if aug["flip"] and rng.random() < 0.5:
        image, labels = image[:, :, ::-1], tuple(x[:, :, ::-1] for x in labels)
    shift = aug["shift"] * image.shape[1]
    warp = np.array(
        [
            np.deg2rad(rng.uniform(-aug["rotate_deg"], aug["rotate_deg"])),
            1.0 + rng.uniform(-aug["scale"], aug["scale"]),
            rng.uniform(-shift, shift),
            rng.uniform(-shift, shift),
        ],
        np.float32,
    )
    gain = 1.0 + rng.uniform(-aug["intensity"], aug["intensity"])
    bias = rng.uniform(-aug["intensity"], aug["intensity"])
    image = image * np.float32(gain) + np.float32(bias)
    if aug["noise"]:
        image += np.float32(aug["noise"]) * rng.standard_normal(image.shape, np.float32)
    return image, tuple(np.ascontiguousarray(x) for x in labels), warp


@dataclasses.dataclass(frozen=True)
class FracturePool:
    """Where the fracture stream draws its slices: (entry index, slice) rows over the
    studies whose fractures are located (boxes, or a negative study: none).

    Attributes:
      entries: the training entries the rows index.
      boxed: (n, 2) int64, every slice a fracture box touches.
      clear: (m, 2) int64, every other slice of those studies: negatives, among them the
        look-alikes of intact vertebrae and the intact levels of fractured studies.
    """

    entries: Sequence[cache.Entry]
    boxed: np.ndarray
    clear: np.ndarray

    @classmethod
    def of(cls, entries: Sequence[cache.Entry]) -> FracturePool:
        """The pool of `entries`; a positive study without boxes gives no row (its fracture
        pixels are unknown)."""
        boxed, clear = [], []
        for i, entry in enumerate(entries):
            positive = entry.labels is not None and entry.labels[0] > 0
            if positive and not entry.has_boxes:
                continue
            on_box = entry.slice_fracture() > 0
            for rows, where in ((boxed, on_box), (clear, ~on_box)):
                z = np.flatnonzero(where)
                rows.append(np.stack([np.full(len(z), i), z], axis=1))
        stack = lambda rows: np.concatenate(rows or [np.zeros((0, 2))]).astype(np.int64)  # noqa: E731
        return cls(entries, stack(boxed), stack(clear))


class StreamSlices(grain.transforms.RandomMap):
    """Any element -> `count` slices of a `FracturePool` drawn independently, each boxed with
    probability `boxed`, each flipped, jittered and given a warp on its own (`_augment`):
    stream_image (F, G, G, C) as a study's `image`, stream_fracture (F, G, G) int32 box
    masks, stream_warp (F, 4)."""

    def __init__(
        self, pool: FracturePool, count: int, data_config: Mapping[str, Any], boxed: float
    ):
        if not (len(pool.boxed) and len(pool.clear)):
            raise ValueError(
                f"the fracture stream needs boxed and clear slices; the training studies give "
                f"{len(pool.boxed)} and {len(pool.clear)} (data.stream.slices=0 trains "
                "without it)"
            )
        self.pool, self.count, self.boxed = pool, count, boxed
        self.context = int(data_config["context"])
        self.augment = dict(data_config["augment"])

    def random_map(self, element: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        del element
        images, fractures, warps = [], [], []
        for _ in range(self.count):
            rows = self.pool.boxed if rng.random() < self.boxed else self.pool.clear
            index, z = rows[rng.integers(len(rows))]
            entry, centre = self.pool.entries[index], np.array([z])
            image = entry.image()
            stack = stack_context(image, centre, self.context).astype(np.float32) / 255.0
            stack, (fracture,), warp = _augment(
                stack, (np.asarray(entry.fracture()[centre]),), rng, self.augment
            )
            images.append(add_position(stack, centre, image.shape[0])[0])
            fractures.append(fracture[0].astype(np.int32))
            warps.append(warp)
        return {
            "stream_image": np.stack(images),
            "stream_fracture": np.stack(fractures),
            "stream_warp": np.stack(warps),
        }


def sampling_fields(
    data_config: Mapping[str, Any], train: bool
) -> tuple[int, dict[str, Any] | None, float]:
    """What every study sampler (`SampleStudy`, `vertebrae.SampleStudyStacks`) reads of the
    data config: (context: K slices per stack, augment: its settings in training else
    None, fracture_focus: the share of training samples drawn around a fracture)."""
    augment = dict(data_config["augment"]) if train else None
    return int(data_config["context"]), augment, float(data_config["fracture_focus"])


def study_fields(index: int, entry: cache.Entry) -> dict[str, np.ndarray]:
    """The fields every study example holds, whatever its sampler: labels (8,) float32
    `[patient_overall, C1..C7]` (zeros for an unlabelled study), has_boxes () float32,
    study_index () int32 (the entry's index)."""
    labels = np.zeros(8, np.float32) if entry.labels is None else entry.labels
    return {
        "labels": labels.astype(np.float32),
        "has_boxes": np.float32(entry.has_boxes),
        "study_index": np.int32(index),
    }


class SampleStudy(grain.transforms.RandomMap):
    """cache.Entry (+ its index) -> one training or evaluation example (see module doc);
    with a `StreamSlices`, plus its fracture-stream slices (training)."""

    def __init__(
        self, data_config: Mapping[str, Any], train: bool, stream: StreamSlices | None = None
    ):
        # Evaluation examples may see more of a study than training ones (`eval_slices`).
        self.num_slices = int(data_config["num_slices" if train else "eval_slices"])
        self.context, self.augment, self.fracture_focus = sampling_fields(data_config, train)
        self.stream = stream

    def random_map(
        self, element: tuple[int, cache.Entry], rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        index, entry = element
        image = entry.image()
        if self.augment is None:
            centres = sample_centres(image.shape[0], self.num_slices, None)
        else:
            centres = sample_centres(
                image.shape[0],
                self.num_slices,
                rng,
                entry.slice_fracture() > 0,
                self.fracture_focus,
            )
        stacks = stack_context(image, centres, self.context).astype(np.float32) / 255.0
        volume_mask = entry.mask()
        if volume_mask is None:
            mask = np.zeros(stacks.shape[:3], np.uint8)
        else:
            mask = np.asarray(volume_mask[centres])
            mask = np.where(mask <= NUM_VERTEBRAE, mask, 0).astype(np.uint8)
        fracture = np.asarray(entry.fracture()[centres])
        warp = NO_WARP
        if self.augment is not None:
            stacks, (mask, fracture), warp = _augment(stacks, (mask, fracture), rng, self.augment)
        stacks = add_position(stacks, centres, image.shape[0])
        return {
            **study_fields(index, entry),
            "image": stacks,
            "mask": mask.astype(np.int32),
            "has_mask": np.float32(entry.has_mask),
            "fracture": fracture.astype(np.int32),
            "slice_fracture": fracture.any(axis=(1, 2)).astype(np.float32),
            "valid": np.ones(self.num_slices, np.float32),
            "z": centres.astype(np.float32),
            "warp": warp,
            **(self.stream.random_map(element, rng) if self.stream is not None else {}),
        }


def _with_index(entries: Sequence[cache.Entry]) -> list[tuple[int, cache.Entry]]:
    return list(enumerate(entries))


def oversampled(
    entries: Sequence[cache.Entry], factor: float, seed: int, masked_factor: float = 1.0
) -> list[int]:
    """Entry indices with each positive study repeated ~`factor` times and each study with a
    segmentation ~`masked_factor` times (both: their product; 1.0: no change)."""
    rng = np.random.default_rng(seed)
    order = []
    for i, entry in enumerate(entries):
        positive = entry.labels is not None and entry.labels[0] > 0
        weight = (factor if positive else 1.0) * (masked_factor if entry.has_mask else 1.0)
        copies = int(np.floor(weight)) + int(rng.random() < weight - np.floor(weight))
        order += [i] * copies
    return order


def train_dataset(
    entries: Sequence[cache.Entry],
    data_config: Mapping[str, Any],
    *,
    seed: int,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    sample: grain.transforms.RandomMap | None = None,
) -> grain.MapDataset:
    """Infinite, shuffled, augmented batches of studies (`train_stream` over the entries,
    positive studies oversampled by `positive_oversample`, studies with a segmentation by
    `mask_oversample`).

    `sample` turns an (index, entry) into an example; default `SampleStudy` in training mode
    with the fracture stream of `data.stream` drawn from these entries.
    """
    if sample is None:
        slices = int(data_config["stream"]["slices"])
        if slices % global_batch:
            raise ValueError(
                f"data.stream.slices={slices} does not split over a batch of {global_batch}"
            )
        stream = None
        if slices:
            stream = StreamSlices(
                FracturePool.of(entries),
                slices // global_batch,
                data_config,
                float(data_config["stream"]["boxed"]),
            )
        sample = SampleStudy(data_config, True, stream)
    indexed = _with_index(entries)
    order = oversampled(
        entries,
        float(data_config["positive_oversample"]),
        seed,
        float(data_config["mask_oversample"]),
    )
    return train_stream(
        [indexed[i] for i in order],
        sample,
        seed=seed,
        global_batch=global_batch,
        process_index=process_index,
        process_count=process_count,
    )


def train_stream(
    elements: Sequence[Any],
    sample: grain.transforms.RandomMap,
    *,
    seed: int,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Infinite batches of `sample(element)` over `elements` shuffled anew each epoch: this
    process's share of each global batch.

    Process p takes elements p, p + P, p + 2P, ... of the global stream, so the union over
    processes of step t's batches is exactly the global batch t of a single process.
    """
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} not divisible by {process_count} processes")
    ds = grain.MapDataset.source(list(elements)).shuffle(seed=seed).repeat(None)
    ds = ds.random_map(sample, seed=seed)
    ds = ds[process_index::process_count]
    return ds.batch(global_batch // process_count, drop_remainder=True)


def eval_dataset(
    entries: Sequence[cache.Entry],
    data_config: Mapping[str, Any],
    batch_size: int,
    sample: grain.transforms.RandomMap | None = None,
) -> grain.MapDataset:
    """One deterministic pass over `entries` (evenly spaced slices, no augmentation);
    `sample` as in `train_dataset`, default `SampleStudy` in evaluation mode."""
    ds = grain.MapDataset.source(_with_index(entries))
    ds = ds.random_map(sample or SampleStudy(data_config, train=False), seed=0)
    return ds.batch(batch_size, drop_remainder=False)


def iterate(ds: grain.MapDataset, workers: int = 0, prefetch: int = 2) -> grain.DatasetIterator:
    """An iterator with `get_state`/`set_state` that prepares `prefetch` batches ahead.

    `workers` > 0 prepares them in that many processes, else in one background thread.
    """
    # Grain's default reads 500 elements ahead on 16 threads: here an element is a whole
    # batch of studies (~75 MB), so that would hold gigabytes and starve the train step.
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
    if workers > 0:
        # Grain's workers read its absl flags; outside an absl app nobody parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(it_ds)
