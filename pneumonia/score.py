"""Batch scoring of X-ray archives with Ray Data: ``pneumonia score``.

A hospital wants yesterday's worklist or a whole PACS export scored, not one request at a time.
:func:`score` reads every image under a folder or object-store prefix (or every ``path`` of a
CSV/Parquet manifest) and writes one row per file: path, label, probability, threshold, model,
version and, for a file that could not be read or decoded, an ``error`` (label and probability
empty) instead of a failed run.

The pipeline, on Ray Data's streaming executor::

    paths (driver) -> read + decode_image (CPU) -> predict (actor pool) -> rows (driver) -> part files

- **Where each stage runs.** With ``gpu=True`` reading and decoding are CPU tasks spread over the
  cluster's CPUs, feeding one scoring actor per GPU (default ``concurrency``): full-resolution
  decoding costs more than a GPU forward pass, so many CPUs feed few GPUs. Without a GPU, Ray Data
  fuses the two stages (same resources: one CPU each) into the actors, so each actor reads,
  decodes and scores its own blocks, like a serving replica, with no hand-off between processes;
  the default is then one actor per CPU, so decoding still uses every core. Measured on 2 cores:
  fused with 2 actors 80-94 images/s, separate stages (1 actor + 1 decoding CPU) 46 (see
  docs/BENCHMARKS.md).
- **Same numbers as serving.** Decoding is :func:`pneumonia.preprocess.decode_image` with the
  artifact's own :class:`~pneumonia.preprocess.PreprocessSpec`, inference is
  :meth:`LoadedArtifact.predict` and the label is ``probability >= threshold`` compared as Python
  floats: exactly what :class:`pneumonia.serving.Classifier` does per batch.
- **Read and decode in one CPU task.** A full-resolution X-ray is 0.2-2 MB of JPEG and 50 KB of
  model input: decoding where the bytes were read keeps the large bytes out of the object store.
  Unreadable or corrupt files become rows with an error (any exception, per file: one odd file
  must not cost an hours-long run).
- **The model loads once per actor.** The driver verifies the artifact (metadata and every file's
  sha256) before Ray starts, then ships the version folder's files through the object store; each
  actor writes them to a scratch folder and calls :func:`load_artifact` (which verifies them
  again). So an artifact given as a local path works on a multi-node cluster too, and one given as
  a URI (``s3://bucket/registry/pneumonia-cnn/v0003``) is downloaded once, by the driver.
  ``gpu=True`` gives each actor one GPU.
- **Bounded memory.** Nothing but file paths is materialised: decoded images stream through the
  object store under Ray Data's backpressure, and the driver receives only result rows (about
  100 bytes per file), so an archive larger than the cluster's memory streams through.

Writing, resuming:

- As each result block reaches the driver it is written to ``<output>.parts/part-<ns>-<seq>.parquet``
  (written to a hidden temporary name and renamed, so a part is complete or absent). An
  interrupted run (Ctrl-C, SIGTERM, a lost driver) therefore loses only the blocks in flight.
- At the end the previous output (if any) and every part are merged, de-duplicated by
  ``(path, model, version)`` keeping the newest row, sorted by path and written to ``<output>``
  (Parquet, or CSV when the name ends in ``.csv``); then the parts folder is removed. A crash
  between the two steps is harmless: the next run merges again.
- Re-running with the same output skips every file that already has a row *without an error* for
  the same model name and version (in the output or in parts); files that failed are tried again
  (the error may have been a transient read failure, or the file was replaced). A new model
  version scores everything again and its rows sit beside the old version's.
- Two runs writing the same output at the same time are not supported.

Bad input fails before Ray starts, as one-line :class:`~pneumonia.errors.PneumoniaError` s: a
missing or corrupt artifact (:class:`ArtifactError`), an empty or missing input
(:class:`DataError`), an output that cannot be written or has an unknown extension
(:class:`OutputError`). When ``output`` is omitted, the scores go to
``./<input name>-scores.parquet`` in the working directory (never into the input folder, which
may be a read-only archive).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np

from pneumonia import CLASS_NAMES, IMAGE_EXTENSIONS
from pneumonia.errors import DataError, Interrupted, OutputError, PneumoniaError
from pneumonia.preprocess import DEFAULT_MAX_PIXELS, PreprocessSpec, decode_image
from pneumonia.storage import is_uri, join, list_files, read_bytes, write_bytes

DEFAULT_BATCH_SIZE = 64
"""Images per forward pass: serving's batch of 32 doubled; a batch job has no latency to keep."""
BATCHES_PER_BLOCK = 4
"""Files per Ray Data block (one decode task, one part file) = batch size x this: small enough
that an interruption loses little and progress is smooth, large enough that per-task overhead
(a few ms) stays small next to decoding (5-30 ms per file)."""
DECODE_CPUS = 1.0
SCORER_CPUS = 1.0
SCORED_EXTENSIONS = IMAGE_EXTENSIONS | {".dicom", ".gif", ".jpe"}
"""Files in a folder that are scored: image endings, and files with no ending at all or a DICOM UID
for a name (PACS exports often name files ``1.2.840.113619...``). Other files (reports, .txt) are
counted, not scored; hidden ones (.DS_Store) are passed over."""
MANIFEST_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
OUTPUT_FORMATS = MANIFEST_FORMATS
PATH_COLUMN = "path"
KEY = ("path", "model", "version")
PARTS_SUFFIX = ".parts"


