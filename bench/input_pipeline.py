"""Input pipeline throughput: tf.data over each worker's own files vs Ray Data, same decode.

Why: ``pneumonia.data.pipeline`` feeds training from tf.data over per-worker file shards (decoded in a
thread pool and cached in memory) and not from Ray Data. This measures whether that choice holds,
in images/s of decoded uint8 (150, 150, 1) batches delivered to a consumer loop:

- ``load_images``: the thread-pool Pillow decode behind ``cache=True`` (the baseline, ratio 1.0);
- tf.data ``cache=True``: epoch 1 (decode + fill, from the call) and a warm epoch (epochs 2..N);
- tf.data ``cache=False``: epoch 1 and epoch 2 of streaming decode (numpy_function, parallel map);
- Ray Data: ``read_binary_files`` + ``map_batches`` over the SAME ``decode_image`` (no training/
  serving skew), consumed with ``iter_tf_batches``: epoch 1, epoch 2 (a lazy dataset re-reads and
  re-decodes), ``materialize()`` (decode into the object store) and a warm epoch over the result.

Every pipeline shuffles a buffer as large as the data (tf.data's ``shuffle``, Ray's
``local_shuffle_buffer_size``), as training needs. Ray runs locally on all the machine's CPUs;
``ray.init`` and dataset creation are timed separately, and Ray's one-off worker start-up shows up
in round 1. Other jobs may share the machine, so every round runs all modes in a rotated order,
files are read once before timing (all modes see the page cache), and the table shows medians
over rounds with ratios to ``load_images``. Prints a table and writes JSON.

    python bench/input_pipeline.py [--data DIR] [--images 1500] [--rounds 5] [--batch-size 20]
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from pneumonia import runtime

runtime.activate()  # an entry point: legacy Keras and quiet logs before anything imports TensorFlow

from bench_report import machine_info, write_report

from pneumonia.config import AugmentConfig
from pneumonia.data.pipeline import load_images, training_dataset
from pneumonia.data.preprocess import ImageDecodeError, PreprocessSpec, decode_image
from pneumonia.data.records import ImageRecord, discover, training_records
from pneumonia.storage import read_bytes

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT.parent / "shared" / "data" / "chest_xray_224"
BASELINE = "load_images (thread-pool decode)"

Timings = dict[str, float]  # mode -> images/s
T = TypeVar("T")


def pick_records(data: str | None, images: int, scratch: Path) -> tuple[str, list[ImageRecord]]:
    """``images`` training records spread evenly over the (class-sorted) list, so the class mix
    matches the full split; synthetic data when no dataset is given or found."""
    if data:
        source = data
    elif REAL_DATA.is_dir():
        source = str(REAL_DATA)
    else:
        from pneumonia.data.synth import make_synthetic_dataset

        source = str(scratch / "synthetic")
        # 80% of the images land in train; a few spare ones cover rounding.
        make_synthetic_dataset(source, n=int(images / 0.8) + 8, seed=0, image_size=224)
    records = training_records(discover(source))
    count = min(images, len(records))
    return source, [records[index * len(records) // count] for index in range(count)]


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """(what fn returned, seconds it took)."""
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def drain(iterator, batches: int) -> int:
    """Pull ``batches`` (image, label, weight) batches from an endless tf.data iterator; images."""
    return sum(int(next(iterator)[0].shape[0]) for _ in range(batches))


def run_load_images(records, spec, batch_size) -> Timings:
    count, seconds = timed(lambda: len(load_images(records, spec).records))
    return {BASELINE: count / seconds}


def run_tf_data(records, spec, batch_size, cache: bool) -> Timings:
    """Epoch 1 counts from the training_dataset call (for cache=True that includes the decode)."""
    steps = -(-len(records) // batch_size)
    started = time.perf_counter()
    dataset, _, _ = training_dataset(records, spec, batch_size, AugmentConfig(), seed=0, cache=cache)
    iterator = iter(dataset)
    first = drain(iterator, steps) / (time.perf_counter() - started)
    count, seconds = timed(lambda: drain(iterator, steps))
    if cache:
        return {"tf.data cache=True, epoch 1 (decode+fill)": first,
                "tf.data cache=True, warm epoch": count / seconds}
    return {"tf.data cache=False, epoch 1": first, "tf.data cache=False, epoch 2": count / seconds}


def decode_batch(batch: dict, spec: PreprocessSpec, labels: dict[str, float]) -> dict:
    """Ray Data map: the same decode_image as training and serving; unreadable files are dropped."""
    images, kept = [], []
    for data, path in zip(batch["bytes"], batch["path"]):
        try:
            images.append(decode_image(data, spec))
        except ImageDecodeError:
            continue
        kept.append(labels[path])
    stacked = np.stack(images) if images else np.zeros((0, *spec.shape), np.uint8)
    return {"image": stacked, "label": np.array(kept, dtype=np.float32)}


def ray_dataset(records, spec):
    """A lazy Ray dataset of {image, label}; nothing is read until it is iterated."""
    import ray

    labels = {record.location: float(record.label) for record in records}
    files = ray.data.read_binary_files([record.location for record in records], include_paths=True)
    # batch_size=None maps whole read blocks, which lets Ray fuse read and decode into one task
    # (measured faster here than separate tasks joined through the object store).
    return files.map_batches(decode_batch, batch_size=None, fn_kwargs={"spec": spec, "labels": labels})


def ray_epoch(dataset, batch_size: int, shuffle: int) -> int:
    return sum(int(batch["image"].shape[0])
               for batch in dataset.iter_tf_batches(batch_size=batch_size, local_shuffle_buffer_size=shuffle))


def run_ray_streaming(records, spec, batch_size) -> Timings:
    dataset = ray_dataset(records, spec)
    first, first_s = timed(lambda: ray_epoch(dataset, batch_size, len(records)))
    second, second_s = timed(lambda: ray_epoch(dataset, batch_size, len(records)))
    return {"Ray Data, epoch 1": first / first_s, "Ray Data, epoch 2 (re-decodes)": second / second_s}


def run_ray_materialized(records, spec, batch_size) -> Timings:
    materialized, seconds = timed(lambda: ray_dataset(records, spec).materialize())
    count, warm_s = timed(lambda: ray_epoch(materialized, batch_size, len(records)))
    return {"Ray Data materialize() (decode)": count / seconds,
            "Ray Data materialized, warm epoch": count / warm_s}


RUNNERS = [
    run_load_images,
    functools.partial(run_tf_data, cache=True),
    functools.partial(run_tf_data, cache=False),
    run_ray_streaming,
    run_ray_materialized,
]


def start_ray(records, spec) -> dict[str, float]:
    """Local ray.init on every CPU (Ray Data's progress output off), and the seconds it and the
    creation of the (lazy) dataset take: the set-up a Ray Data input pipeline adds."""
    import ray

    _, init_s = timed(lambda: ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False,
                                       log_to_driver=False, logging_level=logging.WARNING))
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled"
    _, creation_s = timed(lambda: ray_dataset(records, spec))
    return {"ray_init_s": init_s, "dataset_creation_s": creation_s}


def run_rounds(records, spec, batch_size: int, rounds: int) -> list[Timings]:
    """All runners once per round, starting one later each round so no mode always goes first."""
    results = []
    for round_index in range(rounds):
        shift = round_index % len(RUNNERS)
        timings: Timings = {}
        for runner in RUNNERS[shift:] + RUNNERS[:shift]:
            timings.update(runner(records, spec, batch_size))
        print(f"round {round_index + 1}/{rounds}: "
              + ", ".join(f"{mode} {rate:.0f}" for mode, rate in timings.items()),
              flush=True)
        results.append(timings)
    return results


def summarize(results: list[Timings]) -> list[dict]:
    rows = [{"mode": mode, "images_per_s": statistics.median(r[mode] for r in results),
             "per_round": [r[mode] for r in results]} for mode in results[0]]
    baseline = next(row["images_per_s"] for row in rows if row["mode"] == BASELINE)
    for row in rows:
        row["ratio_to_load_images"] = row["images_per_s"] / baseline
    return rows


def print_table(rows: list[dict], overhead: dict[str, float]) -> None:
    print(f"\n{'mode':<44}{'images/s':>10}{'vs load_images':>16}")
    for row in rows:
        print(f"{row['mode']:<44}{row['images_per_s']:>10.0f}{row['ratio_to_load_images']:>15.2f}x")
    print(f"\nRay set-up: ray.init {overhead['ray_init_s']:.1f} s, dataset creation (read_binary_files + "
          f"map_batches) {overhead['dataset_creation_s']:.2f} s; Ray's worker start-up lands in round 1")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="dataset root (default: ../shared/data/chest_xray_224, else synthetic)")
    parser.add_argument("--images", type=int, default=1500, help="training images to use")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "input_pipeline.json"))
    return parser.parse_args()


def measure(args: argparse.Namespace, scratch: Path) -> dict:
    """Run every round, print the table and return the report."""
    import ray
    import tensorflow as tf  # noqa: F401  (imported before timing, not inside round 1)

    spec = PreprocessSpec(image_size=args.image_size, channels=1)
    source, records = pick_records(args.data, args.images, scratch)
    for record in records:
        read_bytes(record.location)  # page cache: no mode pays the first disk read
    print(f"data: {len(records)} training images from {source}; {args.image_size}px grayscale, "
          f"batch {args.batch_size}, {args.rounds} rounds", flush=True)
    load_before = os.getloadavg()
    try:
        overhead = start_ray(records, spec)
        results = run_rounds(records, spec, args.batch_size, args.rounds)
    finally:
        ray.shutdown()

    rows = summarize(results)
    print_table(rows, overhead)
    return {
        "benchmark": "input_pipeline", "images": len(records), "data": source, "image_size": args.image_size,
        "batch_size": args.batch_size, "rounds": args.rounds,
        "machine": {**machine_info(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "ray_overhead": overhead, "results": rows,
    }


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-input-") as scratch:  # synthetic data, if any
        report = measure(args, Path(scratch))
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
