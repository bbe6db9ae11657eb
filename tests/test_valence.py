"""Valence / arousal (task valence_arousal): the CCC loss, and CNNs trained and evaluated on it through the
stage scripts, then applied by the recognition API.

No real valence/arousal data is here (no AffectNet): the pipeline test lays real FER-2013 faces out as
AffectNet's Manually_Annotated_Images/<expression>/<file> with training.csv / validation.csv rows whose
valence and arousal are GENERATED from the FER-2013 class (happy +0.7 valence, angry -0.5 valence and
+0.6 arousal, ... plus noise: bench/valence_generated.py's ``affectnet_layout``, which the README's
numbers come from), so a CNN has something to learn. The images are real, the values are not.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, load_stage
from ferpipe.data.tensors import REGRESSION_TARGETS, load_data, read_split
from ferpipe.evaluate.metrics import headline, regression_metrics
from ferpipe.evaluate.run import predict
from ferpipe.models.checkpoint import load_checkpoint, regression_scale
from ferpipe.models.inputs import InputSpec
from ferpipe.recognize import Recognizer, RecognizeError
from ferpipe.train.loop import Concordance, MeanSquared, concordance
from ferpipe.train.run import run_train


def _bench():
    spec = importlib.util.spec_from_file_location("valence_generated", REPO / "bench" / "valence_generated.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BENCH = _bench()
VA = BENCH.VA   # the generated (valence, arousal) of each FER-2013 class


# ---------------------------------------------------------------------------- the CCC loss

def test_ccc_loss_is_zero_for_perfect_predictions_and_about_one_for_uncorrelated():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(4000, 2, generator=g)
    y -= y.mean(0)   # centred: -y then has the same mean, and CCC(-y, y) is exactly -1
    ident = lambda x: x  # noqa: E731  the "model": its input is the prediction
    loss, _ = Concordance()(ident, (y.clone(),), y)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    loss, _ = Concordance()(ident, (torch.randn(4000, 2, generator=g),), y)
    assert float(loss) == pytest.approx(1.0, abs=0.05)
    # unlike Pearson r, a shifted or scaled answer is not concordant
    shifted = concordance(y + 1.0, y)
    assert (shifted < 0.7).all() and torch.allclose(concordance(-y, y), torch.tensor([-1.0, -1.0]), atol=1e-5)
    # the numpy figure of the evaluate stage agrees with the torch loss
    p = y + 0.5 * torch.randn(4000, 2, generator=g)
    m = regression_metrics(y.numpy(), p.numpy(), REGRESSION_TARGETS)
    np.testing.assert_allclose([m["ccc_valence"], m["ccc_arousal"]], concordance(p, y).numpy(), atol=1e-5)
    assert m["rmse_valence"] == pytest.approx(np.sqrt(m["mse_valence"]))
    assert 0 <= m["sagr_valence"] <= 1 and "sagr_arousal" not in m
    assert MeanSquared.classify is False and Concordance.classify is False


# ---------------------------------------------------------------------------- real images, generated values

@pytest.fixture(scope="module")
def run(fer_dir, tmp_path_factory):
    """ingest -> gray48 -> split (valence_arousal) -> train (baseline, fold 0 of 3, 10 epochs) -> evaluate,
    by the stage scripts on 400 real FER-2013 training faces (80 per class) and 80 test faces (PublicTest)
    whose valence/arousal values are GENERATED from their class (no real annotations here; see the module doc).
    10 epochs, not 2-3: after 3 epochs the concordance on the training rows was still ~0.003."""
    tmp = tmp_path_factory.mktemp("valence")
    data = BENCH.affectnet_layout(fer_dir, tmp / "affectnet", train_per_class=80, test_per_class=16)
    params = tmp / "params.yaml"
    params.write_text(
        "recipe: test\ntask: valence_arousal\nmodel: baseline\n"
        f"dataset: {{format: affectnet, path: {data}, root: {data / 'Manually_Annotated_Images'}}}\n"
        "ingest: {size: 48, workers: 1, max_file_mb: 0}\ngray48: {size: 48}\n"
        "split: {folds: 3, seed: 2020, test: [val], dataset_folds: true}\n"
        "train: {folds: [0], final: false, max_epochs: 10, patience: 0, select: loss, batch_size: 32, lr: 0.001,\n"
        "        augment: {hflip: 0.5, degrees: 0, scale: [1, 1], translate: 0},\n"
        "        threads: 1, log_every: 0, progress: false, device: cpu}\n"
        "evaluate: {threads: 1, device: cpu}\n")
    p = {k: str(tmp / v) for k, v in {
        "ingest": "ingest/images.h5", "manifest": "ingest/manifest.csv", "gray48": "gray48/images.h5",
        "split": "split/split.csv", "models": "models", "train": "metrics/train.json", "eval": "metrics/eval.json",
        "results": "metrics/results.json", "pred": "plots/predictions.csv", "conf": "plots/confusion.png",
        "errors": "plots/errors.png", "curves": "plots/curves.png", "guides": "guides"}.items()}
    prm = ["--params", str(params)]
    load_stage("ingest").main(prm + ["--out", p["ingest"], "--manifest", p["manifest"], "--rejects",
                                     str(tmp / "ingest/rejects.csv"), "--metrics", str(tmp / "metrics/ingest.json"),
                                     "--sheet", "", "--quiet"])
    load_stage("gray48").main(prm + ["--images", p["ingest"], "--out", p["gray48"], "--sheet", ""])
    load_stage("split").main(prm + ["--manifest", p["manifest"], "--out", p["split"],
                                    "--summary", str(tmp / "metrics/split.json")])
    common = prm + ["--split", p["split"], "--gray48", p["gray48"], "--guides", p["guides"], "--models", p["models"]]
    load_stage("train").main(common + ["--metrics", p["train"], "--live", "", "--curves", p["curves"]])
    load_stage("evaluate").main(common + ["--metrics", p["eval"], "--results", p["results"], "--train-metrics",
                                          p["train"], "--predictions", p["pred"], "--confusion", p["conf"],
                                          "--errors", p["errors"]])
    return tmp, p


def test_split_has_valence_arousal_and_no_class_target(run):
    tmp, p = run
    table, names = read_split(p["split"])
    assert names == ["valence", "arousal"] and (table["target"] == -1).all()
    assert table["split"].value_counts().to_dict() == {"train": 400, "test": 80}
    summary = json.loads((tmp / "metrics/split.json").read_text())
    assert summary["task"] == "valence_arousal" and summary["classes"] == []


def test_training_writes_regression_checkpoints_and_metrics(run):
    tmp, p = run
    train = json.loads(Path(p["train"]).read_text())
    assert train["task"] == "valence_arousal" and train["classes"] == ["valence", "arousal"]
    fold = train["folds"]["0"]
    assert set(fold) == {"val_loss", "best_epoch", "epochs", "train_rows", "val_rows"}  # no accuracy, no chance
    assert np.isfinite(fold["val_loss"]) and "folds_at_chance" not in train and "val_acc_mean" not in train
    assert train["val_loss_mean"] == pytest.approx(fold["val_loss"]) and fold["val_loss"] < 1.0  # mse of z-scores
    for name in ("fold0.pt",):
        model, info = load_checkpoint(Path(p["models"]) / name)
        assert info["num_classes"] == 2 and info["classes"] == ["valence", "arousal"]
        meta = info["meta"]
        assert meta["task"] == "valence_arousal" and meta["loss"] == "mse"
        mean, std = regression_scale(info)
        # the training rows' statistics: the generated values' class means (x 1/5 each) and spread
        assert mean[0] == pytest.approx(np.mean([v for v, _ in VA.values()]), abs=0.05)
        assert mean[1] == pytest.approx(np.mean([a for _, a in VA.values()]), abs=0.05)
        assert ((std > 0.2) & (std < 0.8)).all()
    assert Path(p["curves"]).stat().st_size > 10_000


def test_evaluate_reports_affectnet_figures_and_the_model_learned(run):
    """Real FER-2013 images, generated valence/arousal: the figures exist and are finite, the model learned."""
    tmp, p = run
    ev = json.loads(Path(p["eval"]).read_text())
    for t in ("valence", "arousal"):
        for fig in ("rmse", "pearson", "ccc", "mse"):
            assert np.isfinite(ev[f"{fig}_{t}"]), (fig, t, ev)
    assert np.isfinite(ev["sagr_valence"]) and ev["n"] == 80 and ev["members"] == "folds"
    assert "accuracy" not in ev and ev["rmse"] == pytest.approx(np.mean([ev["rmse_valence"], ev["rmse_arousal"]]))
    res = json.loads(Path(p["results"]).read_text())
    assert list(res) == ["test_rmse", "test_ccc", "val_loss_mean", "val_loss_std", "model", "recipe"]
    assert res["test_rmse"] == round(ev["rmse"], 4) and res["test_ccc"] == round(ev["ccc"], 4)
    assert res == headline(ev, json.loads(Path(p["train"]).read_text()), "test")
    pred = pd.read_csv(p["pred"], dtype={"id": str})
    assert list(pred.columns) == ["id", "actual_valence", "actual_arousal", "predicted_valence", "predicted_arousal"]
    assert len(pred) == 80 and np.isfinite(pred.iloc[:, 1:].to_numpy()).all()
    for png in ("conf", "errors"):  # the scatter at the confusion path, the largest errors
        assert Path(p[png]).stat().st_size > 10_000
    # the model learned something: concordance above 0 on the training rows (the fold model, original scale)
    model, info = load_checkpoint(Path(p["models"]) / "fold0.pt")
    data = load_data(p["split"], "baseline", gray48=p["gray48"], guides_dir=p["guides"], splits=("train",))
    rows = data.train_rows()
    out = predict(model, data, rows, InputSpec.from_dict(info["meta"]["input"]), scale=regression_scale(info))
    m = regression_metrics(data.targets[rows].numpy(), out, ["valence", "arousal"])
    print(f"train rows: ccc {m['ccc']:.3f} (valence {m['ccc_valence']:.3f}, arousal {m['ccc_arousal']:.3f}); "
          f"test: rmse {ev['rmse']:.3f} ccc {ev['ccc']:.3f}")
    assert m["ccc"] > 0 and m["pearson_valence"] > 0


def test_recognizer_returns_valence_and_arousal(run):
    tmp, p = run
    fer = Recognizer(p["models"], threads=1)
    assert fer.regression and fer.classes == ["valence", "arousal"] and "targets" in repr(fer)
    pred = pd.read_csv(p["pred"], dtype={"id": str})
    row = pred.iloc[0]
    image = tmp / "affectnet/Manually_Annotated_Images" / row["id"]
    table = fer.recognize_batch([image], crops=True)
    assert {"valence", "arousal"} <= set(table.columns)
    assert not {"label", "probability"} & set(table.columns)
    v, a = float(table["valence"].iloc[0]), float(table["arousal"].iloc[0])
    assert -1.5 < v < 1.5 and -1.5 < a < 1.5
    # the same face crop, the same numbers as the evaluate stage (one preprocessing, one de-standardization)
    assert v == pytest.approx(row["predicted_valence"], abs=1e-4) and a == pytest.approx(row["predicted_arousal"], abs=1e-4)
    face = fer.recognize(image, crops=True).faces[0]
    assert face.values == pytest.approx({"valence": v, "arousal": a}) and face.label == "" and face.probs == {}
    with pytest.raises(RecognizeError, match="predict"):
        fer.classify(np.zeros((1, 48, 48), np.uint8))
    from ferpipe.export import ExportError, export_model
    with pytest.raises(ExportError, match="valence/arousal model"):   # its graph would end in a softmax
        export_model(Path(p["models"]) / "fold0.pt", "onnx", tmp / "va.onnx")


def test_ccc_loss_and_param_checks_on_the_regression_split(run, tmp_path):
    """train.loss=ccc trains (1 - CCC as the loss) and is recorded; select must be loss; mse/ccc only for regression."""
    _, p = run
    params = {"model": "baseline", "task": "valence_arousal",
              "train": {"folds": "none", "final": True, "max_epochs": 1, "select": "loss", "loss": "ccc", "threads": 1,
                        "log_every": 0, "progress": False, "device": "cpu", "batch_size": 64}}
    m = run_train(params, p["split"], p["gray48"], p["guides"], str(tmp_path / "models"), None, None)
    assert 0 <= m["final"]["train_loss"] <= 2
    assert load_checkpoint(tmp_path / "models/final.pt")[1]["meta"]["loss"] == "ccc"
    params["train"]["select"] = "balanced_accuracy"
    with pytest.raises(ValueError, match="train.select must be loss") as err:
        run_train(params, p["split"], p["gray48"], p["guides"], str(tmp_path / "m2"), None, None)
    assert "\n" not in str(err.value)
    params["train"].update(select="loss", loss="huber")
    with pytest.raises(ValueError, match="train.loss must be one of auto, mse, ccc"):
        run_train(params, p["split"], p["gray48"], p["guides"], str(tmp_path / "m3"), None, None)


def test_a_regression_loss_on_a_classification_split_is_an_error(tmp_path):
    from test_train import make_artifacts, train
    art = make_artifacts(tmp_path)
    with pytest.raises(ValueError, match="train.loss mse is for task valence_arousal"):
        train(art, tmp_path, loss="mse")


def test_ferpipe_recognize_writes_valence_and_arousal(run, tmp_path, capsys):
    """The command line's CSV and JSON tables carry the values; its short table shows them."""
    from ferpipe.cli import main
    tmp, p = run
    pred = pd.read_csv(p["pred"], dtype={"id": str})
    image = str(tmp / "affectnet/Manually_Annotated_Images" / pred["id"].iloc[1])
    for out in ("t.csv", "t.json"):
        assert main(["recognize", image, "--crops", "--model", p["models"], "--quiet", "--threads", "1",
                     "--out", str(tmp_path / out)]) == 0
    table = pd.read_csv(tmp_path / "t.csv")
    assert {"valence", "arousal"} <= set(table.columns) and "label" not in table.columns
    assert table["valence"].iloc[0] == pytest.approx(pred["predicted_valence"].iloc[1], abs=1e-4)
    rows = json.loads((tmp_path / "t.json").read_text())
    assert rows[0]["arousal"] == pytest.approx(pred["predicted_arousal"].iloc[1], abs=1e-4)
    capsys.readouterr()
    assert main(["recognize", image, "--crops", "--model", p["models"], "--quiet", "--threads", "1"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ["input", "face_id", "valence", "arousal", "reason"]


def test_tensor_data_standardizes_regression_targets(tmp_path):
    """A valence/arousal split: float targets [N, 2] kept on their scale, batches standardized with the
    statistics of the rows given (the training rows of a run); no class counts."""
    from ferpipe.store import write_h5
    n = 12
    rng = np.random.default_rng(0)
    write_h5(tmp_path / "g.h5", {"images": rng.integers(0, 255, (n, 48, 48), dtype=np.uint8),
                                 "ids": np.array([f"i{k}" for k in range(n)])})
    va = rng.uniform(-1, 1, (n, 2)).round(3)
    pd.DataFrame({"id": [f"i{k}" for k in range(n)], "index": range(n), "valence": va[:, 0], "arousal": va[:, 1],
                  "target": -1, "target_name": "", "split": ["train"] * 8 + ["test"] * 4,
                  "fold": [0, 1] * 4 + [-1] * 4}).to_csv(tmp_path / "s.csv", index=False)
    data = load_data(tmp_path / "s.csv", "baseline", gray48=tmp_path / "g.h5", guides_dir=tmp_path)
    assert data.regression and data.classes == ["valence", "arousal"] and data.targets.dtype == torch.float32
    np.testing.assert_allclose(data.targets.numpy(), va, atol=1e-6)
    mean, std = data.standardize_targets(data.train_rows())
    np.testing.assert_allclose(mean, va[:8].mean(0), atol=1e-6)
    np.testing.assert_allclose(std, va[:8].std(0), atol=1e-6)
    *_, y = data.batch(data.test_rows())
    np.testing.assert_allclose(y.numpy(), (va[8:] - va[:8].mean(0)) / va[:8].std(0), atol=1e-5)
    with pytest.raises(ValueError, match="no classes"):
        data.class_counts(data.train_rows())
