"""RSNA-layout folder (real or phantom) -> prepared per-study cache for training.

    python -m cspine_jax.data.prepare --data DIR --out CACHE [--workers N] \
        [--shard i --num_shards n] [--config configs/default.py]

Each study is decoded, aligned with its mask, resampled to the config's grid
(`config.data.grid`, `config.data.spacing_z`, and the in-plane region `config.data.region`:
a `region_mm` square around the spine found in the study, or the central `crop`; see
`preprocess`) and windowed (`config.data.windows`). Each study's meta.json records where its
grid lies on the source slices (`placement`, `preprocess.Placement.to_json`).
Resumable: a rerun skips finished studies. A study that fails is reported and skipped.
Shards split the studies (sorted by uid, study k goes to shard k % n) between machines
that write into one shared cache.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import threadpoolctl
import tqdm

from cspine_jax.data import cache, nifti, preprocess, rsna


def preprocessing_params(data_config: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters that define a cache (and the grid a model was trained on): keyword
    arguments of `preprocess.prepare_series` (and of `read_resampled` but the windows).

    The 'centre' region's are the parameters every cache had before the spine region (no
    `region` key), so a run trained then, whose saved config has no `data.region`, still
    prepares its grid (and finds its caches) as it did.
    """
    params = {"grid": int(data_config["grid"]), "spacing_z": float(data_config["spacing_z"])}
    region = data_config["region"] if "region" in data_config else "centre"
    if region == "spine":
        params.update(region="spine", region_mm=float(data_config["region_mm"]))
    elif region == "centre":
        params.update(crop=float(data_config["crop"]))
    else:
        raise ValueError(f"data.region {region!r}: one of {preprocess.REGIONS}")
    params["windows"] = [[float(c), float(w)] for c, w in data_config["windows"]]
    return params


def prepare_study(study: rsna.Study, cache_dir: str, params: Mapping[str, Any]) -> int:
    """Decodes, aligns, resamples and caches one study; returns its prepared slice count.

    Slices are resampled as they are decoded: the full-resolution HU volume is never built.
    """
    in_plane = {k: params[k] for k in ("crop", "region", "region_mm") if k in params}
    header, hu, placement = preprocess.read_resampled(
        study.image_dir, params["grid"], params["spacing_z"], **in_plane
    )
    mask = None if study.mask_path is None else nifti.load_mask(study.mask_path, header)
    prepared = preprocess.on_grid(
        header,
        hu,
        placement,
        spacing_z=params["spacing_z"],
        windows=params["windows"],
        mask=mask,
        boxes=study.boxes,
    )
    extra = {"source_shape": list(header.shape), "source_spacing": list(header.spacing)}
    cache.write_entry(cache_dir, study.uid, prepared, study.labels, study.has_boxes, extra)
    return prepared.image.shape[0]


def _limit_threads(threads: int) -> None:
    # Each worker is one study at a time; BLAS threads beyond the cores per worker only fight.
    threadpoolctl.threadpool_limits(threads)


def _prepare_one(args: tuple[rsna.Study, str, Mapping[str, Any]]) -> tuple[str, str | None, int]:
    study, cache_dir, params = args
    try:
        return study.uid, None, prepare_study(study, cache_dir, params)
    except Exception as e:  # noqa: BLE001 - one bad study must not stop the other 2,000
        return study.uid, f"{type(e).__name__}: {e}", 0


@dataclasses.dataclass
class Summary:
    """What one prepare run did."""

    prepared: list[str]
    skipped: list[str]
    failed: dict[str, str]
    slices: int
    seconds: float

    def lines(self) -> list[str]:
        out = [
            f"prepared {len(self.prepared)} studies ({self.slices} slices) in "
            f"{self.seconds:.1f} s; skipped {len(self.skipped)} already in the cache; "
            f"failed {len(self.failed)}"
        ]
        out += [f"  FAILED {uid}: {why}" for uid, why in sorted(self.failed.items())]
        return out


