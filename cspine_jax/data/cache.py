"""The prepared cache on disk: one folder of plain .npy arrays + JSON per study.

Layout::

    CACHE/manifest.json                 format version and preprocessing parameters
    CACHE/studies/<uid>/image.npy       (z', G, G, n_windows) uint8 windowed HU
    CACHE/studies/<uid>/mask.npy        (z', G, G) uint8 vertebra labels (masked studies)
    CACHE/studies/<uid>/fracture.npy    (z', G, G) uint8 1 inside fracture boxes
    CACHE/studies/<uid>/meta.json       labels, flags, spacings, where the grid lies on the
                                        source slices (`placement`)
    CACHE/failures-<shard>.json         studies that could not be prepared, with the reason

No pickle anywhere: arrays load with `allow_pickle=False` and memory-map, so the input
pipeline reads only the slices it samples. A study folder appears by an atomic rename of a
finished temporary folder, so an interrupted study never leaves a half entry.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from cspine_jax.data.preprocess import Placement, Prepared

FORMAT_VERSION = 3  # 3: meta.json records the study's placement
_TMP_PREFIX = ".tmp-"


class CacheError(ValueError):
    """The cache is missing, incomplete or was prepared with other parameters."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One prepared study.

    Attributes:
      uid: StudyInstanceUID.
      path: its folder in the cache.
      labels: (8,) float32 `[patient_overall, C1..C7]`, or None (unlabelled test study).
      has_mask: whether mask.npy exists.
      has_boxes: whether the study had fracture boxes.
      num_slices: z' of the prepared grid.
    """

    uid: str
    path: str
    labels: np.ndarray | None
    has_mask: bool
    has_boxes: bool
    num_slices: int

    def image(self) -> np.ndarray:
        """(z', G, G, n_windows) uint8, memory-mapped."""
        return np.load(os.path.join(self.path, "image.npy"), mmap_mode="r", allow_pickle=False)

    def mask(self) -> np.ndarray | None:
        """(z', G, G) uint8, memory-mapped, or None."""
        if not self.has_mask:
            return None
        return np.load(os.path.join(self.path, "mask.npy"), mmap_mode="r", allow_pickle=False)

    def fracture(self) -> np.ndarray:
        """(z', G, G) uint8 fracture-box mask, memory-mapped."""
        return np.load(os.path.join(self.path, "fracture.npy"), mmap_mode="r", allow_pickle=False)

    def slice_fracture(self) -> np.ndarray:
        """(z',) float32: 1 where a fracture box touches the slice."""
        return np.asarray(self.fracture()).any(axis=(1, 2)).astype(np.float32)

    def placement(self) -> Placement | None:
        """Where the study's grid lies on its source slices (`preprocess.Placement`); None
        for a study written without one."""
        with open(os.path.join(self.path, "meta.json")) as f:
            placement = json.load(f)["placement"]
        return None if placement is None else Placement.from_json(placement)


def _write_json(path: str, payload: Any) -> None:
    """Writes JSON atomically: readers see the old file or the new one, never a torn one."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=_TMP_PREFIX, suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_cache(
    cache_dir: str,
    params: Mapping[str, Any],
    source: str,
    *,
    out_flag: str = "--out",
    data_flag: str = "--data",
) -> None:
    """Creates the cache folder, or checks that it was prepared from the same `source` folder
    with the same `params`; a mismatch names the flags (`out_flag`, `data_flag`) to change.

    Also removes temporary folders that an interrupted run left behind.
    """
    source = os.path.abspath(source)
    manifest_path = os.path.join(cache_dir, "manifest.json")
    manifest = {
        "format_version": FORMAT_VERSION,
        "params": json.loads(json.dumps(params)),
        "source": source,
    }
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            found = json.load(f)
        expected = {k: manifest[k] for k in ("format_version", "params")}
        if {k: found.get(k) for k in expected} != expected:
            raise CacheError(
                f"{cache_dir}: prepared with {found.get('params')} (format "
                f"{found.get('format_version')}), not {params}; prepare with the same --config "
                f"as training, or use another {out_flag}"
            )
        if found.get("source", source) != source:
            raise CacheError(
                f"{cache_dir}: prepared from {found['source']}, not {source}; pass "
                f"{data_flag}={found['source']} to use it, or another {out_flag}"
            )
    else:
        os.makedirs(cache_dir, exist_ok=True)
        _write_json(manifest_path, manifest)
    studies = os.path.join(cache_dir, "studies")
    os.makedirs(studies, exist_ok=True)
    for name in os.listdir(studies):
        if name.startswith(_TMP_PREFIX):
            shutil.rmtree(os.path.join(studies, name), ignore_errors=True)


def read_params(cache_dir: str) -> dict[str, Any]:
    """The preprocessing parameters a cache was prepared with."""
    path = os.path.join(cache_dir, "manifest.json")
    if not os.path.exists(path):
        raise CacheError(f"{cache_dir}: no manifest.json; run cspine_jax.data.prepare first")
    with open(path) as f:
        return json.load(f)["params"]


def study_dir(cache_dir: str, uid: str) -> str:
    return os.path.join(cache_dir, "studies", uid)


def has_entry(cache_dir: str, uid: str) -> bool:
    return os.path.exists(os.path.join(study_dir(cache_dir, uid), "meta.json"))


def write_entry(
    cache_dir: str,
    uid: str,
    prepared: Prepared,
    labels: np.ndarray | None,
    has_boxes: bool,
    extra: Mapping[str, Any],
) -> None:
    """Writes one study into a temporary folder, then renames it into place."""
    final = study_dir(cache_dir, uid)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=_TMP_PREFIX + uid + "-")
    try:
        np.save(os.path.join(tmp, "image.npy"), prepared.image)
        if prepared.mask is not None:
            np.save(os.path.join(tmp, "mask.npy"), prepared.mask)
        np.save(os.path.join(tmp, "fracture.npy"), prepared.fracture)
        meta = {
            "uid": uid,
            "labels": None if labels is None else [float(v) for v in labels],
            "has_mask": prepared.mask is not None,
            "has_boxes": bool(has_boxes),
            "num_slices": int(prepared.image.shape[0]),
            "spacing": list(prepared.spacing),
            "placement": None if prepared.placement is None else prepared.placement.to_json(),
            **extra,
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        if os.path.exists(final):  # a stale entry without meta.json
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_entries(cache_dir: str) -> list[Entry]:
    """Every finished study of the cache, sorted by uid."""
    read_params(cache_dir)
    studies = os.path.join(cache_dir, "studies")
    entries = []
    for uid in sorted(os.listdir(studies)):
        if uid.startswith(_TMP_PREFIX) or not has_entry(cache_dir, uid):
            continue
        with open(os.path.join(studies, uid, "meta.json")) as f:
            meta = json.load(f)
        labels = None if meta["labels"] is None else np.asarray(meta["labels"], np.float32)
        entries.append(
            Entry(
                uid,
                os.path.join(studies, uid),
                labels,
                meta["has_mask"],
                meta["has_boxes"],
                meta["num_slices"],
            )
        )
    if not entries:
        raise CacheError(f"{cache_dir}: no prepared studies")
    return entries


def write_failures(cache_dir: str, shard: int, failures: Mapping[str, str]) -> str:
    """Records the studies a run could not prepare; returns the report's path."""
    path = os.path.join(cache_dir, f"failures-{shard}.json")
    _write_json(path, dict(sorted(failures.items())))
    return path
