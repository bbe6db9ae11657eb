"""One-screen results and what training shows: the headline metrics file, learning-curve PNGs, the
chance-level warning, the progress bar and epoch lines."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import fer_slice, load_stage
from ferpipe.data.tensors import load_data
from ferpipe.evaluate.metrics import headline
from ferpipe.evaluate.plots import curves_png
from ferpipe.models import build_model
from ferpipe.store import write_h5
from ferpipe.train.loop import FitConfig, Runtime, fit
from ferpipe.train.run import chance_check, run_train

CPU1 = Runtime(torch.device("cpu"), threads=1)
FER3 = ("angry", "happy", "neutral")


def fer_artifacts(fer_dir: Path, root: Path, per_class: int = 30, folds: int = 2) -> dict:
    """gray48.h5 + split.csv from the first images of three real FER-2013 classes (train) and PublicTest."""
    tr, tr_labels = fer_slice(fer_dir, "train", per_class, FER3)
    te, te_labels = fer_slice(fer_dir, "test", 10, FER3)
    images = np.concatenate([tr, te])
    labels = tr_labels + te_labels
    n = len(images)
    ids = np.array([f"fer{i:04d}" for i in range(n)])
    write_h5(root / "gray48.h5", {"images": images, "ids": ids})
    target = np.array([FER3.index(c) for c in labels])
    split = np.array(["train"] * len(tr) + ["test"] * len(te))
    fold = np.where(split == "train", np.arange(n) % folds, -1)
    pd.DataFrame({"id": ids, "index": np.arange(n), "target": target, "target_name": labels, "split": split,
                  "fold": fold}).to_csv(root / "split.csv", index=False)
    (root / "guides").mkdir(exist_ok=True)
    return {"split": str(root / "split.csv"), "gray48": str(root / "gray48.h5"), "guides": str(root / "guides")}


def test_headline_is_small_and_counts_runs_at_chance():
    test = {"accuracy": 0.691234, "macro_f1": 0.66401, "model": "vgg", "per_class": {"a": {}}, "n": 3543}
    train = {"val_acc_mean": 0.7012345, "val_acc_std": 0.0123, "folds_at_chance": [2], "final": {"at_chance": True}}
    h = headline(test, train, "cpu60")
    assert h == {"test_acc": 0.6912, "test_macro_f1": 0.664, "val_acc_mean": 0.7012, "val_acc_std": 0.0123,
                 "runs_at_chance": 2, "model": "vgg", "recipe": "cpu60"}
    h = headline(test, {"folds_at_chance": [], "final": {"at_chance": False}}, None)   # no cross-validation
    assert h == {"test_acc": 0.6912, "test_macro_f1": 0.664, "runs_at_chance": 0, "model": "vgg"}


def test_chance_check_on_real_fer_rows(fer_dir, tmp_path, capsys):
    art = fer_artifacts(fer_dir, tmp_path, per_class=20)
    data = load_data(art["split"], "baseline", gray48=art["gray48"], guides_dir=art["guides"], splits=("train",))
    rows = data.val_rows(0)
    share = float(data.class_counts(rows).max()) / len(rows)
    assert chance_check(data, rows, share, "fold 0") == {"chance": pytest.approx(share), "at_chance": True}
    out = capsys.readouterr().out
    assert out.startswith("WARNING: fold 0 ended at chance level") and "Runs that never learn" in out
    assert chance_check(data, rows, share + 1 / len(rows), "fold 0")["at_chance"] is False
    assert chance_check(data, rows, share, "fold 0", balanced=0.4)["at_chance"] is False   # learned a balanced answer
    assert chance_check(data, rows, share, "fold 0", balanced=1 / 3)["at_chance"] is True
    assert capsys.readouterr().out.count("WARNING") == 1


def test_train_and_evaluate_stages_write_curves_chance_flags_and_the_headline(fer_dir, tmp_path):
    """Real FER-2013 rows, the stage scripts by hand: folds at chance level are flagged in train.json and
    counted in results.json (the summary, in reading order); curves.png has every run."""
    art = fer_artifacts(fer_dir, tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text("model: baseline\ntask: classes\nrecipe: test\n"
                      "train: {folds: all, final: true, max_epochs: 2, patience: 0, threads: 1, log_every: 0}\n"
                      "evaluate: {threads: 1}\n")
    common = ["--params", str(params), "--split", art["split"], "--gray48", art["gray48"], "--guides", art["guides"],
              "--models", str(tmp_path / "models")]
    load_stage("train").main(common + ["--metrics", str(tmp_path / "train.json"), "--live", "",
                                       "--curves", str(tmp_path / "curves.png")])
    train = json.loads((tmp_path / "train.json").read_text())
    assert set(train["folds"]) == {"0", "1"} and all("at_chance" in f for f in train["folds"].values())
    assert train["folds_at_chance"] == [int(k) for k, f in train["folds"].items() if f["at_chance"]]
    for f in train["folds"].values():   # 2 epochs on 60 rows: a fold may still give a constant answer
        assert f["at_chance"] == (f["val_acc"] <= f["chance"] + 1e-6 and f["val_bal_acc"] <= 1 / 3 + 1e-6), f
    png = cv2.imread(str(tmp_path / "curves.png"))
    assert png is not None and png.shape[1] > 600
    load_stage("evaluate").main(common + ["--metrics", str(tmp_path / "eval.json"), "--results",
                                          str(tmp_path / "results.json"), "--train-metrics", str(tmp_path / "train.json"),
                                          "--predictions", "", "--confusion", "", "--errors", ""])
    res = json.loads((tmp_path / "results.json").read_text())
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert list(res) == ["test_acc", "test_macro_f1", "val_acc_mean", "val_acc_std", "runs_at_chance", "model", "recipe"]
    assert res["test_acc"] == round(ev["accuracy"], 4) and res["val_acc_mean"] == round(train["val_acc_mean"], 4)
    assert res["runs_at_chance"] == len(train["folds_at_chance"]) + int(train["final"]["at_chance"])
    assert (res["model"], res["recipe"]) == ("baseline", "test")


def test_curves_png_draws_folds_and_a_final_model(tmp_path):
    hist = {"fold0": [{"epoch": e, "train_loss": 1 / e, "train_acc": 0.1 * e, "val_loss": 1.2 / e, "val_acc": 0.09 * e}
                      for e in range(1, 6)],
            "final": [{"epoch": e, "train_loss": 1 / e, "train_acc": 0.1 * e} for e in range(1, 4)]}
    curves_png(tmp_path / "c.png", hist, title="t")
    img = cv2.imread(str(tmp_path / "c.png"))
    assert img.shape[0] > 300 and img.shape[1] > 800 and img.std() > 10


def test_fit_shows_a_bar_with_eta_and_prints_every_n_epochs(fer_dir, tmp_path, capsys):
    art = fer_artifacts(fer_dir, tmp_path, per_class=16)
    data = load_data(art["split"], "baseline", gray48=art["gray48"], guides_dir=art["guides"], splits=("train",))
    torch.manual_seed(0)
    cfg = FitConfig(max_epochs=5, patience=0, batch_size=8, log_every=2, progress=True)
    fit(build_model("baseline", 3), data, data.train_rows(exclude_fold=0), data.val_rows(0), cfg, CPU1, desc="fold 0")
    cap = capsys.readouterr()
    lines = [ln for ln in cap.out.splitlines() if ": train loss" in ln]          # epoch lines: stdout
    assert [ln.split(":")[0] for ln in lines] == [f"fold 0 epoch {e}/5" for e in (1, 2, 4, 5)], lines
    bar = [ln for ln in cap.err.replace("\r", "\n").splitlines() if "fold 0 epoch 3/5" in ln]  # the bar: stderr
    assert any("ETA" in ln and "val loss" in ln and "batch" in ln for ln in bar), bar[-3:]
