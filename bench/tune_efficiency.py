"""Tune efficiency: the same search with and without ASHA early stopping.

Both sweeps sample the same configurations (random search, same seed) on the same synthetic data
and train each trial for the same maximum number of epochs; one lets ASHA stop poor trials early.
Reported per sweep: trial-epochs spent (the compute budget), wall time, and the best objective
(precision at recall >= target on validation). Prints a table and writes JSON.

    python bench/tune_efficiency.py [--samples 8] [--epochs 8] [--images 1000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from pneumonia import runtime

runtime.activate()  # an entry point: legacy Keras and quiet logs before anything imports TensorFlow

from bench_report import machine_info, write_report

from pneumonia.config import load_config, with_overrides
from pneumonia.data.synth import make_synthetic_dataset
from pneumonia.training.sweep import tune

ROOT = Path(__file__).resolve().parents[1]


def run_sweep(config, data: str, storage: Path, scheduler: str) -> dict:
    config = with_overrides(config, {"tune.scheduler": scheduler, "run.storage": str(storage),
                                     "run.name": f"efficiency-{scheduler}"})
    started = time.perf_counter()
    result = tune(config, data, progress=lambda line: None)
    wall = time.perf_counter() - started
    import ray

    ray.shutdown()  # a fresh Ray for the other sweep: no warm workers carried over
    return {
        "scheduler": scheduler,
        "trials": len(result.trials),
        "trial_epochs": sum(trial["epochs"] for trial in result.trials),
        "wall_s": wall,
        "best_objective": result.objective,
        "best_params": result.best_params,
        "per_trial": [{k: t[k] for k in ("trial_id", "epochs", "objective")} for t in result.trials],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "tune_configs" / "quick.yaml"))
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "tune_efficiency.json"))
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    data = scratch / "data"
    make_synthetic_dataset(data, n=args.images, seed=0, image_size=64)
    config = with_overrides(load_config(args.config), {
        "tune.num_samples": args.samples, "tune.search": "random", "train.epochs": args.epochs,
    })
    print(f"{args.samples} trials x up to {args.epochs} epochs, random search (seed {config.tune.seed}), "
          f"{args.images} synthetic images", flush=True)
    rows = []
    for scheduler in ("none", "asha"):
        print(f"running the sweep with scheduler={scheduler}", flush=True)
        rows.append(run_sweep(config, str(data), scratch / "runs", scheduler))

    print(f"\n{'scheduler':<10}{'trials':>7}{'trial-epochs':>14}{'wall s':>9}{'best objective':>16}")
    for row in rows:
        print(f"{row['scheduler']:<10}{row['trials']:>7}{row['trial_epochs']:>14}{row['wall_s']:>9.0f}"
              f"{row['best_objective']:>16.4f}")
    none, asha = rows
    summary = {
        "epochs_saved_fraction": 1 - asha["trial_epochs"] / none["trial_epochs"],
        "wall_time_ratio": asha["wall_s"] / none["wall_s"],
        "objective_difference": asha["best_objective"] - none["best_objective"],
    }
    print(f"\nASHA spent {100 * summary['epochs_saved_fraction']:.0f}% fewer trial-epochs "
          f"({summary['wall_time_ratio']:.2f}x the wall time); best objective "
          f"{summary['objective_difference']:+.4f} vs no early stopping")
    report = {
        "benchmark": "tune_efficiency", "samples": args.samples, "max_epochs": args.epochs,
        "images": args.images, "config": args.config, "results": rows, "summary": summary,
        "machine": machine_info(),
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
