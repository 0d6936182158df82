"""What a run trains on: the `data` section of a run config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    spec: str = "retinamnist"
    image_size: int | None = None
    folds_file: str | None = None
    fold: int = 0
    cv_val: str = "slice"  # with a folds file: how the validation split is made (geca.data.folds.fold_split_rows)
    flip: bool = True
    download: bool = False
    # Latent diffusion (method.md §1): a diffusers AutoencoderKL directory (or a hub id in the local HF cache);
    # None trains in pixel space. Images are cropped/resized to latent_size; the cache defaults to RUN/latents.
    vae: str | None = None
    latent_size: int = 256
    latent_mean: bool = False
    latent_cache: str | None = None
