"""The diffusion process: schedules, forward process, posterior and the training loss."""

from geca.diffusion.gaussian import DiffusionConfig, GaussianDiffusion, spaced_timesteps

__all__ = ["DiffusionConfig", "GaussianDiffusion", "spaced_timesteps"]
