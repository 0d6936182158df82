"""`geca sample` and `geca grow`."""

from __future__ import annotations

from pathlib import Path

import typer

from geca.cli.common import RESUME_BATCHES, guarded, on_interrupt, pick_device
from geca.cli.options import GROW, SamplingFlags, sampling_flags
from geca.errors import ConfigError
from geca.sampling.config import GROWTH_FRAMES, GROWTH_T, growth_sampler
from geca.utils.io import has_csv_header, output_file


@guarded
@sampling_flags()
def sample(
    run: Path = typer.Option(..., "--run", help="Run directory written by `geca train`."),
    out: Path = typer.Option(..., "--out", help="Output directory (images/, labels.csv, manifest.json)."),
    per_class: int | None = typer.Option(None, "--per-class", min=1, help="Images per class (one-hot label vectors)."),
    labels_from: str | None = typer.Option(None, "--labels-from", help="Replicate the label vectors of this "
                                           "split of the run's dataset: train, val or test."),
    ratio: int | None = typer.Option(None, "--ratio", min=1, help="With --labels-from: each label vector exactly "
                                     "this many times (default 1)."),
    trace: Path | None = typer.Option(None, "--trace", help="GeCA: also write a trace to PATH, a .csv file (its "
                                      "plot beside it as .png): per reverse step and GHG mode, mean/max |C_h| and "
                                      "|C_out|, the predicted-ε std and the x̂0 range, on one image per class from "
                                      "the same noise."),
    *,
    flags: SamplingFlags,
) -> None:
    """Sample labelled images from a trained run."""
    from geca.data.registry import SPLITS
    from geca.run import load_run, run_folds, run_split
    from geca.sampling.generate import run_sampler, write_sample_dir
    from geca.sampling.labels import per_class_labels, replicate_labels
    from geca.sampling.trace import FIELDS as TRACE_FIELDS
    from geca.sampling.trace import write_trace

    if ratio is not None and labels_from is None:
        raise ConfigError("--ratio replicates the label vectors of --labels-from SPLIT; with --per-class, raise N")
    if (per_class is None) == (labels_from is None):
        raise ConfigError("give exactly one of --per-class N or --labels-from SPLIT")
    if labels_from is not None and labels_from not in SPLITS:
        raise ConfigError(f"--labels-from must be one of {', '.join(SPLITS)}, got {labels_from!r}")
    ratio = ratio or 1
    if trace is not None:
        output_file(trace, "--trace", ".csv", flags.overwrite, own=("an earlier trace (its CSV columns)",
                                                                    lambda p: has_csv_header(p, TRACE_FIELDS)))
        if trace.with_suffix(".png").exists() and not trace.exists():
            raise ConfigError(f"--trace {trace}: its plot would replace {trace.with_suffix('.png')}, which no trace "
                              "wrote; choose another --trace")
    device = pick_device(flags.device)
    loaded = load_run(run, flags.checkpoint, flags.weights, device, flags.vae)
    if trace is not None and not loaded.model.has_cell_state:
        raise ConfigError(f"--trace: {run} is not a GeCA (it has no cell state to trace)")
    sampler = run_sampler(loaded, flags.sampling, strict=True)
    if per_class is not None:
        labels = per_class_labels(loaded.spec.num_classes, per_class)
        source = {"labels": f"per-class {per_class}"}
    else:
        d = loaded.spec.data
        split = run_split(loaded, d.spec, labels_from, run_folds(loaded.spec), d.fold)
        labels = replicate_labels(split.labels, ratio)
        source = {"labels": f"{d.spec}:{labels_from} x{ratio}"}
    with on_interrupt(lambda: RESUME_BATCHES):
        manifest, _ = write_sample_dir(out, loaded, labels, sampler, flags.seed, flags.batch_size, device, source,
                                       flags.overwrite, flags.progress, flags.resume)
    typer.echo(f"wrote {manifest['num_images']} images to {out} in {manifest['seconds']} s")
    if trace is not None:
        write_trace(loaded, sampler, flags.seed, device, trace)
        typer.echo(f"wrote the GHG trace to {trace} and {trace.with_suffix('.png')}")


@guarded
@sampling_flags(GROW, {"sampler": "ddim (η=0) or ddpm (ancestral): the respaced chain whose M updates grow replays "
                            "(DPM-Solver++ is not one).", "steps": "Reverse steps, respaced from the trained T."},
                **{k: getattr(growth_sampler(), k) for k in ("sampler", "steps")})
def grow(
    run: Path = typer.Option(..., "--run", help="Run directory of a GeCA."),
    out: Path = typer.Option(..., "--out", help="Directory for growth.gif/png and denoise.gif/png."),
    label: str = typer.Option("0", "--label", help="Class name or index of the organism."),
    at_t: int = typer.Option(GROWTH_T, "--t", help="Noise level t (0 to T−1, T the run's diffusion steps: 0…999 by "
                             "default) at which to show the M NCA updates."),
    frames: int = typer.Option(GROWTH_FRAMES, "--frames", min=1, help="Frames of the denoising trajectory (at "
                               "most one per reverse step: --steps)."),
    *,
    flags: SamplingFlags,
) -> None:
    """Show one organism growing from its seed cell, and its denoising trajectory over t."""
    from geca.run import load_run
    from geca.sampling.generate import run_sampler
    from geca.sampling.growth import grow_organism

    device = pick_device(flags.device)
    loaded = load_run(run, flags.checkpoint, "ema", device, flags.vae)
    sampler = run_sampler(loaded, flags.sampling, strict=True)
    organism = grow_organism(loaded, label, at_t, sampler, frames, flags.seed, device, out, flags.overwrite)
    nearest = "" if organism.t == at_t else f" (the reverse step nearest --t {at_t} with {sampler.steps} steps)"
    typer.echo(f"organism of class {organism.label!r}, M updates shown at t={organism.t}{nearest}:")
    for p in organism.paths.values():
        typer.echo(f"  {p}")
