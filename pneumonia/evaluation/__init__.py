"""Evaluation: a checkpoint or an artifact scored on a labelled split, and the report a reader trusts.

- :mod:`~pneumonia.evaluation.evaluate`: exact metrics on a split, and shift stress validation;
- :mod:`~pneumonia.evaluation.compare`: models compared at their own thresholds for the same recall;
- :mod:`~pneumonia.evaluation.report`: the HTML and JSON report with intervals and plots.
"""
