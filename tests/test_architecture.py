"""The package's floor plan holds: the layering contract, the lint, a small top level, and a
library import that leaves the process alone (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs)


def test_the_import_layers_and_the_no_cycle_contract_hold():
    result = _run([str(BIN / "lint-imports"), "--no-logo", "--no-cache"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_ruff_finds_nothing():
    result = _run([sys.executable, "-m", "ruff", "check", "--no-cache", "."])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_top_level_is_a_table_of_contents():
    package = ROOT / "pneumonia"
    modules = sorted(p.name for p in package.glob("*.py") if p.name not in {"__init__.py", "__main__.py"})
    assert len(modules) <= 6, modules
    assert len((package / "__init__.py").read_text().splitlines()) <= 30
    for sub in ("data", "models", "metrics", "training", "evaluation", "artifacts", "serving", "scoring", "cli"):
        assert (package / sub / "__init__.py").is_file(), sub


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in {"TF_USE_LEGACY_KERAS", "TF_CPP_MIN_LOG_LEVEL"}}
    return _run([sys.executable, "-c", code], env=env)


def test_importing_the_library_changes_nothing_in_the_process():
    result = _fresh_python(
        "import os, sys\n"
        "import pneumonia.metrics.binary, pneumonia.data.records, pneumonia.config\n"
        "print('TF_USE_LEGACY_KERAS' in os.environ, 'tensorflow' in sys.modules, len(sys.meta_path))\n"
        "from pneumonia import runtime\n"
        "runtime.activate()\n"
        "print(os.environ['TF_USE_LEGACY_KERAS'], len(sys.meta_path))\n"
    )
    assert result.returncode == 0, result.stderr
    before, after = result.stdout.split("\n")[:2]
    assert before.split()[:2] == ["False", "False"]
    assert after.split()[0] == "1" and int(after.split()[1]) == int(before.split()[2]) + 1


@pytest.mark.timeout(300)
def test_a_program_that_loaded_keras_3_first_is_told_what_to_do():
    result = _fresh_python(
        "import tensorflow as tf\n"
        "from pneumonia.config import ModelConfig\n"
        "from pneumonia.errors import ConfigError\n"
        "from pneumonia.models.architectures import build_model\n"
        "try:\n"
        "    build_model(ModelConfig(), (64, 64, 1))\n"
        "except ConfigError as error:\n"
        "    print('refused:', error)\n"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused:" in result.stdout and "pneumonia.runtime.activate()" in result.stdout
