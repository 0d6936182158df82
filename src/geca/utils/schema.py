"""Plain YAML mirrored by dataclasses: typed, strict conversion of nested mappings, and dotted-key overrides."""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from geca.errors import ConfigError

# far beyond any device's memory, and far below the sizes that overflow torch's int64 shapes: a typo is refused
# up front instead of failing after the output folder was made
MAX_BATCH = 2**20
MAX_STEPS = 10**9  # training steps, and warm-up steps; 1,000× the paper's 118k
MAX_NCA_STEPS = 1024  # NCA updates per denoiser call (the paper's M is 8–32): a typo, not a setting, beyond it
MAX_IMAGE_SIZE = 8192  # a side beyond any scan's; resizing to more would allocate gigabytes per image


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(typing.get_args(tp)[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(tp, "from_mapping"):  # a type that parses itself (e.g. a discriminated union of configs)
        return tp.from_mapping(value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                tp is int and isinstance(value, float) and not value.is_integer()):  # also inf and nan
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return tp(value)
    if tp is str:
        if isinstance(value, bool):  # `compile: true`, or a JSON file's true
            return "true" if value else "false"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def key_in(where: str, key: str) -> str:
    """`key` inside `where`, as errors name it: `run.yaml: model`, then `run.yaml: model.heads`."""
    return f"{where}.{key}" if ": " in where else f"{where}: {key}"


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass `cls` from a nested mapping; unknown keys and wrong types are errors naming `where`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__} {data!r:.60}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(names))}")
    missing = [f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
    try:
        return cls(**{k: _coerce(hints[k], v, key_in(where, k)) for k, v in data.items()})
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


class _Loader(yaml.SafeLoader):
    """YAML's safe loader with YAML 1.2's booleans, true and false only: 1.1 also reads on/off/yes/no as booleans,
    which made `heredity: off` the boolean false."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def load_yaml(text: str) -> Any:
    """A YAML document as geca reads every config and `--set` value (booleans: true and false only)."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: no Python objects are built


def _one_line(e: yaml.YAMLError) -> str:
    """PyYAML's message, which spans lines (with a caret under the column), as one line: errors are one line."""
    return " ".join(str(e).split())


def parse_yaml(text: str, where: str | Path) -> dict[str, Any]:
    """A YAML document whose top level is a mapping (empty → {})."""
    try:
        raw = load_yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({_one_line(e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping")
    return raw


def read_text(path: Path, what: str) -> str:
    """The text of the YAML file `path`; a missing, binary or folder path is a ConfigError naming `what` it is."""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, where the {what} (a YAML file) was expected") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: {what} is not a text (YAML) file") from None


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    return parse_yaml(read_text(path, what), path)


def nest(mapping: dict[str, Any]) -> dict[str, Any]:
    """`{"train.max_steps": 5}` → `{"train": {"max_steps": 5}}`; nested mappings pass through."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        parts = str(key).split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = nest(value) if isinstance(value, dict) else value
    return out


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"train": {"max_steps": 5}}` → `{"train.max_steps": 5}` (the inverse of `nest`)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every leaf that differs between two nested mappings."""
    old, new = flatten(before), flatten(after)
    return [(key, old.get(key), new.get(key)) for key in dict.fromkeys([*old, *new]) if old.get(key) != new.get(key)]


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` laid on `base`, mapping by mapping (a copy; neither is changed)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def set_field(obj: Any, path: str, value: Any, where: str) -> None:
    """Set the dataclass field at dotted `path` (e.g. `train.lr`) of `obj`, converted to the field's type; a path
    that names no field, or a value of the wrong type, is an error."""
    *parents, name = path.split(".")
    for part in parents:
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise ConfigError(f"{where}: no config section {part!r} in {path!r}")
        obj = getattr(obj, part)
    names = {f.name for f in dataclasses.fields(obj)}
    if name not in names:
        what = f"{obj.name} ({obj.family})" if hasattr(obj, "family") else type(obj).__name__
        raise ConfigError(f"{where}: {what} has no setting {name!r}; it has {', '.join(sorted(names))}")
    setattr(obj, name, _coerce(typing.get_type_hints(type(obj))[name], value, where))


def apply_set(config: Any, items: list[str], flags: dict[str, str] | None = None) -> dict[str, str]:
    """`--set KEY=VALUE` overrides (values read as YAML) of dotted fields of `config`; returns key → how the user
    spelt it. A key that one of `flags` (key → flag) or an earlier --set already set is refused: which one should
    win is not for us to guess."""
    names: dict[str, str] = {}
    flags = flags or {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
        if key in names:
            raise ConfigError(f"--set {key} is given twice; give it once")
        if key in flags:
            raise ConfigError(f"--set {key} and {flags[key]} both set {key}; give one of them")
        try:
            value = load_yaml(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({_one_line(e)})") from None
        set_field(config, key, value, f"--set {key}")
        names[key] = f"--set {key}"
    return names


class Checks:
    """Checks of config values; a failed one is a ConfigError naming the value as the user wrote it: the flag in
    `names` (config key → flag) where there is one, else the dotted config key."""

    def __init__(self, names: dict[str, str] | None = None, where: str | Path | None = None) -> None:
        self.names = names or {}
        self.where = where

    def __call__(self, ok: bool, key: str, rule: str, value: Any) -> None:
        """`key` may name several fields of one section (`diffusion.beta_start/beta_end`) that hold together."""
        if not ok:
            section, _, fields = key.rpartition(".")
            given = [self.names[k] for k in (key, *(f"{section}.{f}" for f in fields.split("/"))) if k in self.names]
            name = " and ".join(dict.fromkeys(given)) or (f"{self.where}: {key}" if self.where else key)
            raise ConfigError(f"{name} must be {rule}, got {value!r}")

    def choice(self, value: Any, key: str, valid: tuple[str, ...]) -> None:
        self(value in valid, key, f"one of {', '.join(valid)}", value)