def output_schema():
    """The columns of every part and of the output, in order."""
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("label", pa.string()), ("probability", pa.float64()),
                      ("threshold", pa.float64()), ("model", pa.string()), ("version", pa.string()),
                      ("error", pa.string())])


@dataclass
class ScoreResult:
    """What a run did: this run's counts, where the scores are, and how fast it went."""

    output: str
    model: str
    version: str
    files: int  # files in the input (images, or manifest rows)
    scored: int  # files scored by this run, failures included
    skipped: int  # already scored by this model version in the output
    failed: int  # this run's rows with an error
    counts: dict[str, int] = field(default_factory=dict)  # this run's rows per label
    rows: int = 0  # rows in the output after the merge (every run, every version)
    ignored: int = 0  # files in the input folder that are not images
    wall_s: float = 0.0  # the whole call: checks, Ray start, pipeline, merge
    pipeline_s: float = 0.0  # from the start of the pipeline to the last result
    startup_s: float = 0.0  # from the start of the pipeline to the first result (actors loading)

    @property
    def images_per_s(self) -> float:
        return self.scored / self.pipeline_s if self.pipeline_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": round(self.images_per_s, 2)}

    def summary(self) -> str:
        labels = ", ".join(f"{label} {self.counts.get(label, 0):,}" for label in CLASS_NAMES)
        lines = [f"scored {self.scored:,} of {self.files:,} files with {self.model} {self.version}: "
                 f"{labels}, failed {self.failed:,}"
                 + (f"; {self.skipped:,} already scored, skipped" if self.skipped else "")
                 + (f"; {self.ignored:,} non-image files ignored" if self.ignored else ""),
                 f"{self.images_per_s:.1f} images/s over {self.pipeline_s:.1f} s (first results after "
                 f"{self.startup_s:.1f} s); wall time {self.wall_s:.1f} s",
                 f"output: {self.output} ({self.rows:,} rows)"]
        if self.failed:
            lines.append("rows with an error name the reason in their 'error' column; a re-run tries them again")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- the artifact


@dataclass
class PackedArtifact:
    """A verified artifact version as bytes, to ship to the scoring actors."""

    metadata: dict
    spec: PreprocessSpec
    threshold: float
    files: dict[str, bytes]  # relative path -> contents, metadata.json included

    @property
    def name(self) -> str:
        return self.metadata["name"]

    @property
    def version(self) -> str:
        return self.metadata["version"]


