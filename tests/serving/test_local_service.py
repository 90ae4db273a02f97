"""Starting the service: Serve's mode, `pneumonia serve` and `pneumonia predict` from the command line."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from pneumonia.cli import main
from pneumonia.serving import local_service as service
from tests.serving.test_serving import _free_port, _png


def test_throughput_mode_sets_haproxy_and_gives_each_process_its_own_haproxy_ports(monkeypatch):
    """Two services started together on one host (two demos) must not both take HAProxy's fixed
    default ports, which were free when each looked and taken by the time the second bound them."""
    monkeypatch.setattr(service, "haproxy_binary", lambda: "/usr/sbin/haproxy")
    first, second = {}, {}
    settings = service.enable_throughput_mode(first, drain_s=3)
    service.enable_throughput_mode(second)
    assert settings["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and settings["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert settings["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "3"
    ports = [int(env[name]) for env in (first, second) for name in service.HAPROXY_PORTS]
    assert len(set(ports)) == 4 and not {8404, 9101} & set(ports), ports
    assert service.uses_haproxy(first)


def test_without_haproxy_the_default_proxy_keeps_the_port(monkeypatch):
    monkeypatch.setattr(service, "haproxy_binary", lambda: None)
    environ = {}
    service.enable_throughput_mode(environ)
    assert environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"  # else nothing would listen on the port
    assert not service.uses_haproxy(environ)


def test_what_the_user_set_wins(monkeypatch):
    monkeypatch.setattr(service, "haproxy_binary", lambda: "/usr/sbin/haproxy")
    environ = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"}
    service.enable_throughput_mode(environ)
    assert environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0" and not service.uses_haproxy(environ)


def test_the_bundled_haproxy_is_found():
    binary = service.haproxy_binary()
    assert binary and os.access(binary, os.X_OK)


def test_serve_refuses_a_missing_artifact_before_starting_ray(tmp_path, capsys):
    started = time.monotonic()
    code = main(["serve", "--artifact", str(tmp_path / "nothing-here"), "--port", str(_free_port())])
    assert code != 0
    assert "nothing-here" in capsys.readouterr().err
    assert time.monotonic() - started < 30


def test_predict_reports_a_missing_file_and_an_unreachable_service(tmp_path, capsys):
    assert main(["predict", "--url", "http://127.0.0.1:9", str(tmp_path / "absent.jpeg")]) != 0
    assert "file not found" in capsys.readouterr().err
    image = tmp_path / "x.png"
    image.write_bytes(_png(np.full((32, 32), 80, np.uint8)))
    assert main(["predict", "--url", f"http://127.0.0.1:{_free_port()}", str(image), "--timeout", "5"]) != 0
    assert "cannot reach" in capsys.readouterr().err


def test_end_haproxy_ends_that_nodes_haproxy_and_nothing_else():
    """The sweep after a stop: HAProxy processes are told apart by the node folder their command
    line names (two fakes here: one of "our" node, one of another Ray on the machine)."""
    ours, theirs = "a" * 56, "b" * 56
    fakes = {node: subprocess.Popen(["bash", "-c", f'exec -a haproxy {sys.executable} -c "import time; time.sleep(600)" '
                                                   f"-db -f /tmp/haproxy-serve/{node}/haproxy.cfg"])
             for node in (ours, theirs)}
    try:
        deadline = time.monotonic() + 60
        while not all(service.haproxy_processes(node) == [fake.pid] for node, fake in fakes.items()):
            assert time.monotonic() < deadline, "the fakes never showed up as HAProxy processes"
            time.sleep(0.1)
        assert service.end_haproxy(ours) == [fakes[ours].pid]
        assert fakes[ours].wait(timeout=30) == -signal.SIGTERM
        assert fakes[theirs].poll() is None and service.haproxy_processes(ours) == []
        assert service.end_haproxy(None) == []
    finally:
        for fake in fakes.values():
            if fake.poll() is None:
                fake.kill()
            fake.wait()


class ServeProcess:
    """`python -m pneumonia serve` in its own session (a process group, as under systemd or in a
    container), with its output collected; killed if a test leaves it running."""

    def __init__(self, registry, port: int, *flags: str):
        self.port, self.url, self.lines = port, f"http://127.0.0.1:{port}", []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pneumonia", "serve", "--artifact", str(registry), "--port", str(port), *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "RAY_ADDRESS": ""},
            start_new_session=True)
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def __enter__(self):
        deadline = time.monotonic() + 600  # a busy machine starts Ray and HAProxy slowly
        while not any(line.startswith("serving ") for line in self.lines):
            assert self.process.poll() is None and time.monotonic() < deadline, self.output[-3000:]
            time.sleep(0.5)
        return self

    def __exit__(self, *_):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stopped(self, timeout_s: float = 300) -> int:
        """The exit status once it has stopped and its output is all read."""
        code = self.process.wait(timeout=timeout_s)
        self.reader.join(timeout=10)
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (session id, command line) of every process we may read."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat, open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                session = int(stat.read().rsplit(")", 1)[1].split()[4])
                found[int(entry)] = (session, cmdline.read().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _haproxy_on(port: int) -> set[int]:
    """PIDs of HAProxy processes whose configuration (named on their command line) binds ``port``."""
    found = set()
    for pid, (_, command) in _processes().items():
        words = command.split()
        if words and os.path.basename(words[0]) == "haproxy" and "-f" in words[:-1]:
            try:
                config = open(words[words.index("-f") + 1]).read()
            except OSError:
                continue
            if re.search(rf"^\s*bind\s+\S*:{port}(\s|$)", config, re.MULTILINE):
                found.add(pid)
    return found


def _assert_clean_stop(server: ServeProcess, code: int) -> None:
    """Exit 0 with no crash report, no process of the service left (HAProxy included), port closed."""
    output = server.output
    assert code == 0, output[-3000:]
    assert "service stopped" in output
    for noise in ("SIGTERM received", "graceful_shutdown failed", "Traceback", "Controller failed to shut down"):
        assert noise not in output, output[-3000:]
    deadline = time.monotonic() + 120  # Ray's workers notice their raylet is gone within seconds
    while left := {pid: command for pid, (session, command) in _processes().items() if session == server.process.pid}:
        assert time.monotonic() < deadline, f"left running: {left}"
        time.sleep(0.5)
    assert not _haproxy_on(server.port)
    with pytest.raises(OSError):  # the port is closed: nothing answers any more
        urllib.request.urlopen(f"{server.url}/healthz", timeout=5)


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_pneumonia_serve_answers_predict_then_stops_cleanly_on_ctrl_c(tmp_path):
    """The CLI path end to end in its own process: its own Ray, HAProxy, a prediction, Ctrl-C."""
    from tests.serving.test_serving_ops import _export

    artifact = _export(tmp_path / "registry", width=8)
    image = tmp_path / "xray.png"
    image.write_bytes(_png(np.random.default_rng(0).integers(0, 256, (80, 60), dtype=np.uint8)))
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"not an image")
    with ServeProcess(tmp_path / "registry", _free_port()) as server:
        client = subprocess.run([sys.executable, "-m", "pneumonia", "predict", "--url", server.url, str(image),
                                 str(bad), "--json"], capture_output=True, text=True, timeout=60)
        assert client.returncode == 1, client.stderr  # one of the two files was refused
        rows = json.loads(client.stdout.strip().splitlines()[-1])["predictions"]
        assert rows[0]["version"] == artifact.version and rows[0]["label"] in ("NORMAL", "PNEUMONIA")
        assert rows[1]["status"] == 400 and "not a recognised image" in rows[1]["error"]
        assert "this model was trained" not in server.output and "warning" not in rows[0]  # not synthetic
        server.process.send_signal(signal.SIGINT)
        _assert_clean_stop(server, server.stopped())


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_sigterm_to_the_whole_process_group_stops_cleanly_and_leaves_no_process(tmp_path):
    """systemd and container runtimes signal the service's whole process group, so Ray's GCS and
    raylet get the SIGTERM too; HAProxy (in a process group of its own) must not outlive them.
    The artifact says it was trained on synthetic data, and `pneumonia serve` says so at start."""
    from pneumonia.artifacts.publish import export_artifact
    from pneumonia.artifacts.registry import SYNTHETIC_WARNING
    from pneumonia.config import ExperimentConfig
    from tests.serving.test_serving_ops import _export

    registry = tmp_path / "registry"
    _export(registry, width=8)  # v0001, from the checkpoint ckpt-8 beside the registry
    export_artifact(str(tmp_path / "ckpt-8"), registry, threshold=0.5, target_recall=0.95, validation_metrics={},
                    training_config=ExperimentConfig().model_dump(), training_data={"synthetic": True})
    with ServeProcess(registry, _free_port()) as server:
        deadline = time.monotonic() + 60
        while not ((haproxy := _haproxy_on(server.port)) and "WARNING: this model" in server.output):
            assert time.monotonic() < deadline, f"HAProxy on the port: {haproxy}; output: {server.output[-2000:]}"
            time.sleep(0.5)
        assert f"WARNING: this model was {SYNTHETIC_WARNING}" in server.output
        os.killpg(server.process.pid, signal.SIGTERM)
        _assert_clean_stop(server, server.stopped())
    assert not any(os.path.exists(f"/proc/{pid}") for pid in haproxy)


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, list[str], dict]:
    """(status, the answer's X-Request-ID headers, JSON body) of one POST."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "image/png", **headers})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers.get_all("X-Request-ID") or [], json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get_all("X-Request-ID") or [], json.loads(error.read())


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_pneumonia_serve_with_tokens_and_an_audit_log(tmp_path):
    """What reviewers run: `pneumonia serve --token-file T --audit-log A`; /healthz is open, /predict
    is 401 without or with a wrong token and 200 with the right one (`pneumonia predict
    --token-file` too), and the audit log has one line per prediction request, with the image's
    SHA-256, the model's version and the answer's request id, and never the token."""
    from tests.serving.test_serving_ops import _export

    artifact = _export(tmp_path / "registry", width=8)
    token = "ward-7-" + "0123456789abcdef" * 2
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"ward-7:{token}\n")
    image = tmp_path / "xray.png"
    image.write_bytes(_png(np.random.default_rng(1).integers(0, 256, (80, 60), dtype=np.uint8)))
    body = image.read_bytes()
    audit = tmp_path / "audit" / "audit.jsonl"
    flags = ("--token-file", str(tokens), "--audit-log", str(audit))
    with ServeProcess(tmp_path / "registry", _free_port(), *flags) as server:
        with urllib.request.urlopen(f"{server.url}/healthz", timeout=30) as response:
            assert response.status == 200  # no token needed
        missing = _post(f"{server.url}/predict", body, {})
        wrong = _post(f"{server.url}/predict", body, {"Authorization": "Bearer " + "w" * 32})
        right = _post(f"{server.url}/predict", body, {"Authorization": f"Bearer {token}"})
        assert (missing[0], wrong[0], right[0]) == (401, 401, 200), (missing, wrong, right)
        assert "error" in missing[2] and right[2]["version"] == artifact.version
        assert all(len(answer[1]) == 1 for answer in (missing, wrong, right))  # one X-Request-ID each
        client = subprocess.run([sys.executable, "-m", "pneumonia", "predict", "--url", server.url, str(image),
                                 "--token-file", str(tokens), "--json"], capture_output=True, text=True, timeout=60)
        assert client.returncode == 0, client.stderr
        deadline = time.monotonic() + 60
        while len(lines := [json.loads(line) for path in sorted(audit.parent.glob("audit.*.jsonl"))
                            for line in path.read_text().splitlines()]) < 4:
            assert time.monotonic() < deadline, f"audit lines: {lines}; output: {server.output[-2000:]}"
            time.sleep(0.5)
        server.process.send_signal(signal.SIGINT)
        assert server.stopped() == 0, server.output[-3000:]
    assert "audit log: " in server.output and token not in server.output
    lines.sort(key=lambda line: line["time"])
    assert [line["status"] for line in lines] == [401, 401, 200, 200]
    assert [line["token"] for line in lines] == [None, None, "ward-7", "ward-7"]
    assert [line["request_id"] for line in lines[:3]] == [missing[1][0], wrong[1][0], right[1][0]]
    for line in lines:
        assert line["route"] == "/predict" and line["version"] == artifact.version and line["latency_ms"] >= 0
    for line in lines[2:]:
        (entry,) = line["images"]
        assert entry["sha256"] == hashlib.sha256(body).hexdigest() and entry["bytes"] == len(body)
        assert entry["label"] in ("NORMAL", "PNEUMONIA") and 0 <= entry["probability"] <= 1
    assert token not in "".join(path.read_text() for path in audit.parent.iterdir())
