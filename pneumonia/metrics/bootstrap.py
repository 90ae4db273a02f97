"""The patient bootstrap behind every confidence interval in the package (NumPy only).

Images of one child are correlated (several views, follow-ups), so a resample draws whole
patients with replacement and keeps all their images; resampling images one by one claims more
certainty than the data holds. The report's metric intervals and the export's operating point
both draw their resamples here, so with the same patients and seed they see the same resamples
and the recall interval an artifact records at export is the one its report shows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

# Resampling counts held in memory at once (float64 cells, 32 MB): large sets are resampled in
# blocks of rows instead of one (samples x n) matrix.
BLOCK_CELLS = 4_000_000


def check_settings(samples: int, confidence: float) -> None:
    if samples < 1:
        raise ValueError(f"the number of bootstrap resamples must be at least 1, not {samples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")


def sampling_units(groups, n: int) -> np.ndarray:
    """Index (0..units-1) of the unit each of n images is resampled with: itself, or its group (patient)."""
    if groups is None:
        return np.arange(n)
    groups = np.asarray(groups).reshape(-1)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} examples")
    return np.unique(groups, return_inverse=True)[1].reshape(-1)


def count_blocks(n_units: int, samples: int, seed: int, block_rows: int) -> Iterator[np.ndarray]:
    """Consecutive row blocks of the (samples x n_units) matrix of how often each resample drew each unit.

    Every row draws n_units units uniformly with replacement. The rows come from one seeded
    generator in order, so the matrix does not depend on the block size: callers with different
    memory budgets (per-image weights, per-patient counts) get the same resamples.
    """
    rng = np.random.default_rng(seed)
    uniform = np.full(n_units, 1 / n_units)
    block_rows = max(1, int(block_rows))
    for start in range(0, samples, block_rows):
        yield rng.multinomial(n_units, uniform, size=min(block_rows, samples - start))


def resample_counts(n_units: int, samples: int, seed: int) -> np.ndarray:
    """The whole (samples x n_units) count matrix, as int32 (4 bytes a cell: 1,000 x 1,000 patients is 4 MB)."""
    rows = max(1, BLOCK_CELLS // max(n_units, 1))
    return np.concatenate([block.astype(np.int32) for block in count_blocks(n_units, samples, seed, rows)])


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (as binary_metrics defines it)."""
    return np.divide(numerator, denominator, out=np.zeros(np.shape(numerator), dtype=np.float64),
                     where=np.asarray(denominator) > 0)


def tail_percent(confidence: float) -> float:
    """Percentile of the lower end of a two-sided interval (2.5 for 95%)."""
    return 50 * (1 - confidence)


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """Two-sided percentile interval of the defined (non-NaN) values; (nan, nan) when none is defined."""
    values = np.asarray(values, dtype=np.float64)
    defined = values[~np.isnan(values)]
    if defined.size == 0:
        return math.nan, math.nan
    tail = tail_percent(confidence)
    low, high = np.percentile(defined, [tail, 100 - tail])
    return float(low), float(high)
