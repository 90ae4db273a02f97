"""Batch scoring throughput: `pneumonia score` (Ray Data) vs a plain single-process loop.

Why: `pneumonia score` adds Ray, Ray Data's streaming executor, an actor pool and part files on
top of "decode, then predict in batches". This measures whether that pays for itself on one
machine, where a user could also just write the loop.

Two inputs, side by side in one run:

  224px     a subset (--subset, default 4000) of the real 224 px train images
            (../shared/data/chest_xray_224/train), spread evenly over the sorted list
  original  the 16 full-resolution val16 X-rays (1-2 Mpx JPEGs), symlinked over and over to
            --originals files (default 3000): decoding dominates there

and, for each, these modes with the same model and batch size (--batch-size, default 64):

  loop      one process: decode_image + LoadedArtifact.predict per batch, model already loaded
            (TensorFlow uses every core for the forward pass; decoding uses one)
  ray-N     pneumonia.scoring.score on an embedded Ray with N logical CPUs (--cpus, default 1,2):
            its defaults, N actors that each read, decode and score their blocks (no GPU)

The loop runs before and after the Ray modes and its mean is the baseline (the machine is shared).
Ray's images/s is the pipeline's (first task to last row: actors starting, TensorFlow loading
and the model loading included; Ray's own start, the checks and the merge are in wall_s);
steady/s is its rate in the middle of the run (from the result block that passes 25% of the files
to the one that passes 90%; the driver's block times are recorded by wrapping write_part), which an
archive much larger than this one approaches.
The model is --artifact, or an untrained xraynet (width 32, 150 px grayscale) exported as
bench/serve_load.py does: the weights do not change the cost.

    python bench/score_throughput.py [--subset 4000] [--originals 3000] [--cpus 1,2] [--artifact PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pneumonia import runtime

runtime.activate()  # an entry point: legacy Keras and quiet logs before anything imports TensorFlow

from bench_report import machine_info, write_report

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PNEUMONIA_SHARED_DATA") or ROOT.parent / "shared" / "data")
TARGET_SPEEDUP = 1.5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", help="artifact to score with (default: an untrained 150 px xraynet)")
    parser.add_argument("--subset", type=int, default=4000, help="224 px train images (default 4000)")
    parser.add_argument("--originals", type=int, default=3000, help="full-resolution files (default 3000)")
    parser.add_argument("--cpus", default="1,2", help="logical CPUs of the embedded Ray, comma-separated")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--inputs", default="224px,original", help="which inputs to run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "score_throughput.json"))
    return parser.parse_args()


# ----------------------------------------------------------------------------- inputs


def link_files(sources: list[Path], count: int, folder: Path) -> Path:
    """``count`` symlinks in ``folder``, cycling through ``sources`` (distinct names, one folder)."""
    folder.mkdir(parents=True)
    for index in range(count):
        source = sources[index % len(sources)]
        (folder / f"{index:06d}-{source.name}").symlink_to(source.resolve())
    return folder


def prepare_inputs(args, scratch: Path) -> dict[str, Path]:
    wanted = args.inputs.split(",")
    inputs = {}
    if "224px" in wanted:
        train = sorted((SHARED / "chest_xray_224" / "train").rglob("*.jpeg"))
        if not train:
            raise SystemExit(f"no 224 px train images under {SHARED / 'chest_xray_224' / 'train'}")
        step = max(1, len(train) // args.subset)
        chosen = train[::step][: args.subset]
        inputs["224px"] = link_files(chosen, len(chosen), scratch / "224px")
    if "original" in wanted:
        originals = sorted((SHARED / "chest_xray_val16").rglob("*.jpeg"))
        if not originals:
            raise SystemExit(f"no full-resolution X-rays under {SHARED / 'chest_xray_val16'}")
        inputs["original"] = link_files(originals, args.originals, scratch / "original")
    return inputs


# ----------------------------------------------------------------------------- modes


def plain_loop(artifact, folder: Path, batch_size: int) -> dict:
    """What a user would write: decode a batch, predict it, next batch; one process."""
    from pneumonia.data.preprocess import decode_image

    files = sorted(folder.iterdir())
    started = time.perf_counter()
    decoding = 0.0
    for start in range(0, len(files), batch_size):
        began = time.perf_counter()
        images = np.stack([decode_image(path.read_bytes(), artifact.preprocess) for path in files[start:start + batch_size]])
        decoding += time.perf_counter() - began
        artifact.predict(images, batch_size=batch_size)
    elapsed = time.perf_counter() - started
    return {"images": len(files), "seconds": round(elapsed, 2), "images_per_s": round(len(files) / elapsed, 1),
            "decode_share": round(decoding / elapsed, 2)}


def ray_score(artifact_path: str, folder: Path, cpus: int, batch_size: int, scratch: Path) -> dict:
    """score() on a fresh embedded Ray with ``cpus`` logical CPUs, with its default concurrency."""
    import ray.data

    import pneumonia.scoring.run as run
    from pneumonia.local_ray import driver_env_vars, start_ray, stop_ray

    output = scratch / f"scores-{folder.name}-{cpus}cpu-{time.time_ns()}.parquet"
    blocks: list[tuple[float, int]] = []  # (when, rows) of every result block, as the driver wrote it
    write_part = run.write_part

    def timed_write_part(parts, sequence, started_ns, table):
        blocks.append((time.perf_counter(), len(table)))
        return write_part(parts, sequence, started_ns, table)

    began = time.perf_counter()
    start_ray(driver_env_vars(), num_cpus=cpus, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    run.write_part = timed_write_part
    try:
        result = run.score(artifact_path, str(folder), str(output), batch_size=batch_size, progress=lambda line: None)
    finally:
        run.write_part = write_part
        stop_ray()
    return {"images": result.scored, "failed": result.failed, "seconds": round(result.pipeline_s, 2),
            "images_per_s": round(result.images_per_s, 1), "startup_s": round(result.startup_s, 1),
            "steady_images_per_s": round(steady_rate(blocks), 1),
            "wall_s": round(time.perf_counter() - began, 1), "actors": cpus, "blocks": len(blocks)}


def steady_rate(blocks: list[tuple[float, int]], low: float = 0.25, high: float = 0.9) -> float:
    """Rows per second between the blocks that took the count past ``low`` and ``high`` of the
    total: start-up (actors loading, and the first blocks of every actor arriving together) and
    the tail (one actor finishing the last block alone) left out. What a large archive approaches."""
    total = sum(rows for _, rows in blocks)
    done, first, last = 0, None, None
    for when, rows in blocks:
        done += rows
        if first is None and done >= low * total:
            first = (when, done)
        if last is None and done >= high * total:
            last = (when, done)
    if first is None or last is None or last[0] <= first[0]:
        return float("nan")
    return (last[1] - first[1]) / (last[0] - first[0])


def untrained_artifact(scratch: Path) -> str:
    from serve_load import export_untrained_artifact

    return export_untrained_artifact(scratch / "model")


# ----------------------------------------------------------------------------- report


def table(rows: list[dict]) -> str:
    lines = [f"{'input':<10}{'mode':<8}{'images':>8}{'images/s':>10}{'vs loop':>9}{'startup s':>11}"
             f"{'steady/s':>11}{'vs loop':>9}{'wall s':>8}", "-" * 84]
    for row in rows:
        startup = f"{row['startup_s']:.1f}" if "startup_s" in row else "-"
        steady = f"{row['steady_images_per_s']:.1f}" if "steady_images_per_s" in row else "-"
        steady_speedup = f"{row['steady_speedup']:.2f}x" if "steady_speedup" in row else "-"
        wall = f"{row['wall_s']:.1f}" if "wall_s" in row else f"{row['seconds']:.1f}"
        lines.append(f"{row['input']:<10}{row['mode']:<8}{row['images']:>8}{row['images_per_s']:>10.1f}"
                     f"{row['speedup']:>8.2f}x{startup:>11}{steady:>11}{steady_speedup:>9}{wall:>8}")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    from pneumonia.artifacts.registry import load_artifact

    cpus = [int(value) for value in args.cpus.split(",")]
    scratch = Path(tempfile.mkdtemp(prefix="score-bench-"))
    load_before = os.getloadavg()
    try:
        inputs = prepare_inputs(args, scratch)
        artifact_path = args.artifact or untrained_artifact(scratch)
        artifact = load_artifact(artifact_path)
        artifact.predict(np.zeros((1, *artifact.preprocess.shape), np.uint8))  # compile before timing
        rows = []
        for name, folder in inputs.items():
            print(f"[{name}] {len(os.listdir(folder))} files; loop ...", flush=True)
            loops = [plain_loop(artifact, folder, args.batch_size)]
            runs = []
            for count in cpus:
                print(f"[{name}] Ray with {count} CPU(s) ...", flush=True)
                runs.append(ray_score(artifact_path, folder, count, args.batch_size, scratch))
            print(f"[{name}] loop again ...", flush=True)
            loops.append(plain_loop(artifact, folder, args.batch_size))
            baseline = float(np.mean([loop["images_per_s"] for loop in loops]))
            rows.append({"input": name, "mode": "loop", **loops[0], "images_per_s": round(baseline, 1),
                         "speedup": 1.0, "loops": loops})
            for count, run in zip(cpus, runs):
                rows.append({"input": name, "mode": f"ray-{count}", **run,
                             "speedup": round(run["images_per_s"] / baseline, 2),
                             "steady_speedup": round(run["steady_images_per_s"] / baseline, 2)})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(table(rows))
    best = {name: {kind: max(row[kind] for row in rows if row["input"] == name and row["mode"] != "loop")
                   for kind in ("speedup", "steady_speedup")} for name in inputs}
    for name, speedups in best.items():
        for kind, what in (("speedup", "start-up included"), ("steady_speedup", "steady rate")):
            verdict = "met" if speedups[kind] >= TARGET_SPEEDUP else "not met"
            print(f"target (Ray >= {TARGET_SPEEDUP}x the loop, {what}) on {name}: {verdict} ({speedups[kind]:.2f}x)")
    print(f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores)")
    write_report(args.out, {
        "machine": machine_info(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "settings": {"subset": args.subset, "originals": args.originals, "cpus": cpus,
                     "batch_size": args.batch_size, "artifact": args.artifact or "untrained xraynet width 32, 150 px"},
        "rows": rows, "best_speedup": best, "target_speedup": TARGET_SPEEDUP,
    })


if __name__ == "__main__":
    main()
