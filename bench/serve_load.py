"""Serving under load: the in-process limit vs hand-written FastAPI servers vs our Ray Serve app.

Why: a request to the Serve app crosses processes (HAProxy or Serve's proxy, then the replica)
and waits to be batched; this measures whether decoding in parallel and batching pay for that
under concurrency, and how close a single request gets to the in-process latency.

Closed-loop load on loopback only: each of C workers sends one request, waits for the answer,
sends the next, over its own keep-alive connection, for a warm-up then `--duration` seconds (or
until `--max-requests` per level). The payload is a full-resolution real chest X-ray (a synthetic
1800x1400 grayscale JPEG when the shared data is absent). Modes, at each concurrency:

  a  in-process limit        decode_image + LoadedArtifact.predict on C threads, no HTTP
  b  hand-written FastAPI    one uvicorn process, what a user writes by hand: Pillow decodes the
                             whole image, converts and resizes it (as Keras' load_img does), then
                             the same compiled model; the blocking work in FastAPI's thread pool
  c  FastAPI + our decode    the same server calling pneumonia's decode_image (DCT-domain JPEG
                             downscaling): how much of the gap is decoding alone
  d  Serve, batching off     our app (max_batch_size 1), Serve's throughput mode (HAProxy)
  e  Serve, batching on      our app as shipped (max_batch_size 32, no batch wait), throughput mode
  f  Serve, default proxy    as e, under Serve's default Python proxy
  g  Serve, v2 binary        as e (the same server), the image sent to the Open Inference
                             Protocol's /v2/models/{name}/infer with the binary tensor extension
                             (Triton's client's default), outputs asked for in binary
  h  Serve, v2 JSON          as e (the same server), /v2/models/{name}/infer with the image
                             base64-encoded in JSON, JSON answer
  i  Serve, 2 replicas       as e with two replicas from the start (autoscaling min_replicas 2)

Each server runs in a child process started for its mode (Ray reads Serve's mode from the
environment when it starts); modes that run the same server (e, g, h) share one, in turn. Non-200 answers and failed requests count as errors. The targets
compare e with b. Prints a table and writes JSON.

With `--ensemble K` every chosen mode also runs against a K-member ensemble artifact
(pneumonia.models.ensemble: K copies of the benchmarked model averaged in one Keras model, exported the
way `pneumonia export` does; the weights do not change the cost), right after the same mode on the
single model, so both see the same background load. The table's `model` column tells them apart,
and `ensemble_cost` in the JSON gives the ensemble's req/s and p50 relative to the single model's.

With `--guard` every chosen mode also runs against the same model exported with an
out-of-distribution guard (pneumonia.models.ood: the signature adds `ood_score`, computed from the same
forward pass; the guard's numbers do not change its cost), labelled `guard on`; `ensemble_cost`
then also gives the guard's req/s and p50 relative to the model without it (`single`).

Every row also gives the CPU time per answered request (`cpu_ms_per_request`), summed over this
process (the load generator, and in mode a the whole work) and every process under the server
(HAProxy, the replicas, Ray's own), with the split by process in `cpu_ms_by_process`: on a box
shared with other work, req/s and latency move with the neighbours, CPU per request much less.
`--serve-options JSON` passes Serve deployment options to every Serve mode (experiments).

    python bench/serve_load.py [--artifact PATH] [--concurrency 1,8,32,64] [--duration 8] [--modes a,b,e,g]
                               [--ensemble 3] [--guard] [--serve-options JSON]
"""

# No `from __future__ import annotations`: FastAPI must see the real Request type in the plain
# server's route, which is defined inside a function.
import argparse
import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pneumonia import runtime

runtime.activate()  # an entry point: legacy Keras and quiet logs before anything imports TensorFlow


from bench_report import machine_info, write_report

from pneumonia.local_ray import free_port
from pneumonia.runtime import RAY_ENV

ROOT = Path(__file__).resolve().parents[1]
REAL_XRAY = ROOT.parent / "shared" / "data" / "chest_xray_val16" / "NORMAL" / "NORMAL2-IM-1427-0001.jpeg"
HOST = "127.0.0.1"
REQUEST_TIMEOUT_S = 30
SERVER_START_TIMEOUT_S = 180
TARGET_SPEEDUP, TARGET_P99_MS, TARGET_P50_GAP_MS, TARGET_CONCURRENCY = 2.0, 1500.0, 5.0, 32
MODES = {"a": "in-process limit", "b": "hand-written FastAPI", "c": "FastAPI + our decode",
         "d": "Serve, batching off", "e": "Serve, batching on", "f": "Serve, default proxy",
         "g": "Serve, v2 binary", "h": "Serve, v2 JSON", "i": "Serve, 2 replicas"}
