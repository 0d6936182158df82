"""The presets shipped with geca (run configs and study configs), found by name from an installed package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from geca.errors import ConfigError

KINDS = {"run": "", "experiment": "experiments"}


def preset_dir(kind: str) -> Path:
    return Path(str(resources.files("geca") / "configs")) / KINDS[kind]


def presets(kind: str) -> dict[str, Path]:
    """name → file of every shipped preset of `kind` (run or experiment)."""
    return {p.stem: p for p in sorted(preset_dir(kind).glob("*.yaml"))}


def describe(path: Path) -> str:
    """A preset's first sentence: its leading comment up to the first '.' outside brackets, or a ':' that ends a
    line (what follows it is a list or a command); its first line alone was often cut mid-sentence."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#") or line.startswith("#   "):  # an indented line is an example command
            break
        lines.append(line[1:].strip())
    text, depth = "\n".join(lines) + "\n", 0
    for i, ch in enumerate(text):
        depth += (ch in "([{") - (ch in ")]}")
        if depth == 0 and (ch == "." and text[i + 1].isspace() or ch == ":" and text[i + 1] == "\n"):
            text = text[:i + (ch == ".")]
            break
    return " ".join(text.split())


def resolve_config(value: str | Path, kind: str) -> Path:
    """A config file path as given, or a shipped preset's name (`retinamnist-28-cpu`, with or without .yaml)."""
    path = Path(value).expanduser()
    if path.exists() or path.parent != Path("."):
        return path
    found = presets(kind)
    name = path.stem if path.suffix in (".yaml", ".yml") else path.name
    if name in found:
        return found[name]
    raise ConfigError(f"{value}: no such file, and no {kind} preset of that name; presets: {', '.join(found)} "
                      "(`geca configs` lists them)")
