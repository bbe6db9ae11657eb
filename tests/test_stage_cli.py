"""The stage scripts on the command line: --help agrees with params.yaml and dvc.yaml, user errors are one
line on stderr with a non-zero exit (--debug: the traceback), one shared helper (ferpipe.stagecli)."""
import dataclasses
import shlex
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, load_stage

STAGES = sorted(p.stem for p in (REPO / "stages").glob("*.py"))
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
PATH_PREFIXES = ("data/", "metrics/", "plots/", "models", "dvclive/")
NOT_IN_DVC_RUNS = {("train_sequence", "outputs")}  # written only with --test-only, which no stage runs


def _run(*args, cwd=REPO):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_uses_the_shared_cli(name):
    text = (REPO / "stages" / f"{name}.py").read_text()
    assert "run_stage(main)" in text and "stage_parser(" in text and "sys.exit(" not in text, name
    p = load_stage(name).parser()
    assert "--debug" in p.format_help()


def _declared(stage: dict) -> set[str]:
    out = set()
    for key in ("deps", "outs", "metrics", "plots"):
        for item in stage.get(key, []):
            out.add(next(iter(item)) if isinstance(item, dict) else item)
    return out


@pytest.mark.parametrize("stage_name", sorted(DVC))
def test_stage_paths_in_dvc_yaml_agree_with_the_scripts_defaults(stage_name):
    """Every file a stage command reads or writes (its options' defaults, or the values its dvc.yaml cmd
    gives) is declared in that stage's deps / outs / metrics / plots, so --help tells what DVC runs."""
    stage = DVC[stage_name]
    cmd = shlex.split(stage["cmd"])
    assert cmd[0] == "python" and cmd[1].startswith("stages/"), stage["cmd"]
    assert cmd[1] in stage["deps"], f"{stage_name}: its script is not a dep"
    ns = load_stage(cmd[1][len("stages/"):-3]).parser().parse_args(cmd[2:])
    declared = _declared(stage)
    for opt, value in vars(ns).items():
        if not isinstance(value, str) or not value.startswith(PATH_PREFIXES) or (stage_name, opt) in NOT_IN_DVC_RUNS:
            continue
        ok = value in declared or any(d.startswith(value.rstrip("/") + "/") for d in declared)
        assert ok, f"{stage_name}: --{opt} {value} is not in dvc.yaml's deps/outs/metrics/plots {sorted(declared)}"


def test_override_options_name_real_params():
    """An option whose help says 'override <key>' names a key of params.yaml."""
    import re
    seen = 0
    for name in STAGES:
        for action in load_stage(name).parser()._actions:
            found = re.findall(r"override (?:the top-level ([a-z_]+)|([a-z0-9_]+(?:\.[a-z0-9_]+)+))", action.help or "")
            for key in ("".join(m) for m in found):
                node = PARAMS
                for part in key.split("."):
                    assert isinstance(node, dict) and part in node, f"{name} {action.option_strings}: {key}"
                    node = node[part]
                seen += 1
    assert seen >= 15


def test_library_defaults_shown_in_help_agree_with_params_yaml():
    """The defaults the stages print (train/evaluate epilogs, guide kinds, features) and apply when a
    params key is missing are the committed params.yaml's (the paper recipe's) values."""
    from ferpipe.evaluate.run import DEFAULTS as EVALUATE
    from ferpipe.guides.maps import DEFAULT_PARAMS as GUIDES
    from ferpipe.train.run import DEFAULTS as TRAIN
    features = load_stage("features").DEFAULTS
    for lib, par in ((TRAIN, PARAMS["train"]), (EVALUATE, PARAMS["evaluate"]), (GUIDES, PARAMS["guides"]),
                     (features, PARAMS["sequence"]["features"])):
        assert set(par) <= set(lib)
        assert {k: lib[k] for k in par} == par
    from ferpipe.sequences.config import SequenceConfig
    default, from_params = SequenceConfig(), SequenceConfig.from_params(PARAMS["sequence"])
    differ = [f.name for f in dataclasses.fields(default) if getattr(default, f.name) != getattr(from_params, f.name)]
    assert differ == []  # one set of defaults: a SequenceConfig() in a notebook trains what dvc repro trains
    help_text = " ".join(load_stage("train_sequence").parser().format_help().split())
    assert "-S KEY=VALUE" in help_text and "train.epochs=15" in help_text and "--folds" not in help_text


def _help(name: str) -> str:
    return " ".join(load_stage(name).parser().format_help().split())


def test_help_texts_fixed_in_issue_9():
    assert "-S KEY=VALUE" in _help("features") and "--layer" not in _help("features")  # params by -S only
    assert "foreach" not in _help("guide")                                              # one stage per kind
    ingest = load_stage("ingest").parser().format_help()
    formats = ingest[ingest.index("Formats"):ingest.index("Relative image paths")]   # one list of formats
    assert all(f in formats for f in ("folder", "fer2013_csv", "affectnet", "listfile", "guided_st", "ck_sequences", "video"))
    assert "(default: data/gray48/images.h5)" in _help("gray48")


# ------------------------------------------------------------------------------------- user errors

def _one_line_error(res, stage: str, *words):
    assert res.returncode == 1, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith(f"{stage}: error: "), lines[0]
    for w in words:
        assert w in lines[0], lines[0]


def test_user_errors_are_one_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text().replace("path: data/demo", f"path: {tmp_path / 'nowhere'}"))
    res = _run("stages/ingest.py", "--params", str(params), "--out", str(tmp_path / "i.h5"), "--quiet")
    _one_line_error(res, "ingest", "nowhere")                                     # a missing folder
    (tmp_path / "empty" / "train").mkdir(parents=True)
    res = _run("stages/ingest.py", "--params", str(params), "--path", str(tmp_path / "empty"), "--quiet",
               "--out", str(tmp_path / "i.h5"))
    _one_line_error(res, "ingest")                                                # a DatasetError
    res = _run("stages/gray48.py", "--images", str(tmp_path / "absent.h5"), "--out", str(tmp_path / "g.h5"))
    _one_line_error(res, "gray48", "absent.h5")                                   # a missing input file
    res = _run("stages/train.py", "-S", "max_epoch=3", "--split", str(tmp_path / "absent.csv"))
    _one_line_error(res, "train", "max_epoch")                                    # a misspelt param
    res = _run("stages/evaluate.py", "--models", str(tmp_path / "nomodels"), "--split", str(tmp_path / "absent.csv"))
    _one_line_error(res, "evaluate")
    res = _run("stages/train.py", "-S", "max_epoch=3", "--debug")                 # --debug: the traceback
    assert res.returncode == 1 and "Traceback" in res.stderr and "max_epoch" in res.stderr
    res = _run("stages/split.py", "--params", str(tmp_path / "absent.yaml"))
    _one_line_error(res, "split", "absent.yaml")
    res = _run("stages/gray48.py", "--size", "x")                                 # argparse: usage + 1 line, exit 2
    assert res.returncode == 2 and "Traceback" not in res.stderr