def pack_artifact(location: str) -> PackedArtifact:
    """Resolve (a version, a name folder's LATEST, a one-model registry; a local path or a URI),
    verify (metadata, every file's sha256) and read an artifact, without TensorFlow."""
    from pneumonia.registry import ArtifactError, _check_metadata, _verify_files, read_metadata, resolve_artifact
    from pneumonia.storage import local_directory

    try:
        with local_directory(location) as folder:  # a URI is copied to a scratch folder
            version_dir = resolve_artifact(folder)
            metadata = read_metadata(version_dir)
            spec, threshold = _check_metadata(metadata, version_dir)
            _verify_files(version_dir, metadata["files"])
            files = {name: (version_dir / name).read_bytes() for name in [*metadata["files"], "metadata.json"]}
    except DataError as error:  # local_directory: the folder does not exist
        raise ArtifactError(f"artifact not found: {location} ({error})") from None
    return PackedArtifact(metadata, spec, threshold, files)


def unpack_artifact(files: dict[str, bytes]):
    """Write shipped artifact files to a scratch folder and load them (verified again there)."""
    from pneumonia.registry import load_artifact

    scratch = Path(tempfile.mkdtemp(prefix="pneumonia-score-"))
    try:
        for name, data in files.items():
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            (scratch / name).write_bytes(data)
        return load_artifact(scratch)  # the SavedModel's variables are in memory after loading
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ----------------------------------------------------------------------------- the input


@dataclass
class ScoreInput:
    """The files to score: ``paths`` as the input named them (they go to the output) and the
    ``locations`` to read them from (a manifest's relative paths resolved against its folder)."""

    source: str
    paths: list[str]
    locations: list[str]
    ignored: int = 0


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
        table = _read_table(location, kind, columns=None)
    except (OSError, pa.ArrowException, ValueError) as error:
        raise DataError(f"cannot read manifest {location}: {_first_line(error)}") from None
    if PATH_COLUMN not in table.column_names:
        raise DataError(f"manifest {location} has no '{PATH_COLUMN}' column (it has: {', '.join(table.column_names)})")
    paths, seen = [], set()
    for row, value in enumerate(table.column(PATH_COLUMN).to_pylist(), start=1):
        text = "" if value is None else str(value).strip()
        if not text:
            raise DataError(f"manifest {location}: row {row} has an empty '{PATH_COLUMN}'")
        if text not in seen:
            seen.add(text)
            paths.append(text)
    base = location.rsplit("/", 1)[0] if is_uri(location) else str(Path(location).parent)
    locations = [path if is_uri(path) or os.path.isabs(path) else join(base, path) for path in paths]
    return ScoreInput(location, paths, locations)


def _read_table(location: str, kind: str, columns: list[str] | None, schema=None):
    """A CSV or Parquet file (local path or URI) as a pyarrow Table; with ``schema``, typed as it says."""
    import io

    import pyarrow.csv as csv
    import pyarrow.parquet as pq

    data = io.BytesIO(read_bytes(location))
    if kind == "parquet":
        return pq.read_table(data, columns=columns, schema=schema)
    options = csv.ConvertOptions(column_types=schema, strings_can_be_null=True) if schema is not None else None
    return csv.read_csv(data, convert_options=options)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


# ----------------------------------------------------------------------------- the output


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
        reason = getattr(error, "strerror", None) or _first_line(error)
        raise OutputError(f"--output {output}: cannot write there ({reason})") from None


def _remove(location: str) -> None:
    if is_uri(location):
        from pneumonia.storage import _split_uri

        fs, path = _split_uri(location)
        fs.delete_file(path)
    else:
        os.unlink(location)


