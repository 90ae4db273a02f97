"""The `pneumonia` command: a thin layer that parses flags and calls library functions.

Contract (scripts rely on it): with ``--json`` the last line printed is one JSON object; errors go
to stderr as one line with a non-zero exit (1 for a problem with the input, 2 for bad usage,
130 when interrupted).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

from pneumonia.errors import Interrupted, PneumoniaError


def _emit(payload: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        print(json.dumps(payload, default=_json_default, allow_nan=False))
    else:
        print(text)


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _clean_nan(value):
    """JSON has no NaN: a metric that is undefined (one class only) becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean_nan(v) for k, v in value.items()}
    return value


_KEEP_RAY = False
"""Set by main() when Ray was already running in this process before the command (a notebook's
or a test session's): the command must leave it running."""


def _shutdown_ray() -> None:
    """Stop the embedded Ray we started, so its forwarded worker logs end before our last line."""
    if "ray" in sys.modules and not _KEEP_RAY:
        from pneumonia.local_ray import stop_ray

        stop_ray()


# ----------------------------------------------------------------------------- commands


def cmd_synth(args) -> None:
    from pneumonia.synth import make_synthetic_dataset

    try:
        summary = make_synthetic_dataset(
            args.out, n=args.n, seed=args.seed, image_size=args.image_size, difficulty=args.difficulty
        )
    except (FileExistsError, ValueError) as error:
        raise PneumoniaError(str(error)) from None
    text = f"wrote {summary.total()} synthetic images to {summary.root}\n" + "\n".join(
        f"  {split:<6} NORMAL {c['NORMAL']:>5}  PNEUMONIA {c['PNEUMONIA']:>5}  patients {summary.patients[split]}"
        for split, c in summary.counts.items()
    )
    _emit({"root": str(summary.root), "counts": summary.counts, "patients": summary.patients}, args.json, text)


def cmd_data_summarize(args) -> None:
    from pneumonia.summary import summarize

    summary = summarize(args.directory)
    _emit(summary.to_json(), args.json, summary.format())


def _storage(args) -> str | None:
    """--storage, else $PNEUMONIA_STORAGE (set once per cluster), else the config's run.storage."""
    return args.storage or os.environ.get("PNEUMONIA_STORAGE") or None


def _train_overrides(args) -> dict[str, Any]:
    from pneumonia.config import parse_set_option

    overrides = {
        "scaling.workers": args.workers,
        "scaling.gpu": True if args.gpu else None,
        "train.epochs": args.epochs,
        "train.batch_size": args.batch_size,
        "train.learning_rate": args.learning_rate,
        "train.normal_class_weight": args.normal_weight,
        "model.name": args.model,
        "data.image_size": args.image_size,
        "run.storage": _storage(args),
        "run.name": args.name,
    }
    overrides.update(parse_set_option(args.set or []))
    return overrides


def cmd_train(args) -> None:
    from pneumonia.config import load_config, with_overrides
    from pneumonia.train import train

    overrides = _train_overrides(args)
    config = with_overrides(load_config(args.config), overrides)
    if args.resume and args.data is None:
        data = None
    elif args.data is None:
        raise PneumoniaError("--data is required (a dataset root or a folder of class folders)")
    else:
        data = args.data
    # On resume the stored config wins, except for what was given explicitly now (e.g. more epochs).
    explicit = {key: value for key, value in overrides.items()
                if key not in ("run.storage", "run.name") and value is not None}
    result = train(
        config,
        data,
        resume=args.resume,
        overrides_on_resume=lambda stored: with_overrides(stored, explicit),
        progress=lambda line: print(line, flush=True),
    )
    _shutdown_ray()
    text = (
        f"best checkpoint (epoch {result.best_epoch} of {result.epochs_completed}): {result.best_checkpoint}\n"
        + "\n".join(f"  val {name:<12} {value:.4f}" for name, value in result.metrics.items())
    )
    _emit(_clean_nan(result.to_json()), args.json, text)


