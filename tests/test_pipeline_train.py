"""DVC behaviour of train + evaluate on a throwaway copy of the project (tiny demo, 2 folds, 2 epochs)."""
import json
import re
import shutil
import sys

import pandas as pd
import pytest
import yaml

from conftest import REPO, make_project, ran_stages



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
        # the sequence features come from the bundled CNN (sequence.features.checkpoint): nothing to redo there
        assert not {"features", "train_sequence"} & set(ran), out
        name = re.search(r"Ran experiment\(s\): (\S+)", out).group(1)
        ev = json.loads((proj.root / "metrics/eval.json").read_text())
        assert ev["model"] == "landmarks"
        diff = proj.dvc("metrics", "diff", "--all")  # --all: listed even when the tiny demo ties
        rows = {tuple(line.split()[:2]) for line in diff.splitlines() if line.strip()}
        # the DVC metrics are the one-screen summaries (metrics/eval.json and train.json are plain outputs)
        assert ("metrics/results.json", "test_acc") in rows and ("metrics/results.json", "val_acc_mean") in rows, diff
        assert ("metrics/results.json", "model") in rows, diff  # baseline -> landmarks
        shown = proj.dvc("exp", "show", "--json")
        assert name in shown and '"landmarks"' in shown
    finally:
        _restore(proj)


# ---------------------------------------------------------------------------------------- sequences

def test_repro_runs_the_sequence_stages_on_the_demo_sequences(proj):
    ran = ran_stages(proj.first_repro)
    assert set(SEQUENCE_PREP + ["features", "train_sequence"]) <= set(ran), ran
    assert ran.index("features") > ran.index("landmarks_sequences")
    assert ran.index("train_sequence") > ran.index("features")
    m = json.loads((proj.root / "metrics/sequence.json").read_text())
    assert m["model"] == "lstm" and m["sequences"] == 16 and m["subject_independent"] and len(m["per_fold"]) == 4
    assert 0 <= m["mean"]["accuracy"] <= 1 and "k1" in m["by_first_k"]
    f = json.loads((proj.root / "metrics/features.json").read_text())
    assert f["frames"] == 64 and f["classes"] == ["angry", "happy", "sad", "surprise"]
    assert (proj.root / "data/sequences/model.pt").is_file() and (proj.root / "plots/sequence/confusion.png").is_file()
    lock = yaml.safe_load((proj.root / "dvc.lock").read_text())["stages"]
    assert "sequence.lstm.hidden" in lock["train_sequence"]["params"]["params.yaml"]  # leaf keys
    bundled = "src/ferpipe/weights/fer2013_vgg7.pt"                                  # the bundled CNN, not models
    assert any(d["path"] == bundled for d in lock["features"]["deps"])
    assert not any(d["path"] == "models" for d in lock["features"]["deps"])
    from ferpipe.store import read_attrs
    assert read_attrs(proj.root / "data/sequences/features.h5")["checkpoint"].endswith("fer2013_vgg7.pt")


def test_image_experiments_rerun_no_sequence_stage_unless_asked(proj):
    out = proj.dvc("exp", "run", "-S", "model=vgg")
    try:
        ran = ran_stages(out)
        assert {"train", "evaluate"} <= set(ran) and not preprocessing(ran), out
        assert not {"features", "train_sequence"} & set(ran), out
    finally:
        _restore(proj)
    # opting in: the sequence features from this pipeline's own CNN (models/), rerun after train
    out = proj.dvc("exp", "run", "-S", "sequence.features.checkpoint=models")
    try:
        ran = ran_stages(out)
        assert ran == ["features", "train_sequence"], out
        lock = yaml.safe_load((proj.root / "dvc.lock").read_text())["stages"]
        assert any(d["path"] == "models" for d in lock["features"]["deps"])
    finally:
        _restore(proj)


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
        assert "metrics/sequence_results.json" in diff and "cbm" in diff, diff
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


# ----------------------------------------------------------------------- recipes, -S, one-screen results

def _changed_lines(p, path="params.yaml"):
    diff = p.run("git", "diff", "-U0", "--", path).stdout.splitlines()
    return [ln for ln in diff if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]


