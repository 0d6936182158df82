"""Run configuration: plain YAML files mirrored by dataclasses (data, model, diffusion, training, preview,
validation). Each package owns its own section's dataclass; this module puts them together."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from geca.data.config import DataConfig
from geca.diffusion.gaussian import DiffusionConfig
from geca.errors import ConfigError
from geca.models.config import GeCAConfig, ModelConfig, with_named_defaults
from geca.sampling.config import SamplerConfig
from geca.utils.io import atomic_write_text
from geca.utils.schema import from_dict, read_yaml


@dataclass
class TrainConfig:
    max_steps: int = 1000
    max_minutes: float | None = None
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float | None = None
    precision: str = "fp32"
    seed: int = 0
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 500


@dataclass
class PreviewConfig:
    """The periodic sample grid drawn from the EMA model during training."""

    per_class: int = 4
    max_classes: int = 11
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(sampler="ddim", steps=50))


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
