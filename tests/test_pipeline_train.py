"""DVC behaviour of train + evaluate on a throwaway copy of the project (tiny demo, 2 folds, 2 epochs)."""
import json
import re
import shutil
import sys

import pandas as pd
import pytest
import yaml

from conftest import make_project, ran_stages



SEQUENCE_PREP = ["demo_sequences", "ingest_sequences", "gray48_sequences", "landmarks_sequences"]


def preprocessing(ran) -> set:
    """The preprocessing stages among `ran` (whatever the guide stages are called), sequences' too."""
    return {s for s in ran if s in {"demo", "ingest", "gray48", "landmarks", "split", *SEQUENCE_PREP}
            or s.startswith("guide")}


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
    image_prep = preprocessing(ran) - set(SEQUENCE_PREP)
    assert ran.index("evaluate") > ran.index("train") > max(ran.index(s) for s in image_prep)
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
        # the sequence features come from the new CNN (its landmarks maps made from the frames' landmarks)
        assert {"features", "train_sequence"} <= set(ran), out
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


# ---------------------------------------------------------------------------------------- sequences

def test_repro_runs_the_sequence_stages_on_the_demo_sequences(proj):
    ran = ran_stages(proj.first_repro)
    assert set(SEQUENCE_PREP + ["features", "train_sequence"]) <= set(ran), ran
    assert ran.index("features") > max(ran.index("train"), ran.index("landmarks_sequences"))
    assert ran.index("train_sequence") > ran.index("features")
    m = json.loads((proj.root / "metrics/sequence.json").read_text())
    assert m["model"] == "lstm" and m["sequences"] == 16 and m["subject_independent"] and len(m["per_fold"]) == 4
    assert 0 <= m["mean"]["accuracy"] <= 1 and "k1" in m["by_first_k"]
    f = json.loads((proj.root / "metrics/features.json").read_text())
    assert f["frames"] == 64 and f["classes"] == ["angry", "happy", "sad", "surprise"]
    assert (proj.root / "data/sequences/model.pt").is_file() and (proj.root / "plots/sequence/confusion.png").is_file()
    lock = yaml.safe_load((proj.root / "dvc.lock").read_text())["stages"]
    assert "sequence.lstm.hidden" in lock["train_sequence"]["params"]["params.yaml"]  # leaf keys
    assert any(d["path"] == "models" for d in lock["features"]["deps"])            # the train stage's CNN


def test_lstm_param_reruns_only_train_sequence(proj):
    proj.set_params(**{"sequence.lstm.hidden": 8})
    try:
        assert ran_stages(proj.dvc("repro")) == ["train_sequence"]
    finally:
        _restore(proj)


def test_exp_run_sequence_model_cbm(proj):
    out = proj.dvc("exp", "run", "-S", "sequence.model=cbm")
    try:
        assert ran_stages(out) == ["train_sequence"], out
        assert json.loads((proj.root / "metrics/sequence.json").read_text())["model"] == "cbm"
        diff = proj.dvc("metrics", "diff", "--all")
        assert "metrics/sequence.json" in diff and "cbm" in diff, diff
    finally:
        _restore(proj)


def test_sequence_stages_on_real_ck(proj, sequences_dir):
    """Point sequence.dataset.path at real CK+ sequences: only the sequence stages rerun."""
    labels = pd.read_csv(sequences_dir / "labels.csv").iloc[:40]
    ck = proj.root.parent / "ck40"
    (ck / "frames").mkdir(parents=True, exist_ok=True)
    labels.to_csv(ck / "labels.csv", index=False)
    for seq in labels["sequence_id"]:
        if not (ck / "frames" / seq).exists():
            shutil.copytree(sequences_dir / "frames" / seq, ck / "frames" / seq)
    proj.set_params(**{"sequence.dataset.path": str(ck), "sequence.folds": 3})
    try:
        ran = ran_stages(proj.dvc("repro"))
        assert ran == ["ingest_sequences", "gray48_sequences", "landmarks_sequences", "features", "train_sequence"], ran
        m = json.loads((proj.root / "metrics/sequence.json").read_text())
        frames = sum(len(list((ck / "frames" / seq).iterdir())) for seq in labels["sequence_id"])
        assert m["sequences"] == 40 and m["frames"] == frames and len(m["per_fold"]) == 3
        assert m["subject_independent"]
        assert json.loads((proj.root / "metrics/ingest_sequences.json").read_text())["images"] == frames
    finally:
        _restore(proj)
