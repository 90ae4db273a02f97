"""Several Ray Train runs as Tune trials: the one launcher that sweeps and ensembles share.

A sweep's trials (:mod:`pneumonia.training.sweep`) and an ensemble's members
(:mod:`pneumonia.training.members`) are both Tune trials whose function runs one distributed
training run (:func:`pneumonia.training.fit.fit_run`). Both need the same things around Tune:
the trial function with its small CPU reservation and the data shipped once through the object
store, a Tuner restored from storage on ``--resume`` (unfinished and errored trials continue from
their checkpoints) or created anew, the cluster's resources watched while it runs, and each
trial's status read back honestly afterwards (stopped mid-run or never started, not "finished").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pneumonia.config import ExperimentConfig
from pneumonia.data.records import ImageRecord
from pneumonia.training.supervision import ResourceWatch, saved_statuses
from pneumonia.training.worker import records_to_rows

DRIVER_CPU = 0.1
"""CPU reserved for each trial's own function, which only waits on its Train run's workers."""


def trial_function(run: Callable[..., None], base: dict[str, Any], train_part: list[ImageRecord],
                   val_part: list[ImageRecord], **arguments: Any):
    """``run(params, base=..., train_rows=..., val_rows=..., **arguments)`` as a Tune trainable:
    DRIVER_CPU each, the records put in Ray's object store once for every trial."""
    from ray import tune

    return tune.with_parameters(
        tune.with_resources(run, {"CPU": DRIVER_CPU}),
        base=base,
        train_rows=records_to_rows(train_part),
        val_rows=records_to_rows(val_part),
        **arguments,
    )


def run_trials(trainable, path: str, resume: bool, new_tuner: Callable[[], Any], config: ExperimentConfig,
               what: str, history_of: Callable[[Any], str]):
    """Fit the trials in ``path`` (an experiment folder): the saved Tuner with ``resume`` where
    one can be restored, else ``new_tuner()``. Returns Tune's result grid and each trial's
    status (:func:`~pneumonia.training.supervision.saved_statuses`; ``history_of(trial)`` is
    where its workers record their epochs)."""
    from ray import tune

    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = new_tuner()
    with ResourceWatch(config, what=what):
        grid = tuner.fit()
    return grid, saved_statuses(path, history_of=history_of)


def finite(value: Any) -> bool:
    """A reported metric that is a real number (not missing, not NaN)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def result_history(result) -> list[dict[str, Any]]:
    """Every report of a trial, in order (empty when it never reported)."""
    return [] if result.metrics_dataframe is None else result.metrics_dataframe.to_dict(orient="records")
