"""Find labelled chest X-rays on disk or in an object store, and split them by patient.

Reads the Kermany layout ``root/{train,val,test}/{NORMAL,PNEUMONIA}/*`` or a root that holds only
the class folders. Labels come from folder names (any case). Patient ids come from file names, so
that splits never put one child's images on both sides: the official set has up to dozens of
images per patient, and a per-image split would let a model be graded on a patient it trained on.

Nothing here imports TensorFlow or Ray, so the driver can check the data in seconds before a
cluster starts (:func:`check_readable`).
"""

from __future__ import annotations

import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from pneumonia.config import ExperimentConfig
from pneumonia.data.labels import CLASS_NAMES, IMAGE_EXTENSIONS
from pneumonia.data.preprocess import PreprocessSpec, decode_image
from pneumonia.errors import DataError, PneumoniaError
from pneumonia.storage import is_uri, list_files, read_bytes

SPLITS = ("train", "val", "test")

PROBE_SPEC = PreprocessSpec(image_size=32)
"""A full decode (it catches truncation) at a cheap draft scale: enough to tell an image from junk."""
SAMPLE_PER_FOLDER = 16
"""Files :func:`check_readable` decodes per class folder: seconds on one core, and enough that a
folder of junk is never taken for one of images."""

_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)_\d+(?:_\d+)*$", re.IGNORECASE)
_NORMAL = re.compile(r"^((?:NORMAL\d*-)?IM-\d+)(?:-\d+)+$", re.IGNORECASE)


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image: where it is, its label, and whose it is."""

    location: str  # local path or URI
    label: int  # 0 = NORMAL, 1 = PNEUMONIA
    patient_id: str
    subtype: str  # "normal", "bacteria", "virus" or "unknown"
    split: str | None  # official split folder it came from, None for a class-folders-only root

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.label]


@dataclass
class Dataset:
    """All records found under a root, plus the files that were skipped and why."""

    root: str
    records: list[ImageRecord]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)

    def split(self, name: str | None) -> list[ImageRecord]:
        return [record for record in self.records if record.split == name]

    @property
    def splits(self) -> list[str | None]:
        present = {record.split for record in self.records}
        return [name for name in (*SPLITS, None) if name in present]


def parse_patient(stem: str) -> tuple[str, str]:
    """Patient id and subtype from a file name stem.

    ``person1946_bacteria_4874`` -> (``person1946``, ``bacteria``);
    ``NORMAL2-IM-1427-0001`` -> (``NORMAL2-IM-1427``, ``normal``); ``IM-0001-0001`` -> (``IM-0001``,
    ``normal``). An unknown pattern makes the image its own patient (subtype ``unknown``), which
    is the safe choice for grouping: it can never join two patients.
    """
    match = _PERSON.match(stem)
    if match:
        return match.group(1).lower(), match.group(2).lower()
    match = _NORMAL.match(stem)
    if match:
        return match.group(1).upper(), "normal"
    return stem, "unknown"


def _label_of(folder: str) -> int | None:
    upper = folder.upper()
    return CLASS_NAMES.index(upper) if upper in CLASS_NAMES else None


def discover(root: str) -> Dataset:
    """List every labelled image under root (path or URI).

    Raises DataError when the root is missing or holds no labelled images, or mixes the two
    layouts (``training_records``/``evaluation_records`` then check that both classes are there). Files that are not images by extension (and hidden files) are
    skipped and listed in ``Dataset.skipped``; unreadable image contents are found at decode time.
    """
    if not is_uri(root):
        # Absolute, because Ray workers run in another working directory.
        root = str(Path(root).expanduser().resolve())
    entries = list_files(root)
    if not entries:
        raise DataError(f"no files under {root}")
    records: list[ImageRecord] = []
    skipped: list[tuple[str, str]] = []
    for entry in entries:
        parts = PurePosixPath(entry.relative).parts
        name = parts[-1]
        if name.startswith("."):
            continue  # .DS_Store, ._foo: never data, not worth a warning
        if len(parts) == 3 and parts[0].lower() in SPLITS:
            split, folder = parts[0].lower(), parts[1]
        elif len(parts) == 2:
            split, folder = None, parts[0]
        else:
            skipped.append((entry.relative, "not in a <split>/<CLASS>/ or <CLASS>/ folder"))
            continue
        label = _label_of(folder)
        if label is None:
            skipped.append((entry.relative, f"folder {folder!r} is not NORMAL or PNEUMONIA"))
            continue
        suffix = PurePosixPath(name).suffix.lower()
        if suffix not in IMAGE_EXTENSIONS:
            skipped.append((entry.relative, f"not an image file ({suffix or 'no extension'})"))
            continue
        if entry.size == 0:
            skipped.append((entry.relative, "empty file"))
            continue
        patient, subtype = parse_patient(PurePosixPath(name).stem)
        records.append(ImageRecord(entry.location, label, patient, subtype, split))

    if not records:
        raise DataError(
            f"no images found under {root}: expected {{train,val,test}}/{{NORMAL,PNEUMONIA}}/*.jpeg "
            "or NORMAL/ and PNEUMONIA/ folders"
        )
    dataset = Dataset(root=root, records=records, skipped=skipped)
    if any(r.split is None for r in records) and any(r.split is not None for r in records):
        raise DataError(
            f"{root} mixes split folders (train/val/test) with class folders at the top level; "
            "use one layout"
        )
    return dataset


def require_both_classes(records: list[ImageRecord], what: str) -> None:
    counts = Counter(record.label for record in records)
    missing = [CLASS_NAMES[label] for label in (0, 1) if counts[label] == 0]
    if missing:
        raise DataError(f"{what} has no {' and no '.join(missing)} images; both classes are needed")


def training_records(dataset: Dataset) -> list[ImageRecord]:
    """The images to learn from: the train split, or the class folders of a flat root."""
    records = dataset.split("train") or dataset.split(None)
    if not records:
        raise DataError(f"{dataset.root} has no train/ split and no class folders")
    require_both_classes(records, f"the training data in {dataset.root}")
    return records


def evaluation_records(dataset: Dataset, split: str = "test") -> list[ImageRecord]:
    """The images to score: the named split, or the class folders of a flat root."""
    records = dataset.split(split) if dataset.splits != [None] else dataset.split(None)
    if not records:
        raise DataError(f"{dataset.root} has no {split}/ split (found: {_split_names(dataset)})")
    require_both_classes(records, f"the {split} data in {dataset.root}")
    return records


def _split_names(dataset: Dataset) -> str:
    return ", ".join(name or "class folders" for name in dataset.splits)


def split_by_patient(
    records: list[ImageRecord], val_fraction: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Seeded, label-stratified split in which every patient lands on exactly one side.

    Patients are shuffled within each class (a patient's class is the label of their images) and
    taken into validation until the class reaches ``val_fraction`` of its images, so both sides
    keep the class balance. The same records, fraction and seed always give the same split, which
    is how train, tune and export agree on one validation set.
    """
    if not 0 < val_fraction < 1:
        raise ValueError("val_fraction must be between 0 and 1")
    by_patient: dict[str, list[ImageRecord]] = {}
    for record in records:
        by_patient.setdefault(record.patient_id, []).append(record)

    def patient_label(patient: str) -> int:
        labels = [record.label for record in by_patient[patient]]
        return int(sum(labels) * 2 >= len(labels))

    rng = np.random.default_rng(seed)
    val_patients: set[str] = set()
    for label in (0, 1):
        patients = sorted(p for p in by_patient if patient_label(p) == label)
        wanted = val_fraction * sum(len(by_patient[p]) for p in patients)
        taken = 0
        # Keep at least one patient of each class on the training side.
        for index in rng.permutation(len(patients))[: max(len(patients) - 1, 0)]:
            if taken >= wanted:
                break
            val_patients.add(patients[index])
            taken += len(by_patient[patients[index]])
    train = [record for record in records if record.patient_id not in val_patients]
    val = [record for record in records if record.patient_id in val_patients]
    return train, val


