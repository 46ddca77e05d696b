"""YAML files into typed, validated dataclasses: the one reader behind every fedssl config file.

An experiment (fedssl.config), a site's site.yaml (fedssl.deploy.site.config) and the
coordinator's server.yaml (fedssl.deploy.coordinator) are all read here, so each reports a
bad file, key or value the same way: one line naming the file or dotted key and the fix.

Standard library and PyYAML only: a config error is reported before torch or Flower load.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fedssl.errors import ConfigError

T = TypeVar("T")


def check(ok: bool, key: str, rule: str, value: Any) -> None:
    """Raise ``key: rule, got value`` unless ``ok``: the one shape of a config error."""
    if not ok:
        raise ConfigError(f"{key}: {rule}, got {value!r}")


def read_yaml_mapping(path: Path, sections: str) -> dict[str, Any]:
    """The top-level mapping of the YAML file at ``path``; anything else is a one-line ConfigError
    naming the file (and line) and the fix. ``sections`` names the expected top-level keys."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read it as a text file ({type(err).__name__}); pass a UTF-8 YAML file") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections ({sections})")
    return data


def load_yaml_with_includes(path: Path, sections: str, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """``path``'s mapping with its ``include: [a.yaml, ...]`` files merged under it (later files win)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"include: {path} includes itself (cycle through {' -> '.join(map(str, seen))})")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the path of a YAML file, e.g. configs/experiments/digits-demo.yaml")
    data = read_yaml_mapping(path, sections)
    includes = data.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(inc, str) for inc in includes):
        raise ConfigError(f"include: in {path} must be a file name or a list of file names, got {includes!r}")
    merged: dict[str, Any] = {}
    for inc in includes:
        deep_merge(merged, load_yaml_with_includes(path.parent / inc, sections, seen + (path,)))
    deep_merge(merged, data)
    return merged


def deep_merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if value is None and isinstance(into.get(key), dict):
            continue  # an empty `section:` in a later file keeps what earlier files set
        if isinstance(value, dict) and isinstance(into.get(key), dict) and key != "params":
            deep_merge(into[key], value)
        else:
            into[key] = value


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b=c`` override (the value parsed as a YAML scalar) to the raw mapping."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set privacy.target_epsilon=4")
    dotted, _, text = item.partition("=")
    parts = dotted.strip().split(".")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty section (`run:` with nothing under it)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    node[parts[-1]] = value


def build_section(cls: type, raw: Any, prefix: str = "") -> Any:
    """``cls`` (a dataclass) from a raw mapping: unknown keys and mistyped values are one-line errors.

    Nested dataclass fields are built recursively; ``prefix`` is the dotted path for messages.
    Validation beyond types is each section's own ``validate()``.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known, key=str)  # YAML keys may be numbers too
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key; valid keys under {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(known))}"
        )
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            values[name] = build_section(hint, value, prefix=f"{key}.")
        else:
            values[name] = _coerce(value, hint, key)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-5 as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: must be a string, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping, got {value!r}")
        return dict(value)
    return value


def load_config_file(cls: type[T], path: str | Path, *, what: str, sections: str, example: str) -> tuple[T, Path]:
    """A one-file config (site.yaml, server.yaml): read, typed, validated; returns it with the file's folder,
    against which the caller resolves the relative paths it holds."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; write one from {example}")
    config = build_section(cls, read_yaml_mapping(path, sections))
    config.validate()
    return config, path.parent


def validate_sections(config: Any) -> None:
    """Call ``validate()`` on every dataclass field of ``config`` that has one."""
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if hasattr(value, "validate"):
            value.validate()


def resolve_path(base: Path, value: str) -> str:
    """``value`` as an absolute path, a relative one taken relative to ``base`` (the config file's folder)."""
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())
