"""The commands that train, tune, export, serve and query: each parses nothing, checks its inputs
before any library call (so a mistake costs seconds, not a Ray start) and calls the library."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pneumonia.artifacts.registry import ArtifactError, artifact_warning, verify_artifact
from pneumonia.cli.common import (
    emit,
    one_line,
    require_folder,
    require_output_folder,
    shutdown_ray,
    storage,
)
from pneumonia.config import load_config, parse_set_option, with_overrides
from pneumonia.data.records import check_training_data
from pneumonia.data.summary import summarize
from pneumonia.data.synth import make_synthetic_dataset
from pneumonia.errors import OutputError, PneumoniaError
from pneumonia.serving import local_service
from pneumonia.serving.audit import replica_path
from pneumonia.serving.auth import TOKEN_FILE_VARIABLE, TOKENS_VARIABLE, is_loopback, resolve_tokens
from pneumonia.serving.client import client_token, format_predictions, predict_files
from pneumonia.storage import is_uri
from pneumonia.training.driver import train
from pneumonia.training.sweep import score_rule, tune


def cmd_synth(args) -> None:
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
    emit({"root": str(summary.root), "counts": summary.counts, "patients": summary.patients}, args.json, text)


def cmd_data_summarize(args) -> None:
    if args.directory and args.data_option and args.directory != args.data_option:
        raise PneumoniaError(f"two data folders given ({args.directory} and --data {args.data_option}): give one")
    directory = args.directory or args.data_option
    if not directory:
        raise PneumoniaError("no data folder given: pneumonia data summarize DIR (or --data DIR)")
    require_folder(directory, None if args.directory else "--data", "data folder")
    summary = summarize(directory)
    emit(summary.to_json(), args.json, summary.format())


def train_overrides(args) -> dict[str, Any]:
    overrides = {
        "scaling.workers": args.workers,
        "scaling.gpu": True if args.gpu else None,
        "train.epochs": args.epochs,
        "train.batch_size": args.batch_size,
        "train.learning_rate": args.learning_rate,
        "train.normal_class_weight": args.normal_weight,
        "model.name": args.model,
        "data.image_size": args.image_size,
        "run.storage": storage(args),
        "run.name": args.name,
        **tracking_overrides(args),
    }
    overrides.update(parse_set_option(args.set or []))
    return overrides


def tracking_overrides(args) -> dict[str, Any]:
    """--tracking-uri and --no-tracking as config keys (tracking.uri, tracking.enabled)."""
    return {"tracking.uri": args.tracking_uri, "tracking.enabled": False if args.no_tracking else None}


def cmd_train(args) -> None:
    overrides = train_overrides(args)
    config = with_overrides(load_config(args.config), overrides)
    if args.resume and args.data is None:
        data = None
    elif args.data is None:
        raise PneumoniaError("--data is required (a dataset root or a folder of class folders)")
    else:
        data = args.data
        require_folder(data, "--data", "data folder")
        require_output_folder(config.run.storage, "--storage" if storage(args) else "run.storage")
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
    shutdown_ray()
    text = (
        f"best checkpoint (epoch {result.best_epoch} of {result.epochs_completed}): {result.best_checkpoint}\n"
        + "\n".join(f"  val {name:<12} {value:.4f}" for name, value in result.metrics.items())
    )
    emit(result.to_json(), args.json, text)


def cmd_tune(args) -> None:
    overrides = {"run.storage": storage(args), "run.name": args.name, "tune.num_samples": args.samples,
                 **tracking_overrides(args)}
    overrides.update(parse_set_option(args.set or []))
    config = with_overrides(load_config(args.config), overrides)
    if not args.resume:
        _check_new_sweep(args, config)
    result = tune(config, args.data, resume=args.resume, progress=lambda line: print(line, flush=True))
    shutdown_ray()
    lines = [f"{'trial':<10}{'objective':>10}{'pr_auc':>8}{'epochs':>7}  params"]
    for trial in result.trials:
        params = ", ".join(f"{k[6:]}={_short(v)}" for k, v in trial.items() if k.startswith("param:"))
        objective = "-" if trial["objective"] is None else f"{trial['objective']:.4f}"
        pr_auc = "-" if trial["pr_auc"] is None else f"{trial['pr_auc']:.4f}"
        lines.append(f"{trial['trial_id']:<10}{objective:>10}{pr_auc:>8}{trial['epochs']:>7}  {params}")
    lines += [
        f"best: score {result.objective:.4f} ({score_rule(config.objective.metric)}; "
        f"precision at recall >= {config.objective.target_recall}), threshold {result.threshold:.4f}; "
        f"checkpoint {result.best_checkpoint}",
        f"results: {result.results_csv}; plots: {', '.join(result.plots)}",
    ]
    emit(result.to_json(), args.json, "\n".join(lines))


def _check_new_sweep(args, config) -> None:
    """What a new sweep needs, checked before Ray starts: readable training images
    (pneumonia.data.records.check_training_data) and writable storage."""
    if args.data is None:
        raise PneumoniaError("--data is required (a dataset root or a folder of class folders)")
    if config.tune is None:
        return  # tune() says so, before anything starts
    require_folder(args.data, "--data", "data folder")
    check_training_data(args.data)
    require_output_folder(config.run.storage, "--storage" if storage(args) else "run.storage")


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def cmd_export(args) -> None:
    from pneumonia.artifacts.export import export  # lazy: scikit-learn

    _check_export_args(args)
    exported = export(args.checkpoint, args.registry, data_root=args.data, name=args.name, ood_policy=args.ood_policy,
                      tracking_uri=args.tracking_uri, track=not args.no_tracking)
    emit(exported.to_json(), args.json, exported.summary())


def _check_export_args(args) -> None:
    """The checkpoint, registry and data, checked before the checkpoint's model loads."""
    require_folder(args.checkpoint, "--checkpoint", "checkpoint folder")
    if is_uri(args.registry):
        raise OutputError(f"--registry {args.registry}: the registry must be a local folder")
    require_output_folder(args.registry, "--registry")
    if args.data is not None:
        require_folder(args.data, "--data", "data folder")
        check_training_data(args.data)


