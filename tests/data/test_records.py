"""Finding labelled images, splitting them by patient, sharding them, and reading them back."""

from __future__ import annotations

import io
import logging
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumonia import storage
from pneumonia.data.pipeline import load_images
from pneumonia.data.preprocess import PreprocessSpec
from pneumonia.data.records import (
    ImageRecord,
    class_counts,
    discover,
    evaluation_records,
    parse_patient,
    shard,
    split_by_patient,
    training_records,
)
from pneumonia.data.synth import make_synthetic_dataset
from pneumonia.errors import DataError, PneumoniaError
from tests.helpers import real_data


def jpeg(value: int = 128, size: int = 20) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size), value).save(buffer, format="JPEG")
    return buffer.getvalue()


JPEG = jpeg()


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def kermany(root: Path, extra: dict[str, bytes] | None = None) -> Path:
    """A tiny Kermany layout: train and test, both classes, patients with one to three images."""
    files = {
        "train/NORMAL/IM-0001-0001.jpeg": JPEG,
        "train/NORMAL/NORMAL2-IM-0002-0001.jpeg": JPEG,
        "train/NORMAL/NORMAL2-IM-0002-0002.jpeg": JPEG,
        "train/PNEUMONIA/person1_bacteria_1.jpeg": JPEG,
        "train/PNEUMONIA/person1_bacteria_2.jpeg": JPEG,
        "train/PNEUMONIA/person2_virus_3.jpeg": JPEG,
        "test/NORMAL/IM-0003-0001.jpeg": JPEG,
        "test/PNEUMONIA/person3_virus_4.jpeg": JPEG,
    }
    files.update(extra or {})
    return make_tree(root, files)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A small synthetic Kermany dataset (file names carry patient ids like the real one)."""
    root = tmp_path_factory.mktemp("synth") / "data"
    summary = make_synthetic_dataset(root, n=400, seed=3, image_size=16)
    return root, summary


# --------------------------------------------------------------------------- patient ids


@pytest.mark.parametrize(
    ("stem", "patient", "subtype"),
    [
        ("person1946_bacteria_4874", "person1946", "bacteria"),
        ("person1946_bacteria_4875", "person1946", "bacteria"),
        ("person447_virus_921_1", "person447", "virus"),
        ("person1_virus_6", "person1", "virus"),
        ("PERSON12_Bacteria_55", "person12", "bacteria"),
        ("IM-0001-0001", "IM-0001", "normal"),
        ("IM-0429-0001-0002", "IM-0429", "normal"),
        ("NORMAL2-IM-1427-0001", "NORMAL2-IM-1427", "normal"),
        ("normal2-im-1427-0002", "NORMAL2-IM-1427", "normal"),
        ("scan_0042", "scan_0042", "unknown"),
        ("person12", "person12", "unknown"),
        ("IM-0001", "IM-0001", "unknown"),
        ("person5_covid_1", "person5_covid_1", "unknown"),
    ],
)
def test_parse_patient(stem, patient, subtype):
    assert parse_patient(stem) == (patient, subtype)


def test_normal2_and_plain_im_numbers_are_different_patients():
    assert parse_patient("NORMAL2-IM-0001-0001")[0] != parse_patient("IM-0001-0001")[0]


# --------------------------------------------------------------------------- discover


def test_discover_kermany_layout(tmp_path):
    root = kermany(tmp_path / "data")
    dataset = discover(str(root))
    assert dataset.splits == ["train", "test"]
    assert len(dataset.records) == 8 and dataset.skipped == []
    train = dataset.split("train")
    assert class_counts(train) == {"NORMAL": 3, "PNEUMONIA": 3}
    by_name = {Path(r.location).name: r for r in dataset.records}
    record = by_name["NORMAL2-IM-0002-0002.jpeg"]
    assert (record.label, record.class_name, record.patient_id, record.subtype, record.split) == (
        0, "NORMAL", "NORMAL2-IM-0002", "normal", "train"
    )
    record = by_name["person2_virus_3.jpeg"]
    assert (record.label, record.class_name, record.patient_id, record.subtype) == (1, "PNEUMONIA", "person2", "virus")
    assert Path(record.location).read_bytes() == JPEG
    assert [r.location for r in dataset.records] == sorted(r.location for r in dataset.records)  # reproducible


def test_discover_flat_class_folders_any_case(tmp_path):
    root = make_tree(
        tmp_path / "flat",
        {
            "normal/IM-0001-0001.jpeg": JPEG,
            "normal/IM-0002-0001.JPG": JPEG,
            "Pneumonia/person1_bacteria_1.png": JPEG,
        },
    )
    dataset = discover(str(root))
    assert dataset.splits == [None]
    assert sorted((r.label, r.split) for r in dataset.records) == [(0, None), (0, None), (1, None)]
    assert training_records(dataset) == dataset.records
    assert evaluation_records(dataset) == dataset.records  # a flat root is scored as a whole


def test_discover_split_folders_any_case(tmp_path):
    root = make_tree(tmp_path / "data", {"Train/normal/IM-0001-0001.jpeg": JPEG, "TRAIN/PNEUMONIA/person1_virus_1.jpeg": JPEG})
    dataset = discover(str(root))
    assert {r.split for r in dataset.records} == {"train"}
    assert class_counts(training_records(dataset)) == {"NORMAL": 1, "PNEUMONIA": 1}


def test_discover_skips_what_is_not_a_labelled_image(tmp_path):
    root = kermany(
        tmp_path / "data",
        {
            "train/NORMAL/notes.txt": b"radiologist notes",
            "train/NORMAL/IM-0009-0001": JPEG,  # no extension
            "train/NORMAL/.DS_Store": b"\0\0\0\1Bud1",
            "train/PNEUMONIA/._person1_bacteria_1.jpeg": b"AppleDouble",
            "train/PNEUMONIA/person9_virus_9.jpeg": b"",
            "train/COVID/person8_virus_8.jpeg": JPEG,
            "README.md": b"# data",
            "train/NORMAL/extra/IM-0010-0001.jpeg": JPEG,
        },
    )
    dataset = discover(str(root))
    assert len(dataset.records) == 8  # exactly the images of kermany()
    reasons = dict(dataset.skipped)
    assert set(reasons) == {
        "train/NORMAL/notes.txt",
        "train/NORMAL/IM-0009-0001",
        "train/PNEUMONIA/person9_virus_9.jpeg",
        "train/COVID/person8_virus_8.jpeg",
        "README.md",
        "train/NORMAL/extra/IM-0010-0001.jpeg",
    }  # hidden files are left out silently: they are never data
    assert "not an image" in reasons["train/NORMAL/notes.txt"]
    assert "empty" in reasons["train/PNEUMONIA/person9_virus_9.jpeg"]
    assert "COVID" in reasons["train/COVID/person8_virus_8.jpeg"]
    assert "NORMAL or PNEUMONIA" in reasons["train/COVID/person8_virus_8.jpeg"]


def test_discover_missing_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        discover(str(tmp_path / "nope"))


def test_discover_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files"):
        discover(str(tmp_path / "empty"))


def test_discover_folder_with_only_wrong_class_folders(tmp_path):
    root = make_tree(tmp_path / "data", {"train/COVID/a.jpeg": JPEG, "cats/b.jpeg": JPEG, "x.jpeg": JPEG})
    with pytest.raises(DataError) as raised:
        discover(str(root))
    message = str(raised.value)
    assert "no images found" in message and "NORMAL" in message and "PNEUMONIA" in message


def test_discover_refuses_mixed_layouts(tmp_path):
    root = kermany(tmp_path / "data", {"NORMAL/IM-0100-0001.jpeg": JPEG})
    with pytest.raises(DataError, match="mixes split folders"):
        discover(str(root))


def test_training_records_need_both_classes(tmp_path):
    root = make_tree(tmp_path / "data", {"train/NORMAL/IM-0001-0001.jpeg": JPEG, "train/PNEUMONIA/x.txt": b"x"})
    dataset = discover(str(root))
    with pytest.raises(DataError, match="no PNEUMONIA images"):
        training_records(dataset)


def test_training_records_need_a_train_split(tmp_path):
    root = make_tree(tmp_path / "data", {"test/NORMAL/IM-0001-0001.jpeg": JPEG, "test/PNEUMONIA/person1_virus_1.jpeg": JPEG})
    with pytest.raises(DataError, match="no train/"):
        training_records(discover(str(root)))


def test_training_records_use_only_the_train_split(tmp_path):
    dataset = discover(str(kermany(tmp_path / "data")))
    records = training_records(dataset)
    assert len(records) == 6 and {r.split for r in records} == {"train"}


def test_evaluation_records(tmp_path):
    dataset = discover(str(kermany(tmp_path / "data")))
    test = evaluation_records(dataset, "test")
    assert len(test) == 2 and {r.split for r in test} == {"test"}
    with pytest.raises(DataError) as raised:
        evaluation_records(dataset, "val")
    assert "no val/ split" in str(raised.value) and "train, test" in str(raised.value)


def test_evaluation_records_need_both_classes(tmp_path):
    root = kermany(tmp_path / "data", {"val/NORMAL/IM-0050-0001.jpeg": JPEG})
    with pytest.raises(DataError, match="no PNEUMONIA"):
        evaluation_records(discover(str(root)), "val")


# --------------------------------------------------------------------------- split by patient


def _check_patient_split(records, train, val, val_fraction, tolerance):
    assert sorted(r.location for r in train + val) == sorted(r.location for r in records)
    assert len(train) + len(val) == len(records)
    assert not {r.patient_id for r in train} & {r.patient_id for r in val}, "a patient is on both sides"
    for side in (train, val):
        assert set(class_counts(side).values()) != {0} and min(class_counts(side).values()) > 0
    all_counts, val_counts = class_counts(records), class_counts(val)
    for name in all_counts:
        share = val_counts[name] / all_counts[name]
        assert abs(share - val_fraction) <= tolerance, f"{name}: val share {share:.3f}"


@pytest.mark.parametrize("val_fraction", [0.1, 0.2, 0.3])
def test_split_by_patient_on_synthetic_data(synthetic, val_fraction):
    root, _ = synthetic
    records = training_records(discover(str(root)))
    assert max(Counter(r.patient_id for r in records).values()) > 1  # the grouping matters here
    train, val = split_by_patient(records, val_fraction, seed=0)
    _check_patient_split(records, train, val, val_fraction, tolerance=0.05)


def test_split_by_patient_is_seeded_and_order_independent(synthetic):
    root, _ = synthetic
    records = training_records(discover(str(root)))
    train, val = split_by_patient(records, 0.2, seed=1)
    again_train, again_val = split_by_patient(records, 0.2, seed=1)
    assert (again_train, again_val) == (train, val)
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    _, shuffled_val = split_by_patient(shuffled, 0.2, seed=1)
    assert {r.location for r in shuffled_val} == {r.location for r in val}  # train, tune, export agree
    _, other_val = split_by_patient(records, 0.2, seed=2)
    assert {r.location for r in other_val} != {r.location for r in val}


def test_split_keeps_a_lone_patient_of_a_class_on_the_train_side():
    records = [ImageRecord(f"n{k}.jpeg", 0, "IM-0001", "normal", "train") for k in range(3)]
    records += [ImageRecord(f"p{k}.jpeg", 1, f"person{k}", "bacteria", "train") for k in range(10)]
    train, val = split_by_patient(records, 0.3, seed=0)
    assert class_counts(train)["NORMAL"] == 3 and class_counts(val)["NORMAL"] == 0
    assert class_counts(val)["PNEUMONIA"] == 3


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1])
def test_split_rejects_impossible_fractions(val_fraction):
    records = [ImageRecord("a.jpeg", 0, "a", "normal", "train"), ImageRecord("b.jpeg", 1, "b", "virus", "train")]
    with pytest.raises(ValueError):
        split_by_patient(records, val_fraction, seed=0)


@pytest.mark.realdata
def test_split_by_patient_on_the_real_train_split():
    root = real_data("chest_xray_224")
    records = training_records(discover(str(root)))
    assert len(records) == 5216
    train, val = split_by_patient(records, 0.15, seed=42)
    _check_patient_split(records, train, val, 0.15, tolerance=0.02)
    assert len({r.patient_id for r in records}) < len(records)  # real patients have several images


# --------------------------------------------------------------------------- shard


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_shard_covers_every_record_once_and_keeps_balance(synthetic, world_size):
    root, _ = synthetic
    records = training_records(discover(str(root)))
    shards = [shard(records, rank, world_size) for rank in range(world_size)]
    locations = [r.location for part in shards for r in part]
    assert sorted(locations) == sorted(r.location for r in records)
    assert len(locations) == len(set(locations))
    for name in ("NORMAL", "PNEUMONIA"):
        sizes = [class_counts(part)[name] for part in shards]
        assert max(sizes) - min(sizes) <= 1, (name, sizes)


@pytest.mark.parametrize(("rank", "world_size"), [(2, 2), (-1, 2), (0, 0)])
def test_shard_rejects_bad_ranks(rank, world_size):
    with pytest.raises(ValueError):
        shard([ImageRecord("a.jpeg", 0, "a", "normal", None)], rank, world_size)


# --------------------------------------------------------------------------- load_images


def test_load_images_skips_bad_files_with_warnings(tmp_path, caplog):
    good = {f"good{k}.jpeg": jpeg(40 * k + 20) for k in range(3)}
    full = jpeg(size=200)
    bad = {
        "corrupt.jpeg": b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10,
        "truncated.jpeg": full[: len(full) // 2],
        "empty.jpeg": b"",
    }
    make_tree(tmp_path, {**good, **bad})
    names = ["good0.jpeg", "corrupt.jpeg", "good1.jpeg", "truncated.jpeg", "empty.jpeg", "good2.jpeg", "missing.jpeg"]
    records = [ImageRecord(str(tmp_path / name), k % 2, name, "unknown", "train") for k, name in enumerate(names)]
    with caplog.at_level(logging.WARNING, logger="pneumonia.data.pipeline"):
        decoded = load_images(records, PreprocessSpec(32, 1), threads=3)
    assert decoded.images.shape == (3, 32, 32, 1) and decoded.images.dtype == np.uint8
    assert [Path(r.location).name for r in decoded.records] == ["good0.jpeg", "good1.jpeg", "good2.jpeg"]
    assert decoded.labels.tolist() == [0.0, 0.0, 1.0]  # labels follow the images that decoded
    assert [int(np.median(image)) for image in decoded.images] == pytest.approx([20, 60, 100], abs=2)
    failed = {Path(location).name for location, _ in decoded.failures}
    assert failed == {"corrupt.jpeg", "truncated.jpeg", "empty.jpeg", "missing.jpeg"}
    warned = " ".join(record.getMessage() for record in caplog.records if record.levelno == logging.WARNING)
    for name in failed:
        assert name in warned


# --------------------------------------------------------------------------- storage through URIs


def test_list_files_local_and_file_uri_agree(tmp_path):
    root = kermany(tmp_path / "data", {"train/NORMAL/IM 0100 (copy).jpeg": jpeg(7), "train/NORMAL/IM-0101%20-0001.jpeg": jpeg(9)})
    local = storage.list_files(str(root))
    remote = storage.list_files(root.as_uri())
    assert [(e.relative, e.size) for e in remote] == [(e.relative, e.size) for e in local]
    assert len(remote) == 10
    for entry in remote:
        assert entry.location.startswith("file://")
        assert storage.read_bytes(entry.location) == (root / entry.relative).read_bytes(), entry.relative
    assert [e.relative for e in storage.list_files(root.as_uri() + "/")] == [e.relative for e in local]


def test_storage_file_uri_errors_and_small_helpers(tmp_path):
    with pytest.raises(DataError, match="not found"):
        storage.list_files((tmp_path / "nope").as_uri())
    target = storage.join(tmp_path.as_uri(), "runs", "a", "note.txt")
    storage.write_text(target, "hello")
    assert (tmp_path / "runs" / "a" / "note.txt").read_text() == "hello"
    assert storage.exists(target) and not storage.exists(storage.join(tmp_path.as_uri(), "nope"))
    assert storage.read_bytes(target) == b"hello"


def test_discover_and_load_through_a_file_uri(tmp_path):
    root = kermany(tmp_path / "data", {"train/NORMAL/notes.txt": b"x"})
    local = discover(str(root))
    remote = discover(root.as_uri())
    assert len(remote.records) == len(local.records) == 8
    assert all(r.location.startswith("file://") for r in remote.records)
    assert [(r.label, r.patient_id, r.split) for r in remote.records] == [
        (r.label, r.patient_id, r.split) for r in local.records
    ]
    assert remote.skipped == local.skipped
    decoded = load_images(training_records(remote), PreprocessSpec(16), threads=2)
    assert decoded.images.shape == (6, 16, 16, 1) and not decoded.failures


def test_a_failed_carve_names_the_files_that_could_not_be_read(tmp_path):
    """Too few patients for a validation split: when none of the files is an image that is the
    cause to name; when some are not, the message says so beside the patient count (issue 24)."""
    from pneumonia.config import ExperimentConfig
    from pneumonia.data.records import carve_validation

    for folder, name in (("NORMAL", "IM-0001-0001.jpeg"), ("PNEUMONIA", "person1_bacteria_1.jpeg")):
        (tmp_path / "train" / folder).mkdir(parents=True)
        (tmp_path / "train" / folder / name).write_text("minutes of the ward round")
    with pytest.raises(DataError, match=r"none of the 2 training image files under .* could be read as an image "
                                        r"\(e\.g\. IM-0001-0001\.jpeg: not a recognised image"):
        carve_validation(str(tmp_path), ExperimentConfig())
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(tmp_path / "train" / "NORMAL" / "IM-0001-0001.jpeg")
    with pytest.raises(PneumoniaError, match=r"too few patients .*; besides, 1 of its 2 training image files could "
                                             r"not be read \(e\.g\. person1_bacteria_1\.jpeg: "):
        carve_validation(str(tmp_path), ExperimentConfig())
