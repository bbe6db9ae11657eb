"""Reading params.yaml sections for stage scripts (DVC passes nothing; stages read the file)."""
from __future__ import annotations

import copy
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
    """A copy of a params section with `KEY=VALUE` overrides (values parsed as YAML) from a stage's -S;
    a dotted KEY sets a nested value (`train.epochs=15`), the groups on its way are copied, not edited."""
    out = copy.deepcopy(dict(section or {}))
    for item in items:
        key, sep, value = item.partition("=")
        parts = [k.strip() for k in key.split(".")]
        if not sep or not all(parts):
            raise ValueError(f"an override must be KEY=VALUE, got '{item}'")
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise ValueError(f"override {key}: {part} is a value, not a group")
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
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


# ---------------------------------------------------------------------------- params.yaml from conf/

def compose_params(conf_dir: str | os.PathLike = "conf", overrides: list[str] | tuple = ()) -> str:
    """params.yaml's text as `dvc exp run -S ...` writes it: DVC's own Hydra composition of
    conf/config.yaml + the chosen recipe + overrides (Hydra syntax, e.g. "recipe=cpu60")."""
    import tempfile

    from dvc.utils.hydra import compose_and_dump

    conf_dir = Path(conf_dir).resolve()
    if not (conf_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{conf_dir}/config.yaml not found (run from the project root)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "params.yaml")
        compose_and_dump(out, str(conf_dir), None, "config", tmp, list(overrides))
        return out.read_text(encoding="utf-8")


def main(argv=None) -> int:
    """`python -m ferpipe.params`: write params.yaml from conf/ (what the next `dvc exp run` would write),
    for `dvc repro` after editing conf/config.yaml; --check only compares."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m ferpipe.params", description=main.__doc__)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as dvc exp run -S takes them (recipe=cpu60)")
    p.add_argument("--conf", default="conf", help="config folder (default conf)")
    p.add_argument("--out", default="params.yaml", help="file to write (default params.yaml)")
    p.add_argument("--check", action="store_true", help="exit 1 if --out differs from the composition")
    a = p.parse_args(argv)
    text = compose_params(a.conf, a.overrides)
    out = Path(a.out)
    if a.check:
        same = out.is_file() and out.read_text(encoding="utf-8") == text
        print(f"{out} {'matches' if same else 'DIFFERS from'} the composition of {a.conf}/", file=sys.stderr)
        return 0 if same else 1
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} from {a.conf}/{' with ' + ' '.join(a.overrides) if a.overrides else ''}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
