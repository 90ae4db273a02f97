"""`pneumonia serve`'s tokens and audit log, and `pneumonia predict --token-file`, from the command
line: every refusal is one line before Ray starts (Serve is replaced by a stand-in that records
what it was given); tests/serving/test_local_service.py runs the real service with both."""

from __future__ import annotations

import contextlib
import json

import pytest

from pneumonia.serving import auth
from tests.cli.test_cli_errors import (
    _fake_artifact,
    _like_our_service,
    _send,
    _Server,
    assert_one_line_error,
    run_cli,
)

TOKEN = "t0ken-" + "q" * 26


@pytest.fixture
def started(monkeypatch, tmp_path):
    """What `pneumonia serve` handed to Serve (host, app_args), in place of starting it."""
    import pneumonia.serving.local_service

    calls: list[dict] = []

    @contextlib.contextmanager
    def stand_in(artifact, host="127.0.0.1", port=8000, drain_s=5, app_args=None):
        calls.append({"host": host, "app_args": app_args or {}})
        raise KeyboardInterrupt  # the service "stops" at once: cmd_serve returns normally
        yield

    monkeypatch.chdir(tmp_path)
    for name in (auth.TOKEN_FILE_VARIABLE, auth.TOKENS_VARIABLE, "PNEUMONIA_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(pneumonia.serving.local_service, "local_service", stand_in)
    return calls


@pytest.fixture
def registry(tmp_path):
    return _fake_artifact(tmp_path / "registry")


@pytest.fixture
def tokens(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text(f"# callers\nward-7:{TOKEN}\n")
    return path


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.11.12.13"])
def test_a_non_loopback_bind_without_tokens_is_refused(started, registry, capsys, host):
    code, _, err = run_cli(capsys, "serve", "--artifact", registry, "--host", host)
    assert_one_line_error(code, err, 1, f"refusing to serve on {host} without tokens", "--token-file", "--no-auth")
    assert started == []


def test_no_auth_says_open_on_purpose(started, registry, capsys):
    code, out, err = run_cli(capsys, "serve", "--artifact", registry, "--host", "0.0.0.0", "--no-auth")
    assert code == 0, err
    assert started == [{"host": "0.0.0.0", "app_args": {"no_auth": True}}]


def test_loopback_needs_no_tokens(started, registry, capsys):
    code, _, err = run_cli(capsys, "serve", "--artifact", registry)
    assert code == 0, err
    assert started[0]["app_args"] == {"no_auth": True}


def test_tokens_from_the_file_or_the_environment_allow_any_address(started, registry, tokens, capsys, monkeypatch):
    code, out, err = run_cli(capsys, "serve", "--artifact", registry, "--host", "0.0.0.0", "--token-file", tokens)
    assert code == 0, err
    assert started[-1]["app_args"] == {"token_file": str(tokens.resolve())}
    assert "ward-7" in out and TOKEN not in out + err
    monkeypatch.setenv(auth.TOKENS_VARIABLE, f"from-secret:{TOKEN}")
    code, out, err = run_cli(capsys, "serve", "--artifact", registry, "--host", "0.0.0.0")
    assert code == 0, err
    assert started[-1]["app_args"] == {} and "from-secret" in out


@pytest.mark.parametrize("content, fragment", [("", "holds no tokens"), ("ward-7:short", "line 1: the token is 5 characters")])
def test_an_empty_or_weak_token_file_is_refused(started, registry, tmp_path, capsys, content, fragment):
    (tmp_path / "weak.txt").write_text(content)
    code, _, err = run_cli(capsys, "serve", "--artifact", registry, "--token-file", tmp_path / "weak.txt")
    assert_one_line_error(code, err, 1, fragment)
    assert started == []


def test_token_file_and_no_auth_together_are_a_usage_error(started, registry, tokens, capsys):
    code, _, err = run_cli(capsys, "serve", "--artifact", registry, "--token-file", tokens, "--no-auth")
    assert code == 2 and "not allowed with argument" in err


def test_the_audit_log_goes_to_serve_as_an_absolute_path_with_its_limits(started, registry, tmp_path, capsys):
    code, out, err = run_cli(capsys, "serve", "--artifact", registry, "--audit-log", "logs/audit.jsonl",
                             "--audit-max-mb", "2", "--audit-backups", "3")
    assert code == 0, err
    assert started[0]["app_args"] == {"no_auth": True, "audit_log": str(tmp_path / "logs" / "audit.jsonl"),
                                      "audit_max_bytes": 2 * 1024 * 1024, "audit_backups": 3}
    assert "audit log: " in out and "one file per replica" in out


@pytest.mark.parametrize("where, fragment", [("a_file/audit.jsonl", "--audit-log"), ("folder", "is a folder")])
def test_an_audit_log_that_cannot_be_written_is_refused_before_serve(started, registry, tmp_path, capsys, where, fragment):
    (tmp_path / "a_file").write_text("in the way")
    (tmp_path / "folder").mkdir()
    code, _, err = run_cli(capsys, "serve", "--artifact", registry, "--audit-log", tmp_path / where)
    assert_one_line_error(code, err, 1, fragment)
    assert started == []


def test_predict_sends_the_token_from_the_file_or_the_environment(tmp_path, tokens, capsys, monkeypatch):
    from tests.cli.test_cli_errors import _jpeg

    monkeypatch.delenv("PNEUMONIA_TOKEN", raising=False)
    image = tmp_path / "x.jpeg"
    image.write_bytes(_jpeg())
    seen: list[str | None] = []

    def reply(handler, body):
        seen.append(handler.headers.get("Authorization"))
        _like_our_service(handler, body)

    server = _Server(reply)
    try:
        assert run_cli(capsys, "predict", "--url", server.url, image, "--token-file", tokens)[0] == 0
        monkeypatch.setenv("PNEUMONIA_TOKEN", "env-" + TOKEN)
        assert run_cli(capsys, "predict", "--url", server.url, image)[0] == 0
    finally:
        server.close()
    assert seen == [f"Bearer {TOKEN}", f"Bearer env-{TOKEN}"]


def test_predict_refused_for_its_token_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    from tests.cli.test_cli_errors import _jpeg

    monkeypatch.delenv("PNEUMONIA_TOKEN", raising=False)
    image = tmp_path / "x.jpeg"
    image.write_bytes(_jpeg())
    server = _Server(lambda handler, body: _send(handler, 401, json.dumps({"error": "this route needs a token"}).encode()))
    try:
        code, _, err = run_cli(capsys, "predict", "--url", server.url, image, image)
    finally:
        server.close()
    assert_one_line_error(code, err, 1, "401", "this route needs a token", "--token-file")


def test_predict_refuses_a_token_file_with_several_tokens(tmp_path, capsys):
    two = tmp_path / "two.txt"
    two.write_text(f"a:{TOKEN}\nb:{TOKEN}x\n")
    code, _, err = run_cli(capsys, "predict", "--url", "http://127.0.0.1:9", tmp_path, "--token-file", two)
    assert_one_line_error(code, err, 1, "holds 2 tokens")
