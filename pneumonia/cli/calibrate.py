"""``pneumonia calibrate``: choose the threshold on a labelled sample of a site and publish it as
a new version (:mod:`pneumonia.evaluation.calibrate`), with an acceptance report on request."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pneumonia.artifacts.registry import check_site_name, read_metadata
from pneumonia.cli.arguments import add_tracking_flags, number
from pneumonia.cli.common import emit, require_folder, require_output_folder
from pneumonia.errors import PneumoniaError
from pneumonia.storage import is_uri


def add_parser(subparsers) -> None:
    """``pneumonia calibrate``: wired into :func:`pneumonia.cli.parser.build_parser` with one line."""
    parser = subparsers.add_parser(
        "calibrate", help="choose the decision threshold on a labelled sample of your site; publish it as a new version")
    parser.add_argument("--artifact", required=True, help="serving artifact: version folder, or a registry (-> latest)")
    parser.add_argument("--data", required=True,
                        help="the site's labelled sample: a folder of NORMAL/ and PNEUMONIA/ folders, or a .csv/.parquet "
                             "manifest with 'path' and 'label' (NORMAL/PNEUMONIA or 0/1) columns and optionally 'patient'")
    parser.add_argument("--site", required=True, type=_site, help="the site's name, recorded in the new version")
    parser.add_argument("--target-recall", type=number(float, 0, 1, low_open=True, high_open=True),
                        help="sensitivity the threshold must keep (default: the artifact's, usually 0.95)")
    parser.add_argument("--confidence", type=number(float, 0, 1, low_open=True, high_open=True), default=0.95,
                        help="confidence of the recall lower bound (default 0.95)")
    parser.add_argument("--min-precision", type=number(float, 0, 1),
                        help="also require this precision on the sample; below it nothing is published")
    parser.add_argument("--report", metavar="DIR", help="write the acceptance report (acceptance.html, .json, plots) here")
    parser.add_argument("--dry-run", action="store_true", help="measure and report, publish nothing")
    add_tracking_flags(parser, recorded=True)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=cmd_calibrate)


def _site(text: str) -> str:
    try:
        return check_site_name(text)
    except PneumoniaError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def cmd_calibrate(args) -> None:
    from pneumonia.artifacts.tracking import tracker_for_source
    from pneumonia.evaluation.acceptance import write_acceptance_report  # lazy: matplotlib
    from pneumonia.evaluation.calibrate import AcceptanceFailed, calibrate  # lazy: scikit-learn, TensorFlow

    read_metadata(args.artifact)  # resolves it and checks its metadata, without TensorFlow
    suffix = Path(args.data).suffix.lower()
    if not is_uri(args.data) and suffix not in (".csv", ".parquet", ".pq"):
        require_folder(args.data, "--data", "sample folder")
    if args.report:
        require_output_folder(args.report, "--report")
    tracker, recorded = tracker_for_source(artifact=args.artifact, tracking_uri=args.tracking_uri,
                                           track=not args.no_tracking)
    result = calibrate(args.artifact, args.data, args.site, target_recall=args.target_recall,
                       confidence=args.confidence, min_precision=args.min_precision, publish=not args.dry_run,
                       progress=lambda line: print(line, file=sys.stderr, flush=True))
    if args.report:
        result.report = str(write_acceptance_report(args.report, result))
    tracked = _track(tracker, recorded, args, result)
    emit({**result.to_json(), **({"tracking": tracked} if tracked else {})}, args.json, result.summary())
    if not result.passed:
        failed = "; ".join(f"{item['criterion']} (measured {item['value']:.3f})"
                           for item in result.criteria if not item["passed"])
        raise AcceptanceFailed(f"site {args.site} fails acceptance: {failed}; nothing was published")


def _track(tracker, recorded, args, result) -> dict | None:
    """The calibration as an MLflow run (nested under the training run), the published version
    registered in MLflow's model registry with its site; what was recorded, or None."""
    from pneumonia.artifacts.tracking import record_run, register_artifact

    run_id = record_run(
        tracker, f"calibrate {args.site}", "calibrate", recorded=recorded, finish=False,
        params={"artifact": args.artifact, "source_version": result.source.version, "data": args.data,
                "site": args.site, "target_recall": result.target_recall, "confidence": result.confidence,
                "min_precision": args.min_precision, "dry_run": bool(args.dry_run)},
        metrics={"threshold": result.point.threshold, "shipped_threshold": result.source.threshold,
                 "passed": float(result.passed), "images": result.scored_images,
                 "out_of_distribution": result.out_of_distribution, "unreadable": result.unreadable,
                 **{f"site.{key}": value for key, value in result.at_site.values.items()},
                 **{f"shipped.{key}": value for key, value in result.at_shipped.values.items()}},
        tags={"site": args.site, "pneumonia.version": result.published.version if result.published else None},
        files=sorted(path for path in Path(args.report).iterdir() if path.is_file()) if args.report else ())
    if run_id is None:
        return None
    number = None
    if result.published is not None:
        number = register_artifact(tracker, result.published, run_id,
                                   {"pneumonia.calibrated_from": result.source.version})
    tracker.end(run_id)
    return {"tracking_uri": tracker.uri, "run_id": run_id,
            **({"registered_model": {"name": result.published.metadata["name"], "version": number}} if number else {})}