# max_batch_size, throughput mode, replicas (at least); modes with the same triple share a server.
SERVE_MODES = {"d": (1, True, 1), "e": (32, True, 1), "f": (32, False, 1), "g": (32, True, 1), "h": (32, True, 1),
               "i": (32, True, 2)}
SERVER_OF = {letter: min(other for other in SERVE_MODES if SERVE_MODES[other] == config)
             for letter, config in SERVE_MODES.items()}  # the server mode that starts each mode's server


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
    from pneumonia.artifacts.publish import export_artifact
    from pneumonia.config import ExperimentConfig, ModelConfig
    from pneumonia.data.preprocess import PreprocessSpec
    from pneumonia.models.architectures import build_model, compile_model
    from pneumonia.models.checkpoint import CheckpointInfo, save_checkpoint

    model = build_model(ModelConfig(name="xraynet", width=32), (150, 150, 1))
    compile_model(model, "adam", 1e-3)
    save_checkpoint(root / "ckpt", model, CheckpointInfo(epoch=1, config=ExperimentConfig().model_dump(),
                                                         preprocess=PreprocessSpec(150, 1), metrics={}))
    export_artifact(str(root / "ckpt"), root / "registry", threshold=0.5, target_recall=0.95,
                    validation_metrics={}, training_config=ExperimentConfig().model_dump())
    return str(root / "registry")


def export_ensemble_artifact(artifact: str, members: int, root: Path) -> str:
    """A registry holding a `members`-member ensemble of the artifact's Keras model, with the same
    name, threshold and input spec: what `pneumonia export` makes of a combined checkpoint."""
    from pneumonia.artifacts.publish import export_artifact
    from pneumonia.artifacts.registry import load_artifact
    from pneumonia.models.checkpoint import CheckpointInfo, save_checkpoint
    from pneumonia.models.ensemble import combine_checkpoints

    single = load_artifact(artifact)
    training_config = single.metadata.get("training_config") or {}
    member = save_checkpoint(root / "member", single.keras_model(),
                             CheckpointInfo(epoch=1, config=training_config, preprocess=single.preprocess, metrics={}))
    combined = combine_checkpoints([str(member)] * members, str(root / "ensemble-ckpt"))
    export_artifact(combined, root / "ensemble-registry", threshold=single.threshold,
                    target_recall=single.metadata.get("target_recall", 0.95), validation_metrics={},
                    training_config=training_config, name=single.name)
    return str(root / "ensemble-registry")


def export_guarded_artifact(artifact: str, body: bytes, root: Path) -> str:
    """The artifact's model exported again with an out-of-distribution guard. Its cost depends on
    the feature count, not on the numbers: it is fitted on random frames and the payload, with a
    threshold that lets the payload through (every request is then answered, as without it)."""
    import numpy as np

    from pneumonia.artifacts.publish import export_artifact
    from pneumonia.artifacts.registry import load_artifact
    from pneumonia.data.preprocess import decode_image
    from pneumonia.models.checkpoint import CheckpointInfo, save_checkpoint
    from pneumonia.models.ood import features_and_probabilities, fit_guard, model_with_features

    single = load_artifact(artifact)
    model = single.keras_model()
    frames = np.random.default_rng(0).integers(0, 256, (64, *single.preprocess.shape), dtype=np.uint8)
    frames[0] = decode_image(body, single.preprocess)
    features, _ = features_and_probabilities(model_with_features(model), frames)
    guard = fit_guard(features, np.arange(len(features)) % 2, features[:1])
    guard.threshold = 2 * guard.threshold + 1.0  # the payload passes whatever the float rounding
    training_config = single.metadata.get("training_config") or {}
    checkpoint = save_checkpoint(root / "guarded", model, CheckpointInfo(
        epoch=1, config=training_config, preprocess=single.preprocess, metrics={}))
    export_artifact(str(checkpoint), root / "guarded-registry", threshold=single.threshold,
                    target_recall=single.metadata.get("target_recall", 0.95), validation_metrics={},
                    training_config=training_config, guard=guard, name=single.name)
    return str(root / "guarded-registry")


