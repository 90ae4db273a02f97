"""`pneumonia export --data`: the threshold comes from the safe operating point, and metadata says how."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pneumonia.cli import main
from pneumonia.data.preprocess import PreprocessSpec

SPEC = PreprocessSpec(image_size=32)
CONFIG = {
    "model": {"name": "xraynet", "width": 8},
    "data": {"image_size": 32, "val_fraction": 0.3},
    "objective": {"target_recall": 0.9, "threshold_rule": "lower_bound", "confidence": 0.9, "bootstrap_samples": 200},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint folder, dataset root): a tiny untrained xraynet and 160 synthetic 32 px X-rays."""
    from pneumonia.config import ModelConfig
    from pneumonia.data.synth import make_synthetic_dataset
    from pneumonia.models.architectures import build_model, compile_model
    from pneumonia.models.checkpoint import CheckpointInfo, save_checkpoint

    root = tmp_path_factory.mktemp("export")
    make_synthetic_dataset(root / "data", n=160, seed=3, image_size=32)
    model = build_model(ModelConfig(name="xraynet", width=8), SPEC.shape)
    compile_model(model, "adam", 1e-3)
    folder = root / "checkpoint_000001"
    save_checkpoint(folder, model, CheckpointInfo(epoch=1, config=CONFIG, preprocess=SPEC, metrics={}))
    return folder, root / "data"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_export_records_how_the_threshold_was_chosen(setup, tmp_path, capsys):
    from pneumonia.artifacts.registry import load_artifact
    from pneumonia.config import config_from_dict
    from pneumonia.data.pipeline import load_images
    from pneumonia.data.records import carve_validation
    from pneumonia.metrics.binary import safe_operating_point
    from pneumonia.metrics.drift import population_stability

    checkpoint, data = setup
    registry = tmp_path / "registry"
    code, out, err = run(capsys, "export", "--checkpoint", str(checkpoint), "--registry", str(registry),
                         "--data", str(data), "--json")
    assert code == 0, err
    printed = json.loads(out.strip().splitlines()[-1])
    artifact = load_artifact(printed["artifact"])
    metadata = json.loads((artifact.path / "metadata.json").read_text())
    recorded = metadata["validation_metrics"]["operating_point"]
    assert printed["operating_point"] == recorded
    assert recorded["rule"] == "lower_bound" and recorded["confidence"] == 0.9 and recorded["samples"] == 200
    assert recorded["target_recall"] == 0.9 == metadata["target_recall"]
    assert recorded["threshold"] == metadata["threshold"] == artifact.threshold == printed["threshold"]
    assert isinstance(recorded["met"], bool)
    assert metadata["training_data"]["synthetic"] is True  # --data is the synthetic set, marked so
    for name in ("recall", "precision", "specificity"):
        low, high = recorded[f"{name}_ci"]
        assert low <= recorded[name] <= high, name

    # The same choice from the validation split training carved, scored by the artifact.
    _, _, val_part = carve_validation(str(data), config_from_dict(CONFIG))
    validation = load_images(val_part, SPEC)
    probabilities = artifact.predict(validation.images)
    again = safe_operating_point(validation.labels, probabilities, [r.patient_id for r in validation.records],
                                 0.9, confidence=0.9, samples=200, seed=recorded["seed"])
    assert recorded["units"] == again.units == len({r.patient_id for r in validation.records})
    assert recorded["threshold"] == pytest.approx(again.threshold, abs=1e-5)
    assert metadata["validation_metrics"]["recall"] == pytest.approx(recorded["recall"])

    # The validation probabilities are the artifact's drift reference (served ones: the same, up to float noise).
    reference = metadata["drift_reference"]
    assert reference["statistic"] == "psi" and reference["source"] == "validation"
    assert reference["images"] == len(probabilities) and len(reference["fractions"]) == len(reference["edges"]) - 1
    assert population_stability(reference, probabilities) < 0.05

    # The text says the rule and the expected precision with its interval.
    code, out, err = run(capsys, "export", "--checkpoint", str(checkpoint), "--registry", str(registry),
                         "--data", str(data))
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("exported v0002 to ")
    assert "(lower end of the 90% CI of validation recall >= 0.9): expected precision " in lines[1]
    assert f"[{recorded['precision_ci'][0]:.3f}, {recorded['precision_ci'][1]:.3f}]" in lines[1]

    # evaluate --report on that artifact shows the choice.
    code, out, err = run(capsys, "evaluate", "--artifact", str(registry), "--data", str(data),
                         "--report", str(tmp_path / "report"))
    assert code == 0, err
    page = (tmp_path / "report" / "report.html").read_text()
    assert "How the threshold was chosen" in page and "200 resamples" in page
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["threshold_choice"] == recorded
    assert "\ndrift: not measured (" in out and " against validation; a PSI needs at least 200)" in out

    # evaluate --json carries the drift of what it scored (the images the guard passes) against that reference.
    code, out, err = run(capsys, "evaluate", "--artifact", str(registry), "--data", str(data), "--split", "validation",
                         "--json")
    assert code == 0, err
    payload = json.loads(out.strip().splitlines()[-1])
    drift = payload["drift"]
    assert drift["reference"] == "validation" and drift["reference_images"] == len(probabilities)
    assert drift["images"] == len(probabilities) - payload["out_of_distribution"]["count"]
    assert drift["level"] == "too few images" and drift["value"] is None  # a 160-image dataset's carve

    # A checkpoint records no reference: no drift.
    code, out, err = run(capsys, "evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--json")
    assert code == 0, err
    assert "drift" not in json.loads(out.strip().splitlines()[-1])


