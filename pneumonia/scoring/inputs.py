"""What to score: the files of a folder or object-store prefix, or the ``path`` column of a manifest."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pneumonia.data.labels import IMAGE_EXTENSIONS
from pneumonia.data.tables import MANIFEST_FORMATS, first_line, read_table
from pneumonia.errors import DataError
from pneumonia.storage import is_uri, join, list_files

SCORED_EXTENSIONS = IMAGE_EXTENSIONS | {".dicom", ".gif", ".jpe"}
"""Files in a folder that are scored: image endings, and files with no ending at all or a DICOM UID
for a name (PACS exports often name files ``1.2.840.113619...``). Other files (reports, .txt) are
counted, not scored; hidden ones (.DS_Store) are passed over."""
PATH_COLUMN = "path"


@dataclass
class ScoreInput:
    """The files to score: ``paths`` as the input named them (they go to the output) and the
    ``locations`` to read them from (a manifest's relative paths resolved against its folder).
    ``columns``: a manifest's other columns (accession number, ward, ground truth...) as a pyarrow
    Table with ``path`` and one row per path, carried into the output beside the scores."""

    source: str
    paths: list[str]
    locations: list[str]
    ignored: int = 0
    columns: Any = None


def list_input(location: str) -> ScoreInput:
    """The files of a folder or prefix (recursively, sorted) or of a manifest's ``path`` column."""
    suffix = PurePosixPath(location.rstrip("/")).suffix.lower()
    if suffix in MANIFEST_FORMATS and (is_uri(location) or Path(location).is_file()):
        found = _read_manifest(location, MANIFEST_FORMATS[suffix])
    elif not is_uri(location) and Path(location).is_file():
        raise DataError(f"--input {location} is a file; pass a folder, a prefix or a .csv/.parquet manifest")
    else:
        entries, ignored = [], 0
        for entry in list_files(location):  # DataError when the folder does not exist
            if any(part.startswith(".") for part in entry.relative.split("/")):
                continue  # hidden files and folders (.DS_Store, an interrupted run's .parts)
            if _scored(entry.relative):
                entries.append(entry.location)
            else:
                ignored += 1
        found = ScoreInput(location, entries, entries, ignored)
    if not found.paths:
        other = f" ({found.ignored:,} other files ignored)" if found.ignored else ""
        raise DataError(f"no images to score in {location}{other}")
    return found


def _scored(relative: str) -> bool:
    """An image ending, or none: no dot, or only digits after it (a DICOM UID, ``1.2.840.113619.2.1``)."""
    suffix = PurePosixPath(relative).suffix.lower()
    return suffix in SCORED_EXTENSIONS or suffix == "" or suffix[1:].isdigit()


def _read_manifest(location: str, kind: str) -> ScoreInput:
    """Paths from a manifest's ``path`` column, de-duplicated in order; relative ones are resolved
    against the manifest's own folder (so a worklist can sit next to its images)."""
    import pyarrow as pa

    try:
        table = read_table(location, kind)
    except (OSError, pa.ArrowException, ValueError) as error:
        raise DataError(f"cannot read manifest {location}: {first_line(error)}") from None
    if PATH_COLUMN not in table.column_names:
        raise DataError(f"manifest {location} has no '{PATH_COLUMN}' column (it has: {', '.join(table.column_names)})")
    paths, first_rows, seen = [], [], set()
    for row, value in enumerate(table.column(PATH_COLUMN).to_pylist(), start=1):
        text = "" if value is None else str(value).strip()
        if not text:
            raise DataError(f"manifest {location}: row {row} has an empty '{PATH_COLUMN}'")
        if text not in seen:
            seen.add(text)
            paths.append(text)
            first_rows.append(row - 1)
    base = location.rsplit("/", 1)[0] if is_uri(location) else str(Path(location).parent)
    locations = [path if is_uri(path) or os.path.isabs(path) else join(base, path) for path in paths]
    return ScoreInput(location, paths, locations, columns=_other_columns(table, first_rows, paths))


def _other_columns(table, first_rows: list[int], paths: list[str]):
    """The manifest's columns besides ``path`` (a duplicated path keeps its first row), keyed by
    the path as cleaned above; None when there are none. Flat columns only: a list or struct
    column (possible in Parquet) cannot go into a CSV output and is left out."""
    import pyarrow as pa

    keep = [name for name in table.column_names
            if name != PATH_COLUMN and not pa.types.is_nested(table.schema.field(name).type)]
    if not keep:
        return None
    others = table.select(keep).take(pa.array(first_rows, pa.int64()))
    return others.append_column(PATH_COLUMN, pa.array(paths, pa.string()))
