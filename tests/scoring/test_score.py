"""`pneumonia score`: batch scoring of an archive with Ray Data, as a user sees it.

The output's rows and columns, per-label counts, corrupt and unreadable files as error rows,
resuming after an interruption, manifests, CSV vs Parquet by extension, one-line errors that come
before Ray starts, the same probabilities as the Serve app, and the RayJob manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

import pneumonia.scoring.run as scoring_run
from pneumonia.artifacts.registry import ArtifactError
from pneumonia.cli.score import cmd_score
from pneumonia.errors import ConfigError, DataError, Interrupted, OutputError, PneumoniaError
from pneumonia.scoring import ScoreResult, score
from pneumonia.scoring.inputs import list_input
from pneumonia.scoring.outputs import default_output, output_schema
from tests.helpers import real_data
from tests.serving.test_serving_ops import _export

COLUMNS = ["path", "sha256", "label", "probability", "threshold", "ood_score", "out_of_distribution", "model", "version", "error"]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    """A registry with one small untrained model (64 px grayscale), exported as `pneumonia export` does."""
    root = tmp_path_factory.mktemp("score") / "registry"
    _export(root, width=8)
    return root


@pytest.fixture
def archive(tmp_path) -> Path:
    """The 16 real full-resolution X-rays in their class folders, a corrupt JPEG and a text file."""
    folder = tmp_path / "archive"
    shutil.copytree(real_data("chest_xray_val16"), folder)
    (folder / "PNEUMONIA" / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / "README.txt").write_text("exported from PACS")
    return folder


def _small_images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"xray{index}.png"
        Image.fromarray(np.full((40, 30), 20 * index % 256, np.uint8)).save(path)
        paths.append(path)
    return paths


def _read(path: Path) -> pa.Table:
    return pacsv.read_csv(path) if path.suffix == ".csv" else pq.read_table(path)


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the command starts (or joins) Ray."""
    def refuse():
        raise AssertionError("Ray was started")

    monkeypatch.setattr("pneumonia.local_ray.init_ray", refuse)


# ----------------------------------------------------------------------------- errors before Ray


def _missing_artifact(tmp_path, registry):
    return dict(artifact=str(tmp_path / "no-registry"), input=str(_small_images(tmp_path / "in", 2)[0].parent))


def _corrupt_artifact(tmp_path, registry):
    copy = tmp_path / "registry"
    shutil.copytree(registry, copy)
    model = next(copy.rglob("saved_model.pb"))
    model.write_bytes(model.read_bytes() + b"x")
    return dict(artifact=str(copy), input=str(_small_images(tmp_path / "in", 2)[0].parent))


def _empty_input(tmp_path, registry):
    (tmp_path / "empty").mkdir()
    return dict(input=str(tmp_path / "empty"))


def _no_images(tmp_path, registry):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "report.txt").write_text("no images here")
    return dict(input=str(tmp_path / "docs"))


def _missing_input(tmp_path, registry):
    return dict(input=str(tmp_path / "nowhere"))


def _manifest_without_path(tmp_path, registry):
    (tmp_path / "worklist.csv").write_text("file,accession\na.jpeg,1\n")
    return dict(input=str(tmp_path / "worklist.csv"))


def _output_under_a_file(tmp_path, registry):
    (tmp_path / "taken").write_text("a file")
    return dict(output=str(tmp_path / "taken" / "scores.parquet"))


def _output_not_writable(tmp_path, registry):
    return dict(output="/proc/scores.parquet")  # not writable even by root


def _output_unknown_format(tmp_path, registry):
    return dict(output=str(tmp_path / "scores.json"))


def _output_is_a_folder(tmp_path, registry):
    (tmp_path / "scores.parquet").mkdir()
    return dict(output=str(tmp_path / "scores.parquet"))


