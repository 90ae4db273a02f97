"""Synthetic pediatric chest X-ray dataset in the Kermany et al. layout.

Why this exists: the real dataset is a multi-GB download behind a login, which
is useless for a quick demo or a CI test. This module writes a small stand-in
with the same directory layout (``{train,val,test}/{NORMAL,PNEUMONIA}``), the
same file-name patterns (which encode patient ids, so grouped splitting can be
exercised), the same class imbalance, and pictures that carry a real but
non-trivial signal: pneumonia shows up as soft opacities inside the lung
fields, while global brightness/contrast is jittered so that a model cannot
cheat with whole-image statistics.

Like the real problem, the healthy class need not be clean: ``confusable_fraction`` of the NORMAL
children get infiltrate-like shadows (in real films: crowded vessels and peribronchial markings
on an expiratory film, overlapping soft tissue). They add density to the lung fields as faint
infiltrates do, and differ in shape (streaks radiating from the lung roots, not rounded patches),
so a model that is told little about NORMAL (the minority class) flags them; what a high-recall
operating point costs in precision then depends on the NORMAL class weight and the learning rate,
as it does on real X-rays.

Only numpy and Pillow are used so the generator runs anywhere the package
imports, without TensorFlow or Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pneumonia.data.labels import CLASS_NAMES as CLASSES
from pneumonia.errors import OutputError

SPLITS = ("train", "val", "test")
MIN_IMAGES = 8
"""Fewer images cannot give every split both classes."""
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 4096
"""Pixels per side: below 16 no anatomy is left; a real chest X-ray is at most about 4k x 4k."""

_JPEG_QUALITY = 90
# Share of patients contributing 2-3 images (roughly what the real set shows).
_MULTI_IMAGE_PATIENT_P = 0.25
# Among pneumonia patients, bacterial cases outnumber viral ones about 2:1.
_BACTERIA_P = 2 / 3
# Nominal lung field geometry in body coordinates (x right, y down, [-1, 1]).
# Exposed at module level so tests/diagnostics can locate the lungs.
LUNG_CENTERS = ((-0.4, 0.0), (0.4, 0.0))
LUNG_AXES = (0.29, 0.6)
_LUNG_DARKNESS = 0.36
_OPACITY_CEILING = 0.4
CONFUSABLE_KIND = "normal_confusable"
"""The drawing of a NORMAL child whose film shows infiltrate-like shadows (``confusable_fraction``)."""

MARKER_FILE = ".dataset.json"
"""Written at the dataset root: says the images are synthetic, so that an artifact trained on them
says so too (pneumonia.artifacts.export). Hidden, because dataset discovery skips hidden files silently."""


@dataclass(frozen=True)
class SynthSummary:
    """What was written, so callers can check counts without re-walking disk."""

    root: Path
    counts: dict[str, dict[str, int]]  # split -> {"NORMAL": n, "PNEUMONIA": n}
    patients: dict[str, int]  # split -> number of distinct patients

    def total(self) -> int:
        """Total number of images over all splits and classes."""
        return sum(sum(per_class.values()) for per_class in self.counts.values())


@dataclass(frozen=True)
class _Record:
    """One image to write: where it goes, its file name and what to draw."""

    split: str
    label: str
    filename: str
    kind: str  # "normal", "bacteria" or "virus" (a NORMAL one may be drawn as CONFUSABLE_KIND)


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


def render_xray(
    rng: np.random.Generator, size: int, pneumonia: bool, difficulty: float = 1.0
) -> np.ndarray:
    """Draw one synthetic chest X-ray as a ``uint8`` ``size x size`` array.

    For pneumonia the infection type (bacterial/viral) is drawn from ``rng``
    with the same 2:1 odds used for file names in the dataset generator.
    ``difficulty`` 1.0 is the reference; larger values shrink and fade the
    opacities and add noise, 0.0 is the easiest setting.
    """
    if pneumonia:
        kind = "bacteria" if rng.random() < _BACTERIA_P else "virus"
    else:
        kind = "normal"
    return _render(rng, size, kind, difficulty)


def _render(rng: np.random.Generator, size: int, kind: str, difficulty: float,
            confusable_strength: float = 0.0) -> np.ndarray:
    """Compose anatomy, optional infiltrates (or, for CONFUSABLE_KIND, infiltrate-like shadows of
    ``confusable_strength``), noise and exposure jitter."""
    x, y = _body_grid(rng, size)
    body = _soft_ellipse(x, y, 0.0, 0.2, 0.92, 1.1, edge=0.08, power=3)
    neck = _soft_ellipse(x, y, 0.0, -1.0, 0.24, 0.3, edge=0.2)
    tissue = np.maximum(body, neck)
    heart = _soft_ellipse(x, y, 0.12 + rng.normal(0, 0.02), 0.4, 0.3, 0.26, edge=0.3)
    lungs = _lung_mask(x, y) * (1.0 - heart)

    img = 0.07 + 0.55 * tissue
    img -= _LUNG_DARKNESS * lungs
    img += _spine(x, y) * tissue
    img += _ribs(rng, x, y) * (lungs + 0.25 * body)
    img += _smooth_field(rng, size, cells=4, scale=0.05)
    if kind == CONFUSABLE_KIND:
        img += _shadows(rng, x, y, size, confusable_strength) * lungs
    elif kind != "normal":
        img += _infiltrates(rng, x, y, size, kind, difficulty) * lungs
    img += rng.standard_normal((size, size), dtype=np.float32) * (0.025 * (1 + difficulty))
    img = _exposure(rng, img)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _body_grid(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel grid mapped into jittered body coordinates.

    Patients are never centred identically: a random shift, scale and small
    rotation is applied once here so every anatomical part moves together.
    """
    u = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    angle = rng.normal(0.0, 0.05)
    scale = rng.uniform(0.9, 1.1)
    dx, dy = rng.normal(0.0, 0.04, size=2)
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    xs, ys = u[None, :] - dx, u[:, None] - dy
    x = (cos * xs + sin * ys).astype(np.float32)
    y = (-sin * xs + cos * ys).astype(np.float32)
    return x, y


