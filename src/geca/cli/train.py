"""`geca train`."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import typer

from geca.cli.common import (
    CV_VAL_HELP,
    DEMO_MARKER,
    PROGRESS_HELP,
    guarded,
    on_interrupt,
    pick_device,
    set_threads,
    show_progress,
)
from geca.errors import ConfigError
from geca.models.config import NAMED_MODELS

# flag → the config field it sets
FLAG_FIELDS = {
    "data": "data.spec", "image_size": "data.image_size", "folds_file": "data.folds_file", "fold": "data.fold",
    "cv_val": "data.cv_val",
    "download": "data.download", "vae": "data.vae", "latent_size": "data.latent_size",
    "max_steps": "train.max_steps", "max_minutes": "train.max_minutes", "batch_size": "train.batch_size",
    "lr": "train.lr", "seed": "train.seed", "precision": "train.precision", "ema_decay": "train.ema_decay",
    "log_every": "train.log_every", "sample_every": "train.sample_every", "checkpoint_every": "train.checkpoint_every",
    "keep_checkpoints": "train.keep_checkpoints",
    "validate_every": "validation.every", "nca_steps": "model.nca_steps", "attention": "model.attention",
    "compile": "model.compile", "checkpointing": "model.checkpointing", "heredity": "model.heredity",
    "flip": "data.flip", "warmup_steps": "train.warmup_steps", "lr_schedule": "train.lr_schedule",
    "logger": "train.logger",
}


def flag_name(key: str, value: object) -> str:
    """The flag as the user typed it: `--no-compile` for compile=False, `--grad-checkpointing` for checkpointing."""
    name = "grad-checkpointing" if key == "checkpointing" else key.replace("_", "-")
    return f"--no-{name}" if value is False else f"--{name}"


def apply_overrides(config: Any, **overrides: object) -> Any:
    """CLI flags win over the YAML file; None means "not given". A flag the model family lacks is an error."""
    from geca.utils.schema import set_field

    for key, value in overrides.items():
        if value is not None:
            set_field(config, FLAG_FIELDS[key], value, flag_name(key, value))
    return config


@guarded
def train(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML run config, or a shipped preset's name "
                                       "(`geca configs` lists them); with --resume, default: the run's own "
                                       "config.yaml."),
    out: Path = typer.Option(..., "--out", help="Run directory to create (or continue with --resume)."),
    data: str | None = typer.Option(None, "--data", help="Dataset: an .npz/.csv path, a MedMNIST name "
                                    "(retinamnist), or synthetic-fundus / synthetic-oct[@key=value,...]."),
    model: str | None = typer.Option(None, "--model", help="Named model config: " + ", ".join(NAMED_MODELS)
                                     + " (replaces the config file's model section)."),
    image_size: int | None = typer.Option(None, "--image-size", help="Resize images to this size."),
    folds_file: str | None = typer.Option(None, "--folds-file", help="Folds CSV from `geca folds` (folder+CSV)."),
    fold: int | None = typer.Option(None, "--fold", help="Which fold is the test fold (train = other folds)."),
    cv_val: str | None = typer.Option(None, "--cv-val", help=CV_VAL_HELP),
    vae: str | None = typer.Option(None, "--vae", help="Train on the latents of this diffusers AutoencoderKL (a "
                                   "local directory, e.g. sd-vae-ft-ema, or a hub id in the local HF cache); "
                                   "default: pixel space."),
    latent_size: int | None = typer.Option(None, "--latent-size", help="With --vae: centre-crop and resize "
                                           "images to this size before encoding (default 256)."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps."),
    max_minutes: float | None = typer.Option(None, "--max-minutes", help="Stop after this much training time in this "
                                         "invocation (a resumed run gets the budget afresh)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Global batch size (split over processes)."),
    lr: float | None = typer.Option(None, "--lr", help="AdamW learning rate."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for all training randomness."),
    precision: str | None = typer.Option(None, "--precision", help="fp32, bf16, fp16 (GPU only) or auto (bf16 "
                                         "where the hardware runs it natively, else fp32)."),
    ema_decay: float | None = typer.Option(None, "--ema-decay", help="EMA decay of the weights."),
    # not --m as in `geca sample`: torchrun would take that for one of its own --m… options
    nca_steps: int | None = typer.Option(None, "--nca-steps", help="NCA steps M per denoiser call."),
    attention: str | None = typer.Option(None, "--attention", help="Neighbourhood attention: auto (the default: "
                                         "cpu on a CPU, fast elsewhere), cpu (C kernels, built once with the "
                                         "system C compiler), fast, sliced, reference (the published 9×-copy "
                                         "gather) or triton (CUDA kernels)."),
    compile: bool | None = typer.Option(None, "--compile/--no-compile", help="torch.compile the neighbourhood "
                                        "attention (GeCA; the whole NCA step with model.skip_idle false) or the "
                                        "blocks (DiT, UNet); only the first run pays for "
                                        "compilation (kept in ~/.cache/geca/torchinductor). Default (model.compile: "
                                        "auto): GeCA's fast or sliced attention is compiled on a CPU with a C++ "
                                        "compiler when the step budget is long enough to earn it back; the default "
                                        "attention (auto: the C kernels on a CPU, faster still) is not."),
    checkpointing: bool | None = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing",
                                              help="Recompute each NCA step in backward to save memory."),
    heredity: bool | None = typer.Option(None, "--heredity/--no-heredity", help="GeCA: heredity-aware training "
                                         "(ours: a gated entry for the inherited C_h, trained on what GHG hands "
                                         "over; model.heredity gated, a GeCA's default) or the paper's (off)."),
    log_every: int | None = typer.Option(None, "--log-every", help="Steps between log.csv rows."),
    sample_every: int | None = typer.Option(None, "--sample-every", help="Steps between EMA sample grids "
                                            "(0: never)."),
    checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", help="Steps between checkpoints "
                                                "(0: only the final one, which is always written)."),
    keep_checkpoints: int | None = typer.Option(None, "--keep-checkpoints", help="Keep only the latest N step "
                                                "checkpoints, deleting older ones as new ones are written (default: "
                                                "keep all; checkpoints/best always stays)."),
    validate_every: int | None = typer.Option(None, "--validate-every", help="Steps between validation KIDs of "
                                              "EMA samples against the val split (0: off); keeps checkpoints/best."),
    download: bool | None = typer.Option(None, "--download", help="Fetch a named MedMNIST file if missing "
                                         "(needs a network)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    flip: bool | None = typer.Option(None, "--flip/--no-flip", help="Random horizontal flips in training (off for "
                                     "data that is not mirror-symmetric)."),
    warmup_steps: int | None = typer.Option(None, "--warmup-steps", help="Linear LR warm-up over this many steps."),
    lr_schedule: str | None = typer.Option(None, "--lr-schedule", help="constant (the paper's) or cosine (to 0 at "
                                           "--max-steps, after the warm-up)."),
    # "\\[" keeps Rich from reading [tensorboard] as markup and dropping it from --help
    logger: str | None = typer.Option(None, "--logger", help="csv (log.csv, always written) or tensorboard (also "
                                      "TensorBoard events in RUN/tensorboard; pip install 'geca\\[tensorboard]')."),
    set_values: list[str] | None = typer.Option(None, "--set", help="KEY=VALUE for any config field, dotted "
                                                "(--set model.hidden_channels=64 --set train.grad_clip=1.0); the "
                                                "value is read as YAML; repeatable, once per key, and not for a key "
                                                "a flag given too sets."),
    device: str = typer.Option("auto", "--device", help="auto (the GPU where there is one), cpu or cuda (several "
                               "GPUs: launch with torchrun)."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: one per core)."),
    progress: bool | None = typer.Option(None, "--progress/--no-progress", help=PROGRESS_HELP),
) -> None:
    """Train a GeCA (launch with `torchrun --nproc_per_node N` for several processes)."""
    given = {key: value for key, value in locals().items() if key in FLAG_FIELDS}  # the flags that set a field
    from geca.config import config_changes, load_config
    from geca.models.config import named_model
    from geca.presets import resolve_config
    from geca.run import checkpoint_dir, read_spec
    from geca.training.trainer import train as run_training
    from geca.utils.schema import apply_set

    if config is not None:
        config = resolve_config(config, "run")
    elif resume and (out / "model.json").is_file():
        config = out / "config.yaml"  # the run goes on as it was configured; flags below override it, logged
        if not config.is_file() or not config.read_text(errors="replace").strip():
            raise ConfigError(f"{config}: {'empty' if config.is_file() else 'missing'}; --resume continues a run "
                              "with its own config (give the config it was trained with as -c CONFIG)")
    run_config = load_config(config)
    own = out / "config.yaml"
    before = None  # with --resume: what the run trained with, which each change is said against (-c's and flags')
    if resume:
        before = copy.deepcopy(run_config)
        if config != own and own.is_file():
            try:
                before = load_config(own)
            except ConfigError:  # damaged, or empty: -c CONFIG is how such a run resumes; only flags are compared
                pass
        if hasattr(before.model, "heredity"):
            # a config.yaml written before model.heredity existed: the run's model.json says how it was trained
            before.model.heredity = getattr(read_spec(out).model, "heredity", before.model.heredity)
            if config == own:
                run_config.model.heredity = before.model.heredity
    if model is not None:
        run_config.model = named_model(model)
    overrides = {**given, "heredity": None if heredity is None else ("gated" if heredity else "off")}
    apply_overrides(run_config, **overrides)
    # A bad value is named as the user wrote it: its flag, or its key in the config file.
    names = {FLAG_FIELDS[k]: flag_name(k, heredity if k == "heredity" else v)
             for k, v in overrides.items() if v is not None}
    names.update(apply_set(run_config, set_values or [], names))
    set_threads(threads)
    cpu = pick_device(device).type == "cpu"
    try:
        run_config.validate(names, where=config)
    except ConfigError as e:
        if not resume or config != own or str(config) not in str(e):
            raise
        # a value that was valid when the run began (a bound added since) or an edited file
        raise ConfigError(f"{e}; --resume reads the run's own config.yaml: override the value with its flag or "
                          "--set KEY=VALUE") from None
    folds = run_config.data.folds_file
    if folds is not None and folds_file is None and not Path(folds).expanduser().is_file():
        # a preset's placeholder, or the folds of the dataset that --data replaced, named where they came from
        flag = names.get("data.folds_file")
        raise ConfigError(f"{flag or f'{config}: data.folds_file'} {folds}: not found" + (
            f"; --data {data} replaces the config's dataset but not its folds file: pass --folds-file for it, or "
            "--set data.folds_file=null" if data is not None and flag is None else ""))
    if not resume and (out / DEMO_MARKER).exists():  # the next `geca demo` there would replace this run
        raise ConfigError(f"--out {out}: a `geca demo` folder (it holds {DEMO_MARKER}), which the next demo replaces; "
                          "train a new run elsewhere")
    def source(key: str) -> str:
        return names.get(key, "--model" if model and key.startswith("model.") else f"-c {config}")

    changes = [] if before is None else [f"resume: {key} {old!r} → {new!r} ({source(key)})"
                                         for key, old, new in config_changes(before, run_config)]
    with on_interrupt(lambda: f"`geca train --out {out} --resume` continues from the last checkpoint"
                      if (checkpoint_dir(out) / "latest.json").is_file()
                      else "before the first checkpoint; there is nothing to resume"):
        summary = run_training(run_config, out, resume=resume, progress=show_progress(progress), cpu=cpu,
                               changes=changes)
    if summary["parameter_checksum"] is not None:
        typer.echo(f"parameters identical across {summary['processes']} processes "
                   f"(checksum {summary['parameter_checksum']:.10g})")
    typer.echo(f"trained to step {summary['step']}; run directory: {out}")