@pytest.mark.parametrize("case,error,message", [
    (_missing_artifact, ArtifactError, "not found"),
    (_corrupt_artifact, ArtifactError, "does not match its sha256"),
    (_empty_input, DataError, "no images to score"),
    (_no_images, DataError, r"no images to score in .*docs \(1 other files ignored\)"),
    (_missing_input, DataError, "not found"),
    (_manifest_without_path, DataError, "has no 'path' column"),
    (_output_under_a_file, OutputError, "cannot write there"),
    (_output_not_writable, OutputError, "cannot write there"),
    (_output_unknown_format, OutputError, "must end in .parquet or .csv"),
    (_output_is_a_folder, OutputError, "is a folder"),
], ids=lambda value: value.__name__.strip("_") if callable(value) and not isinstance(value, type) else None)
def test_bad_input_is_a_one_line_error_before_ray_starts(tmp_path, registry, no_ray, case, error, message):
    arguments = {"artifact": str(registry), "input": str(_small_images(tmp_path / "images", 2)[0].parent),
                 "output": str(tmp_path / "out" / "scores.parquet")}
    arguments.update(case(tmp_path, registry))
    with pytest.raises(error, match=message) as raised:
        score(**arguments, progress=lambda line: None)
    assert isinstance(raised.value, PneumoniaError) and "\n" not in str(raised.value)


def test_default_output_is_in_the_working_directory_named_after_the_input():
    assert default_output("s3://bucket/pacs/2024-06-01/") == str(Path.cwd() / "2024-06-01-scores.parquet")
    assert default_output("lists/worklist.csv") == str(Path.cwd() / "worklist-scores.parquet")


# ----------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_manifest_lists_its_paths_relative_to_itself_once_each(tmp_path, kind):
    images = _small_images(tmp_path / "images", 3)
    paths = ["images/xray0.png", str(images[1]), "images/xray2.png", "images/xray0.png"]
    table = pa.table({"accession": [1, 2, 3, 4], "path": paths})
    manifest = tmp_path / f"worklist.{kind}"
    (pacsv.write_csv if kind == "csv" else pq.write_table)(table, manifest)
    found = list_input(str(manifest))
    assert found.paths == paths[:3]  # as the manifest names them (the output's join key), duplicates once
    assert found.locations == [str(images[0]), str(images[1]), str(images[2])]
    # its other columns travel to the output, one row per path (a duplicate keeps its first row)
    assert found.columns.to_pylist() == [{"accession": i + 1, "path": path} for i, path in enumerate(paths[:3])]


def test_a_manifests_columns_are_carried_beside_the_scores_by_path(tmp_path):
    """A worklist's accession numbers and its own ground-truth ``label`` come out beside the scores,
    the latter as ``manifest_label``; a path an earlier run scored that this worklist does not name
    keeps its row with empty manifest columns."""
    from pneumonia.scoring.outputs import merge, output_schema

    scores = pa.table({"path": ["b.png", "a.png", "old.png"], "sha256": ["0" * 64] * 3,
                       "label": ["PNEUMONIA", "NORMAL", "NORMAL"],
                       "probability": [0.9, 0.1, 0.2], "threshold": [0.5] * 3, "ood_score": [1.0] * 3,
                       "out_of_distribution": [False] * 3, "model": ["m"] * 3, "version": ["v0001"] * 3,
                       "error": [None] * 3}, schema=output_schema())
    worklist = tmp_path / "worklist.csv"
    worklist.write_text("accession,path,label,note,manifest_label\nA-1,a.png,PNEUMONIA,,x\nA-2,b.png,NORMAL,,y\n")
    columns = list_input(str(worklist)).columns
    for kind in ("csv", "parquet"):
        output = tmp_path / f"scores.{kind}"
        assert merge(str(output), [scores], columns) == 3
        table = pacsv.read_csv(output) if kind == "csv" else pq.read_table(output)
        assert table.column_names == COLUMNS + ["accession", "manifest_manifest_label", "note", "manifest_label"]
        rows = {row["path"]: row for row in table.to_pylist()}
        assert (rows["a.png"]["label"], rows["a.png"]["manifest_manifest_label"], rows["a.png"]["accession"],
                rows["a.png"]["manifest_label"]) == ("NORMAL", "PNEUMONIA", "A-1", "x")
        assert rows["b.png"]["accession"] == "A-2" and not rows["old.png"]["accession"]  # CSV reads it as ""


