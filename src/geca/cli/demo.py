"""`geca demo`: train a small GeCA and show what it makes, in minutes on a CPU."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from geca.cli.common import DEMO_MARKER, guarded, pick_device, show_progress
from geca.errors import ConfigError
from geca.utils.io import delete_dir

if TYPE_CHECKING:  # the command imports the library inside, so that `geca --help` needs no torch
    import torch

    from geca.config import RunConfig
    from geca.sampling.config import SamplerConfig


def is_demo(out: Path) -> bool:
    """Whether `out` is a folder `geca demo` wrote (demos from before the marker: a run with the demo's grid), which
    the next demo may replace; a training run, whose model.json a demo's shares, is not."""
    legacy = (out / "model.json").is_file() and (out / "samples_per_grade.png").is_file()
    return (out / DEMO_MARKER).is_file() or legacy


# What a demo writes into its folder (a training run's files, then its samples and GIFs): an earlier demo's folder
# holding anything else holds the user's files, which replacing it would delete.
DEMO_DONE = ".geca-demo-done"  # written last: a demo with it is whole
DEMO_FILES = {DEMO_MARKER, DEMO_DONE, "config.yaml", "model.json", "log.csv", "loss.png", "validation.csv", "samples",
              "checkpoints", "latents", "tensorboard", "generated", "growth", "samples_per_grade.png"}
# Inside --out, where the earlier demo waits while the next is made: a rename within one folder works on any file
# system, also where --out is a mount point or the current folder. COMPLETE in it: every entry was moved there.
EARLIER, COMPLETE = ".earlier-demo", ".complete"


def _demos_own(entry: Path) -> bool:
    """A name the demo writes, or its temporaries and staging folders (`.generated.unfinished`, …); a file browser's
    .DS_Store goes with it. Any other name, hidden or not, is the user's."""
    name = entry.name
    return (name in DEMO_FILES or name in (EARLIER, ".DS_Store") or name.startswith(f"{EARLIER}.")
            or any(name.startswith(f".{own}.") for own in DEMO_FILES))


def check_replaceable(out: Path, data: str) -> None:
    """`out` may be written, and replaced where it holds an earlier demo: not a symlink, not the current folder or
    one above it, not holding the dataset, and if not empty, a demo's with nothing else in it."""
    from geca.data.registry import source_files
    from geca.utils.io import few, output_dir

    output_dir(out)
    if out.is_symlink():
        raise ConfigError(f"--out {out}: a symbolic link; the demo replaces its --out, give the folder itself")
    if not out.exists() or not any(out.iterdir()):  # nothing to replace
        return
    here, target = Path.cwd().resolve(), out.resolve()
    if target == here or target in here.parents:
        raise ConfigError(f"--out {out}: holds the current folder, which replacing it would delete")
    inside = [f for f in source_files(data) if target in f.parents]
    if inside:
        raise ConfigError(f"--data {data}: {inside[0]} lies inside --out {out}, which the demo replaces")
    if not is_demo(out):
        raise ConfigError(f"--out {out}: exists and is not a demo (no {DEMO_MARKER} in it); the demo replaces its own "
                          "folder only, choose another --out")
    others = sorted(p.name for p in out.iterdir() if not _demos_own(p))
    if others:
        raise ConfigError(f"--out {out}: an earlier demo, which the demo replaces, but it also holds {few(others)}; "
                          "move them out or choose another --out")


def _remove(entry: Path) -> None:
    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def recover(out: Path) -> None:
    """Put right what a demo stopped while replacing `out` left: the earlier demo back in place, unless the new one
    is whole. Safe to stop at any point itself: what is left is put right the next time."""
    for trash in out.glob(f"{EARLIER}.*"):  # an earlier demo a finished one was deleting
        shutil.rmtree(trash, ignore_errors=True)
    earlier = out / EARLIER
    if not earlier.is_dir():
        return
    if (earlier / COMPLETE).is_file():  # all of it was moved aside: the new demo was being made
        if (out / DEMO_DONE).is_file():
            _drop(earlier)
            return
        for entry in list(out.iterdir()):
            if entry != earlier:
                _remove(entry)
        (earlier / COMPLETE).unlink()
    for entry in list(earlier.iterdir()):  # without COMPLETE, `out` holds only what was never moved
        os.replace(entry, out / entry.name)
    earlier.rmdir()


def _drop(earlier: Path) -> None:
    """Delete the earlier demo, renamed first: one half-deleted is never taken for one waiting."""
    delete_dir(earlier, earlier.with_name(f"{EARLIER}.deleting"))


@contextmanager
def replacing(out: Path) -> Iterator[None]:
    """The earlier demo in `out` waits in `out/.earlier-demo` while the next is made, and comes back if that fails
    or is stopped, whenever it stops (`recover`)."""
    earlier = out / EARLIER
    try:
        if out.is_dir() and any(out.iterdir()):
            earlier.mkdir()
            for entry in list(out.iterdir()):
                if entry != earlier:
                    os.replace(entry, earlier / entry.name)
            (earlier / COMPLETE).write_text("")
        yield
    except BaseException:
        recover(out)
        raise
    if earlier.is_dir():
        _drop(earlier)


def demo_dataset() -> tuple[str, str]:
    """RetinaMNIST when its file can be found, else the procedural fundus set (and why)."""
    from geca.data.registry import load_split
    from geca.errors import DataError

    try:
        load_split("retinamnist", "val")
        return "retinamnist", "RetinaMNIST found"
    except DataError as e:
        return "synthetic-fundus", f"RetinaMNIST not found ({e}); using the procedural synthetic-fundus set"


@guarded
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Where the demo writes: a new or empty folder, or one "
                             "an earlier demo wrote, which is replaced once the new demo is done (kept if it fails "
                             "or is interrupted; any other folder, or other files in it, are refused)."),
    minutes: float | None = typer.Option(None, "--minutes", help="Training time budget (default: the preset's)."),
    data: str | None = typer.Option(None, "--data", help="Dataset spec (default: retinamnist if found, else "
                                    "synthetic-fundus)."),
    per_class: int = typer.Option(6, "--per-class", min=1, help="Samples per grade in the grid."),
    sampler_name: str = typer.Option("dpm++sde", "--sampler", help="Sampler of the grid: dpm++sde (DPM-Solver++ "
                                     "SDE; on a minutes-old model it leaves less speckle than ddim at the same "
                                     "calls), dpm++, ddim or ddpm. The growth GIFs replay DDIM in place of "
                                     "DPM-Solver++."),
    steps: int = typer.Option(25, "--steps", min=1, help="Denoiser calls for the samples and the growth GIFs."),
    schedule: str | None = typer.Option(None, "--schedule", help="Where DPM-Solver++ puts its steps: lambda (its "
                                        "default: evenly in log-SNR), uniform or karras."),
    ghg: str = typer.Option("none", "--ghg", help="Gene Heredity Guidance for the demo samples (none: a "
                            "minutes-old model has barely trained its heredity gate; hidden suits trained models)."),
    precision: str = typer.Option("auto", "--precision", help="Training's and sampling's precision: auto (bf16 "
                                  "where the device runs it natively, else fp32), fp32, bf16 or fp16 (GPU only)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
) -> None:
    """Train GeCA-T briefly, then write a sample grid per grade, a growth GIF and a loss curve."""
    from importlib import resources

    from geca.config import load_config
    from geca.data.registry import load_split
    from geca.sampling.config import SamplerConfig
    from geca.sampling.samplers import resolved_precision

    dev = pick_device(device)
    config = load_config(resources.files("geca") / "configs" / "demo.yaml")
    why = None
    if data is None:
        data, why = demo_dataset()
    config.data.spec = data
    if minutes is not None:
        config.train.max_minutes = minutes
    config.train.precision = precision
    config.validate({"train.max_minutes": "--minutes", "data.spec": "--data", "train.precision": "--precision"})
    # GHG inherits C_h across reverse steps; after minutes of training the heredity gate has barely learnt what to
    # take from it, so the demo shows the model's plain output (--ghg hidden to compare).
    sampler = SamplerConfig(sampler=sampler_name, steps=steps, guidance_scale=1.5, ghg=ghg, schedule=schedule,
                            precision=precision)
    sampler.validate()
    sampler.check_steps(config.diffusion.timesteps)  # before the earlier demo is moved aside and a model trained
    chosen = resolved_precision(precision, dev)  # refuses fp16 on a CPU, even on a machine with a GPU
    # growth replays a respaced DDPM/DDIM chain, which DPM-Solver++ is not
    growth = replace(sampler, sampler="ddim", schedule=None) if sampler_name.startswith("dpm++") else sampler
    if out.is_dir() and not out.is_symlink():
        recover(out)  # a demo stopped while it replaced this folder: its earlier demo first comes back
    check_replaceable(out, data)
    load_split(data, "train")  # a missing or corrupt dataset fails here, before the earlier demo is moved aside
    if why:
        typer.echo(why)
    with replacing(out):
        _make(out, config, data, chosen, dev, sampler, growth, per_class, f"{sampler_name} {steps}, CFG 1.5, GHG {ghg}")


