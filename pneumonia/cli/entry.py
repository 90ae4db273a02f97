"""`pneumonia`'s entry point: parse, run the command, turn every failure into one line and an
exit status (1 input, 2 usage, 130/143 interrupted), and stop the embedded Ray on the way out."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from pneumonia.cli import common
from pneumonia.cli import parser as parser_module
from pneumonia.errors import Interrupted, PneumoniaError
from pneumonia.runtime import QuietNativeLogStream


def main(argv: list[str] | None = None) -> int:
    # Ray folds log lines that differ only in numbers into "[repeated Nx across cluster]": that
    # would hide every ensemble member's (or trial's) epoch lines but one. Read when Ray loads.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    common.KEEP_RAY = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    parser = parser_module.build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    terminated = _sigterm_as_ctrl_c()
    sys.stderr = quiet = QuietNativeLogStream(sys.stderr)  # TensorFlow's start-up chatter from Ray workers
    try:
        args.func(args)
    except Interrupted as error:
        print(error, file=sys.stderr)  # "<what> interrupted: <counts>; <command> continues it"
        return 143 if terminated else error.exit_code
    except PneumoniaError as error:
        print(f"error: {common.one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; a training run continues with `pneumonia train --resume`, a sweep with "
              "`pneumonia tune --resume`", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as error:  # noqa: BLE001 - the contract: one line, never a traceback
        print(_unexpected(error, args.verbose), file=sys.stderr)
        return 1
    finally:
        terminated.restore()
        common.shutdown_ray()
        quiet.flush()
        sys.stderr = quiet.stream
    return 0


def _unexpected(error: Exception, verbose: bool) -> str:
    """The one line for an error no check foresaw: an OSError names its file and reason (a full
    disk, a folder made read-only meanwhile); anything else is probably a bug, whose traceback
    ``pneumonia -v`` prints as well."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"error: {where}{error.strerror}"
    if verbose:
        import traceback

        traceback.print_exc()
    return (f"error: unexpected {type(error).__name__}: {common.one_line(error)} "
            "(please report it; `pneumonia -v ...` shows where it happened)")


class _Flag:
    """Whether SIGTERM arrived; ``restore`` puts back the handler that was there before."""

    def __init__(self, restore: Callable[[], None] = lambda: None):
        self.value = False
        self.restore = restore

    def __bool__(self) -> bool:
        return self.value


def _sigterm_as_ctrl_c() -> _Flag:
    """SIGTERM (`kill`, a scheduler's stop) takes the Ctrl-C path, so Train and Tune stop their
    workers, release their placement groups and save their state; the exit status says 143."""
    import signal
    import threading

    flag = _Flag()
    if threading.current_thread() is not threading.main_thread():
        return flag

    def on_sigterm(signum, frame):
        flag.value = True
        signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    flag.restore = lambda: signal.signal(signal.SIGTERM, previous)
    return flag

