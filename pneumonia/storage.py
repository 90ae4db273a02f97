"""Local paths and object-store URIs behind one small interface.

On a cluster the images and checkpoints are not on every node, so everything that reads data or
checkpoints accepts a local path or a URI that pyarrow understands (``s3://``, ``gs://``,
``file://``). Local paths take the plain-``open`` fast path. Also what every writer shares: an
atomic write (a reader sees the old file or the new one, never half) and JSON-ready values.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import shutil
import tempfile
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pneumonia.errors import DataError


def is_uri(location: str) -> bool:
    return "://" in str(location)


@functools.lru_cache(maxsize=16)
def _filesystem(location: str):
    """The pyarrow filesystem and in-filesystem path of a URI (cached: S3 clients are slow to make)."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(location)
    except Exception as error:  # pyarrow raises several types for unknown schemes or bad URIs
        raise DataError(f"cannot open {location}: {error}") from None


def _split_uri(location: str):
    """(filesystem, path inside it) for a URI; one cached client per bucket."""
    scheme, _, rest = location.partition("://")
    if scheme in ("s3", "gs", "gcs"):
        bucket = rest.split("/", 1)[0]
        fs, _ = _filesystem(f"{scheme}://{bucket}")
        return fs, rest.rstrip("/")
    return _filesystem(location)


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a local file's bytes (artifacts and checkpoints record one per model file)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def check_listed_files(folder: Path, files: dict[str, str], listing: Path, error: type[Exception], what: str) -> None:
    """Every file of ``files`` (relative path -> sha256), as the file ``listing`` lists them, lies
    inside ``folder`` (``what``: "the artifact"), is there and has its sha256; ``error`` saying which one does not. Checkpoints
    and serving artifacts are verified by this before anything reads them."""
    for relative, expected in sorted(files.items()):
        if PurePosixPath(relative).is_absolute() or ".." in PurePosixPath(relative).parts:
            raise error(f"{listing} lists a file outside {what}: {relative}")
        path = folder / relative
        if not path.is_file():
            raise error(f"{folder} is incomplete: {relative} is missing")
        if sha256_of(path) != expected:
            raise error(f"{folder} is corrupt: {relative} does not match its sha256 in {listing.name}")


def read_bytes(location: str) -> bytes:
    """Whole file contents from a local path or URI."""
    if not is_uri(location):
        with open(location, "rb") as handle:
            return handle.read()
    fs, path = _split_uri(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(location: str, data: bytes) -> None:
    """Write a file to a local path (creating folders) or a URI."""
    if not is_uri(location):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        Path(location).write_bytes(data)
        return
    fs, path = _split_uri(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def write_atomic(location: str | Path, data: bytes | str) -> None:
    """Write so that readers see the old content or the new, never half: locally a temporary
    file in the same folder, flushed to disk, then renamed over the target; on an object store
    a plain upload (an object becomes visible only once its upload completes)."""
    data = data.encode() if isinstance(data, str) else data
    if is_uri(str(location)):
        write_bytes(str(location), data)
        return
    path = Path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    try:
        with open(temporary, "xb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def json_ready(value, strict: bool = False):
    """``value`` as plain JSON: NumPy arrays and numbers become lists and Python numbers, paths
    strings, tuples lists, and NaN or infinity null (JSON has neither). Anything else is left
    for the encoder, or with ``strict`` is a ValueError (what is stored must read back as written)."""
    if isinstance(value, dict):
        return {str(key): json_ready(item, strict) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item, strict) for item in value]
    if hasattr(value, "dtype") and hasattr(value, "tolist"):  # a NumPy array or scalar
        return json_ready(value.tolist(), strict)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if strict and not (value is None or isinstance(value, (str, int, float, bool))):
        raise ValueError(f"cannot store a {type(value).__name__} as JSON")
    return value


def exists(location: str) -> bool:
    if not is_uri(location):
        return Path(location).exists()
    import pyarrow.fs

    fs, path = _split_uri(location)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


@dataclass(frozen=True)
class FileEntry:
    location: str  # path or URI, usable with read_bytes
    relative: str  # path relative to the listed root, '/'-separated
    size: int


def list_files(root: str) -> list[FileEntry]:
    """Every file under root, recursively, sorted by relative path (so runs are reproducible)."""
    if not is_uri(root):
        base = Path(root)
        if not base.is_dir():
            raise DataError(f"data folder not found: {root}")
        entries = [
            FileEntry(str(path), path.relative_to(base).as_posix(), path.stat().st_size)
            for path in base.rglob("*")
            if path.is_file()
        ]
        return sorted(entries, key=lambda entry: entry.relative)

    import pyarrow.fs

    fs, path = _split_uri(root)
    info = fs.get_file_info(path)
    if info.type != pyarrow.fs.FileType.Directory:
        raise DataError(f"data folder not found: {root}")
    prefix = root.rstrip("/")
    scheme = root.partition("://")[0]
    entries = []
    for item in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True)):
        if item.type == pyarrow.fs.FileType.File:
            relative = item.path[len(path.rstrip("/")) + 1 :]
            # read_bytes takes s3/gs paths verbatim but parses other URIs (file://) again, so
            # there a name with a space or '%' must be escaped to stay readable.
            name = relative if scheme in ("s3", "gs", "gcs") else urllib.parse.quote(relative)
            entries.append(FileEntry(f"{prefix}/{name}", relative, item.size or 0))
    return sorted(entries, key=lambda entry: entry.relative)


@contextmanager
def local_directory(location: str) -> Iterator[Path]:
    """A local copy of a directory given as a path or URI (a path is used in place)."""
    if not is_uri(location):
        path = Path(location)
        if not path.is_dir():
            raise DataError(f"folder not found: {location}")
        yield path
        return
    import pyarrow.fs

    fs, path = _split_uri(location)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        raise DataError(f"folder not found: {location}")
    scratch = Path(tempfile.mkdtemp(prefix="pneumonia-"))
    try:
        pyarrow.fs.copy_files(path, str(scratch), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def staged_directory(location: str) -> Iterator[Path]:
    """A local folder whose files end up at ``location``: the path itself when local; for a URI a
    scratch folder (not yet created) whose files are uploaded there when the block succeeds, and
    which is removed either way."""
    if not is_uri(location):
        yield Path(location)
        return
    scratch = Path(tempfile.mkdtemp(prefix="pneumonia-staged-"))
    staged = scratch / PurePosixPath(location.rstrip("/")).name
    try:
        yield staged
        for path in sorted(staged.rglob("*")) if staged.is_dir() else []:
            if path.is_file():
                write_bytes(join(location, path.relative_to(staged).as_posix()), path.read_bytes())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def qualify(path: str, storage: str) -> str:
    """A path that Ray reports inside a storage filesystem, as a URI again when storage is one
    (Ray reports ``bucket/runs/...`` for ``s3://bucket/runs``)."""
    if is_uri(storage) and not is_uri(path):
        return f"{storage.split('://', 1)[0]}://{path}"
    return path


def join(location: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI."""
    if is_uri(location):
        return "/".join([location.rstrip("/"), *parts])
    return str(Path(location, *parts))
