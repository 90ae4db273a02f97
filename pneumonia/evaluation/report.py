"""Evaluation report: metrics with their confidence intervals (:mod:`pneumonia.metrics.intervals`), plots
and one self-contained HTML page.

Works on NumPy arrays of labels and probabilities (no TensorFlow, no Ray), so it can report on any
model's predictions. The page is for the clinician who decides whether a model is good enough: a
number measured on 624 test images means little without its uncertainty, and a threshold means
little until it is said in children flagged and missed. PNEUMONIA (label 1) is the positive class.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from pneumonia.data.labels import CLASS_NAMES
from pneumonia.metrics.binary import METRIC_NAMES, binary_metrics, validated_scores
from pneumonia.metrics.intervals import CONFIDENCE, INTERVAL_METRICS, Interval, bootstrap_intervals
from pneumonia.storage import json_ready

PLOTS = ("roc", "pr", "confusion", "calibration")

# name shown in the report, whether it reads as a percentage, and what it means in words
_DISPLAY = {
    "accuracy": ("Accuracy", True, "Share of all children classified correctly."),
    "precision": ("Precision (positive predictive value)", True,
                  "Of the children flagged, the share who have pneumonia. Depends on how common "
                  "pneumonia is in the tested group."),
    "recall": ("Sensitivity (recall)", True, "Of the children with pneumonia, the share flagged."),
    "specificity": ("Specificity", True, "Of the healthy children, the share correctly not flagged."),
    "f1": ("F1 score", False, "Balance of precision and sensitivity (their harmonic mean), 0 to 1."),
    "roc_auc": ("ROC AUC", False,
                "Chance that a child with pneumonia gets a higher score than a healthy child, "
                "at any threshold (0.5 is guessing, 1 is perfect)."),
    "pr_auc": ("PR AUC (average precision)", False,
               "Precision averaged over all sensitivities, at any threshold (1 is perfect)."),
}

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; color: #1d2733;
       background: #f6f7f9; margin: 0; line-height: 1.5; }
main { max-width: 980px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #dde2e8; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #dde2e8; padding: 6px 10px; text-align: left; vertical-align: top; }
th { background: #eef2f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.meaning { background: #eef6ee; border-left: 4px solid #3c8d40; padding: 10px 14px; }
.note { color: #56616d; font-size: 0.9em; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; flex: 1 1 440px; }
figure img { width: 100%; height: auto; border: 1px solid #dde2e8; }
figcaption { font-size: 0.9em; color: #56616d; }
"""


@dataclass
class ReportFiles:
    directory: Path
    json: Path
    html: Path
    images: dict[str, Path]  # "roc", "pr", "confusion", "calibration" -> PNG file


# ----------------------------------------------------------------------------- report


