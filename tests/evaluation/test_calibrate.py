"""Site calibration: a site whose healthy children score higher gets a higher threshold that keeps
recall, an undersized sample is refused in one line, and the calibrated version is a new,
hash-verified version that serves and says which site it was calibrated for.

The model here is made to order: its probability is a fixed function of an image's mean
brightness, so a synthetic site is a list of grey PNGs whose brightness gives each child the
score the scenario needs, and "the rest of the site" can be drawn by the thousand as scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumonia.artifacts.publish import export_artifact
from pneumonia.artifacts.registry import calibration_of, list_versions, load_artifact
from pneumonia.data.preprocess import PreprocessSpec
from pneumonia.evaluation.acceptance import write_acceptance_report
from pneumonia.evaluation.calibrate import SampleTooSmall, calibrate, sick_patients_needed

SPEC = PreprocessSpec(image_size=16)
SLOPE = 12.0  # probability = sigmoid(SLOPE * (brightness - 0.5)), brightness in [0, 1]
SHIPPED = 0.2  # a conservative threshold chosen on "our" validation, where healthy children scored low
# The site: sick children score high, healthy ones higher than on our validation.
SICK, HEALTHY = (0.72, 0.08), (0.45, 0.08)  # brightness mean and SD


def _probability(brightness):
    return 1 / (1 + np.exp(-SLOPE * (np.asarray(brightness, dtype=np.float64) - 0.5)))


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    """A registry with one export of the brightness model at the shipped threshold."""
    import tensorflow as tf

    from pneumonia.models.checkpoint import CheckpointInfo, save_checkpoint

    model = tf.keras.Sequential([tf.keras.Input(SPEC.shape), tf.keras.layers.GlobalAveragePooling2D(),
                                 tf.keras.layers.Dense(1, activation="sigmoid")])
    model.layers[-1].set_weights([np.full((1, 1), SLOPE / 255, np.float32), np.array([-SLOPE / 2], np.float32)])
    folder = tmp_path_factory.mktemp("checkpoint") / "checkpoint_000001"
    save_checkpoint(folder, model, CheckpointInfo(epoch=1, config={}, preprocess=SPEC, metrics={}))
    root = tmp_path_factory.mktemp("registry")
    export_artifact(str(folder), root, threshold=SHIPPED, target_recall=0.95,
                    validation_metrics={"precision": 0.99, "recall": 0.97, "specificity": 0.98, "roc_auc": 0.998},
                    training_config={}, drift_reference=None)
    return root


def _exported(registry: Path) -> str:
    """The exported version (tests also publish calibrated versions after it)."""
    return str(registry / "pneumonia-cnn" / "v0001")


def _site(folder: Path, sick: int, healthy: int, seed: int = 0) -> Path:
    """A class-folder sample: one image per patient, brightness drawn from the site's distributions."""
    rng = np.random.default_rng(seed)
    for label, count, (mean, sd) in (("PNEUMONIA", sick, SICK), ("NORMAL", healthy, HEALTHY)):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for index, value in enumerate(np.clip(rng.normal(mean, sd, count), 0, 1)):
            name = f"person{index}_bacteria_{index}.png" if label == "PNEUMONIA" else f"IM-{index:04d}-0001.png"
            Image.fromarray(np.full((16, 16), round(value * 255), np.uint8)).save(folder / label / name)
    return folder


def _rest_of_site(threshold: float, n: int = 20_000, seed: int = 99) -> dict[str, float]:
    """Recall and precision at ``threshold`` on many more children of the same site (scores only)."""
    rng = np.random.default_rng(seed)
    sick = _probability(np.round(np.clip(rng.normal(*SICK, n), 0, 1) * 255) / 255) >= threshold
    healthy = _probability(np.round(np.clip(rng.normal(*HEALTHY, n), 0, 1) * 255) / 255) >= threshold
    return {"recall": sick.mean(), "precision": sick.sum() / (sick.sum() + healthy.sum())}


def test_the_fewest_sick_patients_that_can_vouch_for_the_target():
    # All n found: the exact lower bound of recall is 0.025 ** (1 / n), which reaches 0.95 from n = 72 on.
    assert sick_patients_needed(0.95, 0.95) == 72
    assert 0.025 ** (1 / 72) >= 0.95 > 0.025 ** (1 / 71)
    assert sick_patients_needed(0.9, 0.95) < 72 < sick_patients_needed(0.95, 0.99)


