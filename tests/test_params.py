"""params.yaml helpers shared by the stage scripts."""
import argparse

import pytest

from ferpipe.params import add_override_option, apply_overrides, overridden, params_section


def test_params_section_dotted_and_missing(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("sequence:\n  features: {layer: fc1}\n  model: lstm\nguides: {soft: {sigma: 2}}\n")
    assert params_section(p, "sequence.features") == {"layer": "fc1"}
    assert params_section(p, "guides") == {"soft": {"sigma": 2}}
    assert params_section(p, "sequence.model") is None          # a value, not a section
    assert params_section(p, "sequence.nothing.deeper") is None
    assert params_section(tmp_path / "absent.yaml", "sequence") is None


def test_overrides_parse_yaml_and_fail_as_usage_errors(capsys):
    assert apply_overrides({"a": 1, "b": 2}, ["a=[0, 1]", "c=true"]) == {"a": [0, 1], "b": 2, "c": True}
    p = argparse.ArgumentParser(prog="stage")
    add_override_option(p, "train param", "folds=[0]")
    add_override_option(p, "reader option", "min_length=3", flag="-O", dest="option")
    a = p.parse_args(["-S", "lr=0.01", "-O", "every=2"])
    assert overridden(p, {}, a.set) == {"lr": 0.01} and overridden(p, None, a.option) == {"every": 2}
    with pytest.raises(SystemExit) as e:
        overridden(p, {}, ["no-equals-sign"])
    assert e.value.code == 2 and "KEY=VALUE" in capsys.readouterr().err
