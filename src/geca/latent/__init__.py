"""Latent-space diffusion: SD-VAE (diffusers AutoencoderKL) codec and the on-disk latent cache."""
