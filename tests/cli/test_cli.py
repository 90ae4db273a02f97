"""The CLI contract: JSON on the last line, one-line errors on stderr, non-zero exits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pneumonia.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_synth_then_summarize_as_json(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "synth", "--out", str(tmp_path / "d"), "--n", "40", "--image-size", "32", "--json")
    assert code == 0
    made = json.loads(out.strip().splitlines()[-1])
    assert sum(sum(c.values()) for c in made["counts"].values()) == 40

    code, out, _ = run_cli(capsys, "data", "summarize", str(tmp_path / "d"), "--json")
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["total_images"] == 40
    assert summary["splits"]["train"]["width_range"] == [32, 32]
    assert summary["problems"] == []


def test_summarize_lists_a_corrupt_file_as_a_problem(tmp_path, capsys):
    run_cli(capsys, "synth", "--out", str(tmp_path / "d"), "--n", "20", "--image-size", "32")
    bad = tmp_path / "d" / "train" / "NORMAL" / "IM-9999-0001.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code, out, _ = run_cli(capsys, "data", "summarize", str(tmp_path / "d"))
    assert code == 0
    assert "1 problem(s)" in out and "IM-9999-0001.jpeg" in out


def test_synth_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    code, out, err = run_cli(capsys, "synth", "--out", str(tmp_path))
    assert code == 1
    assert err.startswith("error: ") and "Traceback" not in err
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "/nonexistent/chest_xray"], "data folder not found"),
        (["train", "--data", "{empty}"], "no files under"),
        (["train", "--data", "{wrong}"], "no images found"),
        (["train", "--data", "{data}", "--config", "/nonexistent.yaml"], "config file not found"),
        (["train", "--data", "{data}", "--config", "{bad_yaml}"], "train.learning_rat: unknown key"),
        (["train", "--data", "{data}", "--set", "scaling.workers=0"], "scaling.workers"),
        (["train", "--data", "{data}", "--set", "train.epochs"], "--set expects key=value"),
        (["train", "--data", "{data}", "--set", "model.nme=seed"], "unknown config key: model.nme"),
        (["train", "--resume", "--storage", "{empty}"], "no earlier run found"),
        (["train"], "--data is required"),
        (["evaluate", "--checkpoint", "{empty}", "--data", "{data}"], "not a pneumonia checkpoint"),
        (["data", "summarize", "/nonexistent"], "data folder not found"),
        (["evaluate", "--data", "{data}"], "exactly one of --checkpoint and --artifact"),
        (["evaluate", "--artifact", "{empty}", "--data", "{data}"], "{empty}"),
        (["export", "--checkpoint", "/nonexistent/ckpt", "--registry", "{empty}"], "not found"),
        (["tune", "--config", "{no_tune}", "--data", "{data}"], "has no `tune:` section"),
        (["tune", "--config", "{no_tune}", "--resume", "--storage", "{empty}"], "no earlier sweep found"),
        (["tune", "--config", "{no_tune}"], "--data is required"),
    ],
)
def test_bad_input_gives_a_one_line_error_and_exit_1(tmp_path, capsys, argv, message):
    data = tmp_path / "data"
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            (data / split / cls).mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "wrong" / "cats").mkdir(parents=True)
    (tmp_path / "wrong" / "cats" / "tom.jpeg").write_bytes(b"x")
    (tmp_path / "bad.yaml").write_text("train:\n  learning_rat: 0.1\n")
    (tmp_path / "no_tune.yaml").write_text("train:\n  epochs: 2\n")
    values = {"data": data, "empty": tmp_path / "empty", "wrong": tmp_path / "wrong", "bad_yaml": tmp_path / "bad.yaml",
              "no_tune": tmp_path / "no_tune.yaml"}
    argv = [item.format(**values) for item in argv]
    code, _, err = run_cli(capsys, *argv)
    assert code == 1, err
    assert message.format(**values) in err
    assert "Traceback" not in err


def test_unknown_flag_is_a_usage_error():
    completed = subprocess.run([sys.executable, "-m", "pneumonia.cli", "train", "--wrokers", "2"],
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2
    assert "unrecognized arguments: --wrokers" in completed.stderr


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("pneumonia")
    assert script.exists(), "pip install -e . should install the `pneumonia` command"
    completed = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0
    for command in ("synth", "data", "train", "tune", "evaluate", "export", "demo"):
        assert command in completed.stdout
