"""The sweep: configs are validated, tuning raises precision at the target recall, sweeps resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pneumonia.config import ExperimentConfig, load_config, with_overrides
from pneumonia.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["quick", "default", "cluster"])
def test_shipped_sweep_configs_load(name):
    config = load_config(ROOT / "tune_configs" / f"{name}.yaml")
    assert config.tune is not None
    assert {"train.learning_rate", "train.normal_class_weight"} <= set(config.tune.space)
    assert config.objective.target_recall == 0.95


@pytest.mark.parametrize(
    "space, message",
    [
        ({"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}, "'train.lr' is not a searchable"),
        ({"train.learning_rate": {"type": "loguniform", "low": 0, "high": 1e-2}}, "loguniform needs low > 0"),
        ({"train.learning_rate": {"type": "uniform", "low": 0.1, "high": 2}}, "value 2.0 is invalid"),
        ({"model.name": {"type": "choice", "values": ["seed", "resnet"]}}, "value 'resnet' is invalid"),
        ({"model.name": {"type": "choice", "values": []}}, "non-empty 'values'"),
        ({"train.epochs": {"type": "gaussian", "low": 1, "high": 3}}, "tune.space.train.epochs.type"),
        ({"scaling.workers": {"type": "choice", "values": [1, 2]}}, "not a searchable"),
    ],
)
def test_bad_search_spaces_are_rejected_with_the_key(space, message):
    from pneumonia.config import config_from_dict

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        config_from_dict({"tune": {"space": space}})


def test_unknown_tune_key_is_rejected():
    from pneumonia.config import config_from_dict

    with pytest.raises(ConfigError, match="tune.num_sample: unknown key"):
        config_from_dict({"tune": {"num_sample": 3, "space": {"train.learning_rate": {
            "type": "uniform", "low": 0.001, "high": 0.01}}}})


def test_operating_point_is_the_most_precise_threshold_reaching_the_recall():
    from pneumonia.metrics.binary import binary_metrics, operating_point

    labels = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    probabilities = [0.1, 0.2, 0.6, 0.7, 0.3, 0.65, 0.8, 0.85, 0.9, 0.95]
    point = operating_point(labels, probabilities, target_recall=0.8)
    at = binary_metrics(labels, probabilities, point.threshold)
    assert at["recall"] >= 0.8
    assert point.threshold == 0.65 and point.precision == pytest.approx(5 / 6)
    # Any threshold with at least that recall has no better precision.
    for threshold in sorted(set(probabilities)):
        other = binary_metrics(labels, probabilities, threshold)
        if other["recall"] >= 0.8:
            assert other["precision"] <= point.precision + 1e-12


def _sweep_config(storage: Path, **overrides) -> ExperimentConfig:
    base = load_config(ROOT / "tune_configs" / "quick.yaml")
    values = {"run.storage": str(storage), "tune.num_samples": 3, "train.epochs": 6, "tune.search": "random"}
    values.update(overrides)
    return with_overrides(base, values)


@pytest.fixture(scope="module")
def imbalanced_data(tmp_path_factory):
    from pneumonia.data.synth import make_synthetic_dataset

    root = tmp_path_factory.mktemp("imbalanced") / "data"
    make_synthetic_dataset(root, n=900, seed=11, image_size=64, pneumonia_fraction=0.8)
    return root


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_sweep_chooses_its_winner_by_the_smoothed_objective_and_exports_it(ray_cluster, imbalanced_data, tmp_path):
    """The winner is the trial with the best mean objective over its last epochs (not one epoch's
    spike) and its model is its last epoch's checkpoint; the export
    and MLflow lineage follow. (That tuning beats the untuned baseline at matched recall, seed
    after seed, is tests/cli/test_demo.py's.)"""
    from pneumonia.artifacts.export import export
    from pneumonia.artifacts.runs import TRIALS_FOLDER
    from pneumonia.evaluation.evaluate import evaluate_artifact
    from pneumonia.training.sweep import SMOOTHING_EPOCHS, score_rule, tune

    small = {"tune.num_samples": 3, "train.epochs": 4, "data.image_size": 48, "scaling.workers": 1,
             "scaling.cpus_per_worker": 0.5, "tune.max_concurrent_trials": 3, "tune.scheduler": "none",
             "run.name": "sweep"}
    result = tune(_sweep_config(tmp_path, **small), str(imbalanced_data), progress=lambda _: None, untuned_first=True)
    assert len(result.trials) == 3
    # The first trial is the recipe untuned: the baseline, never the winner.
    assert result.baseline["role"] == "untuned baseline" and result.baseline["epochs"] == 4
    assert (result.baseline["param:train.learning_rate"], result.baseline["param:train.normal_class_weight"]) == (
        0.001, 1.0)
    assert Path(result.baseline["checkpoint"]) != Path(result.best_checkpoint)
    assert [row["role"] for row in result.trials].count("searched") == 2
    assert Path(result.results_csv).is_file() and Path(result.results_json).is_file()
    assert all(Path(plot).stat().st_size > 10_000 for plot in result.plots)
    table = json.loads(Path(result.results_json).read_text())
    assert all(row["score_rule"] == score_rule("val_precision_at_recall") for row in table)
    winner = next(row for row in table if row["checkpoint"] and Path(row["checkpoint"]) == Path(result.best_checkpoint))
    history = json.loads((Path(result.best_checkpoint).parent / "history.json").read_text())
    last = [row["val_precision_at_recall"] for row in history][-SMOOTHING_EPOCHS:]
    assert result.objective == pytest.approx(sum(last) / len(last)) == pytest.approx(winner["objective"])
    assert winner["checkpoint_epoch"] == winner["epochs"] == 4  # its last epoch's model
    assert result.metrics["precision_at_recall"] == pytest.approx(history[-1]["val_precision_at_recall"])
    finished = [row for row in table if row["epochs"] == 4 and row["role"] == "searched"]
    assert winner["objective"] == max(row["objective"] for row in finished)
    # Each trial's training run (its checkpoints and history) under <sweep>/trials/<trial id>.
    sweep = tmp_path / "sweep"
    for row in table:
        assert (sweep / TRIALS_FOLDER / row["trial_id"] / "history.json").is_file()

    exported = export(result.best_checkpoint, str(tmp_path / "registry"), data_root=str(imbalanced_data))
    _check_tracking(tmp_path, result, exported)
    # Export re-chooses the threshold on validation by objective.threshold_rule (lower_bound: the
    # patient-bootstrap lower bound of recall reaches the target), so it is at most the sweep's
    # point threshold, which only asks the point estimate to reach it.
    assert 0 < exported.threshold <= result.threshold + 1e-6
    after = evaluate_artifact(str(tmp_path / "registry"), str(imbalanced_data)).metrics
    assert after["threshold"] == pytest.approx(exported.threshold)


def test_the_score_is_the_mean_of_the_last_epochs_and_the_model_the_last_checkpoint():
    from pneumonia.training.sweep import smoothed, trial_score

    history = [{"epoch": 1, "val_precision_at_recall": 0.9, "checkpoint_path": "c1"},  # an early spike
               {"epoch": 2, "val_precision_at_recall": 0.7, "checkpoint_path": "c2"},
               {"epoch": 3, "val_precision_at_recall": 0.8, "checkpoint_path": "c3"},
               {"epoch": 4, "val_precision_at_recall": 0.75, "checkpoint_path": "c4"}]
    score, row = trial_score(history)
    assert score == pytest.approx(0.75) and row["checkpoint_path"] == "c4"
    assert smoothed([0.5, float("nan")]) == 0.5 and smoothed([]) is None
    assert trial_score([{"epoch": 1, "val_precision_at_recall": 0.5}]) == (None, None)  # no checkpoint


def test_the_untuned_trial_is_the_recipe_with_the_searched_keys_at_its_own_values(tmp_path):
    from pneumonia.training.sweep import untuned_params

    config = _sweep_config(tmp_path, **{"train.learning_rate": 0.002})
    assert untuned_params(config) == {"train.learning_rate": 0.002, "train.normal_class_weight": 1.0}
    with pytest.raises(ConfigError, match="no `tune:` section"):
        untuned_params(config.model_copy(update={"tune": None}))


@pytest.mark.ray
def test_a_sweep_that_cannot_fit_fails_fast_instead_of_waiting(ray_cluster, imbalanced_data, tmp_path):
    from pneumonia.training.sweep import tune

    config = _sweep_config(tmp_path, **{"tune.max_concurrent_trials": 3})  # 3 x (2 x 0.9 + 0.1) CPUs > 4
    with pytest.raises(ConfigError, match="3 concurrent runs .* tune.max_concurrent_trials"):
        tune(config, str(imbalanced_data), progress=lambda _: None)


def test_tunes_table_leads_with_the_objective_and_its_best_epoch():
    """Tune's progress table shows the first reported metrics and calls a trial's last value its
    best: lead with the objective and its running best, which is the epoch results.csv keeps."""
    from pneumonia.training.worker import best_key, objective_first

    metrics = {"loss": 0.4, "accuracy": 0.8, "val_roc_auc": 0.93, "val_precision_at_recall": 0.80, "epoch": 3}
    history = [{"epoch": 1, "val_precision_at_recall": 0.70}, {"epoch": 2, "val_precision_at_recall": 0.86}]
    ordered = objective_first(metrics, history, "val_precision_at_recall")
    assert list(ordered)[:4] == [best_key("val_precision_at_recall"), "val_precision_at_recall", "val_roc_auc", "epoch"]
    assert ordered[best_key("val_precision_at_recall")] == 0.86 and ordered["val_precision_at_recall"] == 0.80
    assert ordered["loss"] == 0.4  # nothing dropped


def _check_tracking(storage: Path, result, exported) -> None:
    """One MLflow parent run for the sweep with a nested run per trial, each with its epochs; the
    export is registered against the best trial's run, whose id metadata.json records."""
    from mlflow.tracking import MlflowClient

    from pneumonia.artifacts.tracking import recorded_in

    uri = f"sqlite:///{storage / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    by_name = {run.info.run_name: run for run in runs}
    parent = by_name["sweep"]
    trials = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id
              and run.data.tags.get("pneumonia.command") == "tune"]
    assert sorted(run.info.run_name for run in trials) == sorted(trial["trial_id"] for trial in result.trials)
    assert {run.info.status for run in trials} == {"FINISHED"} and parent.info.status == "FINISHED"
    for run in trials:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_precision_at_recall")]
        assert steps and steps == sorted(steps) and steps[0] == 1, (run.info.run_name, steps)
        assert "train.learning_rate" in run.data.params
    assert parent.data.metrics["best_objective"] == pytest.approx(result.objective)
    assert {item.path for item in client.list_artifacts(parent.info.run_id)} >= {"results.csv", "learning_curves.png"}

    best_trial = recorded_in(str(Path(result.best_checkpoint).parent))
    assert exported.tracking["run_id"] == best_trial["run_id"]
    metadata = json.loads((Path(exported.artifact) / "metadata.json").read_text())
    assert metadata["tracking"]["run_id"] == best_trial["run_id"]  # needs export_artifact(tracking=...)
    version = client.get_model_version("pneumonia-cnn", exported.tracking["registered_model"]["version"])
    assert version.run_id == best_trial["run_id"] and version.tags["pneumonia.version"] == exported.version
