"""Batch scoring of X-ray archives with Ray Data (the library behind ``pneumonia score``, :mod:`pneumonia.cli.score`).

A hospital wants yesterday's worklist or a whole PACS export scored, not one request at a time.
:func:`score` reads every image under a folder or object-store prefix (or every ``path`` of a
CSV/Parquet manifest) and writes one row per file: path, sha256 (of the bytes scored), label,
probability, threshold, ood_score and out_of_distribution (the artifact's out-of-distribution guard, :mod:`pneumonia.models.ood`;
empty and false without one), model, version and, for a file that could not be read or decoded,
an ``error`` (label and probability empty) instead of a failed run. An image the guard calls out of
distribution keeps its probability (for audit) but gets no label, as the service gives none.

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
- **Same numbers as serving.** Decoding is :func:`pneumonia.data.preprocess.decode_image` with the
  artifact's own :class:`~pneumonia.data.preprocess.PreprocessSpec`, inference is
  :meth:`LoadedArtifact.predict_scored` (probability and guard score from one pass), judged by
  :class:`pneumonia.models.ood.Scored`, and the label is ``probability >= threshold`` compared as Python
  floats: exactly what :class:`pneumonia.serving.ServedModel` (the service's model core) does per batch.
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
- Two runs writing the same output at the same time are not supported, and the output is the
  command's: columns added to it by hand are not kept by the next merge.

Bad input fails before Ray starts, as one-line :class:`~pneumonia.errors.PneumoniaError` s: a
missing or corrupt artifact (:class:`ArtifactError`), an empty or missing input
(:class:`DataError`), an output that cannot be written or has an unknown extension
(:class:`OutputError`). When ``output`` is omitted, the scores go to
``./<input name>-scores.parquet`` in the working directory (never into the input folder, which
may be a read-only archive).
"""

from pneumonia.scoring.run import DEFAULT_BATCH_SIZE, ScoreResult, score

__all__ = ["DEFAULT_BATCH_SIZE", "ScoreResult", "score"]
