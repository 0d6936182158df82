"""`geca train`."""

from __future__ import annotations

from pathlib import Path

import typer

from geca.cli.common import guarded
from geca.config import RunConfig, load_config
from geca.models.config import NAMED_MODELS, named_model


def apply_overrides(cfg: RunConfig, **overrides: object) -> RunConfig:
    """CLI flags win over the YAML file; None means "not given"."""
    targets = {
        "data": (cfg.data, "spec"), "image_size": (cfg.data, "image_size"), "folds_file": (cfg.data, "folds_file"),
        "fold": (cfg.data, "fold"), "download": (cfg.data, "download"), "vae": (cfg.data, "vae"),
        "latent_size": (cfg.data, "latent_size"),
        "max_steps": (cfg.train, "max_steps"), "max_minutes": (cfg.train, "max_minutes"),
        "batch_size": (cfg.train, "batch_size"), "lr": (cfg.train, "lr"), "seed": (cfg.train, "seed"),
        "precision": (cfg.train, "precision"), "ema_decay": (cfg.train, "ema_decay"),
        "log_every": (cfg.train, "log_every"), "sample_every": (cfg.train, "sample_every"),
        "checkpoint_every": (cfg.train, "checkpoint_every"), "validate_every": (cfg.validation, "every"),
        "nca_steps": (cfg.model, "nca_steps"), "attention": (cfg.model, "attention"),
        "compile": (cfg.model, "compile"), "checkpointing": (cfg.model, "checkpointing"),
    }
    for key, value in overrides.items():
        if value is not None:
            obj, attr = targets[key]
            setattr(obj, attr, value)
    return cfg


@guarded
def train(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML run config (see configs/)."),
    out: Path = typer.Option(..., "--out", help="Run directory to create (or continue with --resume)."),
    data: str | None = typer.Option(None, "--data", help="Dataset: an .npz/.csv path, a MedMNIST name "
                                    "(retinamnist), or synthetic-fundus / synthetic-oct[@key=value,...]."),
    model: str | None = typer.Option(None, "--model", help="Named model config: " + ", ".join(NAMED_MODELS)
                                     + " (replaces the config file's model section)."),
    image_size: int | None = typer.Option(None, "--image-size", help="Resize images to this size."),
    folds_file: str | None = typer.Option(None, "--folds-file", help="Folds CSV from `geca folds` (folder+CSV)."),
    fold: int | None = typer.Option(None, "--fold", help="Which fold is the test fold (train = other folds)."),
    vae: str | None = typer.Option(None, "--vae", help="Train on the latents of this diffusers AutoencoderKL (a "
                                   "local directory, e.g. sd-vae-ft-ema, or a hub id in the local HF cache); "
                                   "default: pixel space."),
    latent_size: int | None = typer.Option(None, "--latent-size", help="With --vae: centre-crop and resize "
                                           "images to this size before encoding (default 256)."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps."),
    max_minutes: float | None = typer.Option(None, "--max-minutes", help="Stop after this much training time."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Global batch size (split over processes)."),
    lr: float | None = typer.Option(None, "--lr", help="AdamW learning rate."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for all training randomness."),
    precision: str | None = typer.Option(None, "--precision", help="fp32, bf16, fp16 (GPU only) or auto (bf16 "
                                         "where the hardware runs it natively, else fp32)."),
    ema_decay: float | None = typer.Option(None, "--ema-decay", help="EMA decay of the weights."),
    nca_steps: int | None = typer.Option(None, "--nca-steps", help="NCA steps M per denoiser call (named so that "
                                         "torchrun does not take it for its own --m… options)."),
    attention: str | None = typer.Option(None, "--attention", help="Neighbourhood attention: fast, sliced or "
                                         "reference (the published 9×-copy gather)."),
    compile: bool | None = typer.Option(None, "--compile/--no-compile", help="torch.compile the GeCA block."),
    checkpointing: bool | None = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing",
                                              help="Recompute each NCA step in backward to save memory."),
    log_every: int | None = typer.Option(None, "--log-every", help="Steps between log.csv rows."),
    sample_every: int | None = typer.Option(None, "--sample-every", help="Steps between EMA sample grids "
                                            "(0: never)."),
    checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", help="Steps between checkpoints "
                                                "(a final one is always written)."),
    validate_every: int | None = typer.Option(None, "--validate-every", help="Steps between validation KIDs of "
                                              "EMA samples against the val split (0: off); keeps checkpoints/best."),
    download: bool | None = typer.Option(None, "--download", help="Fetch a named MedMNIST file if missing "
                                         "(needs a network)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train a GeCA (launch with `torchrun --nproc_per_node N` for several processes)."""
    from geca.training.trainer import train as run_training

    cfg = load_config(config)
    if model is not None:
        cfg.model = named_model(model)
    cfg = apply_overrides(cfg, data=data, image_size=image_size, folds_file=folds_file, fold=fold,
                          vae=vae, latent_size=latent_size, download=download, max_steps=max_steps,
                          max_minutes=max_minutes, batch_size=batch_size,
                          lr=lr, seed=seed, precision=precision, ema_decay=ema_decay, log_every=log_every,
                          sample_every=sample_every, checkpoint_every=checkpoint_every,
                          validate_every=validate_every, nca_steps=nca_steps,
                          attention=attention, compile=compile, checkpointing=checkpointing)
    summary = run_training(cfg, out, resume=resume, progress=progress)
    if summary["parameter_checksum"] is not None:
        typer.echo(f"parameters identical across {summary['processes']} processes "
                   f"(checksum {summary['parameter_checksum']:.10g})")
    typer.echo(f"trained to step {summary['step']}; run directory: {out}")
