"""The `pneumonia` command: a thin layer that parses flags and calls library functions.

Contract (scripts rely on it): with ``--json`` the last line printed is one JSON object; errors go
to stderr as one line with a non-zero exit (1 for a problem with the input, 2 for bad usage,
130 when interrupted), never a traceback.

Failures are found as early as they can be, so they take seconds: numeric flags are checked against
their ranges while parsing (exit 2; the flags that set a config key take that key's own bounds),
paths (exists, folder or file, writable) before any library call, and data and artifacts before
TensorFlow loads or Ray starts.

The package: :mod:`~pneumonia.cli.entry` (entry point and exit statuses), :mod:`~pneumonia.cli.parser`
(every flag), :mod:`~pneumonia.cli.arguments` (argparse types that check values),
:mod:`~pneumonia.cli.common` (output and path checks), and the commands:
:mod:`~pneumonia.cli.commands`, :mod:`~pneumonia.cli.evaluate`, :mod:`~pneumonia.cli.demo` and
:mod:`~pneumonia.cli.score` (batch scoring; the library is :mod:`pneumonia.scoring`).
"""

from pneumonia import runtime

runtime.activate()  # the CLI is an entry point: legacy Keras before any command imports TensorFlow

from pneumonia.cli.entry import main  # noqa: E402
from pneumonia.cli.parser import build_parser  # noqa: E402

__all__ = ["build_parser", "main"]