def write_report(directory, labels, probabilities, threshold: float, *, title: str,
                 details: dict | None = None, groups=None, n_boot: int = 1000, seed: int = 0,
                 threshold_choice: dict | None = None, stress: dict | None = None,
                 ood: dict | None = None) -> ReportFiles:
    """Write metrics.json, four PNG plots and a self-contained report.html into ``directory``.

    ``details`` (model, version, split, data path...) is copied into the JSON verbatim (values JSON
    cannot hold are written as strings) and shown in the page. Pass patient ids as ``groups`` so the
    95% intervals resample patients, not images. ``threshold_choice`` is how an artifact's threshold
    was chosen on validation (its metadata's ``validation_metrics.operating_point``, i.e.
    SafeOperatingPoint.to_json()): the page then says which rule chose it and the precision and
    sensitivity that were to be expected, with their intervals, next to what this set shows. The
    HTML embeds its images and CSS and loads nothing, so it can be mailed or archived as one file.
    Undefined numbers (an AUC on one class) are null in the JSON and "n/a" in the page.
    ``stress`` (a ``pneumonia.metrics.stress.StressReport.to_json()``) adds the shift stress table;
    ``ood`` (an artifact's guard on this split: rate, count, n, threshold, policy, expected_rate)
    the share of images the guard would not classify.
    """
    labels, probabilities = validated_scores(labels, probabilities)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metrics = binary_metrics(labels, probabilities, threshold)
    intervals = bootstrap_intervals(labels, probabilities, threshold, n_boot=n_boot, seed=seed, groups=groups)
    summary = _summary(title, details or {}, metrics, intervals, labels, groups, n_boot, seed)
    summary["threshold_choice"] = threshold_choice
    summary["stress"] = stress
    summary["out_of_distribution"] = ood

    images = {name: directory / f"{name}.png" for name in PLOTS}
    figures = {
        "roc": _roc_figure(labels, probabilities, metrics, intervals),
        "pr": _pr_figure(labels, probabilities, metrics, intervals),
        "confusion": _confusion_figure(metrics),
        "calibration": _calibration_figure(labels, probabilities, threshold),
    }
    for name, figure in figures.items():
        figure.savefig(images[name], dpi=110)

    json_path, html_path = directory / "metrics.json", directory / "report.html"
    json_path.write_text(json.dumps(json_ready(summary), indent=2, allow_nan=False, default=str) + "\n",
                         encoding="utf-8")
    html_path.write_text(_html(summary, images), encoding="utf-8")
    return ReportFiles(directory, json_path, html_path, images)


def _summary(title, details, metrics, intervals, labels, groups, n_boot, seed) -> dict:
    """Everything the JSON holds and the page shows (NaN kept; _jsonable turns it into null)."""
    n_pos = int(np.sum(labels == 1))
    unit = "patient" if groups is not None else "image"
    return {
        "title": title,
        "threshold": float(metrics["threshold"]),
        "operating_point": {
            "threshold": float(metrics["threshold"]),
            "sensitivity": metrics["recall"],
            "specificity": metrics["specificity"],
            "false_positive_rate": 1.0 - metrics["specificity"],
            "precision": metrics["precision"],
        },
        "n": {CLASS_NAMES[0]: len(labels) - n_pos, CLASS_NAMES[1]: n_pos, "total": len(labels)},
        "metrics": {
            name: {
                "value": metrics[name],
                "low": intervals[name].low if name in intervals else None,
                "high": intervals[name].high if name in intervals else None,
            }
            for name in METRIC_NAMES
        },
        "confusion": {key: metrics[key] for key in ("tp", "fp", "tn", "fn")},
        "bootstrap": {
            "resamples": n_boot,
            "seed": seed,
            "confidence": CONFIDENCE,
            "unit": unit,
            "units": len(np.unique(np.asarray(groups))) if groups is not None else len(labels),
        },
        "details": details,
    }


# ----------------------------------------------------------------------------- plots


_CURVE, _POINT = "#1f5fa8", "#d1495b"


def new_figure(height: float = 5.0) -> Figure:
    return Figure(figsize=(6.0, height), layout="constrained")


def _both_classes(labels) -> bool:
    return 0 < int(np.sum(labels == 1)) < len(labels)


def _interval_text(value: float, interval: Interval) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isnan(interval.low):
        return f"{value:.3f}"
    return f"{value:.3f}, 95% CI {interval.low:.3f}–{interval.high:.3f}"


def _mark_operating_point(axes, x: float, y: float, text: str) -> None:
    """A marker at the threshold's point, its label pushed toward the middle so it stays inside."""
    axes.plot([x], [y], marker="o", markersize=9, color=_POINT, zorder=5, label="operating point")
    dx, ha = (14, "left") if x < 0.6 else (-14, "right")
    dy, va = (-28, "top") if y > 0.4 else (28, "bottom")
    axes.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=9,
                  bbox={"boxstyle": "round", "fc": "white", "ec": _POINT},
                  arrowprops={"arrowstyle": "-", "color": _POINT})


