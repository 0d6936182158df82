"""Run configuration: plain YAML files mirrored by dataclasses."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from geca.diffusion.gaussian import DiffusionConfig
from geca.models.config import ModelConfig, named_model
from geca.sampling.samplers import SamplerConfig


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class DataConfig:
    spec: str = "retinamnist"
    image_size: int | None = None
    folds_file: str | None = None
    fold: int = 0
    flip: bool = True
    download: bool = False
    # Latent diffusion (method.md §1): a diffusers AutoencoderKL directory (or a hub id in the local HF cache);
    # None trains in pixel space. Images are cropped/resized to latent_size; the cache defaults to RUN/latents.
    vae: str | None = None
    latent_size: int = 256
    latent_mean: bool = False
    latent_cache: str | None = None


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
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(typing.get_args(tp)[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and value != int(value)):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return tp(value)
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass `cls` from a nested mapping; unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(names))}")
    return cls(**{k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()})


def load_config(path: str | Path | None) -> RunConfig:
    """Read a run config; a `model.name` of a named config fills the model's defaults before the file's keys."""
    if path is None:
        return RunConfig()
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    model_raw = raw.get("model") or {}
    if "name" in model_raw:
        try:
            base = dataclasses.asdict(named_model(model_raw["name"]))
        except ValueError as e:
            raise ConfigError(f"{p}: {e}") from None
        raw = {**raw, "model": {**base, **model_raw}}
    try:
        return from_dict(RunConfig, raw, str(p))
    except TypeError as e:
        raise ConfigError(f"{p}: {e}") from None


def save_config(cfg: RunConfig, path: Path) -> None:
    from geca.utils.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
