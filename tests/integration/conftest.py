"""Integration tests: a real Ray cluster (`ray start --head`), two Rays on one machine, or the real
X-rays in ../shared/data (skipped cleanly when absent). Every test in this folder is marked
``integration``: ``pytest -m "not integration"`` runs the rest in a fraction of the time."""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)