def test_a_site_whose_healthy_children_score_higher_gets_a_higher_threshold_that_keeps_recall(registry, tmp_path):
    sample = _site(tmp_path / "site", sick=125, healthy=75)
    result = calibrate(_exported(registry), str(sample), "St Elsewhere")
    result.report = str(write_acceptance_report(tmp_path / "acceptance", result))

    assert result.passed and result.published is not None
    assert result.point.threshold > SHIPPED + 0.2  # the site's healthy children push it up
    shipped, site = _rest_of_site(SHIPPED), _rest_of_site(result.point.threshold)
    assert site["recall"] >= 0.95  # on children the sample never saw
    assert site["precision"] > shipped["precision"] + 0.1
    # What the sample showed, side by side, with intervals around the measured values.
    assert result.at_site.values["precision"] > result.at_shipped.values["precision"]
    low, high = result.at_site.intervals["recall"]
    assert low <= result.at_site.values["recall"] <= high and low >= 0.95
    page = Path(result.report).read_text()
    assert "PASS" in page and "St Elsewhere" in page and result.published.version in page
    report = json.loads((tmp_path / "acceptance" / "acceptance.json").read_text())
    assert report["passed"] and report["site_sample"]["images"] == {"NORMAL": 75, "PNEUMONIA": 125}


def test_the_calibrated_version_is_the_same_model_with_the_sites_threshold(registry, tmp_path):
    from pneumonia.serving.model import ServedModel

    sample = _site(tmp_path / "site", sick=110, healthy=60, seed=1)
    before = list_versions(registry)
    result = calibrate(_exported(registry), str(sample), "north-ward")
    versions = list_versions(registry)
    assert len(versions) == len(before) + 1 and (registry / "pneumonia-cnn" / "LATEST").read_text().strip() == result.published.version
    source, calibrated = before[0].metadata, result.published.metadata
    assert calibrated["files"] == source["files"]  # byte for byte, verified on load
    assert calibrated["threshold"] == pytest.approx(result.point.threshold) != source["threshold"]
    assert calibrated["calibrated_from"]["version"] == source["version"]
    site = calibrated["site"]
    assert site["name"] == "north-ward" and site["images"] == {"NORMAL": 60, "PNEUMONIA": 110}
    assert site["patients"] == {"NORMAL": 60, "PNEUMONIA": 110} and site["sample_fingerprint"].startswith("sha256:")
    assert site["metrics"]["shipped_threshold"]["threshold"] == pytest.approx(SHIPPED)
    assert site["out_of_distribution"]["rate"] == 0 and site["operating_point"]["rule"] == "lower_bound"
    assert calibrated["drift_reference"]["source"] == "site north-ward"
    assert load_artifact(result.published.path).threshold == pytest.approx(result.point.threshold)

    served = ServedModel(str(registry))  # LATEST: the calibrated version
    from pneumonia.models.ood import Scored

    answer = served.answer(Scored(0.9, None, None))
    assert answer["calibration"] == {"site": "north-ward", "images": 170} and answer["version"] == result.published.version
    assert served.card()["site"]["name"] == "north-ward"
    assert calibration_of(source) == {"site": None}  # the exported version: the shipped threshold


def test_an_undersized_sample_is_refused_in_one_line_and_nothing_is_published(registry, tmp_path, capsys):
    from pneumonia.cli import main

    sample = _site(tmp_path / "site", sick=20, healthy=10)
    before = list_versions(registry)
    code = main(["calibrate", "--artifact", str(registry), "--data", str(sample), "--site", "tiny", "--json"])
    error = capsys.readouterr().err.strip()
    assert code == 1 and len(error.splitlines()) == 1
    assert "20 PNEUMONIA and 10 NORMAL patients" in error and "add 52 more PNEUMONIA patients and 20 more NORMAL" in error
    assert len(list_versions(registry)) == len(before)
    with pytest.raises(SampleTooSmall):
        calibrate(str(registry), str(sample), "tiny", publish=False)


