"""Run directories and checkpoints: safetensors weights, JSON metadata, written atomically."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from geca.config import ConfigError, DataConfig, from_dict
from geca.diffusion.gaussian import DiffusionConfig, GaussianDiffusion
from geca.latent.spec import LatentSpec
from geca.models.base import Denoiser
from geca.models.config import ModelConfig, build_model
from geca.sampling.samplers import SamplerConfig
from geca.utils.io import atomic_write_json, replace_dir, staging_dir


class CheckpointError(RuntimeError):
    """A run directory or checkpoint that is missing, corrupt or does not fit."""


@dataclass
class ModelSpec:
    """Everything needed to rebuild a run's denoiser without its training data."""

    model: ModelConfig
    diffusion: DiffusionConfig
    data: DataConfig
    in_channels: int
    num_classes: int
    resolution: int
    class_names: list[str]
    multilabel: bool
    latent: LatentSpec | None = None  # set when the denoiser works on VAE latents (in_channels/resolution are theirs)

    def build(self) -> Denoiser:
        return build_model(self.model, self.in_channels, self.num_classes, self.resolution)

    def diffusion_process(self) -> GaussianDiffusion:
        return GaussianDiffusion.from_config(self.diffusion)

    def sampling(self, cfg: SamplerConfig) -> SamplerConfig:
        """Latent runs sample with unclipped x0, as DiT does: latents have no [-1, 1] range to clip to."""
        return cfg if self.latent is None else replace(cfg, clip_x0=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return from_dict(cls, d, "model.json")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, model: Denoiser, ema: Denoiser, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> Path:
    """Write checkpoints/step_NNNNNNN/ as a whole, then point latest.json at it."""
    root = checkpoint_dir(run_dir)
    name = f"step_{step:07d}"
    final = root / name
    tmp = staging_dir(final)
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(root / "latest.json", {"step": step, "path": name})
    return final


def find_checkpoint(run_dir: Path, which: str | None = None) -> Path:
    """`which`: None/'latest', 'best' (lowest validation KID), a step number, or a checkpoint directory path."""
    run_dir = Path(run_dir)
    if which and Path(which).is_dir():
        return Path(which)
    root = checkpoint_dir(run_dir)
    if which in (None, "latest"):
        latest = root / "latest.json"
        if not latest.exists():
            raise CheckpointError(f"{run_dir}: no checkpoint found (expected {latest}); has this run been trained?")
        try:
            path = root / json.loads(latest.read_text())["path"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{latest}: corrupt pointer file ({e})") from None
    elif which == "best":
        path = root / "best"
        if not path.is_dir():
            raise CheckpointError(f"{path}: no best checkpoint; it is kept only when training validates "
                                  "(validation.every > 0 or --validate-every)")
    else:
        if not str(which).isdigit():
            raise CheckpointError(f"checkpoint {which!r} is neither 'latest', 'best', a step number nor a directory")
        path = root / f"step_{int(which):07d}"
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory missing")
    return path


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: weights file missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_state_dict_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model ({str(e).splitlines()[0]})") from None


def read_spec(run_dir: Path) -> ModelSpec:
    path = Path(run_dir) / "model.json"
    if not path.exists():
        raise CheckpointError(f"{path}: missing; {run_dir} is not a geca run directory")
    try:
        return ModelSpec.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid ({e})") from None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class LoadedRun:
    model: Denoiser
    spec: ModelSpec
    diffusion: GaussianDiffusion
    checkpoint: Path
    weights_file: Path
    step: int


def load_run(run_dir: Path, checkpoint: str | None = None, weights: str = "ema",
             device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild a run's denoiser from model.json and a checkpoint's EMA (default) or raw weights."""
    if weights not in ("ema", "model"):
        raise CheckpointError(f"weights must be 'ema' or 'model', got {weights!r}")
    spec = read_spec(run_dir)
    ckpt = find_checkpoint(run_dir, checkpoint)
    wfile = ckpt / f"{weights}.safetensors"
    model = spec.build()
    load_state_dict_into(model, load_weights(wfile), wfile)
    state = json.loads((ckpt / "state.json").read_text()) if (ckpt / "state.json").exists() else {}
    return LoadedRun(model=model.to(device).eval(), spec=spec, diffusion=spec.diffusion_process(), checkpoint=ckpt,
                     weights_file=wfile, step=int(state.get("step", -1)))