def test_a_folder_is_listed_recursively_images_only(tmp_path):
    _small_images(tmp_path / "export" / "day1", 2)
    (tmp_path / "export" / "day1" / "1.2.840.10008.1").write_bytes(b"DICOM files often have no extension")
    (tmp_path / "export" / "notes.txt").write_text("x")
    (tmp_path / "export" / ".DS_Store").write_bytes(b"x")
    found = list_input(str(tmp_path / "export"))
    assert [Path(path).name for path in found.paths] == ["1.2.840.10008.1", "xray0.png", "xray1.png"]
    assert found.ignored == 1


# ----------------------------------------------------------------------------- resume without Ray


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_rerun_with_everything_scored_skips_it_all_without_starting_ray(tmp_path, registry, no_ray, suffix):
    """Rows of this model version without an error are skipped; other versions' rows are kept."""
    images = [str(path) for path in _small_images(tmp_path / "images", 3)]
    output = tmp_path / f"scores{suffix}"
    rows = [{"path": path, "label": "NORMAL", "probability": 0.1, "threshold": 0.5, "ood_score": None,
             "out_of_distribution": False, "model": "pneumonia-cnn", "version": version, "error": None}
            for path in images for version in ("v0001", "v0000")]
    table = pa.Table.from_pylist(rows, schema=output_schema())
    (pq.write_table if suffix == ".parquet" else pacsv.write_csv)(table, output)
    # The artifact as a URI (file:// here, s3:// on a cluster): copied and verified by the driver.
    result = score(registry.as_uri(), str(tmp_path / "images"), str(output), progress=lambda line: None)
    assert (result.files, result.skipped, result.scored, result.rows) == (3, 3, 0, 6)
    assert not Path(f"{output}.parts").exists()
    assert _read(output).column_names == COLUMNS and _read(output).num_rows == 6


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_an_output_written_before_the_sha256_column_reads_with_it_empty(tmp_path, suffix):
    from pneumonia.scoring.outputs import read_previous

    old = pa.table({"path": ["a.png"], "label": ["NORMAL"], "probability": [0.1], "threshold": [0.5],
                    "ood_score": [None], "out_of_distribution": [False], "model": ["m"], "version": ["v0001"],
                    "error": [None]})
    output = tmp_path / f"scores{suffix}"
    (pq.write_table if suffix == ".parquet" else pacsv.write_csv)(old, output)
    (table,) = read_previous(str(output), progress=lambda line: None)
    assert table.column_names == COLUMNS
    assert table.to_pylist()[0]["sha256"] is None and table.to_pylist()[0]["label"] == "NORMAL"


def _with_drift_reference(registry: Path, folder: Path, reference: dict) -> Path:
    """A copy of ``registry`` whose version records ``reference`` as its drift reference (as
    `pneumonia export --data` and `pneumonia calibrate` do; metadata.json is not in the file hashes)."""
    copy = folder / "registry"
    shutil.copytree(registry, copy)
    metadata_file = next(copy.rglob("metadata.json"))
    metadata_file.write_text(json.dumps({**json.loads(metadata_file.read_text()), "drift_reference": reference}))
    return copy