def _soft_ellipse(x, y, cx, cy, ax, ay, edge, power=2):
    """(Super-)ellipse indicator with a linear ramp of relative width ``edge``.

    ``power`` > 2 squares the shape off, which suits a torso.
    """
    r = np.abs((x - cx) / ax) ** power + np.abs((y - cy) / ay) ** power
    return np.clip((1.0 - r) / edge, 0.0, 1.0)


def _lung_mask(x, y):
    """Two pear-shaped lung fields: narrow apex at the top, wide base."""
    mask = np.zeros_like(x)
    (ax, ay) = LUNG_AXES
    for cx, cy in LUNG_CENTERS:
        widen = np.clip(0.85 + 0.3 * (y - cy) / ay, 0.55, 1.1)
        mask = np.maximum(mask, _soft_ellipse(x, y, cx, cy, ax * widen, ay, edge=0.3))
    return mask


def _spine(x, y):
    """Bright vertical band with a faint vertebral rhythm."""
    band = np.clip(1.0 - (x / 0.07) ** 2, 0.0, 1.0)
    vertebrae = 0.85 + 0.15 * np.cos(y * (2 * np.pi / 0.11))
    return 0.16 * band * vertebrae


def _ribs(rng: np.random.Generator, x, y):
    """Subtle curved stripes that sag laterally, as posterior ribs do."""
    period = rng.uniform(0.13, 0.16)
    curvature = rng.uniform(0.35, 0.55)
    phase = (y - curvature * x * x) / period + rng.uniform(0, 1)
    stripes = np.clip(np.cos(2 * np.pi * phase) - 0.3, 0.0, None)
    return rng.uniform(0.05, 0.08) * stripes


def _smooth_field(rng: np.random.Generator, size: int, cells: int, scale: float):
    """Low-frequency random field (bicubic upsampling of a tiny noise grid)."""
    coarse = rng.normal(0.0, scale, size=(cells, cells)).astype(np.float32)
    field = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(field, dtype=np.float32)


