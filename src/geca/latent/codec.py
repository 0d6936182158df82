"""Images ↔ scaled SD-VAE latents: centre-crop, resize, [-1, 1], encode in batches; decode to uint8."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from geca.errors import LatentError
from geca.latent.spec import LatentSpec
from geca.latent.vae import latent_affine, load_vae, read_config, resolve_vae, vae_identity
from geca.utils.images import fit_square, to_uint8
from geca.utils.seeding import derive_seed


class LatentCodec:
    """A frozen AutoencoderKL with latents = (z − shift)·scale at image side `size`."""

    def __init__(self, vae: torch.nn.Module, size: int = 256, scale: float = 0.18215, shift: float = 0.0,
                 batch_size: int = 16, source: str = "VAE") -> None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if size < factor or size % factor:
            raise LatentError(f"{source}: image size {size} is not a multiple of the VAE's downsampling factor "
                              f"{factor}")
        self.vae = vae
        self.size = size
        self.scale = scale
        self.shift = shift
        self.batch_size = batch_size
        self.latent_shape = (vae.config.latent_channels, size // factor, size // factor)

    @classmethod
    def load(cls, name: str, size: int = 256, device: torch.device | str = "cpu", batch_size: int = 16
             ) -> LatentCodec:
        """Load VAE `name` (a local directory or a hub id in the local HF cache); scale/shift from its config."""
        root = resolve_vae(name)
        scale, shift = latent_affine(read_config(root))
        return cls(load_vae(root, device), size, scale, shift, batch_size, str(root))

    @classmethod
    def for_spec(cls, spec: LatentSpec, device: torch.device | str = "cpu", batch_size: int = 16) -> LatentCodec:
        """The codec a latent run was trained with; refuses a VAE whose weights differ from the recorded ones."""
        root = resolve_vae(spec.vae)
        found = vae_identity(root)["weights_sha256"]
        if found != spec.vae_sha256:
            raise LatentError(f"{root}: VAE weights (sha256 {found[:12]}…) differ from those the run was trained "
                              f"with ({spec.vae_sha256[:12]}…); its latents would decode to noise")
        return cls(load_vae(root, device), spec.image_size, spec.scale, spec.shift, batch_size, str(root))

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, C) → float (N, C_vae, size, size) in [-1, 1]: centre square crop, antialiased resize."""
        x = torch.from_numpy(fit_square(images, self.size)).permute(0, 3, 1, 2)
        want = self.vae.config.in_channels
        if x.shape[1] == 1 and want == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != want:
            raise LatentError(f"images have {x.shape[1]} channels; the VAE takes {want}")
        return x.float().div(127.5).sub(1.0).contiguous()  # NCHW: conv results then do not depend on layout

    @torch.no_grad()
    def encode(self, images: np.ndarray, mean: bool = False, flip: bool = False, seed: int = 0,
               progress: bool = False, desc: str = "encoding") -> torch.Tensor:
        """Scaled latents (N, *latent_shape) on the CPU: posterior samples (seeded per image) or means.

        `flip` encodes the horizontally mirrored images (a mirrored latent is not the latent of a mirrored image).
        """
        out = []
        starts = range(0, len(images), self.batch_size)
        for start in tqdm(starts, desc=desc, disable=not progress, dynamic_ncols=True):
            batch = images[start:start + self.batch_size]
            if flip:
                batch = batch[:, :, ::-1]
            dist = self.vae.encode(self.preprocess(batch).to(self.device)).latent_dist
            z = dist.mean
            if not mean:
                # latent_dist.sample() with one generator per image instead of one per batch, so that batch size
                # and order do not change an image's latent
                eps = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(
                    derive_seed(seed, start + i, int(flip)))) for i in range(len(batch))])
                z = z + dist.std * eps.to(z.device, z.dtype)
            out.append(((z - self.shift) * self.scale).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, *self.latent_shape)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, channels: int = 3) -> np.ndarray:
        """Scaled latents → uint8 (N, size, size, channels); grey images are the mean of the decoded RGB."""
        out = []
        for z in torch.split(latents, self.batch_size):
            x = self.vae.decode(z.to(self.device, torch.float32) / self.scale + self.shift).sample
            if channels == 1 and x.shape[1] != 1:
                x = x.mean(1, keepdim=True)
            out.append(to_uint8(x))
        return np.concatenate(out) if out else np.zeros((0, self.size, self.size, channels), np.uint8)
