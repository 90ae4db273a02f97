"""The `pneumonia` command: a thin layer that parses flags and calls library functions.

Contract (scripts rely on it): with ``--json`` the last line printed is one JSON object; errors go
to stderr as one line with a non-zero exit (1 for a problem with the input, 2 for bad usage,
130 when interrupted), never a traceback.

Failures are found as early as they can be, so they take seconds: numeric flags are checked against
their ranges while parsing (exit 2; the flags that set a config key take that key's own bounds),
paths (exists, folder or file, writable) before any library call, and data and artifacts before
TensorFlow loads or Ray starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from pneumonia import QuietNativeLogStream
from pneumonia.errors import Interrupted, OutputError, PneumoniaError


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


# ----------------------------------------------------------------------------- checks before work


def _is_uri(location: str) -> bool:
    return "://" in str(location)


def _require_folder(location: str, flag: str | None, what: str = "folder") -> None:
    """A local input folder must exist, be a folder and be readable (URIs are checked by the
    library when it lists them). ``flag`` names the option in the message (None: a positional)."""
    if _is_uri(location):
        return
    path = Path(location).expanduser()
    named = f"{flag} {location}" if flag else location
    if not path.exists():
        raise PneumoniaError(f"{what} not found: {location}" + (f" ({flag})" if flag else ""))
    if not path.is_dir():
        raise PneumoniaError(f"{named} is a file; it must be a {what}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise PneumoniaError(f"{named}: cannot read this {what} (permission denied)")


def _require_output_folder(location: str, flag: str) -> None:
    """A local output folder must be a folder we can write in, or creatable: tried by making (and
    removing) a scratch folder in it or in its nearest existing parent, which is the only check that
    a read-only file system, /proc or a parent that is a file cannot fool."""
    if _is_uri(location):
        return
    path = Path(location).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {location} is a file; it must be a folder")
    parent = next(candidate for candidate in (path, *path.parents) if candidate.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".pneumonia-check-", dir=parent))
    except OSError as error:
        verb = "cannot write in folder" if parent == path else "cannot create folder"
        raise OutputError(f"{flag} {location}: {verb} ({error.strerror or error})") from None


def _one_line(text: str) -> str:
    """A multi-line message (a config with several bad keys) as one line: 'head: a; b'."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return lines[0] + " " + "; ".join(lines[1:])


# ----------------------------------------------------------------------------- commands


def cmd_synth(args) -> None:
    from pneumonia.synth import make_synthetic_dataset

    try:
        summary = make_synthetic_dataset(
            args.out, n=args.n, seed=args.seed, image_size=args.image_size, difficulty=args.difficulty
        )
    except (FileExistsError, ValueError) as error:
        raise PneumoniaError(str(error)) from None
    except OutputError as error:
        raise OutputError(f"--out {error}") from None
    text = f"wrote {summary.total()} synthetic images to {summary.root}\n" + "\n".join(
        f"  {split:<6} NORMAL {c['NORMAL']:>5}  PNEUMONIA {c['PNEUMONIA']:>5}  patients {summary.patients[split]}"
        for split, c in summary.counts.items()
    )
    _emit({"root": str(summary.root), "counts": summary.counts, "patients": summary.patients}, args.json, text)


def cmd_data_summarize(args) -> None:
    from pneumonia.summary import summarize

    _require_folder(args.directory, None, "data folder")
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
        _require_folder(data, "--data", "data folder")
        _require_output_folder(config.run.storage, "--storage" if _storage(args) else "run.storage")
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
    if not args.resume:
        _check_new_sweep(args, config)
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


def _check_new_sweep(args, config) -> None:
    """What a new sweep needs, checked before Ray starts: readable training images
    (pneumonia.data.check_training_data) and writable storage."""
    from pneumonia.data import check_training_data

    if args.data is None:
        raise PneumoniaError("--data is required (a dataset root or a folder of class folders)")
    if config.tune is None:
        return  # tune() says so, before anything starts
    _require_folder(args.data, "--data", "data folder")
    check_training_data(args.data)
    _require_output_folder(config.run.storage, "--storage" if _storage(args) else "run.storage")


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def cmd_evaluate(args) -> None:
    from pneumonia.evaluate import evaluate_artifact, evaluate_checkpoint
    from pneumonia.metrics import format_table

    _check_evaluate_args(args)
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
    if evaluation.ood is not None:
        payload["out_of_distribution"] = evaluation.ood
        text += (f"\nout-of-distribution guard: {evaluation.ood['count']} of {evaluation.ood['n']} images "
                 f"({evaluation.ood['rate']:.1%}) would not be classified (about {evaluation.ood['expected_rate']:.0%} "
                 "on validation; a sudden rise means data unlike the training data)")
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
            stress=payload.get("stress"), ood=evaluation.ood,
        )
        summary = json.loads(files.json.read_text())
        payload["intervals"] = {name: {"low": item["low"], "high": item["high"]}
                                for name, item in summary["metrics"].items() if item.get("low") is not None}
        payload["report"] = str(files.html)
        text += f"\nreport: {files.html} (95% CIs by patient bootstrap in {files.json})"
    _emit(_clean_nan(payload), args.json, text)


