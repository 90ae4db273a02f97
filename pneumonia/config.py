"""Typed experiment configuration, loaded from YAML.

One config format serves every step (train, tune, export): a YAML file with the sections below,
validated on load so that a typo or an impossible value fails in the first second with a message
that names the key, instead of an hour into a cluster run. Flags on the command line override
single keys (``train.epochs=3``) and are validated the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pneumonia.errors import ConfigError


class _Section(BaseModel):
    """Base for config sections: unknown keys are errors, values are re-checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class AugmentConfig(_Section):
    """Label-preserving augmentation for training only.

    Small geometric and contrast changes that a real X-ray could show (patient position, exposure).
    No flips: the heart is on the left, and a mirrored chest is not a plausible image.
    """

    enabled: bool = False
    rotation_deg: float = Field(5.0, ge=0, le=20)
    shift: float = Field(0.05, ge=0, le=0.2, description="fraction of the image size")
    zoom: float = Field(0.05, ge=0, le=0.2)
    contrast: float = Field(0.1, ge=0, le=0.5)
    brightness: float = Field(0.0, ge=0, le=0.5, description="exposure change, fraction of the range")
    gamma: float = Field(0.0, ge=0, le=0.8, description="log-uniform gamma in [exp(-g), exp(g)]")
    blur: float = Field(0.0, ge=0, le=1, description="probability of a mild Gaussian blur")
    noise: float = Field(0.0, ge=0, le=0.2, description="max Gaussian noise std, fraction of the range")


class DataConfig(_Section):
    """How images become tensors and how validation is carved out of train."""

    image_size: int = Field(150, ge=16, le=1024, description="square side in pixels")
    channels: Literal[1, 3] = 1
    resize: Literal["stretch", "pad"] = Field(
        "stretch",
        description="stretch: resize to a square ignoring aspect ratio (as the original notebook "
        "and the 224 px copy of the data do); pad: letterbox to a square first.",
    )
    normalize: Literal["none", "standardize", "equalize"] = Field(
        "none",
        description="intensity normalisation inside decode_image (served identically): "
        "standardize maps each image to mean 128, std 48; equalize applies histogram equalisation.",
    )
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    seed: int = 42
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    cache: bool = Field(True, description="keep decoded images in memory after the first epoch")


class ModelConfig(_Section):
    name: Literal["seed", "xraynet", "resxnet"] = "xraynet"
    dropout: float = Field(0.3, ge=0, lt=1)
    width: int = Field(32, ge=4, le=256, description="filters of the first block (xraynet, resxnet)")
    depth: int = Field(1, ge=1, le=4, description="residual blocks per stage (resxnet only)")
    se: bool = Field(True, description="squeeze-and-excitation gates in the residual blocks (resxnet only)")


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(20, ge=1, le=4096, description="per worker")
    learning_rate: float = Field(1e-3, gt=0, lt=1)
    optimizer: Literal["adam", "rmsprop"] = "adam"
    normal_class_weight: float = Field(
        1.0, gt=0, le=100, description="loss weight of NORMAL relative to PNEUMONIA (1.0)"
    )
    mixed_precision: bool | None = Field(
        None, description="float16 compute; default: on with GPUs, off on CPUs"
    )
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="learning-rate schedule over the run (cosine: decays to 1% of lr)"
    )
    warmup_epochs: float = Field(0.0, ge=0, le=100, description="linear warm-up before the schedule")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="keep an exponential moving average of the weights (e.g. 0.99); "
        "validation, checkpoints and export use the averaged weights"
    )
    seed: int = Field(0, ge=0, description="weight initialisation, shuffling and augmentation; "
                      "ensemble member i trains with seed + i")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    mixup: float = Field(0.0, ge=0, le=1, description="mixup Beta(alpha, alpha); 0 turns it off")


class ScalingSection(_Section):
    workers: int = Field(2, ge=1, le=1024)
    gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, le=256)


class RunSection(_Section):
    storage: str = Field("runs", description="local folder or pyarrow URI (s3://, gs://)")
    name: str | None = Field(None, description="run name; default train-<timestamp>")
    keep_checkpoints: int = Field(3, ge=1, le=100)
    checkpoint_metric: str = "val_roc_auc"
    checkpoint_mode: Literal["max", "min"] = "max"
    max_failures: int = Field(2, ge=-1, le=100, description="worker failures to recover from; -1: always")
    resource_wait_s: float | None = Field(
        120.0, gt=0, description="after this long waiting for its workers' CPUs/GPUs, a run says what it wants, "
        "what is free and who holds the rest; null: never")
    resource_timeout_s: float | None = Field(
        300.0, gt=0, description="on a cluster without an autoscaler, stop a run whose workers waited this long "
        "and fail with that line; null: wait forever (an autoscaling cluster always waits)")
    start_retries: int = Field(2, ge=0, le=100, description="worker start-up failures retried before the run fails")
    heartbeat_timeout_s: float = Field(
        120.0, ge=10, le=3600, description="how long TensorFlow's coordination service waits for a worker's "
        "heartbeat before it aborts the collectives (TensorFlow's own default: 10 s); Ray Train notices a dead "
        "worker by itself")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or "/" in value or value.startswith(".")):
            raise ValueError("must be a plain folder name (no '/', not starting with '.')")
        return value