# ----------------------------------------------------------------------------- load generator


def cpu_seconds(root: int | None = None) -> dict[str, float]:
    """CPU seconds (user + system) used so far by this process (``client``) and, with ``root``, by
    every process under the server process ``root`` (HAProxy, the replicas, Ray's own), by name.
    CPU per request is what a busy box cannot skew much: other work there changes how long a
    request waits, much less how much CPU it takes."""
    tick = os.sysconf("SC_CLK_TCK")
    used = {"client": sum(os.times()[:2])}
    if root is None:
        return used
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    text = handle.read()
            except OSError:
                continue
            name, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
            stats[int(entry)] = (int(fields[1]), name, (int(fields[11]) + int(fields[12])) / tick)
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid in stats:
            name = process_kind(stats[pid][1])
            used[name] = used.get(name, 0.0) + stats[pid][2]
        stack += children.get(pid, [])
    return used


def process_kind(name: str) -> str:
    """A short name for a server-side process (/proc's 15-character comm)."""
    lowered = name.lower()
    for kind, marks in (("replica", ("serverepl", "replica")), ("haproxy", ("haproxy",)), ("raylet", ("raylet",)),
                        ("gcs", ("gcs",)), ("serve proxy", ("proxy",)), ("controller", ("contr",))):
        if any(mark in lowered for mark in marks):
            return kind
    return "server" if lowered.startswith("python") else "ray other"


def closed_loop(make_sender: Callable[[], Callable[[], bool]], concurrency: int, warmup_s: float,
                duration_s: float, max_requests: int, server_pid: int | None = None) -> dict:
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
    time.sleep(max(0.0, window_start - time.perf_counter()))
    cpu_before = cpu_seconds(server_pid)
    for thread in threads:
        thread.join()
    cpu_after = cpu_seconds(server_pid)
    elapsed = time.perf_counter() - window_start
    summary = summarise(samples, concurrency, elapsed)
    answered = sum(ok for _, ok in samples) or 1
    by_kind = {kind: (cpu_after[kind] - cpu_before.get(kind, 0.0)) * 1000 / answered for kind in cpu_after}
    summary["cpu_ms_per_request"] = round(sum(by_kind.values()), 2)
    summary["cpu_ms_by_process"] = {kind: round(value, 2) for kind, value in sorted(by_kind.items())}
    return summary


def summarise(samples: list[tuple[float, bool]], concurrency: int, elapsed_s: float) -> dict:
    """Throughput of good answers, latency percentiles of good answers (ms), error count."""
    good = np.array([latency for latency, ok in samples if ok]) * 1000
    percentiles = [float(p) for p in np.percentile(good, [50, 95, 99])] if len(good) else [None] * 3
    return {"concurrency": concurrency, "requests": len(samples), "errors": len(samples) - len(good),
            "seconds": round(elapsed_s, 3), "rps": len(good) / elapsed_s,
            **dict(zip(("p50_ms", "p95_ms", "p99_ms"), percentiles))}


def v2_request(body: bytes, binary: bool) -> tuple[bytes, dict[str, str]]:
    """The image as one Open Inference Protocol request, as Triton's HTTP client sends it: with the
    binary tensor extension (a JSON header, then the BYTES element: 4-byte length + the file;
    outputs asked for in binary), or all JSON (the file base64-encoded)."""
    import base64
    import struct

    if not binary:
        payload = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                               "data": [base64.b64encode(body).decode()]}]}
        return json.dumps(payload).encode(), {"Content-Type": "application/json"}
    raw = struct.pack("<I", len(body)) + body
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + raw, {"Content-Type": "application/octet-stream",
                          "Inference-Header-Content-Length": str(len(header))}


def http_sender(port: int, body: bytes, path: str = "/predict",
                content_type: dict[str, str] | None = None) -> Callable[[], Callable[[], bool]]:
    """Senders that POST the payload to `path` over one keep-alive connection per worker."""
    headers = {**(content_type or {"Content-Type": "image/jpeg"}), "Content-Length": str(len(body))}

    def make() -> Callable[[], bool]:
        connection = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)

        def send() -> bool:
            try:
                connection.request("POST", path, body, headers)
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
    from pneumonia.data.preprocess import decode_image

    def send() -> bool:
        image = decode_image(body, artifact.preprocess)
        artifact.predict(image[None])
        return True

    return lambda: send