def prepare_dataset(
    data_dir: str,
    cache_dir: str,
    params: Mapping[str, Any],
    *,
    workers: int | None = None,
    shard: int = 0,
    num_shards: int = 1,
    progress: bool = True,
    out_flag: str = "--out",
    data_flag: str = "--data",
) -> Summary:
    """Prepares every study of `data_dir` in this shard that the cache lacks.

    Args:
      data_dir: RSNA-layout folder.
      cache_dir: output cache (created; must have been prepared with the same params).
      params: from `preprocessing_params`.
      workers: processes; default os.cpu_count(). 0 or 1 runs in this process.
      shard, num_shards: this machine's share of the sorted studies.
      progress: show a progress bar.
      out_flag, data_flag: the caller's flags for the cache and the data folder, named by the
        error when the cache was prepared from another folder or with other params.
    """
    if not 0 <= shard < num_shards:
        raise ValueError(f"--shard {shard} not in [0, {num_shards})")
    start = time.perf_counter()
    studies = rsna.load_index(data_dir)[shard::num_shards]
    cache.open_cache(cache_dir, params, data_dir, out_flag=out_flag, data_flag=data_flag)
    todo = [s for s in studies if not cache.has_entry(cache_dir, s.uid)]
    skipped = [s.uid for s in studies if cache.has_entry(cache_dir, s.uid)]
    workers = (os.cpu_count() or 1) if workers is None else workers
    jobs = [(s, cache_dir, params) for s in todo]
    bar = tqdm.tqdm(
        total=len(jobs),
        unit="study",
        desc="prepare",
        disable=not (progress and jobs),
        file=sys.stderr,
    )
    summary = Summary([], skipped, {}, 0, 0.0)
    if workers <= 1 or len(jobs) <= 1:
        results = map(_prepare_one, jobs)
        pool = None
    else:
        # spawn: callers (train.py) may already run JAX threads, which fork would copy badly.
        pool = multiprocessing.get_context("spawn").Pool(
            min(workers, len(jobs)),
            initializer=_limit_threads,
            initargs=(max(1, (os.cpu_count() or 1) // workers),),
        )
        results = pool.imap_unordered(_prepare_one, jobs)
    try:
        for uid, error, slices in results:
            if error is None:
                summary.prepared.append(uid)
                summary.slices += slices
            else:
                summary.failed[uid] = error
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    summary.prepared.sort()
    summary.seconds = time.perf_counter() - start
    cache.write_failures(cache_dir, shard, summary.failed)
    return summary


def main(argv: Sequence[str]) -> int:
    del argv
    from absl import flags  # CLI-only dependency of this module

    params = preprocessing_params(flags.FLAGS.config.data)
    summary = prepare_dataset(
        flags.FLAGS.data,
        flags.FLAGS.out,
        params,
        workers=flags.FLAGS.workers,
        shard=flags.FLAGS.shard,
        num_shards=flags.FLAGS.num_shards,
    )
    print("\n".join(summary.lines()))
    print(f"cache: {os.path.abspath(flags.FLAGS.out)}")
    all_failed = summary.failed and not (summary.prepared or summary.skipped)
    return 1 if all_failed else 0


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    default_config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "default.py")
    flags.DEFINE_string("data", None, "RSNA-layout folder.", required=True)
    flags.DEFINE_string("out", None, "Cache folder to create or resume.", required=True)
    flags.DEFINE_integer("workers", os.cpu_count(), "Worker processes.")
    flags.DEFINE_integer("shard", 0, "This machine's shard index.")
    flags.DEFINE_integer("num_shards", 1, "Number of machines sharing the work.")
    config_flags.DEFINE_config_file(
        "config", os.path.normpath(default_config), "Config whose data section sets the grid."
    )


if __name__ == "__main__":
    from cspine_jax import cli

    _define_flags()
    cli.run(main, "prepare")
