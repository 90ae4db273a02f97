"""A small HTTP client for the service: send X-ray files to POST /predict, collect the answers.

Standard library only, so that a hospital integration script needs nothing but Python. A service
that wants a token gets it as ``Authorization: Bearer <token>`` (:func:`client_token`).
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from pneumonia.data.labels import IMAGE_EXTENSIONS
from pneumonia.errors import PneumoniaError
from pneumonia.serving.auth import load_tokens

CONTENT_TYPES = {".png": "image/png", ".dcm": "application/dicom", ".dicom": "application/dicom"}
SENDABLE = IMAGE_EXTENSIONS | set(CONTENT_TYPES)
"""Endings of the files taken from a folder given to :func:`image_files`."""
ANSWER_KEYS = ("label", "probability", "threshold", "version")
"""What every answer of our POST /predict holds (format_predictions prints them)."""
TOKEN_VARIABLE = "PNEUMONIA_TOKEN"
"""The client's token itself, when no token file is given (the service's are PNEUMONIA_TOKEN_FILE/_TOKENS)."""


def client_token(token_file: str | None = None, environ: dict[str, str] | None = None) -> str | None:
    """The token to send: the one token in ``token_file`` (``name:token`` or ``token``), else
    $PNEUMONIA_TOKEN; None for none."""
    if token_file:
        tokens = load_tokens(token_file)
        if len(tokens) != 1:
            raise PneumoniaError(f"token file {token_file} holds {len(tokens)} tokens; a client sends one: "
                                 "give a file with yours alone")
        return tokens[0].secret
    return (os.environ if environ is None else environ).get(TOKEN_VARIABLE, "").strip() or None


def check_url(url: str) -> str:
    """``url`` when it can name a service (http or https, with a host and a valid port); else
    PneumoniaError saying what is wrong with it, before any file is read or sent."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError as error:
        raise PneumoniaError(f"{url!r} is not a valid URL ({error})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PneumoniaError(f"{url!r} is not an http(s) URL such as http://127.0.0.1:8000")
    return url


def image_files(names: list[str | Path]) -> list[Path]:
    """The files to send: each named file, and the image files inside each named folder
    (recursively, sorted, hidden files left out). Checks them all before anything is sent, so a
    typo in the last name does not stop a batch halfway."""
    files: list[Path] = []
    for name in names:
        path = Path(name)
        if path.is_dir():
            found = sorted(child for child in path.rglob("*")
                           if child.suffix.lower() in SENDABLE and child.is_file()
                           and not any(part.startswith(".") for part in child.relative_to(path).parts))
            if not found:
                raise PneumoniaError(f"{name} is a directory with no images in it "
                                     f"(looked for {', '.join(sorted(SENDABLE))}, in subfolders too)")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise PneumoniaError(f"{name} is not a regular file or a directory")
        else:
            raise PneumoniaError(f"file not found: {name}")
    return files


def predict_files(url: str, files: list[str | Path], timeout_s: float = 60, token: str | None = None) -> list[dict]:
    """One row per image file (folders give their images), each file its own request: the
    service's answer, or {"status", "error"} when it refused the file (422 with
    ``out_of_distribution`` true: not a chest X-ray; and the artifact's ``warning`` when its
    answer had one). ``token`` goes as ``Authorization: Bearer``.

    Raises PneumoniaError for a bad URL, a missing or unreadable file, an unreachable service, one
    that does not answer like ours, or one that refuses the token (nothing to report per file).
    """
    base = check_url(url).rstrip("/")
    return [_predict_one(base, path, timeout_s, token) for path in image_files(files)]


def _predict_one(base: str, path: Path, timeout_s: float, token: str | None = None) -> dict:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PneumoniaError(f"cannot read {path}: {error.strerror or error}") from None
    headers = {"Content-Type": CONTENT_TYPES.get(path.suffix.lower(), "image/jpeg")}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(base + "/predict", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return {"file": str(path), **_answer(base, response.read())}
    except urllib.error.HTTPError as error:
        if error.code == 401:  # every file would be refused alike
            raise PneumoniaError(f"{base}/predict answered 401: {_refusal(error)}; give the service's token with "
                                 f"--token-file FILE (or ${TOKEN_VARIABLE})") from None
        return {"file": str(path), "status": error.code, **_refusal_fields(error)}
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise PneumoniaError(_unreachable(base, error, timeout_s)) from None


def _answer(base: str, body: bytes) -> dict:
    """A 200 answer's JSON, checked to be one of ours (another server on the port answers too)."""
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or any(key not in answer for key in ANSWER_KEYS):
        raise PneumoniaError(f"{base}/predict answered, but not as a pneumonia service does "
                             f"(no JSON with {', '.join(ANSWER_KEYS)}); check --url")
    return answer


def _refusal(error: urllib.error.HTTPError) -> str:
    """The service's own reason for a 4xx/5xx ({"error": ...}), else the HTTP reason phrase."""
    return _refusal_fields(error)["error"]


REFUSAL_KEYS = ("out_of_distribution", "ood_score", "ood_threshold", "warning")
"""What a row keeps of a refusal's JSON beside its ``error`` (a 422 of the guard has them all)."""


def _refusal_fields(error: urllib.error.HTTPError) -> dict:
    """``error`` (the service's own reason, else the HTTP reason phrase) and REFUSAL_KEYS it sent."""
    try:
        body = json.loads(error.read())
    except (ValueError, OSError):
        body = None
    body = body if isinstance(body, dict) else {}
    return {"error": str(body.get("error") or error.reason), **{key: body[key] for key in REFUSAL_KEYS if key in body}}


def _unreachable(base: str, error: Exception, timeout_s: float) -> str:
    reason = getattr(error, "reason", error)
    if isinstance(reason, TimeoutError):
        return f"{base} did not answer within {timeout_s:g} s (raise --timeout if the service is busy)"
    text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return f"cannot reach {base}: {text}; is `pneumonia serve` running there?"


def outcome(row: dict) -> str:
    """What happened to one file: classified, flagged (not a chest X-ray, no label), refused (the
    guard's 422) or failed (any other error: undecodable, too large, ...)."""
    if "error" in row:
        return "refused" if row.get("out_of_distribution") is True else "failed"
    return "flagged" if row.get("out_of_distribution") else "classified"


def format_predictions(rows: list[dict]) -> str:
    """The rows as a fixed-width table (errors inline), then how many files had each outcome."""
    lines = [f"{'file':<44} {'label':<10} {'probability':>11}  threshold  version"]
    for row in rows:
        if "error" in row and outcome(row) == "refused":
            lines.append(f"{row['file']:<44} refused {row['status']}: {row['error']}")
        elif "error" in row:
            lines.append(f"{row['file']:<44} error {row['status']}: {row['error']}")
        elif row.get("out_of_distribution"):  # the artifact's guard flags it: no label was given
            lines.append(f"{row['file']:<44} {'-':<10} {'-':>11}  not a chest X-ray (out-of-distribution "
                         f"score {row.get('ood_score', float('nan')):.1f} > {row.get('ood_threshold', float('nan')):.1f})")
        else:
            lines.append(f"{row['file']:<44} {row['label']:<10} {row['probability']:>11.4f}  "
                         f"{row['threshold']:.4f}     {row['version']}")
    outcomes = [outcome(row) for row in rows]
    if len(rows) > 1:
        lines.append(f"{len(rows)} files: " + ", ".join(f"{outcomes.count(kind)} {kind}" for kind in
                                                        ("classified", "flagged", "refused", "failed")
                                                        if outcomes.count(kind) or kind == "classified"))
    warnings = sorted({row["warning"] for row in rows if row.get("warning")})
    return "\n".join(lines + [f"warning: {warning}" for warning in warnings] + _calibrations(rows))


def _calibrations(rows: list[dict]) -> list[str]:
    """One line per threshold the answers applied: a site's (``pneumonia calibrate``) or the shipped one."""
    seen = {}
    for row in rows:
        calibration = row.get("calibration")
        if isinstance(calibration, dict):
            site, images = calibration.get("site"), calibration.get("images")
            text = (f"threshold calibrated for site {site}" + (f" on {images} images" if images else "") if site
                    else "threshold: the shipped one, not calibrated for a site (see pneumonia calibrate)")
            seen.setdefault((row.get("version"), text), None)
    return [f"{version}: {text}" if version else text for version, text in seen]