def _one_class_note(axes) -> None:
    axes.text(0.5, 0.5, "Undefined: the labels hold\nonly one class", ha="center", va="center",
              fontsize=12, transform=axes.transAxes)


def _roc_figure(labels, probabilities, metrics, intervals) -> Figure:
    figure = new_figure()
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], ls="--", lw=1, color="grey", label="chance")
    if _both_classes(labels):
        fpr, tpr, _ = roc_curve(labels, probabilities)
        auc = _interval_text(metrics["roc_auc"], intervals["roc_auc"])
        axes.plot(fpr, tpr, lw=2, color=_CURVE, label=f"model (AUC {auc})")
        _mark_operating_point(
            axes, 1 - metrics["specificity"], metrics["recall"],
            f"threshold {metrics['threshold']:.2f}\nsensitivity {metrics['recall']:.1%}\n"
            f"specificity {metrics['specificity']:.1%}")
    else:
        _one_class_note(axes)
    axes.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title="ROC curve",
             xlabel="False positive rate (1 − specificity)", ylabel="Sensitivity (true positive rate)")
    axes.legend(loc="lower right", fontsize=9)
    axes.grid(alpha=0.3)
    return figure


def _pr_figure(labels, probabilities, metrics, intervals) -> Figure:
    figure = new_figure()
    axes = figure.add_subplot()
    if _both_classes(labels):
        prevalence = float(np.mean(labels == 1))
        axes.axhline(prevalence, ls="--", lw=1, color="grey", label=f"chance (prevalence {prevalence:.0%})")
        precision, recall, _ = precision_recall_curve(labels, probabilities)
        ap = _interval_text(metrics["pr_auc"], intervals["pr_auc"])
        axes.step(recall, precision, where="post", lw=2, color=_CURVE, label=f"model (AP {ap})")
        _mark_operating_point(
            axes, metrics["recall"], metrics["precision"],
            f"threshold {metrics['threshold']:.2f}\nsensitivity {metrics['recall']:.1%}\n"
            f"precision {metrics['precision']:.1%}")
        axes.legend(loc="lower left", fontsize=9)
    else:
        _one_class_note(axes)
    axes.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title="Precision–recall curve",
             xlabel="Sensitivity (recall)", ylabel="Precision (positive predictive value)")
    axes.grid(alpha=0.3)
    return figure


def _confusion_figure(metrics) -> Figure:
    counts = np.array([[metrics["tn"], metrics["fp"]], [metrics["fn"], metrics["tp"]]])
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    figure = new_figure(4.8)
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for row in range(2):
        for column in range(2):
            share = f"\n({shares[row, column]:.1%})" if totals[row, 0] else ""
            axes.text(column, row, f"{counts[row, column]}{share}", ha="center", va="center", fontsize=13,
                      color="white" if shares[row, column] > 0.5 else "black")
    axes.set_xticks([0, 1], labels=CLASS_NAMES)
    axes.set_yticks([0, 1], labels=CLASS_NAMES)
    axes.set(xlabel="Predicted", ylabel="True",
             title=f"Confusion matrix at threshold {metrics['threshold']:.2f}\n"
                   "(percentages: share of the true class)")
    figure.colorbar(image, ax=axes, label="share of the true class", shrink=0.8)
    return figure


