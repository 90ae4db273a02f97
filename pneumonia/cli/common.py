"""What every command shares: printing (text or one JSON line), checks of paths before any work,
and stopping the embedded Ray before the last line is printed."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from pneumonia.errors import OutputError, PneumoniaError
from pneumonia.local_ray import stop_ray
from pneumonia.storage import is_uri, json_ready


def emit(payload: dict[str, Any], as_json: bool, text: str) -> None:
    """The command's result: one JSON line with --json (an undefined metric, NaN, is null), else ``text``."""
    if as_json:
        print(json.dumps(json_ready(payload), allow_nan=False))
    else:
        print(text)


KEEP_RAY = False
"""Set by main() when Ray was already running in this process before the command (a notebook's
or a test session's): the command must leave it running."""


def shutdown_ray() -> None:
    """Stop the embedded Ray we started, so its forwarded worker logs end before our last line."""
    if "ray" in sys.modules and not KEEP_RAY:
        stop_ray()


def require_folder(location: str, flag: str | None, what: str = "folder") -> None:
    """A local input folder must exist, be a folder and be readable (URIs are checked by the
    library when it lists them). ``flag`` names the option in the message (None: a positional)."""
    if is_uri(location):
        return
    path = Path(location).expanduser()
    named = f"{flag} {location}" if flag else location
    if not path.exists():
        raise PneumoniaError(f"{what} not found: {location}" + (f" ({flag})" if flag else ""))
    if not path.is_dir():
        raise PneumoniaError(f"{named} is a file; it must be a {what}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise PneumoniaError(f"{named}: cannot read this {what} (permission denied)")


def require_output_folder(location: str, flag: str) -> None:
    """A local output folder must be a folder we can write in, or creatable: tried by making (and
    removing) a scratch folder in it or in its nearest existing parent, which is the only check that
    a read-only file system, /proc or a parent that is a file cannot fool."""
    if is_uri(location):
        return
    path = Path(location).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {location} is a file; it must be a folder")
    parent = next(candidate for candidate in (path, *path.parents) if candidate.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".pneumonia-check-", dir=parent))
    except OSError as error:
        verb = "cannot write in folder" if parent == path else "cannot create folder"
        raise OutputError(f"{flag} {location}: {verb} ({error.strerror or error})") from None


def one_line(text: str) -> str:
    """A multi-line message (a config with several bad keys) as one line: 'head: a; b'."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return lines[0] + " " + "; ".join(lines[1:])



def storage(args) -> str | None:
    """--storage, else $PNEUMONIA_STORAGE (set once per cluster), else the config's run.storage."""
    return args.storage or os.environ.get("PNEUMONIA_STORAGE") or None

