"""score(): check everything, start Ray only if there is work, stream results into parts, merge.

The result also carries the drift of what was scored (:func:`pneumonia.metrics.drift.drift_status`):
the probabilities of the input's images that this model version classified (rows without an
error and not out of distribution, earlier runs' rows in the output included, so a resumed run
reports on the whole input), against the artifact's ``drift_reference``."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pneumonia import local_ray
from pneumonia.artifacts.registry import artifact_warning, refusal_hint
from pneumonia.data.labels import CLASS_NAMES
from pneumonia.data.preprocess import DEFAULT_MAX_PIXELS
from pneumonia.errors import Interrupted, PneumoniaError
from pneumonia.metrics.drift import drift_status, drift_summary
from pneumonia.scoring.inputs import ScoreInput, first_line, list_input
from pneumonia.scoring.outputs import (
    already_scored,
    check_output,
    default_output,
    merge,
    parts_location,
    read_previous,
    write_part,
)
from pneumonia.scoring.pipeline import DECODE_CPUS, SCORER_CPUS, PackedArtifact, build_dataset, pack_artifact
from pneumonia.storage import is_uri

DEFAULT_BATCH_SIZE = 64
"""Images per forward pass: serving's batch of 32 doubled; a batch job has no latency to keep."""


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
    out_of_distribution: int = 0  # this run's images the artifact's guard says are not chest X-rays (no label)
    rows: int = 0  # rows in the output after the merge (every run, every version)
    ignored: int = 0  # files in the input folder that are not images
    wall_s: float = 0.0  # the whole call: checks, Ray start, pipeline, merge
    pipeline_s: float = 0.0  # from the start of the pipeline to the last result
    startup_s: float = 0.0  # from the start of the pipeline to the first result (actors loading)
    drift: dict[str, Any] | None = None  # PSI of the input's classified probabilities (metrics.drift.drift_status)
    warning: str | None = None  # the artifact's own (registry.artifact_warning): trained on synthetic data
    refusal_hint: str | None = None  # why its guard refuses real X-rays, and the way out (registry.refusal_hint)

    @property
    def images_per_s(self) -> float:
        """This run's files over the pipeline's time, start-up included."""
        return self.scored / self.pipeline_s if self.pipeline_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": round(self.images_per_s, 2)}

    def summary(self) -> str:
        labels = ", ".join(f"{label} {self.counts.get(label, 0):,}" for label in CLASS_NAMES)
        lines = [f"scored {self.scored:,} of {self.files:,} files with {self.model} {self.version}: "
                 f"{labels}, failed {self.failed:,}"
                 + (f", not chest X-rays {self.out_of_distribution:,}" if self.out_of_distribution else "")
                 + (f"; {self.skipped:,} already scored, skipped" if self.skipped else "")
                 + (f"; {self.ignored:,} non-image files ignored" if self.ignored else ""),
                 f"{self.images_per_s:.1f} images/s over {self.pipeline_s:.1f} s (first results after "
                 f"{self.startup_s:.1f} s: the actors loading the model); wall time {self.wall_s:.1f} s",
                 f"output: {self.output} ({self.rows:,} rows)"]
        if self.drift is not None:
            lines.append(drift_summary(self.drift))
        if self.failed:
            lines.append("rows with an error name the reason in their 'error' column; a re-run tries them again")
        if self.out_of_distribution:
            lines.append("rows with out_of_distribution true have no label: the model's guard says the image "
                         "does not look like a pediatric chest X-ray"
                         + (f"; {self.refusal_hint}" if self.refusal_hint else ""))
        if self.warning:
            lines.append(f"warning: this model was {self.warning}")
        return "\n".join(lines)


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
    reference = packed.metadata.get("drift_reference")  # checked with the metadata, before any scoring
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
                         scored=0, skipped=len(found.paths) - len(keep), failed=0, ignored=found.ignored,
                         warning=artifact_warning(packed.metadata), refusal_hint=refusal_hint(packed.metadata))
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
    result.drift = drift_status(reference, _classified(previous, packed.name, packed.version, found.paths))
    result.rows = merge(output, previous, found.columns)
    result.wall_s = time.perf_counter() - started
    return result


