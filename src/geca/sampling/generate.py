"""Generate a labelled sample directory: images/*.png, labels.csv, manifest.json."""

from __future__ import annotations

import csv
import io
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import geca
from geca.latent.codec import LatentCodec
from geca.sampling.samplers import SamplerConfig, sample
from geca.training.checkpoint import LoadedRun, file_sha256
from geca.training.trainer import step_seed
from geca.utils.images import pil_image, to_uint8
from geca.utils.io import atomic_write_json, atomic_write_text, replace_dir, staging_dir


def generate_images(run: LoadedRun, labels: torch.Tensor, cfg: SamplerConfig, seed: int, batch_size: int,
                    device: torch.device, progress: bool = True) -> np.ndarray:
    """Sample one uint8 image per label vector; batch b draws from seed (seed, b), so results repeat exactly.

    A latent run's samples are decoded by the VAE it was trained with (at its image size, not the latent size).
    """
    spec = run.spec
    cfg = spec.sampling(cfg)
    shape = (spec.in_channels, spec.resolution, spec.resolution)
    decode = decoder(run, device, batch_size)
    out = []
    batches = list(torch.split(labels, batch_size))
    for b, y in enumerate(tqdm(batches, desc="batches", disable=not progress)):
        torch.manual_seed(step_seed(seed, b, 0))
        x = sample(run.model, run.diffusion, y.to(device), shape, cfg, progress=progress)
        out.append(decode(x))
    if out:
        return np.concatenate(out)
    size, channels = (spec.resolution, spec.in_channels) if spec.latent is None else (
        spec.latent.image_size, spec.latent.image_channels)
    return np.zeros((0, size, size, channels), np.uint8)


def decoder(run: LoadedRun, device: torch.device, batch_size: int = 16) -> Callable[[torch.Tensor], np.ndarray]:
    """Model-space tensors → uint8 images: the run's VAE for latent runs, a rescale for pixel runs."""
    latent = run.spec.latent
    if latent is None:
        return to_uint8
    codec = LatentCodec.for_spec(latent, device, batch_size)
    return lambda x: codec.decode(x, latent.image_channels)


def labels_csv(filenames: list[str], labels: np.ndarray, class_names: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["filename", *class_names])
    for name, row in zip(filenames, labels, strict=True):
        writer.writerow([name, *(int(v) for v in row)])
    return buf.getvalue()


def write_sample_dir(out: Path, run: LoadedRun, labels: torch.Tensor, cfg: SamplerConfig, seed: int,
                     batch_size: int, device: torch.device, extra: dict[str, Any] | None = None,
                     overwrite: bool = False, progress: bool = True) -> tuple[dict[str, Any], np.ndarray]:
    """Sample into a hidden sibling directory and move it into place only when whole; returns (manifest, images)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = run.spec.sampling(cfg)  # so that the manifest records what sampling used
    tmp = staging_dir(out)
    try:
        t0 = time.time()
        images = generate_images(run, labels, cfg, seed, batch_size, device, progress)
        (tmp / "images").mkdir()
        names = []
        for i, img in enumerate(images):
            name = f"images/{i:06d}.png"
            pil_image(img).save(tmp / name)
            names.append(name)
        atomic_write_text(tmp / "labels.csv", labels_csv(names, labels.numpy(), run.spec.class_names))
        manifest = {
            "run": str(run.checkpoint.parent.parent.resolve()),
            "checkpoint": str(run.checkpoint.resolve()),
            "checkpoint_step": run.step,
            "weights_file": run.weights_file.name,
            "weights_sha256": file_sha256(run.weights_file),
            "model": run.spec.model.name,
            "sampling": asdict(cfg),
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
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest, images
