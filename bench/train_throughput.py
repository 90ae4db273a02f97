"""Training throughput: plain single-process tf.keras fit vs Ray Train with 1 and 2 workers.

Same model, same data, same per-worker batch, same input pipeline (pneumonia.data.pipeline). Each mode
trains a few epochs; the first epoch (graph tracing, cache fill) is dropped and the median of the
rest is reported in images/s. Ray Train with 1 worker gets all the machine's CPUs, like the plain
fit; with N workers, the CPUs are split between them. Prints a table and writes JSON.

    python bench/train_throughput.py [--data DIR] [--images 1200] [--epochs 4] [--model xraynet]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pneumonia import runtime

runtime.activate()  # an entry point: legacy Keras and quiet logs before anything imports TensorFlow

from bench_report import machine_info, write_report

from pneumonia.config import ExperimentConfig, with_overrides
from pneumonia.data.records import carve_validation, shard
from pneumonia.training.driver import train
from pneumonia.training.worker import preprocess_spec

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT.parent / "shared" / "data" / "chest_xray_224"


def plain_fit(config: ExperimentConfig, records, epochs: int) -> list[float]:
    """images/s per epoch of model.fit in this process, no Ray, no strategy."""
    import tensorflow as tf

    from pneumonia.data.pipeline import training_dataset
    from pneumonia.models.architectures import build_model, compile_model

    spec = preprocess_spec(config)
    dataset, _, _ = training_dataset(records, spec, config.train.batch_size, config.data.augment,
                                     seed=config.data.seed, cache=True)
    model = build_model(config.model, spec.shape)
    compile_model(model, config.train.optimizer, config.train.learning_rate)
    steps = max(1, -(-len(records) // config.train.batch_size))
    rates: list[float] = []

    class Timer(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            rates.append(steps * config.train.batch_size / (time.perf_counter() - self.started))

    model.fit(dataset, epochs=epochs, steps_per_epoch=steps, callbacks=[Timer()], verbose=0)
    return rates


def ray_fit(config: ExperimentConfig, data: str, workers: int, epochs: int, storage: str) -> list[float]:
    cpus = max(1, (os.cpu_count() or 2) // workers)
    config = with_overrides(config, {
        "scaling.workers": workers, "scaling.cpus_per_worker": cpus, "train.epochs": epochs,
        "run.storage": storage, "run.name": f"bench-{workers}w-{int(time.time())}",
    })
    result = train(config, data, progress=lambda line: None)
    return [row["images_per_s"] for row in result.history]


def subsample(data: str, images: int, out: Path) -> str:
    """A smaller copy (symlinks) of a dataset's train split, class-balanced like the original."""
    from pneumonia.data.records import discover, training_records

    records = training_records(discover(data))
    chosen = shard(records, 0, max(1, len(records) // images))
    for record in chosen:
        target = out / "train" / record.class_name / Path(record.location).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(Path(record.location).resolve())
    return str(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="dataset root (default: ../shared/data/chest_xray_224, else synthetic)")
    parser.add_argument("--images", type=int, default=1200, help="training images to use")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--model", default="xraynet", choices=["seed", "xraynet"])
    parser.add_argument("--image-size", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_throughput.json"))
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-train-"))
    if args.data:
        source = args.data
    elif REAL_DATA.is_dir():
        source = str(REAL_DATA)
    else:
        from pneumonia.data.synth import make_synthetic_dataset

        source = str(scratch / "synthetic")
        make_synthetic_dataset(source, n=int(args.images * 1.3), seed=0, image_size=224)
    data = subsample(source, args.images, scratch / "subset")
    config = with_overrides(ExperimentConfig(), {
        "model.name": args.model, "data.image_size": args.image_size, "train.batch_size": args.batch_size,
    })
    _, train_records, _ = carve_validation(data, config)
    print(f"data: {len(train_records)} training images from {source}; {args.model} at {args.image_size}px, "
          f"batch {args.batch_size}/worker, {args.epochs} epochs per mode (first dropped)", flush=True)

    rows = []
    modes = [("plain tf.keras fit", None), ("Ray Train, 1 worker", 1), ("Ray Train, 2 workers", 2)]
    for label, workers in modes:
        print(f"running: {label}", flush=True)
        if workers is None:
            rates = plain_fit(config, train_records, args.epochs)
        else:
            rates = ray_fit(config, data, workers, args.epochs, str(scratch / "runs"))
        rows.append({"mode": label, "workers": workers or 0, "images_per_s": statistics.median(rates[1:] or rates),
                     "per_epoch": rates})
    baseline = rows[0]["images_per_s"]
    for row in rows:
        row["ratio_to_plain"] = row["images_per_s"] / baseline

    print(f"\n{'mode':<24}{'images/s':>10}{'vs plain':>10}")
    for row in rows:
        print(f"{row['mode']:<24}{row['images_per_s']:>10.1f}{row['ratio_to_plain']:>9.2f}x")
    report = {
        "benchmark": "train_throughput", "model": args.model, "image_size": args.image_size,
        "batch_size_per_worker": args.batch_size, "train_images": len(train_records), "epochs": args.epochs,
        "data": source, "machine": machine_info(),
        "results": rows, "target": "Ray Train 1 worker >= 0.9x plain fit",
        "target_met": rows[1]["ratio_to_plain"] >= 0.9,
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
