"""`geca encode`: cache the SD-VAE latents of a dataset's splits (and of their mirror images)."""

from __future__ import annotations

import functools
from pathlib import Path

import typer

from geca.cli.common import BARS_HELP, CV_VAL_HELP, guarded, pick_device, show_progress, split_flags
from geca.errors import ConfigError
from geca.utils.schema import MAX_BATCH, MAX_IMAGE_SIZE


@guarded
def encode(
    vae: str = typer.Option(..., "--vae", help="diffusers AutoencoderKL: a local directory (e.g. sd-vae-ft-ema) or "
                            "a hub id already in the local Hugging Face cache."),
    data: str = typer.Option(..., "--data", help="Dataset: an .npz/.csv path, a MedMNIST name, or "
                             "synthetic-fundus / synthetic-oct[@key=value,...]."),
    out: Path = typer.Option(..., "--out", help="Cache directory (one subdirectory per split)."),
    size: int = typer.Option(256, "--size", min=8, max=MAX_IMAGE_SIZE, help="Centre-crop and resize images to this "
                             "side before encoding."),
    mean: bool = typer.Option(False, "--mean", help="Cache the posterior means instead of posterior samples."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, max=MAX_BATCH, help="Images per VAE forward pass."),
    splits: str = typer.Option("train,val,test", "--splits", help="Comma-separated splits to encode."),
    image_size: int | None = typer.Option(None, "--image-size", min=2, max=MAX_IMAGE_SIZE, help="Resize at load "
                                          "time, as `geca train --image-size` does (so that training finds this "
                                          "cache)."),
    folds_file: str | None = typer.Option(None, "--folds-file", help="Folds CSV from `geca folds`."),
    fold: int | None = typer.Option(None, "--fold", min=0, help="With --folds-file: which fold is the test fold "
                                    "(default 0)."),
    cv_val: str | None = typer.Option(None, "--cv-val", help=CV_VAL_HELP + " Default: slice."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    progress: bool | None = typer.Option(None, "--progress/--no-progress", help=BARS_HELP),
) -> None:
    """Encode images to scaled VAE latents and cache them; reused while data, VAE and settings are unchanged."""
    from geca.data.imageset import ImageSet
    from geca.data.registry import SPLITS, load_split
    from geca.latent.cache import LatentSet, cached, check_cache_dir, ensure_latents
    from geca.latent.codec import LatentCodec
    from geca.utils.io import output_dir

    names = [s.strip() for s in splits.split(",") if s.strip()]
    if not names:
        raise ConfigError("--splits is empty; give e.g. train,val,test")
    unknown = [name for name in names if name not in SPLITS]
    if unknown:  # before the first split is encoded, not after
        raise ConfigError(f"--splits: unknown split(s) {', '.join(unknown)}; valid: {', '.join(SPLITS)}")
    fold, cv_val = split_flags(folds_file, fold, cv_val)
    dev = pick_device(device)
    output_dir(out)

    def load(split: str) -> ImageSet:
        return load_split(data, split, image_size=image_size, folds_file=folds_file, fold=fold, cv_val=cv_val)

    def line(split: str, latents: LatentSet, status: str) -> str:
        shape = "×".join(str(n) for n in latents.latents.shape[1:])
        return f"{split}: {status}: {len(latents.latents)} latents of {shape} (+ mirrored) in {out / split}"

    # One split in memory at a time (a 256² set can be many GB), and every cache that is rebuilt, which replaces its
    # folder, is checked before any split is encoded; a split to encode is loaded again then.
    reused, pending = [], []
    for split in names:
        found = cached(vae, load(split), split, out, size=size, mean=mean)
        if found is None:
            check_cache_dir(out / split)
            pending.append(split)
        else:
            reused.append(line(split, found, "reused"))
    for message in reused:
        typer.echo(message)
    codec = functools.cache(lambda: LatentCodec.load(vae, size, dev, batch_size))  # loaded only if needed
    for split in pending:
        latents, status = ensure_latents(vae, load(split), split, out, size=size, mean=mean, get_codec=codec,
                                         progress=show_progress(progress))
        typer.echo(line(split, latents, status))