def cmd_serve(args) -> None:
    """Run the Serve application on a local Ray until Ctrl-C or SIGTERM, then stop it cleanly."""
    import signal
    import time

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # `kill`, `docker stop`: the same clean stop as Ctrl-C
    artifact, source = serve_artifact(args.artifact)
    app_args = serve_security(args)
    # What a replica checks on load, short of TensorFlow, before Ray starts: a corrupt artifact
    # fails in a second with its reason, not after Serve has given up on the replicas.
    try:
        metadata = verify_artifact(artifact).metadata
    except ArtifactError:
        if args.artifact or Path(artifact).expanduser().exists():
            raise
        raise ArtifactError(f"no artifact to serve: looked for {source}, and {Path(artifact).expanduser().absolute()} "
                            "does not exist; give one with --artifact PATH (a registry, a model folder or a version "
                            "folder such as registry/pneumonia-cnn/v0001), made by `pneumonia export` or "
                            "`pneumonia demo`") from None
    try:
        with local_service.local_service(artifact, host=args.host, port=args.port, app_args=app_args) as url:
            print(f"serving {artifact} on {url} (POST /predict, /explain; GET /healthz, /model, /v2/...); "
                  "Ctrl-C stops", flush=True)
            print(f"review page: {url}/ (open it in a browser)", flush=True)
            warning = artifact_warning(metadata)
            if warning:  # also in every answer; said here so that whoever starts it cannot miss it
                print(f"WARNING: this model was {warning}", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    except RuntimeError as error:  # Serve gave up deploying (its replicas' logs above say why)
        raise PneumoniaError(f"the service did not start: {one_line(error)}") from None
    print("service stopped", flush=True)


def serve_artifact(given: str | None, environ: dict[str, str] | None = None) -> tuple[str, str]:
    """(the artifact to serve, what named it, as a user reads it): --artifact, else
    $PNEUMONIA_ARTIFACT, else ./registry."""
    environ = os.environ if environ is None else environ
    if given:
        return given, f"--artifact {given}"
    if environ.get("PNEUMONIA_ARTIFACT"):
        return environ["PNEUMONIA_ARTIFACT"], f"$PNEUMONIA_ARTIFACT ({environ['PNEUMONIA_ARTIFACT']})"
    return "registry", "./registry (the default when neither --artifact nor $PNEUMONIA_ARTIFACT is given)"


def serve_security(args) -> dict[str, Any]:
    """The app arguments for `pneumonia serve`'s tokens and audit log, checked before Ray starts:
    a bad token file, a non-loopback address without tokens (unless --no-auth) and an audit log
    that cannot be written are one-line errors. Prints what it chose (token names, never tokens)."""
    tokens = resolve_tokens(args.token_file, args.no_auth)
    try:
        loopback = is_loopback(args.host)
    except (OSError, UnicodeError) as error:
        raise PneumoniaError(f"cannot serve on {args.host}:{args.port}: {getattr(error, 'strerror', None) or error}") from None
    if not tokens and not loopback and not args.no_auth:
        raise PneumoniaError(f"refusing to serve on {args.host} without tokens: whoever reaches it could use it; give "
                             f"--token-file FILE (or set ${TOKEN_FILE_VARIABLE} or ${TOKENS_VARIABLE}), or --no-auth "
                             "to serve it open on purpose")
    app_args: dict[str, Any] = {}
    if args.token_file:
        app_args["token_file"] = str(Path(args.token_file).expanduser().resolve())
    elif not tokens:
        app_args["no_auth"] = True  # on purpose, or loopback with no tokens anywhere
    if tokens:
        print(f"tokens: {', '.join(token.name for token in tokens)} (every route but /healthz, /v2/health/* and "
              "the review page's shell needs one)", flush=True)
    elif not loopback:
        print(f"no tokens (--no-auth): every route is open to whoever reaches {args.host}", flush=True)
    if args.audit_log:
        path = Path(args.audit_log).expanduser().absolute()
        if path.is_dir():
            raise PneumoniaError(f"--audit-log {args.audit_log} is a folder; give a file name in it (audit.jsonl)")
        require_output_folder(str(path.parent), "--audit-log")
        app_args.update(audit_log=str(path), audit_max_bytes=int(args.audit_max_mb * 1024 * 1024),
                        audit_backups=args.audit_backups)
        print(f"audit log: {replica_path(path, pid='<pid>', host='<host>')} (one file per replica)", flush=True)
    return app_args


def cmd_predict(args) -> None:
    """POST each file to a running service and print its answer."""
    token = client_token(args.token_file)
    rows = predict_files(args.url, args.files, timeout_s=args.timeout, token=token)
    emit({"predictions": rows}, args.json, format_predictions(rows))
    failed = sum("error" in row for row in rows)
    if failed:
        raise PneumoniaError(f"{failed} of {len(rows)} files were refused")

