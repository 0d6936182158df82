"""`geca models`."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from geca.cli.common import guarded
from geca.models.config import NAMED_MODELS, build_model, count_parameters


@guarded
def models(
    resolution: int = typer.Option(32, "--resolution", help="Grid size (a 256² image's SD-VAE latent is 32)."),
    channels: int = typer.Option(4, "--channels", help="Input channels (4 for SD-VAE latents)."),
    classes: int = typer.Option(11, "--classes", help="Number of label entries (11 for OCT-ML)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Parameter counts of the named configs at a given input shape."""
    rows = []
    for name, cfg in NAMED_MODELS.items():
        model = build_model(cfg, channels, classes, resolution)
        rows.append({"name": name, "family": cfg.family, "parameters": count_parameters(model),
                     "hidden_size": cfg.hidden_size, "heads": cfg.heads, "nca_steps": cfg.nca_steps,
                     "cells": resolution * resolution, "input": [channels, resolution, resolution],
                     "classes": classes})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"named models at {channels}×{resolution}×{resolution}, {classes} classes")
    for col in ("name", "family", "parameters", "D", "heads", "M", "cells"):
        table.add_column(col, justify="right" if col not in ("name", "family") else "left")
    for r in rows:
        table.add_row(r["name"], r["family"], f"{r['parameters']:,}", str(r["hidden_size"]), str(r["heads"]),
                      str(r["nca_steps"]), str(r["cells"]))
    Console().print(table)
