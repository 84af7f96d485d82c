"""Reading recipes safely and writing them without secrets.

* :func:`load_yaml_file`: ``yaml.safe_load`` bounded in file size and in the size of the value tree after alias
  expansion (a 524-byte "billion laughs" document would otherwise expand to gigabytes when copied), refusing
  duplicate keys (PyYAML silently keeps the last one).
* ``${env:NAME}`` anywhere in a recipe is replaced by the environment variable at run time
  (:func:`expand_env`); written recipes keep the reference, never the value.
* :func:`redact` masks every string under a key whose name says token, key, secret or password, and every
  value that came from the environment, wherever a recipe is written (checkpoints, model card, dry-run plan).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import TrlVideoError

MAX_RECIPE_BYTES = 1 << 20
#: values (mappings, lists, scalars) a recipe may hold once aliases are expanded
MAX_RECIPE_VALUES = 100_000
ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")
SECRET_KEY = re.compile(r"token|key|secret|password|passwd|credential", re.IGNORECASE)
MASK = "***"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise TrlVideoError(f"duplicate key '{key}' (lines {seen[key]} and "
                                        f"{key_node.start_mark.line + 1})")
                seen[key] = key_node.start_mark.line + 1
            except TypeError:  # unhashable key: let PyYAML report it
                pass
        return super().construct_mapping(node, deep=deep)


def expanded_size(value: Any, limit: int = MAX_RECIPE_VALUES) -> int:
    """Number of values in ``value`` with shared (aliased) parts counted every time they occur; linear in the
    number of distinct objects thanks to a per-object memo, so a bomb is measured without expanding it."""
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(v: Any) -> int:
        if not isinstance(v, (dict, list)):
            return 1
        k = id(v)
        if k in memo:
            return memo[k]
        if k in active:
            raise TrlVideoError("a value contains itself (recursive YAML alias)")
        active.add(k)
        children = list(v.keys()) + list(v.values()) if isinstance(v, dict) else v
        total = 1
        for c in children:
            total += size(c)
            if total > limit:
                break
        active.discard(k)
        memo[k] = total
        return total

    return size(value)


def load_yaml_file(path: str | Path, what: str = "recipe") -> Any:
    """``yaml.safe_load`` of a file, bounded and strict (see the module docstring)."""
    p = Path(path)
    if not p.exists():
        raise TrlVideoError(f"{what} not found: {p}")
    if p.is_dir():
        raise TrlVideoError(f"{what} {p} is a folder, not a YAML file")
    size = p.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise TrlVideoError(f"{what} {p} is {size} bytes; recipes are limited to {MAX_RECIPE_BYTES} bytes")
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise TrlVideoError(f"{what} {p} cannot be read as UTF-8 text: {type(exc).__name__}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  (a SafeLoader subclass)
    except TrlVideoError as exc:
        raise TrlVideoError(f"{what} {p}: {exc}") from None
    except yaml.YAMLError as exc:
        raise TrlVideoError(f"{what} {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise TrlVideoError(f"{what} {p} is nested too deeply") from None
    try:
        n = expanded_size(data)
    except RecursionError:
        raise TrlVideoError(f"{what} {p} is nested too deeply") from None
    except TrlVideoError as exc:
        raise TrlVideoError(f"{what} {p}: {exc}") from None
    if n > MAX_RECIPE_VALUES:
        raise TrlVideoError(f"{what} {p} expands to more than {MAX_RECIPE_VALUES} values (YAML aliases); "
                            f"refusing to load it")
    return data


# ------------------------------------------------------------------------------------------------ secrets
def env_refs(value: Any) -> dict[str, str]:
    """``{NAME: value}`` of every ``${env:NAME}`` referenced in ``value`` (that is set)."""
    found: dict[str, str] = {}

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, str):
            for name in ENV_REF.findall(v):
                if name in os.environ:
                    found[name] = os.environ[name]

    walk(value)
    return found


def expand_env(value: Any, where: str = "recipe", key: str = "") -> Any:
    """A copy of ``value`` with every ``${env:NAME}`` replaced by the environment variable."""

    def sub(s: str, key: str) -> str:
        def one(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in os.environ:
                raise TrlVideoError(f"{where}: key '{key}' refers to environment variable {name}, which is not set")
            return os.environ[name]

        return ENV_REF.sub(one, s)

    def walk(v: Any, key: str) -> Any:
        if isinstance(v, dict):
            return {k: walk(x, f"{key}.{k}" if key else str(k)) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x, f"{key}[{i}]") for i, x in enumerate(v)]
        if isinstance(v, str):
            return sub(v, key)
        return v

    return walk(value, key)


def expand_env_config(config: Any, where: str = "recipe") -> Any:
    """``config`` with ``${env:NAME}`` references in its string, list and mapping fields resolved (a copy when
    anything changes; references are strings, so the parser's type checks saw them as such)."""
    import dataclasses

    changes = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, (str, list, dict)) and env_refs_named(value):
            changes[f.name] = expand_env(value, where=where, key=f.name)
    return dataclasses.replace(config, **changes) if changes else config


def env_refs_named(value: Any) -> bool:
    """Whether ``value`` mentions any ``${env:NAME}`` (set or not)."""
    if isinstance(value, dict):
        return any(env_refs_named(v) for v in value.values())
    if isinstance(value, list):
        return any(env_refs_named(v) for v in value)
    return isinstance(value, str) and ENV_REF.search(value) is not None


def redact(value: Any, secrets: dict[str, str] | None = None, key: str = "") -> Any:
    """A copy of ``value`` safe to write: strings under secret-looking keys become ``***``; values that came
    from the environment become their ``${env:NAME}`` reference."""
    secrets = secrets or {}
    if isinstance(value, dict):
        return {k: redact(v, secrets, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets, key) for v in value]
    if isinstance(value, str):
        if value and SECRET_KEY.search(key) and not ENV_REF.fullmatch(value):
            return MASK
        for name, secret in secrets.items():
            if secret == value or (len(secret) >= 4 and secret in value):
                value = value.replace(secret, f"${{env:{name}}}")
    return value