def _check_evaluate_args(args) -> None:
    """Every argument before the model loads (TensorFlow takes seconds to start): one model, an
    existing data folder, a readable artifact, a writable report folder. The data's layout and the
    split are checked next, by evaluate_checkpoint/evaluate_artifact, still before the model loads."""
    if (args.checkpoint is None) == (args.artifact is None):
        raise PneumoniaError("pass exactly one of --checkpoint and --artifact")
    if args.shifts and not args.stress:
        raise PneumoniaError("--shifts chooses the shifts of --stress: add --stress")
    _require_folder(args.data, "--data", "data folder")
    if args.checkpoint is not None:
        _require_folder(args.checkpoint, "--checkpoint", "checkpoint folder")
    else:
        from pneumonia.registry import read_metadata

        read_metadata(args.artifact)  # resolves it and checks its metadata, without TensorFlow
    if args.report:
        _require_output_folder(args.report, "--report")


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

    _check_export_args(args)
    exported = export(args.checkpoint, args.registry, data_root=args.data, name=args.name, ood_policy=args.ood_policy)
    _emit(_clean_nan(exported.to_json()), args.json, exported.summary())


def _check_export_args(args) -> None:
    """The checkpoint, registry and data, checked before the checkpoint's model loads."""
    _require_folder(args.checkpoint, "--checkpoint", "checkpoint folder")
    if _is_uri(args.registry):
        raise OutputError(f"--registry {args.registry}: the registry must be a local folder")
    _require_output_folder(args.registry, "--registry")
    if args.data is not None:
        from pneumonia.data import check_training_data

        _require_folder(args.data, "--data", "data folder")
        check_training_data(args.data)


def _verify_artifact(location: str) -> None:
    """The checks a replica's load_artifact makes, short of loading TensorFlow (metadata, and every
    file against its sha256), made before Ray starts: a corrupt artifact then fails in a second with
    its reason, not after Serve has given up on the replicas a minute later."""
    from pneumonia.registry import _verify_files, read_metadata, resolve_artifact

    metadata = read_metadata(location)
    _verify_files(resolve_artifact(location), metadata["files"])


