"""Nothing waits in silence and nothing interrupted is reported as finished (pneumonia.training.supervision)."""

from __future__ import annotations

import time

import pytest

from pneumonia.config import ExperimentConfig, with_overrides
from pneumonia.errors import Interrupted, PneumoniaError


def test_outcome_counts_say_what_finished_stopped_and_never_started():
    from pneumonia.training.supervision import outcome_counts

    assert outcome_counts(["TERMINATED", "INTERRUPTED", "NOT_STARTED", "NOT_STARTED"], "trials") == \
        "1 of 4 trials finished, 1 stopped mid-run, 2 never started"
    assert outcome_counts(["TERMINATED", "ERROR"]) == "2 of 2 finished (1 with an error)"


def test_a_sweep_with_unfinished_trials_is_an_interruption_and_says_how_to_resume():
    from pneumonia.training.supervision import raise_if_interrupted

    raise_if_interrupted({"a": "TERMINATED", "b": "ERROR"}, 2, "sweep s", "trials", "`resume`")  # complete: silent
    with pytest.raises(Interrupted) as caught:
        # the searcher created 2 of 3 trials before Ctrl-C: the third never started either
        raise_if_interrupted({"a": "TERMINATED", "b": "INTERRUPTED"}, 3, "sweep s", "trials", "`pneumonia tune --resume`")
    assert str(caught.value) == ("sweep s interrupted: 1 of 3 trials finished, 1 stopped mid-run, 1 never started; "
                                 "`pneumonia tune --resume` continues it")
    assert caught.value.exit_code == 130


def test_a_trial_whose_workers_wrote_an_epoch_ran_even_when_tunes_saved_state_lags(monkeypatch, tmp_path):
    """Ctrl-C can come after a worker finished an epoch but before Tune received that report: the
    trial's own history says it ran (stopped mid-run, `--resume` continues it), not 'never started'."""
    import json
    from types import SimpleNamespace

    import ray.tune

    from pneumonia.training.supervision import saved_statuses

    trials = [SimpleNamespace(trial_id="done", status="TERMINATED", last_result={"training_iteration": 6}),
              SimpleNamespace(trial_id="reported", status="PENDING", last_result={"training_iteration": 2}),
              SimpleNamespace(trial_id="lagging", status="PENDING", last_result={}),
              SimpleNamespace(trial_id="torn", status="PENDING", last_result={}),
              SimpleNamespace(trial_id="waiting", status="PENDING", last_result={})]
    monkeypatch.setattr(ray.tune, "ExperimentAnalysis", lambda path: SimpleNamespace(trials=trials))
    for trial_id, text in {"lagging": json.dumps([{"epoch": 1}, {"epoch": 2}]), "torn": '[{"epo'}.items():
        (tmp_path / trial_id).mkdir()
        (tmp_path / trial_id / "history.json").write_text(text)

    history_of = lambda trial: str(tmp_path / trial.trial_id / "history.json")  # noqa: E731
    assert saved_statuses("/sweep", history_of) == {
        "done": "TERMINATED", "reported": "INTERRUPTED", "lagging": "INTERRUPTED",
        "torn": "NOT_STARTED", "waiting": "NOT_STARTED"}
    assert saved_statuses("/sweep")["lagging"] == "NOT_STARTED"  # Tune's state alone cannot tell


def test_a_sweep_where_nothing_ran_says_so():
    from pneumonia.training.sweep import summarize_sweep

    class Result:
        def __init__(self, trial_id):
            self.config, self.metrics, self.error = {}, {}, None
            self.metrics_dataframe, self.path = None, f"/sweep/trials/{trial_id}"

    from pneumonia.config import config_from_dict

    config = config_from_dict({"tune": {"space": {"train.learning_rate": {
        "type": "loguniform", "low": 1e-4, "high": 1e-2}}}})
    with pytest.raises(PneumoniaError, match="no trial produced a checkpoint"):
        summarize_sweep([Result("a"), Result("b")], config, "/nowhere", {"a": "NOT_STARTED", "b": "ERROR"})