def shard(records: list[ImageRecord], rank: int, world_size: int) -> list[ImageRecord]:
    """This worker's part: every world_size-th record of each class, so shards keep the balance."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    part: list[ImageRecord] = []
    for label in (0, 1):
        part.extend([r for r in records if r.label == label][rank::world_size])
    return part


def class_counts(records: list[ImageRecord]) -> dict[str, int]:
    counts = Counter(record.label for record in records)
    return {name: counts[index] for index, name in enumerate(CLASS_NAMES)}


def probe_image(location: str) -> tuple[tuple[int, int] | None, str | None]:
    """((width, height), None) for a readable image, or (None, why not): the file is read and fully
    decoded by the shared ``decode_image``, at :data:`PROBE_SPEC`'s draft scale."""
    from PIL import Image

    try:
        data = read_bytes(location)
        decode_image(data, PROBE_SPEC)
        with Image.open(io.BytesIO(data)) as image:
            return image.size, None
    except (PneumoniaError, OSError) as error:
        return None, str(error) or type(error).__name__


def check_readable(records: list[ImageRecord], sample: int = SAMPLE_PER_FOLDER) -> None:
    """Raise DataError when a class folder's files are not images at all, before anything starts.

    Training workers skip unreadable files; when a folder holds nothing else, they would fail one
    by one after Ray started, each with its own traceback. Decoding an evenly spread sample of each
    folder on the driver says the same in seconds, naming the folder and how many of the files tried
    could not be read. A folder with some readable files passes: its bad ones are skipped later.
    """
    by_folder: dict[str, list[ImageRecord]] = {}
    for record in records:
        by_folder.setdefault(_folder_of(record.location), []).append(record)
    for folder, members in sorted(by_folder.items()):
        step = max(1, len(members) // sample)
        tried = members[::step][:sample]
        problems = [problem for _, problem in map(probe_image, (r.location for r in tried))]
        if all(problems):
            name = PurePosixPath(tried[0].location).name
            tried_text = (f"its {len(tried)} image files" if len(tried) == len(members)
                          else f"{len(tried)} of its {len(members)} image files (an even sample)")
            raise DataError(f"{folder}: none of {tried_text} could be read as an image (e.g. {name}: {problems[0]}); "
                            "put readable JPEG, PNG or DICOM X-rays there")


def _folder_of(location: str) -> str:
    return location.rsplit("/", 1)[0] if is_uri(location) else str(Path(location).parent)


def check_training_data(root: str) -> None:
    """The checks a training run makes on its driver before Ray starts (layout, both classes, each
    class folder readable), for callers that have only the root (a sweep)."""
    check_readable(training_records(discover(root)))


def carve_validation(data_root: str, config: ExperimentConfig):
    """(dataset, train records, validation records): the same carve for train, tune and export."""
    dataset = discover(data_root)
    records = training_records(dataset)
    train_part, val_part = split_by_patient(records, config.data.val_fraction, config.data.seed)
    if not val_part or not any(r.label == 0 for r in val_part) or not any(r.label == 1 for r in val_part):
        # Few patients: often because the files are not images at all, which is then the real cause.
        unreadable = _unreadable(records)
        examples = "; ".join(f"{PurePosixPath(location).name}: {problem}" for location, problem in unreadable[:3])
        if unreadable and len(unreadable) == len(records):
            raise DataError(f"none of the {len(records)} training image files under {dataset.root} could be read as an image "
                            f"(e.g. {examples}); put readable JPEG, PNG or DICOM X-rays there")
        raise PneumoniaError(
            f"too few patients in {data_root} to carve a validation split with both classes "
            f"(val_fraction={config.data.val_fraction}); add data or raise data.val_fraction"
            + (f"; besides, {len(unreadable)} of its {len(records)} training image files could not be read (e.g. {examples})"
               if unreadable else "")
        )
    return dataset, train_part, val_part


def _unreadable(records: list[ImageRecord], limit: int = 2000) -> list[tuple[str, str]]:
    """(location, why) of each record that is not a readable image; only for a small dataset (the
    first ``limit`` records), where a failed carve makes the reason worth a few seconds."""
    locations = [record.location for record in records[:limit]]
    return [(location, problem) for location, (_, problem) in zip(locations, map(probe_image, locations)) if problem]
