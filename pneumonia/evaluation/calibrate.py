"""Site calibration: choose the decision threshold on a labelled sample of the hospital's own
X-rays, and publish it as a new version of the same model.

Why: the exported threshold is chosen on our validation carve, children from the training
period and hospital. On X-rays from a later period (the official test split, scored
independently) the recommended model still ranks well (ROC-AUC 0.961) but its healthy children
score higher, so the shipped threshold gives precision 0.79 where 0.886 was reachable at recall
0.95. Re-estimating batch-norm statistics, test-time augmentation and prior-shift correction on
unlabelled site images did not close that gap; a threshold chosen on about 200 labelled site
images did, about halfway, keeping recall >= 0.95 in ~95% of draws (docs/RESULTS.md). So the
product's path to a new hospital is: label a local sample, calibrate here, read the acceptance
report, roll out, watch drift.

The threshold is chosen by the same lower-bound rule as export (:func:`pneumonia.metrics.binary.
safe_operating_point`): the highest threshold whose patient-bootstrap lower bound of recall
reaches the target on the site's sample. The plain rule (sample recall >= target) missed the
target on the rest of the site in half the draws.

A sample too small to vouch for the target is refused before anything is scored: even if the
model found every sick child in it, the exact (Clopper-Pearson) lower bound of recall at the
confidence would stay below the target with fewer than :func:`sick_patients_needed` sick
patients (72 for recall 0.95 at 95%), and specificity is not worth a number with fewer than
:data:`MIN_NORMAL_PATIENTS` healthy ones. Images the out-of-distribution guard would not classify
are left out of the choice (the service never labels them) and their rate is reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from pneumonia.artifacts.publish import data_fingerprint, publish_calibrated
from pneumonia.artifacts.registry import (
    Artifact,
    VerifiedArtifact,
    artifact_warning,
    check_site_name,
    load_artifact,
    verify_artifact,
)
from pneumonia.data.labelled import class_patients, labelled_sample
from pneumonia.data.pipeline import load_images
from pneumonia.data.records import ImageRecord, class_counts
from pneumonia.errors import PneumoniaError
from pneumonia.metrics.binary import SafeOperatingPoint, binary_metrics, safe_operating_point
from pneumonia.metrics.drift import reference_distribution
from pneumonia.metrics.intervals import CONFIDENCE, bootstrap_intervals
from pneumonia.models.ood import judge

MIN_NORMAL_PATIENTS = 30
"""Healthy patients a sample needs: with fewer, one child moves specificity by more than three
points and its 95% interval spans more than +-0.17, too wide to tell a useful threshold from a
useless one."""
BOOTSTRAP_SAMPLES = 1000
OOD_NOTE_RATE = 0.05
"""A share of the sample the guard does not classify above which the summary says so: the guard lets
99% of validation through, so 5% means images unlike the training data, not chance."""
BOOTSTRAP_SEED = 0  # fixed: the same sample always gives the same threshold
REPORTED = ("precision", "recall", "specificity", "accuracy", "f1", "roc_auc", "pr_auc")


class SampleTooSmall(PneumoniaError):
    """The labelled sample cannot vouch for the target recall at the confidence; nothing is published."""


class AcceptanceFailed(PneumoniaError):
    """The calibrated threshold misses a criterion the user set; nothing is published."""


def sick_patients_needed(target_recall: float, confidence: float) -> int:
    """The fewest sick patients whose sample could vouch for ``target_recall``: with n patients all
    found, the exact lower bound of recall at the two-sided ``confidence`` is (tail)^(1/n), which
    reaches the target from n = log(tail) / log(target) on (72 for 0.95 at 95%, 59 at 90%)."""
    if not 0 < target_recall < 1:
        raise PneumoniaError(f"a site sample can vouch for a target recall below 1, not {target_recall:g}: "
                             "no finite sample proves that no sick child is ever missed")
    tail = (1 - confidence) / 2
    return math.ceil(math.log(tail) / math.log(target_recall) - 1e-9)


def check_sample_size(records: list[ImageRecord], target_recall: float, confidence: float, what: str) -> None:
    """SampleTooSmall, in one line that says how many more patients of each class are needed."""
    patients = class_patients(records)
    needed = {"PNEUMONIA": sick_patients_needed(target_recall, confidence), "NORMAL": MIN_NORMAL_PATIENTS}
    short = {name: needed[name] - patients[name] for name in needed if patients[name] < needed[name]}
    if short:
        more = " and ".join(f"{count} more {name} patients" for name, count in short.items())
        raise SampleTooSmall(
            f"{what} has {patients['PNEUMONIA']} PNEUMONIA and {patients['NORMAL']} NORMAL patients; recall "
            f"{target_recall:g} at {confidence:.0%} confidence needs at least {needed['PNEUMONIA']} PNEUMONIA and "
            f"{needed['NORMAL']} NORMAL: add {more}. Nothing was published"
        )


@dataclass
class ThresholdMetrics:
    """Metrics at one threshold on the site's sample, each with its patient-bootstrap interval."""

    threshold: float
    values: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    confusion: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"threshold": self.threshold, **self.values,
                **{f"{name}_ci": list(interval) for name, interval in self.intervals.items()},
                "confusion": self.confusion}

    def line(self) -> str:
        def text(name: str) -> str:
            low, high = self.intervals[name]
            return f"{name} {self.values[name]:.3f} [{low:.3f}, {high:.3f}]"

        return f"threshold {self.threshold:.3f}: " + ", ".join(map(text, ("precision", "recall", "specificity")))