def test_worker_bundles_are_recognised_by_their_shape():
    from pneumonia.training.supervision import _bundles, _same_shape

    assert _same_shape([{"CPU": 0.9}, {"CPU": 0.9}], [{"CPU": 0.9}] * 2)
    assert not _same_shape([{"CPU": 0.1}], [{"CPU": 0.9}] * 2)  # a Tune trial's own driver
    assert not _same_shape([{"CPU": 0.9, "GPU": 1}] * 2, [{"CPU": 0.9}] * 2)
    assert _bundles([{"CPU": 0.9}, {"CPU": 0.9}, {"CPU": 2.0, "memory": 5}]) == "2 x {CPU: 0.9}, {CPU: 2}"


def test_start_retries_are_bounded_on_a_fixed_cluster(monkeypatch):
    from pneumonia.training import supervision

    config = with_overrides(ExperimentConfig(), {"run.start_retries": 1, "run.resource_timeout_s": 30})
    monkeypatch.setattr(supervision, "has_autoscaler", lambda: False)
    monkeypatch.delenv(supervision.START_TIMEOUT_VARIABLE, raising=False)
    assert supervision.start_settings(config) == 1
    assert float(supervision.os.environ[supervision.START_TIMEOUT_VARIABLE]) > 30  # our watch speaks first
    monkeypatch.setattr(supervision, "has_autoscaler", lambda: True)
    assert supervision.start_settings(config) == -1  # an autoscaler may still bring the nodes


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_starved_run_says_who_holds_the_cpus_then_fails_and_gives_everything_back(
        ray_cluster, synthetic_data, tmp_path, capsys):
    """Another job's placement group holds the CPUs: the run says so within resource_wait_s, stops
    after resource_timeout_s with a non-zero exit, and leaves no placement group or worker behind."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from pneumonia.cli import main

    hog = placement_group([{"CPU": 3.5}], name="hog")
    ray.get(hog.ready(), timeout=60)
    try:
        started = time.monotonic()
        code = main(["train", "--data", str(synthetic_data), "--storage", str(tmp_path / "runs"), "--name", "starved",
                     "--epochs", "1", "--image-size", "32", "--workers", "2",
                     "--set", "scaling.cpus_per_worker=1", "--set", "run.resource_wait_s=3",
                     "--set", "run.resource_timeout_s=8"])
        took = time.monotonic() - started
    finally:
        remove_placement_group(hog)
    err = capsys.readouterr().err
    assert code == 1, err[-3000:]
    assert took < 90, took  # Ray Train alone would retry its start for minutes
    warning = next(line for line in err.splitlines() if line.startswith("warning: run starved has waited"))
    assert "wants 2 x {CPU: 1} (PACK)" in warning and "{CPU: 0.5} of {CPU: 4} free" in warning, warning
    assert "held by: placement group hog (job " in warning and "{CPU: 3.5}" in warning, warning
    assert "giving up after 8 s (run.resource_timeout_s)" in warning, warning
    error = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and error[0].startswith("error: run starved has waited") and "Gave up after 8 s" in error[0], err
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and ray.available_resources().get("CPU") != ray.cluster_resources()["CPU"]:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_starved_sweep_stops_with_the_reason_instead_of_waiting(ray_cluster, synthetic_data, tmp_path):
    """The sweep's trials start (their drivers fit) but their workers never can: the sweep stops
    after resource_timeout_s with the line that says who holds the CPUs, and gives them back."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from pneumonia.config import load_config
    from pneumonia.training.sweep import tune
    from tests.training.test_sweep import ROOT

    config = with_overrides(load_config(ROOT / "tune_configs" / "quick.yaml"), {
        "run.storage": str(tmp_path), "run.name": "starved", "tune.num_samples": 2, "tune.search": "random",
        "train.epochs": 1, "data.image_size": 32, "run.resource_wait_s": 3, "run.resource_timeout_s": 8})
    hog = placement_group([{"CPU": 3.5}], name="hog")
    ray.get(hog.ready(), timeout=60)
    lines: list[str] = []
    try:
        with pytest.raises(PneumoniaError) as caught:
            tune(config, str(synthetic_data), progress=lines.append)
    finally:
        remove_placement_group(hog)
    assert str(caught.value).startswith("sweep starved has waited"), caught.value
    assert "wants 2 x {CPU: 0.9} (PACK)" in str(caught.value) and "placement group hog" in str(caught.value)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and ray.available_resources().get("CPU") != ray.cluster_resources()["CPU"]:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"]
