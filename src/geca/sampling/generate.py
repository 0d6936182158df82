"""Labelled sample sets: one function samples them (for `geca sample`, the training preview, validation and the
study), and a sample directory holds them on disk: images/*.png, labels.csv, manifest.json."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import geca
from geca.diffusion.gaussian import GaussianDiffusion
from geca.latent.codec import LatentCodec
from geca.models.base import Denoiser
from geca.run import LoadedRun
from geca.sampling.config import SamplerConfig
from geca.sampling.samplers import sample
from geca.utils.images import pil_image, to_uint8
from geca.utils.io import atomic_write_json, atomic_write_text, file_sha256, staged_dir
from geca.utils.seeding import derive_seed

Decoder = Callable[[torch.Tensor], np.ndarray]


def sample_images(model: Denoiser, diffusion: GaussianDiffusion, labels: torch.Tensor, shape: tuple[int, int, int],
                  sampler: SamplerConfig, seed: int, batch_size: int, device: torch.device | str,
                  decode: Decoder = to_uint8, progress: bool = False) -> np.ndarray:
    """One uint8 image (N, H, W, C) per label vector. Batch b draws from seed (seed, b), so the same seed gives the
    same images whatever came before; the global random state is left as it was."""
    rng = torch.get_rng_state()
    out = []
    try:
        for b, y in enumerate(tqdm(labels.split(batch_size), desc="batches", disable=not progress)):
            torch.manual_seed(derive_seed(seed, b, 0))
            out.append(decode(sample(model, diffusion, y.to(device), shape, sampler, progress=progress)))
    finally:
        torch.set_rng_state(rng)
    return np.concatenate(out) if out else decode(torch.zeros(0, *shape))


def decoder(run: LoadedRun, device: torch.device | str, batch_size: int = 16) -> Decoder:
    """Model-space tensors → uint8 images: the run's VAE for latent runs, a rescale for pixel runs."""
    latent = run.spec.latent
    if latent is None:
        return to_uint8
    codec = LatentCodec.for_spec(latent, device, batch_size)
    return lambda x: codec.decode(x, latent.image_channels)


def run_sampler(run: LoadedRun, sampler: SamplerConfig, strict: bool = False) -> SamplerConfig:
    """The settings `run` samples with (see SamplerConfig.for_model)."""
    return sampler.for_model(run.model.has_cell_state, run.spec.latent is not None, strict)


def generate(run: LoadedRun, labels: torch.Tensor, sampler: SamplerConfig, seed: int, batch_size: int,
             device: torch.device | str, progress: bool = False) -> np.ndarray:
    """`sample_images` for a loaded run; a latent run's samples are decoded by the VAE it was trained with."""
    return sample_images(run.model, run.diffusion, labels, run.spec.shape, run_sampler(run, sampler), seed,
                         batch_size, device, decoder(run, device, batch_size), progress)


def labels_csv(filenames: list[str], labels: np.ndarray, class_names: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["filename", *class_names])
    for name, row in zip(filenames, labels, strict=True):
        writer.writerow([name, *(int(v) for v in row)])
    return buf.getvalue()


def write_images(directory: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> list[str]:
    """images/NNNNNN.png and labels.csv in `directory`; returns the file names."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    names = [f"images/{i:06d}.png" for i in range(len(images))]
    for name, img in zip(names, images, strict=True):
        pil_image(img).save(directory / name)
    atomic_write_text(directory / "labels.csv", labels_csv(names, labels, class_names))
    return names


def write_sample_dir(out: Path, run: LoadedRun, labels: torch.Tensor, sampler: SamplerConfig, seed: int,
                     batch_size: int, device: torch.device | str, extra: dict[str, Any] | None = None,
                     overwrite: bool = False, progress: bool = True) -> tuple[dict[str, Any], np.ndarray]:
    """Sample into a hidden sibling directory and move it into place only when whole; returns (manifest, images)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
    sampler = run_sampler(run, sampler)  # so that the manifest records what sampling used
    with staged_dir(out) as tmp:
        t0 = time.time()
        images = generate(run, labels, sampler, seed, batch_size, device, progress)
        write_images(tmp, images, labels.numpy(), run.spec.class_names)
        manifest = {
            "run": str(run.run_dir.resolve()),
            "checkpoint": str(run.checkpoint.resolve()),
            "checkpoint_step": run.step,
            "weights_file": run.weights_file.name,
            "weights_sha256": file_sha256(run.weights_file),
            "model": run.spec.model.name,
            "sampling": asdict(sampler),
            "seed": seed,
            "batch_size": batch_size,
            "num_images": len(images),
            "class_names": run.spec.class_names,
            "multilabel": run.spec.multilabel,
            "latent": None if run.spec.latent is None else asdict(run.spec.latent),
            "seconds": round(time.time() - t0, 2),
            "device": str(device),
            "geca_version": geca.__version__,
            "torch_version": torch.__version__,
            **(extra or {}),
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest, images
