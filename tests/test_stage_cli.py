"""The stage scripts on the command line: --help agrees with params.yaml and dvc.yaml, user errors are one
line on stderr with a non-zero exit (--debug: the traceback), one shared helper (ferpipe.stagecli)."""
import argparse
import dataclasses
import shlex
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, load_stage
from ferpipe.params import lookup

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


# Options that are neither paths nor the shared ones: they choose which section or mode a dvc.yaml stage uses.
MODE_OPTIONS = {"ingest": {"--section"}, "landmarks": {"--passes-param"}, "demo": {"--sequences"},
                "guide": {"kind", "--kind"}, "train_sequence": {"--test-only"}, "features": {"--backbone"},
                "ensemble": {"--weights"}}  # ensemble: a command over predictions CSVs, it reads no params


@pytest.mark.parametrize("name", STAGES)
def test_stages_take_paths_and_S_only(name):
    """Params reach a stage only through params.yaml and -S KEY=VALUE: no option is typed (int, float,
    choices) or a switch, except the shared ones and the few that choose a section or mode."""
    p = load_stage(name).parser()
    shared = {"-h", "--debug", "--quiet", "-S"}
    for action in p._actions:
        names = set(action.option_strings) or {action.dest}
        if names & shared or names & MODE_OPTIONS.get(name, set()):
            continue
        assert action.type is None and action.choices is None and action.nargs in (None, "+") \
            and isinstance(action, argparse._StoreAction), f"{name} {sorted(names)}: a param flag, not a path"
    if name != "ensemble":
        set_help = next(a.help for a in p._actions if "-S" in a.option_strings)
        for item in set_help.rsplit("e.g. -S ", 1)[1].split(" -S "):   # the examples: full keys of real params
            assert lookup(PARAMS, item.strip("'").partition("=")[0]) is not None, f"{name}: example {item}"
        assert "-S KEY=VALUE with the full params.yaml key" in _help(name), name  # the rule, in the docstring


REMOVED = [("ingest", "--format", "folder"), ("ingest", "--path", "x"), ("ingest", "--root", "x"),
           ("ingest", "--split", "val"), ("ingest", "--sort"), ("ingest", "--ignore-missing"),
           ("ingest", "--size", "96"), ("ingest", "--workers", "1"), ("ingest", "--face-crop"),
           ("ingest", "--face-margin", "1.2"), ("ingest", "-O", "min_length=3"), ("gray48", "--size", "64"),
           ("landmarks", "--size", "96"), ("landmarks", "--passes", "dlib"), ("landmarks", "--workers", "1"),
           ("split", "--task", "classes"), ("split", "--folds", "3"), ("demo", "--seed", "1"),
           ("demo", "--train-per-class", "1"), ("demo", "--test-per-class", "1"), ("demo", "--size", "48"),
           ("demo", "--per-class", "1"), ("demo", "--frames", "3"), ("train", "--model", "soft")]


@pytest.mark.parametrize("name,args", [(r[0], r[1:]) for r in REMOVED], ids=[" ".join(r[:2]) for r in REMOVED])
def test_removed_param_flags_are_rejected(name, args, capsys):
    with pytest.raises(SystemExit) as e:
        load_stage(name).parser().parse_args(list(args))
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


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
    assert "-S KEY=VALUE" in help_text and "sequence.train.epochs=15" in help_text and "--folds" not in help_text


def _help(name: str) -> str:
    return " ".join(load_stage(name).parser().format_help().split())


def test_help_texts_fixed_in_issue_9():
    assert "sequence.features.layer=fc1" in _help("features") and "--layer" not in _help("features")  # params by -S only
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
    assert lines[0].startswith(f"{stage}.py: error: "), lines[0]
    for w in words:
        assert w in lines[0], lines[0]


def test_user_errors_are_one_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text().replace("path: data/demo", f"path: {tmp_path / 'nowhere'}"))
    res = _run("stages/ingest.py", "--params", str(params), "--out", str(tmp_path / "i.h5"), "--quiet")
    _one_line_error(res, "ingest", "nowhere")                                     # a missing folder
    (tmp_path / "empty" / "train").mkdir(parents=True)
    res = _run("stages/ingest.py", "--params", str(params), "-S", f"dataset.path={tmp_path / 'empty'}", "--quiet",
               "--out", str(tmp_path / "i.h5"))
    _one_line_error(res, "ingest")                                                # a DatasetError
    res = _run("stages/gray48.py", "--images", str(tmp_path / "absent.h5"), "--out", str(tmp_path / "g.h5"))
    _one_line_error(res, "gray48", "absent.h5")                                   # a missing input file
    res = _run("stages/train.py", "-S", "train.max_epoch=3", "--split", str(tmp_path / "absent.csv"))
    _one_line_error(res, "train", "max_epoch")                                    # a misspelt param
    res = _run("stages/evaluate.py", "--models", str(tmp_path / "nomodels"), "--split", str(tmp_path / "absent.csv"))
    _one_line_error(res, "evaluate")
    res = _run("stages/train.py", "-S", "train.max_epoch=3", "--debug")           # --debug: the traceback
    assert res.returncode == 1 and "Traceback" in res.stderr and "max_epoch" in res.stderr
    res = _run("stages/split.py", "--params", str(tmp_path / "absent.yaml"))
    _one_line_error(res, "split", "absent.yaml", "no param task")
    res = _run("stages/gray48.py", "-S", "gray48.size=x")                         # parser.error: usage + 1 line, exit 2
    assert res.returncode == 2 and "Traceback" not in res.stderr and "gray48.size must be a whole number" in res.stderr