def test_export_without_data_keeps_the_checkpoints_threshold(setup, tmp_path, capsys):
    from pneumonia.models.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint

    checkpoint, _ = setup
    model, info = load_checkpoint(str(checkpoint))
    recorded = tmp_path / "checkpoint_000002"
    save_checkpoint(recorded, model, CheckpointInfo(epoch=2, config=CONFIG, preprocess=SPEC,
                                                    metrics={"val_threshold": 0.42, "val_recall": 0.93}))
    code, out, err = run(capsys, "export", "--checkpoint", str(recorded), "--registry", str(tmp_path / "r"), "--json")
    assert code == 0, err
    printed = json.loads(out.strip().splitlines()[-1])
    assert printed["threshold"] == 0.42 and printed["operating_point"] is None
    metadata = json.loads((tmp_path / "r" / "pneumonia-cnn" / "v0001" / "metadata.json").read_text())
    assert "operating_point" not in metadata["validation_metrics"]
    assert metadata["drift_reference"] is None  # no validation probabilities without --data
    assert np.isclose(metadata["threshold"], 0.42)


def test_the_artifact_says_it_learned_from_synthetic_images(setup, tmp_path, capsys):
    """The run's manifest names the data the checkpoint was trained on; the synthetic dataset's
    marker makes the artifact say so (and the service then warns in every answer)."""
    from pneumonia.artifacts.registry import SYNTHETIC_WARNING, artifact_warning
    from pneumonia.models.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint

    checkpoint, data = setup
    model, _ = load_checkpoint(str(checkpoint))
    run_dir = tmp_path / "runs" / "train-1"
    trained = run_dir / "checkpoint_000002"
    save_checkpoint(trained, model, CheckpointInfo(epoch=2, config=CONFIG, preprocess=SPEC,
                                                   metrics={"val_threshold": 0.42}))
    (run_dir / "pneumonia_run.json").write_text(json.dumps({"name": "train-1", "data": str(data), "config": CONFIG}))
    code, out, err = run(capsys, "export", "--checkpoint", str(trained), "--registry", str(tmp_path / "r"), "--json")
    assert code == 0, err
    metadata = json.loads((tmp_path / "r" / "pneumonia-cnn" / "v0001" / "metadata.json").read_text())
    facts = metadata["training_data"]
    assert facts["synthetic"] is True and facts["roots"] == [str(data)]
    assert facts["dataset"]["generator"] == "pneumonia.data.synth" and facts["dataset"]["seed"] == 3
    assert artifact_warning(metadata) == SYNTHETIC_WARNING


