"""The `geca` command line."""

from __future__ import annotations

import typer

from geca.cli.demo import demo
from geca.cli.downstream import classify, expand
from geca.cli.encode import encode
from geca.cli.evaluate import evaluate, features_app
from geca.cli.experiment import experiment
from geca.cli.folds import folds
from geca.cli.models import models
from geca.cli.sample import grow, sample
from geca.cli.train import train
from geca.utils.allocator import keep_freed_memory

app = typer.Typer(
    help="Generative Cellular Automata: train, sample and grow GeCA diffusion models on medical images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("train")(train)
app.command("sample")(sample)
app.command("grow")(grow)
app.command("models")(models)
app.command("folds")(folds)
app.command("encode")(encode)
app.command("expand")(expand)
app.command("classify")(classify)
app.command("evaluate")(evaluate)
app.add_typer(features_app, name="features")
app.command("experiment")(experiment)
app.command("demo")(demo)


def main() -> None:
    """The `geca` console script: glibc is told to keep freed memory before any work starts."""
    keep_freed_memory()
    app()


if __name__ == "__main__":
    main()
