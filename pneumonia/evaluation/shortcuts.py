"""Shortcut audit: when the model wrongly scores a healthy child high, does it look outside the lungs?

Why: a classifier can learn where an X-ray came from instead of what it shows: the frame's
border, the "L"/"R" markers and text burned into the corners, the arms, the strip above the
shoulders. Such a shortcut scores well on a validation carve of the same site and fails at a new
one, where healthy children then score high (docs/RESULTS.md). Grad-CAM
(:mod:`pneumonia.models.explain`) says where the evidence for PNEUMONIA sits; this module measures
how much of it falls in fixed regions of the model's input, for three groups of the validation
carve: the healthy X-rays scored highest (the false-alarm candidates), the healthy X-rays scored
lowest and the pneumonia X-rays scored highest (pneumonia the model finds). If the first group
looks outside the lungs more than the last, its high scores rest on something other than lungs.

Choices and why:
- Regions are fixed boxes on the model's square input (fractions of its side), not a lung
  segmentation: :data:`LUNG_BOX` (x 12-88 %, y 8-85 %) is a geometric approximation of where an
  upright, centred paediatric chest's lungs lie. It also holds the heart and mediastinum, and a
  rotated or badly framed child's lungs leave it; it is a coarse, documented ruler, the same for
  every image, which is what a comparison between groups needs.
- A map's share in a region is the region's part of the map's total mass (Grad-CAM values are
  >= 0, the maximum scaled to 1). Its *enrichment* is that share divided by the region's share of
  the input's area: 1.0 is what a uniform map gives, 2.0 means twice the evidence per pixel. The
  region's area is counted on the same pixel grid as the map, so a uniform map is exactly 1.0.
  Regions overlap (the top strip lies in the border, the corner squares reach beyond it, the
  lung box's top edge lies in it) and need not sum to 1.
- A map that is all zero (no positive evidence at all) has no shares: it is left out of the means
  and counted (``blank``), never read as "looks nowhere".
- Groups are chosen by the model's probability on the split, ties broken by file order (reversed
  for healthy_low, so that the two healthy groups never share an image). With fewer
  than 2K healthy images, the highest and lowest groups split them (never the same image twice).
- ``pad`` preprocessing letterboxes a non-square X-ray onto black bands. Regions stay defined on
  the model's input (the bands lie in the border and outside the lung box, as anything the model
  sees there); each image with bands also gets a ``letterbox`` region, the bands themselves,
  so that evidence taken from pixels that are not the X-ray at all is reported on its own.
- ``--shift`` re-creates one stress shift (:mod:`pneumonia.data.shifts`, applied to the source
  image before preprocessing, seeded as there) and chooses the groups again by the shifted
  probabilities: at a new site the false alarms are other children.
- The finding compares healthy_high with sick_found on outside-lung enrichment, with a seeded
  bootstrap 95 % interval of the difference of the group means: "more" only when the interval
  lies above 0. Grad-CAM maps are coarse (one cell of xraynet's last layer covers about a tenth
  of the input's side), so a small difference means nothing.

TensorFlow is imported only inside the functions that need it.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pneumonia.data.labels import CLASS_NAMES
from pneumonia.data.pipeline import DecodedImages, load_images, predict_probabilities
from pneumonia.data.preprocess import PreprocessSpec, open_image
from pneumonia.data.shifts import CLEAN, load_sources, shifted_images
from pneumonia.errors import DataError
from pneumonia.models.explain import Explanation, GradCam
from pneumonia.storage import json_ready, read_bytes

BORDER = 0.12  # the outer band, as a fraction of the side, on each of the four sides
TOP_STRIP = 0.12  # the band above the shoulders (neck, labels), as a fraction of the side
CORNER = 0.20  # side of each corner square (markers and text), as a fraction of the side
LUNG_BOX = (0.12, 0.08, 0.88, 0.85)  # (left, top, right, bottom) fractions: the approximate lung field

REGIONS = ("border", "top_strip", "corners", "lung_field", "outside_lung")
"""Regions every image has; ``letterbox`` is added for an image with ``pad`` bands."""
LETTERBOX = "letterbox"

HEALTHY_HIGH, HEALTHY_LOW, SICK_FOUND = "healthy_high", "healthy_low", "sick_found"
GROUPS = (HEALTHY_HIGH, HEALTHY_LOW, SICK_FOUND)
DEFAULT_TOP = 24
BOOTSTRAP_SAMPLES = 2000


# ----------------------------------------------------------------------------- regions


def _centres(size: int) -> np.ndarray:
    """Each pixel's centre as a fraction of the side."""
    return (np.arange(size) + 0.5) / size


