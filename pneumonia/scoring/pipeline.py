"""The Ray Data stages: the artifact shipped to the actors, read + decode, and the scoring actor."""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumonia.artifacts.registry import METADATA_FILE, ArtifactError, load_artifact, verify_artifact
from pneumonia.data.preprocess import PreprocessSpec, decode_image
from pneumonia.errors import DataError, PneumoniaError
from pneumonia.models.ood import Scored, judge
from pneumonia.scoring.inputs import ScoreInput, first_line
from pneumonia.scoring.outputs import output_schema
from pneumonia.storage import is_uri, local_directory, read_bytes

BATCHES_PER_BLOCK = 4
"""Files per Ray Data block (one decode task, one part file) = batch size x this: small enough
that an interruption loses little and progress is smooth, large enough that per-task overhead
(a few ms) stays small next to decoding (5-30 ms per file)."""
DECODE_CPUS = 1.0
SCORER_CPUS = 1.0


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
    if not is_uri(location):
        return _pack(Path(location).expanduser())
    try:
        with local_directory(location) as folder:  # a copy in a scratch folder
            return _pack(folder)
    except DataError as error:
        raise ArtifactError(f"artifact not found: {location} ({error})") from None


def _pack(location: Path) -> PackedArtifact:
    verified = verify_artifact(location)
    files = {name: (verified.path / name).read_bytes() for name in [*verified.metadata["files"], METADATA_FILE]}
    return PackedArtifact(verified.metadata, verified.preprocess, verified.threshold, files)


def unpack_artifact(files: dict[str, bytes]):
    """Write shipped artifact files to a scratch folder and load them (verified again there)."""
    scratch = Path(tempfile.mkdtemp(prefix="pneumonia-score-"))
    try:
        for name, data in files.items():
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            (scratch / name).write_bytes(data)
        return load_artifact(scratch)  # the SavedModel's variables are in memory after loading
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def read_and_decode(batch: dict[str, np.ndarray], spec: PreprocessSpec, max_pixels: int) -> dict[str, np.ndarray]:
    """A CPU task: read each file and decode it with the shared preprocessing. A file that fails
    keeps a blank image and the reason in ``error`` (empty string when it decoded); ``sha256`` is
    the digest of the bytes read (empty when they could not be read)."""
    count = len(batch["path"])
    images = np.zeros((count, *spec.shape), np.uint8)
    errors = np.full(count, "", dtype=object)
    digests = np.full(count, "", dtype=object)
    for index, location in enumerate(batch["location"]):
        try:
            data = read_bytes(str(location))
            digests[index] = hashlib.sha256(data).hexdigest()
            images[index] = decode_image(data, spec, max_pixels)
        except OSError as error:
            errors[index] = f"cannot read: {error.strerror or first_line(error)}"
        except PneumoniaError as error:  # ImageDecodeError, ImageTooLargeError, DataError
            errors[index] = str(error) or type(error).__name__
        except Exception as error:  # noqa: BLE001 - one odd file must not fail an hours-long run
            errors[index] = f"unexpected {type(error).__name__}: {first_line(error)}"
    return {"path": batch["path"], "sha256": digests, "image": images, "error": errors}


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
        good = np.flatnonzero([not error for error in errors])
        answers: list[Scored | None] = [None] * len(errors)
        if len(good):
            # As the service judges a batch: one pass gives the probability and, when the artifact
            # has an out-of-distribution guard, its score; Scored compares it with the guard.
            scored = judge(*self.artifact.predict_scored(batch["image"][good], batch_size=self.batch_size),
                           self.artifact.ood)
            for index, answer in zip(good, scored):
                answers[index] = answer
        return pa.table({
            "path": [str(path) for path in batch["path"]],
            "sha256": [str(digest) or None for digest in batch["sha256"]],
            "label": [None if answer is None else answer.label(self.threshold) for answer in answers],
            "probability": [None if answer is None else answer.probability for answer in answers],
            "threshold": [self.threshold] * len(errors),
            "ood_score": [None if answer is None else answer.ood_score for answer in answers],
            "out_of_distribution": [None if answer is None else answer.out_of_distribution for answer in answers],
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
