"""Run configuration: plain YAML files mirrored by dataclasses (data, model, diffusion, training, preview,
validation). The data, model and diffusion packages own their sections' dataclasses; training's three live here,
since the trainer imports the run config this module assembles (a unit below training, which imports it)."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from geca.data.config import DataConfig
from geca.diffusion.config import DiffusionConfig
from geca.errors import ConfigError
from geca.models.config import GeCAConfig, ModelConfig, with_named_defaults
from geca.sampling.config import SamplerConfig
from geca.utils.hardware import PRECISIONS
from geca.utils.io import atomic_write_text, same_path
from geca.utils.schema import MAX_BATCH, MAX_STEPS, Checks, changes, from_dict, read_yaml

LOGGERS = ("csv", "tensorboard")


@dataclass
class TrainConfig:
    max_steps: int = 1000
    max_minutes: float | None = None
    batch_size: int = 32
    lr: float = 1e-4
    warmup_steps: int = 0  # linear warm-up from 0 (ours; the paper trains at a constant lr)
    lr_schedule: str = "constant"  # or "cosine": to 0 at max_steps, after the warm-up
    weight_decay: float = 0.0
    grad_clip: float | None = None
    precision: str = "fp32"
    seed: int = 0
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int | None = None  # the latest N step checkpoints stay, older ones go (None: all); best stays
    # Heredity-aware training (a model with `heredity: gated`): the share of samples whose training call inherits
    # the C_h of a no-grad first call, and how many diffusion timesteps later that call sits (0: at the same t).
    heredity_prob: float = 0.5
    heredity_offset: int = 0
    logger: str = "csv"  # log.csv always; "tensorboard" also writes TensorBoard events through accelerate

    def validate(self, check: Checks) -> None:
        check(1 <= self.max_steps <= MAX_STEPS, "train.max_steps", f"in [1, {MAX_STEPS:,}]", self.max_steps)
        check(0 <= self.seed < 2**32, "train.seed", "in [0, 2³²)", self.seed)
        check.choice(self.logger, "train.logger", LOGGERS)
        check(self.logger != "tensorboard" or importlib.util.find_spec("tensorboard") is not None, "train.logger",
              "csv, or tensorboard once its package is installed (pip install 'geca[tensorboard]')", self.logger)
        check(0 <= self.heredity_prob <= 1, "train.heredity_prob", "in [0, 1]", self.heredity_prob)
        check(self.heredity_offset >= 0, "train.heredity_offset", "≥ 0", self.heredity_offset)
        check(self.max_minutes is None or 0 < self.max_minutes < math.inf, "train.max_minutes",
              "> 0 and finite (for no limit leave it unset: max_minutes: null)", self.max_minutes)
        check(1 <= self.batch_size <= MAX_BATCH, "train.batch_size", f"in [1, {MAX_BATCH}]", self.batch_size)
        check(math.isfinite(self.lr) and self.lr > 0, "train.lr", "> 0", self.lr)
        check(0 <= self.warmup_steps <= MAX_STEPS, "train.warmup_steps", f"in [0, {MAX_STEPS:,}]", self.warmup_steps)
        check.choice(self.lr_schedule, "train.lr_schedule", ("constant", "cosine"))
        check(self.weight_decay >= 0, "train.weight_decay", "≥ 0", self.weight_decay)
        check(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip", "> 0", self.grad_clip)
        check.choice(self.precision, "train.precision", PRECISIONS)
        check(0 <= self.ema_decay < 1, "train.ema_decay", "in [0, 1)", self.ema_decay)
        check(self.log_every >= 1, "train.log_every", "≥ 1", self.log_every)
        check(self.sample_every >= 0, "train.sample_every", "≥ 0 (0: never)", self.sample_every)
        check(self.checkpoint_every >= 0, "train.checkpoint_every", "≥ 0 (0: only the final one)",
              self.checkpoint_every)
        check(self.keep_checkpoints is None or self.keep_checkpoints >= 1, "train.keep_checkpoints",
              "≥ 1 (for every checkpoint leave it unset: keep_checkpoints: null)", self.keep_checkpoints)


@dataclass
class PreviewConfig:
    """The periodic sample grid drawn from the EMA model during training."""

    per_class: int = 4
    max_classes: int = 11
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(sampler="ddim", steps=50))

    def validate(self, check: Checks) -> None:
        check(self.per_class >= 1, "preview.per_class", "≥ 1", self.per_class)
        check(self.max_classes >= 1, "preview.max_classes", "≥ 1", self.max_classes)
        self.sampler.validate(check, "preview.sampler")


@dataclass
class ValidationConfig:
    """KID of EMA, conditional, CFG samples against a held-out split every `every` steps (0: off); the lowest
    KID is kept in checkpoints/best and the curve in validation.csv. Never validate on `test`."""

    every: int = 0
    num_samples: int = 256
    split: str = "val"
    features: str = "domain"
    features_file: str | None = None
    batch_size: int = 64
    seed: int = 0
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(sampler="ddim", steps=50))

    def validate(self, check: Checks) -> None:
        check(self.every >= 0, "validation.every", "≥ 0 (0: off)", self.every)
        check(self.num_samples >= 2, "validation.num_samples", "≥ 2", self.num_samples)
        check(1 <= self.batch_size <= MAX_BATCH, "validation.batch_size", f"in [1, {MAX_BATCH}]", self.batch_size)
        check(0 <= self.seed < 2**32, "validation.seed", "in [0, 2³²)", self.seed)
        check(self.split != "test", "validation.split", "val (or train), never 'test': selecting checkpoints on "
              "the split you report would bias the final evaluation", self.split)
        self.sampler.validate(check, "validation.sampler")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=GeCAConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, names: dict[str, str] | None = None, where: str | Path | None = None) -> None:
        """Every value in range, before anything is created; `names` says how the user spelt a key (its flag),
        `where` the file the other keys came from."""
        check = Checks(names, where)
        self.data.validate(check)
        self.model.validate(check)
        self.diffusion.validate(check)
        # the model sizes its output by its own learn_sigma, the diffusion splits it by this one
        check(self.diffusion.learn_sigma == self.model.learn_sigma, "diffusion.learn_sigma",
              f"equal to model.learn_sigma ({self.model.learn_sigma})", self.diffusion.learn_sigma)
        self.train.validate(check)
        # the inherit gate learns only from calls that inherit; without any its parameters get no gradient (and DDP,
        # which expects one for every parameter, stops)
        check(getattr(self.model, "heredity", "off") != "gated" or self.train.heredity_prob > 0,
              "train.heredity_prob", "> 0 for a model with heredity: gated", self.train.heredity_prob)
        self.preview.validate(check)
        self.validation.validate(check)
        for key, sampler in (("preview", self.preview.sampler), ("validation", self.validation.sampler)):
            check(sampler.steps <= self.diffusion.timesteps, f"{key}.sampler.steps",
                  f"≤ diffusion.timesteps ({self.diffusion.timesteps}), the most a sampler can take", sampler.steps)


def resolve_run_config(raw: dict[str, Any], where: str) -> RunConfig:
    """A run config from a mapping; a `model.name` of a named config fills the model's defaults before its keys."""
    model = raw.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"{where}: model must be a mapping")
    if model:
        raw = {**raw, "model": with_named_defaults(model, where)}
    return from_dict(RunConfig, raw, str(where))


def load_config(path: str | Path | None) -> RunConfig:
    """Read a run config file (None: the built-in defaults)."""
    if path is None:
        return RunConfig()
    return resolve_run_config(read_yaml(Path(path), "config file"), str(path))


def save_config(config: RunConfig, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def config_changes(before: RunConfig, after: RunConfig) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every setting that differs; a data or folds file named by another
    spelling of its path is the same file."""

    def same(key: str, a: Any, b: Any) -> bool:
        if key == "data.spec" and isinstance(a, str) and isinstance(b, str):
            from geca.data.registry import located_spec  # torch: not for every reader of a config

            return located_spec(a) == located_spec(b)
        return key == "data.folds_file" and isinstance(a, str) and isinstance(b, str) and same_path(a, b)

    return [(key, a, b) for key, a, b in changes(asdict(before), asdict(after)) if not same(key, a, b)]