def region_masks(size: int) -> dict[str, np.ndarray]:
    """Boolean [size, size] masks of :data:`REGIONS` on the model's square input."""
    x = _centres(size)[None, :]
    y = _centres(size)[:, None]
    left, top, right, bottom = LUNG_BOX
    border = (x < BORDER) | (x > 1 - BORDER) | (y < BORDER) | (y > 1 - BORDER)
    top_strip = np.broadcast_to(y < TOP_STRIP, (size, size))
    corners = ((x < CORNER) | (x > 1 - CORNER)) & ((y < CORNER) | (y > 1 - CORNER))
    lung = (x >= left) & (x <= right) & (y >= top) & (y <= bottom)
    return {"border": border, "top_strip": top_strip.copy(), "corners": corners, "lung_field": lung,
            "outside_lung": ~lung}


def letterbox_mask(original: tuple[int, int], size: int) -> np.ndarray | None:
    """Boolean [size, size] mask of the black bands ``pad`` adds around an original of (width,
    height), as :func:`pneumonia.data.preprocess.decode_image` places it; None for a square one."""
    width, height = original
    if width == height:
        return None
    longest = max(width, height)
    left, top = (longest - width) // 2, (longest - height) // 2  # decode_image's integer offsets
    x = _centres(size)[None, :] * longest
    y = _centres(size)[:, None] * longest
    inside = (x >= left) & (x < left + width) & (y >= top) & (y < top + height)
    return ~inside if (~inside).any() else None


@dataclass
class MapShares:
    """Where one map's mass lies: per region, its share of the mass and its enrichment."""

    share: dict[str, float]
    enrichment: dict[str, float]  # share / the region's share of the area; 1.0 = a uniform map


def region_shares(heatmap: np.ndarray, masks: dict[str, np.ndarray]) -> MapShares | None:
    """Shares and enrichments of a Grad-CAM map (>= 0) in each mask; None for an all-zero map.
    A region with no pixels gets no entry."""
    heatmap = np.clip(np.nan_to_num(np.asarray(heatmap, np.float64)), 0.0, None)
    total = heatmap.sum()
    if total <= 0:
        return None
    share, enrichment = {}, {}
    for name, mask in masks.items():
        if mask.shape != heatmap.shape:
            raise ValueError(f"region {name!r} is {mask.shape}, the map {heatmap.shape}")
        area = float(mask.mean())
        if area == 0:
            continue
        share[name] = float(heatmap[mask].sum() / total)
        enrichment[name] = share[name] / area
    return MapShares(share, enrichment)


def area_shares(size: int) -> dict[str, float]:
    """Each fixed region's share of the input's area (what a uniform map puts there)."""
    return {name: float(mask.mean()) for name, mask in region_masks(size).items()}


# ----------------------------------------------------------------------------- groups


def select_groups(labels: np.ndarray, probabilities: np.ndarray, top: int) -> dict[str, np.ndarray]:
    """Indices of each group, highest-scoring first (lowest first for healthy_low): the ``top``
    healthy images with the highest and with the lowest probability and the ``top`` pneumonia
    images with the highest. Fewer than 2 * top healthy images are split between the two healthy
    groups (the higher half, rounded up, to healthy_high)."""
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    labels = np.asarray(labels).astype(int)
    probabilities = np.asarray(probabilities, np.float64)
    order = np.lexsort((np.arange(len(labels)), -probabilities))  # highest first, ties by position
    healthy = order[labels[order] == 0]
    sick = order[labels[order] == 1]
    high = healthy[: min(top, math.ceil(len(healthy) / 2))]
    low_count = min(top, len(healthy) - len(high))
    low = healthy[::-1][:low_count] if low_count else healthy[:0]
    return {HEALTHY_HIGH: high, HEALTHY_LOW: low, SICK_FOUND: sick[:top]}


# ----------------------------------------------------------------------------- results


