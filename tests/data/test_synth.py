"""Behaviour of the synthetic Kermany-style dataset generator."""

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumonia.data.synth import LUNG_AXES, LUNG_CENTERS, SynthSummary, make_synthetic_dataset, render_xray

SPLITS = ("train", "val", "test")
CLASSES = ("NORMAL", "PNEUMONIA")
PNEUMONIA_NAME = re.compile(r"^person(\d+)_(bacteria|virus)_(\d+)\.jpeg$")
NORMAL_NAME = re.compile(r"^(NORMAL2-)?IM-(\d{4})-(\d{4})\.jpeg$")
N_IMAGES = 300
SIZE = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> SynthSummary:
    """One small dataset shared by the read-only tests (generation is the slow part)."""
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("synth") / "data", n=N_IMAGES, seed=0, image_size=SIZE
    )


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.jpeg"))


def _patient_id(name: str) -> int:
    match = PNEUMONIA_NAME.match(name) or NORMAL_NAME.match(name)
    assert match, f"unexpected file name {name}"
    return int(match.group(1) if name.startswith("person") else match.group(2))


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Rank-based ROC-AUC (Mann-Whitney U), ties are negligible for float scores."""
    ranks = np.argsort(np.argsort(scores)) + 1
    n_pos = labels.sum()
    n_neg = len(labels) - n_pos
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _lung_mask(size: int) -> np.ndarray:
    """Inner part of the nominal lung fields, safely inside despite pose jitter."""
    u = (np.arange(size) + 0.5) / size * 2 - 1
    x, y = np.meshgrid(u, u)
    mask = np.zeros((size, size), dtype=bool)
    ax, ay = 0.75 * LUNG_AXES[0], 0.75 * LUNG_AXES[1]
    for cx, cy in LUNG_CENTERS:
        mask |= ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 < 1
    return mask


def _lung_vs_whole(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lung brightness relative to the whole image, whole-image mean) per image."""
    whole = images.mean(axis=(1, 2))
    return images[:, _lung_mask(images.shape[1])].mean(axis=1) - whole, whole


def test_layout_and_counts_match_summary(dataset):
    on_disk = {
        s: {c: len(list((dataset.root / s / c).glob("*.jpeg"))) for c in CLASSES} for s in SPLITS
    }
    assert on_disk == dataset.counts
    assert dataset.total() == N_IMAGES == len(_files(dataset.root))
    assert all(n >= 1 for per_class in on_disk.values() for n in per_class.values())
    for split in SPLITS:
        pids = {_patient_id(f.name) for f in (dataset.root / split).rglob("*.jpeg")}
        assert len(pids) == dataset.patients[split]


def test_class_imbalance_and_split_sizes_follow_fractions(dataset):
    n_pneumonia = sum(dataset.counts[s]["PNEUMONIA"] for s in SPLITS)
    assert abs(n_pneumonia / N_IMAGES - 0.73) < 0.02
    for split, fraction in zip(SPLITS, (0.80, 0.04, 0.16)):
        assert abs(sum(dataset.counts[split].values()) / N_IMAGES - fraction) < 0.02


def test_file_names_follow_real_dataset_patterns(dataset):
    kinds = defaultdict(int)
    image_ids = []
    for split in SPLITS:
        for path in (dataset.root / split / "PNEUMONIA").iterdir():
            match = PNEUMONIA_NAME.match(path.name)
            assert match, path.name
            kinds[match.group(2)] += 1
            image_ids.append(int(match.group(3)))
        for path in (dataset.root / split / "NORMAL").iterdir():
            assert NORMAL_NAME.match(path.name), path.name
    assert len(image_ids) == len(set(image_ids))
    assert 0.5 < kinds["bacteria"] / (kinds["bacteria"] + kinds["virus"]) < 0.85


def test_patients_stay_in_one_split_and_class_and_some_have_several_images(dataset):
    homes = defaultdict(set)
    images_per_patient = defaultdict(int)
    for path in _files(dataset.root):
        pid = _patient_id(path.name)
        homes[pid].add((path.parent.parent.name, path.parent.name))
        images_per_patient[pid] += 1
    assert all(len(h) == 1 for h in homes.values()), "a patient straddles splits or classes"
    sizes = np.array(list(images_per_patient.values()))
    assert sizes.max() <= 3
    assert 0.1 < (sizes > 1).mean() < 0.45


def test_images_are_grayscale_jpegs_of_requested_size(dataset):
    for path in _files(dataset.root):
        with Image.open(path) as img:
            assert img.format == "JPEG"
            assert img.mode == "L"
            assert img.size == (SIZE, SIZE)


def test_the_dataset_says_it_is_synthetic_and_discovery_ignores_the_marker(dataset):
    """A model trained here must not pass for one trained on X-rays: the root carries a marker
    (pneumonia.artifacts.export copies what it says into the artifact), and the dataset reads as before."""
    import json

    from pneumonia.data.records import discover
    from pneumonia.data.synth import MARKER_FILE

    marker = json.loads((dataset.root / MARKER_FILE).read_text())
    assert marker["synthetic"] is True and marker["generator"] == "pneumonia.data.synth"
    assert marker["n"] == N_IMAGES and marker["seed"] == 0 and marker["image_size"] == SIZE
    found = discover(str(dataset.root))
    assert len(found.records) == N_IMAGES and found.skipped == []


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    def contents(name, seed):
        root = make_synthetic_dataset(tmp_path / name, n=16, seed=seed, image_size=32).root
        return {p.relative_to(root): p.read_bytes() for p in _files(root)}

    first = contents("a", seed=7)
    assert contents("b", seed=7) == first
    assert contents("c", seed=8) != first