def _usage_error(res) -> str:
    """argparse's parser.error: exit 2, the usage, then exactly one error line, which is returned."""
    assert res.returncode == 2 and "Traceback" not in res.stderr, (res.returncode, res.stderr)
    errors = [ln for ln in res.stderr.splitlines() if ": error: " in ln]
    assert len(errors) == 1 and res.stderr.strip().splitlines()[-1] == errors[0], res.stderr
    return errors[0]


def test_S_takes_full_keys_and_rejects_keys_of_other_stages(tmp_path):
    """-S KEY=VALUE is the full dotted params.yaml key, as `dvc exp run -S` takes it; a key the stage does not
    read (a typo, a key meant for another stage, or the old section-relative form) is a usage error."""
    line = _usage_error(_run("stages/gray48.py", "-S", "train.epochs=3"))
    assert line == "gray48.py: error: -S train.epochs: this stage reads gray48.size"
    assert _usage_error(_run("stages/gray48.py", "-S", "gray48.sise=64")).endswith("this stage reads gray48.size")  # a typo
    assert _usage_error(_run("stages/train.py", "-S", "max_epochs=3")).endswith(   # the old relative form
        "-S max_epochs: this stage reads model, task, train.*")
    assert "this stage reads guides.soft.*" in _usage_error(_run("stages/guide.py", "soft", "-S", "guides.dilation.kernel=3"))
    assert "but not sequence.dataset.*, sequence.features.*" in _usage_error(
        _run("stages/train_sequence.py", "-S", "sequence.features.layer=fc1"))
    assert "this stage reads sequence.dataset.*, ingest.size, ingest.workers, ingest.max_file_mb" in _usage_error(
        _run("stages/ingest.py", "--section", "sequence.dataset", "-S", "dataset.min_length=3"))
    assert "reads landmarks.size, landmarks.workers, landmarks.chunk, sequence.landmarks_passes" in _usage_error(
        _run("stages/landmarks.py", "--passes-param", "sequence.landmarks_passes", "-S", "landmarks.passes=[dlib]"))
    assert "--test-only reads no params" in _usage_error(_run("stages/train_sequence.py", "--test-only", "-S",
                                                              "sequence.model=cbm"))
    assert "landmarks.passes must be a list of passes" in _usage_error(
        _run("stages/landmarks.py", "-S", "landmarks.passes=[dlib, nope]"))
    # the value applies to this run only: the params file is read, never written
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    res = _run("stages/split.py", "--params", str(params), "-S", "split.folds=1", "-S", "task=classes")
    assert "split.folds must be a whole number >= 2, got 1" in _usage_error(res)
    assert params.read_text() == (REPO / "params.yaml").read_text()


def test_S_on_real_fer2013_images(tmp_path, fer_dir):
    """ingest of a few real FER-2013 faces with the dataset and the size given by -S, no params file at all."""
    from ferpipe.store import read_h5
    data = tmp_path / "fer"
    for split in ("train", "test"):
        for cls in ("happy", "sad"):
            (data / split / cls).mkdir(parents=True)
            for f in sorted((fer_dir / split / cls).iterdir())[:3]:
                (data / split / cls / f.name).write_bytes(f.read_bytes())
    o = tmp_path / "out"
    res = _run("stages/ingest.py", "--params", str(tmp_path / "none.yaml"), "-S", "dataset.format=folder",
               "-S", f"dataset.path={data}", "-S", "ingest.size=32", "-S", "ingest.workers=1", "--quiet",
               "--out", str(o / "i.h5"), "--manifest", str(o / "m.csv"), "--rejects", str(o / "r.csv"),
               "--metrics", str(o / "m.json"), "--sheet", "")
    assert res.returncode == 0, res.stderr
    packed = read_h5(o / "i.h5")["images"]
    assert packed.shape == (12, 32, 32) and packed.std() > 10            # real faces, resized from 48 px to 32
    res = _run("stages/ingest.py", "--params", str(tmp_path / "none.yaml"), "-S", "dataset.format=folder",
               "-S", f"dataset.path={data}", "-S", "dataset.min_length=2", "--out", str(o / "j.h5"))
    assert "-S dataset.min_length: format folder takes no min_length option" in _usage_error(res)
    assert not (o / "j.h5").exists()
    # landmarks.passes [] (no detection: the recipes quick, cpu60, bundled, rmn, emotion_sdk) is a valid setting
    res = _run("stages/landmarks.py", "--images", str(o / "i.h5"), "--out", str(o / "l.h5"), "--metrics", "",
               "--sheet", "", "-S", "landmarks.passes=[]", "-S", "landmarks.workers=1")
    assert res.returncode == 0, res.stderr
    assert not read_h5(o / "l.h5")["found"].any()                       # every face on the fallback shape