def run_levels(mode: str, model: str, make_sender, levels: list[int], args, server_pid: int | None = None) -> list[dict]:
    rows = []
    for concurrency in levels:
        row = closed_loop(make_sender, concurrency, args.warmup, args.duration, args.max_requests, server_pid)
        rows.append({"mode": mode, "model": model, **row})
        print(format_row(rows[-1]), flush=True)
    return rows


# ----------------------------------------------------------------------------- servers


def hand_written_decode(spec):
    """Decode as a Keras user would by hand: the whole image with Pillow, convert, resize."""
    from PIL import Image

    def decode(data: bytes) -> np.ndarray:
        image = Image.open(io.BytesIO(data)).convert("L" if spec.channels == 1 else "RGB")
        image = image.resize((spec.image_size, spec.image_size))
        return np.asarray(image, np.uint8).reshape(spec.shape)

    return decode


def plain_fastapi_app(artifact_path: str, our_decode: bool):
    """A single-process FastAPI server: decode, predict, answer; no batching."""
    from fastapi import FastAPI, Request
    from starlette.concurrency import run_in_threadpool

    from pneumonia.artifacts.registry import load_artifact
    from pneumonia.data.labels import CLASS_NAMES
    from pneumonia.data.preprocess import decode_image

    artifact = load_artifact(artifact_path)
    decode = (lambda data: decode_image(data, artifact.preprocess)) if our_decode \
        else hand_written_decode(artifact.preprocess)
    app = FastAPI()

    def classify(data: bytes) -> float:
        return float(artifact.predict(decode(data)[None])[0])

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(request: Request):
        probability = await run_in_threadpool(classify, await request.body())
        return {"label": CLASS_NAMES[int(probability >= artifact.threshold)], "probability": probability}

    return app


def serve_plain(port: int, artifact: str, our_decode: bool) -> int:
    import uvicorn

    uvicorn.run(plain_fastapi_app(artifact, our_decode), host=HOST, port=port, workers=1, log_level="warning")
    return 0


def serve_with_ray(port: int, artifact: str, max_batch_size: int, throughput_mode: bool, cpus: int,
                   replicas: int = 1, deployment_options: dict | None = None) -> int:
    """Our app on a local Ray until SIGTERM. Ray starts worker processes at nice 15 unless told
    otherwise (`ray job submit` sets 0): replicas would then lose the CPU to the load generator."""
    import signal

    import ray

    from pneumonia.serving.local_service import enable_throughput_mode

    os.environ.setdefault("RAY_worker_niceness", "0")
    if throughput_mode:
        enable_throughput_mode(drain_s=2)
    else:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "0"
    from ray import serve

    from pneumonia.serving import Classifier, build_app

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": RAY_ENV})
    try:
        serve.start(http_options={"host": HOST, "port": port})
        app = build_app({"artifact": artifact, "max_batch_size": max_batch_size, "no_auth": True})
        if replicas > 1:  # the shipped autoscaling, starting at `replicas`
            bound = app._bound_deployment
            shipped = Classifier._deployment_config.autoscaling_config
            scaling = {"min_replicas": replicas, "initial_replicas": replicas,
                       "max_replicas": max(replicas, shipped.max_replicas),
                       "target_ongoing_requests": shipped.target_ongoing_requests,
                       "upscale_delay_s": shipped.upscale_delay_s, "downscale_delay_s": shipped.downscale_delay_s}
            app = Classifier.options(autoscaling_config=scaling).bind(*bound.init_args, **bound.init_kwargs)
        if deployment_options:  # an experiment: --serve-options
            bound = app._bound_deployment
            app = bound.options(**deployment_options).bind(*bound.init_args, **bound.init_kwargs)
        serve.run(app, name="pneumonia", route_prefix="/")
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()


def start_server(arguments: list[str], port: int, log: Path) -> subprocess.Popen:
    """This script, re-run as a server on `port` with `arguments`; returns once it answers."""
    command = [sys.executable, __file__, "--server", str(port), *arguments]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(port, process, log)
    except BaseException:
        stop_process(process)
        raise
    return process


def wait_until_healthy(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}); see {log}")
        try:
            connection = http.client.HTTPConnection(HOST, port, timeout=2)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer within {SERVER_START_TIMEOUT_S} s; see {log}")


