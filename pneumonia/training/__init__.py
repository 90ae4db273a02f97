"""Training: Ray Train runs, Ray Tune sweeps and ensembles.

- :mod:`~pneumonia.training.driver`: ``train()``, one run or an ensemble, from data root to best checkpoint;
- :mod:`~pneumonia.training.fit`: one distributed Ray Train run (``fit_run``) and its resource check;
- :mod:`~pneumonia.training.worker`: what every Train worker runs, epoch by epoch;
- :mod:`~pneumonia.training.ema`: the moving average of the weights;
- :mod:`~pneumonia.training.launcher`: several runs as Tune trials (restore or create, watch, statuses);
- :mod:`~pneumonia.training.sweep`: ``tune()``, the hyperparameter search, its table and plots
  (:mod:`~pneumonia.training.plots`);
- :mod:`~pneumonia.training.members`: an ensemble's members, combined into one checkpoint;
- :mod:`~pneumonia.training.supervision`: why a run waits, when it stops, what an interruption left.
"""