def test_the_drift_of_what_was_scored_against_the_artifacts_reference(tmp_path, registry, no_ray):
    """The input's images this model version classified (earlier runs' rows included; other versions'
    rows and what the guard flagged left out) against the artifact's reference: in the summary and the JSON."""
    from pneumonia.metrics.drift import reference_distribution

    rng = np.random.default_rng(0)
    reference = reference_distribution(rng.uniform(0, 0.2, 500), "validation")  # a mostly healthy validation split
    artifact = _with_drift_reference(registry, tmp_path, reference)
    images = [str(path) for path in _small_images(tmp_path / "images", 260)]
    rows = [{"path": path, "label": "PNEUMONIA", "probability": float(rng.uniform(0.5, 1)), "threshold": 0.5,
             "ood_score": None, "out_of_distribution": index >= 250, "model": "pneumonia-cnn", "version": "v0001",
             "error": None} for index, path in enumerate(images)]
    rows += [{**row, "probability": 0.1, "out_of_distribution": False, "version": "v0000"} for row in rows]
    output = tmp_path / "scores.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=output_schema()), output)

    result = score(str(artifact), str(tmp_path / "images"), str(output), progress=lambda line: None)
    assert (result.skipped, result.scored) == (260, 0)
    drift = result.drift
    assert drift["images"] == 250 and drift["reference"] == "validation" and drift["reference_images"] == 500
    assert drift["level"] == "recalibrate" and drift["value"] > drift["recalibrate_at"]
    assert json.loads(json.dumps(result.to_json()))["drift"] == drift
    assert result.summary().splitlines()[-1].startswith("drift: PSI ")
    assert "against validation (250 images): recalibrate" in result.summary()

    unmeasured = score(str(registry), str(tmp_path / "images"), str(output), progress=lambda line: None)
    assert unmeasured.drift["level"] == "no reference" and unmeasured.drift["images"] == 250


def test_a_malformed_drift_reference_fails_before_anything_is_scored(tmp_path, registry, no_ray):
    artifact = _with_drift_reference(registry, tmp_path, {"statistic": "psi", "edges": [0, 1], "fractions": [2]})
    with pytest.raises(ArtifactError, match="drift reference needs 1 non-negative fractions"):
        score(str(artifact), str(_small_images(tmp_path / "images", 2)[0].parent), str(tmp_path / "scores.parquet"),
              progress=lambda line: None)


# ----------------------------------------------------------------------------- Ray runs


def _serve(registry: Path) -> dict[str, object]:
    """What the Serve app's model core answers for each real X-ray sent alone: ServedModel.decode
    (decode_image), then one pass through the artifact's signature: a Scored (or the decode error)."""
    from pneumonia.artifacts.registry import resolve_artifact
    from pneumonia.serving import ServedModel

    model = ServedModel(str(resolve_artifact(registry)))

    def one(data: bytes):
        image = model.decode(data)
        return image if isinstance(image, Exception) else model.score(image[None])[0][0]

    return {path.name: one(path.read_bytes()) for path in sorted(real_data("chest_xray_val16").rglob("*.jpeg"))}


@pytest.fixture(scope="module")
def served(registry) -> dict[str, float]:
    return {name: getattr(answer, "probability", answer) for name, answer in _serve(registry).items()}


@pytest.fixture(scope="module")
def guarded_registry(registry, tmp_path_factory) -> Path:
    """The same model exported with an out-of-distribution guard (policy ``flag``) whose threshold
    passes half of the real X-rays, so that both kinds of answer occur."""
    from pneumonia.artifacts.publish import export_artifact
    from pneumonia.config import ExperimentConfig
    from pneumonia.data.preprocess import PreprocessSpec, decode_image
    from pneumonia.models.checkpoint import load_model_from_directory
    from pneumonia.models.ood import features_and_probabilities, fit_guard, model_with_features

    checkpoint = registry.parent / "ckpt-8"  # where tests.serving.test_serving_ops._export saved it
    files = sorted(real_data("chest_xray_val16").rglob("*.jpeg"))
    images = np.stack([decode_image(path.read_bytes(), PreprocessSpec(64, 1)) for path in files])
    features, _ = features_and_probabilities(model_with_features(load_model_from_directory(checkpoint)), images)
    labels = np.array([int(path.parent.name == "PNEUMONIA") for path in files])
    guard = fit_guard(features, labels, features)
    guard.threshold = float(np.median(guard.scores(features)))
    root = tmp_path_factory.mktemp("guarded") / "registry"
    export_artifact(str(checkpoint), root, threshold=0.5, target_recall=0.95, validation_metrics={},
                    training_config=ExperimentConfig().model_dump(), guard=guard, ood_policy="flag")
    return root


