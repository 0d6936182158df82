"""A run loaded back: its denoiser with its spec, diffusion and checkpoint, and the data it names."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from geca.data.folds import folds_status
from geca.data.imageset import ImageSet
from geca.data.registry import load_split
from geca.diffusion.gaussian import GaussianDiffusion
from geca.errors import CheckpointError, ConfigError
from geca.models.base import Denoiser
from geca.run.checkpoints import find_checkpoint, load_state_dict_into, read_state
from geca.run.spec import ModelSpec, read_spec
from geca.utils.hardware import can_compile


@dataclass
class LoadedRun:
    """A run's denoiser (in eval mode, on its device) with everything sampling needs to know about it."""

    model: Denoiser
    spec: ModelSpec
    diffusion: GaussianDiffusion
    checkpoint: Path
    weights_file: Path
    weights_sha256: str
    step: int

    @property
    def run_dir(self) -> Path:
        return self.checkpoint.parent.parent


def load_run(run_dir: Path, checkpoint: str | int | None = None, weights: str = "ema",
             device: str | torch.device = "cpu", vae: str | Path | None = None) -> LoadedRun:
    """Rebuild a run's denoiser from model.json and a checkpoint's EMA (default) or raw weights; `vae`: where a
    latent run's VAE is now, if it moved (decoding checks its weights' SHA-256 against the recorded one)."""
    if weights not in ("ema", "model"):
        raise CheckpointError(f"--weights must be 'ema' or 'model', got {weights!r}")
    spec = read_spec(run_dir)
    if vae is not None:
        if spec.latent is None:
            raise ConfigError(f"--vae {vae}: {run_dir} generates pixels; it has no VAE")
        local = Path(vae).expanduser()  # a directory recorded absolute (in a sample set's manifest), a hub id as given
        spec.latent = replace(spec.latent, vae=str(local.resolve()) if local.is_dir() else str(vae))
    ckpt = find_checkpoint(run_dir, checkpoint)
    if ckpt.resolve().parent.parent != Path(run_dir).resolve():
        # model.json and the lineage checks (expand's folds) are the run's: another run's weights would pass as its
        raise CheckpointError(f"--checkpoint {ckpt}: not a checkpoint of --run {run_dir}; pass that checkpoint's own "
                              "run as --run")
    wfile = ckpt / f"{weights}.safetensors"
    # Sampling compiles only when the run asked for it (model.compile true) and it can here; eager is the same maths.
    model = spec.build(compile=spec.model.compile == "true" and can_compile(torch.device(device)))
    sha256 = load_state_dict_into(model, wfile)
    return LoadedRun(model=model.to(device).eval(), spec=spec, diffusion=spec.diffusion_process(), checkpoint=ckpt,
                     weights_file=wfile, weights_sha256=sha256, step=int(read_state(ckpt).get("step", -1)))


def run_folds(spec: ModelSpec) -> str | None:
    """The run's folds file, checked to hold the folds it was trained on (a run from before geca recorded their
    SHA-256 is taken at its word)."""
    path = spec.data.folds_file
    if path is None or spec.folds_sha256 is None:
        return path
    status = folds_status(path, spec.folds_sha256)
    where = f"{path}: the run's folds file (model.json data.folds_file)"
    if status == "missing":
        raise ConfigError(f"{where} is missing; restore the file the run was trained with")
    if status == "changed":
        raise ConfigError(f"{where} has changed since the run was trained (its SHA-256 differs from model.json's "
                          "folds_sha256): other folds are another split, whose test patients the run may have "
                          "trained on; restore the file the run was trained with")
    return path


def run_split(run: LoadedRun, data_spec: str, split: str, folds_file: str | None, fold: int) -> ImageSet:
    """A split of dataset `data_spec` (at the run's image size) whose classes must be the run's."""
    d = run.spec.data
    images = load_split(data_spec, split, image_size=d.image_size, folds_file=folds_file, fold=fold, cv_val=d.cv_val)
    if images.class_names != run.spec.class_names:
        raise ConfigError(f"{data_spec}:{split} has classes {images.class_names}, the run was trained on "
                          f"{run.spec.class_names}")
    return images
