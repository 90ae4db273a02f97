"""Starting the service: Serve's mode, `pneumonia serve` and `pneumonia predict` from the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from pneumonia import service
from pneumonia.cli import main
from tests.test_serving import _free_port, _png


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


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_pneumonia_serve_answers_predict_then_stops_cleanly_on_ctrl_c(tmp_path):
    """The CLI path end to end in its own process: its own Ray, HAProxy, a prediction, Ctrl-C."""
    from tests.test_serving_ops import _export

    artifact = _export(tmp_path / "registry", width=8)
    image = tmp_path / "xray.png"
    image.write_bytes(_png(np.random.default_rng(0).integers(0, 256, (80, 60), dtype=np.uint8)))
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"not an image")
    port = _free_port()
    env = {**os.environ, "RAY_ADDRESS": ""}
    server = subprocess.Popen([sys.executable, "-m", "pneumonia", "serve", "--artifact", str(tmp_path / "registry"),
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 600  # a busy machine starts Ray and HAProxy slowly
        while not any(line.startswith("serving ") for line in lines):
            assert server.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}"
        client = subprocess.run([sys.executable, "-m", "pneumonia", "predict", "--url", url, str(image), str(bad),
                                 "--json"], capture_output=True, text=True, timeout=60)
        assert client.returncode == 1, client.stderr  # one of the two files was refused
        rows = json.loads(client.stdout.strip().splitlines()[-1])["predictions"]
        assert rows[0]["version"] == artifact.version and rows[0]["label"] in ("NORMAL", "PNEUMONIA")
        assert rows[1]["status"] == 400 and "not a recognised image" in rows[1]["error"]
        server.send_signal(signal.SIGINT)
        server.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    output = "".join(lines)
    assert server.returncode == 0, output[-3000:]
    assert "service stopped" in output
    with pytest.raises(OSError):  # the port is closed: nothing answers any more
        urllib.request.urlopen(f"{url}/healthz", timeout=5)
