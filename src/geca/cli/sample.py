"""`geca sample` and `geca grow`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import typer

from geca.cli.common import guarded, pick_device
from geca.config import ConfigError
from geca.data.imageset import ImageSet
from geca.sampling.samplers import SamplerConfig
from geca.training.checkpoint import LoadedRun, load_run

SAMPLER_HELP = {
    "sampler": "ddpm (ancestral, respaced) or ddim (η=0).",
    "steps": "Reverse steps (respaced from the trained T).",
    "cfg": "Classifier-free guidance scale on ε (1 = conditional only).",
    "ghg": "Gene Heredity Guidance: hidden (the paper's), none, out or both (default: hidden for GeCA, none for "
           "models without cell state).",
    "m": "NCA steps M per denoiser call (default: as trained; fewer = undergrowth, more = overgrowth).",
}

# Flags `geca sample` shares with `geca expand`: (default, flag names, help).
SHARED_OPTIONS: dict[str, tuple[Any, tuple[str, ...], str]] = {
    "sampler": ("ddpm", ("--sampler",), SAMPLER_HELP["sampler"]),
    "steps": (250, ("--steps",), SAMPLER_HELP["steps"]),
    "cfg": (1.5, ("--cfg",), SAMPLER_HELP["cfg"]),
    "ghg": (None, ("--ghg",), SAMPLER_HELP["ghg"]),
    "m": (None, ("--m", "--nca-steps"), SAMPLER_HELP["m"]),
    "seed": (0, ("--seed",), "Sampling seed (same seed, same images)."),
    "batch_size": (64, ("--batch-size",), "Images per sampling batch."),
    "checkpoint": (None, ("--checkpoint",), "latest (default), best (lowest validation KID), a step, or a directory."),
    "weights": ("ema", ("--weights",), "ema (default) or model (raw) weights."),
    "device": ("auto", ("--device",), "auto, cpu or cuda[:N]."),
    "overwrite": (False, ("--overwrite",), "Replace a non-empty --out once sampling is done."),
    "progress": (True, ("--progress/--no-progress",), "Show progress bars."),
}


def shared_option(name: str) -> Any:
    """A fresh typer.Option for a flag of :data:`SHARED_OPTIONS` (typer wants one object per signature)."""
    default, flags, help_text = SHARED_OPTIONS[name]
    return typer.Option(default, *flags, help=help_text)


def sampler_config(run: LoadedRun, sampler: str, steps: int, cfg: float, ghg: str | None,
                   m: int | None) -> SamplerConfig:
    if ghg is None:
        ghg = "hidden" if run.model.has_cell_state else "none"
    if not run.model.has_cell_state and ghg != "none":
        raise ConfigError(f"--ghg {ghg} needs a cellular model; {run.spec.model.name} has no cell state "
                          "(use --ghg none)")
    sc = SamplerConfig(sampler=sampler, steps=steps, cfg=cfg, ghg=ghg, nca_steps=m)
    sc.validate()
    return sc


def run_split(run: LoadedRun, spec: str, split: str, folds_file: str | None, fold: int) -> ImageSet:
    """A split of dataset ``spec`` (at the run's image size) whose classes must be the run's."""
    from geca.data import load_split

    images = load_split(spec, split, image_size=run.spec.data.image_size, folds_file=folds_file, fold=fold)
    if images.class_names != run.spec.class_names:
        raise ConfigError(f"{spec}:{split} has classes {images.class_names}, the run was trained on "
                          f"{run.spec.class_names}")
    return images


def resolve_class(name_or_index: str, class_names: list[str]) -> int:
    if name_or_index.isdigit() and int(name_or_index) < len(class_names):
        return int(name_or_index)
    if name_or_index in class_names:
        return class_names.index(name_or_index)
    raise ConfigError(f"unknown label {name_or_index!r}; classes: {', '.join(class_names)} "
                      f"(or an index 0–{len(class_names) - 1})")


@guarded
def sample(
    run: Path = typer.Option(..., "--run", help="Run directory written by `geca train`."),
    out: Path = typer.Option(..., "--out", help="Output directory (images/, labels.csv, manifest.json)."),
    per_class: int | None = typer.Option(None, "--per-class", help="Images per class (one-hot label vectors)."),
    labels_from: str | None = typer.Option(None, "--labels-from", help="Replicate the label vectors of this "
                                           "split of the run's dataset: train, val or test."),
    ratio: int = typer.Option(1, "--ratio", help="With --labels-from: each label vector exactly this many times."),
    sampler: str = shared_option("sampler"),
    steps: int = shared_option("steps"),
    cfg: float = shared_option("cfg"),
    ghg: str | None = shared_option("ghg"),
    m: int | None = shared_option("m"),
    seed: int = shared_option("seed"),
    batch_size: int = shared_option("batch_size"),
    checkpoint: str | None = shared_option("checkpoint"),
    weights: str = shared_option("weights"),
    device: str = shared_option("device"),
    overwrite: bool = shared_option("overwrite"),
    progress: bool = shared_option("progress"),
) -> None:
    """Sample labelled images from a trained run."""
    from geca.sampling.generate import write_sample_dir
    from geca.sampling.labels import per_class_labels, replicate_labels

    if (per_class is None) == (labels_from is None):
        raise ConfigError("give exactly one of --per-class N or --labels-from SPLIT")
    dev = pick_device(device)
    loaded = load_run(run, checkpoint, weights, dev)
    sc = sampler_config(loaded, sampler, steps, cfg, ghg, m)
    if per_class is not None:
        if per_class < 1:
            raise ConfigError(f"--per-class must be ≥ 1, got {per_class}")
        labels = per_class_labels(loaded.spec.num_classes, per_class)
        source = {"labels": f"per-class {per_class}"}
    else:
        d = loaded.spec.data
        split = run_split(loaded, d.spec, labels_from, d.folds_file, d.fold)
        labels = replicate_labels(split.labels, ratio)
        source = {"labels": f"{d.spec}:{labels_from} x{ratio}"}
    manifest, _ = write_sample_dir(out, loaded, labels, sc, seed, batch_size, dev, source, overwrite, progress)
    typer.echo(f"wrote {manifest['num_images']} images to {out} in {manifest['seconds']} s")


@guarded
def grow(
    run: Path = typer.Option(..., "--run", help="Run directory of a GeCA."),
    out: Path = typer.Option(..., "--out", help="Directory for growth.gif/png and denoise.gif/png."),
    label: str = typer.Option("0", "--label", help="Class name or index of the organism."),
    at_t: int = typer.Option(500, "--t", help="Noise level t (0–T) at which to show the M NCA updates."),
    sampler: str = typer.Option("ddim", "--sampler", help=SAMPLER_HELP["sampler"]),
    steps: int = typer.Option(50, "--steps", help=SAMPLER_HELP["steps"]),
    cfg: float = typer.Option(1.5, "--cfg", help=SAMPLER_HELP["cfg"]),
    ghg: str | None = shared_option("ghg"),
    m: int | None = typer.Option(None, "--m", "--nca-steps", help=SAMPLER_HELP["m"]),
    frames: int = typer.Option(25, "--frames", help="Frames of the denoising trajectory."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    checkpoint: str | None = shared_option("checkpoint"),
    device: str = shared_option("device"),
) -> None:
    """Show one organism growing from its seed cell, and its denoising trajectory over t."""
    from geca.sampling.generate import decoder
    from geca.sampling.growth import grow as run_growth
    from geca.sampling.growth import write_growth

    dev = pick_device(device)
    loaded = load_run(run, checkpoint, "ema", dev)
    if not loaded.model.has_cell_state:
        raise ConfigError(f"{loaded.spec.model.name} is not a cellular model; `geca grow` needs a GeCA")
    sc = sampler_config(loaded, sampler, steps, cfg, ghg, m)
    cls = resolve_class(label, loaded.spec.class_names)
    y = torch.zeros(1, loaded.spec.num_classes, device=dev)
    y[0, cls] = 1
    torch.manual_seed(seed)
    s = loaded.spec
    g = run_growth(loaded.model, loaded.diffusion, y, (s.in_channels, s.resolution, s.resolution), s.sampling(sc),
                   at_t, frames, decoder(loaded, dev))
    paths = write_growth(g, out)
    typer.echo(f"organism of class {s.class_names[cls]!r}, M updates shown at t={g.nca_t}:")
    for p in paths.values():
        typer.echo(f"  {p}")
