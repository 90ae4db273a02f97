"""`pneumonia evaluate`: metrics of a checkpoint or an artifact on a split, with its stress
report, its out-of-distribution rate and an HTML report on request."""

from __future__ import annotations

import json
from pathlib import Path

from pneumonia.artifacts.registry import load_artifact, read_metadata
from pneumonia.cli.common import emit, require_folder, require_output_folder
from pneumonia.config import config_from_dict
from pneumonia.data.pipeline import predict_probabilities
from pneumonia.errors import PneumoniaError
from pneumonia.models.checkpoint import load_checkpoint


def cmd_evaluate(args) -> None:
    from pneumonia.artifacts.tracking import record_run, tracker_for_source
    from pneumonia.evaluation.evaluate import evaluate_artifact, evaluate_checkpoint  # lazy: scikit-learn
    from pneumonia.metrics.binary import format_table  # lazy: scikit-learn
    from pneumonia.metrics.drift import drift_summary

    _check_evaluate_args(args)
    tracker, recorded = tracker_for_source(args.checkpoint, args.artifact, args.tracking_uri, not args.no_tracking)
    if args.artifact is not None:
        evaluation = evaluate_artifact(args.artifact, args.data, split=args.split, threshold=args.threshold)
        source = {"artifact": args.artifact}
    else:
        threshold = 0.5 if args.threshold is None else args.threshold
        evaluation = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, threshold=threshold)
        source = {"checkpoint": args.checkpoint}
    predictor = _predictor(args) if args.stress or args.proxy else None
    if args.stress:
        evaluation.stress = _stress_for(args, evaluation, *predictor)
    proxy = _proxy_for(args, *predictor) if args.proxy else None
    title = (f"{evaluation.split}: {evaluation.counts['NORMAL']} NORMAL, {evaluation.counts['PNEUMONIA']} PNEUMONIA"
             + (f" ({evaluation.skipped} files skipped)" if evaluation.skipped else ""))
    payload = {**evaluation.metrics, "split": evaluation.split, "skipped": evaluation.skipped, **source}
    text = format_table(evaluation.metrics, title)
    if evaluation.ood is not None:
        payload["out_of_distribution"] = evaluation.ood
        text += (f"\nout-of-distribution guard: {evaluation.ood['count']} of {evaluation.ood['n']} images "
                 f"({evaluation.ood['rate']:.1%}) would not be classified (about {evaluation.ood['expected_rate']:.0%} "
                 "on validation; a sudden rise means data unlike the training data)")
    if evaluation.drift is not None:  # an artifact's (a checkpoint records no reference)
        payload["drift"] = evaluation.drift
        text += "\n" + drift_summary(evaluation.drift)
    if evaluation.stress is not None:
        payload["stress"] = evaluation.stress.to_json()
        text += "\n\nshift stress validation (" + f"{evaluation.stress.n} images):\n" + evaluation.stress.table()
    if proxy is not None:
        payload["proxy"] = proxy.to_json()
        text += f"\n\nsite proxy ({proxy.n} images):\n" + proxy.table()
    if args.report:
        from pneumonia.evaluation.report import write_report  # lazy: matplotlib and scikit-learn

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
    run_id = record_run(
        tracker, f"evaluate {evaluation.split}", "evaluate", recorded=recorded,
        params={**source, "data": args.data, "split": evaluation.split, "threshold": evaluation.metrics["threshold"],
                "stress": bool(args.stress), "shifts": args.shifts, "proxy": bool(args.proxy)},
        metrics={**evaluation.metrics, "skipped": evaluation.skipped,
                 **({"ood_rate": evaluation.ood["rate"]} if evaluation.ood else {}),
                 **{f"stress.{key}": value for key, value in (payload.get("stress") or {}).get("summary", {}).items()},
                 **{key: value for key, value in (proxy.summary() if proxy else {}).items() if isinstance(value, float)}},
        tags={"dataset.root": args.data},
        files=sorted(path for path in Path(args.report).iterdir() if path.is_file()) if args.report else ())
    if run_id:
        payload["tracking"] = {"tracking_uri": tracker.uri, "run_id": run_id}
    emit(payload, args.json, text)


def _check_evaluate_args(args) -> None:
    """Every argument before the model loads (TensorFlow takes seconds to start): one model, an
    existing data folder, a readable artifact, a writable report folder. The data's layout and the
    split are checked next, by evaluate_checkpoint/evaluate_artifact, still before the model loads."""
    if (args.checkpoint is None) == (args.artifact is None):
        raise PneumoniaError("pass exactly one of --checkpoint and --artifact")
    if args.shifts and not args.stress:
        raise PneumoniaError("--shifts chooses the shifts of --stress: add --stress")
    require_folder(args.data, "--data", "data folder")
    if args.checkpoint is not None:
        require_folder(args.checkpoint, "--checkpoint", "checkpoint folder")
    else:
        read_metadata(args.artifact)  # resolves it and checks its metadata, without TensorFlow
    if args.report:
        require_output_folder(args.report, "--report")


def _threshold_choice(args) -> dict | None:
    """How the evaluated artifact's threshold was chosen (recorded by `export --data`), when it is the one scored."""
    if args.artifact is None or args.threshold is not None:
        return None

    return (read_metadata(args.artifact).get("validation_metrics") or {}).get("operating_point")


def _predictor(args):
    """(predict, preprocessing, training config, its target recall) of the model cmd_evaluate scores."""
    if args.artifact is not None:
        artifact = load_artifact(args.artifact)
        predict, spec, config = artifact.predict, artifact.preprocess, artifact.metadata.get("training_config")
    else:
        model, info = load_checkpoint(args.checkpoint)
        predict, spec, config = (lambda images: predict_probabilities(model, images)), info.preprocess, info.config
    return predict, spec, config, config_from_dict(config or {}).objective.target_recall


def _proxy_for(args, predict, spec, config, target):
    """The site proxy of what cmd_evaluate scored."""
    from pneumonia.evaluation.evaluate import proxy_evaluate  # lazy: scikit-learn

    try:
        return proxy_evaluate(predict, spec, args.data, args.split, config, target)
    except ValueError as error:
        raise PneumoniaError(str(error)) from None


def _stress_for(args, evaluation, predict, spec, config, target):
    """The stress report of what cmd_evaluate scored, at the same threshold."""
    from pneumonia.evaluation.evaluate import stress_evaluate  # lazy: scikit-learn

    shifts = [name.strip() for name in args.shifts.split(",")] if args.shifts else None
    # The drift columns keep the operating point a user would deploy: an artifact's own threshold
    # (or --threshold); for a bare checkpoint the one its clean images give for the target recall.
    threshold = evaluation.metrics["threshold"] if args.artifact is not None or args.threshold is not None else None
    try:
        return stress_evaluate(predict, spec, args.data, args.split, config, target,
                               threshold=threshold, shifts=shifts)
    except ValueError as error:
        raise PneumoniaError(str(error)) from None

