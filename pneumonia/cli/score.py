"""``pneumonia score`` on the command line, shaped like the commands in :mod:`pneumonia.cli`."""

from __future__ import annotations

from pathlib import Path

from pneumonia.cli.arguments import number
from pneumonia.cli.common import emit, require_folder, shutdown_ray
from pneumonia.scoring.run import DEFAULT_BATCH_SIZE, score
from pneumonia.storage import is_uri


def add_parser(subparsers) -> None:
    """``pneumonia score``: wired into :func:`pneumonia.cli.build_parser` with one line."""
    parser = subparsers.add_parser("score", help="score a folder, prefix or manifest of X-rays with Ray Data")
    parser.add_argument("--artifact", required=True,
                        help="serving artifact: version folder, name folder or registry (-> latest); path or URI")
    parser.add_argument("--input", required=True,
                        help="folder or object-store prefix of images (recursive), or a .csv/.parquet manifest "
                             "with a 'path' column")
    parser.add_argument("--output", help="scores file: .parquet (default) or .csv, path or URI; a re-run with the "
                                         "same output skips what is scored (default ./<input name>-scores.parquet)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per scoring actor")
    parser.add_argument("--batch-size", type=number(int, 1, 4096), default=DEFAULT_BATCH_SIZE,
                        help=f"images per forward pass (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--concurrency", type=number(int, 1, 1024),
                        help="scoring actors (default: one per GPU with --gpu, else one per CPU)")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=cmd_score)


def cmd_score(args) -> None:
    if not is_uri(args.input) and not Path(args.input).expanduser().is_file():
        require_folder(args.input, "--input", "input folder")
    result = score(args.artifact, args.input, args.output, gpu=args.gpu, batch_size=args.batch_size,
                   concurrency=args.concurrency, progress=lambda line: print(line, flush=True))
    shutdown_ray()
    emit(result.to_json(), args.json, result.summary())