def _make(out: Path, config: RunConfig, data: str, chosen: str, dev: torch.device, sampler: SamplerConfig,
          growth: SamplerConfig, per_class: int, how: str) -> None:
    """Train the demo's GeCA into `out`, then draw its samples, grid and growth GIFs there."""
    from geca.run import load_run
    from geca.sampling.config import GROWTH_FRAMES, GROWTH_T
    from geca.sampling.generate import write_sample_dir
    from geca.sampling.growth import grow_organism
    from geca.sampling.labels import per_class_labels
    from geca.training.trainer import train
    from geca.utils.plots import plot_class_grid

    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("Written by `geca demo`: the next demo with this --out replaces this folder.\n")
    typer.echo(f"training GeCA-T on {data} for {config.train.max_minutes} min ({chosen}) …")
    train(config, out, progress=show_progress(None), cpu=dev.type == "cpu")
    run = load_run(out, device=dev)
    labels = per_class_labels(run.spec.num_classes, per_class)
    typer.echo(f"sampling {len(labels)} images ({how}) …")
    manifest, images = write_sample_dir(out / "generated", run, labels, sampler, seed=0, batch_size=64, device=dev,
                                        progress=show_progress(None))
    grid_png = plot_class_grid(images, run.spec.class_names, per_class, out / "samples_per_grade.png",
                               title=f"GeCA-T, step {run.step}, {data}")
    paths = grow_organism(run, str(run.spec.num_classes - 1), GROWTH_T, growth, GROWTH_FRAMES, 0, dev,
                          out / "growth").paths
    typer.echo("\ndemo outputs:")
    for name, p in [("sample grid per grade", grid_png), ("samples (geca sample format)", out / "generated"),
                    ("growth GIF (NCA steps)", paths["growth_gif"]), ("denoising GIF", paths["denoise_gif"]),
                    ("loss curve", out / "loss.png"), ("training log", out / "log.csv")]:
        typer.echo(f"  {name:30s} {p}")
    typer.echo(f"({manifest['num_images']} samples in {manifest['seconds']} s)")
    (out / DEMO_DONE).write_text("")