def _write_atomic(location: str, data: bytes) -> None:
    """Local files appear complete or not at all (temporary name, then rename); object stores
    make an object visible only once its upload completes."""
    if is_uri(location):
        write_bytes(location, data)
        return
    path = Path(location)
    temporary = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    try:
        write_bytes(str(temporary), data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


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
    _write_atomic(location, _serialise(table, "parquet"))
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
            tables.append(_read_table(output, output_format(output), columns=schema.names, schema=schema))
        except (OSError, pa.ArrowException, ValueError) as error:
            raise OutputError(f"--output {output} exists but cannot be read as scores ({_first_line(error)}); "
                              "move it away or choose another --output") from None
    parts = parts_location(output)
    try:
        entries = [entry for entry in list_files(parts) if entry.relative.startswith("part-")
                   and entry.relative.endswith(".parquet")]
    except DataError:
        entries = []
    for entry in entries:  # sorted by name: oldest run first, then block order
        try:
            tables.append(_read_table(entry.location, "parquet", columns=schema.names, schema=schema))
        except (OSError, pa.ArrowException, ValueError) as error:
            progress(f"warning: ignoring unreadable part {entry.location} ({_first_line(error)}); "
                     "its files are scored again")
    return tables


def _exists(location: str) -> bool:
    from pneumonia.storage import exists

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


def merge(output: str, tables: list) -> int:
    """Write every table into ``output``, the newest row per (path, model, version), sorted by path;
    then remove the parts folder. Returns the output's row count."""
    import pyarrow as pa

    combined = pa.concat_tables(tables) if tables else output_schema().empty_table()
    order = pa.array(np.arange(len(combined)))
    combined = combined.append_column("_order", order)
    newest = combined.group_by(list(KEY)).aggregate([("_order", "max")])["_order_max"]
    merged = combined.take(newest).drop_columns(["_order"])
    merged = merged.sort_by([(column, "ascending") for column in KEY])
    _write_atomic(output, _serialise(merged, output_format(output)))
    _remove_tree(parts_location(output))
    return len(merged)


def _remove_tree(location: str) -> None:
    if is_uri(location):
        from pneumonia.storage import _split_uri

        fs, path = _split_uri(location)
        try:
            fs.delete_dir(path)
        except (OSError, FileNotFoundError):
            pass
    else:
        shutil.rmtree(location, ignore_errors=True)


# ----------------------------------------------------------------------------- the pipeline


def read_and_decode(batch: dict[str, np.ndarray], spec: PreprocessSpec, max_pixels: int) -> dict[str, np.ndarray]:
    """A CPU task: read each file and decode it with the shared preprocessing. A file that fails
    keeps a blank image and the reason in ``error`` (empty string when it decoded)."""
    count = len(batch["path"])
    images = np.zeros((count, *spec.shape), np.uint8)
    errors = np.full(count, "", dtype=object)
    for index, location in enumerate(batch["location"]):
        try:
            images[index] = decode_image(read_bytes(str(location)), spec, max_pixels)
        except OSError as error:
            errors[index] = f"cannot read: {error.strerror or _first_line(error)}"
        except PneumoniaError as error:  # ImageDecodeError, ImageTooLargeError, DataError
            errors[index] = str(error) or type(error).__name__
        except Exception as error:  # noqa: BLE001 - one odd file must not fail an hours-long run
            errors[index] = f"unexpected {type(error).__name__}: {_first_line(error)}"
    return {"path": batch["path"], "image": images, "error": errors}


class Scorer:
    """A Ray Data actor: loads the artifact once, then scores batches of decoded images."""

    def __init__(self, shipped: list, batch_size: int):
        import ray

        self.artifact = unpack_artifact(ray.get(shipped[0]))  # a list keeps Ray from resolving it early
        self.threshold = float(self.artifact.threshold)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa

        errors = [str(error) for error in batch["error"]]
        good = np.array([not error for error in errors], dtype=bool)
        probabilities: list[float | None] = [None] * len(errors)
        if good.any():
            scores = self.artifact.predict(batch["image"][good], batch_size=self.batch_size)
            for index, probability in zip(np.flatnonzero(good), scores):
                probabilities[index] = float(probability)
        return pa.table({
            "path": [str(path) for path in batch["path"]],
            # As serving labels: the float32 probability as a Python float against the threshold.
            "label": [None if p is None else CLASS_NAMES[int(p >= self.threshold)] for p in probabilities],
            "probability": probabilities,
            "threshold": [self.threshold] * len(errors),
            "model": [self.artifact.name] * len(errors),
            "version": [self.artifact.version] * len(errors),
            "error": [error or None for error in errors],
        }, schema=output_schema())


def build_dataset(todo: ScoreInput, packed: PackedArtifact, shipped, *, gpu: bool, batch_size: int,
                  concurrency: int, max_pixels: int):
    """paths -> read + decode (CPU tasks) -> predict (``concurrency`` actors) -> result rows."""
    import ray.data

    rows = [{"path": path, "location": location} for path, location in zip(todo.paths, todo.locations)]
    block_rows = batch_size * BATCHES_PER_BLOCK
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / block_rows)))
    decoded = dataset.map_batches(read_and_decode, batch_size=None, num_cpus=DECODE_CPUS,
                                  fn_kwargs={"spec": packed.spec, "max_pixels": max_pixels})
    return decoded.map_batches(
        Scorer, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=SCORER_CPUS,
        **({"num_gpus": 1} if gpu else {}),
        fn_constructor_kwargs={"shipped": [shipped], "batch_size": batch_size}, batch_format="numpy",
    )


