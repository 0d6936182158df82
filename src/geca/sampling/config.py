"""How to sample: the sampler settings every sampling path takes. Imports nothing heavy."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from geca.errors import ConfigError
from geca.utils.hardware import PRECISIONS, resolve_precision
from geca.utils.schema import MAX_NCA_STEPS, Checks

SAMPLERS = ("ddpm", "ddim", "dpm++", "dpm++sde")  # DPM-Solver++(2M), ODE and SDE: diffusers' scheduler
# Where DPM-Solver++ puts its steps: evenly in t, evenly in log-SNR λ (denser at low noise, the DPM-Solver authors'
# choice for small images), or Karras et al.'s σ^(1/7) spacing. DDPM and DDIM respace evenly in t.
SCHEDULES = ("uniform", "lambda", "karras")
# How the sampling commands spell each setting.
FLAGS = {"sampler.sampler": "--sampler", "sampler.steps": "--steps", "sampler.guidance_scale": "--cfg",
         "sampler.ghg": "--ghg", "sampler.nca_steps": "--m", "sampler.eta": "eta",
         "sampler.schedule": "--schedule", "sampler.precision": "--precision"}
GHG_MODES = ("hidden", "none", "out", "both")
# Reverse steps where none are given: the paper's 250 for DDPM (and DDIM); DPM-Solver++ needs 10-25, and beyond
# 38 its λ-spaced steps repeat integer timesteps (beyond 78 Karras-spaced ones).
DEFAULT_STEPS = {"ddpm": 250, "ddim": 250, "dpm++": 25, "dpm++sde": 25}


@dataclass
class SamplerConfig:
    """How to sample. `ghg` None means the model's default: `hidden` (the paper's) for a GeCA trained with heredity,
    `none` for one trained as published (whose samples `hidden` turns to noise) and for models without cell state;
    `nca_steps` None means the trained M; `clip_x0` None means clipping x̂₀ to [−1, 1] in pixel space and not for
    latent runs (ours: the authors never clip, and sample in latent space); `schedule` None means `lambda` for the
    DPM-Solver++ samplers (ours: with evenly spaced t they lose the subtlest class) and `uniform` for DDPM/DDIM;
    `steps` None means the sampler's DEFAULT_STEPS; `precision` is the denoiser calls' autocast (`auto`: bf16 where
    the device runs it natively), the sampler's own arithmetic staying float32."""

    sampler: str = "ddpm"
    steps: int | None = None
    guidance_scale: float = 1.5
    ghg: str | None = None
    nca_steps: int | None = None
    eta: float = 0.0
    clip_x0: bool | None = None
    schedule: str | None = None
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.steps is None:
            self.steps = DEFAULT_STEPS.get(self.sampler, DEFAULT_STEPS["ddpm"])

    def validate(self, checks: Checks | None = None, prefix: str = "sampler") -> None:
        self.__post_init__()  # a `--set …steps=null` after construction means the default too
        check = checks or Checks(FLAGS)
        check.choice(self.sampler, f"{prefix}.sampler", SAMPLERS)
        if self.ghg is not None:
            check.choice(self.ghg, f"{prefix}.ghg", GHG_MODES)
        check(self.steps >= 1, f"{prefix}.steps", "≥ 1", self.steps)
        check(math.isfinite(self.guidance_scale) and self.guidance_scale >= 0, f"{prefix}.guidance_scale",
              "≥ 0 (1: conditional only)", self.guidance_scale)
        check(self.nca_steps is None or 1 <= self.nca_steps <= MAX_NCA_STEPS, f"{prefix}.nca_steps",
              f"in [1, {MAX_NCA_STEPS}]", self.nca_steps)
        # above 1 DDIM's noise outgrows 1 − ᾱ_prev and the direction term's square root is of a negative number
        check(math.isfinite(self.eta) and 0 <= self.eta <= 1, f"{prefix}.eta", "in [0, 1]", self.eta)
        check.choice(self.precision, f"{prefix}.precision", PRECISIONS)
        if self.precision == "fp16":  # refused here rather than at the first sample, after training or a study
            import torch

            check(torch.cuda.is_available(), f"{prefix}.precision", "fp32, bf16 or auto without a CUDA GPU (fp16 "
                  "mixed precision needs one)", self.precision)
        if self.schedule is not None:
            check.choice(self.schedule, f"{prefix}.schedule", SCHEDULES)
            check(self.schedule == "uniform" or self.sampler.startswith("dpm++"), f"{prefix}.schedule",
                  "uniform for ddpm and ddim (lambda and karras are DPM-Solver++ schedules)", self.schedule)

    def label(self) -> str:
        """The setting's short name beside others (sample sets, sweeps): `ddim25`, `dpm++20-karras`, `ddim25-bf16`,
        `ddim25-cfg3-ghg_none-M16`: a schedule where one is given, and each other setting not at its default."""
        parts = [f"{self.sampler}{self.steps}", self.schedule or "",
                 self.precision if self.precision != SamplerConfig(self.sampler).precision else "", self.variant()]
        return "-".join(p for p in parts if p)

    def variant(self) -> str:
        """The settings other than sampler, steps, schedule and precision that are not at their defaults (`cfg3-M16`;
        "" where none is): what tells apart sets a table shows with the same sampler, steps and precision."""
        default = SamplerConfig(self.sampler)
        parts = [f"cfg{self.guidance_scale:.15g}"] if self.guidance_scale != default.guidance_scale else []
        parts += [f"ghg_{self.ghg}"] if self.ghg is not None else []
        parts += [f"M{self.nca_steps}"] if self.nca_steps is not None else []
        parts += [f"eta{self.eta:.15g}"] if self.eta != default.eta else []
        parts += [{True: "clip", False: "noclip"}[self.clip_x0]] if self.clip_x0 is not None else []
        return "-".join(parts)

    def check_steps(self, timesteps: int) -> None:
        """A sampler takes at most the diffusion's own `timesteps` steps."""
        if self.steps > timesteps:
            raise ConfigError(f"--steps must be at most the {timesteps} diffusion steps, got {self.steps}")

    def for_model(self, cellular: bool, latent: bool, strict: bool = False, ghg_default: str | None = None
                  ) -> SamplerConfig:
        """The settings a model samples with: the GHG default resolved (the model's `ghg_default`, else `hidden`; a
        model without cell state has no heredity and no M: always `none`, and with `strict` asking it for another
        mode or an M is an error), by default x̂0 unclipped for latent models, as DiT does: latents have no [-1, 1]
        range to clip to, and the step schedule resolved."""
        self.validate()
        default = (ghg_default or "hidden") if cellular else "none"
        ghg = self.ghg if self.ghg is not None else default
        if not cellular and ghg != "none":
            if strict:
                raise ConfigError(f"--ghg {ghg} needs a cellular model (GeCA); this one has no cell state (use --ghg "
                                  "none)")
            ghg = "none"
        if strict and not cellular and self.nca_steps is not None:
            raise ConfigError(f"--m {self.nca_steps}: NCA steps are a cellular model's (GeCA); this one has none")
        clip = (not latent) if self.clip_x0 is None else self.clip_x0
        return replace(self, ghg=ghg, nca_steps=self.nca_steps if cellular else None, clip_x0=clip,
                       schedule=default_schedule(self.sampler, self.schedule))