def cmd_serve(args) -> None:
    """Run the Serve application on a local Ray until Ctrl-C or SIGTERM, then stop it cleanly."""
    import signal
    import time

    from pneumonia.registry import artifact_warning, read_metadata
    from pneumonia.service import local_service

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # `kill`, `docker stop`: the same clean stop as Ctrl-C
    artifact = args.artifact or os.environ.get("PNEUMONIA_ARTIFACT") or "registry"
    _verify_artifact(artifact)
    try:
        with local_service(artifact, host=args.host, port=args.port) as url:
            print(f"serving {artifact} on {url} (POST /predict, /explain; GET /healthz, /model, /v2/...); "
                  "Ctrl-C stops", flush=True)
            warning = artifact_warning(read_metadata(artifact))
            if warning:  # also in every answer; said here so that whoever starts it cannot miss it
                print(f"WARNING: this model was {warning}", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    except RuntimeError as error:  # Serve gave up deploying (its replicas' logs above say why)
        raise PneumoniaError(f"the service did not start: {_one_line(error)}") from None
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
    from pneumonia.config import load_config, with_overrides
    from pneumonia.evaluate import VALIDATION, evaluate_artifact, evaluate_checkpoint
    from pneumonia.export import export
    from pneumonia.metrics import format_table
    from pneumonia.report import write_report
    from pneumonia.service import free_port, local_service
    from pneumonia.synth import make_synthetic_dataset
    from pneumonia.train import train
    from pneumonia.tune import tune

    _require_output_folder(args.out, "--out")
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
    samples = [path for label in ("NORMAL", "PNEUMONIA") for path in sorted((data / "test" / label).iterdir())[:3]]
    with local_service(exported.artifact, port=port) as url:
        rows = predict_files(url, samples)
        print(format_predictions([{**row, "file": str(Path(row["file"]).relative_to(data))} for row in rows]))
        print(f"POST {url}/predict answered {len(rows)} requests; stopping the service", flush=True)
    print("service stopped")


# ----------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (exit 2), like every other error of the CLI."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _number(kind: type, low: float | None = None, high: float | None = None, *,
            low_open: bool = False, high_open: bool = False, key: str | None = None):
    """An argparse type: ``kind`` (int or float), finite, within the bounds (open ends excluded)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                              f"got {text!r}") from None
        fits = (math.isfinite(value)
                and (low is None or (value > low if low_open else value >= low))
                and (high is None or (value < high if high_open else value <= high)))
        if not fits:
            where = f" ({key})" if key else ""
            raise argparse.ArgumentTypeError(f"must be {_range_text(low, high, low_open, high_open)}{where}, "
                                              f"got {text}")
        return value

    return parse


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None and not (low_open or high_open):
        return f"between {low:g} and {high:g}"
    parts = []
    if low is not None:
        parts.append(f"above {low:g}" if low_open else f"at least {low:g}")
    if high is not None:
        parts.append(f"below {high:g}" if high_open else f"at most {high:g}")
    return " and ".join(parts) or "a finite number"


def _config_number(key: str):
    """An argparse type for a flag that sets config key ``key``: the key's own type and bounds,
    read from the config model (one source of truth), checked while parsing."""

    def parse(text: str):
        field = _config_field(key)
        bounds = {name: getattr(item, name) for item in field.metadata
                  for name in ("ge", "gt", "le", "lt") if getattr(item, name, None) is not None}
        kind = int if field.annotation is int else float
        return _number(kind, bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt")),
                       low_open="gt" in bounds, high_open="lt" in bounds, key=key)(text)

    return parse


def _config_field(key: str):
    """The pydantic field behind a dotted config key (``train.epochs``)."""
    import typing

    from pydantic import BaseModel

    from pneumonia.config import ExperimentConfig

    model: Any = ExperimentConfig
    *sections, leaf = key.split(".")
    for section in sections:
        annotation = model.model_fields[section].annotation
        model = next(option for option in (annotation, *typing.get_args(annotation))
                     if isinstance(option, type) and issubclass(option, BaseModel))
    return model.model_fields[leaf]


def _url(text: str) -> str:
    from pneumonia.client import check_url

    try:
        return check_url(text)
    except PneumoniaError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _shift_names(text: str) -> str:
    from pneumonia.stress import check_shift_names

    try:
        check_shift_names([name.strip() for name in text.split(",")])
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _artifact_name(text: str) -> str:
    """A model name the registry accepts, checked before the checkpoint's model loads."""
    from pneumonia.registry import _NAME

    if not _NAME.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} must be letters, digits, '.', '_' or '-' (a folder name)")
    return text


PORT = _number(int, 1, 65535)


