"""Flags several commands share, declared once: the sampling flags of `geca sample`, `expand` and `grow`."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import typer

from geca.cli.common import BARS_HELP
from geca.sampling.config import SamplerConfig
from geca.utils.schema import MAX_BATCH

SAMPLER_HELP = {
    "sampler": "ddpm (ancestral, respaced), ddim (η=0), dpm++ (DPM-Solver++(2M)) or dpm++sde (its stochastic "
               "form; at --steps 25 it matched ddpm 250 on the model we measured).",
    "steps": "Reverse steps, respaced from the trained T (default: 250 for ddpm and ddim, 25 for dpm++ and "
             "dpm++sde).",
    "guidance_scale": "Classifier-free guidance scale on ε (1 = conditional only).",
    "ghg": "Gene Heredity Guidance: hidden (the paper's), none, out or both (default: hidden for a GeCA trained "
           "with --heredity, none for one trained as published and for models without cell state).",
    "nca_steps": "NCA steps M per denoiser call (default: as trained; fewer = undergrowth, more = overgrowth).",
    "schedule": "Where dpm++/dpm++sde put their steps: lambda (evenly in log-SNR, denser at low noise; default), "
                "uniform (evenly in t) or karras. lambda suits up to 30 steps and karras 70 of a 1000-step "
                "diffusion (more repeat integer timesteps). DDPM and DDIM respace evenly (uniform).",
}

SAMPLER_FIELDS = ("sampler", "steps", "guidance_scale", "ghg", "nca_steps", "clip_x0", "schedule", "precision")


@dataclass
class SamplingFlags:
    """The values of the shared flags a command was given (those it does not offer keep their defaults)."""

    sampling: SamplerConfig
    seed: int = 0
    batch_size: int = 64
    checkpoint: str | None = None
    weights: str = "ema"
    device: str = "auto"
    vae: str | None = None
    overwrite: bool = False
    resume: bool = False
    threads: int | None = None
    progress: bool | None = None


# Defaults are the dataclasses' own (one home), so only the flags' spelling and help live here.
_DEFAULTS = {f.name: f.default for f in (*fields(SamplerConfig), *fields(SamplingFlags)) if f.name != "sampling"}
# name: (annotation, flag names, help[, typer.Option's other settings])
_OPTIONS: dict[str, tuple[Any, ...]] = {
    "sampler": (str, ("--sampler",), SAMPLER_HELP["sampler"]),
    "steps": (int | None, ("--steps",), SAMPLER_HELP["steps"]),
    "guidance_scale": (float, ("--cfg", "--guidance-scale"), SAMPLER_HELP["guidance_scale"]),
    "ghg": (str | None, ("--ghg",), SAMPLER_HELP["ghg"]),
    "nca_steps": (int | None, ("--m", "--nca-steps"), SAMPLER_HELP["nca_steps"]),
    "schedule": (str | None, ("--schedule",), SAMPLER_HELP["schedule"]),
    "precision": (str, ("--precision",), "The denoiser calls' precision: fp32, bf16, fp16 (GPU only) or auto "
                  "(bf16 where the device runs it natively: GPUs with native bf16, AVX512-BF16/AMX CPUs; else "
                  "fp32); the sampler's own arithmetic stays fp32. On the trained demo model bf16 was 1.5x as fast "
                  "on an AVX512-BF16 CPU, pixels within 3/255 of fp32's and KID within 2 %."),
    "clip_x0": (bool | None, ("--clip-x0/--no-clip-x0",), "Clip the x̂₀ estimate to [−1, 1] at every step "
                "(ours; default: on in pixel space, off for latent runs; the authors never clip)."),
    "seed": (int, ("--seed",), "Sampling seed: the same seed, --batch-size and device give the same images (each "
             "batch draws its noise from the seed and its index).", {"min": 0}),
    "batch_size": (int, ("--batch-size",), "Images per sampling batch.", {"min": 1, "max": MAX_BATCH}),
    "checkpoint": (str | None, ("--checkpoint",), "latest (default), best (lowest validation KID), a step, "
                   "or a directory."),
    "weights": (str, ("--weights",), "ema (default) or model (raw) weights."),
    "device": (str, ("--device",), "auto, cpu or cuda[:N]."),
    "vae": (str | None, ("--vae",), "A latent run's VAE directory (or hub id) where it is now, if it moved since "
            "training (its weights' SHA-256 must be the one the run recorded)."),
    "overwrite": (bool, ("--overwrite",), "Replace what an earlier run of this command wrote in --out once "
                  "sampling is done (sample and expand: only a sample set, a folder with geca's manifest.json and "
                  "nothing else; sample: also an earlier --trace)."),
    "resume": (bool, ("--resume",), "Continue an interrupted run into the same --out from the batches it "
               "finished (the same run, settings, seed and batch size give the same images)."),
    "threads": (int | None, ("--threads",), "CPU threads (default: one per core)."),
    "progress": (bool | None, ("--progress/--no-progress",), BARS_HELP),
}
GROW = ("sampler", "steps", "guidance_scale", "ghg", "nca_steps", "clip_x0", "precision", "seed", "checkpoint",
        "device", "vae", "threads", "overwrite")


def sampling_flags(names: tuple[str, ...] = tuple(_OPTIONS), helps: dict[str, str] | None = None,
                   **defaults: Any) -> Callable[[Callable], Callable]:
    """Give a command the shared flags `names` (with other `defaults` and `helps` where given); it receives them as
    `flags`."""

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)
        own = [p for p in signature.parameters.values() if p.name != "flags"]
        added = []
        for name in names:
            annotation, flags, help_text, *settings = _OPTIONS[name]
            option = typer.Option(defaults.get(name, _DEFAULTS[name]), *flags, help=(helps or {}).get(name, help_text),
                                  **(settings or [{}])[0])
            added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                           annotation=annotation))

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            from geca.cli.common import set_threads, show_progress

            given = {name: kwargs.pop(name) for name in names}
            sampling = SamplerConfig(**{k: given.pop(k) for k in SAMPLER_FIELDS if k in given})
            flags = SamplingFlags(sampling, **given)
            flags.progress = show_progress(flags.progress)
            set_threads(flags.threads)
            return fn(**kwargs, flags=flags)

        command.__signature__ = signature.replace(parameters=own + added)  # type: ignore[attr-defined]
        command.__annotations__ = {**{p.name: p.annotation for p in own}, **{p.name: p.annotation for p in added}}
        return command

    return decorate
