"""The README is a quick start that fits on a screen, and every command it shows works.

A user copies commands from the README first; one that fails ("unrecognized arguments: --data")
costs us that user. So: the README stays small (the reference lives in docs/), its links resolve,
its two contract commands are the ones CI runs, every `pneumonia ...` line in it and in docs/
parses with the real argument parser, and the README's cheap commands run for real on a tiny
synthetic dataset.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pneumonia.cli.parser import build_parser
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_BYTES = 12 * 1024

_BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)  # every fenced block, paired in order
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def shell_lines(markdown: str) -> list[str]:
    """Each command of the markdown's shell code blocks: continuations joined, comments dropped."""
    lines = []
    for language, block in _BLOCK.findall(markdown):
        if language not in ("bash", "sh", "shell"):
            continue
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                lines.append(line)
    return lines


def pneumonia_commands(markdown: str) -> list[list[str]]:
    """The argument lists of every `pneumonia ...` command (also inside `a && b` chains, and as
    `.venv/bin/pneumonia` or after `ray job submit ... --`)."""
    commands = []
    for line in shell_lines(markdown):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        parts, words = [], []
        for token in lexer:
            if token in ("&&", "||", ";", "|", "&", "(", ")", ">", ">>", "<", "2>&1"):
                parts.append(words)
                words = []
            else:
                words.append(token)
        parts.append(words)
        for words in parts:
            while words and "=" in words[0]:  # VAR=value pneumonia ...
                words = words[1:]
            if "--" in words[:-1] and words[0] == "ray":  # ray job submit ... -- pneumonia ...
                words = words[words.index("--") + 1:]
            if words and words[0] in ("pneumonia", ".venv/bin/pneumonia"):
                commands.append(words[1:])
    return commands


def docs_markdown() -> list[Path]:
    return [README, ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_fits_on_a_screen_and_its_links_resolve():
    text = README.read_text()
    assert len(text.encode()) <= MAX_README_BYTES, (
        f"README.md is {len(text.encode())} bytes; keep it a quick start (<= {MAX_README_BYTES}) and move reference to docs/")
    for path in docs_markdown():
        for target in _LINK.findall(path.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to {target}, which does not exist"


def test_the_two_contract_commands_are_the_ones_ci_runs():
    lines = shell_lines(README.read_text())
    setup_demo = [line for line in lines if line.endswith("pneumonia demo")]
    setup_tests = [line for line in lines if line.endswith("python -m pytest")]
    assert setup_demo == ["python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/pneumonia demo"]
    assert len(setup_tests) == 1
    assert setup_tests[0] in (ROOT / ".ci" / "run").read_text(), ".ci/run must call the README's test command"


@pytest.mark.parametrize("path", docs_markdown(), ids=lambda path: path.name)
def test_every_documented_command_parses(path):
    """Every flag a document shows exists, with a value of the right kind."""
    commands = pneumonia_commands(path.read_text())
    if path == README:
        assert len(commands) >= 15
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            if argv and argv[-1] == "--help" and exc.code == 0:
                continue
            pytest.fail(f"{path.name}: `pneumonia {shlex.join(argv)}` does not parse (exit {exc.code})")


def test_the_readmes_data_commands_run(tmp_path, capsys, monkeypatch):
    """The README's synth and data summarize lines, run as written (a smaller n) in a scratch folder."""
    monkeypatch.chdir(tmp_path)
    ran = 0
    for argv in pneumonia_commands(README.read_text()):
        if argv[:1] == ["synth"]:
            argv = [*argv, "--n", "40", "--image-size", "64"]  # the last --n wins: seconds, not minutes
            code, _, err = run_cli(capsys, *argv)
            assert code == 0, err
            ran += 1
    (tmp_path / "data" / "synthetic").rename(tmp_path / "data" / "chest_xray")
    for argv in pneumonia_commands(README.read_text()):
        if argv[:2] == ["data", "summarize"] and "data/" in " ".join(argv):
            code, out, err = run_cli(capsys, *argv)
            assert code == 0, err
            assert "PNEUMONIA" in out
            ran += 1
    assert ran >= 2


def test_data_summarize_takes_the_folder_as_data_too(tmp_path, capsys):
    code, _, err = run_cli(capsys, "synth", "--out", str(tmp_path / "d"), "--n", "40", "--image-size", "64")
    assert code == 0, err
    code, out, err = run_cli(capsys, "data", "summarize", "--data", str(tmp_path / "d"))
    assert code == 0, err
    assert "NORMAL" in out
    code, _, err = run_cli(capsys, "data", "summarize")
    assert code != 0 and "no data folder given" in err
    code, _, err = run_cli(capsys, "data", "summarize", str(tmp_path / "d"), "--data", str(tmp_path / "x"))
    assert code != 0 and "give one" in err
