"""The acceptance report of a site calibration: one self-contained HTML page and its JSON.

It is what a hospital's go-live review reads: the verdict against the criteria first, then the
site's numbers beside our validation's, the shipped and the site threshold side by side with
their 95% intervals, and the site's score distribution per class with both thresholds drawn, so
that a reviewer sees *why* the threshold moved (healthy children of this site scoring higher, or
lower, than ours). Same style as :mod:`pneumonia.evaluation.report`; the page loads nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pneumonia.data.labels import CLASS_NAMES
from pneumonia.evaluation.report import CSS, escape, figure_html, new_figure
from pneumonia.storage import json_ready

if TYPE_CHECKING:
    from pneumonia.evaluation.calibrate import Calibration

ROWS = (("precision", "Precision (of the children flagged, the share with pneumonia)"),
        ("recall", "Sensitivity (of the children with pneumonia, the share flagged)"),
        ("specificity", "Specificity (of the healthy children, the share not flagged)"),
        ("accuracy", "Accuracy"), ("roc_auc", "ROC AUC (ranking, any threshold)"))
_SHIPPED, _SITE, _NORMAL, _PNEUMONIA = "#56616d", "#d1495b", "#3c8d40", "#1f5fa8"
_VERDICT_CSS = """
.verdict { padding: 12px 16px; border-left: 6px solid; margin: 12px 0; }
.verdict.pass { background: #eef6ee; border-color: #3c8d40; }
.verdict.fail { background: #fbeeee; border-color: #b3261e; }
"""


def write_acceptance_report(directory, calibration: Calibration) -> Path:
    """Write acceptance.json, two plots and acceptance.html into ``directory``; the HTML's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    images = {"scores": directory / "site_scores.png", "tradeoff": directory / "site_thresholds.png"}
    _scores_figure(calibration).savefig(images["scores"], dpi=110)
    _tradeoff_figure(calibration).savefig(images["tradeoff"], dpi=110)
    summary = {
        "site": calibration.site, "passed": calibration.passed, "criteria": calibration.criteria,
        "model": {"name": calibration.source.name, "version": calibration.source.version,
                  "path": str(calibration.source.path)},
        "validation": _validation(calibration.source.metadata),
        "site_sample": calibration.site_block(),
        "published": ({"version": calibration.published.version, "path": str(calibration.published.path)}
                      if calibration.published else None),
    }
    (directory / "acceptance.json").write_text(
        json.dumps(json_ready(summary), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    page = directory / "acceptance.html"
    page.write_text(_html(calibration, summary, images), encoding="utf-8")
    return page


def _validation(metadata: dict) -> dict:
    """The shipped threshold's numbers on our validation carve, as export recorded them."""
    metrics = metadata.get("validation_metrics") or {}
    point = metrics.get("operating_point") or {}
    found = {name: metrics.get(name) for name, _ in ROWS}
    for name in ("precision", "recall", "specificity"):
        if point.get(f"{name}_ci"):
            found[f"{name}_ci"] = point[f"{name}_ci"]
    return {"threshold": metadata.get("threshold"), "rule": point.get("description"), **found}


# ----------------------------------------------------------------------------- plots


def _scores_figure(calibration: Calibration):
    """Histograms of the site's probabilities per class, both thresholds drawn, and the drift
    reference of the shipped model (validation) as a step line where it has one."""
    figure = new_figure(4.5)
    axes = figure.add_subplot()
    bins = np.linspace(0, 1, 41)
    for label, colour in ((0, _NORMAL), (1, _PNEUMONIA)):
        scores = calibration.probabilities[calibration.labels == label]
        axes.hist(scores, bins=bins, alpha=0.55, color=colour, density=True,
                  label=f"{CLASS_NAMES[label]} ({len(scores)} images)")
    axes.axvline(calibration.source.threshold, color=_SHIPPED, ls="--", lw=2,
                 label=f"shipped threshold {calibration.source.threshold:.3f}")
    axes.axvline(calibration.point.threshold, color=_SITE, lw=2, label=f"site threshold {calibration.point.threshold:.3f}")
    axes.set_xlabel("probability of pneumonia")
    axes.set_ylabel("density")
    axes.set_title(f"Scores of the site's sample ({calibration.site})")
    axes.legend(fontsize=8, loc="upper center")
    return figure


def _tradeoff_figure(calibration: Calibration):
    """Precision, sensitivity and specificity on the site's sample at every threshold."""
    figure = new_figure(4.5)
    axes = figure.add_subplot()
    thresholds = np.linspace(0, 1, 201)
    labels, scores = calibration.labels, calibration.probabilities
    positive = labels == 1
    flagged = scores[None, :] >= thresholds[:, None]
    tp = (flagged & positive).sum(axis=1)
    fp = (flagged & ~positive).sum(axis=1)
    recall = tp / max(int(positive.sum()), 1)
    specificity = 1 - fp / max(int((~positive).sum()), 1)
    precision = np.divide(tp, tp + fp, out=np.full(len(thresholds), np.nan), where=(tp + fp) > 0)
    axes.plot(thresholds, recall, color=_PNEUMONIA, lw=2, label="sensitivity")
    axes.plot(thresholds, precision, color=_SITE, lw=2, label="precision")
    axes.plot(thresholds, specificity, color=_NORMAL, lw=2, label="specificity")
    axes.axhline(calibration.target_recall, color=_PNEUMONIA, ls=":", lw=1,
                 label=f"target sensitivity {calibration.target_recall:g}")
    axes.axvline(calibration.source.threshold, color=_SHIPPED, ls="--", lw=2, label="shipped threshold")
    axes.axvline(calibration.point.threshold, color=_SITE, lw=1.5, label="site threshold")
    axes.set_xlabel("threshold")
    axes.set_ylim(0, 1.02)
    axes.set_title("What each threshold would do on the site's sample")
    axes.legend(fontsize=8, loc="lower center")
    return figure


# ----------------------------------------------------------------------------- HTML


def _number(value, interval=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{value:.3f}"
    if interval and not any(bound is None or math.isnan(bound) for bound in interval):
        text += f" <span class=\"note\">[{interval[0]:.3f}, {interval[1]:.3f}]</span>"
    return text


def _comparison_table(calibration: Calibration, validation: dict) -> str:
    shipped, site = calibration.at_shipped, calibration.at_site
    head = ("<tr><th></th>"
            f"<th>Validation (ours), shipped threshold {validation['threshold']:.3f}</th>"
            f"<th>Site, shipped threshold {shipped.threshold:.3f}</th>"
            f"<th>Site, site threshold {site.threshold:.3f}</th></tr>")
    rows = []
    for name, words in ROWS:
        rows.append(
            f"<tr><th>{escape(words)}</th>"
            f'<td class="num">{_number(validation.get(name), validation.get(f"{name}_ci"))}</td>'
            f'<td class="num">{_number(shipped.values[name], shipped.intervals.get(name))}</td>'
            f'<td class="num">{_number(site.values[name], site.intervals.get(name))}</td></tr>')
    for label, key in (("False alarms (healthy children flagged)", "fp"), ("Missed (children with pneumonia)", "fn")):
        rows.append(f"<tr><th>{label}</th><td class=\"num\">–</td><td class=\"num\">{shipped.confusion[key]}</td>"
                    f"<td class=\"num\">{site.confusion[key]}</td></tr>")
    return "<table>" + head + "".join(rows) + "</table>"


def _html(calibration: Calibration, summary: dict, images: dict[str, Path]) -> str:
    block = summary["site_sample"]
    verdict = "pass" if calibration.passed else "fail"
    criteria = "".join(
        f"<li><b>{'PASS' if item['passed'] else 'FAIL'}</b>: {escape(item['criterion'])} "
        f"(measured {item['value']:.3f})</li>" for item in calibration.criteria)
    outcome = (f"Published as {escape(calibration.published.version)} in {escape(calibration.published.path)}."
               if calibration.published else "Nothing was published.")
    images_text = ", ".join(f"{count} {name}" for name, count in block["images"].items())
    patients_text = ", ".join(f"{count} {name}" for name, count in block["patients"].items())
    ood = block["out_of_distribution"]
    moved = calibration.point.threshold - calibration.source.threshold
    sections = [
        f"<h1>Acceptance of {escape(calibration.source.name)} {escape(calibration.source.version)} "
        f"at {escape(calibration.site)}</h1>",
        f'<div class="verdict {verdict}"><p><b>{verdict.upper()}</b>. {outcome}</p><ul>{criteria}</ul></div>',
        "<h2>The site beside our validation</h2>",
        _comparison_table(calibration, summary["validation"]),
        f'<p class="note">Brackets: {calibration.confidence:.0%} intervals over {calibration.point.samples} patient-bootstrap resamples '
        "of the site's sample (validation: of our validation carve, recorded at export).</p>",
        "<h2>How the site threshold was chosen</h2>",
        f"<p>The highest threshold whose {calibration.confidence:.0%} lower bound of sensitivity on this sample, "
        f"by patient bootstrap, still reaches {calibration.target_recall:g}: {calibration.point.threshold:.3f} "
        f"({'up' if moved > 0 else 'down'} {abs(moved):.3f} from the shipped {calibration.source.threshold:.3f}). "
        "A threshold that only asks the sample's own sensitivity to reach the target misses it on the rest of "
        "the site about half the time; the lower bound keeps a margin that grows as the sample gets smaller.</p>",
        "<h2>Scores on the site</h2>",
        '<div class="plots">'
        + figure_html(images["scores"], "Probabilities of the site's healthy and sick children, with both "
                                         "thresholds: healthy children above a threshold are its false alarms.")
        + figure_html(images["tradeoff"], "Sensitivity, precision and specificity on the site's sample at "
                                           "every threshold.")
        + "</div>",
        "<h2>The sample</h2>",
        "<table>"
        f"<tr><th>Data</th><td>{escape(block['data'])}</td></tr>"
        f"<tr><th>Images scored</th><td>{escape(images_text)}</td></tr>"
        f"<tr><th>Patients</th><td>{escape(patients_text)}</td></tr>"
        f"<tr><th>Not classified by the out-of-distribution guard</th><td>{ood['images']} ({ood['rate']:.1%})</td></tr>"
        f"<tr><th>Unreadable files</th><td>{block['unreadable_images']}</td></tr>"
        f"<tr><th>Sample fingerprint</th><td>{escape(block['sample_fingerprint'])}</td></tr>"
        f"<tr><th>Date</th><td>{escape(block['calibrated'])}</td></tr>"
        "</table>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>Acceptance at {escape(calibration.site)}</title>\n<style>{CSS}{_VERDICT_CSS}</style>\n</head>\n"
        "<body>\n<main>\n" + "\n".join(sections) + "\n</main>\n</body>\n</html>\n"
    )