def metrics_at(labels, probabilities, patients, threshold: float, confidence: float) -> ThresholdMetrics:
    """binary_metrics at ``threshold`` with the intervals of the same patient resamples."""
    values = binary_metrics(labels, probabilities, threshold)
    intervals = bootstrap_intervals(labels, probabilities, threshold, n_boot=BOOTSTRAP_SAMPLES, seed=BOOTSTRAP_SEED,
                                    confidence=confidence, groups=patients)
    return ThresholdMetrics(
        float(threshold), {name: float(values[name]) for name in REPORTED},
        {name: (interval.low, interval.high) for name, interval in intervals.items() if name in REPORTED},
        {name: int(values[name]) for name in ("tp", "fp", "tn", "fn")},
    )


@dataclass
class Calibration:
    """What a calibration measured and decided. ``published`` is the new version (None when the
    acceptance criteria failed)."""

    site: str
    source: VerifiedArtifact
    data: str
    target_recall: float
    confidence: float
    min_precision: float | None
    records: list[ImageRecord] = field(repr=False)  # the images scored (decoded and classified)
    labels: np.ndarray = field(repr=False)
    probabilities: np.ndarray = field(repr=False)
    unreadable: int
    out_of_distribution: int
    point: SafeOperatingPoint
    at_site: ThresholdMetrics
    at_shipped: ThresholdMetrics
    drift_reference: dict
    date: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    published: Artifact | None = None
    report: str | None = None  # the acceptance report's page, once written

    @property
    def criteria(self) -> list[dict[str, Any]]:
        """The acceptance criteria, each with its measured value and verdict."""
        low = self.point.recall_ci[0]
        found = [{"criterion": f"lower end of the {self.confidence:.0%} CI of recall >= {self.target_recall:g}",
                  "value": low, "passed": bool(self.point.met and low >= self.target_recall - 1e-12)}]
        if self.min_precision is not None:
            precision = self.at_site.values["precision"]
            found.append({"criterion": f"precision >= {self.min_precision:g}", "value": precision,
                          "passed": precision >= self.min_precision})
        return found

    @property
    def passed(self) -> bool:
        return all(item["passed"] for item in self.criteria)

    @property
    def scored_images(self) -> int:
        return len(self.records)

    def site_block(self) -> dict[str, Any]:
        """The ``site`` block of the calibrated version's metadata.json."""
        total = self.scored_images + self.out_of_distribution
        return {
            "name": self.site,
            "calibrated": self.date,
            "data": self.data,
            "images": class_counts(self.records),
            "patients": class_patients(self.records),
            "sample_fingerprint": data_fingerprint(self.records),
            "unreadable_images": self.unreadable,
            "out_of_distribution": {"images": self.out_of_distribution,
                                    "rate": self.out_of_distribution / total if total else 0.0},
            "threshold": self.point.threshold,
            "operating_point": self.point.to_json(),
            "metrics": {"site_threshold": self.at_site.to_json(), "shipped_threshold": self.at_shipped.to_json()},
            "shipped_threshold": self.source.threshold,
            "source_version": self.source.version,
            "criteria": self.criteria,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "site": self.site, "passed": self.passed, "source": str(self.source.path),
            "source_version": self.source.version,
            "artifact": str(self.published.path) if self.published else None,
            "version": self.published.version if self.published else None,
            "threshold": self.point.threshold, "shipped_threshold": self.source.threshold,
            "images": self.scored_images, "out_of_distribution": self.out_of_distribution,
            "unreadable": self.unreadable, "criteria": self.criteria,
            "site_threshold_metrics": self.at_site.to_json(), "shipped_threshold_metrics": self.at_shipped.to_json(),
            "report": self.report,
            **({"warning": warning} if (warning := artifact_warning(self.source.metadata)) else {}),
        }

    def summary(self) -> str:
        """Terminal text: the two thresholds side by side, the verdict and where the version went."""
        counts = class_counts(self.records)
        direction = ("raises" if self.point.threshold > self.source.threshold else
                     "lowers" if self.point.threshold < self.source.threshold else "keeps")
        lines = [
            f"site {self.site}: {self.scored_images} images ({counts['NORMAL']} NORMAL, {counts['PNEUMONIA']} "
            f"PNEUMONIA) from {self.data}"
            + (f"; {self.out_of_distribution} not classified by the out-of-distribution guard" if self.out_of_distribution else "")
            + (f"; {self.unreadable} unreadable" if self.unreadable else ""),
            f"  shipped ({self.source.version}) {self.at_shipped.line()}",
            f"  site              {self.at_site.line()}",
            f"  the site's sample {direction} the threshold ({self.point.rule_text().replace('validation', 'site')})",
        ]
        for item in self.criteria:
            lines.append(f"  {'PASS' if item['passed'] else 'FAIL'}  {item['criterion']} (measured {item['value']:.3f})")
        total = self.scored_images + self.out_of_distribution
        if total and self.out_of_distribution / total > OOD_NOTE_RATE:
            lines.append(f"  note: the out-of-distribution guard did not classify {self.out_of_distribution / total:.1%} of "
                         "the sample (it lets 99% of validation through): this site's images differ from the training data")
        warning = artifact_warning(self.source.metadata)
        if warning:
            lines.append(f"  warning: the model was {warning}; a site threshold cannot make it read them")
        if self.report:
            lines.append(f"  acceptance report: {self.report}")
        if self.published:
            lines.append(f"published {self.published.version} (calibrated for {self.site}) to {self.published.path}")
        else:
            lines.append("nothing was published: the calibrated threshold does not pass the criteria above")
        return "\n".join(lines)


