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
