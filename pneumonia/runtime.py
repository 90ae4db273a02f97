"""Start-up for every process of ours: legacy Keras before TensorFlow loads, and quiet native logs.

Keras 3 cannot train under ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585), and
TensorFlow reads ``TF_USE_LEGACY_KERAS`` only once, when it is first imported; so an entry point
(the CLI, ``serve_app.py``, the benchmarks, the test suite) calls :func:`activate` before anything
imports TensorFlow, and Ray processes get the same variables through :data:`RAY_ENV` in their
runtime environment. Importing a library module never changes the process: a program that uses
the library calls :func:`activate` itself, first.

It also keeps TensorFlow's native start-up chatter off the terminal ("oneDNN custom operations
are on", "Could not find cuda drivers", "All log messages before absl::InitializeLog()", and on a
machine without a GPU "failed call to cuInit"). ``TF_CPP_MIN_LOG_LEVEL`` (default 2, or 3 where
no GPU is present, since cuInit's failure is logged as an error there; Ray workers on a cluster
get 2) silences what TensorFlow logs after it starts; the lines it writes while its libraries
load come before it reads that variable, so the import hook :func:`activate` installs applies the
same level to them, and the CLI's :class:`QuietNativeLogStream` to the lines Ray forwards from
workers. A level the user set wins (``TF_CPP_MIN_LOG_LEVEL=0`` shows everything).
"""

import glob
import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile
import threading

from pneumonia.errors import ConfigError


def _default_tf_log_level() -> str:
    """3 (errors hidden too) where no NVIDIA device is visible: there the only native error a CPU
    run logs is cuInit's failure; 2 (info and warnings hidden) on GPU machines, whose errors matter."""
    return "2" if glob.glob("/dev/nvidia[0-9]*") else "3"


def _worker_tf_log_level(own: str, user_set: bool) -> str:
    """The level our Ray workers get: the user's; on a local Ray (same machine, same hardware) this
    process's; on a cluster ($RAY_ADDRESS) 2, since its nodes may have GPUs whose errors matter."""
    return own if user_set or not os.environ.get("RAY_ADDRESS") else "2"


_USER_TF_LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL" in os.environ
_TF_LOG_LEVEL = os.environ.get("TF_CPP_MIN_LOG_LEVEL") or _default_tf_log_level()

RAY_ENV = {
    "TF_USE_LEGACY_KERAS": "1",
    "TF_CPP_MIN_LOG_LEVEL": _worker_tf_log_level(_TF_LOG_LEVEL, _USER_TF_LOG_LEVEL),
}
"""What every Ray process of ours needs in its environment (runtime_env) before TensorFlow loads."""

_SEVERITY = "IWEF"  # absl's severities, as TF_CPP_MIN_LOG_LEVEL counts them (0 = info ... 3 = fatal)
_RECORD = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^\]]+\] ")
"""absl's record prefix: severity, MMDD hh:mm:ss.us (before absl::InitializeLog the seconds are
Unix time, '00:00:1796028858.713991'), thread id, file:line]."""
_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_PYTHON_OUTPUT = re.compile(r"^(Traceback \(most recent call last\)|\S+\.py:\d+: )")
_RAY_PREFIX = re.compile(r"^((?:\x1b\[[0-9;]*m)*\(.*?pid=[^()]*\)(?:\x1b\[[0-9;]*m)* )")
"""What Ray puts before a line it forwards from a worker: '(RayTrainWorker pid=123) ', maybe coloured;
Ray Data's actors have parentheses in their names: '(MapWorker(MapBatches(read)->MapBatches(Scorer)) pid=7) '."""
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
"""A terminal escape sequence (colour, cursor): Ray colours its workers' prefixes and some messages."""


def _level(text: str | None) -> int:
    try:
        return int(text or "0")
    except ValueError:
        return 0


class NativeLogFilter:
    """Line by line, what TF_CPP_MIN_LOG_LEVEL would have let through of TensorFlow's native log
    records had TensorFlow read it before printing them: records below the level go (with their
    continuation lines), and so does absl's preamble about them; anything else (a Python warning, a
    crash message, Ray's own logs) stays. Lines Ray forwards from a worker are judged by what
    follows their '(Worker pid=N)' prefix, each worker's continuation lines on their own."""

    def __init__(self, min_level: int | None = None):
        self.min_level = _level(os.environ.get("TF_CPP_MIN_LOG_LEVEL", _TF_LOG_LEVEL)) if min_level is None else min_level
        self._dropping: dict[str, bool] = {}  # per Ray prefix ("" for this process's own lines)

    def keep(self, line: str) -> bool:
        if self.min_level <= 0:
            return True
        prefix = _RAY_PREFIX.match(line)
        source = prefix.group(1) if prefix else ""
        payload = line[len(source):].rstrip("\r\n")
        record = _RECORD.match(payload)
        if record:
            self._dropping[source] = _SEVERITY.index(record.group(1)) < self.min_level
        elif payload == _ABSL_PREAMBLE:
            self._dropping[source] = True
        elif _PYTHON_OUTPUT.match(payload):
            self._dropping[source] = False  # Python's own output is never a record's continuation
        return not self._dropping.get(source, False)


