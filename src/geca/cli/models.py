"""`geca models`."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from geca.cli.common import guarded
from geca.models.config import NAMED_MODELS, ModelConfig, build_model, count_macs, count_parameters


def describe(cfg: ModelConfig) -> str:
    """The hyper-parameters that set a config's size, in one short line."""
    if cfg.family == "dit":
        return f"depth {cfg.depth}, D {cfg.hidden_size}, {cfg.heads} heads, MLP {cfg.mlp_hidden}, p {cfg.patch_size}"
    if cfg.family == "unet":
        attn = ",".join(map(str, cfg.attention_resolutions)) or "mid only"
        return (f"channels {'-'.join(map(str, cfg.block_channels))}, {cfg.layers_per_block}/level, "
                f"attention at ÷{attn}")
    return f"D {cfg.hidden_size}, {cfg.heads} heads, MLP {cfg.mlp_hidden}, C_h {cfg.hidden_channels}, M {cfg.nca_steps}"


def tokens(cfg: ModelConfig, resolution: int) -> int | None:
    """Cells a GeCA update sees, or patches a DiT attends over; None for the UNet (a convolutional pyramid)."""
    if cfg.family == "dit":
        return (resolution // cfg.patch_size) ** 2
    if cfg.family == "unet":
        return None
    return resolution * resolution


def model_row(name: str, cfg: ModelConfig, channels: int, classes: int, resolution: int) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "family": cfg.family, "summary": describe(cfg),
                           "input": [channels, resolution, resolution], "classes": classes}
    try:
        model = build_model(cfg, channels, classes, resolution)
    except ValueError as e:
        return {**row, "parameters": None, "gmacs": None, "tokens": None, "error": str(e)}
    return {**row, "parameters": count_parameters(model),
            "gmacs": round(count_macs(model, channels, classes, resolution) / 1e9, 3),
            "tokens": tokens(cfg, resolution)}


@guarded
def models(
    resolution: int = typer.Option(32, "--resolution", help="Grid size (a 256² image's SD-VAE latent is 32)."),
    channels: int = typer.Option(4, "--channels", help="Input channels (4 for SD-VAE latents)."),
    classes: int = typer.Option(11, "--classes", help="Number of label entries (11 for OCT-ML)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Parameters, GMACs per denoiser call and cells/tokens of every named config at a given input shape.

    GMACs count matmuls and convolutions on a batch of 1; attention's score and value products are left out.
    """
    rows = [model_row(name, cfg, channels, classes, resolution) for name, cfg in NAMED_MODELS.items()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"named models at {channels}×{resolution}×{resolution}, {classes} classes",
                  caption="GMACs: one denoiser call at batch 1, attention's score and value products not counted")
    for col in ("name", "family", "parameters", "GMACs", "cells/tokens", "layout"):
        table.add_column(col, justify="left" if col in ("name", "family", "layout") else "right")
    for r in rows:
        if r["parameters"] is None:
            table.add_row(r["name"], r["family"], "—", "—", "—", f"[red]{r['error']}[/red]")
            continue
        table.add_row(r["name"], r["family"], f"{r['parameters']:,}", f"{r['gmacs']:.3g}",
                      "—" if r["tokens"] is None else str(r["tokens"]), r["summary"])
    Console().print(table)