def default_schedule(sampler: str, schedule: str | None = None) -> str:
    return schedule or ("lambda" if sampler.startswith("dpm++") else "uniform")


def settings_key(value: Any) -> Any:
    """`value` (what `asdict` makes of a config) as stage and resume keys see it: every sampler's schedule resolved
    and left out where it is `uniform`, the only one before schedules existed, so that DDPM/DDIM work finished then
    stays done while DPM-Solver++ work, whose default moved to `lambda`, is redone; precision resolved on this
    machine and left out where it is fp32, the only one before."""
    if isinstance(value, list):
        return [settings_key(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: settings_key(v) for k, v in value.items()}
    if isinstance(out.get("sampler"), str) and "precision" in out:
        if out["precision"] == "auto":  # what it means here: work resumed on another machine is redone, not mixed
            out["precision"] = resolve_precision("auto")
        if out["precision"] == "fp32":
            del out["precision"]
    if "schedule" in out and isinstance(out.get("sampler"), str):
        schedule = default_schedule(out["sampler"], out.pop("schedule"))
        if schedule != "uniform":
            out["schedule"] = schedule
    return out


# `geca grow`'s defaults (the command, the API and the study's growth stage): the noise level whose M updates are
# shown, the trajectory's frames, and a respaced chain (DPM-Solver++ is none) short enough for a CPU.
GROWTH_T = 500
GROWTH_FRAMES = 25


def growth_sampler() -> SamplerConfig:
    return SamplerConfig(sampler="ddim", steps=50)
