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
    """A preset's first comment line."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


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
