"""`pneumonia data summarize`: what a dataset holds and what is wrong with it, before training."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pneumonia.data.labels import CLASS_NAMES
from pneumonia.data.pipeline import decode_threads
from pneumonia.data.records import Dataset, discover, probe_image
from pneumonia.errors import DataError


@dataclass
class SplitSummary:
    images: dict[str, int]  # class -> count
    patients: dict[str, int]  # class -> distinct patients
    subtypes: dict[str, int]
    width_range: tuple[int, int] | None = None
    height_range: tuple[int, int] | None = None


@dataclass
class DataSummary:
    root: str
    splits: dict[str, SplitSummary]
    problems: list[dict[str, str]] = field(default_factory=list)  # {"file", "problem"}

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "splits": {name: vars(split) for name, split in self.splits.items()},
            "problems": self.problems,
            "total_images": sum(sum(s.images.values()) for s in self.splits.values()),
        }

    def format(self) -> str:
        lines = [f"dataset {self.root}"]
        lines.append(f"  {'split':<14}{'NORMAL':>8}{'PNEUMONIA':>11}{'patients':>10}  {'width':>11}  {'height':>11}")
        for name, split in self.splits.items():
            width = "-" if split.width_range is None else f"{split.width_range[0]}-{split.width_range[1]}"
            height = "-" if split.height_range is None else f"{split.height_range[0]}-{split.height_range[1]}"
            lines.append(
                f"  {name:<14}{split.images.get('NORMAL', 0):>8}{split.images.get('PNEUMONIA', 0):>11}"
                f"{sum(split.patients.values()):>10}  {width:>11}  {height:>11}"
            )
            lines.append("  " + " " * 14 + "subtypes: " + ", ".join(f"{k} {v}" for k, v in sorted(split.subtypes.items())))
        if self.problems:
            lines.append(f"  {len(self.problems)} problem(s):")
            lines.extend(f"    {p['file']}: {p['problem']}" for p in self.problems[:50])
            if len(self.problems) > 50:
                lines.append(f"    ... and {len(self.problems) - 50} more (see --json)")
        else:
            lines.append("  no problems found")
        return "\n".join(lines)


def summarize(root: str) -> DataSummary:
    """Counts per split, class and patient; image size range; every unreadable file.

    Raises DataError when not one file is a readable image: a summary of zeros would read as a
    success (exit 0) to a script checking data before a run.
    """
    dataset: Dataset = discover(root)
    problems = [{"file": path, "problem": reason} for path, reason in dataset.skipped]
    with ThreadPoolExecutor(max_workers=decode_threads()) as pool:
        probes = list(pool.map(probe_image, [record.location for record in dataset.records]))
    if not any(size for size, _ in probes):
        _, example = probes[0]
        raise DataError(f"none of the {len(probes)} image files under {dataset.root} could be read as an image "
                        f"(e.g. {dataset.records[0].location}: {example}); nothing to summarize")
    splits: dict[str, SplitSummary] = {}
    for name in dataset.splits:
        chosen = [(r, p) for r, p in zip(dataset.records, probes) if r.split == name]
        good = [(r, size) for r, (size, _) in chosen if size is not None]
        problems.extend({"file": r.location, "problem": problem} for r, (_, problem) in chosen if problem)
        widths = [size[0] for _, size in good]
        heights = [size[1] for _, size in good]
        splits[name or "class folders"] = SplitSummary(
            images=dict(Counter(r.class_name for r, _ in good)),
            patients={cls: len({r.patient_id for r, _ in good if r.class_name == cls}) for cls in CLASS_NAMES},
            subtypes=dict(Counter(r.subtype for r, _ in good)),
            width_range=(min(widths), max(widths)) if widths else None,
            height_range=(min(heights), max(heights)) if heights else None,
        )
    return DataSummary(root, splits, problems)