@dataclass
class ImageRow:
    """One explained image of one group."""

    group: str
    shift: str  # "clean" or the stress shift's name
    file: str
    label: str
    probability: float
    share: dict[str, float] | None  # None: an all-zero map (no positive evidence)
    enrichment: dict[str, float] | None
    image: np.ndarray = field(repr=False, default=None)  # the uint8 model input, for the montage
    heatmap: np.ndarray = field(repr=False, default=None)

    def to_json(self) -> dict:
        data = asdict(self)
        del data["image"], data["heatmap"]
        return data


@dataclass
class GroupSummary:
    """A group's mean shares and enrichments over its non-blank maps."""

    group: str
    shift: str
    n: int
    blank: int  # all-zero maps, left out of the means
    mean_probability: float
    above_threshold: int  # images at or above the decision threshold (for healthy: false alarms)
    share: dict[str, float]
    enrichment: dict[str, float]
    counts: dict[str, int]  # maps each region's means are over (letterbox: only images with bands)


@dataclass
class AuditResult:
    split: str
    images: int  # decoded images of the split
    counts: dict[str, int]  # per class
    skipped: int
    top: int
    threshold: float
    layer: str
    resize: str
    input_size: int
    areas: dict[str, float]  # each fixed region's share of the input's area
    groups: list[GroupSummary]
    rows: list[ImageRow] = field(repr=False)
    comparisons: dict[str, dict] = field(default_factory=dict)  # per shift: healthy_high - sick_found
    finding: str = ""  # the clean images' sentence
    shift_finding: str | None = None  # the same sentence under --shift

    def to_json(self) -> dict:
        data = {key: value for key, value in asdict(self).items() if key not in ("rows", "groups")}
        data["groups"] = [asdict(group) for group in self.groups]
        data["rows"] = [row.to_json() for row in self.rows]
        data["regions"] = {"border": BORDER, "top_strip": TOP_STRIP, "corner": CORNER,
                           "lung_box": dict(zip(("left", "top", "right", "bottom"), LUNG_BOX))}
        return json_ready(data)

    def summary(self) -> str:
        """The table a person reads, then the finding."""
        columns = [*REGIONS, *([LETTERBOX] if any(LETTERBOX in g.counts for g in self.groups) else [])]
        lines = [
            f"shortcut audit on {self.split}: {self.images} images ({self.counts.get('NORMAL', 0)} NORMAL, "
            f"{self.counts.get('PNEUMONIA', 0)} PNEUMONIA), Grad-CAM of {self.layer}, {self.resize} "
            f"{self.input_size} px, top {self.top}, threshold {self.threshold:.3f}",
            "area share of each region: " + ", ".join(f"{name} {self.areas[name]:.0%}" for name in REGIONS),
            "enrichment = share of the map's mass / share of the area (1.00 = a uniform map; lung box is a fixed "
            "box, not a segmentation)",
            f"{'group':<13} {'shift':<10} {'n':>3} {'blank':>5} {'mean p':>6} {'>=thr':>5} "
            + " ".join(f"{name:>12}" for name in columns),
        ]
        for group in self.groups:
            cells = " ".join(f"{group.enrichment[name]:>12.2f}" if name in group.enrichment else f"{'-':>12}"
                             for name in columns)
            lines.append(f"{group.group:<13} {group.shift:<10} {group.n:>3} {group.blank:>5} "
                         f"{group.mean_probability:>6.3f} {group.above_threshold:>5} {cells}")
        if self.shift_finding:
            lines.append("under the shift: " + self.shift_finding)
        lines.append("finding: " + self.finding)
        return "\n".join(lines)


def summarize_group(group: str, shift: str, rows: list[ImageRow], threshold: float) -> GroupSummary:
    """Means over the rows' non-blank maps; a region's mean only over the rows that have it."""
    measured = [row for row in rows if row.share is not None]
    names = sorted({name for row in measured for name in row.share})
    share = {name: float(np.mean([row.share[name] for row in measured if name in row.share])) for name in names}
    enrichment = {name: float(np.mean([row.enrichment[name] for row in measured if name in row.enrichment]))
                  for name in names}
    counts = {name: sum(name in row.share for row in measured) for name in names}
    probabilities = [row.probability for row in rows]
    return GroupSummary(group, shift, len(rows), len(rows) - len(measured),
                        float(np.mean(probabilities)) if rows else float("nan"),
                        sum(p >= threshold for p in probabilities), share, enrichment, counts)


