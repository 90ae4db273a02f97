"""A labelled sample of a site's X-rays: class folders, or a CSV/Parquet manifest with labels.

A hospital that validates the model before go-live labels a few hundred of its own X-rays. They
come as the folders a radiologist sorted (``NORMAL/`` and ``PNEUMONIA/``, the Kermany layout
without splits) or as a worklist exported from its PACS: a manifest with a ``path`` and a
``label`` column (``NORMAL``/``PNEUMONIA`` in any case, or 0/1) and, where the file names do not
carry it, a ``patient`` column. Patients are what the calibration's bootstrap resamples, so each
record carries one: the manifest's, else the one :func:`pneumonia.data.records.parse_patient`
reads from the file name (an unknown name is its own patient, never joining two).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from pneumonia.data.labels import CLASS_NAMES
from pneumonia.data.records import ImageRecord, discover, parse_patient, require_both_classes
from pneumonia.data.tables import MANIFEST_FORMATS, first_line, read_table
from pneumonia.errors import DataError
from pneumonia.storage import is_uri, join

PATH_COLUMN, LABEL_COLUMN, PATIENT_COLUMN = "path", "label", "patient"
_LABELS = {"normal": 0, "0": 0, "pneumonia": 1, "1": 1}


def labelled_sample(location: str) -> list[ImageRecord]:
    """Every labelled image of a site's sample (a folder of class folders or a manifest), with
    its patient; a DataError that says what is wrong otherwise. Both classes must be present."""
    suffix = PurePosixPath(location.rstrip("/")).suffix.lower()
    if suffix in MANIFEST_FORMATS and (is_uri(location) or Path(location).expanduser().is_file()):
        records = _manifest_records(location, MANIFEST_FORMATS[suffix])
    elif not is_uri(location) and Path(location).expanduser().is_file():
        raise DataError(f"{location} is a file; pass a folder of NORMAL/ and PNEUMONIA/ folders or a "
                        ".csv/.parquet manifest with 'path' and 'label' columns")
    else:
        dataset = discover(location)
        if dataset.splits != [None]:
            raise DataError(f"{location} has split folders ({', '.join(filter(None, dataset.splits))}); a site's "
                            "sample is one folder of NORMAL/ and PNEUMONIA/ folders: pass the split you mean")
        records = dataset.records
    require_both_classes(records, f"the sample {location}")
    return records


def _manifest_records(location: str, kind: str) -> list[ImageRecord]:
    """Records from a manifest's rows; relative paths are resolved against the manifest's folder."""
    import pyarrow as pa

    try:
        table = read_table(location, kind)
    except (OSError, pa.ArrowException, ValueError) as error:
        raise DataError(f"cannot read manifest {location}: {first_line(error)}") from None
    missing = [name for name in (PATH_COLUMN, LABEL_COLUMN) if name not in table.column_names]
    if missing:
        raise DataError(f"manifest {location} has no {' or '.join(repr(name) for name in missing)} column "
                        f"(it has: {', '.join(table.column_names)})")
    patients = (table.column(PATIENT_COLUMN).to_pylist() if PATIENT_COLUMN in table.column_names
                else [None] * table.num_rows)
    base = location.rsplit("/", 1)[0] if is_uri(location) else str(Path(location).expanduser().parent)
    records, seen = [], set()
    rows = zip(table.column(PATH_COLUMN).to_pylist(), table.column(LABEL_COLUMN).to_pylist(), patients)
    for row, (path, label, patient) in enumerate(rows, start=2):  # row 1 is the header
        path = "" if path is None else str(path).strip()
        if not path:
            raise DataError(f"manifest {location}: row {row} has an empty '{PATH_COLUMN}'")
        value = _LABELS.get(str(label).strip().lower()) if label is not None else None
        if value is None:
            raise DataError(f"manifest {location}: row {row} has label {label!r}; use NORMAL or PNEUMONIA (or 0/1)")
        if path in seen:
            raise DataError(f"manifest {location}: {path} is listed twice (row {row})")
        seen.add(path)
        named, subtype = parse_patient(PurePosixPath(path).stem)
        patient = str(patient).strip() if patient is not None and str(patient).strip() else named
        where = path if is_uri(path) or os.path.isabs(path) else join(base, path)
        records.append(ImageRecord(where, value, patient, subtype if value else "normal", None))
    if not records:
        raise DataError(f"manifest {location} has no rows")
    return records


def class_patients(records: list[ImageRecord]) -> dict[str, int]:
    """Distinct patients per class name (a patient with images in both classes counts in both)."""
    return {name: len({record.patient_id for record in records if record.label == index})
            for index, name in enumerate(CLASS_NAMES)}
