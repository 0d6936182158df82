"""``geca folds``: patient-level stratified cross-validation folds for a dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from geca.data.folder_csv import read_table
from geca.data.folds import patient_folds, write_folds
from geca.data.imageset import DataError
from geca.data.registry import load_split


def _groups(data: str) -> tuple[list[str], np.ndarray, list[str], np.ndarray, str | None]:
    """Filenames, labels, class names, group ids and a warning if patients were not available."""
    if data.lower().endswith(".csv"):
        # The table suffices: decoding every image just to split it would be slow, and would fail on
        # mixed image sizes that only matter once an image_size is chosen for training.
        table = read_table(Path(data).expanduser())
        names, labels, classes = table.filenames, table.labels, table.class_names
        patients, eyes = table.patient_ids, table.eye_ids
    else:
        images = load_split(data, "all")
        names, labels, classes = images.ids, images.labels, images.class_names
        patients, eyes = images.patient_ids, images.eye_ids
    if patients is not None:
        return names, labels, classes, patients, None
    if eyes is not None:
        warning = "no patient_id column: grouping by eye_id, so a patient's two eyes may span folds"
        return names, labels, classes, eyes, warning
    warning = "no patient_id or eye_id column: one group per image, so a patient's images may span folds"
    return names, labels, classes, np.array(names), warning


def folds(
    data: str = typer.Option(..., "--data", help="Dataset spec: a folder+CSV .csv file (or any spec with an "
                             "'all' split)."),
    k: int = typer.Option(5, "--k", min=3, help="Number of folds (at least 3: test, val and train folds)."),
    seed: int = typer.Option(0, "--seed", help="Seed for breaking ties between equally good folds."),
    out: Path = typer.Option(..., "--out", help="Folds CSV to write (filename,patient_id,fold)."),
) -> None:
    """Assign patients to k label-stratified folds and write the folds CSV."""
    err = Console(stderr=True)
    try:
        names, labels, classes, groups, warning = _groups(data)
        if warning:
            err.print(f"warning: {warning}", style="yellow", markup=False, highlight=False)
        fold_of = patient_folds(labels, groups, k, seed)
        write_folds(out, names, [str(g) for g in groups], fold_of)
    except DataError as exc:
        err.print(f"error: {exc}", style="red", markup=False, highlight=False)
        raise typer.Exit(2) from None

    # Folds as columns and labels as rows, so that many labels still fit a terminal.
    table = Table(title=escape(f"{k} folds written to {out}"))
    table.add_column("")
    for f in range(k):
        table.add_column(f"fold {f}", justify="right")
    table.add_column("all", justify="right", style="bold")
    members = [fold_of == f for f in range(k)] + [np.ones(len(names), dtype=bool)]
    table.add_row("images", *(str(m.sum()) for m in members))
    table.add_row("patients", *(str(len(np.unique(groups[m]))) for m in members), end_section=True)
    for j, name in enumerate(classes):
        table.add_row(escape(f"{name} %"), *(f"{labels[m, j].mean() * 100:.1f}" for m in members))
    Console().print(table)
