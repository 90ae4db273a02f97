"""What every benchmark records besides its numbers, and how it writes them."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path


def machine_info() -> dict:
    """The machine and library versions behind a figure (numbers mean little without them)."""
    import ray
    import tensorflow as tf

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
            "ray": ray.__version__, "tensorflow": tf.__version__}


def write_report(path: str | Path, report: dict) -> None:
    """Write a benchmark's JSON report (creating folders) and say where it went."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {path}")