def calibrate(artifact: str, data: str, site: str, *, target_recall: float | None = None,
              confidence: float = CONFIDENCE, min_precision: float | None = None, publish: bool = True,
              progress: Callable[[str], None] = lambda line: None) -> Calibration:
    """Choose a threshold for ``site`` on the labelled sample ``data`` and, when it passes the
    criteria, publish it as the next version of ``artifact``'s model (``publish=False`` only
    measures). SampleTooSmall before any scoring for an undersized sample. Returns the Calibration
    (``published`` set or None); :func:`pneumonia.evaluation.acceptance.write_acceptance_report`
    writes its acceptance report."""
    check_site_name(site)
    if not 0 < confidence < 1:
        raise PneumoniaError(f"--confidence must be between 0 and 1, not {confidence:g}")
    source = verify_artifact(artifact)  # seconds, no TensorFlow: a broken artifact fails first
    target = float(source.metadata.get("target_recall", 0.95) if target_recall is None else target_recall)
    records = labelled_sample(data)
    check_sample_size(records, target, confidence, f"the sample {data}")
    progress(f"scoring {len(records)} images of {data} with {source.name} {source.version}")
    loaded = load_artifact(source.path)
    decoded = load_images(records, loaded.preprocess)
    probabilities, ood_scores = loaded.predict_scored(decoded.images)
    classified = np.array([not answer.out_of_distribution for answer in judge(probabilities, ood_scores, loaded.ood)],
                          dtype=bool)
    kept = [record for record, keep in zip(decoded.records, classified) if keep]
    if (~classified).sum() * 2 > len(classified):  # the cause is the data, not the sample's size
        warning = artifact_warning(source.metadata)
        raise SampleTooSmall(
            f"the out-of-distribution guard did not classify {int((~classified).sum())} of {len(classified)} images "
            f"of {data}: they are unlike the X-rays {source.name} {source.version} learned from"
            + (f" (it was {warning})" if warning else "") + ". Nothing was published")
    what = f"the sample {data}, without its {len(decoded.failures)} unreadable and {int((~classified).sum())} " \
           "out-of-distribution images"
    check_sample_size(kept, target, confidence, what)
    labels, probabilities = decoded.labels[classified].astype(int), probabilities[classified]
    patients = [record.patient_id for record in kept]
    point = safe_operating_point(labels, probabilities, patients, target, confidence, BOOTSTRAP_SAMPLES,
                                 BOOTSTRAP_SEED, rule="lower_bound")
    if not point.met:  # cannot happen with enough sick patients; never publish a threshold nobody vouched for
        raise SampleTooSmall(f"the sample {data} cannot vouch for recall {target:g} at {confidence:.0%}: add sick "
                             "patients. Nothing was published")
    calibration = Calibration(
        site=site, source=source, data=data, target_recall=target, confidence=confidence,
        min_precision=min_precision, records=kept, labels=labels, probabilities=probabilities,
        unreadable=len(decoded.failures), out_of_distribution=int((~classified).sum()), point=point,
        at_site=metrics_at(labels, probabilities, patients, point.threshold, confidence),
        at_shipped=metrics_at(labels, probabilities, patients, source.threshold, confidence),
        drift_reference=reference_distribution(probabilities, source=f"site {site}"),
    )
    if publish and calibration.passed:
        calibration.published = publish_calibrated(
            source, threshold=point.threshold, target_recall=target, site=calibration.site_block(),
            drift_reference=calibration.drift_reference)
    return calibration
