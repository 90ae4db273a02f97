"""The `pneumonia` argument parser: every command, flag, default and help text in one place.

Commands are looked up on their modules when the parser is built, so a test may replace one.
"""

from __future__ import annotations

import argparse

from pneumonia.cli import commands
from pneumonia.cli import demo as demo_command
from pneumonia.cli import evaluate as evaluate_command
from pneumonia.cli.arguments import (
    PORT,
    Parser,
    add_tracking_flags,
    artifact_name,
    config_number,
    number,
    service_url,
    shift_names,
)
from pneumonia.cli.audit import add_parser as add_audit_parser
from pneumonia.cli.calibrate import add_parser as add_calibrate_parser
from pneumonia.cli.score import add_parser as add_score_parser
from pneumonia.data.synth import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, MIN_IMAGES


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="pneumonia", description="Train, tune and serve a chest X-ray pneumonia classifier on Ray."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = subcommands.add_parser("synth", help="write a synthetic dataset in the Kermany layout")
    synth.add_argument("--out", required=True, help="folder to create (must be empty or absent)")
    synth.add_argument("--n", type=number(int, MIN_IMAGES), default=600, help="number of images (default 600)")
    synth.add_argument("--seed", type=number(int, 0), default=0)
    synth.add_argument("--image-size", type=number(int, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE), default=224)
    synth.add_argument("--difficulty", type=number(float, 0), default=1.0, help="higher is harder (default 1.0)")
    synth.add_argument("--json", action="store_true")
    synth.set_defaults(func=commands.cmd_synth)

    data = subcommands.add_parser("data", help="inspect datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    summarize = data_commands.add_parser("summarize", help="counts, patients, sizes and problems")
    # Positional, or --data as every other command names its dataset (a user types either).
    summarize.add_argument("directory", nargs="?", help="a Kermany-layout folder (or --data DIR)")
    summarize.add_argument("--data", dest="data_option", metavar="DIR", help="the same folder, as other commands take it")
    summarize.add_argument("--json", action="store_true")
    summarize.set_defaults(func=commands.cmd_data_summarize)

    train = subcommands.add_parser("train", help="distributed training with Ray Train")
    train.add_argument("--data", help="dataset root (train/ val/ test/) or a folder of class folders")
    train.add_argument("--config", help="YAML experiment config (see tune_configs/)")
    train.add_argument("--workers", type=config_number("scaling.workers"), help="Ray Train workers (default 2)")
    train.add_argument("--gpu", action="store_true", help="one GPU per worker, mixed precision")
    train.add_argument("--epochs", type=config_number("train.epochs"))
    train.add_argument("--batch-size", type=config_number("train.batch_size"), help="per worker")
    train.add_argument("--learning-rate", "--lr", type=config_number("train.learning_rate"), dest="learning_rate")
    train.add_argument("--normal-weight", type=config_number("train.normal_class_weight"),
                       help="class weight of NORMAL relative to PNEUMONIA")
    train.add_argument("--model", choices=["seed", "xraynet"])
    train.add_argument("--image-size", type=config_number("data.image_size"))
    train.add_argument("--storage", help="checkpoint storage: local folder or URI (default $PNEUMONIA_STORAGE, "
                                         "else the config's run.storage, else ./runs)")
    train.add_argument("--name", help="run name (default train-<timestamp>)")
    train.add_argument("--resume", action="store_true", help="continue the named (or latest) run")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key, e.g. data.augment.enabled=true")
    add_tracking_flags(train)
    train.add_argument("--json", action="store_true")
    train.set_defaults(func=commands.cmd_train)

    tune = subcommands.add_parser("tune", help="Ray Tune sweep: precision at a target recall")
    tune.add_argument("--config", required=True, help="YAML with a tune: section (see tune_configs/)")
    tune.add_argument("--data", help="dataset root (train/ val/ test/) or a folder of class folders")
    tune.add_argument("--storage", help="sweep storage: local folder or URI (default $PNEUMONIA_STORAGE, "
                                        "else the config's run.storage, else ./runs)")
    tune.add_argument("--name", help="sweep name (default tune-<timestamp>)")
    tune.add_argument("--samples", type=config_number("tune.num_samples"),
                      help="number of trials (overrides tune.num_samples)")
    tune.add_argument("--resume", action="store_true", help="continue the named (or latest) sweep")
    tune.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key")
    add_tracking_flags(tune)
    tune.add_argument("--json", action="store_true")
    tune.set_defaults(func=commands.cmd_tune)

    evaluate = subcommands.add_parser("evaluate", help="metrics of a checkpoint or artifact on a split")
    evaluate.add_argument("--checkpoint", help="training checkpoint folder (path or URI)")
    evaluate.add_argument("--artifact", help="serving artifact: version folder, or a registry (-> latest)")
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--split", default="test",
                          help="split folder to score (default test), or 'validation': the patient-grouped "
                               "split that training carved out of train/")
    evaluate.add_argument("--threshold", type=number(float, 0, 1),
                          help="decision threshold (default: the artifact's, or 0.5 for a checkpoint)")
    evaluate.add_argument("--report", metavar="DIR", help="also write metrics.json, plots and report.html here")
    evaluate.add_argument("--stress", action="store_true",
                          help="also re-score the split under the shifts a new site brings (exposure, contrast, "
                               "blur, noise, JPEG, framing, resolution): per-shift ROC-AUC and precision at the "
                               "target recall, and the worst case")
    evaluate.add_argument("--shifts", type=shift_names, help="comma-separated subset of the stress shifts (default: all)")
    evaluate.add_argument("--proxy", action="store_true",
                          help="also score the site proxy: each healthy file family against all pneumonia and all "
                               "healthy against each pneumonia kind, clean and under the harsh_site shift; its "
                               "worst pairing ranks recipes for a new site (docs/RESULTS.md)")
    add_tracking_flags(evaluate, recorded=True)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=evaluate_command.cmd_evaluate)

    export = subcommands.add_parser("export", help="checkpoint -> versioned serving artifact in a registry")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--registry", required=True, help="registry folder (versions are kept per model name)")
    export.add_argument("--data", help="dataset root: choose the threshold on its validation split and fit the "
                        "out-of-distribution guard on its training split")
    export.add_argument("--ood-policy", choices=("reject", "flag"), default="reject",
                        help="what serving does with an image the guard says is not a chest X-ray: reject "
                        "(HTTP 422) or flag (200 with out_of_distribution: true and no label); default reject")
    export.add_argument("--name", type=artifact_name, default="pneumonia-cnn", help="model name in the registry")
    add_tracking_flags(export, recorded=True)
    export.add_argument("--json", action="store_true")
    export.set_defaults(func=commands.cmd_export)

    serve_cmd = subcommands.add_parser("serve", help="run the HTTP service for an artifact on a local Ray")
    serve_cmd.add_argument("--artifact", metavar="PATH",
                           help="version folder, model folder or registry (default $PNEUMONIA_ARTIFACT, else ./registry)")
    serve_cmd.add_argument("--port", type=PORT, default=8000)
    serve_cmd.add_argument("--host", default="127.0.0.1",
                           help="address to listen on (default 127.0.0.1: this machine only); any other needs "
                                "tokens or --no-auth")
    serve_auth = serve_cmd.add_mutually_exclusive_group()
    serve_auth.add_argument("--token-file", metavar="FILE",
                            help="bearer tokens, one a line: 'name:token' or 'token' (16+ characters); every route "
                                 "but /healthz, /v2/health/* and the review page's shell then needs 'Authorization: "
                                 "Bearer <token>' (default $PNEUMONIA_TOKEN_FILE, or $PNEUMONIA_TOKENS: the lines "
                                 "themselves)")
    serve_auth.add_argument("--no-auth", action="store_true",
                            help="no tokens, on purpose: needed to serve on an address other than loopback without them")
    serve_cmd.add_argument("--audit-log", metavar="PATH",
                           help="one JSON line per request on /predict, /explain and /v2/models/*/infer (hashes of the "
                                "images, never the images); each replica writes <stem>.<host>-<pid><suffix> beside PATH")
    serve_cmd.add_argument("--audit-max-mb", type=number(float, 0.001), default=100,
                           help="size at which a replica's audit file is rotated (default 100)")
    serve_cmd.add_argument("--audit-backups", type=number(int, 1), default=10,
                           help="rotated audit files kept per replica (default 10)")
    serve_cmd.set_defaults(func=commands.cmd_serve)

    predict = subcommands.add_parser("predict", help="send X-ray files to a running service")
    predict.add_argument("--url", type=service_url, default="http://127.0.0.1:8000")
    predict.add_argument("files", nargs="+", metavar="FILE_OR_FOLDER",
                         help="X-ray files; a folder sends the image files inside it (recursively, sorted)")
    predict.add_argument("--timeout", type=number(float, 0, low_open=True), default=60,
                         help="seconds to wait for each answer (default 60)")
    predict.add_argument("--token-file", metavar="FILE",
                         help="a file with the service's token for you ('name:token' or 'token', one line; "
                              "default $PNEUMONIA_TOKEN, the token itself)")
    predict.add_argument("--json", action="store_true")
    predict.set_defaults(func=commands.cmd_predict)

    demo = subcommands.add_parser("demo", help="data -> baseline and sweep -> artifact -> baseline vs tuned -> serving")
    demo.add_argument("--out", default="demo_out", help="working folder (default ./demo_out)")
    demo.add_argument("--data", help="real X-rays instead of synthetic ones: a folder DIR/{train,test}/{NORMAL,PNEUMONIA} "
                      "or DIR/train only (then a patient-grouped 15%% of train is held out to compare on); "
                      "uses tune_configs/quick_real.yaml")
    demo.add_argument("--seed", type=number(int, 0), default=0,
                      help="seeds the synthetic data, the validation carve, training and the search (default 0)")
    demo.add_argument("--n", type=number(int, MIN_IMAGES), default=1200, help="synthetic images (default 1200)")
    demo.add_argument("--image-size", type=config_number("data.image_size"), default=None,
                      help="pixels per side the models see (default: the sweep config's)")
    demo.add_argument("--workers", type=config_number("scaling.workers"), default=None,
                      help="Ray Train workers per trial (default: the sweep config's, 1 synthetic, 2 real)")
    demo.add_argument("--epochs", type=config_number("train.epochs"), default=None,
                      help="epochs of the baseline and of every sweep trial (one budget for both; "
                      "default: the sweep config's, 6 synthetic, 4 real)")
    demo.add_argument("--samples", type=config_number("tune.num_samples"), default=None,
                      help="searched trials, besides the untuned baseline trial (default: the sweep config's, "
                      "2 synthetic, 2 real)")
    demo.add_argument("--serve-port", type=number(int, 0, 65535), default=0,
                      help="port for the final service (default 0: a free one)")
    demo.add_argument("--json", action="store_true",
                      help="last line: one JSON object (baseline, tuned, tuning_helped, artifact, report, seed)")
    demo.set_defaults(func=demo_command.cmd_demo)

    add_score_parser(subcommands)  # pneumonia score: batch scoring with Ray Data (pneumonia.scoring)
    add_calibrate_parser(subcommands)  # pneumonia calibrate: a site's threshold (pneumonia.evaluation.calibrate)
    add_audit_parser(subcommands)  # pneumonia audit: Grad-CAM shortcut audit (pneumonia.evaluation.shortcuts)
    return parser