def score(
    artifact: str,
    input: str,  # noqa: A002 - the CLI's name for it
    output: str | None = None,
    *,
    gpu: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    concurrency: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[str], None] = print,
) -> ScoreResult:
    """Score every image of ``input`` with ``artifact`` into ``output`` (see the module docstring).

    ``concurrency`` is the number of scoring actors (default: one per GPU with ``gpu``, else one
    per CPU of the cluster, each with one CPU). Ray is started (or RAY_ADDRESS joined) only
    after the artifact, the input and the output have been checked, and only if something is
    left to score.
    """
    started = time.perf_counter()
    if batch_size < 1:
        raise PneumoniaError(f"--batch-size must be at least 1, got {batch_size}")
    packed = pack_artifact(artifact)
    found = list_input(input)
    output = output or default_output(input)
    if not is_uri(output):
        output = str(Path(output).expanduser().absolute())
    check_output(output)
    previous = read_previous(output, progress)
    done = already_scored(previous, packed.name, packed.version)
    keep = [index for index, path in enumerate(found.paths) if path not in done]
    todo = ScoreInput(found.source, [found.paths[i] for i in keep], [found.locations[i] for i in keep])
    result = ScoreResult(output=output, model=packed.name, version=packed.version, files=len(found.paths),
                         scored=0, skipped=len(found.paths) - len(keep), failed=0, ignored=found.ignored)
    if todo.paths:
        progress(f"scoring {len(todo.paths):,} files from {input} with {packed.name} {packed.version}"
                 + (f" ({result.skipped:,} already scored, skipped)" if result.skipped else "")
                 + f" -> {output}")
        _run(todo, packed, result, gpu=gpu, batch_size=batch_size, concurrency=concurrency,
             max_pixels=max_pixels, progress=progress)
        previous = read_previous(output, progress)  # the new parts too
    else:
        progress(f"nothing to score: all {len(found.paths):,} files already scored by {packed.name} "
                 f"{packed.version} in {output}")
    result.rows = merge(output, previous)
    result.wall_s = time.perf_counter() - started
    return result


def _run(todo: ScoreInput, packed: PackedArtifact, result: ScoreResult, *, gpu: bool, batch_size: int,
         concurrency: int | None, max_pixels: int, progress: Callable[[str], None]) -> None:
    """Start (or join) Ray, stream the results into part files, count them into ``result``."""
    import ray

    from pneumonia.train import init_ray

    init_ray()
    concurrency = concurrency or _default_concurrency(gpu)
    _check_resources(gpu, concurrency)
    shipped = ray.put(packed.files)
    dataset = build_dataset(todo, packed, shipped, gpu=gpu, batch_size=batch_size, concurrency=concurrency,
                            max_pixels=max_pixels)
    parts, run_ns, counts = parts_location(result.output), time.time_ns(), Counter()
    began = time.perf_counter()
    try:
        for sequence, table in enumerate(dataset.iter_batches(batch_size=None, batch_format="pyarrow")):
            if not result.startup_s:
                result.startup_s = time.perf_counter() - began
            write_part(parts, sequence, run_ns, table)
            result.scored += len(table)
            result.failed += len(table) - table["error"].null_count
            counts.update(label for label in table["label"].to_pylist() if label is not None)
            result.counts = {label: counts.get(label, 0) for label in CLASS_NAMES}
    except KeyboardInterrupt:
        raise Interrupted(f"scoring interrupted after {result.scored:,} of {len(todo.paths):,} files; they are "
                          f"kept in {parts}: the same command continues") from None
    result.pipeline_s = time.perf_counter() - began
    result.counts = {label: counts.get(label, 0) for label in CLASS_NAMES}