def _calibration_figure(labels, probabilities, threshold: float, bins: int = 10) -> Figure:
    """Reliability diagram: of the children given about 70%, do about 70% have pneumonia?"""
    edges = np.linspace(0, 1, bins + 1)
    index = np.digitize(probabilities, edges[1:-1])
    counts = np.bincount(index, minlength=bins)
    filled = counts > 0
    mean_predicted = np.bincount(index, weights=probabilities, minlength=bins)[filled] / counts[filled]
    observed = np.bincount(index, weights=labels, minlength=bins)[filled] / counts[filled]

    figure = new_figure(5.6)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], ls="--", lw=1, color="grey", label="perfectly calibrated")
    top.plot(mean_predicted, observed, marker="o", lw=2, color=_CURVE, label="model")
    top.axvline(threshold, ls=":", color=_POINT, label=f"threshold {threshold:.2f}")
    top.set(xlim=(0, 1), ylim=(-0.01, 1.01), ylabel="Observed share with pneumonia",
            title=f"Reliability diagram ({bins} bins)")
    top.legend(loc="upper left", fontsize=9)
    top.grid(alpha=0.3)
    bottom.bar(edges[:-1], counts, width=1 / bins, align="edge", color=_CURVE, alpha=0.6, edgecolor="white")
    bottom.set(xlabel="Predicted probability of pneumonia", ylabel="Images")
    return figure


# ----------------------------------------------------------------------------- HTML


def escape(value) -> str:
    return html.escape(str(value), quote=True)


def _html(summary: dict, images: dict[str, Path]) -> str:
    n = summary["n"]
    sections = [
        f"<h1>{escape(summary['title'])}</h1>",
        f"<p>{n['total']} chest X-rays: {n[CLASS_NAMES[1]]} with pneumonia, {n[CLASS_NAMES[0]]} without.</p>",
        "<h2>What the threshold means</h2>",
        f'<div class="meaning">{"".join(f"<p>{escape(line)}</p>" for line in _threshold_words(summary))}</div>',
    ]
    if summary.get("threshold_choice"):
        sections += ["<h2>How the threshold was chosen</h2>", _choice_html(summary["threshold_choice"],
                                                                          summary["threshold"])]
    if summary["details"]:
        sections += ["<h2>Details</h2>", _details_table(summary["details"])]
    if summary.get("out_of_distribution"):
        sections += ["<h2>Images the model would not classify (out-of-distribution guard)</h2>",
                     _ood_html(summary["out_of_distribution"])]
    if summary.get("stress"):
        sections += ["<h2>Under the changes a new site brings (shift stress validation)</h2>",
                     _stress_html(summary["stress"])]
    sections += [
        "<h2>Performance, with 95% confidence intervals</h2>",
        _metrics_table(summary["metrics"]),
        f'<p class="note">{escape(_interval_note(summary["bootstrap"]))}</p>',
        "<h2>Confusion matrix</h2>",
        _confusion_table(summary["confusion"], summary["threshold"]),
        "<h2>Plots</h2>",
        '<div class="plots">' + "".join(figure_html(images[name], caption) for name, caption in (
            ("roc", "ROC curve: every threshold's sensitivity against its false positive rate; "
                    "the dot is the chosen threshold."),
            ("pr", "Precision–recall curve: how many alarms are real at each sensitivity; "
                   "the dot is the chosen threshold."),
            ("confusion", "Confusion matrix at the chosen threshold."),
            ("calibration", "Reliability diagram: when the model says 70%, do about 70% have pneumonia? "
                            "Points on the diagonal are well calibrated."),
        )) + "</div>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(summary['title'])}</title>\n<style>{CSS}</style>\n</head>\n"
        "<body>\n<main>\n" + "\n".join(sections) + "\n</main>\n</body>\n</html>\n"
    )


