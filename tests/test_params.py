"""params.yaml helpers shared by the stage scripts: one -S rule for every stage (full dotted keys, as
`dvc exp run -S` takes them, applied for one run; a key the stage does not read is a usage error)."""
import argparse

import pytest
import yaml

from ferpipe.params import (add_set_option, apply_overrides, keys_set_in, load_params, lookup, required,
                            stage_params, whole_number)


def _parser():
    p = argparse.ArgumentParser(prog="stage")
    add_set_option(p, "train.folds=[0]")
    return p


def test_lookup_dotted_and_missing(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("sequence:\n  features: {layer: fc1}\n  model: lstm\nguides: {soft: {sigma: 2}}\n")
    params = load_params(p)
    assert lookup(params, "sequence.features") == {"layer": "fc1"}
    assert lookup(params, "guides") == {"soft": {"sigma": 2}}
    assert lookup(params, "sequence.model") == "lstm"
    assert lookup(params, "sequence.nothing.deeper") is None and lookup(params, "sequence.model.x", 7) == 7
    assert load_params(tmp_path / "absent.yaml") == {}                         # a script run by hand
    assert required(params, "sequence.model", p) == "lstm"
    with pytest.raises(KeyError, match=r"no param gray48.size in .*absent.yaml \(no such file\).*-S gray48.size="):
        required({}, "gray48.size", tmp_path / "absent.yaml")


def test_overrides_parse_yaml_from_the_root_and_leave_the_file_alone(tmp_path):
    assert apply_overrides({"a": 1, "b": 2}, ["a=[0, 1]", "c=true"]) == {"a": [0, 1], "b": 2, "c": True}
    p = tmp_path / "params.yaml"
    text = "model: baseline\ntrain: {folds: [0, 1], lr: 0.001}\nsequence: {train: {epochs: 5}}\n"
    p.write_text(text)
    got = load_params(p, ["model=soft", "train.folds=[0]", "sequence.train.epochs=15", "+train.model_kwargs.width=4"])
    assert got == {"model": "soft", "train": {"folds": [0], "lr": 0.001, "model_kwargs": {"width": 4}},
                   "sequence": {"train": {"epochs": 15}}}
    assert p.read_text() == text                                               # this run only
    with pytest.raises(ValueError, match="model is a value, not a group"):
        load_params(p, ["model.x=1"])


def test_stage_params_reads_checks_keys_and_fails_as_usage_errors(tmp_path, capsys):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"task": "classes", "model": "baseline", "train": {"lr": 0.001},
                                 "sequence": {"model": "lstm", "features": {"layer": "flatten"}}}))
    parser = _parser()
    a = parser.parse_args(["-S", "train.lr=0.01", "--set", "model=soft"])
    got = stage_params(parser, p, a.set, reads=("model", "task", "train.*"))
    assert got["train"] == {"lr": 0.01} and got["model"] == "soft" and got["sequence"]["model"] == "lstm"

    def usage_error(items, reads, others=()):
        with pytest.raises(SystemExit) as e:
            stage_params(parser, p, items, reads, others)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith("stage: error: ")
        return err[-1]

    assert usage_error(["train.epochs=3"], ("gray48.*",)) == "stage: error: -S train.epochs: this stage reads gray48.*"
    assert "this stage reads model, task, train.*" in usage_error(["lr=0.01"], ("model", "task", "train.*"))  # relative
    assert "-S train:" in usage_error(["train={lr: 1}"], ("train.*",))       # a group as a whole is not a key inside it
    assert "but not sequence.features.*" in usage_error(["sequence.features.layer=fc1"], ("sequence.*",),
                                                        ("sequence.features.*",))
    assert "KEY=VALUE" in usage_error(["no-equals-sign"], ("train.*",))
    assert "not a YAML value" in usage_error(["train.folds=[0"], ("train.*",))
    assert "is a value, not a group" in usage_error(["model.x=1"], ("model.*",))


def test_keys_set_in_and_whole_number(capsys):
    items = ["dataset.min_length=3", "+dataset.sort=true", "sequence.dataset.every=2", "ingest.size=9"]
    assert keys_set_in(items, "dataset") == {"min_length", "sort"}
    assert keys_set_in(items, "sequence.dataset") == {"every"} and keys_set_in(items, "sequence") == {"dataset"}
    p = _parser()
    assert whole_number(p, "gray48.size", 64, 1) == 64
    for bad in ("x", 0, 2.5, True):
        with pytest.raises(SystemExit):
            whole_number(p, "gray48.size", bad, 1)
        assert f"gray48.size must be a whole number >= 1, got {bad!r}" in capsys.readouterr().err
