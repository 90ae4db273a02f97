"""Serving under load: the in-process limit vs a hand-written FastAPI server vs our Ray Serve app.

Why: the Serve app (pneumonia.serving) splits decoding (Gateway) from batched inference
(Classifier). That costs extra hops per request; this measures whether batching pays for them
under concurrency, and how close a single request gets to the in-process latency.

Closed-loop load on loopback only: each of C workers sends one request, waits for the answer,
sends the next, over its own keep-alive connection, for a warm-up then `--duration` seconds (or
until `--max-requests` per level). The payload is a full-resolution real chest X-ray (a synthetic
1800x1400 grayscale JPEG when the shared data is absent). Modes, at each concurrency:

  in-process limit       decode_image + LoadedArtifact.predict on C threads, no HTTP
  plain FastAPI          one uvicorn process: POST /predict decodes and predicts per request, the
                         blocking work in FastAPI's thread pool (the stronger hand-written version)
  Serve, batching off    build_app(max_batch_size=1) on a local Ray
  Serve, batching on     build_app() (max_batch_size 32, 5 ms batch wait)

Non-200 answers and failed requests count as errors. Prints a table and writes JSON.

    python bench/serve_load.py [--artifact PATH] [--concurrency 1,8,32,64] [--duration 8]
"""

# No `from __future__ import annotations`: FastAPI must see the real Request type in the plain
# server's route, which is defined inside a function.
import argparse
import http.client
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

import pneumonia  # noqa: F401  (tf-keras, before anything imports TensorFlow)
from bench_report import machine_info, write_report

ROOT = Path(__file__).resolve().parents[1]
REAL_XRAY = ROOT.parent / "shared" / "data" / "chest_xray_val16" / "NORMAL" / "NORMAL2-IM-1427-0001.jpeg"
HOST = "127.0.0.1"
REQUEST_TIMEOUT_S = 30
SERVER_START_TIMEOUT_S = 180
TARGET_SPEEDUP, TARGET_P99_MS, TARGET_P50_GAP_MS, TARGET_CONCURRENCY = 2.0, 1500.0, 5.0, 32
MODES = ("in-process limit", "plain FastAPI", "Serve, batching off", "Serve, batching on")


# ----------------------------------------------------------------------------- inputs


def load_payload(path: str | None) -> tuple[bytes, str]:
    """The request body and where it came from: the given file, the real X-ray, else synthetic."""
    chosen = Path(path) if path else REAL_XRAY
    if chosen.is_file():
        return chosen.read_bytes(), str(chosen)
    if path:
        raise SystemExit(f"payload {path} does not exist")
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = (np.linspace(40, 200, 1800)[None, :] + rng.normal(0, 25, (1400, 1800))).clip(0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue(), "synthetic 1800x1400 grayscale JPEG"


def export_untrained_artifact(root: Path) -> str:
    """A registry holding an untrained xraynet (width 32, 150 px, 1 channel), as the serving tests
    build theirs: the weights do not change the cost of a forward pass."""
    from pneumonia.checkpoint import CheckpointInfo, save_checkpoint
    from pneumonia.config import ExperimentConfig, ModelConfig
    from pneumonia.models import build_model, compile_model
    from pneumonia.preprocess import PreprocessSpec
    from pneumonia.registry import export_artifact

    model = build_model(ModelConfig(name="xraynet", width=32), (150, 150, 1))
    compile_model(model, "adam", 1e-3)
    save_checkpoint(root / "ckpt", model, CheckpointInfo(epoch=1, config=ExperimentConfig().model_dump(),
                                                         preprocess=PreprocessSpec(150, 1), metrics={}))
    export_artifact(str(root / "ckpt"), root / "registry", threshold=0.5, target_recall=0.95,
                    validation_metrics={}, training_config=ExperimentConfig().model_dump())
    return str(root / "registry")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- load generator


def closed_loop(make_sender: Callable[[], Callable[[], bool]], concurrency: int, warmup_s: float,
                duration_s: float, max_requests: int) -> dict:
    """Run `concurrency` workers, each calling its own sender back to back; summarise the window.

    A sender returns True for a good answer. Requests that start during the warm-up are not
    counted; the level ends after the window or after `max_requests` requests in it.
    """
    start = time.perf_counter()
    window_start, deadline = start + warmup_s, start + warmup_s + duration_s
    samples: list[tuple[float, bool]] = []
    lock = threading.Lock()

    def worker():
        send = make_sender()
        while (began := time.perf_counter()) < deadline:
            ok = send()
            latency = time.perf_counter() - began
            if began < window_start:
                continue
            with lock:
                if len(samples) >= max_requests:
                    return
                samples.append((latency, ok))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - window_start
    return summarise(samples, concurrency, elapsed)


def summarise(samples: list[tuple[float, bool]], concurrency: int, elapsed_s: float) -> dict:
    """Throughput of good answers, latency percentiles of good answers (ms), error count."""
    good = np.array([latency for latency, ok in samples if ok]) * 1000
    percentiles = [float(p) for p in np.percentile(good, [50, 95, 99])] if len(good) else [None] * 3
    return {"concurrency": concurrency, "requests": len(samples), "errors": len(samples) - len(good),
            "seconds": round(elapsed_s, 3), "rps": len(good) / elapsed_s,
            **dict(zip(("p50_ms", "p95_ms", "p99_ms"), percentiles))}


def http_sender(port: int, body: bytes) -> Callable[[], Callable[[], bool]]:
    """Senders that POST the payload to /predict over one keep-alive connection per worker."""
    headers = {"Content-Type": "image/jpeg", "Content-Length": str(len(body))}

    def make() -> Callable[[], bool]:
        connection = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)

        def send() -> bool:
            try:
                connection.request("POST", "/predict", body, headers)
                response = connection.getresponse()
                response.read()
                return response.status == 200
            except (OSError, http.client.HTTPException):
                connection.close()  # reconnects on the next request
                time.sleep(0.01)  # a dead server must not turn the loop into a CPU spin
                return False

        return send

    return make


