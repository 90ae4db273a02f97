"""CSV and Parquet manifests (local paths or URIs) as pyarrow Tables.

Batch scoring reads worklists (a ``path`` column) and site calibration reads labelled samples
(``path`` and ``label``) from the same two formats, so both read them here.
"""

from __future__ import annotations

import io

from pneumonia.storage import read_bytes

MANIFEST_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def read_table(location: str, kind: str, schema=None):
    """A CSV or Parquet file (local path or URI) as a pyarrow Table; with ``schema``, its columns
    only (others in the file are left out, missing ones come back empty), typed as it says."""
    import pyarrow.csv as csv
    import pyarrow.parquet as pq

    data = io.BytesIO(read_bytes(location))
    if kind == "parquet":
        return pq.read_table(data, columns=schema.names if schema is not None else None, schema=schema)
    options = (csv.ConvertOptions(column_types=schema, strings_can_be_null=True, include_columns=schema.names,
                                  include_missing_columns=True)
               if schema is not None else None)
    return csv.read_csv(data, convert_options=options)


def first_line(error: BaseException) -> str:
    """The first line of an error's message (pyarrow's run to several), or its type's name."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
