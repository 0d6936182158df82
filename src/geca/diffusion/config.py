"""The diffusion's section of a run config. Imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass

from geca.utils.schema import Checks


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    learn_sigma: bool = True

    def validate(self, check: Checks) -> None:
        check(self.timesteps >= 2, "diffusion.timesteps", "≥ 2", self.timesteps)
        check(0 < self.beta_start < self.beta_end < 1, "diffusion.beta_start/beta_end",
              "0 < beta_start < beta_end < 1", (self.beta_start, self.beta_end))