def stop_process(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=90)  # Serve drains its replicas before it stops
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ----------------------------------------------------------------------------- report


SINGLE = "single"


def format_row(row: dict) -> str:
    latencies = "".join(f"{'-' if row[key] is None else f'{row[key]:.1f}':>10}"
                        for key in ("p50_ms", "p95_ms", "p99_ms"))
    return (f"{row['mode']:<22}{row['model']:<13}{row['concurrency']:>5}{row['rps']:>10.1f}{latencies}"
            f"{row['errors']:>8}{row.get('cpu_ms_per_request', 0):>10.2f}  "
            + " ".join(f"{kind} {value:.2f}" for kind, value in row.get("cpu_ms_by_process", {}).items()))


HEADER = (f"{'mode':<22}{'model':<13}{'conc':>5}{'req/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}"
          f"{'errors':>8}{'CPU ms/req':>10}  (by process)")


GUARDED = "guard on"


def ensemble_label(members: int) -> str:
    return f"ensemble x{members}"


def ensemble_cost(rows: list[dict]) -> list[dict]:
    """Per mode and concurrency, the ensemble's req/s and p50 as ratios to the single model's."""
    single = {(r["mode"], r["concurrency"]): r for r in rows if r["model"] == SINGLE}
    costs = []
    for row in rows:
        base = single.get((row["mode"], row["concurrency"]))
        if row["model"] == SINGLE or base is None:
            continue
        costs.append({
            "mode": row["mode"], "model": row["model"], "concurrency": row["concurrency"],
            "rps_ratio": round(row["rps"] / base["rps"], 3) if base["rps"] else None,
            "p50_ratio": (round(row["p50_ms"] / base["p50_ms"], 3)
                          if row["p50_ms"] is not None and base["p50_ms"] else None),
        })
    return costs


def targets(rows: list[dict]) -> list[dict]:
    """The two targets (single model only), each with the measured numbers and whether it is met
    (None: not measured)."""
    def find(mode, concurrency):
        return next((r for r in rows if r["mode"] == mode and r["model"] == SINGLE
                     and r["concurrency"] == concurrency), None)

    plain, batched = find(MODES["b"], TARGET_CONCURRENCY), find(MODES["e"], TARGET_CONCURRENCY)
    limit_1, batched_1 = find(MODES["a"], 1), find(MODES["e"], 1)
    throughput = {"target": f"at concurrency {TARGET_CONCURRENCY}, Serve batching on >= {TARGET_SPEEDUP}x the "
                            f"hand-written FastAPI req/s, p99 < {TARGET_P99_MS:.0f} ms, no errors", "met": None}
    if plain and batched and not plain["rps"]:
        throughput.update(note="hand-written FastAPI answered no request with 200: nothing to compare against")
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
                        help="logical CPUs for Ray (each replica takes 1)")
    parser.add_argument("--modes", default="a,b,c,d,e,f", help="which of a..f (the modes above) to run")
    parser.add_argument("--ensemble", type=int, metavar="K",
                        help="also run every mode on a K-member ensemble of the model (K >= 1)")
    parser.add_argument("--guard", action="store_true",
                        help="also run every mode on the model exported with an out-of-distribution guard")
    parser.add_argument("--serve-options", type=json.loads, default=None, metavar="JSON",
                        help="Serve deployment options for every Serve mode, e.g. "
                             "'{\"logging_config\": {\"enable_access_log\": false}}' (an experiment)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_load.json"))
    parser.add_argument("--server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--server-mode", choices=sorted(MODES)[1:], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.modes.replace(" ", "").split(",")) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")
    if args.ensemble is not None and args.ensemble < 1:
        parser.error(f"--ensemble needs at least one member, got {args.ensemble}")
    return args


def run_server(args) -> int:
    """The child process side: serve `args.server_mode` on port `args.server`."""
    if args.server_mode in ("b", "c"):
        return serve_plain(args.server, args.artifact, our_decode=args.server_mode == "c")
    max_batch_size, throughput_mode, replicas = SERVE_MODES[args.server_mode]
    return serve_with_ray(args.server, args.artifact, max_batch_size, throughput_mode, args.ray_cpus, replicas,
                          args.serve_options)


