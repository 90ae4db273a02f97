"""Drift of the model's scores: the population stability index (PSI) of recent probabilities
against a reference distribution recorded with the artifact.

Why: a model meets X-rays from a new site, scanner or season without labels, and the first sign
that its threshold no longer means what validation said is a change in what it answers (on
X-rays from a later period, healthy children scored 0.38 on average, against ~0 on validation).
The probability of pneumonia is class-agnostic (no label is needed), one number
per image, and already computed, so its distribution is cheap to watch everywhere the model runs:
the service (a rolling window per replica), ``pneumonia score`` and ``pneumonia evaluate``.

- **The reference** (:func:`reference_distribution`) is recorded at export from the validation
  carve's probabilities, and again by ``pneumonia calibrate`` from a site's own sample; it is
  stored in the artifact's metadata under ``drift_reference``.
- **Bins: the reference's deciles.** Model probabilities pile up near 0 and 1, so ten equal-width
  bins would put most images in the two outer bins and see nothing of what happens inside them.
  Quantile bins give every bin about a tenth of the reference (the usual way PSI is computed), so
  each bin carries the same weight of evidence wherever the model's scores sit. Ties (a saturated
  model scores many images exactly 1.0) make deciles coincide: duplicates are dropped and the
  outer edges are always 0 and 1, so fewer, wider bins remain and every probability has a bin.
  Bin ``i`` is ``[edges[i], edges[i+1])``; the last one includes 1.
- **The statistic** (:func:`population_stability`): ``sum((a - e) * ln(a / e))`` over the bins,
  ``e`` the reference's fraction and ``a`` the recent images' fraction. A fraction below
  :data:`EPSILON` (0.01% of the images) counts as :data:`EPSILON`, so that an empty bin adds a
  finite amount (a bin of 1% against an empty one adds 0.046) instead of infinity.
- **Levels** (:data:`PSI_WATCH`, :data:`PSI_RECALIBRATE`): the industry convention from credit
  scoring: below 0.1 stable, 0.1 to 0.25 a moderate shift to watch, 0.25 and above a shift that
  calls for action; here, re-choosing the threshold on the site's labelled X-rays
  (``pneumonia calibrate``).
- **Too few images** (:data:`MIN_WINDOW`): the PSI of ``n`` images from an *unchanged* stream
  is biased upward by about ``(bins - 1) / n``, plus ``(bins - 1) / m`` for a reference of ``m``
  images (it is close to a chi-square statistic with ``bins - 1`` degrees of freedom divided by
  the sample size): 0.9 at 10 images, 0.09 at 100. Below 200 images no value is reported. At 200,
  against a 500-image validation reference, an unchanged stream reads 0.06-0.07 on average;
  10-15% of such windows reach the watch level but essentially none the re-calibration level
  (simulated, 400 draws each); the service's 1000-image window reads 0.027 and never reached
  watch. A small reference costs the same: one of 150 images adds 0.06 to every value.

NumPy only (no TensorFlow, no Ray): the service, the batch scorer, evaluation, export and
calibration all compute the same numbers with these functions.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from typing import Any

import numpy as np

STATISTIC = "psi"
BINS = 10
"""Reference quantile bins (deciles), before duplicate edges are dropped."""
EPSILON = 1e-4
"""The smallest fraction a bin counts with (0.01% of the images): an empty bin stays finite."""
PSI_WATCH = 0.1
"""From here a moderate shift: look at what changed (a new scanner, site, protocol or population)."""
PSI_RECALIBRATE = 0.25
"""From here a significant shift: re-choose the threshold on local labelled X-rays."""
MIN_WINDOW = 200
"""Images below which no PSI is reported: an unshifted stream's PSI is biased by ~(bins - 1) / n."""
DEFAULT_WINDOW = 1000
"""Recent images a service replica keeps (:class:`DriftWindow`): an unshifted stream's PSI is then
~0.009 plus the reference's own sampling noise (0.018 for 500 images), well below the watch level."""