@pytest.mark.ray
def test_an_archive_is_scored_with_the_same_answers_as_serving(ray_cluster, guarded_registry, archive, tmp_path):
    output = tmp_path / "scores.parquet"
    lines: list[str] = []
    # Batches of one, like lone requests: a forward pass over a different batch can move the last
    # bit of a float32 result (serving's dynamic batches do the same); see the next test.
    result = score(str(guarded_registry), str(archive), str(output), batch_size=1, concurrency=1,
                   progress=lines.append)

    table = _read(output)
    assert table.column_names == COLUMNS
    assert table.num_rows == 17 and result.rows == 17  # 16 X-rays and the corrupt file; not README.txt
    by_name = {Path(row["path"]).name: row for row in table.to_pylist()}
    broken = by_name.pop("broken.jpeg")
    assert broken["error"] and broken["label"] is None and broken["probability"] is None
    assert all(row["error"] is None and row["model"] == "pneumonia-cnn" and row["version"] == "v0001"
               and row["threshold"] == 0.5 for row in by_name.values())
    # every row names the bytes it scored, the corrupt file's too (it was read, not decoded)
    assert all(row["sha256"] == hashlib.sha256(Path(row["path"]).read_bytes()).hexdigest()
               for row in [*by_name.values(), broken])

    served = _serve(guarded_registry)
    assert {name: row["probability"] for name, row in by_name.items()} == {
        name: answer.probability for name, answer in served.items()}  # identical, not close
    assert {name: row["ood_score"] for name, row in by_name.items()} == {
        name: answer.ood_score for name, answer in served.items()}
    refused = {name for name, answer in served.items() if answer.out_of_distribution}
    assert 0 < len(refused) < 16  # the guard's threshold passes half of them
    assert {name for name, row in by_name.items() if row["out_of_distribution"]} == refused
    labels = {name: None if name in refused else ("PNEUMONIA" if answer.probability >= 0.5 else "NORMAL")
              for name, answer in served.items()}
    assert {name: row["label"] for name, row in by_name.items()} == labels  # no label where serving gives none

    expected = Counter(label for label in labels.values() if label)
    assert result.counts == {"NORMAL": expected["NORMAL"], "PNEUMONIA": expected["PNEUMONIA"]}
    assert (result.files, result.scored, result.failed, result.skipped, result.ignored) == (17, 17, 1, 0, 1)
    assert result.out_of_distribution == len(refused)
    # Drift over the images classified (not the flagged ones); this artifact records no reference.
    assert result.drift["images"] == 16 - len(refused) and result.drift["level"] == "no reference"
    assert result.images_per_s > 0 and result.wall_s >= result.pipeline_s > 0
    assert "failed 1" in result.summary() and str(output) in result.summary()
    assert lines and "scoring 17 files" in lines[0]
    assert not Path(f"{output}.parts").exists()


@pytest.mark.ray
def test_an_interrupted_run_keeps_its_finished_blocks_and_the_rerun_skips_them(
        ray_cluster, registry, served, archive, tmp_path, monkeypatch):
    output = tmp_path / "scores.parquet"
    parts = Path(f"{output}.parts")
    write_part = scoring_run.write_part

    def write_then_stop(*args):
        write_part(*args)
        raise KeyboardInterrupt  # Ctrl-C right after the first block is written

    monkeypatch.setattr(scoring_run, "write_part", write_then_stop)
    with pytest.raises(Interrupted, match="the same command continues"):
        score(str(registry), str(archive), str(output), batch_size=2, concurrency=1, progress=lambda line: None)
    assert not output.exists()
    (first,) = parts.glob("part-*.parquet")
    kept = pq.read_table(first).to_pylist()
    assert 0 < len(kept) < 17

    monkeypatch.setattr(scoring_run, "write_part", write_part)
    result = score(str(registry), str(archive), str(output), batch_size=2, concurrency=1, progress=lambda line: None)
    done = [row for row in kept if row["error"] is None]  # failed files are tried again
    assert result.skipped == len(done) and result.scored == 17 - len(done)
    rows = _read(output).to_pylist()
    assert len(rows) == 17 and len({row["path"] for row in rows}) == 17
    assert all(row in rows for row in done)  # the first run's rows, unchanged
    assert not parts.exists()
    assert all(row["ood_score"] is None and row["out_of_distribution"] is False for row in rows if not row["error"])
    scored = {Path(row["path"]).name: row["probability"] for row in rows if row["error"] is None}
    assert scored.keys() == served.keys()
    np.testing.assert_allclose([scored[name] for name in served], list(served.values()), rtol=0, atol=1e-6)