def _threshold_words(summary: dict) -> list[str]:
    """The operating point in children flagged and missed per 100, the way a clinician weighs it."""
    point, n = summary["operating_point"], summary["n"]
    t = point["threshold"]
    lines = [f"A child is flagged as having pneumonia when the model's probability is at least {t:.2f}."]
    per_100 = []
    if n[CLASS_NAMES[1]]:
        flagged = round(100 * point["sensitivity"])
        per_100.append(f"of 100 children with pneumonia, about {_are(flagged, 'flagged')} "
                       f"and {_are(100 - flagged, 'missed')}")
    if n[CLASS_NAMES[0]]:
        wrongly = round(100 * point["false_positive_rate"])
        per_100.append(f"of 100 healthy children, about {_are(wrongly, 'wrongly flagged')}")
    if per_100:
        lines.append(f"At threshold {t:.2f}: " + "; ".join(per_100) + ".")
    confusion = summary["confusion"]
    if n[CLASS_NAMES[1]] and n[CLASS_NAMES[0]] and confusion["tp"] + confusion["fp"]:
        prevalence = n[CLASS_NAMES[1]] / n["total"]
        lines.append(
            f"Of the children flagged in this set, about {round(100 * point['precision'])} in 100 have pneumonia. "
            f"This depends on how common pneumonia is ({prevalence:.0%} here): where it is rarer, "
            "more of the flagged children are healthy.")
    if not (n[CLASS_NAMES[0]] and n[CLASS_NAMES[1]]):
        lines.append("This set holds only one class, so the measures that need both (ROC AUC, PR AUC, "
                     "and sensitivity or specificity) cannot be estimated from it.")
    return lines


def _choice_html(choice: dict, threshold: float) -> str:
    """The rule that chose the threshold on validation, and what it promised there, with intervals."""
    level, target = f"{choice['confidence']:.0%}", f"{choice['target_recall']:.0%}"
    if choice["rule"] == "lower_bound":
        rule = (f"the highest precision among the thresholds whose sensitivity reaches {target} even at the "
                f"lower end of its {level} confidence interval ({choice['samples']} resamples of "
                f"{choice['units']} patients): a margin for children unlike those of the validation split")
    else:
        rule = (f"the highest precision among the thresholds whose sensitivity reaches {target} on the "
                "validation split itself, with no margin for its uncertainty")
    lines = [f"Threshold {choice['threshold']:.2f} was chosen on the validation split as {rule}."]
    if not choice["met"]:
        lines.append(f"The validation split held too few children with pneumonia to vouch for a sensitivity of "
                     f"{target}, so the threshold was set to flag every one of them.")
    if not math.isclose(choice["threshold"], threshold, rel_tol=0, abs_tol=1e-9):
        lines.append(f"This report scores threshold {threshold:.2f} instead, so the numbers below do not apply to it.")
    rows = [f"<tr><th>On the validation split</th><th>Value</th><th>{escape(level)} CI</th></tr>"]
    for name in ("precision", "recall", "specificity"):
        low, high = (choice.get(f"{name}_ci") or [None, None])
        interval = "n/a" if low is None or high is None else f"{_format(name, low)} – {_format(name, high)}"
        rows.append(f'<tr><th>{escape(_DISPLAY[name][0])}</th><td class="num">{escape(_format(name, choice[name]))}</td>'
                    f'<td class="num">{escape(interval)}</td></tr>')
    note = ("What to expect on children like those of the validation split; what this set shows is in the "
            "performance table below. Precision depends on how common pneumonia is: where it is rarer, more "
            "of the flagged children are healthy.")
    return ("".join(f"<p>{escape(line)}</p>" for line in lines) + "<table>" + "".join(rows) + "</table>"
            + f'<p class="note">{escape(note)}</p>')


def _ood_html(ood: dict) -> str:
    warn = ood["rate"] > max(3 * ood.get("expected_rate", 0.01), 0.02)
    return (f"<p>{ood['count']} of {ood['n']} images ({ood['rate']:.1%}) score above the guard's threshold "
            f"{ood['threshold']:.1f} and would be {'refused' if ood.get('policy') == 'reject' else 'flagged'} by "
            f"the service; about {ood.get('expected_rate', 0.01):.0%} of validation X-rays do."
            + (" <strong>Far more than on validation: these images differ from what the model learned from "
               "(another site, device or protocol?). Check them before trusting the metrics.</strong>" if warn else "")
            + "</p>")