def in_process_sender(artifact, body: bytes) -> Callable[[], Callable[[], bool]]:
    """Senders that decode and predict in this process: the floor under any server's cost."""
    from pneumonia.preprocess import decode_image

    def send() -> bool:
        image = decode_image(body, artifact.preprocess)
        artifact.predict(image[None])
        return True

    return lambda: send


def run_levels(mode: str, make_sender, levels: list[int], args) -> list[dict]:
    rows = []
    for concurrency in levels:
        row = closed_loop(make_sender, concurrency, args.warmup, args.duration, args.max_requests)
        rows.append({"mode": mode, **row})
        print(format_row(rows[-1]), flush=True)
    return rows


# ----------------------------------------------------------------------------- servers


def plain_fastapi_app(artifact_path: str):
    """What a user writes by hand: decode, predict, answer; no batching, no second process."""
    from fastapi import FastAPI, Request
    from starlette.concurrency import run_in_threadpool

    from pneumonia import CLASS_NAMES
    from pneumonia.preprocess import decode_image
    from pneumonia.registry import load_artifact

    artifact = load_artifact(artifact_path)
    app = FastAPI()

    def classify(data: bytes) -> float:
        return float(artifact.predict(decode_image(data, artifact.preprocess)[None])[0])

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(request: Request):
        probability = await run_in_threadpool(classify, await request.body())
        return {"label": CLASS_NAMES[int(probability >= artifact.threshold)], "probability": probability}

    return app


def start_plain_server(artifact: str, port: int, log: Path) -> subprocess.Popen:
    """This script, re-run as the plain FastAPI server (one uvicorn worker) on `port`."""
    command = [sys.executable, __file__, "--plain-server", str(port), "--artifact", artifact]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    wait_until_healthy(port, process, log)
    return process


def wait_until_healthy(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the plain FastAPI server exited ({process.returncode}); see {log}")
        try:
            connection = http.client.HTTPConnection(HOST, port, timeout=2)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the plain FastAPI server did not answer within {SERVER_START_TIMEOUT_S} s; see {log}")


def stop_process(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start_ray(cpus: int) -> int:
    """Local Ray and Serve's HTTP proxy on a free loopback port; the port.

    Ray starts worker processes at nice 15 unless told otherwise (`ray job submit` sets 0): the
    replicas would then lose the CPU to the load generator and the plain server, both at nice 0.
    """
    import ray
    from ray import serve

    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}})
    port = free_port()
    serve.start(http_options={"host": HOST, "port": port})
    return port


def deploy(artifact: str, max_batch_size: int) -> None:
    from ray import serve

    from pneumonia.serving import build_app

    serve.run(build_app({"artifact": artifact, "max_batch_size": max_batch_size}), name="pneumonia",
              route_prefix="/")


def stop_ray() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


# ----------------------------------------------------------------------------- report


def format_row(row: dict) -> str:
    latencies = "".join(f"{'-' if row[key] is None else f'{row[key]:.1f}':>10}"
                        for key in ("p50_ms", "p95_ms", "p99_ms"))
    return f"{row['mode']:<22}{row['concurrency']:>5}{row['rps']:>10.1f}{latencies}{row['errors']:>8}"


HEADER = f"{'mode':<22}{'conc':>5}{'req/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'errors':>8}"


