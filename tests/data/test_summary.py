"""`pneumonia data summarize`: counts, patients, sizes and every problem, before anyone trains."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pneumonia.data.records import parse_patient
from pneumonia.data.summary import summarize
from pneumonia.data.synth import make_synthetic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("summary") / "data"
    synth = make_synthetic_dataset(root, n=40, seed=5, image_size=32)
    corrupt = root / "train" / "NORMAL" / "IM-9999-0001.jpeg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + b"definitely not an x-ray" * 20)
    buffer = io.BytesIO()
    Image.new("L", (300, 200), 90).save(buffer, format="JPEG")
    truncated = root / "test" / "PNEUMONIA" / "person9999_virus_9999.jpeg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "train" / "NORMAL" / "notes.txt").write_text("not an image")
    return root, synth, corrupt, truncated


def _patients_on_disk(root: Path, split: str, label: str) -> int:
    return len({parse_patient(path.stem)[0] for path in (root / split / label).glob("*.jpeg")})


def test_counts_patients_and_sizes(dataset):
    root, synth, corrupt, truncated = dataset
    summary = summarize(str(root))
    assert list(summary.splits) == ["train", "val", "test"]
    for name, split in summary.splits.items():
        assert split.images == synth.counts[name], name  # the broken files are not counted
        assert split.width_range == (32, 32) and split.height_range == (32, 32)
        assert sum(split.patients.values()) == synth.patients[name]
        for label in ("NORMAL", "PNEUMONIA"):
            assert split.patients[label] == _patients_on_disk(root, name, label) - (
                (name, label) in {("train", "NORMAL"), ("test", "PNEUMONIA")}  # the added broken files
            )
        assert sum(split.subtypes.values()) == sum(split.images.values())
        assert split.subtypes.get("normal", 0) == split.images["NORMAL"]


def test_problems_list_every_unreadable_or_skipped_file(dataset):
    root, _, corrupt, truncated = dataset
    problems = summarize(str(root)).problems
    by_file = {Path(p["file"]).name: p["problem"] for p in problems}
    assert set(by_file) == {corrupt.name, truncated.name, "notes.txt"}
    assert "truncated" in by_file[truncated.name]
    assert "not an image" in by_file["notes.txt"]


def test_to_json_is_serialisable_and_complete(dataset):
    root, synth, _, _ = dataset
    summary = summarize(str(root))
    payload = json.loads(json.dumps(summary.to_json()))
    assert payload["root"] == str(root)
    assert payload["total_images"] == synth.total()
    assert payload["splits"]["val"]["images"] == synth.counts["val"]
    assert payload["splits"]["train"]["width_range"] == [32, 32]
    assert len(payload["problems"]) == 3


def test_format_mentions_splits_and_problems(dataset):
    root, synth, corrupt, _ = dataset
    text = summarize(str(root)).format()
    assert "3 problem(s)" in text and corrupt.name in text
    train_line = next(line for line in text.splitlines() if line.strip().startswith("train"))
    assert train_line.split()[1:3] == [str(synth.counts["train"]["NORMAL"]), str(synth.counts["train"]["PNEUMONIA"])]


def test_flat_class_folders_and_mixed_sizes(tmp_path):
    root = tmp_path / "flat"
    sizes = {"NORMAL/IM-0001-0001.png": (40, 30), "NORMAL/IM-0001-0002.png": (64, 48),
             "pneumonia/person1_virus_1.png": (20, 50)}
    for relative, size in sizes.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", size, 100).save(root / relative)
    summary = summarize(str(root))
    assert list(summary.splits) == ["class folders"]
    split = summary.splits["class folders"]
    assert split.images == {"NORMAL": 2, "PNEUMONIA": 1}
    assert split.patients == {"NORMAL": 1, "PNEUMONIA": 1}
    assert Counter(split.subtypes) == Counter({"normal": 2, "virus": 1})
    assert split.width_range == (20, 64) and split.height_range == (30, 50)
    assert summary.problems == [] and "no problems found" in summary.format()