@pytest.mark.ray
def test_a_csv_manifest_scored_through_the_command_into_a_csv_uri(ray_cluster, registry, tmp_path, capsys,
                                                                   monkeypatch):
    """A worklist with relative paths and a file that is missing; CSV out by extension, to a
    file:// URI (the object-store code path); --json prints one JSON line last."""
    import pneumonia.cli.common

    monkeypatch.setattr(pneumonia.cli.common, "KEEP_RAY", True)  # the session's Ray stays up
    xrays = sorted(real_data("chest_xray_val16").rglob("*.jpeg"))[:3]
    for xray in xrays:
        shutil.copy(xray, tmp_path / xray.name)
    (tmp_path / "worklist.csv").write_text(
        "path,accession\n" + "".join(f"{x.name},ACC{i}\n" for i, x in enumerate(xrays)) + "missing.jpeg,ACC9\n")
    output = tmp_path / "out" / "worklist.csv"
    args = _parser().parse_args(["score", "--artifact", str(registry), "--input", str(tmp_path / "worklist.csv"),
                                 "--output", output.as_uri(), "--concurrency", "1", "--json"])
    args.func(args)

    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (payload["scored"], payload["failed"], payload["rows"]) == (4, 1, 4)
    assert payload["drift"]["images"] == 3 and payload["drift"]["value"] is None
    assert payload["output"] == output.as_uri() and payload["images_per_s"] > 0
    table = _read(output)
    assert table.column_names == [*COLUMNS, "accession"]  # the worklist's own column, carried
    rows = {row["path"]: row for row in table.to_pylist()}
    assert set(rows) == {x.name for x in xrays} | {"missing.jpeg"}  # as the manifest names them
    assert [rows[x.name]["accession"] for x in xrays] == ["ACC0", "ACC1", "ACC2"]
    assert rows["missing.jpeg"]["error"].startswith("cannot read") and not rows["missing.jpeg"]["sha256"]  # CSV: ""
    assert all(rows[x.name]["label"] in ("NORMAL", "PNEUMONIA") for x in xrays)


# ----------------------------------------------------------------------------- command line and cluster


def _parser() -> argparse.ArgumentParser:
    from pneumonia.cli import build_parser

    return build_parser()


def test_score_flags_parse_and_bad_values_are_usage_errors(capsys):
    args = _parser().parse_args(["score", "--artifact", "r", "--input", "i", "--gpu", "--batch-size", "16"])
    assert (args.func, args.gpu, args.batch_size, args.concurrency, args.output) == (cmd_score, True, 16, None, None)
    for bad in (["--batch-size", "0"], ["--concurrency", "two"]):
        with pytest.raises(SystemExit) as exit_:
            _parser().parse_args(["score", "--artifact", "r", "--input", "i", *bad])
        assert exit_.value.code == 2


def test_the_rayjob_manifest_is_valid_like_the_other_rayjobs(monkeypatch):
    """The checks tests/integration/test_cluster.py runs on rayjob-train and rayjob-tune, on rayjob-score."""
    from tests.integration import test_cluster

    monkeypatch.setitem(test_cluster.MANIFESTS, "rayjob-score", ("RayJob", test_cluster.KUBERAY / "rayjob-score.yaml"))
    test_cluster.test_manifest_parses_with_the_right_api_version_and_kind("rayjob-score")
    test_cluster.test_every_ray_pod_runs_the_project_image_of_the_pinned_ray("rayjob-score")
    test_cluster.test_rayjobs_run_on_the_raycluster_spec("rayjob-score")
    test_cluster.test_rayjob_runtime_env_does_not_clash_with_the_drivers("rayjob-score")

    args = test_cluster.parse_entrypoint(test_cluster.manifest("rayjob-score")["spec"]["entrypoint"])
    assert args.command == "score" and args.func is cmd_score
    for location in (args.artifact, args.input, args.output):
        assert location.startswith("s3://"), "every pod must reach the artifact, the images and the output"
    assert args.gpu, "the job should score on the GPU workers"
    _, gpus, max_nodes = test_cluster._gpu_capacity("kuberay")
    assert args.concurrency <= gpus * max_nodes, "more GPU actors than the GPU group scales to"