def _infiltrates(rng: np.random.Generator, x, y, size: int, kind: str, difficulty: float):
    """1-4 Gaussian opacities centred inside the lungs.

    Bacterial pneumonia is drawn as few dense focal blobs, viral as more,
    fainter and wider patches with mottled texture. ``difficulty`` fades and
    shrinks them so harder variants of the task can be produced.
    """
    strength = 2.0 / (1.0 + difficulty)
    if kind == "bacteria":
        count, sigma_range, amp_range = rng.integers(1, 3), (0.08, 0.14), (0.3, 0.45)
    else:
        count, sigma_range, amp_range = rng.integers(2, 5), (0.11, 0.18), (0.18, 0.28)
    opacity = np.zeros_like(x)
    for _ in range(count):
        cx, cy = _point_in_lung(rng)
        sigma = rng.uniform(*sigma_range) * np.sqrt(strength)
        amp = rng.uniform(*amp_range) * strength
        opacity += amp * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma * sigma))
    mottle = 1.0 + _smooth_field(rng, size, cells=12, scale=0.35 if kind == "virus" else 0.15)
    # Fluid-filled lung cannot get much denser than soft tissue: saturate
    # overlapping blobs near the lung/tissue contrast instead of summing them.
    return _OPACITY_CEILING * np.tanh(opacity * mottle / _OPACITY_CEILING)


def _shadows(rng: np.random.Generator, x, y, size: int, strength: float):
    """Infiltrate-like shadows on a healthy child's film: crowded vessels and peribronchial
    markings, drawn as 6-10 streaks radiating from the lung roots (hila) over a faint perihilar
    haze. They add about as much density to the lung fields as a faint infiltrate (times
    ``strength``), so a model that judges by density flags them; what tells them apart is their
    shape, linear streaks instead of rounded patches."""
    opacity = np.zeros_like(x)
    for side in (-1.0, 1.0):
        hx, hy = 0.17 * side + rng.normal(0, 0.02), rng.normal(0.0, 0.05)
        opacity += rng.uniform(0.05, 0.09) * np.exp(-((x - hx) ** 2 / 0.03 + (y - hy) ** 2 / 0.08))
        for _ in range(int(rng.integers(3, 6))):
            angle = rng.uniform(-1.1, 1.1) + (0.0 if side > 0 else np.pi)
            dx, dy = np.cos(angle), np.sin(angle)
            along = (x - hx) * dx + (y - hy) * dy
            across = -(x - hx) * dy + (y - hy) * dx
            length = rng.uniform(0.35, 0.6)
            ridge = np.exp(-(across ** 2) / (2 * rng.uniform(0.012, 0.02) ** 2))
            opacity += rng.uniform(0.2, 0.32) * ridge * np.clip(along / length, 0.0, 1.0) ** 0.5 * (along < length)
    return _OPACITY_CEILING * np.tanh(strength * opacity / _OPACITY_CEILING)


def _point_in_lung(rng: np.random.Generator) -> tuple[float, float]:
    """Uniform-ish point in the inner part of a randomly chosen lung field."""
    cx, cy = LUNG_CENTERS[rng.integers(0, 2)]
    radius = 0.75 * np.sqrt(rng.uniform())
    theta = rng.uniform(0, 2 * np.pi)
    return cx + radius * LUNG_AXES[0] * np.cos(theta), cy + radius * LUNG_AXES[1] * np.sin(theta)


