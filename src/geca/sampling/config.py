"""How to sample: the sampler settings every sampling path takes. Imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass, replace

from geca.errors import ConfigError

SAMPLERS = ("ddpm", "ddim")
GHG_MODES = ("hidden", "none", "out", "both")


@dataclass
class SamplerConfig:
    """How to sample. `ghg` None means the model's default: `hidden` (the paper's) for GeCA, `none` for models
    without cell state; `nca_steps` None means the trained M; `clip_x0` None means clipping x̂₀ to [−1, 1] in pixel
    space and not for latent runs (ours: the authors never clip, and sample in latent space)."""

    sampler: str = "ddpm"
    steps: int = 250
    guidance_scale: float = 1.5
    ghg: str | None = None
    nca_steps: int | None = None
    eta: float = 0.0
    clip_x0: bool | None = None

    def validate(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; choose from {', '.join(SAMPLERS)}")
        if self.ghg is not None and self.ghg not in GHG_MODES:
            raise ConfigError(f"unknown GHG mode {self.ghg!r}; choose from {', '.join(GHG_MODES)}")
        if self.nca_steps is not None and self.nca_steps < 1:
            raise ConfigError(f"M (NCA steps) must be ≥ 1, got {self.nca_steps}")

    def for_model(self, cellular: bool, latent: bool, strict: bool = False) -> SamplerConfig:
        """The settings a model samples with: the GHG default resolved (a model without cell state has no heredity
        and no M: always `none`, and with `strict` asking it for another mode is an error), and by default x̂0
        unclipped for latent models, as DiT does: latents have no [-1, 1] range to clip to."""
        self.validate()
        ghg = self.ghg if self.ghg is not None else ("hidden" if cellular else "none")
        if not cellular and ghg != "none":
            if strict:
                raise ConfigError(f"--ghg {ghg} needs a cellular model (GeCA); this one has no cell state (use --ghg "
                                  "none)")
            ghg = "none"
        clip = (not latent) if self.clip_x0 is None else self.clip_x0
        return replace(self, ghg=ghg, nca_steps=self.nca_steps if cellular else None, clip_x0=clip)
