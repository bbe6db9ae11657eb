"""dvc.yaml cannot go stale: every ferpipe module a stage's script can run is one of its deps, and
every library file listed is one it runs. A change to any code a stage executes must rerun it."""
from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def module_file(name: str) -> Path | None:
    """src/ path of a ferpipe module or package (its __init__.py)."""
    base = SRC / Path(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def imported(path: Path) -> set[str]:
    """ferpipe modules imported anywhere in a file (function-level imports too: they run)."""
    tree = ast.parse(path.read_text())
    pkg = ".".join(path.relative_to(SRC).with_suffix("").parts[:-1]) if path.is_relative_to(SRC) else ""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ferpipe")}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(p for p in parts + [mod] if p)
            if mod.startswith("ferpipe"):
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names if module_file(f"{mod}.{a.name}")}
    return out


def closure(script: Path) -> set[Path]:
    """Library files a script can execute: the transitive ferpipe imports, with each package's
    __init__.py (importing ferpipe.a.b runs ferpipe/a/__init__.py)."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        f = todo.pop()
        for name in imported(f):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                p = module_file(".".join(parts[:i]))
                if p is not None and p not in seen:
                    seen.add(p)
                    todo.append(p)
    return {p for p in seen if p.name != "__init__.py" or p.read_text().strip().count("\n") > 12}


def stages() -> list[tuple[str, dict]]:
    return list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items())


@pytest.mark.parametrize("name,stage", stages(), ids=[n for n, _ in stages()])
def test_every_module_a_stage_runs_is_a_dep(name, stage):
    cmd = shlex.split(stage["cmd"] if isinstance(stage["cmd"], str) else stage["cmd"][0])
    script = next(REPO / c for c in cmd if c.endswith(".py"))
    deps = {str(d) for d in stage.get("deps", [])}
    listed = {REPO / d for d in deps if d.startswith("src/ferpipe/") and d.endswith(".py")}
    runs = closure(script)
    missing = sorted(str(p.relative_to(REPO)) for p in runs - listed)
    stale = sorted(str(p.relative_to(REPO)) for p in listed - runs)
    assert str(script.relative_to(REPO)) in deps, f"{name}: its script is not a dep"
    assert not missing, f"{name}: runs these files but does not list them as deps: {missing}"
    assert not stale, f"{name}: lists files it never imports: {stale}"


# ---- params: every key a stage's code reads from params.yaml is declared in dvc.yaml, and only those --------
# Keys that change no result are left out of dvc.yaml on purpose (threads, logging, batch sizes of inference).
NO_RESULT = {"ingest.workers", "train.threads", "train.log_every", "train.progress", "train.eval_batch_size", "train.memory_gb",
             "evaluate.threads", "evaluate.batch_size",
             "sequence.features.batch_size", "sequence.train.threads", "sequence.train.eval_batch_size",
             "train.snapshot_every", "sequence.train.snapshot_every"}


def _leaves(node, prefix):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}.{k}")
    else:
        yield prefix


def _declared(stage: str, prefix: str) -> set[str]:
    params = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["params"]
    return {p for p in params if isinstance(p, str) and p.startswith(prefix + ".")}


def _read_by_code() -> dict[str, set[str]]:
    from dataclasses import fields

    from ferpipe.evaluate.run import DEFAULTS as EVALUATE
    from ferpipe.sequences.config import SequenceConfig
    from ferpipe.train.run import DEFAULTS as TRAIN
    from ferpipe.sequences.features import DEFAULTS as FEATURES
    seq = set()
    for f in fields(SequenceConfig):
        if f.name in ("lstm", "cbm", "convlstm", "frame"):
            seq |= set(_leaves(f.default_factory(), f"sequence.{f.name}"))
        elif f.name.startswith("anticipation_"):
            seq.add(f"sequence.anticipation.{f.name[len('anticipation_'):]}")
        elif f.name in SequenceConfig.TRAIN_KEYS:
            seq.add(f"sequence.train.{f.name}")
        else:
            seq.add(f"sequence.{f.name}")
    return {"train": set(_leaves(TRAIN, "train")), "evaluate": set(_leaves(EVALUATE, "evaluate")),
            "features": {f"sequence.features.{k}" for k in FEATURES}, "train_sequence": seq}


@pytest.mark.parametrize("stage,prefix", [("train", "train"), ("evaluate", "evaluate"),
                                          ("features", "sequence.features"), ("train_sequence", "sequence")])
def test_every_param_a_stage_reads_is_declared(stage, prefix):
    """`dvc exp run -S KEY=...` of a key the code reads but dvc.yaml does not list would restore a stale result."""
    read = _read_by_code()[stage] - NO_RESULT
    declared = _declared(stage, prefix)
    if stage == "train_sequence":
        declared = {d for d in declared if not d.startswith(("sequence.features.", "sequence.dataset."))}
    assert sorted(read - declared) == [], f"{stage} reads params dvc.yaml does not list"
    assert sorted(declared - read) == [], f"{stage} lists params its code does not read"
    composed = yaml.safe_load((REPO / "params.yaml").read_text())
    for key in read:
        node = composed
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{key} is read by {stage} but not in conf/config.yaml"
            node = node[part]


@pytest.mark.parametrize("stage,section,sequence", [("ingest", "dataset", False), ("ingest_sequences", "sequence.dataset", True)])
def test_every_reader_option_is_a_declared_param(stage, section, sequence):
    """ingest hands every key of its dataset section that the chosen reader takes to the reader: each of
    those options is a leaf param in conf/config.yaml and dvc.yaml (else -S dataset.sort=true reruns nothing)."""
    from ferpipe.data.readers import READERS, reader_options
    from ferpipe.data.sequences import SEQUENCE_READERS
    options = {o for f in READERS if (f in SEQUENCE_READERS) == sequence for o in reader_options(f)}
    read = {f"{section}.{k}" for k in options | {"format", "path", "root"}}
    declared = _declared(stage, section)
    assert sorted(read - declared) == []
    composed = yaml.safe_load((REPO / "params.yaml").read_text())
    node = composed
    for part in section.split("."):
        node = node[part]
    assert options <= set(node)


def test_every_guide_param_is_declared():
    """Each guide stage lists exactly its kind's params; features (which makes the maps of frames) lists all."""
    from ferpipe.guides.maps import DEFAULT_PARAMS
    every = set()
    for kind, prm in DEFAULT_PARAMS.items():
        keys = {f"guides.{kind}.{k}" for k in prm}
        every |= keys
        assert _declared(f"guide_{kind}", f"guides.{kind}") == keys, kind
    assert _declared("features", "guides") == every