def test_training_data_is_found_from_every_checkpoint_layout(tmp_path):
    """A training run's checkpoint_*, a sweep trial's trials/<trial>/<ckpt>, an ensemble combined
    from members of other runs, --data alone, and nothing at all."""
    from pneumonia.artifacts.export import training_data
    from pneumonia.data.synth import write_marker

    real, synthetic = tmp_path / "real", tmp_path / "synthetic"
    real.mkdir()
    synthetic.mkdir()
    write_marker(synthetic, n=8, seed=0)

    def manifest(folder, name, data):
        folder.mkdir(parents=True)
        (folder / name).write_text(json.dumps({"data": str(data)}))

    manifest(tmp_path / "runs" / "r1", "pneumonia_run.json", real)
    manifest(tmp_path / "sweeps" / "s1", "pneumonia_sweep.json", synthetic)
    run_checkpoint = str(tmp_path / "runs" / "r1" / "checkpoint_000001")
    trial_checkpoint = str(tmp_path / "sweeps" / "s1" / "trials" / "t0" / "checkpoint_000003")

    assert training_data(run_checkpoint, [], None) == {"synthetic": False, "roots": [str(real)]}
    from_sweep = training_data(trial_checkpoint, [], str(real))  # the manifest wins over --data
    assert from_sweep["synthetic"] is True and from_sweep["roots"] == [str(synthetic)]
    combined = training_data(str(tmp_path / "elsewhere" / "ensemble"), [run_checkpoint, trial_checkpoint], None)
    assert combined["synthetic"] is True and combined["roots"] == [str(real), str(synthetic)]
    assert training_data(str(tmp_path / "loose" / "ckpt"), [], str(real)) == {"synthetic": False, "roots": [str(real)]}
    assert training_data(str(tmp_path / "loose" / "ckpt"), [], None) == {"synthetic": None, "roots": []}


def test_an_unreadable_marker_makes_the_training_data_unknown_not_real(tmp_path):
    from pneumonia.artifacts.export import training_data
    from pneumonia.data.synth import MARKER_FILE

    (tmp_path / MARKER_FILE).write_text("{not json")
    facts = training_data(str(tmp_path / "loose" / "ckpt"), [], str(tmp_path))
    assert facts["synthetic"] is None and facts["roots"] == [str(tmp_path)] and MARKER_FILE in facts["problem"]


def test_export_links_the_version_to_the_training_run_in_its_store(setup, tmp_path, capsys):
    """A checkpoint of a tracked run: export logs a run nested under the training run, in the store the
    manifest names, writes the run ids into metadata.json and registers the version with MLflow."""
    from mlflow.tracking import MlflowClient

    from pneumonia.artifacts.tracking import Tracker, default_uri
    from pneumonia.models.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint

    checkpoint, data = setup
    model, _ = load_checkpoint(str(checkpoint))
    uri = default_uri(str(tmp_path / "runs"))
    training_run = Tracker(uri).start("train-1", "train")
    run_dir = tmp_path / "runs" / "train-1"
    trained = run_dir / "checkpoint_000002"
    save_checkpoint(trained, model, CheckpointInfo(epoch=2, config=CONFIG, preprocess=SPEC,
                                                   metrics={"val_threshold": 0.42}))
    (run_dir / "pneumonia_run.json").write_text(json.dumps({
        "name": "train-1", "data": str(data), "config": CONFIG,
        "tracking": {"tracking_uri": uri, "run_id": training_run, "experiment": "pneumonia"}}))
    code, out, err = run(capsys, "export", "--checkpoint", str(trained), "--registry", str(tmp_path / "r"), "--json")
    assert code == 0, err
    printed = json.loads(out.strip().splitlines()[-1])
    tracking = printed["tracking"]
    assert tracking["tracking_uri"] == uri and tracking["run_id"] == training_run
    assert tracking["registered_model"] == {"name": "pneumonia-cnn", "version": "1"}
    metadata = json.loads((tmp_path / "r" / "pneumonia-cnn" / "v0001" / "metadata.json").read_text())
    assert metadata["tracking"]["run_id"] == training_run  # needs export_artifact(tracking=...)
    assert metadata["tracking"]["export_run_id"] == tracking["export_run_id"]

    client = MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version("pneumonia-cnn", "1")
    assert version.run_id == training_run and version.source.startswith(f"runs:/{training_run}/registry/pneumonia-cnn/v0001")
    assert version.tags["pneumonia.version"] == "v0001" and float(version.tags["threshold"]) == pytest.approx(0.42)
    assert version.tags["sha256.model.keras"] == metadata["files"]["model.keras"]
    export_run = client.get_run(tracking["export_run_id"])
    assert export_run.data.tags["mlflow.parentRunId"] == training_run and export_run.info.status == "FINISHED"
    assert not (tmp_path / "r" / "mlflow.db").exists()  # the training run's store, not a new one

    # --no-tracking: nothing logged, but the training run it came from is still recorded.
    code, out, err = run(capsys, "export", "--checkpoint", str(trained), "--registry", str(tmp_path / "off"),
                         "--no-tracking", "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["tracking"] == {"tracking_uri": uri, "run_id": training_run,
                                                                    "export_run_id": None}
    assert not list(tmp_path.joinpath("off").rglob("mlflow.db"))
    assert len(client.search_model_versions("name='pneumonia-cnn'")) == 1
