"""`geca sample` and `geca grow`."""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from geca.cli.common import guarded, pick_device
from geca.config import ConfigError
from geca.sampling.samplers import SamplerConfig
from geca.training.checkpoint import LoadedRun, load_run

SAMPLER_HELP = {
    "sampler": "ddpm (ancestral, respaced) or ddim (η=0).",
    "steps": "Reverse steps (respaced from the trained T).",
    "cfg": "Classifier-free guidance scale on ε (1 = conditional only).",
    "ghg": "Gene Heredity Guidance: hidden (the paper's), none, out or both.",
    "m": "NCA steps M per denoiser call (default: as trained; fewer = undergrowth, more = overgrowth).",
}


def sampler_config(run: LoadedRun, sampler: str, steps: int, cfg: float, ghg: str, m: int | None) -> SamplerConfig:
    if not run.model.has_cell_state and ghg != "none":
        raise ConfigError(f"--ghg {ghg} needs a cellular model; {run.spec.model.name} has no cell state "
                          "(use --ghg none)")
    sc = SamplerConfig(sampler=sampler, steps=steps, cfg=cfg, ghg=ghg, nca_steps=m)
    sc.validate()
    return sc


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
    sampler: str = typer.Option("ddpm", "--sampler", help=SAMPLER_HELP["sampler"]),
    steps: int = typer.Option(250, "--steps", help=SAMPLER_HELP["steps"]),
    cfg: float = typer.Option(1.5, "--cfg", help=SAMPLER_HELP["cfg"]),
    ghg: str = typer.Option("hidden", "--ghg", help=SAMPLER_HELP["ghg"]),
    m: int | None = typer.Option(None, "--m", "--nca-steps", help=SAMPLER_HELP["m"]),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (same seed, same images)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per sampling batch."),
    checkpoint: str | None = typer.Option(None, "--checkpoint", help="latest (default), a step, or a directory."),
    weights: str = typer.Option("ema", "--weights", help="ema (default) or model (raw) weights."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out once sampling is done."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Sample labelled images from a trained run."""
    from geca.data import load_split
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
        split = load_split(d.spec, labels_from, image_size=d.image_size, folds_file=d.folds_file, fold=d.fold)
        if split.class_names != loaded.spec.class_names:
            raise ConfigError(f"{d.spec}:{labels_from} has classes {split.class_names}, the run was trained on "
                              f"{loaded.spec.class_names}")
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
    ghg: str = typer.Option("hidden", "--ghg", help=SAMPLER_HELP["ghg"]),
    m: int | None = typer.Option(None, "--m", "--nca-steps", help=SAMPLER_HELP["m"]),
    frames: int = typer.Option(25, "--frames", help="Frames of the denoising trajectory."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    checkpoint: str | None = typer.Option(None, "--checkpoint", help="latest (default), a step, or a directory."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
) -> None:
    """Show one organism growing from its seed cell, and its denoising trajectory over t."""
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
    g = run_growth(loaded.model, loaded.diffusion, y, (s.in_channels, s.resolution, s.resolution), sc, at_t, frames)
    paths = write_growth(g, out)
    typer.echo(f"organism of class {s.class_names[cls]!r}, M updates shown at t={g.nca_t}:")
    for p in paths.values():
        typer.echo(f"  {p}")
