"""DVC behaviour of the preprocessing pipeline, on a throwaway copy of the project (demo data)."""
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ferpipe.store import read_h5
from conftest import REPO, ran_stages

NOT_DVC_STAGES = {"ensemble.py"}  # a command over several experiments' outputs, run by hand
PREPROCESS = ["demo", "ingest", "gray48", "landmarks", "split"] + [
    f"guide_{k}" for k in ("landmarks", "soft", "dilation", "patches", "weighted", "saliency")]


def test_first_repro_runs_every_stage_and_second_does_nothing(demo_project):
    assert set(PREPROCESS) <= set(ran_stages(demo_project.first_repro))
    again = demo_project.dvc("repro")
    assert ran_stages(again) == [], again
    assert "up to date" in demo_project.dvc("status")


def test_guide_param_reruns_only_that_guide(demo_project):
    demo_project.set_params(**{"guides.soft.threshold": 60})
    try:
        out = demo_project.dvc("repro")
        ran = ran_stages(out)
        assert "guide_soft" in ran
        assert not {"demo", "ingest", "gray48", "landmarks", "guide_landmarks", "guide_weighted"} & set(ran), ran
    finally:
        demo_project.run("git", "checkout", "params.yaml")
        demo_project.dvc("repro")


def test_gray48_size_reruns_gray48_and_guides_not_landmarks(demo_project):
    demo_project.set_params(**{"gray48.size": 40})
    try:
        ran = set(ran_stages(demo_project.dvc("repro")))
        assert {"gray48", "guide_soft", "guide_saliency"} <= ran
        assert not {"demo", "ingest", "landmarks", "split"} & ran, ran
        assert read_h5(demo_project.root / "data/gray48/images.h5", ["images"])["images"].shape[1:] == (40, 40)
    finally:
        demo_project.run("git", "checkout", "params.yaml")
        demo_project.dvc("repro")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("cmd,out,ref", [
    (["stages/gray48.py", "--out", "hand/gray48.h5", "--sheet", ""], "hand/gray48.h5", "data/gray48/images.h5"),
    (["stages/guide.py", "soft", "--out", "hand/soft.h5", "--sheet", ""], "hand/soft.h5", "data/guides/soft.h5"),
    (["stages/split.py", "--out", "hand/split.csv", "--summary", "hand/split.json"], "hand/split.csv",
     "data/split/split.csv"),
    (["stages/landmarks.py", "--out", "hand/lm.h5", "--metrics", "", "--sheet", ""], "hand/lm.h5",
     "data/landmarks/landmarks.h5"),
])
def test_stage_by_hand_writes_the_same_artifact(demo_project, cmd, out, ref):
    demo_project.run(sys.executable, *cmd)
    assert _md5(demo_project.root / out) == _md5(demo_project.root / ref)


def test_every_stage_explains_itself():
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    scripts = sorted((REPO / "stages").glob("*.py"))
    assert len(scripts) >= 6
    for script in scripts:
        res = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=REPO)
        assert res.returncode == 0, res.stderr
        assert "usage:" in res.stdout and len(res.stdout.splitlines()) > 8, script
    listed = " ".join(str(s.get("cmd", s.get("do", {}).get("cmd"))) for s in dvc_yaml["stages"].values())
    for script in scripts:
        if script.name in NOT_DVC_STAGES:
            continue
        assert f"stages/{script.name}" in listed, f"{script.name} is not a stage in dvc.yaml"


def test_lock_hashes_match_artifacts(demo_project):
    lock = yaml.safe_load((demo_project.root / "dvc.lock").read_text())
    outs = lock["stages"]["gray48"]["outs"]
    assert outs[0]["md5"] == _md5(demo_project.root / outs[0]["path"])
    images = read_h5(demo_project.root / "data/gray48/images.h5")
    ingest = read_h5(demo_project.root / "data/ingest/images.h5")
    np.testing.assert_array_equal(images["ids"], ingest["ids"])


def test_dict_valued_leaf_param_is_tracked_by_value(tmp_path):
    """train.model_kwargs is a leaf key whose value is a dict: DVC (the pinned version) must rerun on a
    changed value and restore from the run cache only the output made with the same value."""
    from conftest import Project
    proj = Project(tmp_path)
    proj.run("git", "init", "-q")
    proj.dvc("init", "-q")
    (tmp_path / "params.yaml").write_text("train:\n  model_kwargs: {}\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: python -c \"import yaml; print(yaml.safe_load(open('params.yaml')))\" > out.txt\n"
        "    params:\n      - train.model_kwargs\n    outs:\n      - out.txt\n")
    seen = []
    for kw in ({}, {"in_size": 96}, {"in_size": 64}, {"in_size": 96}, {}):
        proj.set_params(**{"train.model_kwargs": kw})
        out = proj.dvc("repro")
        seen.append(("ran" if ran_stages(out) else "restored" if "skipping run" in out else "?",
                     yaml.safe_load((tmp_path / "out.txt").read_text())["train"]["model_kwargs"]))
    assert seen == [("ran", {}), ("ran", {"in_size": 96}), ("ran", {"in_size": 64}),
                    ("restored", {"in_size": 96}), ("restored", {})], seen
