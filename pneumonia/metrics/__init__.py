"""Metrics: numbers from labels and probabilities (NumPy and scikit-learn; no TensorFlow, no Ray).

- :mod:`~pneumonia.metrics.binary`: exact metrics, operating points (threshold for a target recall);
- :mod:`~pneumonia.metrics.bootstrap`: the patient bootstrap behind every interval;
- :mod:`~pneumonia.metrics.intervals`: confidence intervals of the metrics at a threshold;
- :mod:`~pneumonia.metrics.stress`: per-shift scores of shift stress validation;
- :mod:`~pneumonia.metrics.drift`: how far recent scores moved from a reference (population stability index).
"""