def compare_groups(rows: list[ImageRow], region: str, shift: str = CLEAN, seed: int = 0) -> dict | None:
    """healthy_high minus sick_found in mean enrichment of ``region``, with a seeded bootstrap 95 %
    interval (each group resampled on its own); None when a group has no measured map."""
    values = [np.array([row.enrichment[region] for row in rows if row.group == group and row.shift == shift
                        and row.enrichment is not None and region in row.enrichment])
              for group in (HEALTHY_HIGH, SICK_FOUND)]
    if any(len(group) == 0 for group in values):
        return None
    high, sick = values
    rng = np.random.default_rng(seed)
    differences = (rng.choice(high, (BOOTSTRAP_SAMPLES, len(high))).mean(axis=1)
                   - rng.choice(sick, (BOOTSTRAP_SAMPLES, len(sick))).mean(axis=1))
    low, upper = np.quantile(differences, [0.025, 0.975])
    return {"region": region, "healthy_high": float(high.mean()), "sick_found": float(sick.mean()),
            "difference": float(high.mean() - sick.mean()), "low": float(low), "high": float(upper),
            "n_healthy_high": len(high), "n_sick_found": len(sick)}


def finding(comparisons: dict[str, dict], shift: str = CLEAN) -> str:
    """One sentence: healthy_high against sick_found, border and outside-lung enrichment."""
    outside, border = comparisons.get("outside_lung"), comparisons.get("border")
    where = "" if shift == CLEAN else f" under the {shift} shift"
    if outside is None or border is None:
        return (f"no comparison{where}: healthy_high or sick_found has no Grad-CAM map with positive evidence "
                "(all-zero maps are counted as blank)")
    if outside["low"] > 0:
        verdict = "look outside the lungs more"
    elif outside["high"] < 0:
        verdict = "look outside the lungs less"
    else:
        verdict = "look outside the lungs no more than pneumonia it finds, within the uncertainty"
    return (f"healthy X-rays scored highest{where} put {border['healthy_high']:.2f}x the uniform share of "
            f"evidence on the border and {outside['healthy_high']:.2f}x outside the lung box, against "
            f"{border['sick_found']:.2f}x and {outside['sick_found']:.2f}x for pneumonia found: they {verdict} "
            f"(outside-lung difference {outside['difference']:+.2f}, 95% CI {outside['low']:+.2f} to "
            f"{outside['high']:+.2f}; {outside['n_healthy_high']} vs {outside['n_sick_found']} maps)")


# ----------------------------------------------------------------------------- running it


def load_split(data_root: str, split: str, training_config: dict | None, spec: PreprocessSpec) -> tuple[DecodedImages, int]:
    """(decoded images, skipped files) of the split (``validation``: the patient carve training
    made); fails in seconds, before a model loads, when the data or split is not there."""
    from pneumonia.evaluation.evaluate import split_records  # lazy: scikit-learn

    dataset, records = split_records(data_root, split, training_config)
    decoded = load_images(records, spec)
    if len(decoded.records) == 0:
        raise DataError(f"none of the {len(records)} images of {split} in {data_root} could be decoded")
    return decoded, len(dataset.skipped) + len(decoded.failures)