def cmd_tune(args) -> None:
    from pneumonia.config import load_config, parse_set_option, with_overrides
    from pneumonia.tune import tune

    overrides = {"run.storage": _storage(args), "run.name": args.name, "tune.num_samples": args.samples}
    overrides.update(parse_set_option(args.set or []))
    config = with_overrides(load_config(args.config), overrides)
    if not args.resume and args.data is None:
        raise PneumoniaError("--data is required (a dataset root or a folder of class folders)")
    result = tune(config, args.data, resume=args.resume, progress=lambda line: print(line, flush=True))
    _shutdown_ray()
    lines = [f"{'trial':<10}{'objective':>10}{'pr_auc':>8}{'epochs':>7}  params"]
    for trial in result.trials:
        params = ", ".join(f"{k[6:]}={_short(v)}" for k, v in trial.items() if k.startswith("param:"))
        objective = "-" if trial["objective"] is None else f"{trial['objective']:.4f}"
        pr_auc = "-" if trial["pr_auc"] is None else f"{trial['pr_auc']:.4f}"
        lines.append(f"{trial['trial_id']:<10}{objective:>10}{pr_auc:>8}{trial['epochs']:>7}  {params}")
    lines += [
        f"best: precision {result.objective:.4f} at recall >= {config.objective.target_recall} "
        f"(threshold {result.threshold:.4f}); checkpoint {result.best_checkpoint}",
        f"results: {result.results_csv}; plots: {', '.join(result.plots)}",
    ]
    _emit(_clean_nan(result.to_json()), args.json, "\n".join(lines))


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def cmd_evaluate(args) -> None:
    from pneumonia.evaluate import evaluate_artifact, evaluate_checkpoint
    from pneumonia.metrics import format_table

    if (args.checkpoint is None) == (args.artifact is None):
        raise PneumoniaError("pass exactly one of --checkpoint and --artifact")
    if args.artifact is not None:
        evaluation = evaluate_artifact(args.artifact, args.data, split=args.split, threshold=args.threshold)
        source = {"artifact": args.artifact}
    else:
        threshold = 0.5 if args.threshold is None else args.threshold
        evaluation = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, threshold=threshold)
        source = {"checkpoint": args.checkpoint}
    if args.stress:
        evaluation.stress = _stress_for(args, evaluation)
    title = (f"{evaluation.split}: {evaluation.counts['NORMAL']} NORMAL, {evaluation.counts['PNEUMONIA']} PNEUMONIA"
             + (f" ({evaluation.skipped} files skipped)" if evaluation.skipped else ""))
    payload = {**evaluation.metrics, "split": evaluation.split, "skipped": evaluation.skipped, **source}
    text = format_table(evaluation.metrics, title)
    if evaluation.stress is not None:
        payload["stress"] = evaluation.stress.to_json()
        text += "\n\nshift stress validation (" + f"{evaluation.stress.n} images):\n" + evaluation.stress.table()
    if args.report:
        from pneumonia.report import write_report

        files = write_report(
            args.report, evaluation.labels, evaluation.probabilities, evaluation.metrics["threshold"],
            title=f"Pneumonia classifier on {evaluation.split}",
            details={**source, "data": args.data, "split": evaluation.split, "skipped files": evaluation.skipped},
            groups=evaluation.patient_ids, threshold_choice=_threshold_choice(args),
            stress=payload.get("stress"),
        )
        summary = json.loads(files.json.read_text())
        payload["intervals"] = {name: {"low": item["low"], "high": item["high"]}
                                for name, item in summary["metrics"].items() if item.get("low") is not None}
        payload["report"] = str(files.html)
        text += f"\nreport: {files.html} (95% CIs by patient bootstrap in {files.json})"
    _emit(_clean_nan(payload), args.json, text)


def _threshold_choice(args) -> dict | None:
    """How the evaluated artifact's threshold was chosen (recorded by `export --data`), when it is the one scored."""
    if args.artifact is None or args.threshold is not None:
        return None
    from pneumonia.registry import read_metadata

    return (read_metadata(args.artifact).get("validation_metrics") or {}).get("operating_point")


