"""Loading configs: YAML with `base:` inheritance, command-line overrides, placeholders, and errors that name
the file, the line and the key. It knows no stage: each stage's schema lives with its stage, and the pipeline
config that composes them lives above the stages (flows/config.py).

A config is a YAML file, optionally inheriting from another through `base: other.yaml` (merged key by key),
plus overrides (`--set data.minhash.bands=20`). A value written `???` is a placeholder that must be set (the
671B config's corpus): a config that still holds one is refused before any work starts, unless the caller
only reads it (`v3flow params`). Validation errors (unknown keys, wrong types, impossible combinations)
raise `ConfigError` naming the file, the line and the key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError

from v3flow.errors import ConfigError
from v3flow.section import Section, section_hash

__all__ = ["PLACEHOLDER", "ConfigError", "Section", "load", "read_yaml", "section_hash"]

PLACEHOLDER = "???"
S = TypeVar("S", bound=Section)


def load(schema: type[S], path: str | Path, overrides: list[str] | None = None, require_set: bool = True,
         expand: Callable[[dict, Path, Path], None] | None = None) -> tuple[S, Path]:
    """Load, merge (`base:`), override (`key=value`), `expand` (raw dict, project root, config path) and
    validate a config against `schema`; returns it with the project root (the folder holding data/ or
    pyproject.toml above the file)."""
    path = Path(path).resolve()
    raw = _load_yaml_with_base(path, seen=())
    for item in overrides or []:
        _apply_override(raw, item)
    root = _project_root(path)
    if expand is not None:
        expand(raw, root, path)
    if require_set:
        _refuse_placeholders(raw, path)
    try:
        return schema.model_validate(raw), root
    except ValidationError as err:
        raise ConfigError(_explain(err, path, overrides or [])) from None


def _project_root(config_path: Path) -> Path:
    for parent in config_path.parents:
        if (parent / "data" / "datasets").is_dir() or (parent / "pyproject.toml").is_file():
            return parent
    return Path.cwd()


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _load_yaml_with_base(path: Path, seen: tuple[Path, ...]) -> dict:
    if path in seen:
        raise ConfigError(f"{path}: `base:` cycle through {' -> '.join(map(str, seen))}")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    return deep_merge(_load_yaml_with_base((path.parent / base).resolve(), seen + (path,)), data)


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _apply_override(raw: dict, item: str) -> None:
    """`a.b.c=value`: value is parsed as a YAML scalar/list; a numeric part indexes a list."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"override {item!r}: cannot parse the value {text!r}") from None
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        node = _step(node, part, ".".join(parts[: i + 1]), create=True)
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, key)] = value
    else:
        node[last] = value


def _step(node: Any, part: str, where: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, where)]
    if not isinstance(node, dict):
        raise ConfigError(f"override key {where}: {type(node).__name__} value has no sub-keys")
    if part not in node and create:
        node[part] = {}
    return node[part]


def _index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override key {where}: {part!r} is not an index of a list of {len(node)} items")
    return int(part)


def _placeholders(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _placeholders(value, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, value in enumerate(node) for k in _placeholders(value, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if node == PLACEHOLDER else []


def _refuse_placeholders(raw: dict, path: Path) -> None:
    unset = _placeholders(raw)
    if not unset:
        return
    lines = _key_lines(path)
    where = {k: f"line {lines[k]}" if k in lines else "in a base file" for k in unset}
    raise ConfigError(f"{path}: placeholders ({PLACEHOLDER}) that must be set:\n" + "\n".join(
        f"  {k} [{where[k]}]; set it with --set {k}=VALUE" for k in unset))


def _explain(err: ValidationError, path: Path, overrides: list[str]) -> str:
    lines = _key_lines(path)
    out = [f"invalid config {path}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        where = f"line {lines[key]}" if key in lines else "from an override or a base file"
        override = next((o for o in overrides if o.split("=", 1)[0] == key), None)
        if override is not None:
            where = f"from the override {override}"
        value = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        out.append(f"  {key}: {msg}{value} [{where}]")
    return "\n".join(out)


def _key_lines(path: Path) -> dict[str, int]:
    """Map dotted keys of a YAML file to their 1-based line numbers (for error messages)."""
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError):
        return {}
    found: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                found[key] = key_node.start_mark.line + 1
                walk(value_node, key + ".")
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                found[f"{prefix}{i}"] = item.start_mark.line + 1
                walk(item, f"{prefix}{i}.")

    if root is not None:
        walk(root, "")
    return found