def run_audit(
    model,
    decoded: DecodedImages,
    spec: PreprocessSpec,
    *,
    split: str,
    top: int = DEFAULT_TOP,
    shift: str | None = None,
    threshold: float = 0.5,
    skipped: int = 0,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> AuditResult:
    """Score the split, choose the groups, explain them and measure where each map's mass lies.

    ``model`` is a Keras model (one network or an ensemble); ``decoded`` comes from :func:`load_split`.
    """
    say = progress or (lambda line: None)
    cam = GradCam(model)
    conditions = [(CLEAN, decoded.images)]
    if shift is not None:
        say(f"applying the {shift} shift to {len(decoded.records)} images")
        sources = load_sources([record.location for record in decoded.records])
        conditions.append((shift, shifted_images(sources, spec, [shift], seed=seed)[shift]))
    masks = region_masks(spec.image_size)
    rows: list[ImageRow] = []
    summaries: list[GroupSummary] = []
    comparisons: dict[str, dict] = {}
    for condition, images in conditions:
        say(f"scoring {len(images)} {split} images" + ("" if condition == CLEAN else f" ({condition})"))
        probabilities = predict_probabilities(model, images)
        groups = select_groups(decoded.labels, probabilities, top)
        chosen = np.concatenate(list(groups.values()))
        say(f"Grad-CAM of {len(chosen)} images ({', '.join(f'{len(v)} {k}' for k, v in groups.items())})")
        explanations = dict(zip(chosen.tolist(), cam.explain_batch(images[chosen])))
        for group, indices in groups.items():
            group_rows = [_row(group, condition, decoded.records[index], float(probabilities[index]),
                               images[index], explanations[index].heatmap, masks, spec)
                          for index in indices.tolist()]
            rows.extend(group_rows)
            summaries.append(summarize_group(group, condition, group_rows, threshold))
        comparisons[condition] = {region: compare_groups(rows, region, condition, seed)
                                  for region in ("border", "outside_lung")}
    return AuditResult(
        split=split, images=len(decoded.records),
        counts={name: int(np.sum(decoded.labels == index)) for index, name in enumerate(CLASS_NAMES)},
        skipped=skipped, top=top, threshold=threshold, layer=cam.layer, resize=spec.resize,
        input_size=spec.image_size, areas=area_shares(spec.image_size), groups=summaries, rows=rows,
        comparisons=comparisons, finding=finding(comparisons[CLEAN]),
        shift_finding=finding(comparisons[shift], shift) if shift is not None else None)


def _row(group, shift, record, probability, image, heatmap, masks, spec) -> ImageRow:
    masks = dict(masks)
    if spec.resize == "pad":
        bands = letterbox_mask(open_image(read_bytes(record.location), spec).size, spec.image_size)
        if bands is not None:  # the shifts keep an image's size, so the bands are the clean image's
            masks[LETTERBOX] = bands
    shares = region_shares(heatmap, masks)
    return ImageRow(group, shift, record.location, CLASS_NAMES[record.label], probability,
                    shares.share if shares else None, shares.enrichment if shares else None, image, heatmap)


# ----------------------------------------------------------------------------- report


TILE = 192  # px per montage tile (the input enlarged, nearest neighbour, or shrunk to fit)
COLUMNS = 6
CAPTION = 14  # px of caption under each tile


def write_report(folder: str | Path, result: AuditResult) -> list[Path]:
    """``audit.json`` and one montage PNG per group (``<group>.png``, ``<shift>-<group>.png``
    under a shift): each image's Grad-CAM overlay with the border (white) and the lung box
    (green) drawn, captioned with its probability. Returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "audit.json"]
    written[0].write_text(json.dumps(result.to_json(), indent=2, allow_nan=False))
    for summary in result.groups:
        rows = [row for row in result.rows if row.group == summary.group and row.shift == summary.shift]
        if not rows:
            continue
        name = summary.group if summary.shift == CLEAN else f"{summary.shift}-{summary.group}"
        path = folder / f"{name}.png"
        montage(rows, result.layer).save(path)
        written.append(path)
    return written


def montage(rows: list[ImageRow], layer: str) -> Image.Image:
    """The rows' overlays (explain.py's colouring and blending) in a grid, regions outlined."""
    columns = min(COLUMNS, len(rows))
    sheet = Image.new("RGB", (columns * TILE, math.ceil(len(rows) / columns) * (TILE + CAPTION)), "black")
    for position, row in enumerate(rows):
        png = Explanation(row.probability, row.heatmap, layer).overlay_png(row.image)
        tile = Image.open(io.BytesIO(png)).convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST)
        _outline(ImageDraw.Draw(tile))
        left, top = (position % columns) * TILE, (position // columns) * (TILE + CAPTION)
        sheet.paste(tile, (left, top))
        looks = f"out {row.enrichment['outside_lung']:.1f}x" if row.enrichment else "blank"
        caption = f"p={row.probability:.2f} {looks} {Path(row.file).name}"[:31]
        ImageDraw.Draw(sheet).text((left + 2, top + TILE + 1), caption, fill="white")
    return sheet


def _outline(draw: ImageDraw.ImageDraw) -> None:
    inner = round(BORDER * TILE)
    draw.rectangle((inner, inner, TILE - 1 - inner, TILE - 1 - inner), outline="white")
    left, top, right, bottom = (round(value * TILE) for value in LUNG_BOX)
    draw.rectangle((left, top, right - 1, bottom - 1), outline=(0, 255, 0))
