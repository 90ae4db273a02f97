"""`pneumonia demo`: the whole platform on synthetic data in minutes, on a local Ray."""

from __future__ import annotations

import os
from pathlib import Path

from pneumonia.artifacts.tracking import ENV_URI
from pneumonia.cli.common import require_output_folder, shutdown_ray
from pneumonia.config import load_config, with_overrides
from pneumonia.data.labels import CLASS_NAMES
from pneumonia.data.synth import make_synthetic_dataset
from pneumonia.errors import PneumoniaError
from pneumonia.local_ray import free_port
from pneumonia.serving import local_service
from pneumonia.serving.client import format_predictions, predict_files
from pneumonia.training.driver import train
from pneumonia.training.sweep import tune


def _quick_sweep_config() -> Path:
    """tune_configs/quick.yaml of the checkout the demo runs in (or of this package's checkout)."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = base / "tune_configs" / "quick.yaml"
        if candidate.is_file():
            return candidate
    raise PneumoniaError("tune_configs/quick.yaml not found: run the demo from the repository root")


def cmd_demo(args) -> None:
    """Synthetic data -> distributed training -> sweep -> serving artifact -> report -> a live
    service answering a few requests, on a local Ray."""
    from pneumonia.artifacts.export import export  # lazy: scikit-learn
    from pneumonia.evaluation.compare import ModelScores, compare_at_target_recall  # lazy: scikit-learn
    from pneumonia.evaluation.evaluate import VALIDATION, evaluate_artifact, evaluate_checkpoint  # lazy: scikit-learn
    from pneumonia.evaluation.report import write_report  # lazy: matplotlib and scikit-learn
    from pneumonia.metrics.binary import format_table  # lazy: scikit-learn

    require_output_folder(args.out, "--out")
    out = Path(args.out).resolve()
    data = out / "data"
    if data.exists() and any(data.iterdir()):
        print(f"[1/6] using the synthetic dataset already in {data}")
    else:
        summary = make_synthetic_dataset(data, n=args.n, seed=0, image_size=128)
        print(f"[1/6] wrote {summary.total()} synthetic X-rays to {data}")
    # One recipe, one budget, one validation carve for the baseline and the sweep: the baseline is
    # the sweep's own recipe untuned (its learning rate, NORMAL class weight 1), so the comparison
    # below is about tuning, not about more epochs or an easier validation split.
    sweep_config = with_overrides(load_config(_quick_sweep_config()), {
        "run.storage": str(out / "sweeps"), "tune.num_samples": args.samples, "train.epochs": args.epochs,
        "scaling.workers": args.workers,
        # Every step in one MLflow store (`mlflow ui --backend-store-uri sqlite:///demo_out/mlflow.db`).
        "tracking.uri": os.environ.get(ENV_URI) or f"sqlite:///{out / 'mlflow.db'}",
    })
    config = with_overrides(sweep_config.model_copy(update={"tune": None}), {"run.storage": str(out / "runs")})
    print(f"[2/6] training the untuned baseline (xraynet, {args.epochs} epochs) on {args.workers} Ray workers")
    result = train(config, str(data), progress=lambda line: print(line, flush=True))
    evaluation = evaluate_checkpoint(result.best_checkpoint, str(data))
    print(format_table(evaluation.metrics, f"test metrics of the best checkpoint at threshold 0.5 ({evaluation.split})"))

    print(f"[3/6] Ray Tune sweep ({args.samples} trials of {args.epochs} epochs): learning rate x NORMAL class weight, "
          f"objective precision at recall >= {sweep_config.objective.target_recall}")
    swept = tune(sweep_config, str(data), progress=lambda line: print(line, flush=True))
    print(f"best trial: {swept.best_params}, precision {swept.objective:.3f} at threshold {swept.threshold:.3f}")
    shutdown_ray()

    print(f"[4/6] exporting the best checkpoint to the registry {out / 'registry'}")
    exported = export(swept.best_checkpoint, str(out / "registry"), data_root=str(data))
    print(f"artifact {exported.version}: {exported.artifact}\n  {exported.operating_point.summary()}")

    print("[5/6] evaluating the artifact on the held-out synthetic test split")
    tuned = evaluate_artifact(exported.artifact, str(data))
    files = write_report(out / "report", tuned.labels, tuned.probabilities, tuned.metrics["threshold"],
                         title="Demo: tuned model on the synthetic test split",
                         details={"artifact": exported.artifact, "data": str(data), "split": tuned.split},
                         groups=tuned.patient_ids, threshold_choice=exported.operating_point.to_json())
    print(format_table(tuned.metrics, "test metrics of the tuned artifact at its validation-chosen threshold"))
    # Before and after tuning at the same target recall: at 0.5 the baseline can show a higher
    # precision only because it flags fewer children (and misses more of the sick ones).
    objective = sweep_config.objective
    comparison = compare_at_target_recall(
        {"baseline (untuned)": ModelScores.from_evaluations(
            evaluate_checkpoint(result.best_checkpoint, str(data), split=VALIDATION), evaluation),
         "tuned": ModelScores.from_evaluations(evaluate_artifact(exported.artifact, str(data), split=VALIDATION),
                                               tuned)},
        objective.target_recall, rule=objective.threshold_rule, confidence=objective.confidence,
        samples=objective.bootstrap_samples,
    )
    print(comparison.table())
    print(comparison.sentence())
    print(f"report: {files.html}")

    port = args.serve_port or free_port()
    print(f"[6/6] serving {exported.version} with Ray Serve on http://127.0.0.1:{port}, sending test X-rays")
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