def filter_native_log(text: str, min_level: int | None = None) -> str:
    """``text`` without the lines :class:`NativeLogFilter` drops."""
    keep = NativeLogFilter(min_level).keep
    return "".join(line for line in text.splitlines(keepends=True) if keep(line))


class QuietNativeLogStream:
    """A text stream (the CLI's sys.stderr) that passes on whole lines that :class:`NativeLogFilter`
    keeps: Ray forwards its workers' output there, and a worker may load TensorFlow before it
    imports this package (Ray Train's own modules import it), so only the driver can quiet it.
    Into a file or a pipe (not a terminal) the lines go without terminal colour codes."""

    def __init__(self, stream, min_level: int | None = None):
        self.stream = stream
        self._plain = not _is_terminal(stream)
        # The workers' level: what they were asked to hide is hidden from what they forward.
        self._filter = NativeLogFilter(_level(RAY_ENV["TF_CPP_MIN_LOG_LEVEL"]) if min_level is None else min_level)
        self._pending = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            lines = (self._pending + text).split("\n")
            self._pending = lines.pop()
            kept = "".join(line + "\n" for line in lines if self._filter.keep(line))
        if kept and self._plain:
            kept = _ANSI.sub("", kept)
        if kept:
            self.stream.write(kept)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, ""
        if pending and self._filter.keep(pending):
            self.stream.write(_ANSI.sub("", pending) if self._plain else pending)
        self.stream.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding, ...: the real stream's
        return getattr(self.stream, name)


class _QuietLoader(importlib.abc.Loader):
    """Runs TensorFlow's own loader with file descriptor 2 captured, then writes back what
    :func:`filter_native_log` keeps (also when the import fails, so no real error is lost)."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # is_package, get_code, resource readers: the real loader's
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        try:
            captured = tempfile.TemporaryFile()
            saved = os.dup(2)
        except OSError:  # no stderr to guard, or nowhere to capture: import as usual
            return self.loader.exec_module(module)
        with captured:
            _flush_stderr()
            os.dup2(captured.fileno(), 2)
            try:
                self.loader.exec_module(module)
            finally:
                _flush_stderr()
                os.dup2(saved, 2)
                os.close(saved)
                captured.seek(0)
                kept = filter_native_log(captured.read().decode(errors="replace")).encode()
                while kept:
                    kept = kept[os.write(2, kept):]


def _flush_stderr() -> None:
    if sys.stderr is not None:
        sys.stderr.flush()


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` as the normal path finder does, and hands its loader to _QuietLoader."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _QuietLoader(spec.loader)
        return spec


def require_legacy_keras(tf) -> None:
    """ConfigError unless ``tf.keras`` is Keras 2 (tf-keras): a program that imported TensorFlow
    before :func:`activate` has Keras 3, which cannot train multi-worker nor read our checkpoints."""
    if not tf.keras.__name__.startswith("tf_keras"):
        version = getattr(tf.keras, "__version__", "3")
        raise ConfigError(f"TensorFlow was loaded with Keras {version}: call pneumonia.runtime.activate() "
                          "before anything imports TensorFlow (or set TF_USE_LEGACY_KERAS=1)")


def _is_terminal(stream) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def plain_output_environment(streams=None) -> dict[str, str]:
    """The variables that keep Ray's output free of terminal colour codes when ``streams`` (this
    process's stdout and stderr) are not both terminals: written to a log file or a pipe, the
    codes are noise. Ray colours the '(Worker pid=N)' prefix of every line it forwards from a
    worker unless ``RAY_COLOR_PREFIX=0`` (read in the driver as it prints); ``NO_COLOR`` is the
    common convention other tools (tqdm's and rich's users among them) honour."""
    streams = (sys.stdout, sys.stderr) if streams is None else streams
    if all(_is_terminal(stream) for stream in streams):
        return {}
    return {"RAY_COLOR_PREFIX": "0", "NO_COLOR": "1"}


def activate() -> None:
    """Select legacy Keras and TensorFlow's log level for this process, quiet TensorFlow's
    import, and (output to a file or a pipe) Ray's colour codes; call before anything imports
    TensorFlow. Idempotent; a value the user set wins."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", _TF_LOG_LEVEL)
    for name, value in plain_output_environment().items():
        os.environ.setdefault(name, value)
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())
