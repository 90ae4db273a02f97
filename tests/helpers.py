"""Small helpers shared by several test modules."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pneumonia.data.preprocess import ImageDecodeError, PreprocessSpec, decode_image


def assert_byte_corruptions_fail_cleanly(data: bytes, offsets, values, spec: PreprocessSpec, label: str = "") -> None:
    """Every single-byte corruption either decodes to a valid input or raises ImageDecodeError,
    never another exception type (which would crash a training run or answer a 500)."""
    for offset in offsets:
        for value in values:
            corrupt = bytearray(data)
            corrupt[offset] = value
            try:
                out = decode_image(bytes(corrupt), spec)
            except ImageDecodeError:
                continue
            except Exception as error:  # noqa: BLE001 - the point of the check
                pytest.fail(f"{label} byte {offset} = {value:#x}: {type(error).__name__}: {error}")
            assert out.shape == spec.shape and out.dtype == np.uint8


# The real X-rays the tests may use: ../shared/data next to the checkout, or PNEUMONIA_SHARED_DATA.
SHARED_DATA = Path(os.environ.get("PNEUMONIA_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def real_data(*parts: str) -> Path:
    """A folder of the real data; the test skips cleanly when it is absent (a fresh clone)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.is_dir():
        pytest.skip(f"{path} is not present (set PNEUMONIA_SHARED_DATA to use another copy)")
    return path



def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the CLI in-process; argparse's exit counts as a status."""
    from pneumonia.cli import main

    try:
        code = main([str(item) for item in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
