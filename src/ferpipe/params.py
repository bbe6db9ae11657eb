"""Reading params.yaml sections for stage scripts (DVC passes nothing; stages read the file)."""
from __future__ import annotations

import os
from pathlib import Path

import yaml


def load_params(path: str | os.PathLike = "params.yaml", section: str | None = None) -> dict:
    """Return params.yaml (or one top-level section of it) as a dict."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"params file {path} not found (run from the project root or pass --params)")
    data = yaml.safe_load(path.read_text()) or {}
    if section is None:
        return data
    if section not in data:
        raise KeyError(f"{path}: no section '{section}' (has {sorted(data)})")
    return data[section]


def params_section(path: str | os.PathLike, dotted: str) -> dict | None:
    """params.yaml's section `dotted` (e.g. "sequence.features"), or None when the file or the section
    is missing or not a mapping: stage scripts run by hand may have no params file at all."""
    path = Path(path)
    if not path.is_file():
        return None
    node = yaml.safe_load(path.read_text()) or {}
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def workers(n: int | None) -> int:
    """Worker count from a param: 0 or None means every core."""
    return int(n) if n else (os.cpu_count() or 1)


def apply_overrides(section: dict | None, items: list[str]) -> dict:
    """A copy of a params section with `KEY=VALUE` overrides (values parsed as YAML) from a stage's -S."""
    out = dict(section or {})
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"an override must be KEY=VALUE, got '{item}'")
        out[key.strip()] = yaml.safe_load(value)
    return out


def add_override_option(parser, what: str, example: str, flag: str = "-S", dest: str = "set") -> None:
    """The stages' repeatable `KEY=VALUE` option (values parsed as YAML), e.g. -S for a params section."""
    parser.add_argument(flag, f"--{dest}", dest=dest, action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one {what} (repeatable, YAML values), e.g. {flag} {example}")


def overridden(parser, section: dict | None, items: list[str]) -> dict:
    """apply_overrides for a stage CLI: a malformed item is a usage error (exit 2), not a traceback."""
    try:
        return apply_overrides(section, items)
    except ValueError as e:
        parser.error(str(e))
