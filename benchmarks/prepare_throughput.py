"""Prepare throughput: slices/s of `prepare` against pure pydicom decoding of the same files.

    python benchmarks/prepare_throughput.py [--data DIR] [--num_studies 4] [--workers N]

Without --data it writes full-size phantoms (512x512, 200-400 slices, some compressed)
into a temporary folder. Both sides read from a warm page cache and use the same number of
worker processes (one study per task), so the ratio is the cost of what prepare adds to
decoding: geometry checks, mask alignment, resampling, windowing and writing the cache.
Prepare decodes every pixel of every slice as well, but not through `.pixel_array` where it
need not: native little endian pixels are viewed in the file's bytes (`dicom._stored_pixels`),
which saves pydicom's ~0.4 ms a slice of decoder set-up and pays for part of what prepare
adds. Compressed syntaxes go through pydicom's decoders on both sides.
The last line is `prepare_overhead=<(prepare time / decode time) - 1>`.
"""

import multiprocessing
import os
import platform
import sys
import tempfile
import time

import pydicom
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from configs import default  # noqa: E402
from cspine_jax.data import phantom, prepare, rsna  # noqa: E402

flags.DEFINE_string("data", "", "RSNA-layout folder; empty: generate full-size phantoms.")
flags.DEFINE_integer("num_studies", 4, "Phantom studies to generate without --data.")
flags.DEFINE_integer("workers", os.cpu_count(), "Processes for both decode and prepare.")
flags.DEFINE_integer("repeats", 2, "Timed runs of each side; the fastest counts.")
FLAGS = flags.FLAGS


def _decode_study(folder: str) -> int:
    files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".dcm")]
    for path in files:
        pydicom.dcmread(path).pixel_array  # noqa: B018 - decoding is the point
    return len(files)


def _decode_all(folders: list[str], workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(min(workers, len(folders))) as pool:
        slices = sum(pool.map(_decode_study, folders, chunksize=1))
    return time.perf_counter() - start, slices


def _prepare_all(data: str, workers: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        params = prepare.preprocessing_params(default.get_config().data)
        summary = prepare.prepare_dataset(data, out, params, workers=workers, progress=False)
        if summary.failed:
            raise RuntimeError("\n".join(summary.lines()))
        return summary.seconds


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as tmp:
        data = FLAGS.data
        if not data:
            data = os.path.join(tmp, "phantoms")
            phantom.write_dataset(
                data, num_studies=FLAGS.num_studies, seed=0, size="full", workers=FLAGS.workers
            )
        folders = [s.image_dir for s in rsna.load_index(data)]
        _decode_all(folders, FLAGS.workers)  # warm the page cache and the imports
        decode_s, slices = min(_decode_all(folders, FLAGS.workers) for _ in range(FLAGS.repeats))
        prepare_s = min(_prepare_all(data, FLAGS.workers) for _ in range(FLAGS.repeats))
    grid = default.get_config().data.grid
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"{len(folders)} studies, {slices} slices; workers={FLAGS.workers}; grid={grid}"
    )
    print(f"{'step':<28}{'seconds':>10}{'slices/s':>12}")
    print(f"{'pydicom decode':<28}{decode_s:>10.2f}{slices / decode_s:>12.1f}")
    print(f"{'prepare (decode+cache)':<28}{prepare_s:>10.2f}{slices / prepare_s:>12.1f}")
    print(f"prepare_overhead={prepare_s / decode_s - 1:.3f}")


if __name__ == "__main__":
    app.run(main)
