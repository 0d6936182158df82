"""`geca models`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from geca.cli.common import BARS_HELP, guarded, show_progress
from geca.errors import ConfigError
from geca.models.config import NAMED_MODELS, DiTConfig, ModelConfig, UNetConfig

MAX_GRID = 512  # a 4k-pixel image's latent; GeCA-S's forward pass there already takes minutes on a CPU


def describe(config: ModelConfig) -> str:
    """The hyper-parameters that set a config's size, in one short line."""
    c: Any = config
    if isinstance(c, DiTConfig):
        return f"depth {c.depth}, D {c.hidden_size}, {c.heads} heads, MLP {c.mlp_hidden}, p {c.patch_size}"
    if isinstance(c, UNetConfig):
        attn = ",".join(map(str, c.attention_resolutions)) or "mid only"
        return f"channels {'-'.join(map(str, c.block_channels))}, {c.layers_per_block}/level, attention at ÷{attn}"
    return f"D {c.hidden_size}, {c.heads} heads, MLP {c.mlp_hidden}, C_h {c.hidden_channels}, M {c.nca_steps}"


def tokens(config: ModelConfig, resolution: int) -> int | None:
    """Cells a GeCA update sees, or patches a DiT attends over; None for the UNet (a convolutional pyramid)."""
    if isinstance(config, DiTConfig):
        return (resolution // config.patch_size) ** 2
    if isinstance(config, UNetConfig):
        return None
    return resolution * resolution


def model_row(name: str, config: ModelConfig, channels: int, classes: int, resolution: int) -> dict[str, Any]:
    from geca.models.build import build_model, count_macs, count_parameters, executed_macs

    row: dict[str, Any] = {"name": name, "family": config.family, "summary": describe(config),
                           "input": [channels, resolution, resolution], "classes": classes}
    try:
        model = build_model(config, channels, classes, resolution)
        # counted on one real forward pass (which cells fire is drawn): a size beyond this machine's memory is a row
        dense = count_macs(model, channels, classes, resolution)
        gmacs = [round(macs / 1e9, 3) for macs in (dense, executed_macs(model, channels, classes, resolution, dense))]
    except (ValueError, RuntimeError, MemoryError) as e:
        why = str(e).splitlines()[0] if isinstance(e, ValueError) else \
            f"cannot run at this size here ({type(e).__name__})"
        return {**row, "parameters": None, "gmacs": None, "gmacs_executed": None, "tokens": None, "error": why}
    return {**row, "parameters": count_parameters(model), "gmacs": gmacs[0], "gmacs_executed": gmacs[1],
            "tokens": tokens(config, resolution)}


@guarded
def models(
    resolution: int = typer.Option(32, "--resolution", min=1, max=MAX_GRID, help="Grid size (a 256² image's SD-VAE "
                                   "latent is 32; every config runs one forward pass at it)."),
    channels: int = typer.Option(4, "--channels", min=1, max=64, help="Input channels (4 for SD-VAE latents)."),
    classes: int = typer.Option(11, "--classes", min=1, max=10_000, help="Number of label entries (11 for OCT-ML)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    progress: bool | None = typer.Option(None, "--progress/--no-progress", help=BARS_HELP + " Each config's "
                                         "forward pass takes seconds at 32², minutes at 256² for GeCA-S."),
) -> None:
    """Parameters, GMACs per denoiser call and cells/tokens of every named config at a given input shape.

    GMACs count matmuls and convolutions on a batch of 1; attention's score and value products are left out.
    "executed": what is computed on average, where GeCA computes an update only for the cells that fire.
    """
    from rich.console import Console
    from rich.table import Table
    from tqdm.auto import tqdm

    rows = [model_row(name, config, channels, classes, resolution)
            for name, config in tqdm(NAMED_MODELS.items(), desc="counting", disable=not show_progress(progress),
                                     leave=False)]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"named models at {channels}×{resolution}×{resolution}, {classes} classes",
                  caption="GMACs: one denoiser call at batch 1, attention's score and value products not counted; "
                  "executed: GeCA's idle cells skipped")
    for col in ("name", "family", "parameters", "GMACs", "executed", "cells/tokens", "layout"):
        table.add_column(col, justify="left" if col in ("name", "family", "layout") else "right")
    for r in rows:
        if r["parameters"] is None:
            table.add_row(r["name"], r["family"], "—", "—", "—", "—", f"[red]{r['error']}[/red]")
            continue
        table.add_row(r["name"], r["family"], f"{r['parameters']:,}", f"{r['gmacs']:.3g}", f"{r['gmacs_executed']:.3g}",
                      "—" if r["tokens"] is None else str(r["tokens"]), r["summary"])
    Console().print(table)


@guarded
def configs(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object (kind → name → file) instead of a table."),
) -> None:
    """List the shipped presets: run configs (`geca train -c NAME`) and studies (`geca experiment NAME`)."""
    from rich.console import Console
    from rich.table import Table

    from geca.presets import KINDS, describe, presets

    found = {kind: presets(kind) for kind in KINDS}
    if as_json:
        typer.echo(json.dumps({k: {n: str(p) for n, p in v.items()} for k, v in found.items()}, indent=2))
        return
    table = Table(title="shipped presets (use the name in place of a file)")
    for col in ("kind", "name", "what"):
        table.add_column(col)
    for kind, entries in found.items():
        for name, path in entries.items():
            table.add_row("geca train -c" if kind == "run" else "geca experiment", name, describe(path))
    Console(width=160).print(table)


@guarded
def runs(
    root: Path = typer.Argument(Path("runs"), help="Folder to search (recursively) for run directories."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    quick: bool = typer.Option(False, "--quick", help="Check that each checkpoint's files are there, and the weights "
                               "as long as their headers say, without hashing them (fast over many large runs; a "
                               "weights file changed in place is not found; the small folds file is still hashed)."),
) -> None:
    """List the training runs under a folder: status, step, model, data, heredity, last loss and best KID."""
    from rich.console import Console
    from rich.table import Table

    from geca.run import summarize_run

    if not root.is_dir():
        what = "a file, not a folder" if root.exists() else "no such folder"
        raise ConfigError(f"{root}: {what} (pass the folder that holds your run directories)")
    # a run is a folder with model.json, or with checkpoints (its model.json lost: listed as missing)
    found = {p.parent for p in root.rglob("model.json")} | \
        {p.parent.parent for p in root.rglob("checkpoints/latest.json")}
    rows = [summarize_run(p, hashes=not quick) for p in sorted(found)]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} run(s) under {root}")
    for col in ("run", "status", "step", "model", "data", "heredity", "loss", "best KID×10³"):
        table.add_column(col, justify="right" if col in ("step", "loss", "best KID×10³") else "left")
    for r in rows:
        kid = "—" if r["best_kid"] is None else f"{r['best_kid'] * 1e3:.2f} (step {r['best_step']})"
        data = r["data"] if r["folds_file"] is None else f"{r['data']} fold {r['fold']} of {Path(r['folds_file']).name}"
        table.add_row(r["run"], r["status"], str(r["step"] if r["step"] is not None else "—"), r["model"], data,
                      r["heredity"] or "—", "—" if r["loss"] is None else f"{r['loss']:.6g}", kid,
                      style=None if r["status"] == "ok" else "red")
    Console(width=160).print(table)
