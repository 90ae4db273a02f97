"""`pneumonia demo`: the whole platform in minutes on a local Ray, on synthetic X-rays or (``--data``) real ones.

Data -> an untuned baseline and a Ray Tune sweep of the same recipe -> the winner exported ->
baseline and tuned compared on a held-out split at the same target recall -> a report -> a live
service answering a few requests. The baseline is the sweep's first trial, the recipe with the
searched values at the config's own (pneumonia.training.sweep, ``untuned_first``): same epochs,
validation carve and selection rule, so the comparison is about tuning alone. With ``--json`` the
last line is one JSON object.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pneumonia.artifacts.tracking import ENV_URI
from pneumonia.cli.common import emit, require_folder, require_output_folder, shutdown_ray
from pneumonia.config import load_config, with_overrides
from pneumonia.data.labels import CLASS_NAMES
from pneumonia.data.records import discover, split_by_patient, training_records
from pneumonia.data.synth import MARKER_FILE, make_synthetic_dataset
from pneumonia.errors import PneumoniaError
from pneumonia.local_ray import free_port
from pneumonia.serving import local_service
from pneumonia.serving.client import format_predictions, predict_files
from pneumonia.training.sweep import score_rule, tune

SYNTHETIC = {"image_size": 128, "confusable_fraction": 0.4, "confusable_strength": 1.0,
             "split_fractions": (0.7, 0.0, 0.3)}
"""The demo's synthetic task: 40% of the healthy children show infiltrate-like shadows
(pneumonia.data.synth), so what precision at 95% recall costs depends on the NORMAL class weight;
30% of the images are the test split (validation is carved out of train), so the comparison of
baseline and tuned is not decided by a handful of NORMAL test images."""
HOLDOUT_FRACTION = 0.15
"""Of a train-only ``--data`` folder, the patients held out (before any training) to compare on."""
HOLDOUT_MARKER = ".demo_holdout.json"


def _sweep_config_file(name: str) -> Path:
    """tune_configs/<name> of the checkout the demo runs in (or of this package's checkout)."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = base / "tune_configs" / name
        if candidate.is_file():
            return candidate
    raise PneumoniaError(f"tune_configs/{name} not found: run the demo from the repository root")


def synthetic_data(out: Path, n: int, seed: int, **task: Any) -> tuple[Path, str]:
    """(data root, what it is): the demo's synthetic dataset in ``out/data``, made once per seed
    (``task``: make_synthetic_dataset arguments over SYNTHETIC's)."""
    data = out / "data"
    settings = {"n": n, "seed": seed, **SYNTHETIC, **task}
    if data.exists() and any(data.iterdir()):
        marker = data / MARKER_FILE
        written = json.loads(marker.read_text()) if marker.is_file() else {}
        if any(written.get(key) != json.loads(json.dumps(value)) for key, value in settings.items()):
            raise PneumoniaError(f"{data} holds another dataset than --n {n} --seed {seed} asks for: "
                                 "choose another --out (or remove that folder)")
        return data, f"the synthetic dataset already in {data}"
    summary = make_synthetic_dataset(data, **settings)
    return data, f"{summary.total()} synthetic X-rays written to {data}"


def real_data(source: str, out: Path, seed: int) -> tuple[Path, str, str]:
    """(data root, what it is, the comparison split in words) for ``--data``.

    A folder with a test/ split is used as it is. A train-only one gets a patient-grouped
    HOLDOUT_FRACTION of its train images held out as test/ (files copied into ``out/real_data``)
    before anything trains, so neither the baseline nor the sweep ever sees them."""
    dataset = discover(source)
    if "test" in dataset.splits:
        return Path(source), f"the X-rays in {source}", f"the test split of {source}"
    records = training_records(dataset)
    kept, held = split_by_patient(records, HOLDOUT_FRACTION, seed)
    where = (f"a patient-grouped {HOLDOUT_FRACTION:.0%} of {source}'s training images held out before training "
             f"(seed {seed}; {source} has no test split)")
    root = out / "real_data"
    wanted = {"source": str(Path(source).resolve()), "seed": seed, "fraction": HOLDOUT_FRACTION}
    if root.exists() and any(root.iterdir()):
        marker = root / HOLDOUT_MARKER
        if not marker.is_file() or json.loads(marker.read_text()) != wanted:
            raise PneumoniaError(f"{root} holds another data copy than --data {source} --seed {seed}: "
                                 "choose another --out (or remove that folder)")
        return root, f"the copy of {source} already in {root}", where
    for split, part in (("train", kept), ("test", held)):
        for record in part:
            target = root / split / record.class_name / Path(record.location).name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(record.location, target)
            except OSError:  # another file system
                shutil.copyfile(record.location, target)
    (root / HOLDOUT_MARKER).write_text(json.dumps(wanted))
    return root, f"{len(kept)} training and {len(held)} held-out X-rays of {source} in {root}", where


def demo_config(real: bool, out: Path, seed: int, *, workers: int | None = None, samples: int | None = None,
                epochs: int | None = None, image_size: int | None = None, **settings: Any):
    """The demo's sweep config: tune_configs/demo.yaml (quick_real.yaml for real X-rays) with the
    sweeps in ``out/sweeps``, MLflow in ``out/mlflow.db``, ``seed`` for the validation carve, the
    weights and shuffling and the search; ``samples`` searched trials (default: the config's
    num_samples) plus the untuned one, none stopped early (the baseline must run every epoch; at
    the demo's sizes a trial costs its start-up, not its epochs); the given budget where not None;
    ``settings``: more dotted config overrides."""
    overrides: dict[str, Any] = {
        "run.storage": str(out / "sweeps"),
        "data.seed": seed, "train.seed": seed, "tune.seed": seed,
        # Every step in one MLflow store (`mlflow ui --backend-store-uri sqlite:///demo_out/mlflow.db`).
        "tracking.uri": os.environ.get(ENV_URI) or f"sqlite:///{out / 'mlflow.db'}",
    }
    for key, value in (("train.epochs", epochs), ("data.image_size", image_size), ("scaling.workers", workers)):
        if value is not None:
            overrides[key] = value
    config = load_config(_sweep_config_file("quick_real.yaml" if real else "demo.yaml"))
    searched = samples if samples is not None else config.tune.num_samples
    return with_overrides(config, {**overrides, "tune.num_samples": searched + 1, "tune.scheduler": "none",
                                   **settings})


@dataclass
class TuningOutcome:
    """The sweep (pneumonia.training.sweep.TuneResult), its untuned trial and its winner compared on
    the test split at the same target recall."""

    tuned: Any  # the TuneResult: its winner, and its untuned trial as .baseline
    comparison: Any  # pneumonia.evaluation.compare.MatchedComparison, baseline first
    tuned_test: Any  # the tuned checkpoint's Evaluation on the test split

    @property
    def helped(self) -> bool:
        """Whether the tuned model's test precision at matched recall (each model's own point for
        the target recall on the test split) beats the baseline's, as printed (to three decimals: a
        gap too small to show is no help). At each model's validation-chosen threshold the two
        recalls differ by several points on a small validation carve (0.93 to 0.996 measured), and
        precision moves with recall, so that view does not compare like with like."""
        first, last = self.comparison.models
        return round(last.at_test_recall.precision, 3) > round(first.at_test_recall.precision, 3)


def baseline_and_tuned(sweep_config, data: str, name: str, progress=print) -> TuningOutcome:
    """The demo's tuning story on ``data``: one sweep whose first trial is the recipe untuned (the
    baseline) and the rest searched, the winner chosen among the searched ones by the sweep's rule;
    then baseline and winner scored on the test split at matched recall, and each at its validation
    threshold for the target recall (what a deployment of it would get)."""
    from pneumonia.evaluation.compare import ModelScores, compare_at_target_recall  # lazy: scikit-learn
    from pneumonia.evaluation.evaluate import VALIDATION, evaluate_checkpoint  # lazy: scikit-learn

    sweep_config = with_overrides(sweep_config, {"run.name": f"tune-{name}"})
    tuned = tune(sweep_config, data, progress=progress, untuned_first=True)
    if tuned.baseline is None or not tuned.baseline.get("checkpoint"):
        raise PneumoniaError(f"the sweep's untuned trial left no checkpoint (see {tuned.results_csv})")
    scores, tests = {}, {}
    for label, checkpoint in (("baseline", tuned.baseline["checkpoint"]), ("tuned", tuned.best_checkpoint)):
        tests[label] = evaluate_checkpoint(checkpoint, data)
        scores[label] = ModelScores.from_evaluations(evaluate_checkpoint(checkpoint, data, split=VALIDATION),
                                                     tests[label])
    objective = sweep_config.objective
    comparison = compare_at_target_recall(scores, objective.target_recall, rule=objective.threshold_rule,
                                          confidence=objective.confidence, samples=objective.bootstrap_samples)
    return TuningOutcome(tuned, comparison, tests["tuned"])


def cmd_demo(args) -> None:
    """Data -> baseline and sweep -> serving artifact -> baseline vs tuned at matched recall ->
    report -> a live service answering a few requests, on a local Ray."""
    from pneumonia.artifacts.export import export  # lazy: scikit-learn
    from pneumonia.evaluation.report import write_report  # lazy: matplotlib and scikit-learn

    require_output_folder(args.out, "--out")
    out = Path(args.out).resolve()
    seed = args.seed
    real = args.data is not None
    if real:
        require_folder(args.data, "--data")
        data, what, split_words = real_data(args.data, out, seed)
    else:
        data, what = synthetic_data(out, args.n, seed)
        split_words = "the held-out synthetic test split"
    print(f"[1/6] data: {what}", flush=True)

    sweep_config = demo_config(real, out, seed, workers=args.workers, samples=args.samples, epochs=args.epochs,
                               image_size=args.image_size)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    objective, epochs = sweep_config.objective, sweep_config.train.epochs
    searched = ", ".join(f"{key.split('.')[-1]}={value}" for key, value in
                         ((key, _value_at(sweep_config.model_dump(), key)) for key in sweep_config.tune.space))
    rule = score_rule(objective.metric)

    print(f"[2/6] the untuned baseline, the sweep's first trial: the recipe with {searched}, {epochs} epochs, "
          f"{sweep_config.scaling.workers} Ray Train worker(s) per trial, "
          f"{sweep_config.tune.max_concurrent_trials} trial(s) at a time", flush=True)
    print(f"[3/6] Ray Tune sweep: then {sweep_config.tune.num_samples - 1} searched trials of {epochs} epochs over "
          f"{' x '.join(sweep_config.tune.space)}; a trial's score: {rule}", flush=True)
    outcome = baseline_and_tuned(sweep_config, str(data), name=stamp, progress=lambda line: print(line, flush=True))
    shutdown_ray()
    params = ", ".join(f"{key.split('.')[-1]}={_short(value)}" for key, value in outcome.tuned.best_params.items())
    print(f"winner: {params}; validation score {outcome.tuned.objective:.3f} "
          f"(untuned baseline {outcome.tuned.baseline['objective']:.3f})", flush=True)

    print(f"[4/6] exporting the winner to the registry {out / 'registry'}", flush=True)
    exported = export(outcome.tuned.best_checkpoint, str(out / "registry"), data_root=str(data))
    print(f"artifact {exported.version}: {exported.artifact}", flush=True)

    print(f"[5/6] baseline and tuned on {split_words}: each at its validation threshold for recall "
          f">= {objective.target_recall:g} (what deploying it gives), and at matched test recall (the ranking)",
          flush=True)
    comparison, tuned_test = outcome.comparison, outcome.tuned_test
    print(comparison.table(), flush=True)
    first, last = comparison.models
    helped = outcome.helped
    tuned_at = last.chosen.threshold
    files = write_report(out / "report", tuned_test.labels, tuned_test.probabilities, tuned_at,
                         title=f"Demo: tuned model on {split_words}",
                         details={"artifact": exported.artifact, "data": str(data), "split": split_words,
                                  "seed": seed, "comparison": comparison.to_json()},
                         groups=tuned_test.patient_ids, threshold_choice=last.chosen.to_json())
    print(f"report: {files.html}", flush=True)

    port = args.serve_port or free_port()
    print(f"[6/6] serving {exported.version} with Ray Serve on http://127.0.0.1:{port}, sending test X-rays",
          flush=True)
    samples = [path for label in CLASS_NAMES for path in sorted((data / "test" / label).iterdir())[:3]]
    # Loopback, open on purpose: the demo's own client sends no token (docs/security-serving.md).
    with local_service.local_service(exported.artifact, port=port, app_args={"no_auth": True}) as url:
        rows = predict_files(url, samples)
        print(format_predictions([{**row, "file": str(Path(row["file"]).relative_to(data))} for row in rows]))
        print(f"POST {url}/predict answered {len(rows)} requests; stopping the service", flush=True)
    print("service stopped")
    uri = sweep_config.tracking.uri
    print(f"experiment tracking: mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:")
          else f"experiment tracking: {uri}")

    verdict = _verdict(comparison, helped, seed, split_words)
    payload = {
        "seed": seed, "data": str(data), "split": split_words, "target_recall": objective.target_recall,
        "baseline": _point(first), "tuned": _point(last), "tuning_helped": helped,
        "precision_gap": comparison.matched_gap()[0], "precision_gap_se": comparison.matched_gap()[1],
        "best_params": outcome.tuned.best_params, "selection": rule,
        "artifact": exported.artifact, "report": str(files.html), "verdict": verdict,
    }
    if args.json:
        print(verdict)  # the same sentence, above the JSON line
    emit(payload, args.json, verdict)


