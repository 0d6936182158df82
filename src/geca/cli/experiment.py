"""`geca experiment`: the whole study (Table 1, Fig. 5, Fig. 6, sampler cost, Table 2) and its report, resumable."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from geca.cli.common import guarded, pick_device


@guarded
def experiment(
    config: Path = typer.Argument(..., help="Experiment YAML, or a shipped preset's name (`geca configs` lists "
                                  "them: smoke, retinamnist-28-cpu, retinamnist-28-gpu, …)."),
    out: Path | None = typer.Option(None, "--out", help="Experiment directory (default: runs/NAME, NAME from the "
                                    "config); every stage writes into a folder of it."),
    force: list[str] | None = typer.Option(None, "--force", help="Redo this stage even if done, and every stage "
                                           "that depends on it (repeatable). A group name (train, sample, expand) "
                                           "means all of its stages, e.g. train.GeCA for one generator."),
    only: list[str] | None = typer.Option(None, "--only", help="Run only this stage or group (repeatable); its "
                                          "input stages must be done, else exit 2."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print which stages would run or be skipped, and stop."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N] (training always uses the GPU when "
                               "there is one)."),
    progress: bool | None = typer.Option(None, "--progress/--no-progress", help="Show progress bars of each stage "
                                         "(default: when the terminal shows them, not in a log file)."),
) -> None:
    """Reproduce the GeCA study on your data with one command; a rerun skips what is done."""
    from geca.experiment.config import load_experiment
    from geca.experiment.graph import execute, plan
    from geca.experiment.stages import Context, build_stages
    from geca.presets import resolve_config
    from geca.utils.io import output_dir

    loaded = load_experiment(resolve_config(config, "experiment"))
    root = out if out is not None else Path("runs") / loaded.exp.name
    ctx = Context(loaded=loaded, root=root, device=pick_device(device), log=typer.echo,
                  progress=sys.stderr.isatty() if progress is None else progress)
    stages = build_stages(ctx)
    loaded.check_data()  # a plan on data that cannot load, or scores without their weights, would be a false promise
    loaded.check_weights()
    if dry_run:
        for step in plan(stages, root, force, only):
            typer.echo(f"{step.action:4s} {step.stage.id:24s} {step.reason}")
        return
    output_dir(root)
    steps = execute(stages, root, force, only, log=typer.echo)
    ran = sum(s.action == "run" for s in steps)
    typer.echo(f"{ran} stage(s) run, {len(steps) - ran} skipped; experiment directory: {root}")
    if any(s.stage.id == "report" for s in steps):
        typer.echo(f"report: {root / 'report' / 'report.md'} and {root / 'report' / 'report.html'}")
