"""``pneumonia audit``: a shortcut audit with Grad-CAM (:mod:`pneumonia.evaluation.shortcuts`).

Does the model, when it scores a healthy child high, look at the frame's border, the corners or
outside the lungs more than when it finds pneumonia? The answer is a table of region enrichments
per group, one sentence with its uncertainty and, with ``--report``, montages to look at.
"""

from __future__ import annotations

import argparse
import sys

from pneumonia.cli.arguments import number
from pneumonia.cli.common import emit, require_folder, require_output_folder
from pneumonia.config import check_shift_names
from pneumonia.errors import PneumoniaError
from pneumonia.evaluation.shortcuts import DEFAULT_TOP, load_split, run_audit, write_report


def add_parser(subparsers) -> None:
    """``pneumonia audit``: wired into :func:`pneumonia.cli.parser.build_parser` with one line."""
    parser = subparsers.add_parser(
        "audit", help="shortcut audit: where Grad-CAM puts the evidence when healthy X-rays score high")
    parser.add_argument("--checkpoint", help="training checkpoint folder (path or URI)")
    parser.add_argument("--artifact", help="serving artifact: version folder, or a registry (-> latest)")
    parser.add_argument("--data", required=True, help="dataset root (train/ and, for --split test, test/)")
    parser.add_argument("--split", choices=("validation", "test"), default="validation",
                        help="validation (default): the patient-grouped split training carved out of train/; "
                             "test: the test/ folder")
    parser.add_argument("--top", type=number(int, 1), default=DEFAULT_TOP,
                        help=f"images per group (default {DEFAULT_TOP}): the highest- and lowest-scoring healthy "
                             "X-rays and the highest-scoring pneumonia X-rays")
    parser.add_argument("--shift", type=_shift,
                        help="also audit under one stress shift (e.g. new_site), groups chosen again by the "
                             "shifted scores")
    parser.add_argument("--report", metavar="DIR", help="write audit.json and one montage PNG per group here")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=cmd_audit)


def _shift(text: str) -> str:
    try:
        return check_shift_names([text.strip()])[0]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def cmd_audit(args) -> None:
    if (args.checkpoint is None) == (args.artifact is None):
        raise PneumoniaError("pass exactly one of --checkpoint and --artifact")
    require_folder(args.data, "--data", "data folder")
    if args.checkpoint is not None:
        require_folder(args.checkpoint, "--checkpoint", "checkpoint folder")
    if args.report:
        require_output_folder(args.report, "--report")
    spec, config, threshold, source = _model_facts(args)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    decoded, skipped = load_split(args.data, args.split, config, spec)  # before the model: fails in seconds
    progress(f"loading the model ({len(decoded.records)} {args.split} images decoded)")
    model = _load_model(args)
    result = run_audit(model, decoded, spec, split=args.split, top=args.top, shift=args.shift,
                       threshold=threshold, skipped=skipped, progress=progress)
    payload = {**result.to_json(), **source, "data": args.data}
    text = result.summary()
    if args.report:
        files = write_report(args.report, result)
        payload["report"] = [str(path) for path in files]
        text += f"\nreport: {files[0]} and {len(files) - 1} montages in {args.report}"
    emit(payload, args.json, text)


def _model_facts(args) -> tuple:
    """(preprocessing spec, training config, decision threshold, source) without TensorFlow."""
    if args.artifact is not None:
        from pneumonia.artifacts.registry import verify_artifact

        verified = verify_artifact(args.artifact)
        return (verified.preprocess, verified.metadata.get("training_config"), verified.threshold,
                {"artifact": str(verified.path)})
    from pneumonia.models.checkpoint import read_info
    from pneumonia.storage import local_directory

    with local_directory(args.checkpoint) as directory:
        info = read_info(directory)
    # A checkpoint's own validation threshold when training recorded one (as export takes it), else 0.5.
    return info.preprocess, info.config, float(info.metrics.get("val_threshold", 0.5)), {"checkpoint": args.checkpoint}


def _load_model(args):
    """The Keras model (one network or an ensemble), verified against its recorded sha256."""
    if args.artifact is not None:
        from pneumonia.artifacts.registry import load_artifact

        return load_artifact(args.artifact).keras_model()
    from pneumonia.models.checkpoint import load_checkpoint

    return load_checkpoint(args.checkpoint)[0]