def _default_concurrency(gpu: bool) -> int:
    """One actor per GPU with ``gpu``; else one per CPU (each decodes and scores its own blocks)."""
    import ray

    available = ray.cluster_resources()
    if gpu:
        return max(1, int(available.get("GPU", 0)))
    return max(1, int(available.get("CPU", 0) // SCORER_CPUS))


def _check_resources(gpu: bool, concurrency: int) -> None:
    """An embedded Ray that can never fit the actors is an error (Ray Data would wait forever);
    on the user's cluster the autoscaler may still add nodes, so it is a warning."""
    import ray

    from pneumonia.local_ray import user_cluster_address

    available = ray.cluster_resources()
    problems = []
    if gpu and available.get("GPU", 0) < concurrency:
        problems.append(f"{concurrency} GPU actors, but the cluster has {available.get('GPU', 0):g} GPUs")
    wanted = concurrency * SCORER_CPUS + (DECODE_CPUS if gpu else 0)  # GPU runs decode in tasks of their own
    if available.get("CPU", 0) < wanted:
        problems.append(f"{concurrency} actors x {SCORER_CPUS:g} CPU" + (f" + {DECODE_CPUS:g} CPU to decode" if gpu else "")
                        + f", but the cluster has {available.get('CPU', 0):g} CPUs")
    if not problems:
        return
    message = "not enough resources: " + "; ".join(problems) + " (lower --concurrency)"
    if user_cluster_address():
        print(f"warning: {message}; waiting for the autoscaler", file=sys.stderr)
        return
    from pneumonia.errors import ConfigError

    raise ConfigError(message)


# ----------------------------------------------------------------------------- command line


def add_parser(subparsers) -> None:
    """``pneumonia score``: wired into :func:`pneumonia.cli.build_parser` with one line."""
    from pneumonia.cli import _number

    parser = subparsers.add_parser("score", help="score a folder, prefix or manifest of X-rays with Ray Data")
    parser.add_argument("--artifact", required=True,
                        help="serving artifact: version folder, name folder or registry (-> latest); path or URI")
    parser.add_argument("--input", required=True,
                        help="folder or object-store prefix of images (recursive), or a .csv/.parquet manifest "
                             "with a 'path' column")
    parser.add_argument("--output", help="scores file: .parquet (default) or .csv, path or URI; a re-run with the "
                                         "same output skips what is scored (default ./<input name>-scores.parquet)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per scoring actor")
    parser.add_argument("--batch-size", type=_number(int, 1, 4096), default=DEFAULT_BATCH_SIZE,
                        help=f"images per forward pass (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--concurrency", type=_number(int, 1, 1024),
                        help="scoring actors (default: one per GPU with --gpu, else one per CPU)")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=cmd_score)


def cmd_score(args) -> None:
    from pneumonia.cli import _emit, _require_folder, _shutdown_ray

    if not is_uri(args.input) and not Path(args.input).expanduser().is_file():
        _require_folder(args.input, "--input", "input folder")
    result = score(args.artifact, args.input, args.output, gpu=args.gpu, batch_size=args.batch_size,
                   concurrency=args.concurrency, progress=lambda line: print(line, flush=True))
    _shutdown_ray()
    _emit(result.to_json(), args.json, result.summary())
