"""What a latent run records so that sampling can decode its latents."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LatentSpec:
    """The VAE (local directory or hub id, and the sha256 of its weights) and the latent ↔ image mapping."""

    vae: str
    vae_sha256: str
    scale: float
    shift: float
    image_size: int
    image_channels: int