def test_exp_run_changes_one_params_line_and_does_not_carry_into_the_next_run(proj):
    """Hydra composition: every `dvc exp run` writes params.yaml from conf/ + its own -S."""
    try:
        out = proj.dvc("exp", "run", "-S", "evaluate.tta=1")
        assert ran_stages(out) == ["evaluate"], out
        assert _changed_lines(proj) == ["-  tta: 0", "+  tta: 1"]          # the rest of the file untouched
        out = proj.dvc("exp", "run", "-S", "evaluate.seed=7")
        assert _changed_lines(proj) == ["-  seed: 2020", "+  seed: 7"]      # tta=1 did not carry over
        assert ran_stages(out) == ["evaluate"], out
        assert ran_stages(proj.dvc("repro")) == []                           # the workspace is that experiment's
        bad = proj.dvc("exp", "run", "-S", "evaluate.tta_agument.hflip=0", check=False)   # a misspelt key
        assert "tta_agument" in bad and not ran_stages(bad), bad
        assert _changed_lines(proj) == ["-  seed: 2020", "+  seed: 7"]
    finally:
        _restore(proj)


EXP_SHOW = ["--drop", ".*", "--keep", "^(Experiment|test_acc|test_macro_f1|val_acc_mean|params.yaml:(recipe|model))$"]


def test_exp_show_after_two_experiments_fits_120_columns_with_the_summary_first(proj):
    proj.dvc("exp", "remove", "-A")
    try:
        names = []
        for model in ("original", "landmarks"):
            out = proj.dvc("exp", "run", "-S", f"model={model}")
            names.append(re.search(r"Ran experiment\(s\): (\S+)", out).group(1))
            _restore(proj)
        # the README's one-screen command; COLUMNS wide, or rich would cut any table to the default 80
        proj.env["COLUMNS"] = "2000"
        try:
            res = proj.run(sys.executable, "-m", "dvc", "exp", "show", *EXP_SHOW, "--no-pager")
        finally:
            del proj.env["COLUMNS"]
        table = res.stdout
        assert f"dvc exp show --drop '.*' --keep '{EXP_SHOW[3]}'" in (REPO / "README.md").read_text()
        widths = [len(ln) for ln in table.splitlines()]
        assert max(widths) <= 120, "\n" + table
        assert all(n in table for n in names) and "test_acc" in table and "landmarks" in table, table
        header = next(ln for ln in table.splitlines() if "Experiment" in ln)
        assert header.index("test_acc") < header.index("model"), header     # the summary first
        shown = proj.dvc("metrics", "show")
        assert shown.splitlines()[0].split()[:2] == ["Path", "model"] or "test_acc" in shown.splitlines()[0], shown
        assert "metrics/results.json" in shown and "metrics/eval.json" not in shown and "per_class" not in shown
        assert max(len(ln) for ln in shown.splitlines()) <= 240, shown   # both summaries side by side (was 2,970)
        # the details stay one command away
        detail = proj.dvc("metrics", "show", "metrics/eval.json")
        assert "balanced_accuracy" in detail, detail
    finally:
        _restore(proj)


def test_plots_show_uses_a_local_vega_template(proj, tmp_path):
    """With the template setup.sh builds from the npm packages (here from stand-in tarballs: no network),
    `dvc plots show` writes a page that loads no script from a CDN; PNG learning curves are plots too."""
    import io
    import tarfile
    from ferpipe.vega_offline import PACKAGES, main as build
    tarballs = []
    for name in PACKAGES:
        tgz = tmp_path / f"{name}.tgz"
        with tarfile.open(tgz, "w:gz") as tar:
            for member, text in (("package/package.json", json.dumps({"name": name, "version": "0.0.1",
                                                                         "jsdelivr": f"build/{name}.min.js"})),
                                 (f"package/build/{name}.min.js", f"window.stand_in_{name.replace('-', '_')} = 1;")):
                info = tarfile.TarInfo(member)
                info.size = len(text.encode())
                tar.addfile(info, io.BytesIO(text.encode()))
        tarballs.append(str(tgz))
    template = tmp_path / "dvc_plots_template.html"
    build(tarballs + ["--out", str(template)])
    proj.dvc("config", "--local", "plots.html_template", str(template))
    try:
        proj.dvc("plots", "show", "-o", str(tmp_path / "page"))
        page = (tmp_path / "page" / "index.html").read_text()
        assert "window.stand_in_vega_embed = 1;" in page and "vegaEmbed(" in page
        assert "cdn.jsdelivr" not in page and "<script src=" not in page
        assert "curves.png" in page                                           # the static learning curves
    finally:
        proj.dvc("config", "--local", "--unset", "plots.html_template")
