"""Reading params.yaml for stage scripts (DVC passes nothing; stages read the file), with their -S overrides."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml


def load_params(path: str | os.PathLike = "params.yaml", overrides: list[str] | tuple = ()) -> dict:
    """params.yaml as a dict, with dotted `KEY=VALUE` overrides applied for this call only (the file is
    not written; see apply_overrides). An absent file is {}: a stage script run by hand may have none."""
    path = Path(path)
    data = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    return apply_overrides(data, overrides)


def lookup(params: dict, dotted: str, default=None):
    """The value at a dotted key ("sequence.features"), or `default` where a group on the way or the key
    itself is missing."""
    node = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def required(params: dict, dotted: str, path: str | os.PathLike) -> object:
    """The value at a dotted key the stage cannot run without: a missing one is a KeyError naming the key
    and the params file (one line from run_stage)."""
    missing = object()
    value = lookup(params, dotted, missing)
    if value is missing:
        where = f"{path}" if Path(path).is_file() else f"{path} (no such file)"
        raise KeyError(f"no param {dotted} in {where}: set it there or with -S {dotted}=VALUE")
    return value


def workers(n: int | None) -> int:
    """Worker count from a param: 0 or None means every core."""
    return int(n) if n else (os.cpu_count() or 1)


def _split_override(item: str) -> tuple[list[str], object]:
    """`KEY=VALUE` -> (the dotted KEY's parts, VALUE parsed as YAML). A leading + (Hydra's `+key=`, which
    `dvc exp run -S` needs for a key the config does not set) is accepted and dropped."""
    key, sep, text = item.partition("=")
    parts = [k.strip() for k in key.strip().lstrip("+").split(".")]
    if not sep or not all(parts):
        raise ValueError(f"an override must be KEY=VALUE, got '{item}'")
    try:
        return parts, yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"override {'.'.join(parts)}: {text!r} is not a YAML value ({' '.join(str(e).split())})") from None


def apply_overrides(section: dict | None, items: list[str] | tuple) -> dict:
    """A copy of params (or of one section) with `KEY=VALUE` overrides (values parsed as YAML); a dotted
    KEY sets a nested value (`train.epochs=15`), the groups on its way are copied, not edited."""
    out = copy.deepcopy(dict(section or {}))
    for item in items:
        parts, value = _split_override(item)
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise ValueError(f"override {'.'.join(parts)}: {part} is a value, not a group")
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


# ---------------------------------------------------------------------------- the stage scripts' -S

SET_RULE = ("params come from --params; -S KEY=VALUE sets one for this run only, KEY the full dotted "
            "params.yaml key as `dvc exp run -S` takes it")


def add_set_option(parser, example: str) -> None:
    """Every stage's repeatable -S KEY=VALUE (values parsed as YAML; see stage_params)."""
    parser.add_argument("-S", "--set", dest="set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"{SET_RULE} (repeatable, YAML values), e.g. -S {example}")


def _within(key: str, pattern: str) -> bool:
    """Whether a dotted key lies in a pattern: "a.b.*" = any key inside the group a.b, "a.b" = that key."""
    return key.startswith(pattern[:-1]) if pattern.endswith(".*") else key == pattern


def stage_params(parser, path: str | os.PathLike, items: list[str], reads: tuple[str, ...],
                 others: tuple[str, ...] = ()) -> dict:
    """A stage's params: load_params(path, items) with the stage's -S items (full dotted keys, as
    `dvc exp run -S` takes them). `reads` names what the stage reads ("task" a value, "train.*" the keys
    inside a group, not the group as a whole); `others`, keys inside those that other stages read. An -S key outside them (a typo,
    or a key meant for another stage, which this one would silently ignore) is a usage error (exit 2),
    as is a malformed item."""
    try:
        keys = [".".join(_split_override(item)[0]) for item in items]
    except ValueError as e:
        parser.error(str(e))
    for key in keys:
        if not any(_within(key, r) for r in reads) or any(_within(key, o) for o in others):
            but = f" but not {', '.join(others)} (other stages')" if others else ""
            parser.error(f"-S {key}: this stage reads {', '.join(reads)}{but}")
    params = load_params(path)  # a broken file: an error of the run (exit 1), not of the command line
    try:
        return apply_overrides(params, items)
    except ValueError as e:
        parser.error(str(e))


def keys_set_in(items: list[str], group: str) -> set[str]:
    """The keys directly inside a dotted group that -S items set (`dataset.min_length=3` -> min_length)."""
    prefix = group.split(".")
    parts = (_split_override(item)[0] for item in items)
    return {p[len(prefix)] for p in parts if len(p) > len(prefix) and p[:len(prefix)] == prefix}


def whole_number(parser, key: str, value, minimum: int, meaning: str = "") -> int:
    """A count or size param checked as the CLI's type=int once did: else a usage error naming the key."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        parser.error(f"{key} must be a whole number >= {minimum}{meaning}, got {value!r}")
    return value


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