def _point(model) -> dict[str, Any]:
    """A model's test precision, recall and threshold at matched recall (its own point for the
    target on the test split), and at its validation-chosen threshold."""
    point = model.at_test_recall
    return {"precision": point.precision, "recall": point.recall, "threshold": point.threshold,
            "at_validation_threshold": {"precision": float(model.test["precision"]),
                                        "recall": float(model.test["recall"]),
                                        "threshold": float(model.chosen.threshold)}}


def _verdict(comparison, helped: bool, seed: int, split_words: str) -> str:
    """The demo's last sentence: whether tuning helped on this seed, plainly, and whether the gap
    is beyond one standard error of the test split."""
    first, last = comparison.models
    gap, error = comparison.matched_gap()
    figures = (f"test precision {last.at_test_recall.precision:.3f} against {first.at_test_recall.precision:.3f} "
               f"at test recall >= {comparison.target_recall:g} on {split_words}")
    size = (f"; the gap, {gap:+.3f}, is {'beyond' if abs(gap) > error else 'within'} one standard error "
            f"({error:.3f}) of this split")
    if helped:
        return (f"Seed {seed}: tuning helped: the tuned model is more precise than the untuned baseline at the same "
                f"target recall, {figures}{size}.")
    return (f"Seed {seed}: tuning did NOT help: the tuned model is not more precise than the untuned baseline "
            f"at the same target recall, {figures}{size}.")


def _value_at(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