def _stress_for(args, evaluation):
    """The stress report of what cmd_evaluate scored, at the same threshold."""
    from pneumonia.config import config_from_dict
    from pneumonia.evaluate import stress_evaluate

    if args.artifact is not None:
        from pneumonia.registry import load_artifact

        artifact = load_artifact(args.artifact)
        predict, spec, config = artifact.predict, artifact.preprocess, artifact.metadata.get("training_config")
    else:
        from pneumonia.checkpoint import load_checkpoint
        from pneumonia.pipeline import predict_probabilities

        model, info = load_checkpoint(args.checkpoint)
        predict, spec, config = (lambda images: predict_probabilities(model, images)), info.preprocess, info.config
    target = config_from_dict(config or {}).objective.target_recall
    shifts = [name.strip() for name in args.shifts.split(",")] if args.shifts else None
    # The drift columns keep the operating point a user would deploy: an artifact's own threshold
    # (or --threshold); for a bare checkpoint the one its clean images give for the target recall.
    threshold = evaluation.metrics["threshold"] if args.artifact is not None or args.threshold is not None else None
    try:
        return stress_evaluate(predict, spec, args.data, args.split, config, target,
                               threshold=threshold, shifts=shifts)
    except ValueError as error:
        raise PneumoniaError(str(error)) from None


def cmd_export(args) -> None:
    from pneumonia.export import export

    exported = export(args.checkpoint, args.registry, data_root=args.data, name=args.name)
    _emit(_clean_nan(exported.to_json()), args.json, exported.summary())