STABLE, WATCH, RECALIBRATE = "stable", "watch", "recalibrate"
TOO_FEW, NO_REFERENCE = "too few images", "no reference"
LEVELS = (STABLE, WATCH, RECALIBRATE, TOO_FEW, NO_REFERENCE)


def _scores(probabilities, what: str) -> np.ndarray:
    """``probabilities`` as a flat float64 array; ValueError when one is not a probability."""
    try:
        scores = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be numbers") from None
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{what} must be finite; {int(np.sum(~np.isfinite(scores)))} of {scores.size} are not")
    if scores.size and (scores.min() < 0 or scores.max() > 1):
        raise ValueError(f"{what} must lie in [0, 1]; got values from {scores.min():g} to {scores.max():g}")
    return scores


def _fractions(edges: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The fraction of ``scores`` in each bin ``[edges[i], edges[i+1])`` (the last one closed)."""
    bins = np.searchsorted(edges[1:-1], scores, side="right")
    return np.bincount(bins, minlength=len(edges) - 1) / max(scores.size, 1)


def reference_distribution(probabilities, source: str) -> dict[str, Any]:
    """The reference that later probabilities are compared with, as metadata stores it::

        {"statistic": "psi", "source": source, "images": n, "bins": k,
         "edges": [0.0, ..., 1.0], "fractions": [...]}

    ``edges`` (k + 1, strictly increasing, 0 to 1) are the deciles of ``probabilities`` without
    duplicates; ``fractions`` (k, summing to 1) are the share of ``probabilities`` in each bin.
    ``source`` says what they came from (``validation`` at export, a site's name at calibration).
    ValueError for no probabilities, or one that is not a finite number in [0, 1].
    """
    scores = _scores(probabilities, "reference probabilities")
    if scores.size == 0:
        raise ValueError("cannot record a drift reference from no probabilities")
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"the drift reference needs a source (what the probabilities came from), got {source!r}")
    deciles = np.quantile(scores, np.arange(1, BINS) / BINS)
    interior = np.unique(deciles[(deciles > 0) & (deciles < 1)])
    edges = np.concatenate([[0.0], interior, [1.0]])
    fractions = _fractions(edges, scores)
    return {"statistic": STATISTIC, "source": source, "images": int(scores.size), "bins": len(fractions),
            "edges": [float(edge) for edge in edges], "fractions": [float(share) for share in fractions]}


def check_reference(reference: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(edges, fractions) of a reference made by :func:`reference_distribution`; ValueError saying
    what is wrong with anything else."""
    if not isinstance(reference, dict):
        raise ValueError(f"a drift reference is a JSON object, got {type(reference).__name__}")
    if reference.get("statistic") != STATISTIC:
        raise ValueError(f"drift reference of statistic {reference.get('statistic')!r}; this code computes {STATISTIC!r}")
    try:
        edges = np.asarray(reference["edges"], dtype=np.float64)
        fractions = np.asarray(reference["fractions"], dtype=np.float64)
    except KeyError as missing:
        raise ValueError(f"drift reference without {missing}") from None
    except (TypeError, ValueError):
        raise ValueError("drift reference edges and fractions must be lists of numbers") from None
    if (edges.ndim != 1 or len(edges) < 2 or edges[0] != 0 or edges[-1] != 1 or np.any(np.diff(edges) <= 0)):
        raise ValueError("drift reference edges must increase strictly from 0 to 1")
    if fractions.shape != (len(edges) - 1,) or np.any(fractions < 0) or not np.isclose(fractions.sum(), 1, atol=1e-6):
        raise ValueError(f"drift reference needs {len(edges) - 1} non-negative fractions summing to 1 (one per bin)")
    return edges, fractions


def population_stability(reference: dict[str, Any], probabilities) -> float:
    """PSI of ``probabilities`` against ``reference`` (see the module docstring): 0 for the same
    distribution, larger the more it moved; fractions floored at :data:`EPSILON`."""
    edges, expected = check_reference(reference)
    scores = _scores(probabilities, "probabilities")
    if scores.size == 0:
        raise ValueError("the population stability index needs at least one probability")
    actual = np.maximum(_fractions(edges, scores), EPSILON)
    expected = np.maximum(expected, EPSILON)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def level(value: float) -> str:
    """``stable``, ``watch`` or ``recalibrate`` for a PSI value."""
    return RECALIBRATE if value >= PSI_RECALIBRATE else WATCH if value >= PSI_WATCH else STABLE


def drift_status(reference: dict[str, Any] | None, probabilities) -> dict[str, Any]:
    """What the service's ``/model``, ``pneumonia score`` and ``pneumonia evaluate`` report::

        {"statistic": "psi", "value": 0.031 | None, "images": n, "reference": "validation" | None,
         "reference_images": m | None, "level": "stable" | "watch" | "recalibrate"
         | "too few images" | "no reference", "watch_at": 0.1, "recalibrate_at": 0.25,
         "min_images": 200}

    ``value`` is None without a reference or below :data:`MIN_WINDOW` images (``level`` says
    which). ValueError for a malformed reference or a probability outside [0, 1].
    """
    scores = _scores(probabilities, "probabilities")
    if reference is not None:
        check_reference(reference)
    value = None
    if reference is None:
        verdict = NO_REFERENCE
    elif scores.size < MIN_WINDOW:
        verdict = TOO_FEW
    else:
        value = round(population_stability(reference, scores), 4)
        verdict = level(value)
    return {"statistic": STATISTIC, "value": value, "images": int(scores.size),
            "reference": reference.get("source") if reference else None,
            "reference_images": reference.get("images") if reference else None,
            "level": verdict, "watch_at": PSI_WATCH, "recalibrate_at": PSI_RECALIBRATE, "min_images": MIN_WINDOW}


def drift_summary(status: dict[str, Any]) -> str:
    """One line of terminal text for a :func:`drift_status`."""
    images = f"{status['images']:,} images"
    if status["level"] == NO_REFERENCE:
        return (f"drift: not measured ({images}): the artifact records no reference distribution "
                "(export with --data, or run pneumonia calibrate, to record one)")
    against = f"against {status['reference']}"
    if status["value"] is None:
        return f"drift: not measured ({images} {against}; a PSI needs at least {status['min_images']:,})"
    meaning = {STABLE: f"stable (below {status['watch_at']:g})",
               WATCH: f"watch (level {status['watch_at']:g}): the scores moved; look at what changed",
               RECALIBRATE: f"recalibrate (level {status['recalibrate_at']:g}): re-choose the threshold on "
                            "local labelled X-rays (pneumonia calibrate)"}[status["level"]]
    return f"drift: PSI {status['value']:.3f} {against} ({images}): {meaning}"


class DriftWindow:
    """The last ``capacity`` probabilities, for a drift statistic of recent traffic.

    Thread-safe: a service replica adds each scored batch from its decode threads side by side.
    ``total`` counts every probability ever added (to decide when to measure again).
    """

    def __init__(self, capacity: int = DEFAULT_WINDOW):
        if not isinstance(capacity, int) or capacity < MIN_WINDOW:
            raise ValueError(f"a drift window must hold at least {MIN_WINDOW} images (MIN_WINDOW), got {capacity!r}")
        self.capacity = capacity
        self.total = 0
        self._values: deque[float] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def add(self, probabilities: Iterable[float]) -> int:
        """Append probabilities (the oldest fall out); returns ``total`` after adding them."""
        values = [float(value) for value in probabilities]
        with self._lock:
            self._values.extend(values)
            self.total += len(values)
            return self.total

    def values(self) -> np.ndarray:
        """A copy of the window's probabilities, oldest first."""
        with self._lock:
            return np.array(self._values, dtype=np.float64)

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)