def _stress_html(stress: dict) -> str:
    """Per-shift ranking and fixed-threshold drift, worst values marked."""
    target = f"{stress['target_recall']:.0%}"
    head = ("<tr><th>Shift</th><th>ROC-AUC</th><th>PR-AUC</th><th>Precision at sensitivity "
            f"&ge; {escape(target)}</th><th>Sensitivity at {stress['threshold']:.2f}</th>"
            f"<th>Precision at {stress['threshold']:.2f}</th><th>Specificity at {stress['threshold']:.2f}</th></tr>")
    worst = stress.get("worst", {})
    rows = [head]
    for row in stress["rows"]:
        mark = " (worst)" if row["shift"] in worst.values() else ""
        cells = [row[name] for name in ("roc_auc", "pr_auc", "precision_at_recall", "recall_at_threshold",
                                        "precision_at_threshold", "specificity_at_threshold")]
        rows.append(f"<tr><th>{escape(row['shift'] + mark)}</th>"
                    + "".join(f'<td class="num">{"n/a" if value is None else f"{value:.3f}"}</td>' for value in cells)
                    + "</tr>")
    note = (f"The same {stress['n']} images re-scored after each change (new_site: every image its own random "
            "mix of exposure, contrast, blur, noise, framing and JPEG). The first columns re-rank the images "
            "(does the model still tell sick from healthy?); the last three keep the threshold (does it drift?).")
    return "<table>" + "".join(rows) + "</table>" + f'<p class="note">{escape(note)}</p>'


def _are(count: int, what: str) -> str:
    return f"{count} {'is' if count == 1 else 'are'} {what}"


def _details_table(details: dict) -> str:
    rows = []
    for key, value in details.items():
        text = json.dumps(json_ready(value), default=str) if isinstance(value, (dict, list, tuple)) else value
        rows.append(f"<tr><th>{escape(key)}</th><td>{escape(text)}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _format(name: str, value) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.1%}" if _DISPLAY[name][1] else f"{value:.3f}"


def _metrics_table(metrics: dict) -> str:
    rows = ["<tr><th>Measure</th><th>Value</th><th>95% CI</th><th>What it means</th></tr>"]
    for name in INTERVAL_METRICS:
        entry = metrics[name]
        low, high = _format(name, entry["low"]), _format(name, entry["high"])
        interval = "n/a" if "n/a" in (low, high) else f"{low} – {high}"
        label, _, meaning = _DISPLAY[name]
        rows.append(f'<tr><th>{escape(label)}</th><td class="num">{escape(_format(name, entry["value"]))}</td>'
                    f'<td class="num">{escape(interval)}</td><td>{escape(meaning)}</td></tr>')
    return "<table>" + "".join(rows) + "</table>"


def _interval_note(bootstrap: dict) -> str:
    unit = "patients" if bootstrap["unit"] == "patient" else "images"
    text = (f"95% confidence intervals: percentile bootstrap, {bootstrap['resamples']} resamples of the "
            f"{bootstrap['units']} {unit} (seed {bootstrap['seed']}). They show how much the numbers could "
            "move on another set of children like these; they do not cover children unlike them "
            "(other hospitals, ages or scanners).")
    if unit == "images":
        text += " Images were resampled one by one: with several images per child the intervals are too narrow."
    return text


def _confusion_table(confusion: dict, threshold: float) -> str:
    normal, pneumonia = CLASS_NAMES
    return (
        f"<table><tr><th>At threshold {escape(f'{threshold:.2f}')}</th><th>Predicted {normal}</th>"
        f"<th>Predicted {pneumonia}</th></tr>"
        f'<tr><th>True {normal}</th><td class="num">{confusion["tn"]} correctly cleared</td>'
        f'<td class="num">{confusion["fp"]} false alarms</td></tr>'
        f'<tr><th>True {pneumonia}</th><td class="num">{confusion["fn"]} missed</td>'
        f'<td class="num">{confusion["tp"]} correctly flagged</td></tr></table>'
    )


def figure_html(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")