def sender_for(letter: str, port: int, body: bytes, model_name: str):
    if letter in ("g", "h"):
        payload, content_type = v2_request(body, binary=letter == "g")
        return http_sender(port, payload, f"/v2/models/{model_name}/infer", content_type)
    return http_sender(port, body)


def run_modes(args, artifacts: dict[str, str], body: bytes, levels: list[int], scratch: Path) -> list[dict]:
    """Every chosen mode at every level, for each artifact (label -> path) in turn; each server
    stopped before the next starts. Modes that run the same server (e, g, h) run on one, one
    after the other, so that only the request format differs between them."""
    from pneumonia.artifacts.registry import load_artifact

    wanted = args.modes.replace(" ", "").split(",")
    chosen = [letter for letter in MODES if letter in wanted]
    groups: dict[str, list[str]] = {}
    for letter in chosen:
        groups.setdefault(SERVER_OF.get(letter, letter), []).append(letter)
    rows: list[dict] = []
    for server_letter, letters in groups.items():
        for index, (model, artifact) in enumerate(artifacts.items()):
            loaded = load_artifact(artifact)
            if server_letter == "a":
                print(f"running: {MODES['a']} ({model})", flush=True)
                rows += run_levels(MODES["a"], model, in_process_sender(loaded, body), levels, args)
                continue
            port = free_port()
            options = ["--serve-options", json.dumps(args.serve_options)] if args.serve_options else []
            server = start_server(["--server-mode", server_letter, "--artifact", artifact, "--ray-cpus",
                                   str(args.ray_cpus), *options], port, scratch / f"server-{server_letter}-{index}.log")
            try:
                for letter in letters:
                    print(f"running: {MODES[letter]} ({model})", flush=True)
                    rows += run_levels(MODES[letter], model, sender_for(letter, port, body, loaded.name), levels, args,
                                       server.pid)
            finally:
                stop_process(server)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.server:
        return run_server(args)
    levels = [int(level) for level in args.concurrency.split(",")]
    body, source = load_payload(args.payload)
    scratch = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    artifact = args.artifact or export_untrained_artifact(scratch)
    artifacts = {SINGLE: artifact}
    if args.ensemble:
        artifacts[ensemble_label(args.ensemble)] = export_ensemble_artifact(artifact, args.ensemble, scratch)
    if args.guard:
        artifacts[GUARDED] = export_guarded_artifact(artifact, body, scratch)
    machine = {**machine_info(), "load_average_at_start": os.getloadavg()}
    print(f"payload: {source} ({len(body):,} bytes); artifacts: {artifacts}; levels {levels}, "
          f"{args.warmup:g} s warm-up + {args.duration:g} s per level; Ray CPUs {args.ray_cpus}", flush=True)
    print(HEADER, flush=True)
    rows = run_modes(args, artifacts, body, levels, scratch)

    print(f"\n{HEADER}")
    for row in rows:
        print(format_row(row))
    costs = ensemble_cost(rows)
    for cost in costs:
        print(f"cost of the {cost['model']} ({cost['mode']}, concurrency {cost['concurrency']}): "
              f"req/s x{cost['rps_ratio']}, p50 x{cost['p50_ratio']} vs the single model")
    checks = targets(rows)
    for check in checks:
        verdict = {True: "MET", False: "NOT MET", None: "not measured"}[check["met"]]
        details = ", ".join(f"{k}={v}" for k, v in check.items() if k not in ("target", "met"))
        print(f"target: {check['target']}: {verdict}" + (f" ({details})" if details else ""))
    machine["load_average_at_end"] = os.getloadavg()  # other work on the box skews every mode
    ensemble = None
    if args.ensemble:
        ensemble = {"members": args.ensemble, "artifact": artifacts[ensemble_label(args.ensemble)]}
    report = {
        "benchmark": "serve_load", "machine": machine, "payload": {"source": source, "bytes": len(body)},
        "artifact": artifact, "ensemble": ensemble, "concurrency": levels, "warmup_s": args.warmup,
        "duration_s": args.duration, "max_requests_per_level": args.max_requests, "ray_cpus": args.ray_cpus,
        "guard": artifacts.get(GUARDED), "serve_options": args.serve_options, "results": rows, "ensemble_cost": costs, "targets": checks,
    }
    write_report(args.out, report)
    shutil.rmtree(scratch, ignore_errors=True)  # kept after a failure: it holds the servers' logs
    return 0


if __name__ == "__main__":
    sys.exit(main())
