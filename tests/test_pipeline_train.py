"""DVC behaviour of train + evaluate on a throwaway copy of the project (tiny demo, 2 folds, 2 epochs)."""
import json
import re
import sys

import pytest
import yaml

from conftest import make_project, ran_stages



def preprocessing(ran) -> set:
    """The preprocessing stages among `ran` (whatever the guide stages are called)."""
    return {s for s in ran if s in {"demo", "ingest", "gray48", "landmarks", "split"} or s.startswith("guide")}


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    p = make_project(tmp_path_factory.mktemp("trainproj"), **{
        "train.max_epochs": 2, "train.folds": [0, 1], "train.threads": 1, "train.log_every": 0,
        "evaluate.threads": 1})
    p.first_repro = p.dvc("repro")
    p.commit("repro")
    return p


def _restore(p):
    p.run("git", "checkout", "--", ".")
    p.dvc("checkout", "--force")
    assert "up to date" in p.dvc("status")


def test_repro_trains_then_evaluates_and_second_repro_does_nothing(proj):
    ran = ran_stages(proj.first_repro)
    assert len(preprocessing(ran)) >= 11 and {"train", "evaluate"} <= set(ran), ran
    assert ran.index("evaluate") > ran.index("train") > max(ran.index(s) for s in preprocessing(ran))
    assert sorted(f.name for f in (proj.root / "models").iterdir()) == ["fold0.pt", "fold1.pt"]
    train = json.loads((proj.root / "metrics/train.json").read_text())
    assert set(train["folds"]) == {"0", "1"} and train["folds"]["0"]["epochs"] == 2
    ev = json.loads((proj.root / "metrics/eval.json").read_text())
    assert ev["model"] == "baseline" and ev["members"] == "folds" and ev["n"] > 0
    lock = yaml.safe_load((proj.root / "dvc.lock").read_text())["stages"]
    train_params = set(lock["train"]["params"]["params.yaml"])
    assert {"model", "task", "train.lr", "train.augment.degrees", "train.folds"} <= train_params
    assert "train.threads" not in train_params  # a worker count changes no result
    assert {"model", "evaluate.tta"} <= set(lock["evaluate"]["params"]["params.yaml"])
    assert ran_stages(proj.dvc("repro")) == []


def test_plots_are_declared_and_render(proj):
    res = proj.run(sys.executable, "-m", "dvc", "plots", "show", "--json")  # stdout only: JSON
    data = json.loads(res.stdout)
    assert not data.get("errors"), data.get("errors")
    names = set(data["data"])
    assert "plots/eval/predictions.csv" in names and "plots/eval/confusion.png" in names
    assert "dvclive/train/fold1/plots/metrics/val/acc.tsv" in names
    confusion = json.dumps(data["data"]["plots/eval/predictions.csv"])
    assert '"rect"' in confusion and '"actual"' in confusion  # the confusion template, x actual / y predicted


def test_train_param_reruns_train_and_evaluate_not_preprocessing(proj):
    proj.set_params(**{"train.lr": 0.002})
    try:
        ran = ran_stages(proj.dvc("repro"))
        assert {"train", "evaluate"} <= set(ran) and not preprocessing(ran), ran
    finally:
        _restore(proj)


def test_evaluate_param_reruns_only_evaluate(proj):
    proj.set_params(**{"evaluate.tta": 2})
    try:
        ran = ran_stages(proj.dvc("repro"))
        assert ran[0] == "evaluate" and "train" not in ran and not preprocessing(ran), ran
        assert json.loads((proj.root / "metrics/eval.json").read_text())["tta"] == 2
    finally:
        _restore(proj)


def test_exp_run_model_landmarks_reruns_only_training_and_shows_in_metrics(proj):
    out = proj.dvc("exp", "run", "-S", "model=landmarks")
    try:
        ran = ran_stages(out)
        assert {"train", "evaluate"} <= set(ran) and not preprocessing(ran), out
        name = re.search(r"Ran experiment\(s\): (\S+)", out).group(1)
        ev = json.loads((proj.root / "metrics/eval.json").read_text())
        assert ev["model"] == "landmarks"
        diff = proj.dvc("metrics", "diff", "--all")  # --all: listed even when the tiny demo ties
        rows = {tuple(line.split()[:2]) for line in diff.splitlines() if line.strip()}
        assert ("metrics/eval.json", "accuracy") in rows and ("metrics/train.json", "val_acc_mean") in rows, diff
        assert ("metrics/eval.json", "model") in rows, diff  # baseline -> landmarks
        shown = proj.dvc("exp", "show", "--json")
        assert name in shown and '"landmarks"' in shown
    finally:
        _restore(proj)
