"""Every subcommand's failure paths: one `error: ...` line on stderr, exit 1 (input, environment)
or 2 (usage), before any slow work (TensorFlow, Ray), never a traceback (issue 11).

The in-process tests replace what must not run (Ray's start, a model's load) with a function that
fails the test, so "before Ray starts" is checked without a clock.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumonia.cli import main
from pneumonia.serving.local_service import (
    local_service as _real_local_service,  # kept before the fixture below patches it
)
from tests.helpers import run_cli


def assert_one_line_error(code: int, err: str, expected_code: int, *fragments: str) -> None:
    assert code == expected_code, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def must_not_run(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} ran, but the error should have been found before it")

    return fail


def _jpeg(seed: int = 0, size: int = 40) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _class_folders(root: Path, normal: bytes | None, pneumonia_: bytes | None, n: int = 6) -> Path:
    """root/NORMAL and root/PNEUMONIA with n files each: real JPEGs, or the given junk bytes."""
    for label, content in (("NORMAL", normal), ("PNEUMONIA", pneumonia_)):
        (root / label).mkdir(parents=True)
        for index in range(n):
            name = f"IM-{index:04d}-0001.jpeg" if label == "NORMAL" else f"person{index}_virus_{index}.jpeg"
            (root / label / name).write_bytes(content if content is not None else _jpeg(index))
    return root


def _fake_artifact(registry: Path, corrupt: str | None = None, missing: str | None = None) -> Path:
    """A registry with one version whose metadata and sha256s are right (no real model is needed:
    the checks under test run before TensorFlow), then one file changed or removed."""
    version = registry / "pneumonia-cnn" / "v0001"
    files = {"model.keras": b"keras bytes", "saved_model/saved_model.pb": b"graph bytes"}
    for relative, content in files.items():
        (version / relative).parent.mkdir(parents=True, exist_ok=True)
        (version / relative).write_bytes(content)
    metadata = {
        "name": "pneumonia-cnn", "version": "v0001", "format_version": 1, "classes": ["NORMAL", "PNEUMONIA"],
        "threshold": 0.5, "input": {"image_size": 32, "channels": 1, "resize": "stretch", "dtype": "uint8"},
        "files": {relative: hashlib.sha256(content).hexdigest() for relative, content in files.items()},
        "training_config": {},
    }
    (version / "metadata.json").write_text(json.dumps(metadata))
    (registry / "pneumonia-cnn" / "LATEST").write_text("v0001\n")
    if corrupt:
        (version / corrupt).write_bytes(b"flipped")
    if missing:
        (version / missing).unlink()
    return registry


def _fake_checkpoint(folder: Path) -> Path:
    """A checkpoint folder with a valid pneumonia.json (and no model: it must not be loaded)."""
    from pneumonia.data.preprocess import PreprocessSpec
    from pneumonia.models.checkpoint import CheckpointInfo

    folder.mkdir(parents=True)
    info = CheckpointInfo(epoch=1, config={}, preprocess=PreprocessSpec(32), metrics={"val_threshold": 0.5})
    (folder / "pneumonia.json").write_text(info.to_json())
    return folder


@pytest.fixture
def paths(tmp_path) -> dict[str, Path]:
    """Named inputs for the parametrised cases below."""
    junk = _class_folders(tmp_path / "junk", b"not an image, only text", b"not an image either")
    half = _class_folders(tmp_path / "half", None, b"GIF89a but not really")
    good = _class_folders(tmp_path / "good", None, None, n=10)
    splits = tmp_path / "splits"
    for split in ("train", "test"):
        _class_folders(splits / split, None, None)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file.txt").write_text("I am a file")
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("mine")
    (tmp_path / "two_bad_keys.yaml").write_text("train:\n  learning_rat: 0.1\n  epoks: 3\n")
    (tmp_path / "bad.yaml").write_text("train: [\n  epochs: 3\n")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(128, 256)))
    return {
        "junk": junk, "half": half, "good": good, "splits": splits, "empty": tmp_path / "empty", "file": tmp_path / "a_file.txt",
        "existing": tmp_path / "existing", "missing": tmp_path / "no-such-folder",
        "corrupt": _fake_artifact(tmp_path / "corrupt", corrupt="saved_model/saved_model.pb"),
        "incomplete": _fake_artifact(tmp_path / "incomplete", missing="model.keras"),
        "intact": _fake_artifact(tmp_path / "intact"),
        "checkpoint": _fake_checkpoint(tmp_path / "checkpoint"),
        "two_bad_keys": tmp_path / "two_bad_keys.yaml", "bad_yaml": tmp_path / "bad.yaml",
        "binary_yaml": tmp_path / "binary.yaml",
        "quick": Path(__file__).resolve().parents[2] / "tune_configs" / "quick.yaml",
    }


@pytest.fixture(autouse=True)
def nothing_slow_starts(monkeypatch, tmp_path):
    """Ray, Serve and model loading fail the test if reached: every case below must stop earlier.
    (In a scratch working directory: the default run storage, ./runs, is checked there.)"""
    import pneumonia.artifacts.registry
    import pneumonia.models.checkpoint
    import pneumonia.serving.local_service
    import pneumonia.training.driver
    import pneumonia.training.sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pneumonia.training.driver, "init_ray", must_not_run("Ray"))
    monkeypatch.setattr(pneumonia.training.sweep, "init_ray", must_not_run("Ray"))
    monkeypatch.setattr(pneumonia.serving.local_service, "local_service", must_not_run("Ray Serve"))
    monkeypatch.setattr(pneumonia.models.checkpoint, "load_model_from_directory", must_not_run("a model load"))
    monkeypatch.setattr(pneumonia.artifacts.registry, "_load_signature", must_not_run("a SavedModel load"))


# ----------------------------------------------------------------------------- usage (exit 2)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["synth", "--out", "x", "--n", "3"], "argument --n: must be at least 8, got 3"),
        (["synth", "--out", "x", "--image-size", "8"], "argument --image-size: must be between 16 and 4096"),
        (["synth", "--out", "x", "--image-size", "100000"], "argument --image-size"),
        (["synth", "--out", "x", "--difficulty", "-1"], "argument --difficulty: must be at least 0"),
        (["synth", "--out", "x", "--seed", "-1"], "argument --seed"),
        (["synth", "--out", "x", "--n", "ten"], "argument --n: expected an integer, got 'ten'"),
        (["train", "--data", "d", "--workers", "0"], "argument --workers: must be between 1 and 1024 (scaling.workers)"),
        (["train", "--data", "d", "--epochs", "0"], "argument --epochs: must be between 1 and 1000 (train.epochs)"),
        (["train", "--data", "d", "--epochs", "2.5"], "argument --epochs: expected an integer"),
        (["train", "--data", "d", "--batch-size", "0"], "argument --batch-size"),
        (["train", "--data", "d", "--lr", "0"], "must be above 0 and below 1 (train.learning_rate), got 0"),
        (["train", "--data", "d", "--lr", "nan"], "argument --learning-rate/--lr"),
        (["train", "--data", "d", "--normal-weight", "-2"], "argument --normal-weight"),
        (["train", "--data", "d", "--image-size", "4"], "argument --image-size"),
        (["tune", "--config", "c.yaml", "--samples", "0"], "argument --samples: must be between 1 and 10000"),
        (["evaluate", "--artifact", "a", "--data", "d", "--threshold", "2"],
         "argument --threshold: must be between 0 and 1, got 2"),
        (["evaluate", "--artifact", "a", "--data", "d", "--threshold", "-0.1"], "argument --threshold"),
        (["evaluate", "--artifact", "a", "--data", "d", "--stress", "--shifts", "darker,sepia"],
         "unknown stress shift(s) sepia"),
        (["serve", "--port", "0"], "argument --port: must be between 1 and 65535, got 0"),
        (["serve", "--port", "70000"], "argument --port"),
        (["predict", "--url", "notaurl", "f.jpeg"], "'notaurl' is not an http(s) URL"),
        (["predict", "--url", "ftp://host/x", "f.jpeg"], "is not an http(s) URL"),
        (["predict", "--url", "http://host:99999", "f.jpeg"], "is not a valid URL"),
        (["predict", "--timeout", "0", "f.jpeg"], "argument --timeout: must be above 0, got 0"),
        (["predict", "--timeout", "inf", "f.jpeg"], "argument --timeout"),
        (["export", "--checkpoint", "c", "--registry", "r", "--name", "../up"], "argument --name: '../up' must be"),
        (["demo", "--n", "3"], "argument --n"),
        (["demo", "--workers", "0"], "argument --workers"),
        (["demo", "--epochs", "0"], "argument --epochs"),
        (["demo", "--samples", "0"], "argument --samples"),
        (["demo", "--serve-port", "-1"], "argument --serve-port: must be between 0 and 65535"),
        (["train", "--wrokers", "2"], "unrecognized arguments: --wrokers"),
        ([], "the following arguments are required: COMMAND"),
        (["data"], "the following arguments are required: ACTION"),
    ],
)
def test_out_of_range_flags_are_usage_errors_at_parse_time(capsys, argv, fragment):
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, 2, fragment)
    assert "--help`" in err  # where to look


# ----------------------------------------------------------------------------- input and environment (exit 1)


@pytest.mark.parametrize(
    "argv, fragments",
    [
        # synth
        (["synth", "--out", "/proc/nope/x"], ["--out /proc/nope/x: cannot create folder (No such file or directory)"]),
        (["synth", "--out", "{file}/x"], ["cannot create folder (Not a directory)"]),
        (["synth", "--out", "{file}"], ["already exists and is not an empty directory"]),
        (["synth", "--out", "{existing}"], ["already exists and is not an empty directory"]),
        # data summarize
        (["data", "summarize", "{missing}"], ["data folder not found: {missing}"]),
        (["data", "summarize", "{file}"], ["error: {file} is a file; it must be a data folder"]),
        (["data", "summarize", "{empty}"], ["no files under"]),
        (["data", "summarize", "{junk}"], ["none of the 12 image files", "could be read as an image", "nothing to summarize"]),
        # train
        (["train", "--data", "{file}"], ["--data {file} is a file"]),
        (["train", "--data", "{missing}"], ["data folder not found: {missing} (--data)"]),
        (["train", "--data", "{junk}"], ["{junk}/NORMAL: none of its 6 image files could be read as an image",
                                         "not a recognised image"]),
        (["train", "--data", "{half}"], ["{half}/PNEUMONIA: none of its 6 image files could be read"]),
        (["train", "--data", "{good}", "--storage", "/proc/nope/runs"],
         ["--storage /proc/nope/runs: cannot create folder (No such file or directory)"]),
        (["train", "--data", "{good}", "--storage", "{file}"], ["--storage {file} is a file"]),
        (["train", "--data", "{good}", "--config", "{two_bad_keys}"],
         ["train.learning_rat: unknown key; train.epoks: unknown key"]),
        (["train", "--data", "{good}", "--name", "a/b"], ["run.name"]),
        (["train", "--data", "{good}", "--config", "{bad_yaml}"], ["not valid YAML", "at line 3, column 1"]),
        (["tune", "--config", "{binary_yaml}", "--data", "{good}"], ["{binary_yaml}: not a text file"]),
        (["train", "--data", "{good}", "--config", "{empty}"], ["config {empty} is a folder"]),
        (["train", "--resume", "--storage", "{empty}", "--name", "nosuch"], ["run 'nosuch' not found"]),
        (["train", "--data", "{good}", "--set", "scaling.cpus_per_worker=0"], ["scaling.cpus_per_worker"]),
        # tune
        (["tune", "--config", "{missing}.yaml", "--data", "{good}"], ["config file not found"]),
        (["tune", "--config", "{quick}", "--data", "{junk}"], ["{junk}/NORMAL: none of its"]),
        (["tune", "--config", "{quick}", "--data", "{file}"], ["--data {file} is a file"]),
        (["tune", "--config", "{quick}", "--data", "{good}", "--storage", "/proc/nope"],
         ["--storage /proc/nope: cannot create folder"]),
        # evaluate
        (["evaluate", "--artifact", "{intact}", "--checkpoint", "{checkpoint}", "--data", "{good}"],
         ["exactly one of --checkpoint and --artifact"]),
        (["evaluate", "--checkpoint", "{checkpoint}", "--data", "{missing}"], ["data folder not found"]),
        (["evaluate", "--checkpoint", "{checkpoint}", "--data", "{file}"], ["--data {file} is a file"]),
        (["evaluate", "--checkpoint", "{missing}", "--data", "{good}"], ["checkpoint folder not found"]),
        (["evaluate", "--checkpoint", "{file}", "--data", "{good}"], ["--checkpoint {file} is a file"]),
        (["evaluate", "--checkpoint", "{empty}", "--data", "{good}"], ["not a pneumonia checkpoint"]),
        (["evaluate", "--checkpoint", "{checkpoint}", "--data", "{splits}", "--split", "nosuch"],
         ["has no nosuch/ split (found: train, test)"]),
        (["evaluate", "--checkpoint", "{checkpoint}", "--data", "{junk}"], ["none of the 12 images", "could be decoded"]),
        (["evaluate", "--checkpoint", "{checkpoint}", "--data", "{good}", "--report", "{file}"],
         ["--report {file} is a file"]),
        (["evaluate", "--checkpoint", "{checkpoint}", "--data", "{good}", "--report", "/proc/nope/r"],
         ["--report /proc/nope/r: cannot create folder"]),
        (["evaluate", "--checkpoint", "{checkpoint}", "--data", "{good}", "--shifts", "darker"],
         ["--shifts chooses the shifts of --stress: add --stress"]),
        (["evaluate", "--artifact", "{missing}", "--data", "{good}"], ["artifact not found"]),
        (["evaluate", "--artifact", "{corrupt}", "--data", "{good}"],
         ["is corrupt: saved_model/saved_model.pb does not match its sha256"]),
        (["evaluate", "--artifact", "{intact}", "--data", "{splits}", "--split", "nosuch"], ["has no nosuch/ split"]),
        # export
        (["export", "--checkpoint", "{missing}", "--registry", "{empty}"], ["checkpoint folder not found"]),
        (["export", "--checkpoint", "{checkpoint}", "--registry", "{file}"], ["--registry {file} is a file"]),
        (["export", "--checkpoint", "{checkpoint}", "--registry", "/proc/nope/reg"], ["cannot create folder"]),
        (["export", "--checkpoint", "{checkpoint}", "--registry", "s3://bucket/reg"], ["must be a local folder"]),
        (["export", "--checkpoint", "{checkpoint}", "--registry", "{empty}", "--data", "{junk}"],
         ["{junk}/NORMAL: none of its"]),
        (["export", "--checkpoint", "{checkpoint}", "--registry", "{empty}", "--data", "{missing}"],
         ["data folder not found"]),
        # serve
        (["serve", "--artifact", "{corrupt}"], ["is corrupt: saved_model/saved_model.pb does not match its sha256"]),
        (["serve", "--artifact", "{incomplete}"], ["is incomplete: model.keras is missing"]),
        (["serve", "--artifact", "{missing}"], ["artifact not found"]),
        (["serve", "--artifact", "{empty}"], ["is not an artifact, a model folder with LATEST or a registry"]),
        # predict
        (["predict", "{missing}/x.jpeg"], ["file not found: {missing}/x.jpeg"]),
        (["predict", "{empty}"], ["{empty} is a directory with no images in it"]),
        (["predict", "{junk}/NORMAL/IM-0000-0001.jpeg", "{missing}.jpeg"], ["file not found: {missing}.jpeg"]),
        # demo
        (["demo", "--out", "{file}"], ["--out {file} is a file"]),
        (["demo", "--out", "/proc/nope/demo"], ["--out /proc/nope/demo: cannot create folder"]),
    ],
)
def test_bad_input_is_one_line_and_exit_1_before_anything_slow(capsys, paths, argv, fragments):
    code, _, err = run_cli(capsys, *[item.format(**paths) for item in argv])
    assert_one_line_error(code, err, 1, *[fragment.format(**paths) for fragment in fragments])


def test_a_sampled_folder_says_how_many_of_its_files_were_tried(tmp_path, capsys):
    root = _class_folders(tmp_path / "big", None, b"junk", n=40)
    code, _, err = run_cli(capsys, "train", "--data", root)
    assert_one_line_error(code, err, 1, f"{root}/PNEUMONIA: none of 16 of its 40 image files (an even sample)")


def test_a_refused_training_run_leaves_nothing_in_storage(paths, tmp_path, capsys):
    storage = tmp_path / "runs"
    code, _, err = run_cli(capsys, "train", "--data", paths["junk"], "--storage", storage)
    assert code == 1, err
    assert not storage.exists() or not any(storage.iterdir())  # no manifest: a later --resume finds nothing


def test_a_folder_with_some_unreadable_files_still_trains(paths, capsys, monkeypatch):
    """The check refuses folders of junk, not folders with a few bad files (workers skip those)."""
    (paths["good"] / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"truncated")

    class Reached(BaseException):  # not an Exception: main() lets it through
        pass

    def stop_at_ray():
        raise Reached

    import pneumonia.training.driver

    monkeypatch.setattr(pneumonia.training.driver, "init_ray", stop_at_ray)
    with pytest.raises(Reached):
        main(["train", "--data", str(paths["good"]), "--storage", str(paths["empty"])])


def test_summarize_with_some_readable_images_still_succeeds(paths, capsys):
    (paths["good"] / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"truncated")
    code, out, err = run_cli(capsys, "data", "summarize", paths["good"])
    assert code == 0, err
    assert "1 problem(s)" in out


def test_synth_that_cannot_write_its_images_says_where_and_why(tmp_path, capsys, monkeypatch):
    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    code, _, err = run_cli(capsys, "synth", "--out", tmp_path / "d", "--n", "8", "--image-size", "16")
    assert_one_line_error(code, err, 1, f"--out {tmp_path / 'd'}: cannot write the dataset (No space left on device)")


@pytest.mark.parametrize("host, fragment", [("127.0.0.1", "cannot serve on 127.0.0.1:{port}"),
                                            ("no-such-host.invalid", "cannot serve on no-such-host.invalid")])
def test_serve_on_a_taken_port_or_an_unknown_host_stops_before_ray(paths, capsys, monkeypatch, host, fragment):
    import socket

    import pneumonia.local_ray
    import pneumonia.serving.local_service

    monkeypatch.setattr(pneumonia.serving.local_service, "local_service", _real_local_service)
    monkeypatch.setattr(pneumonia.local_ray, "start_ray", must_not_run("Ray"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_cli(capsys, "serve", "--artifact", paths["intact"], "--host", host, "--port", port)
    assert_one_line_error(code, err, 1, fragment.format(port=port))


def test_an_unexpected_error_is_one_line_and_a_traceback_only_with_verbose(capsys, monkeypatch):
    import pneumonia.cli.commands

    def broken(args):
        raise KeyError("surprise")

    monkeypatch.setattr(pneumonia.cli.commands, "cmd_synth", broken)
    code, _, err = run_cli(capsys, "synth", "--out", "x")
    assert_one_line_error(code, err, 1, "unexpected KeyError: 'surprise'", "pneumonia -v")
    code, _, err = run_cli(capsys, "-v", "synth", "--out", "x")
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: unexpected")


def test_an_os_error_names_the_file_and_the_reason(capsys, monkeypatch):
    import pneumonia.cli.commands

    def full_disk(args):
        raise OSError(28, "No space left on device", "/data/runs/manifest.json")

    monkeypatch.setattr(pneumonia.cli.commands, "cmd_synth", full_disk)
    code, _, err = run_cli(capsys, "synth", "--out", "x")
    assert_one_line_error(code, err, 1, "error: /data/runs/manifest.json: No space left on device")


# ----------------------------------------------------------------------------- predict against live servers


class _Server:
    """A local HTTP server answering POST with ``reply(handler, body)``; URL in ``url``."""

    def __init__(self, reply):
        outer = self
        self.received: list[bytes] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append(body)
                reply(self, body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _send(handler, status: int, body: bytes, content_type: str = "application/json"):
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _like_our_service(handler, body):
    answer = {"label": "NORMAL", "probability": 0.25, "threshold": 0.5, "model": "m", "version": "v0001"}
    _send(handler, 200, json.dumps(answer).encode())


def test_predict_on_a_folder_sends_its_images_recursively_and_sorted(tmp_path, capsys):
    folder = tmp_path / "xrays"
    (folder / "b").mkdir(parents=True)
    (folder / "b" / "2.jpeg").write_bytes(_jpeg(2))
    (folder / "1.png").write_bytes(_jpeg(1))
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.jpeg").write_bytes(_jpeg(3))
    server = _Server(_like_our_service)
    try:
        code, out, err = run_cli(capsys, "predict", "--url", server.url, folder, "--json")
    finally:
        server.close()
    assert code == 0, err
    rows = json.loads(out.strip().splitlines()[-1])["predictions"]
    assert [Path(row["file"]).relative_to(folder).as_posix() for row in rows] == ["1.png", "b/2.jpeg"]


def test_predict_checks_every_file_before_sending_any(paths, capsys):
    server = _Server(_like_our_service)
    try:
        image = paths["good"] / "NORMAL" / "IM-0000-0001.jpeg"
        code, _, err = run_cli(capsys, "predict", "--url", server.url, image, paths["missing"] / "late.jpeg")
    finally:
        server.close()
    assert_one_line_error(code, err, 1, "file not found")
    assert server.received == []


def test_predict_to_a_closed_port_says_connection_refused(paths, capsys):
    from pneumonia.local_ray import free_port

    image = paths["good"] / "NORMAL" / "IM-0000-0001.jpeg"
    code, _, err = run_cli(capsys, "predict", "--url", f"http://127.0.0.1:{free_port()}", image, "--timeout", "5")
    assert_one_line_error(code, err, 1, "cannot reach http://127.0.0.1:", "Connection refused",
                          "is `pneumonia serve` running there?")


def test_predict_to_another_kind_of_server_says_so(paths, capsys):
    server = _Server(lambda handler, body: _send(handler, 200, b"<html>hello</html>", "text/html"))
    try:
        code, _, err = run_cli(capsys, "predict", "--url", server.url, paths["good"] / "NORMAL" / "IM-0000-0001.jpeg")
    finally:
        server.close()
    assert_one_line_error(code, err, 1, "answered, but not as a pneumonia service does", "check --url")


def test_predict_to_a_server_that_does_not_answer_in_time(paths, capsys):
    release = threading.Event()
    server = _Server(lambda handler, body: release.wait(10))
    try:
        code, _, err = run_cli(capsys, "predict", "--url", server.url, "--timeout", "0.5",
                               paths["good"] / "NORMAL" / "IM-0000-0001.jpeg")
    finally:
        release.set()
        server.close()
    assert_one_line_error(code, err, 1, "did not answer within 0.5 s", "--timeout")


def test_predict_reports_refused_files_in_the_table_and_exits_1(paths, capsys):
    server = _Server(lambda handler, body: _send(handler, 400, b'{"error": "not a recognised image"}'))
    try:
        code, out, err = run_cli(capsys, "predict", "--url", server.url, paths["good"] / "NORMAL" / "IM-0000-0001.jpeg")
    finally:
        server.close()
    assert_one_line_error(code, err, 1, "1 of 1 files were refused")
    assert "error 400: not a recognised image" in out


# ----------------------------------------------------------------------------- TensorFlow's start-up noise


def test_native_log_filter_drops_records_below_the_level_and_keeps_everything_else():
    from pneumonia.runtime import filter_native_log

    text = (
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
        "I0000 00:00:1796028858.713991   20993 port.cc:153] oneDNN custom operations are on.\n"
        "I0000 00:00:1796028858.714622   20993 cpu_feature_guard.cc:227] This TensorFlow binary is optimized\n"
        "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow\n"
        "E0000 00:00:1796028866.073662   21062 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n"
        "/x/y.py:3: UserWarning: a real warning\n"
        "W0000 00:00:1796028866.073662   21062 thing.cc:1] a warning record\n"
    )
    assert filter_native_log(text, 3) == "/x/y.py:3: UserWarning: a real warning\n"
    assert filter_native_log(text, 2).splitlines() == [
        "E0000 00:00:1796028866.073662   21062 cuda_platform.cc:52] failed call to cuInit: INTERNAL",
        "/x/y.py:3: UserWarning: a real warning",
    ]
    assert filter_native_log(text, 0) == text  # the user asked for everything


def test_lines_ray_forwards_from_workers_are_filtered_per_worker():
    from pneumonia.runtime import QuietNativeLogStream

    sink = io.StringIO()
    stream = QuietNativeLogStream(sink, min_level=3)
    stream.write("\x1b[36m(RayTrainWorker pid=12821)\x1b[0m WARNING: All log messages before absl::InitializeLog() "
                 "is called are written to STDERR\n")
    stream.write("\x1b[36m(RayTrainWorker pid=12821)\x1b[0m I0000 00:00:1796029430.654722   12821 port.cc:153] oneDNN")
    stream.write("\n(TrainController pid=6696) Started training worker group of size 2\n")
    stream.write("[pneumonia] epoch 1/1 ...")
    stream.flush()
    assert sink.getvalue() == "(TrainController pid=6696) Started training worker group of size 2\n[pneumonia] epoch 1/1 ..."


@pytest.mark.parametrize("extra, expected", [
    ({}, {("3", "3"), ("2", "2")}),  # this machine's default (3 without a GPU), workers alike on a local Ray
    ({"RAY_ADDRESS": "ray://head:10001"}, {("3", "2"), ("2", "2")}),  # a cluster's nodes may have GPUs
    ({"TF_CPP_MIN_LOG_LEVEL": "1"}, {("1", "1")}),  # the user's own level wins everywhere
    ({"TF_CPP_MIN_LOG_LEVEL": "0", "RAY_ADDRESS": "ray://head:10001"}, {("0", "0")}),
])
def test_the_tensorflow_log_level_of_the_driver_and_of_ray_workers(extra, expected):
    code = ("import os; from pneumonia import runtime; runtime.activate(); "
            "print(os.environ['TF_CPP_MIN_LOG_LEVEL'], runtime.RAY_ENV['TF_CPP_MIN_LOG_LEVEL'])")
    env = {key: value for key, value in os.environ.items() if key not in ("TF_CPP_MIN_LOG_LEVEL", "RAY_ADDRESS")}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                               env={**env, **extra})
    assert tuple(completed.stdout.split()) in expected, completed.stderr


def test_a_command_that_runs_tensorflow_prints_no_start_up_noise(tmp_path):
    """In a fresh process (TensorFlow loads once per process), `evaluate` loads a model and runs it:
    stderr stays empty (no oneDNN, CUDA driver, absl or cuInit lines), the answer is on stdout."""
    from pneumonia.config import ExperimentConfig, ModelConfig
    from pneumonia.data.preprocess import PreprocessSpec
    from pneumonia.data.synth import make_synthetic_dataset
    from pneumonia.models.architectures import build_model
    from pneumonia.models.checkpoint import CheckpointInfo, save_checkpoint

    data = make_synthetic_dataset(tmp_path / "data", n=24, image_size=32).root
    save_checkpoint(tmp_path / "ckpt", build_model(ModelConfig(name="xraynet", width=4), (32, 32, 1)),
                    CheckpointInfo(epoch=1, config=ExperimentConfig().model_dump(), preprocess=PreprocessSpec(32),
                                   metrics={}))
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    completed = subprocess.run(
        [sys.executable, "-m", "pneumonia", "evaluate", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(data),
         "--json"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    assert "roc_auc" in json.loads(completed.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- issue 24: messages that name the cause


def test_serve_without_an_artifact_says_what_it_looked_for_and_how_to_give_one(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("PNEUMONIA_ARTIFACT", raising=False)
    code, _, err = run_cli(capsys, "serve")  # in an empty working directory (nothing_slow_starts)
    assert_one_line_error(code, err, 1, "no artifact to serve: looked for ./registry (the default when neither "
                          "--artifact nor $PNEUMONIA_ARTIFACT is given)", f"{tmp_path / 'registry'} does not exist",
                          "give one with --artifact PATH", "`pneumonia export`")
    monkeypatch.setenv("PNEUMONIA_ARTIFACT", str(tmp_path / "elsewhere"))
    code, _, err = run_cli(capsys, "serve")
    assert_one_line_error(code, err, 1, f"looked for $PNEUMONIA_ARTIFACT ({tmp_path / 'elsewhere'})", "--artifact PATH")


def test_training_on_unreadable_files_names_them_not_the_patient_count(tmp_path, capsys):
    """Two text files named .jpeg in a correct layout: too few patients to carve a validation split,
    but the cause to fix is that nothing there is an image."""
    root = tmp_path / "layout"
    for split in ("train", "test"):
        _class_folders(root / split, b"notes, not an X-ray", b"notes again", n=1)
    code, _, err = run_cli(capsys, "train", "--data", root)
    assert_one_line_error(code, err, 1, f"none of the 2 training image files under {root} could be read as an image",
                          "IM-0000-0001.jpeg: not a recognised image", "person0_virus_0.jpeg")
    assert "too few patients" not in err


def test_predict_prints_each_files_outcome_and_a_refusals_warning(tmp_path, capsys):
    """A refused file (the guard's 422 from a synthetic-trained model) reads as refused, with the
    service's reason and the model's warning; a failed one as an error; then the counts."""
    from pneumonia.artifacts.registry import SYNTHETIC_REFUSAL, SYNTHETIC_WARNING

    refusal = {"error": f"body: the image does not look like a pediatric chest X-ray; it was not classified. "
                        f"{SYNTHETIC_REFUSAL}", "out_of_distribution": True, "ood_score": 900.0,
               "ood_threshold": 300.0, "warning": SYNTHETIC_WARNING}

    def reply(handler, body):
        if body == b"xray":
            _like_our_service(handler, body)
        elif body == b"real":
            _send(handler, 422, json.dumps(refusal).encode())
        else:
            _send(handler, 400, b'{"error": "body: not a recognised image"}')

    for name, content in (("a.jpeg", b"xray"), ("b.jpeg", b"real"), ("c.jpeg", b"text")):
        (tmp_path / name).write_bytes(content)
    server = _Server(reply)
    try:
        code, out, err = run_cli(capsys, "predict", "--url", server.url, *(tmp_path / n for n in ("a.jpeg", "b.jpeg", "c.jpeg")))
    finally:
        server.close()
    assert_one_line_error(code, err, 1, "2 of 3 files were refused")
    lines = out.splitlines()
    assert lines[1].split()[1:3] == ["NORMAL", "0.2500"]
    assert "b.jpeg" in lines[2] and "refused 422: body: the image does not look like a pediatric chest X-ray" in lines[2]
    assert "pneumonia demo --data DIR" in lines[2]
    assert "c.jpeg" in lines[3] and "error 400: body: not a recognised image" in lines[3]
    assert lines[4] == "3 files: 1 classified, 1 refused, 1 failed"
    assert f"warning: {SYNTHETIC_WARNING}" in lines


def test_output_to_a_file_or_a_pipe_has_no_colour_codes():
    """Ray colours its workers' '(Worker pid=N)' prefixes: RAY_COLOR_PREFIX=0 (and NO_COLOR) when
    stdout or stderr is not a terminal, unless the user set them; the CLI's stderr drops any left."""
    from pneumonia.runtime import QuietNativeLogStream, plain_output_environment

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert plain_output_environment((Terminal(), Terminal())) == {}
    assert plain_output_environment((Terminal(), io.StringIO())) == {"RAY_COLOR_PREFIX": "0", "NO_COLOR": "1"}
    line = "\x1b[36m(MapWorker(MapBatches(read)->MapBatches(Scorer)) pid=7)\x1b[0m scored \x1b[32m[repeated 2x]\x1b[39m\n"
    for sink, expected in ((io.StringIO(), "(MapWorker(MapBatches(read)->MapBatches(Scorer)) pid=7) scored [repeated 2x]\n"),
                           (Terminal(), line)):
        stream = QuietNativeLogStream(sink, min_level=3)
        stream.write(line)
        stream.flush()
        assert sink.getvalue() == expected
    code = "import os; from pneumonia import runtime; runtime.activate(); print(os.environ.get('RAY_COLOR_PREFIX'))"
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_COLOR_PREFIX", "NO_COLOR")}
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert piped.stdout.strip() == "0", piped.stderr
    own = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**env, "RAY_COLOR_PREFIX": "1"})
    assert own.stdout.strip() == "1", own.stderr  # the user's choice wins


def test_workers_tensorflow_lines_are_dropped_whatever_parentheses_their_names_hold():
    """Ray Data's actors are named 'MapWorker(MapBatches(read)->MapBatches(Scorer))': their prefix
    is recognised too, so `pneumonia score` prints no oneDNN/CUDA lines from them."""
    from pneumonia.runtime import filter_native_log

    prefix = "(MapWorker(MapBatches(read_and_decode)->MapBatches(Scorer)) pid=19352) "
    text = (f"{prefix}WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            f"{prefix}I0000 00:00:1796589397.067092   19352 port.cc:153] oneDNN custom operations are on.\n"
            f"{prefix}/x/actor.py:3: UserWarning: a real warning\n")
    assert filter_native_log(text, 3) == f"{prefix}/x/actor.py:3: UserWarning: a real warning\n"