def test_the_result_reads_as_a_summary_and_as_json():
    result = ScoreResult(output="out.parquet", model="m", version="v0002", files=10, scored=8, skipped=2,
                         failed=1, counts={"NORMAL": 3, "PNEUMONIA": 4}, rows=10, wall_s=5.0, pipeline_s=4.0,
                         startup_s=2.0)
    assert json.loads(json.dumps(result.to_json()))["images_per_s"] == 2.0
    text = result.summary()
    assert "NORMAL 3, PNEUMONIA 4, failed 1; 2 already scored, skipped" in text
    assert "2.0 images/s over 4.0 s (first results after 2.0 s" in text


@pytest.mark.parametrize("gpus, concurrency, advice", [
    (0, 1, "1 GPU actors, but the cluster has 0 GPUs (drop --gpu, or set RAY_ADDRESS to a cluster with GPU nodes)"),
    (1, 2, "2 GPU actors, but the cluster has 1 GPUs (lower --concurrency)")])
def test_gpu_scoring_on_a_cluster_without_enough_gpus_says_what_to_change(monkeypatch, gpus, concurrency, advice):
    import ray

    from pneumonia.scoring.run import _check_resources

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a fixed local cluster: fail, do not wait
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": float(gpus)})
    with pytest.raises(ConfigError) as raised:
        _check_resources(gpu=True, concurrency=concurrency)
    assert str(raised.value) == f"not enough resources: {advice}"


def test_a_synthetic_trained_models_summary_says_so_and_why_it_refuses():
    """Issue 24: its guard refuses real X-rays; the summary (and --json) say why and the way out."""
    from pneumonia.artifacts.registry import SYNTHETIC_REFUSAL, SYNTHETIC_WARNING

    result = ScoreResult(output="out.parquet", model="m", version="v0001", files=3, scored=3, skipped=0, failed=0,
                         counts={"NORMAL": 1, "PNEUMONIA": 0}, out_of_distribution=2, warning=SYNTHETIC_WARNING,
                         refusal_hint=SYNTHETIC_REFUSAL)
    text = result.summary()
    assert f"does not look like a pediatric chest X-ray; {SYNTHETIC_REFUSAL}" in text
    assert "pneumonia demo --data DIR" in text and text.splitlines()[-1] == f"warning: this model was {SYNTHETIC_WARNING}"
    assert result.to_json()["warning"] == SYNTHETIC_WARNING
    plain = ScoreResult(output="o.parquet", model="m", version="v1", files=1, scored=1, skipped=0, failed=0,
                        out_of_distribution=1)
    assert "synthetic" not in plain.summary() and "warning" not in plain.summary()


@pytest.mark.ray
def test_the_score_command_piped_prints_its_summary_without_ray_datas_info_lines_or_colours(registry, tmp_path):
    """Issue 24: into a pipe or a log file, `pneumonia score` prints its own lines, Ray's warnings
    and errors, and no Ray Data INFO lines (dataset start, progress, finish) nor terminal colour codes."""
    import os
    import subprocess
    import sys

    images = _small_images(tmp_path / "in", 3)[0].parent
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_COLOR_PREFIX", "NO_COLOR")}
    completed = subprocess.run(
        [sys.executable, "-m", "pneumonia", "score", "--artifact", str(registry), "--input", str(images),
         "--output", str(tmp_path / "scores.csv"), "--concurrency", "1"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert "\x1b[" not in output
    assert "\tINFO " not in output and "Running Dataset" not in output and "Progress will be logged" not in output, output
    lines = completed.stdout.splitlines()
    first = next(index for index, line in enumerate(lines) if line.startswith("scored 3 of 3 files"))
    assert lines[first + 1].endswith(" s") and lines[first + 2].startswith("output: "), lines  # the summary, whole