def _exposure(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Random gain and offset, like differing exposure settings.

    The offset spread is deliberately much larger than the mean-brightness
    change caused by opacities, so whole-image brightness is a weak cue.
    """
    gain = rng.uniform(0.8, 1.2)
    offset = rng.normal(0.0, 0.07)
    return img * gain + offset


# --------------------------------------------------------------------------
# Dataset layout
# --------------------------------------------------------------------------


def write_marker(root: Path, **settings) -> Path:
    """Mark ``root`` as synthetic (:data:`MARKER_FILE`): ``{"synthetic": true, "generator": ...,
    and the settings}``. A model trained on these images calls real X-rays wrongly, and nothing in
    a checkpoint or an artifact would otherwise say where its training images came from."""
    marker = root / MARKER_FILE
    marker.write_text(json.dumps({"synthetic": True, "generator": "pneumonia.data.synth", **settings},
                                 indent=2, sort_keys=True) + "\n")
    return marker


def make_synthetic_dataset(
    out_dir,
    n: int = 600,
    seed: int = 0,
    image_size: int = 224,
    pneumonia_fraction: float = 0.73,
    split_fractions: tuple[float, float, float] = (0.80, 0.04, 0.16),
    difficulty: float = 1.0,
    confusable_fraction: float = 0.0,
    confusable_strength: float = 0.6,
) -> SynthSummary:
    """Write ``n`` synthetic X-rays under ``out_dir`` in the Kermany layout.

    Defaults mirror the real dataset: ~73% pneumonia and a tiny val split.
    Every split receives at least one image of each class (even one whose
    fraction is 0, so downstream code never meets an empty class), all images of a
    patient share split and class, and the same arguments always produce
    byte-identical files. Refuses to write into a non-empty directory so two
    datasets are never silently mixed. Raises ValueError for impossible arguments,
    FileExistsError for a non-empty ``out_dir`` and OutputError when it cannot be
    created or written.

    ``confusable_fraction`` of the NORMAL images (0: none, the default) show infiltrate-like
    shadows of density ``confusable_strength`` (1: about a faint infiltrate's; module docstring);
    which ones is drawn from a stream of its own, so a fraction of 0 writes the same files as before.
    """
    _validate(n, image_size, pneumonia_fraction, split_fractions, difficulty)
    _validate_confusable(confusable_fraction, confusable_strength)
    root = Path(out_dir)
    _prepare_root(root)
    write_marker(root, n=n, seed=seed, image_size=image_size, pneumonia_fraction=pneumonia_fraction,
                 split_fractions=list(split_fractions), difficulty=difficulty,
                 **({"confusable_fraction": confusable_fraction, "confusable_strength": confusable_strength}
                    if confusable_fraction else {}))

    # A third child stream picks the confusable NORMAL images: the first two (and so every file of
    # a dataset without them) are the same as with two children.
    layout_seq, render_seq, confusable_seq = np.random.SeedSequence(seed).spawn(3)
    confusable = np.random.default_rng(confusable_seq)
    records, patients = _plan_records(
        np.random.default_rng(layout_seq), n, pneumonia_fraction, split_fractions
    )
    try:
        for split in SPLITS:
            for label in CLASSES:
                (root / split / label).mkdir(parents=True, exist_ok=True)
        for record, image_seq in zip(records, render_seq.spawn(len(records))):
            kind = record.kind
            if kind == "normal" and confusable_fraction and confusable.random() < confusable_fraction:
                kind = CONFUSABLE_KIND
            pixels = _render(np.random.default_rng(image_seq), image_size, kind, difficulty, confusable_strength)
            path = root / record.split / record.label / record.filename
            Image.fromarray(pixels).save(path, format="JPEG", quality=_JPEG_QUALITY)
    except OSError as error:  # a full disk, a folder made read-only meanwhile
        raise OutputError(f"{root}: cannot write the dataset ({error.strerror or error})") from None

    counts = {s: {c: 0 for c in CLASSES} for s in SPLITS}
    for record in records:
        counts[record.split][record.label] += 1
    return SynthSummary(root=root, counts=counts, patients=patients)


def _validate(n, image_size, pneumonia_fraction, split_fractions, difficulty) -> None:
    """Reject arguments that would yield an empty class/split or no image."""
    if n < MIN_IMAGES:
        raise ValueError(f"n must be >= {MIN_IMAGES} so every split gets both classes, got {n}")
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE}, got {image_size}")
    if not 0.0 < pneumonia_fraction < 1.0:
        raise ValueError(f"pneumonia_fraction must be in (0, 1), got {pneumonia_fraction}")
    if len(split_fractions) != len(SPLITS):
        raise ValueError(f"split_fractions needs {len(SPLITS)} values (train, val, test)")
    if any(f < 0 for f in split_fractions) or abs(sum(split_fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"split_fractions must be non-negative and sum to 1, got {split_fractions}"
        )
    if difficulty < 0:
        raise ValueError(f"difficulty must be >= 0, got {difficulty}")


def _validate_confusable(fraction, strength) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"confusable_fraction must be between 0 and 1, got {fraction}")
    if not 0.0 < strength <= 2.0:
        raise ValueError(f"confusable_strength must be in (0, 2], got {strength}")


def _prepare_root(root: Path) -> None:
    """Create ``root``, refusing to reuse a non-empty directory or a file."""
    try:
        reused = root.exists() and (not root.is_dir() or any(root.iterdir()))
        if not reused:
            root.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a missing or read-only parent, a parent that is a file, no access
        raise OutputError(f"{root}: cannot create folder ({error.strerror or error})") from None
    if reused:
        raise FileExistsError(
            f"{root} already exists and is not an empty directory; "
            "choose a new path so synthetic data is not mixed with other files"
        )


def _plan_records(
    rng: np.random.Generator, n: int, pneumonia_fraction: float, split_fractions
) -> tuple[list[_Record], dict[str, int]]:
    """Decide every file name, split and class before any pixel is drawn.

    Images are first allotted to (split, class) buckets, then each bucket is
    cut into patients, so a patient can never straddle splits or classes.
    """
    n_pneumonia = int(np.clip(round(n * pneumonia_fraction), len(SPLITS), n - len(SPLITS)))
    per_class = {"NORMAL": n - n_pneumonia, "PNEUMONIA": n_pneumonia}
    buckets = [
        (split, label, count)
        for label in CLASSES
        for split, count in zip(SPLITS, _allocate(per_class[label], split_fractions))
    ]
    groups = [(s, c, _patient_sizes(rng, count)) for s, c, count in buckets]
    n_patients = sum(len(sizes) for _, _, sizes in groups)
    patient_ids = iter(rng.permutation(n_patients) + 1)

    records: list[_Record] = []
    patients = {s: 0 for s in SPLITS}
    image_id = 0
    for split, label, sizes in groups:
        patients[split] += len(sizes)
        for n_images in sizes:
            pid = int(next(patient_ids))
            if label == "NORMAL":
                prefix = "NORMAL2-" if rng.random() < 0.5 else ""
                names = [f"{prefix}IM-{pid:04d}-{k:04d}.jpeg" for k in range(1, n_images + 1)]
                records += [_Record(split, label, name, "normal") for name in names]
                continue
            kind = "bacteria" if rng.random() < _BACTERIA_P else "virus"
            for _ in range(n_images):
                image_id += 1
                name = f"person{pid}_{kind}_{image_id}.jpeg"
                records.append(_Record(split, label, name, kind))
    return records, patients


def _allocate(total: int, fractions) -> list[int]:
    """Split ``total`` into per-split counts, each at least one.

    One image per split is reserved first; the rest follows ``fractions``
    with largest-remainder rounding so the counts add up exactly.
    """
    spare = total - len(fractions)
    ideal = np.asarray(fractions, dtype=float) * spare
    counts = np.floor(ideal).astype(int)
    order = np.argsort(-(ideal - counts), kind="stable")
    counts[order[: spare - counts.sum()]] += 1
    return [int(c) + 1 for c in counts]


def _patient_sizes(rng: np.random.Generator, count: int) -> list[int]:
    """Cut ``count`` images into patients: mostly 1 image, some 2-3."""
    sizes: list[int] = []
    remaining = count
    while remaining > 0:
        size = 1
        if rng.random() < _MULTI_IMAGE_PATIENT_P:
            size = 2 if rng.random() < 0.6 else 3
        size = min(size, remaining)
        sizes.append(size)
        remaining -= size
    return sizes
