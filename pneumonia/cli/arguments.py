"""argparse types that check a value while parsing (exit 2, one line): numbers within their
bounds (a flag that sets a config key takes that key's own bounds), URLs, shift and model names."""

from __future__ import annotations

import argparse
import math
from typing import Any

from pneumonia.artifacts.registry import NAME_PATTERN
from pneumonia.config import ExperimentConfig, check_shift_names
from pneumonia.errors import PneumoniaError
from pneumonia.serving.client import check_url


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (exit 2), like every other error of the CLI."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def number(kind: type, low: float | None = None, high: float | None = None, *,
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
            raise argparse.ArgumentTypeError(f"must be {range_text(low, high, low_open, high_open)}{where}, "
                                              f"got {text}")
        return value

    return parse


def range_text(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None and not (low_open or high_open):
        return f"between {low:g} and {high:g}"
    parts = []
    if low is not None:
        parts.append(f"above {low:g}" if low_open else f"at least {low:g}")
    if high is not None:
        parts.append(f"below {high:g}" if high_open else f"at most {high:g}")
    return " and ".join(parts) or "a finite number"


def config_number(key: str):
    """An argparse type for a flag that sets config key ``key``: the key's own type and bounds,
    read from the config model (one source of truth), checked while parsing."""

    def parse(text: str):
        field = config_field(key)
        bounds = {name: getattr(item, name) for item in field.metadata
                  for name in ("ge", "gt", "le", "lt") if getattr(item, name, None) is not None}
        kind = int if field.annotation is int else float
        return number(kind, bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt")),
                       low_open="gt" in bounds, high_open="lt" in bounds, key=key)(text)

    return parse


def config_field(key: str):
    """The pydantic field behind a dotted config key (``train.epochs``)."""
    import typing

    from pydantic import BaseModel

    model: Any = ExperimentConfig
    *sections, leaf = key.split(".")
    for section in sections:
        annotation = model.model_fields[section].annotation
        model = next(option for option in (annotation, *typing.get_args(annotation))
                     if isinstance(option, type) and issubclass(option, BaseModel))
    return model.model_fields[leaf]


def service_url(text: str) -> str:
    try:
        return check_url(text)
    except PneumoniaError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def shift_names(text: str) -> str:
    try:
        check_shift_names([name.strip() for name in text.split(",")])
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def artifact_name(text: str) -> str:
    """A model name the registry accepts, checked before the checkpoint's model loads."""
    if not NAME_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} must be letters, digits, '.', '_' or '-' (a folder name)")
    return text


PORT = number(int, 1, 65535)


def add_tracking_flags(parser: argparse.ArgumentParser, recorded: bool = False) -> None:
    """``--tracking-uri`` and ``--no-tracking`` (pneumonia.artifacts.tracking): where the command's MLflow run goes."""
    where = ("default: the store the model's training run was tracked in, else $MLFLOW_TRACKING_URI, else "
             "mlflow.db beside it" if recorded else
             "default: tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite:///<storage>/mlflow.db")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--tracking-uri", metavar="URI",
                       help=f"MLflow tracking store, e.g. http://mlflow:5000 or sqlite:///runs/mlflow.db ({where})")
    group.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow (tracking.enabled: false)")