def targets(rows: list[dict]) -> list[dict]:
    """The two targets, each with the measured numbers and whether it is met (None: not measured)."""
    def find(mode, concurrency):
        return next((r for r in rows if r["mode"] == mode and r["concurrency"] == concurrency), None)

    plain, batched = find(MODES[1], TARGET_CONCURRENCY), find(MODES[3], TARGET_CONCURRENCY)
    limit_1, batched_1 = find(MODES[0], 1), find(MODES[3], 1)
    throughput = {"target": f"at concurrency {TARGET_CONCURRENCY}, Serve batching on >= {TARGET_SPEEDUP}x the "
                            f"plain FastAPI req/s, p99 < {TARGET_P99_MS:.0f} ms, no errors", "met": None}
    if plain and batched and not plain["rps"]:
        throughput.update(note="plain FastAPI answered no request with 200: nothing to compare against")
    elif plain and batched:
        speedup = batched["rps"] / plain["rps"]
        p99 = batched["p99_ms"]
        met = speedup >= TARGET_SPEEDUP and p99 is not None and p99 < TARGET_P99_MS and batched["errors"] == 0
        throughput.update(speedup=round(speedup, 3), p99_ms=None if p99 is None else round(p99, 1),
                          errors=batched["errors"], met=met)
    latency = {"target": f"at concurrency 1, Serve batching on p50 within {TARGET_P50_GAP_MS:.0f} ms of the "
                         "in-process limit", "met": None}
    if limit_1 and batched_1:
        if batched_1["p50_ms"] is None or limit_1["p50_ms"] is None:
            latency.update(gap_ms=None, met=False)
        else:
            gap = batched_1["p50_ms"] - limit_1["p50_ms"]
            latency.update(gap_ms=round(gap, 2), met=bool(gap <= TARGET_P50_GAP_MS))
    return [throughput, latency]


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", help="registry or version folder (default: export an untrained xraynet)")
    parser.add_argument("--payload", help=f"image file to send (default: {REAL_XRAY}, else synthetic)")
    parser.add_argument("--concurrency", default="1,8,32,64", help="comma-separated closed-loop worker counts")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each level")
    parser.add_argument("--max-requests", type=int, default=20_000, help="cap on measured requests per level")
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 2,
                        help="logical CPUs for Ray (2 = one Gateway and one Classifier replica, no upscaling)")
    parser.add_argument("--modes", default="a,b,c,d", help="which of a,b,c,d (the modes above) to run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_load.json"))
    parser.add_argument("--plain-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def serve_plain(port: int, artifact: str) -> int:
    import uvicorn

    uvicorn.run(plain_fastapi_app(artifact), host=HOST, port=port, workers=1, log_level="warning")
    return 0


def run_modes(args, artifact: str, body: bytes, levels: list[int], scratch: Path) -> list[dict]:
    """Every chosen mode at every level; servers and Ray stopped before it returns or raises."""
    chosen = {MODES["abcd".index(letter.strip())] for letter in args.modes.split(",")}
    rows: list[dict] = []
    plain = None
    try:
        if MODES[0] in chosen:
            from pneumonia.registry import load_artifact

            print(f"running: {MODES[0]}", flush=True)
            rows += run_levels(MODES[0], in_process_sender(load_artifact(artifact), body), levels, args)
        if MODES[1] in chosen:
            print(f"running: {MODES[1]}", flush=True)
            port = free_port()
            plain = start_plain_server(artifact, port, scratch / "plain_fastapi.log")
            rows += run_levels(MODES[1], http_sender(port, body), levels, args)
            stop_process(plain)
        serve_modes = [(MODES[2], 1), (MODES[3], 32)]
        if any(mode in chosen for mode, _ in serve_modes):
            port = start_ray(args.ray_cpus)
            for mode, batch in serve_modes:
                if mode in chosen:
                    print(f"running: {mode}", flush=True)
                    deploy(artifact, batch)
                    rows += run_levels(mode, http_sender(port, body), levels, args)
    finally:
        stop_process(plain)
        stop_ray()
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plain_server:
        return serve_plain(args.plain_server, args.artifact)
    levels = [int(level) for level in args.concurrency.split(",")]
    body, source = load_payload(args.payload)
    scratch = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    artifact = args.artifact or export_untrained_artifact(scratch)
    machine = {**machine_info(), "load_average_at_start": os.getloadavg()}
    print(f"payload: {source} ({len(body):,} bytes); artifact: {artifact}; levels {levels}, "
          f"{args.warmup:g} s warm-up + {args.duration:g} s per level; Ray CPUs {args.ray_cpus}", flush=True)
    print(HEADER, flush=True)
    rows = run_modes(args, artifact, body, levels, scratch)

    print(f"\n{HEADER}")
    for row in rows:
        print(format_row(row))
    checks = targets(rows)
    for check in checks:
        verdict = {True: "MET", False: "NOT MET", None: "not measured"}[check["met"]]
        details = ", ".join(f"{k}={v}" for k, v in check.items() if k not in ("target", "met"))
        print(f"target: {check['target']}: {verdict}" + (f" ({details})" if details else ""))
    machine["load_average_at_end"] = os.getloadavg()  # other work on the box skews every mode
    report = {
        "benchmark": "serve_load", "machine": machine, "payload": {"source": source, "bytes": len(body)},
        "artifact": artifact, "concurrency": levels, "warmup_s": args.warmup, "duration_s": args.duration,
        "max_requests_per_level": args.max_requests, "ray_cpus": args.ray_cpus, "results": rows, "targets": checks,
    }
    write_report(args.out, report)
    shutil.rmtree(scratch, ignore_errors=True)  # kept after a failure: it holds the plain server's log
    return 0


if __name__ == "__main__":
    sys.exit(main())
