"""Latent-space diffusion: SD-VAE (diffusers AutoencoderKL) codec and the on-disk latent cache.

Kept import-light on purpose (checkpoint.py imports `geca.latent.spec`): import the submodules you need.
"""
