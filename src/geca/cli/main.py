"""The `geca` command line."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import typer
import typer.core

from geca import __version__
from geca.cli.demo import demo
from geca.cli.downstream import classify, expand
from geca.cli.encode import encode
from geca.cli.evaluate import evaluate, features_app
from geca.cli.experiment import experiment
from geca.cli.folds import folds
from geca.cli.models import configs, models, runs
from geca.cli.sample import grow, sample
from geca.cli.train import train
from geca.utils.allocator import keep_freed_memory
from geca.utils.paths import cache_dir

try:  # typer ≥ 0.24 raises the errors of its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors
# click < 8.2 prints the help of a bare `geca` and exits without raising this
NO_ARGS_IS_HELP = getattr(click_errors, "NoArgsIsHelpError", ())

# typer 0.29 labels every on/off flag (even --help) "<bool>" in --help, as if it took a value; older typers, which
# lack this hook, do not.
_type_label = getattr(typer.core.TyperOption, "display_type_rich", None)
if _type_label is not None:
    def _no_flag_label(self: typer.core.TyperOption, ctx: object) -> str | None:
        return None if self.is_flag else _type_label(self, ctx)

    typer.core.TyperOption.display_type_rich = _no_flag_label  # type: ignore[method-assign]


class OneLineErrors(typer.core.TyperGroup):
    """Click's own errors (a value that is not a number or out of its range, an unknown flag) as one `error:` line
    naming the flag and exit 2, like every other error of ours, instead of a framed box after the usage."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        if (empty := _empty_value(self, sys.argv[1:] if args is None else list(args))) is not None:
            print(f"error: {empty}", file=sys.stderr)
            sys.exit(2)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NO_ARGS_IS_HELP as e:  # `geca` alone: its help, which typer printed already
            sys.exit(e.exit_code)
        except click_errors.ClickException as e:
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            print(f"error: {' '.join(e.format_message().split())}{hint}", file=sys.stderr)
            sys.exit(e.exit_code)
        except typer.Abort:
            print("error: aborted", file=sys.stderr)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    help="Generative Cellular Automata: train, sample and grow GeCA diffusion models on medical images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"geca {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print geca's version and exit.")) -> None:
    """Generative Cellular Automata: train, sample and grow GeCA diffusion models on medical images."""


app.command("train")(train)
app.command("sample")(sample)
app.command("grow")(grow)
app.command("models")(models)
app.command("configs")(configs)
app.command("runs")(runs)
app.command("folds")(folds)
app.command("encode")(encode)
app.command("expand")(expand)
app.command("classify")(classify)
app.command("evaluate")(evaluate)
app.add_typer(features_app, name="features")
app.command("experiment")(experiment)
app.command("demo")(demo)


def _empty_value(group: typer.core.TyperGroup, args: list[str]) -> str | None:
    """What says an argument is empty: `--out ""` would be the current folder (Path("") is "."), `--vae ""` a VAE
    there; no value of ours is meant empty. The flag is named where it takes a value (`--json ""` is a FOLDER)."""
    command: Any = group
    for arg in args:  # the (sub)command the arguments are for
        if not hasattr(command, "commands") or arg not in command.commands:
            break
        command = command.commands[arg]
    takes_value = {name for p in command.params if not getattr(p, "is_flag", True) for name in p.opts}
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if arg.startswith("--") and eq and not value:
            return f"{flag}: empty value"
        if arg == "":
            return f"{args[i - 1]}: empty value" if i and args[i - 1] in takes_value else 'an empty argument ("")'
    return None


def _one_line(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> str:
    return f"warning: {message}\n"


def keep_compiled_kernels() -> None:
    """Point torch.compile's cache at geca's cache folder (~/.cache/geca/torchinductor) unless the user chose one:
    its default under /tmp is wiped between cluster jobs and reboots, and a cold compile of the GeCA block costs a
    minute on a CPU (a warm one 5 s)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "torchinductor"))


def main() -> None:
    """The `geca` console script: glibc is told to keep freed memory before any work starts, torch.compile's
    cache persists, warnings are one line."""
    keep_freed_memory()
    keep_compiled_kernels()
    warnings.formatwarning = _one_line
    app()


if __name__ == "__main__":
    main()