def _run(todo: ScoreInput, packed: PackedArtifact, result: ScoreResult, *, gpu: bool, batch_size: int,
         concurrency: int | None, max_pixels: int, progress: Callable[[str], None]) -> None:
    """Start (or join) Ray, stream the results into part files, count them into ``result``."""
    import ray

    local_ray.init_ray()
    concurrency = concurrency or _default_concurrency(gpu)
    _check_resources(gpu, concurrency)
    shipped = ray.put(packed.files)
    with _quiet_ray_data():
        dataset = build_dataset(todo, packed, shipped, gpu=gpu, batch_size=batch_size, concurrency=concurrency,
                                max_pixels=max_pixels)
        _stream(dataset, todo, result)


@contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Ray Data's INFO lines off the console while scoring: the start and end of every dataset, and
    the progress it logs every few seconds when stdout is not a terminal, would surround and split
    the command's own lines. Its warnings and errors still print, and its log file (ray-data.log in
    the Ray session's logs folder) keeps everything."""
    import ray.data  # noqa: F401 - configures the 'ray.data' logger and its console handler

    consoles = [handler for handler in logging.getLogger("ray.data").handlers
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)]
    levels = [handler.level for handler in consoles]
    for handler in consoles:
        handler.setLevel(max(handler.level, logging.WARNING))
    try:
        yield
    finally:
        for handler, level in zip(consoles, levels):
            handler.setLevel(level)


def _stream(dataset, todo: ScoreInput, result: ScoreResult) -> None:
    """Write each result block as a part file as it arrives, counting it into ``result``."""
    parts, run_ns, counts = parts_location(result.output), time.time_ns(), Counter()
    result.counts = {label: 0 for label in CLASS_NAMES}
    began = time.perf_counter()
    try:
        for sequence, table in enumerate(dataset.iter_batches(batch_size=None, batch_format="pyarrow")):
            if not result.startup_s:
                result.startup_s = time.perf_counter() - began
            write_part(parts, sequence, run_ns, table)
            result.scored += len(table)
            result.failed += len(table) - table["error"].null_count
            result.out_of_distribution += sum(flag is True for flag in table["out_of_distribution"].to_pylist())
            counts.update(label for label in table["label"].to_pylist() if label is not None)
            result.counts = {label: counts.get(label, 0) for label in CLASS_NAMES}
    except KeyboardInterrupt:
        raise Interrupted(f"scoring interrupted after {result.scored:,} of {len(todo.paths):,} files; they are "
                          f"kept in {parts}: the same command continues") from None
    except Exception as error:  # a lost node or driver connection, a full disk: the parts stay
        raise PneumoniaError(f"scoring stopped after {result.scored:,} of {len(todo.paths):,} files "
                             f"({type(error).__name__}: {first_line(error)}); they are kept in {parts}: the same "
                             "command continues") from error
    result.pipeline_s = time.perf_counter() - began


def _classified(tables: list, model: str, version: str, paths: list[str]) -> list[float]:
    """The probabilities of ``paths`` that ``model`` ``version`` classified in ``tables`` (the
    output and its parts, oldest first): its newest row per path, without an error and not out of
    distribution (the guard's refusals get no label, as from the service)."""
    import pyarrow.compute as pc

    wanted, newest = set(paths), {}
    for table in tables:
        mask = pc.and_(pc.and_(pc.equal(table["model"], model), pc.equal(table["version"], version)),
                       pc.is_null(table["error"]))
        rows = table.filter(pc.fill_null(mask, False))
        for path, probability, flagged in zip(rows["path"].to_pylist(), rows["probability"].to_pylist(),
                                              rows["out_of_distribution"].to_pylist()):
            if path in wanted:
                newest[path] = None if flagged or probability is None else probability
    return [probability for probability in newest.values() if probability is not None]


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

    available = ray.cluster_resources()
    problems = []
    gpus = available.get("GPU", 0)
    if gpu and gpus < concurrency:
        advice = local_ray.gpu_advice(gpus, "--gpu", "lower --concurrency")
        problems.append(f"{concurrency} GPU actors, but the cluster has {gpus:g} GPUs ({advice})")
    wanted = concurrency * SCORER_CPUS + (DECODE_CPUS if gpu else 0)  # GPU runs decode in tasks of their own
    if available.get("CPU", 0) < wanted:
        problems.append(f"{concurrency} actors x {SCORER_CPUS:g} CPU" + (f" + {DECODE_CPUS:g} CPU to decode" if gpu else "")
                        + f", but the cluster has {available.get('CPU', 0):g} CPUs (lower --concurrency)")
    local_ray.refuse_or_wait(problems)