def cmd_serve(args) -> None:
    """Run the Serve application on a local Ray until Ctrl-C or SIGTERM, then stop it cleanly."""
    import signal
    import time

    from pneumonia.service import local_service

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # `kill`, `docker stop`: the same clean stop as Ctrl-C
    artifact = args.artifact or os.environ.get("PNEUMONIA_ARTIFACT") or "registry"
    try:
        with local_service(artifact, host=args.host, port=args.port) as url:
            print(f"serving {artifact} on {url} (POST /predict, /explain; GET /healthz, /model, /v2/...); "
                  "Ctrl-C stops", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    print("service stopped", flush=True)


def cmd_predict(args) -> None:
    """POST each file to a running service and print its answer."""
    from pneumonia.client import format_predictions, predict_files

    rows = predict_files(args.url, args.files, timeout_s=args.timeout)
    _emit({"predictions": rows}, args.json, format_predictions(rows))
    failed = sum("error" in row for row in rows)
    if failed:
        raise PneumoniaError(f"{failed} of {len(rows)} files were refused")


def _quick_sweep_config() -> Path:
    """tune_configs/quick.yaml of the checkout the demo runs in (or of this package's checkout)."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        candidate = base / "tune_configs" / "quick.yaml"
        if candidate.is_file():
            return candidate
    raise PneumoniaError("tune_configs/quick.yaml not found: run the demo from the repository root")


def cmd_demo(args) -> None:
    """Synthetic data -> distributed training -> sweep -> serving artifact -> report -> a live
    service answering a few requests, on a local Ray."""
    from pneumonia.client import format_predictions, predict_files
    from pneumonia.compare import ModelScores, compare_at_target_recall
    from pneumonia.config import ExperimentConfig, load_config, with_overrides
    from pneumonia.evaluate import VALIDATION, evaluate_artifact, evaluate_checkpoint
    from pneumonia.export import export
    from pneumonia.metrics import format_table
    from pneumonia.report import write_report
    from pneumonia.service import free_port, local_service
    from pneumonia.synth import make_synthetic_dataset
    from pneumonia.train import train
    from pneumonia.tune import tune

    out = Path(args.out).resolve()
    data = out / "data"
    if data.exists() and any(data.iterdir()):
        print(f"[1/6] using the synthetic dataset already in {data}")
    else:
        summary = make_synthetic_dataset(data, n=args.n, seed=0, image_size=128)
        print(f"[1/6] wrote {summary.total()} synthetic X-rays to {data}")
    config = with_overrides(ExperimentConfig(), {
        "data.image_size": 64, "train.epochs": args.epochs, "train.batch_size": 16,
        "scaling.workers": args.workers, "run.storage": str(out / "runs"), "run.keep_checkpoints": 2,
    })
    print(f"[2/6] training xraynet on {args.workers} Ray workers")
    result = train(config, str(data), progress=lambda line: print(line, flush=True))
    evaluation = evaluate_checkpoint(result.best_checkpoint, str(data))
    print(format_table(evaluation.metrics, f"test metrics of the best checkpoint at threshold 0.5 ({evaluation.split})"))

    sweep_config = with_overrides(load_config(_quick_sweep_config()), {
        "run.storage": str(out / "sweeps"), "tune.num_samples": args.samples,
    })
    print(f"[3/6] Ray Tune sweep ({args.samples} trials): learning rate x NORMAL class weight, "
          f"objective precision at recall >= {sweep_config.objective.target_recall}")
    swept = tune(sweep_config, str(data), progress=lambda line: print(line, flush=True))
    print(f"best trial: {swept.best_params}, precision {swept.objective:.3f} at threshold {swept.threshold:.3f}")
    _shutdown_ray()

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
        {"baseline (notebook recipe)": ModelScores.from_evaluations(
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
    samples = [path for label in ("NORMAL", "PNEUMONIA") for path in sorted((data / "test" / label).iterdir())[:3]]
    with local_service(exported.artifact, port=port) as url:
        rows = predict_files(url, samples)
        print(format_predictions([{**row, "file": str(Path(row["file"]).relative_to(data))} for row in rows]))
        print(f"POST {url}/predict answered {len(rows)} requests; stopping the service", flush=True)
    print("service stopped")


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pneumonia", description="Train, tune and serve a chest X-ray pneumonia classifier on Ray."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = commands.add_parser("synth", help="write a synthetic dataset in the Kermany layout")
    synth.add_argument("--out", required=True, help="folder to create (must be empty or absent)")
    synth.add_argument("--n", type=int, default=600, help="number of images (default 600)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=224)
    synth.add_argument("--difficulty", type=float, default=1.0, help="higher is harder (default 1.0)")
    synth.add_argument("--json", action="store_true")
    synth.set_defaults(func=cmd_synth)

    data = commands.add_parser("data", help="inspect datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    summarize = data_commands.add_parser("summarize", help="counts, patients, sizes and problems")
    summarize.add_argument("directory")
    summarize.add_argument("--json", action="store_true")
    summarize.set_defaults(func=cmd_data_summarize)

    train = commands.add_parser("train", help="distributed training with Ray Train")
    train.add_argument("--data", help="dataset root (train/ val/ test/) or a folder of class folders")
    train.add_argument("--config", help="YAML experiment config (see tune_configs/)")
    train.add_argument("--workers", type=int, help="Ray Train workers (default 2)")
    train.add_argument("--gpu", action="store_true", help="one GPU per worker, mixed precision")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int, help="per worker")
    train.add_argument("--learning-rate", "--lr", type=float, dest="learning_rate")
    train.add_argument("--normal-weight", type=float, help="class weight of NORMAL relative to PNEUMONIA")
    train.add_argument("--model", choices=["seed", "xraynet"])
    train.add_argument("--image-size", type=int)
    train.add_argument("--storage", help="checkpoint storage: local folder or URI (default $PNEUMONIA_STORAGE, "
                                         "else the config's run.storage, else ./runs)")
    train.add_argument("--name", help="run name (default train-<timestamp>)")
    train.add_argument("--resume", action="store_true", help="continue the named (or latest) run")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key, e.g. data.augment.enabled=true")
    train.add_argument("--json", action="store_true")
    train.set_defaults(func=cmd_train)

    tune = commands.add_parser("tune", help="Ray Tune sweep: precision at a target recall")
    tune.add_argument("--config", required=True, help="YAML with a tune: section (see tune_configs/)")
    tune.add_argument("--data", help="dataset root (train/ val/ test/) or a folder of class folders")
    tune.add_argument("--storage", help="sweep storage: local folder or URI (default $PNEUMONIA_STORAGE, "
                                        "else the config's run.storage, else ./runs)")
    tune.add_argument("--name", help="sweep name (default tune-<timestamp>)")
    tune.add_argument("--samples", type=int, help="number of trials (overrides tune.num_samples)")
    tune.add_argument("--resume", action="store_true", help="continue the named (or latest) sweep")
    tune.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key")
    tune.add_argument("--json", action="store_true")
    tune.set_defaults(func=cmd_tune)

    evaluate = commands.add_parser("evaluate", help="metrics of a checkpoint or artifact on a split")
    evaluate.add_argument("--checkpoint", help="training checkpoint folder (path or URI)")
    evaluate.add_argument("--artifact", help="serving artifact: version folder, or a registry (-> latest)")
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--split", default="test",
                          help="split folder to score (default test), or 'validation': the patient-grouped "
                               "split that training carved out of train/")
    evaluate.add_argument("--threshold", type=float,
                          help="decision threshold (default: the artifact's, or 0.5 for a checkpoint)")
    evaluate.add_argument("--report", metavar="DIR", help="also write metrics.json, plots and report.html here")
    evaluate.add_argument("--stress", action="store_true",
                          help="also re-score the split under the shifts a new site brings (exposure, contrast, "
                               "blur, noise, JPEG, framing, resolution): per-shift ROC-AUC and precision at the "
                               "target recall, and the worst case")
    evaluate.add_argument("--shifts", help="comma-separated subset of the stress shifts (default: all)")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)

    export = commands.add_parser("export", help="checkpoint -> versioned serving artifact in a registry")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--registry", required=True, help="registry folder (versions are kept per model name)")
    export.add_argument("--data", help="dataset root: choose the threshold on its validation split")
    export.add_argument("--name", default="pneumonia-cnn", help="model name in the registry")
    export.add_argument("--json", action="store_true")
    export.set_defaults(func=cmd_export)

    serve_cmd = commands.add_parser("serve", help="run the HTTP service for an artifact on a local Ray")
    serve_cmd.add_argument("--artifact", help="version folder or registry (default $PNEUMONIA_ARTIFACT or ./registry)")
    serve_cmd.add_argument("--port", type=int, default=8000)
    serve_cmd.add_argument("--host", default="127.0.0.1")
    serve_cmd.set_defaults(func=cmd_serve)

    predict = commands.add_parser("predict", help="send X-ray files to a running service")
    predict.add_argument("--url", default="http://127.0.0.1:8000")
    predict.add_argument("files", nargs="+")
    predict.add_argument("--timeout", type=float, default=60)
    predict.add_argument("--json", action="store_true")
    predict.set_defaults(func=cmd_predict)

    demo = commands.add_parser("demo", help="synthetic data -> training -> sweep -> artifact -> report")
    demo.add_argument("--out", default="demo_out", help="working folder (default ./demo_out)")
    demo.add_argument("--n", type=int, default=800)
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--epochs", type=int, default=8)
    demo.add_argument("--samples", type=int, default=4, help="sweep trials (default 4)")
    demo.add_argument("--serve-port", type=int, default=0, help="port for the final service (default: a free one)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Ray folds log lines that differ only in numbers into "[repeated Nx across cluster]": that
    # would hide every ensemble member's (or trial's) epoch lines but one. Read when Ray loads.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    global _KEEP_RAY
    _KEEP_RAY = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    terminated = _sigterm_as_ctrl_c()
    try:
        args.func(args)
    except Interrupted as error:
        print(error, file=sys.stderr)  # "<what> interrupted: <counts>; <command> continues it"
        return 143 if terminated else error.exit_code
    except PneumoniaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; a training run continues with `pneumonia train --resume`, a sweep with "
              "`pneumonia tune --resume`", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        terminated.restore()
        _shutdown_ray()
    return 0


class _Flag:
    """Whether SIGTERM arrived; ``restore`` puts back the handler that was there before."""

    def __init__(self, restore: Callable[[], None] = lambda: None):
        self.value = False
        self.restore = restore

    def __bool__(self) -> bool:
        return self.value


def _sigterm_as_ctrl_c() -> _Flag:
    """SIGTERM (`kill`, a scheduler's stop) takes the Ctrl-C path, so Train and Tune stop their
    workers, release their placement groups and save their state; the exit status says 143."""
    import signal
    import threading

    flag = _Flag()
    if threading.current_thread() is not threading.main_thread():
        return flag

    def on_sigterm(signum, frame):
        flag.value = True
        signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    flag.restore = lambda: signal.signal(signal.SIGTERM, previous)
    return flag


if __name__ == "__main__":
    sys.exit(main())
