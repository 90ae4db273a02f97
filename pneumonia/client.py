"""A small HTTP client for the service: send X-ray files to POST /predict, collect the answers.

Standard library only, so that a hospital integration script needs nothing but Python.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from pneumonia.errors import PneumoniaError

CONTENT_TYPES = {".png": "image/png", ".dcm": "application/dicom", ".dicom": "application/dicom"}


def predict_files(url: str, files: list[str | Path], timeout_s: float = 60) -> list[dict]:
    """One row per file: the service's answer, or {"status", "error"} when it refused the file.

    Raises PneumoniaError for a missing file or an unreachable service (nothing to report per file).
    """
    rows = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise PneumoniaError(f"file not found: {name}")
        request = urllib.request.Request(
            url.rstrip("/") + "/predict", data=path.read_bytes(),
            headers={"Content-Type": CONTENT_TYPES.get(path.suffix.lower(), "image/jpeg")})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                rows.append({"file": str(name), **json.loads(response.read())})
        except urllib.error.HTTPError as error:
            try:
                message = json.loads(error.read()).get("error", "")
            except ValueError:
                message = error.reason
            rows.append({"file": str(name), "status": error.code, "error": message})
        except (urllib.error.URLError, OSError) as error:
            raise PneumoniaError(f"cannot reach {url}: {getattr(error, 'reason', error)}") from None
    return rows


def format_predictions(rows: list[dict]) -> str:
    """The rows as a fixed-width table (errors inline)."""
    lines = [f"{'file':<44} {'label':<10} {'probability':>11}  threshold  version"]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['file']:<44} error {row['status']}: {row['error']}")
        else:
            lines.append(f"{row['file']:<44} {row['label']:<10} {row['probability']:>11.4f}  "
                         f"{row['threshold']:.4f}     {row['version']}")
    return "\n".join(lines)