def build_parser() -> argparse.ArgumentParser:
    from pneumonia.synth import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, MIN_IMAGES

    parser = _Parser(
        prog="pneumonia", description="Train, tune and serve a chest X-ray pneumonia classifier on Ray."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = commands.add_parser("synth", help="write a synthetic dataset in the Kermany layout")
    synth.add_argument("--out", required=True, help="folder to create (must be empty or absent)")
    synth.add_argument("--n", type=_number(int, MIN_IMAGES), default=600, help="number of images (default 600)")
    synth.add_argument("--seed", type=_number(int, 0), default=0)
    synth.add_argument("--image-size", type=_number(int, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE), default=224)
    synth.add_argument("--difficulty", type=_number(float, 0), default=1.0, help="higher is harder (default 1.0)")
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
    train.add_argument("--workers", type=_config_number("scaling.workers"), help="Ray Train workers (default 2)")
    train.add_argument("--gpu", action="store_true", help="one GPU per worker, mixed precision")
    train.add_argument("--epochs", type=_config_number("train.epochs"))
    train.add_argument("--batch-size", type=_config_number("train.batch_size"), help="per worker")
    train.add_argument("--learning-rate", "--lr", type=_config_number("train.learning_rate"), dest="learning_rate")
    train.add_argument("--normal-weight", type=_config_number("train.normal_class_weight"),
                       help="class weight of NORMAL relative to PNEUMONIA")
    train.add_argument("--model", choices=["seed", "xraynet"])
    train.add_argument("--image-size", type=_config_number("data.image_size"))
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
    tune.add_argument("--samples", type=_config_number("tune.num_samples"),
                      help="number of trials (overrides tune.num_samples)")
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
    evaluate.add_argument("--threshold", type=_number(float, 0, 1),
                          help="decision threshold (default: the artifact's, or 0.5 for a checkpoint)")
    evaluate.add_argument("--report", metavar="DIR", help="also write metrics.json, plots and report.html here")
    evaluate.add_argument("--stress", action="store_true",
                          help="also re-score the split under the shifts a new site brings (exposure, contrast, "
                               "blur, noise, JPEG, framing, resolution): per-shift ROC-AUC and precision at the "
                               "target recall, and the worst case")
    evaluate.add_argument("--shifts", type=_shift_names, help="comma-separated subset of the stress shifts (default: all)")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)

    export = commands.add_parser("export", help="checkpoint -> versioned serving artifact in a registry")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--registry", required=True, help="registry folder (versions are kept per model name)")
    export.add_argument("--data", help="dataset root: choose the threshold on its validation split and fit the "
                        "out-of-distribution guard on its training split")
    export.add_argument("--ood-policy", choices=("reject", "flag"), default="reject",
                        help="what serving does with an image the guard says is not a chest X-ray: reject "
                        "(HTTP 422) or flag (200 with out_of_distribution: true and no label); default reject")
    export.add_argument("--name", type=_artifact_name, default="pneumonia-cnn", help="model name in the registry")
    export.add_argument("--json", action="store_true")
    export.set_defaults(func=cmd_export)

    serve_cmd = commands.add_parser("serve", help="run the HTTP service for an artifact on a local Ray")
    serve_cmd.add_argument("--artifact", help="version folder or registry (default $PNEUMONIA_ARTIFACT or ./registry)")
    serve_cmd.add_argument("--port", type=PORT, default=8000)
    serve_cmd.add_argument("--host", default="127.0.0.1")
    serve_cmd.set_defaults(func=cmd_serve)

    predict = commands.add_parser("predict", help="send X-ray files to a running service")
    predict.add_argument("--url", type=_url, default="http://127.0.0.1:8000")
    predict.add_argument("files", nargs="+", metavar="FILE_OR_FOLDER",
                         help="X-ray files; a folder sends the image files inside it (recursively, sorted)")
    predict.add_argument("--timeout", type=_number(float, 0, low_open=True), default=60,
                         help="seconds to wait for each answer (default 60)")
    predict.add_argument("--json", action="store_true")
    predict.set_defaults(func=cmd_predict)

    demo = commands.add_parser("demo", help="synthetic data -> training -> sweep -> artifact -> report")
    demo.add_argument("--out", default="demo_out", help="working folder (default ./demo_out)")
    demo.add_argument("--n", type=_number(int, MIN_IMAGES), default=800)
    demo.add_argument("--workers", type=_config_number("scaling.workers"), default=2)
    demo.add_argument("--epochs", type=_config_number("train.epochs"), default=6,
                      help="epochs of the baseline and of every sweep trial (one budget for both; default 6)")
    demo.add_argument("--samples", type=_config_number("tune.num_samples"), default=4, help="sweep trials (default 4)")
    demo.add_argument("--serve-port", type=_number(int, 0, 65535), default=0,
                      help="port for the final service (default 0: a free one)")
    demo.set_defaults(func=cmd_demo)

    from pneumonia.scoring import add_parser as add_score_parser

    add_score_parser(commands)  # pneumonia score: batch scoring with Ray Data (pneumonia.scoring)
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
    sys.stderr = quiet = QuietNativeLogStream(sys.stderr)  # TensorFlow's start-up chatter from Ray workers
    try:
        args.func(args)
    except Interrupted as error:
        print(error, file=sys.stderr)  # "<what> interrupted: <counts>; <command> continues it"
        return 143 if terminated else error.exit_code
    except PneumoniaError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; a training run continues with `pneumonia train --resume`, a sweep with "
              "`pneumonia tune --resume`", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as error:  # noqa: BLE001 - the contract: one line, never a traceback
        print(_unexpected(error, args.verbose), file=sys.stderr)
        return 1
    finally:
        terminated.restore()
        _shutdown_ray()
        quiet.flush()
        sys.stderr = quiet.stream
    return 0


def _unexpected(error: Exception, verbose: bool) -> str:
    """The one line for an error no check foresaw: an OSError names its file and reason (a full
    disk, a folder made read-only meanwhile); anything else is probably a bug, whose traceback
    ``pneumonia -v`` prints as well."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"error: {where}{error.strerror}"
    if verbose:
        import traceback

        traceback.print_exc()
    return (f"error: unexpected {type(error).__name__}: {_one_line(error)} "
            "(please report it; `pneumonia -v ...` shows where it happened)")


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