SHIFT_NAMES = (
    "new_site", "harsh_site", "darker", "brighter", "gamma_0.7", "gamma_1.4", "low_contrast", "high_contrast", "blur",
    "sharpen", "noise", "jpeg_q25", "zoom_in", "zoom_out", "shifted", "rotated", "narrower", "low_res",
)
"""The stress shifts a config may name, in report order (each made by pneumonia.data.shifts.SHIFTS)."""


def check_shift_names(names: list[str] | None) -> list[str]:
    """``names`` if every one is a known shift (all of them for None); ValueError naming the unknown."""
    if names is None:
        return list(SHIFT_NAMES)
    unknown = [name for name in names if name not in SHIFT_NAMES]
    if unknown:
        raise ValueError(f"unknown stress shift(s) {', '.join(unknown)}; choose from {', '.join(SHIFT_NAMES)}")
    return list(names)


class StressConfig(_Section):
    """Shift stress validation: the validation split re-scored under the changes a new site brings."""

    enabled: bool = Field(False, description="score the stress shifts after every epoch (costs time)")
    shifts: list[str] | None = Field(None, description="names from SHIFT_NAMES; default all")

    @field_validator("shifts")
    @classmethod
    def _known_shifts(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            check_shift_names(value)
        return value
    max_images: int | None = Field(None, ge=10, description="score a seeded, stratified subset of validation")


class ObjectiveConfig(_Section):
    """What "better" means: the highest precision at a clinically safe recall (sensitivity)."""

    target_recall: float = Field(0.95, gt=0, le=1)
    metric: str = Field(
        "val_precision_at_recall",
        description="reported metric a sweep maximises (e.g. val_stress_worst_roc_auc with stress.enabled)",
    )
    threshold_rule: Literal["point", "lower_bound"] = Field(
        "lower_bound",
        description="point: validation recall >= target; lower_bound: the lower end of the patient-"
        "bootstrap confidence interval of validation recall >= target (a margin for shift)",
    )
    confidence: float = Field(0.95, gt=0.5, lt=1, description="two-sided level of that interval")
    bootstrap_samples: int = Field(1000, ge=100, le=100_000)


class EnsembleConfig(_Section):
    """Train K members (seeds) in parallel as Ray Train runs and export them as one artifact."""

    members: int = Field(1, ge=1, le=32, description="1: a single model")
    max_concurrent: int | None = Field(None, ge=1, description="members training at once; default: as many as fit")


class DistillConfig(_Section):
    """Knowledge distillation: one student learns the teacher's probabilities and ships alone.

    Why: an ensemble ranks X-rays from a new site better than one model, at K models' serving cost.
    The student is one model of ``model`` trained like any run, except that its target on every
    training batch is ``weight`` x the teacher's probability on the *same augmented batch* plus
    (1 - weight) x the label ("consistent" teaching, Beyer et al. 2022: the teacher is asked about
    every view the student sees, so the student learns the teacher's function around the images,
    not only at them). The teacher is the ensemble this run trains (``ensemble.members`` > 1), or
    ``teacher``: an existing checkpoint, e.g. ``runs/<name>/ensemble``.
    """

    enabled: bool = False
    teacher: str | None = Field(None, description="checkpoint to learn from; default: this run's ensemble")
    weight: float = Field(0.7, ge=0, le=1, description="share of the teacher's probability in the target")
    epochs: int | None = Field(None, ge=1, le=1000, description="the student's epochs; default train.epochs")


class ParamSpec(_Section):
    """One searched hyperparameter: a distribution over the values of one config key."""

    type: Literal["loguniform", "uniform", "randint", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _complete(self) -> ParamSpec:
        if self.type == "choice":
            if not self.values or self.low is not None or self.high is not None:
                raise ValueError("choice needs a non-empty 'values' list (and no low/high)")
        else:
            if self.low is None or self.high is None or self.values is not None:
                raise ValueError(f"{self.type} needs 'low' and 'high' (and no values)")
            if not self.low < self.high:
                raise ValueError("low must be below high")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError("loguniform needs low > 0")
        return self

    def candidates(self) -> list[Any]:
        """Values at the edges of the space, to validate against the config before a sweep."""
        if self.type == "choice":
            return list(self.values)
        if self.type == "randint":
            return [int(self.low), int(self.high) - 1]
        return [self.low, self.high]


class AshaConfig(_Section):
    grace_period: int = Field(2, ge=1, description="epochs every trial gets before it can be stopped")
    reduction_factor: float = Field(3, gt=1)


class TuneSection(_Section):
    """A Ray Tune sweep: each trial is a distributed training run with sampled hyperparameters."""

    num_samples: int = Field(8, ge=1, le=10_000, description="trials")
    max_concurrent_trials: int = Field(1, ge=1, le=1024)
    search: Literal["optuna", "random"] = "optuna"
    scheduler: Literal["asha", "none"] = "asha"
    asha: AshaConfig = Field(default_factory=AshaConfig)
    seed: int = 0
    space: dict[str, ParamSpec] = Field(min_length=1, description="dotted config key -> distribution")


class TrackingConfig(_Section):
    """Experiment tracking with MLflow (pneumonia.artifacts.tracking): params, per-epoch metrics, lineage.

    The store: ``uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite file ``mlflow.db`` in the run's
    storage folder (``./mlflow.db`` for object-store storage). A store that cannot be reached costs
    one warning, never the run.
    """

    enabled: bool = Field(True, description="false (or --no-tracking): log nothing to MLflow")
    uri: str | None = Field(None, description="MLflow tracking URI, e.g. http://mlflow:5000 or sqlite:///runs/mlflow.db")
    experiment: str = Field("pneumonia", min_length=1, description="MLflow experiment the runs go to")


class ExperimentConfig(_Section):
    """Everything one training run needs besides the data location (and, for a sweep, `tune`)."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=RunSection)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    stress: StressConfig = Field(default_factory=StressConfig)
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    tune: TuneSection | None = None

    @model_validator(mode="after")
    def _stress_metrics_need_stress(self) -> ExperimentConfig:
        for where, metric in (("run.checkpoint_metric", self.run.checkpoint_metric),
                              ("objective.metric", self.objective.metric)):
            if metric.startswith("val_stress_") and not self.stress.enabled:
                raise ValueError(f"{where} {metric!r} is a stress metric: set stress.enabled: true")
        return self

    @model_validator(mode="after")
    def _distill_needs_a_teacher(self) -> ExperimentConfig:
        if self.distill.enabled and self.ensemble.members == 1 and not self.distill.teacher:
            raise ValueError("distill.enabled needs a teacher: ensemble.members > 1 (this run's ensemble) "
                             "or distill.teacher (an existing checkpoint)")
        return self

    @model_validator(mode="after")
    def _space_matches_config(self) -> ExperimentConfig:
        """Every searched key must exist, and the edges of its range must be valid values."""
        if self.tune is None:
            return self
        base = self.model_dump(exclude={"tune"})
        for key, spec in self.tune.space.items():
            section = key.split(".", 1)[0]
            if section in ("tune", "run", "scaling", "tracking") or not _has_key(base, key):
                raise ValueError(f"tune.space: {key!r} is not a searchable config key")
            for value in spec.candidates():
                trial = apply_params(base, {key: value})
                try:
                    ExperimentConfig.model_validate(trial)
                except ValidationError as error:
                    problem = error.errors()[0]["msg"]
                    raise ValueError(f"tune.space.{key}: value {value!r} is invalid ({problem})") from None
        return self


def _has_key(tree: dict[str, Any], dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def apply_params(tree: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a config dict with dotted keys set to new values."""
    import copy

    result = copy.deepcopy(tree)
    for dotted, value in params.items():
        *parents, leaf = dotted.split(".")
        node = result
        for part in parents:
            node = node[part]
        node[leaf] = value
    return result


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a plain dict (as read from YAML); raise ConfigError naming every bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def load_config(path: str | Path | None) -> ExperimentConfig:
    """Read a YAML config file; None gives the defaults."""
    if path is None:
        return ExperimentConfig()
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config {path} is a folder; name a YAML file (tune_configs/ has examples)")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a YAML config is UTF-8 text)") from None
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None
    return config_from_dict(raw, source=str(path))


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's message in one line: the problem and where (1-based line and column)."""
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if not problem:
        return " ".join(str(error).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def with_overrides(config: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """Return a copy with dotted keys replaced (``{"train.epochs": 3}``); None values are ignored."""
    raw = config.model_dump()
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config key: {dotted}")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"unknown config key: {dotted}")
        node[leaf] = value
    return config_from_dict(raw, source="command-line overrides")


def parse_set_option(items: list[str]) -> dict[str, Any]:
    """Parse ``--set key=value`` items, with values read as YAML scalars (3, 0.1, true, adam)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {key.strip()}: cannot read value {value!r} "
                              f"({getattr(error, 'problem', None) or error}); "
                              "quote it if it is text") from None
    return overrides


def dump_config(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.model_dump(), sort_keys=False)
