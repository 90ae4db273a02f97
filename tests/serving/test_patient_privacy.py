"""No patient identifier leaks: DICOMs carrying a made-up identity go through every route and command.

The files (tests/patient_dicoms.py: a valid X-ray and broken ones) are sent to a running service
(``POST /predict`` raw and multipart, ``POST /explain`` with and without layers, the Open Inference
Protocol's ``infer`` with BYTES input; the review page calls these same routes) and through
``pneumonia predict`` and ``pneumonia score``. Then every answer, the commands' output, the Grad-CAM
PNGs, the score rows, the Ray session's logs (Serve's access and replica logs, the workers'),
the metrics Ray exports and the service's audit log (when the app takes ``audit_log``) are
searched for every identifying value.

A multipart part's file name is the client's own data and comes back in its answer (``file``),
so answers are searched for header values only; logs, metrics and the audit log for the file
name too.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from PIL import Image

from tests.patient_dicoms import FILE_NAME, FILE_NEEDLES, NEEDLES, leaks, patient_dicoms
from tests.serving.test_serving import _free_port, request
from tests.serving.test_serving_ops import _export

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]
pytest.importorskip("pydicom")

ALL_NEEDLES = (*NEEDLES, *FILE_NEEDLES)


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("privacy") / "registry"
    _export(root, width=8)
    return root


@pytest.fixture(scope="module")
def service(ray_cluster, registry, tmp_path_factory):
    """(url, audit log path or None): the app with an audit log when build_app takes one."""
    from ray import serve

    from pneumonia.serving import build_app

    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    try:
        app = build_app({"artifact": str(registry), "audit_log": str(audit)})
    except ValueError as error:  # an app without an audit log: "unknown application arguments"
        if "audit_log" not in str(error):
            raise
        app, audit = build_app({"artifact": str(registry)}), None
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name="privacy", route_prefix="/")
    yield f"http://127.0.0.1:{port}", audit
    serve.delete("privacy")
    serve.shutdown()


def _multipart(parts: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n" for name, data in parts)
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _pngs(answer) -> list[bytes]:
    """Every base64 PNG in an answer (Grad-CAM overlay and layers), decoded."""
    found = []
    if isinstance(answer, dict):
        for key, value in answer.items():
            if key.endswith("_png") and isinstance(value, str):
                found.append(base64.b64decode(value))
            else:
                found += _pngs(value)
    elif isinstance(answer, list):
        for value in answer:
            found += _pngs(value)
    return found


def _without_pngs(answer):
    if isinstance(answer, dict):
        return {key: _without_pngs(value) for key, value in answer.items() if not key.endswith("_png")}
    return [_without_pngs(value) for value in answer] if isinstance(answer, list) else answer


@pytest.fixture(scope="module")
def exercised(service, registry, tmp_path_factory):
    """Every route and command fed every file: {what: text it produced}, and the PNGs drawn."""
    import pneumonia.cli.common
    from pneumonia.cli import build_parser
    from pneumonia.errors import PneumoniaError

    url, _ = service
    files = patient_dicoms()
    answers: dict[str, str] = {}
    pngs: list[bytes] = []

    def record(what: str, status: int, answer) -> None:
        pictures = _pngs(answer)  # searched decoded (test_gradcam_pictures_carry_no_text), not as base64
        answers[what] = f"{status} {json.dumps(_without_pngs(answer))}"
        pngs.extend(pictures)

    for name, data in files.items():
        record(f"predict {name}", *request(f"{url}/predict", data, "application/dicom"))
        record(f"explain {name}", *request(f"{url}/explain", data, "application/dicom"))
        record(f"explain layers {name}", *request(f"{url}/explain?layers=true", data, "application/dicom"))
        payload = json.dumps({"id": "q1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                      "data": [base64.b64encode(data).decode()]}]}).encode()
        record(f"infer {name}", *request(f"{url}/v2/models/pneumonia-cnn/infer", payload, "application/json"))
        body, content_type = _multipart([(FILE_NAME, data)])
        record(f"multipart predict {name}", *request(f"{url}/predict", body, content_type))
        record(f"multipart explain {name}", *request(f"{url}/explain", body, content_type))
    body, content_type = _multipart([(FILE_NAME, files["valid"]), (f"other-{FILE_NAME}", files["valid"])])
    record("multipart predict two", *request(f"{url}/predict", body, content_type))
    for route in ("/model", "/healthz", "/v2/models/pneumonia-cnn"):
        record(f"GET {route}", *request(f"{url}{route}"))
    assert answers["predict valid"].startswith("200") and answers["explain valid"].startswith("200")
    assert answers["predict no-pixel-data"].startswith("400")

    folder = tmp_path_factory.mktemp("dicoms")
    for name, data in files.items():
        (folder / f"{name}.dcm").write_bytes(data)
    (folder / FILE_NAME).write_bytes(files["truncated-pixels"])
    commands: dict[str, str] = {}
    parser = build_parser()
    out = io.StringIO()

    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        args = parser.parse_args(["predict", "--url", url, str(folder)])
        try:
            args.func(args)
        except PneumoniaError as error:  # some files are refused: that is the command's last line
            print(f"error: {error}")
    commands["pneumonia predict"] = out.getvalue()

    output = folder.parent / "scores.csv"
    out = io.StringIO()
    keep = pneumonia.cli.common.KEEP_RAY
    pneumonia.cli.common.KEEP_RAY = True  # the session's Ray stays up
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            args = parser.parse_args(["score", "--artifact", str(registry), "--input", str(folder),
                                      "--output", str(output), "--concurrency", "1"])
            args.func(args)
    finally:
        pneumonia.cli.common.KEEP_RAY = keep
    commands["pneumonia score"] = out.getvalue()
    commands["score rows"] = output.read_text()
    return answers, pngs, commands


def test_answers_name_no_header_value(exercised):
    answers, _, _ = exercised
    leaked = {what: leaks(text) for what, text in answers.items() if leaks(text)}
    assert not leaked, leaked
    # the multipart file name is the sender's own: it comes back to it, as `file` and in errors
    assert '"file": "Brightwater_Hollis.dcm"' in answers["multipart predict valid"]


def test_gradcam_pictures_carry_no_text(exercised):
    """Header values never reach the pixels; the PNGs carry no text chunks either."""
    _, pngs, _ = exercised
    assert pngs
    for png in pngs:
        assert not leaks(png)
        image = Image.open(io.BytesIO(png))
        assert not getattr(image, "text", {}) and not leaks(json.dumps(image.info, default=str))


def test_commands_print_no_header_value(exercised):
    _, _, commands = exercised
    assert "scored" in commands["pneumonia score"] and "valid.dcm" in commands["score rows"]
    leaked = {what: leaks(text) for what, text in commands.items() if leaks(text)}
    assert not leaked, leaked


def test_logs_metrics_and_the_audit_log_name_neither_header_values_nor_file_names(exercised, service,
                                                                                ray_cluster):
    import ray

    url, audit = service
    request(f"{url}/healthz")
    time.sleep(3)  # Serve and Ray write their log lines asynchronously
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    scanned, leaked = [], {}
    for path in sorted(logs.rglob("*")):
        if path.is_file():
            scanned.append(path)
            found = leaks(path.read_bytes(), ALL_NEEDLES)
            if found:
                leaked[str(path.relative_to(logs))] = found
    assert not leaked, leaked
    assert any(path.parent.name == "serve" and "replica" in path.name for path in scanned)  # the replicas' logs

    port = ray_cluster.metrics_export_port
    if port:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert not leaks(metrics, ALL_NEEDLES)
    if audit is not None:  # one file per replica beside the path given (pneumonia.serving.audit)
        deadline = time.monotonic() + 30
        while not any(path.stat().st_size for path in audit.parent.glob("*")) and time.monotonic() < deadline:
            time.sleep(0.5)  # a replica's writer thread writes its lines in the background
        written = b"".join(path.read_bytes() for path in audit.parent.glob("*") if path.is_file())
        assert written.count(b"\n") >= 10, written[:500]  # a line per prediction request, at least
        assert not leaks(written, ALL_NEEDLES)