def test_refuses_non_empty_output_dir(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="data"):
        make_synthetic_dataset(out, n=8, image_size=16)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_accepts_existing_empty_dir(tmp_path):
    summary = make_synthetic_dataset(tmp_path, n=8, image_size=16)
    assert summary.root == tmp_path
    assert summary.total() == 8


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 7},
        {"split_fractions": (0.8, 0.1, 0.2)},
        {"split_fractions": (1.1, -0.1, 0.0)},
        {"pneumonia_fraction": 0.0},
        {"pneumonia_fraction": 1.0},
        {"image_size": 15},
        {"difficulty": -0.5},
    ],
)
def test_bad_arguments_raise_value_error(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_synthetic_dataset(tmp_path / "data", **{"image_size": 16, **kwargs})
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 8},
        {"n": 8, "pneumonia_fraction": 0.99},
        {"n": 20, "split_fractions": (1.0, 0.0, 0.0)},
    ],
)
def test_every_split_has_both_classes_even_in_edge_cases(tmp_path, kwargs):
    summary = make_synthetic_dataset(tmp_path / "data", image_size=16, **kwargs)
    assert summary.total() == kwargs["n"]
    for split in SPLITS:
        for label in CLASSES:
            assert summary.counts[split][label] >= 1
            assert any((tmp_path / "data" / split / label).iterdir())


def test_pneumonia_is_visible_in_lungs_but_not_in_global_brightness(dataset):
    files = _files(dataset.root)
    labels = np.array([f.parent.name == "PNEUMONIA" for f in files], dtype=int)
    images = np.stack([np.asarray(Image.open(f), dtype=np.float32) for f in files])
    lung_cue, whole_mean = _lung_vs_whole(images)

    assert lung_cue[labels == 1].mean() > lung_cue[labels == 0].mean()
    lung_auc, whole_auc = _auc(lung_cue, labels), _auc(whole_mean, labels)
    assert lung_auc > 0.65
    assert abs(whole_auc - 0.5) < 0.12, "global brightness alone must be a weak cue"
    assert lung_auc > whole_auc + 0.08


def test_difficulty_weakens_the_signal():
    def lung_auc(difficulty):
        rng = np.random.default_rng(0)
        labels = np.arange(160) % 2
        images = np.stack([render_xray(rng, 48, bool(t), difficulty) for t in labels])
        return _auc(_lung_vs_whole(images.astype(np.float32))[0], labels)

    assert lung_auc(0.0) > lung_auc(3.0) + 0.15


def test_render_xray_is_deterministic_uint8_square():
    a = render_xray(np.random.default_rng(1), 40, pneumonia=True)
    b = render_xray(np.random.default_rng(1), 40, pneumonia=True)
    assert a.dtype == np.uint8 and a.shape == (40, 40)
    np.testing.assert_array_equal(a, b)
    assert a.std() > 10, "image should have visible structure, not a flat field"


def test_confusable_normals_look_partly_like_pneumonia_and_change_nothing_when_off(tmp_path):
    """A share of healthy children with infiltrate-like shadows (issue 24): their lung cue sits
    between clean NORMALs and pneumonia; with the default fraction 0 the files are as before."""
    plain = make_synthetic_dataset(tmp_path / "plain", n=200, seed=5, image_size=48).root
    hard = make_synthetic_dataset(tmp_path / "hard", n=200, seed=5, image_size=48, confusable_fraction=0.5).root
    same = {p.relative_to(plain): p.read_bytes() for p in _files(plain)}
    assert set(same) == {p.relative_to(hard) for p in _files(hard)}  # the same files, names and splits
    assert all((hard / k).read_bytes() == v for k, v in same.items() if k.parent.name == "PNEUMONIA")
    changed = [k for k in same if k.parent.name == "NORMAL" and (hard / k).read_bytes() != same[k]]
    normals = [k for k in same if k.parent.name == "NORMAL"]
    assert 0.3 < len(changed) / len(normals) < 0.7

    def cue(root, keys):
        images = np.stack([np.asarray(Image.open(root / k), dtype=np.float32) for k in keys])
        return _lung_vs_whole(images)[0].mean()

    sick = [k for k in same if k.parent.name == "PNEUMONIA"]
    assert cue(plain, changed) < cue(hard, changed) < cue(plain, sick)
    marker = (hard / ".dataset.json").read_text()
    assert '"confusable_fraction": 0.5' in marker and "confusable" not in (plain / ".dataset.json").read_text()


@pytest.mark.parametrize("kwargs", [{"confusable_fraction": -0.1}, {"confusable_fraction": 1.5},
                                    {"confusable_strength": 0.0}, {"confusable_strength": 3.0}])
def test_bad_confusable_settings_raise_value_error(tmp_path, kwargs):
    with pytest.raises(ValueError, match="confusable"):
        make_synthetic_dataset(tmp_path / "data", n=8, image_size=16, **kwargs)
    assert not (tmp_path / "data").exists()
