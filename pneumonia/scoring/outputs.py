"""Where the scores go: part files written as blocks finish, merged into one CSV or Parquet file."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np

from pneumonia.errors import DataError, OutputError, PneumoniaError
from pneumonia.scoring.inputs import MANIFEST_FORMATS, first_line, read_table
from pneumonia.storage import _split_uri, exists, is_uri, join, list_files, write_atomic, write_bytes

OUTPUT_FORMATS = MANIFEST_FORMATS
KEY = ("path", "model", "version")
PARTS_SUFFIX = ".parts"


def output_schema():
    """The columns of every part and of the output, in order. ``sha256`` is the digest of the bytes
    that were scored (empty when the file could not be read): which file a row is about, whatever
    happens to the path later. Outputs written before it existed read with it empty."""
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("sha256", pa.string()), ("label", pa.string()),
                      ("probability", pa.float64()),
                      ("threshold", pa.float64()), ("ood_score", pa.float64()), ("out_of_distribution", pa.bool_()),
                      ("model", pa.string()), ("version", pa.string()), ("error", pa.string())])


def default_output(input_location: str) -> str:
    """``./<input name>-scores.parquet`` in the working directory: next to the input could be a
    read-only archive or a bucket the user cannot write."""
    name = PurePosixPath(input_location.rstrip("/")).name or "input"
    return str(Path.cwd() / f"{PurePosixPath(name).stem or name}-scores.parquet")


def parts_location(output: str) -> str:
    return output.rstrip("/") + PARTS_SUFFIX


def output_format(output: str) -> str:
    suffix = PurePosixPath(output).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise OutputError(f"--output {output}: the name must end in .parquet or .csv (the format follows it)")
    return OUTPUT_FORMATS[suffix]


def check_output(output: str) -> None:
    """Create the parts folder and write (then remove) a probe file in it: the only check that a
    read-only file system, a missing permission or a parent that is a file cannot fool."""
    output_format(output)
    if not is_uri(output) and Path(output).is_dir():
        raise OutputError(f"--output {output} is a folder; name a .parquet or .csv file")
    probe = join(parts_location(output), f".probe-{uuid.uuid4().hex}")
    try:
        write_bytes(probe, b"")
        _remove(probe)
    except (OSError, PneumoniaError) as error:
        reason = getattr(error, "strerror", None) or first_line(error)
        raise OutputError(f"--output {output}: cannot write there ({reason})") from None


def _remove(location: str) -> None:
    if is_uri(location):
        fs, path = _split_uri(location)
        fs.delete_file(path)
    else:
        os.unlink(location)


def _serialise(table, kind: str) -> bytes:
    import pyarrow as pa
    import pyarrow.csv as csv
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    if kind == "parquet":
        pq.write_table(table, sink)
    else:
        csv.write_csv(table, sink)
    return sink.getvalue().to_pybytes()


def write_part(parts: str, sequence: int, started_ns: int, table) -> str:
    """One block of results as ``<parts>/part-<run start ns>-<seq>.parquet`` (names sort by age)."""
    location = join(parts, f"part-{started_ns:020d}-{sequence:06d}.parquet")
    write_atomic(location, _serialise(table, "parquet"))
    return location


def read_previous(output: str, progress: Callable[[str], None]) -> list:
    """The tables already written for this output: the output itself, then every part, oldest first.

    An unreadable part (none should be: parts are renamed into place) is left out with a warning;
    its files are scored again. An unreadable output is an error: it holds the user's results.
    """
    import pyarrow as pa

    schema = output_schema()
    tables = []
    if _exists(output):
        try:
            tables.append(read_table(output, output_format(output), schema))
        except (OSError, pa.ArrowException, ValueError) as error:
            raise OutputError(f"--output {output} exists but cannot be read as scores ({first_line(error)}); "
                              "move it away or choose another --output") from None
    parts = parts_location(output)
    try:
        entries = [entry for entry in list_files(parts) if entry.relative.startswith("part-")
                   and entry.relative.endswith(".parquet")]
    except DataError:
        entries = []
    for entry in entries:  # sorted by name: oldest run first, then block order
        try:
            tables.append(read_table(entry.location, "parquet", schema))
        except (OSError, pa.ArrowException, ValueError) as error:
            progress(f"warning: ignoring unreadable part {entry.location} ({first_line(error)}); "
                     "its files are scored again")
    return tables


def _exists(location: str) -> bool:
    return exists(location)


def already_scored(tables: list, model: str, version: str) -> set[str]:
    """Paths with a row without error for this model version."""
    import pyarrow.compute as pc

    done: set[str] = set()
    for table in tables:
        mask = pc.and_(pc.and_(pc.equal(table["model"], model), pc.equal(table["version"], version)),
                       pc.is_null(table["error"]))
        done.update(table.filter(pc.fill_null(mask, False))["path"].to_pylist())
    return done


def merge(output: str, tables: list, columns=None) -> int:
    """Write every table into ``output``, the newest row per (path, model, version), sorted by path;
    then remove the parts folder. Returns the output's row count.

    ``columns`` (a manifest's other columns with ``path``, :class:`ScoreInput`) are joined on by
    path after the scores; one whose name the scores already use gets a ``manifest_`` prefix (a
    worklist's ground-truth ``label`` stays beside the model's). Rows of earlier runs for paths
    this manifest does not name get empty values there."""
    import pyarrow as pa

    combined = pa.concat_tables(tables) if tables else output_schema().empty_table()
    order = pa.array(np.arange(len(combined)))
    combined = combined.append_column("_order", order)
    newest = combined.group_by(list(KEY)).aggregate([("_order", "max")])["_order_max"]
    merged = combined.take(newest).drop_columns(["_order"])
    if columns is not None:
        merged = _with_columns(merged, columns)
    merged = merged.sort_by([(column, "ascending") for column in KEY])
    write_atomic(output, _serialise(merged, output_format(output)))
    _remove_tree(parts_location(output))
    return len(merged)


def _with_columns(scores, columns):
    """``scores`` with ``columns`` joined on by path (left join: every score row stays, once)."""
    import pyarrow as pa

    taken = set(scores.column_names) | set(columns.column_names)
    renamed = []
    for name in columns.column_names:
        if name != "path" and name in scores.column_names:
            while name in taken:  # a worklist with both `label` and `manifest_label` keeps both
                name = f"manifest_{name}"
            taken.add(name)
        renamed.append(name)
    columns = columns.rename_columns(renamed)
    # A column with no value at all reads as Arrow's null type, which a join cannot carry.
    columns = pa.table({name: (column.cast(pa.string()) if pa.types.is_null(column.type) else column)
                        for name, column in zip(columns.column_names, columns.columns)})
    return scores.join(columns, keys="path", join_type="left outer")


def _remove_tree(location: str) -> None:
    if is_uri(location):
        fs, path = _split_uri(location)
        try:
            fs.delete_dir(path)
        except (OSError, FileNotFoundError):
            pass
    else:
        shutil.rmtree(location, ignore_errors=True)