def test_a_missed_precision_criterion_publishes_nothing_but_writes_the_failing_report(registry, tmp_path, capsys):
    from pneumonia.cli import main

    sample = _site(tmp_path / "site", sick=100, healthy=60, seed=2)
    before = list_versions(registry)
    code = main(["calibrate", "--artifact", _exported(registry), "--data", str(sample), "--site", "strict",
                 "--min-precision", "0.99", "--report", str(tmp_path / "report"), "--json"])
    captured = capsys.readouterr()
    payload = json.loads(captured.out.strip().splitlines()[-1])
    assert code == 1 and not payload["passed"] and payload["artifact"] is None
    assert "fails acceptance: precision >= 0.99" in captured.err
    assert len(list_versions(registry)) == len(before)
    assert "FAIL" in (tmp_path / "report" / "acceptance.html").read_text()


def test_a_manifest_with_labels_and_patients_is_a_sample(registry, tmp_path):
    sample = _site(tmp_path / "site", sick=90, healthy=40, seed=3)
    rows = ["path,label,patient"]
    for image in sorted(sample.rglob("*.png")):
        label = "1" if image.parent.name == "PNEUMONIA" else "normal"
        rows.append(f"{image.relative_to(sample)},{label},{image.parent.name[0]}{image.stem}")
    (sample / "labels.csv").write_text("\n".join(rows) + "\n")
    result = calibrate(_exported(registry), str(sample / "labels.csv"), "from-pacs", publish=False)
    assert result.scored_images == 130 and result.published is None
    assert result.site_block()["patients"] == {"NORMAL": 40, "PNEUMONIA": 90}


@pytest.mark.parametrize("rows, message", [
    (["path,label", "a.png,maybe"], "row 2 has label 'maybe'"),
    (["file,label", "a.png,1"], "has no 'path' column"),
    (["path,label", "a.png,1", "a.png,0"], "a.png is listed twice"),
])
def test_a_bad_manifest_says_which_row(tmp_path, rows, message):
    from pneumonia.data.labelled import labelled_sample
    from pneumonia.errors import DataError

    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=message):
        labelled_sample(str(tmp_path / "labels.csv"))


def test_bad_site_names_and_targets_are_refused_before_any_work(registry, tmp_path, capsys):
    from pneumonia.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "--artifact", str(registry), "--data", str(tmp_path), "--site", "../x"])
    assert exit_info.value.code == 2 and "site name '../x' must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", "--artifact", str(registry), "--data", str(tmp_path), "--site", "a", "--target-recall", "1"])


def test_a_sample_the_guard_mostly_refuses_is_refused_for_that_reason(registry, tmp_path, monkeypatch):
    """Real X-rays sent to a model trained on synthetic ones: the guard refuses nearly all of them,
    and the refusal names that cause, not the sample's size."""
    from pneumonia.evaluation import calibrate as module
    from pneumonia.models.ood import Scored

    guard = {"threshold": 1.0, "policy": "reject"}
    monkeypatch.setattr(module, "judge", lambda probabilities, scores, _: [
        Scored(float(p), 5.0 if index % 4 else 0.5, guard) for index, p in enumerate(probabilities)])
    sample = _site(tmp_path / "site", sick=100, healthy=60, seed=4)
    with pytest.raises(SampleTooSmall, match="did not classify 120 of 160 images .* unlike the X-rays pneumonia-cnn v0001"):
        calibrate(_exported(registry), str(sample), "elsewhere")


def test_a_published_calibration_is_tracked_and_registered_with_its_site(registry, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from pneumonia.cli import main

    sample = _site(tmp_path / "site", sick=110, healthy=60, seed=4)
    code = main(["calibrate", "--artifact", _exported(registry), "--data", str(sample), "--site", "east-wing", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    payload = json.loads(captured.out.strip().splitlines()[-1])
    tracking = payload["tracking"]
    uri = f"sqlite:///{registry / 'mlflow.db'}"  # the source records no store: the registry's own
    assert tracking["tracking_uri"] == uri
    client = MlflowClient(uri, registry_uri=uri)
    run = client.get_run(tracking["run_id"])
    assert run.data.params["site"] == "east-wing" and run.data.metrics["threshold"] == pytest.approx(payload["threshold"])
    version = client.get_model_version("pneumonia-cnn", tracking["registered_model"]["version"])
    assert version.run_id == tracking["run_id"] and version.tags["site"] == "east-wing"
    assert version.tags["pneumonia.version"] == payload["version"]
    assert version.tags["pneumonia.calibrated_from"] == "v0001"
