"""``geca folds``: patient-level stratified cross-validation folds for a dataset."""

from __future__ import annotations

from pathlib import Path

import typer

from geca.cli.common import guarded


@guarded
def folds(
    data: str = typer.Option(..., "--data", help="Dataset spec: a folder+CSV .csv file (or any spec with an "
                             "'all' split)."),
    k: int = typer.Option(5, "--k", min=3, help="Number of folds (at least 3: test, val and train folds)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed for breaking ties between equally good folds."),
    out: Path = typer.Option(..., "--out", help="Folds CSV to write (filename,patient_id,fold)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file (runs and synthetic "
                                   "sets made with the old folds no longer match it)."),
) -> None:
    """Assign patients to k label-stratified folds and write the folds CSV."""
    import numpy as np
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from geca.data.folds import FOLDS_COLUMNS
    from geca.data.groups import make_folds
    from geca.utils.io import has_csv_header, output_file

    output_file(out, "--out", ".csv", overwrite, own=(f"a folds file (columns {','.join(FOLDS_COLUMNS)})",
                                                      lambda p: has_csv_header(p, FOLDS_COLUMNS)))
    groups, fold_of = make_folds(data, k, seed, out)
    if groups.warning:
        Console(stderr=True).print(f"warning: {groups.warning}", style="yellow", markup=False, highlight=False)
    # Folds as columns and labels as rows, so that many labels still fit a terminal.
    table = Table(title=escape(f"{k} folds written to {out}"))
    table.add_column("")
    for f in range(k):
        table.add_column(f"fold {f}", justify="right")
    table.add_column("all", justify="right", style="bold")
    members = [fold_of == f for f in range(k)] + [np.ones(len(groups.names), dtype=bool)]
    table.add_row("images", *(str(m.sum()) for m in members))
    table.add_row("patients", *(str(len(np.unique(groups.groups[m]))) for m in members), end_section=True)
    for j, name in enumerate(groups.class_names):
        table.add_row(escape(f"{name} %"), *(f"{groups.labels[m, j].mean() * 100:.1f}" for m in members))
    Console().print(table)
