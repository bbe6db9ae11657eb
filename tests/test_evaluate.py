"""Evaluation: metrics by hand, predictions table, fold ensembles, TTA, the ensemble command."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from ferpipe.data.tensors import load_data
from ferpipe.evaluate.ensemble import ensemble, read_csv
from ferpipe.evaluate.metrics import classification_metrics, predictions_table, read_predictions
from ferpipe.evaluate.plots import worst_errors
from ferpipe.evaluate.run import predict, run_evaluate, select_checkpoints
from ferpipe.models.checkpoint import load_checkpoint
from ferpipe.models.inputs import InputSpec
from test_train import CLASSES, make_artifacts, train

REPO = Path(__file__).resolve().parents[1]


def test_metrics_match_a_hand_computation():
    y = np.array([0, 0, 1, 1, 2, 3])
    probs = np.array([
        [0.7, 0.2, 0.05, 0.05],   # 0 ok
        [0.2, 0.6, 0.1, 0.1],     # 0 -> 1 (0 is 2nd)
        [0.1, 0.8, 0.05, 0.05],   # 1 ok
        [0.5, 0.2, 0.3, 0.0],     # 1 -> 0 (1 is 3rd)
        [0.1, 0.1, 0.7, 0.1],     # 2 ok
        [0.4, 0.3, 0.2, 0.1],     # 3 -> 0 (3 is 4th)
    ])
    m = classification_metrics(y, probs, ["a", "b", "c", "d"])
    assert m["n"] == 6 and m["accuracy"] == pytest.approx(3 / 6)
    # recall a 1/2, b 1/2, c 1, d 0 -> balanced 0.5; precision a 1/3, b 1/2, c 1, d 0
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["per_class"]["a"] == pytest.approx({"precision": 1 / 3, "recall": 0.5, "f1": 0.4, "support": 2})
    assert m["per_class"]["b"]["f1"] == pytest.approx(0.5) and m["per_class"]["d"]["f1"] == 0
    assert m["macro_f1"] == pytest.approx((0.4 + 0.5 + 1 + 0) / 4)
    assert m["top2"] == pytest.approx(4 / 6) and m["top3"] == pytest.approx(5 / 6)
    two = classification_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.4, 0.6]]), ["x", "y"])
    assert "top2" not in two and "top3" not in two and two["accuracy"] == 1.0
    three = classification_metrics(np.array([0, 1, 2]), np.eye(3), ["x", "y", "z"])
    assert "top2" in three and "top3" not in three


def test_predictions_table_round_trip_and_worst_errors():
    y = np.array([0, 1, 2, 1])
    probs = np.array([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.95, 0.0, 0.05], [0.3, 0.3, 0.4]])
    t = predictions_table(["a", "b", "c", "d"], y, probs, CLASSES)
    assert list(t.columns[:5]) == ["id", "actual", "predicted", "correct", "confidence"]
    assert t["predicted"].tolist() == ["positive", "positive", "neutral", "negative"]
    ids, y2, p2, classes = read_predictions(t)
    assert classes == CLASSES and y2.tolist() == y.tolist()
    np.testing.assert_allclose(p2, probs)
    assert worst_errors(y, probs, 2).tolist() == [2, 0]  # most confident wrong first; row 1 is right


def test_ensemble_averages_by_id_and_checks_rows(tmp_path):
    y = np.array([0, 1, 2])
    p1 = np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]])
    p2 = np.array([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    a = predictions_table(["i0", "i1", "i2"], y, p1, CLASSES)
    b = predictions_table(["i0", "i1", "i2"], y, p2, CLASSES).iloc[[2, 0, 1]]  # other row order
    table, m = ensemble([a, b], names=["a", "b"])
    np.testing.assert_allclose(table[[f"prob_{c}" for c in CLASSES]].to_numpy(), (p1 + p2) / 2, atol=1e-6)
    assert m["members"] == {"a": pytest.approx(2 / 3), "b": pytest.approx(2 / 3)}
    assert m["accuracy"] == pytest.approx(2 / 3)   # row 0: 0.4/0.5 -> positive (wrong), rows 1, 2 right
    _, mw = ensemble([a, b], weights=[3, 1], names=["a", "b"])
    assert mw["accuracy"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not the same rows"):
        ensemble([a, b.iloc[:2]], names=["a", "b"])
    c = b.copy()
    c["actual"] = ["neutral", "neutral", "neutral"]
    with pytest.raises(ValueError, match="actual labels differ"):
        ensemble([a, c], names=["a", "c"])
    # the command line
    a.to_csv(tmp_path / "a.csv", index=False)
    b.to_csv(tmp_path / "b.csv", index=False)
    res = subprocess.run([sys.executable, str(REPO / "stages/ensemble.py"), str(tmp_path / "a.csv"),
                          str(tmp_path / "b.csv"), "--out", str(tmp_path / "ens.json"),
                          "--predictions-out", str(tmp_path / "ens.csv")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "ensemble:" in res.stdout and "accuracy" in res.stdout
    saved = json.loads((tmp_path / "ens.json").read_text())
    assert saved["accuracy"] == pytest.approx(2 / 3) and len(read_csv(tmp_path / "ens.csv")) == 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    art = make_artifacts(root)
    train(art, root, "soft", folds=[0, 1], max_epochs=4, lr=3e-3, batch_size=16)
    return art, root


def _evaluate(art, root, out, **prm):
    return run_evaluate({"model": "soft", "evaluate": {"threads": 1, "device": "cpu", **prm}}, str(root / "models"),
                        art["split"], art["gray48"], art["guides"], str(out / "eval.json"), str(out / "pred.csv"),
                        str(out / "confusion.png"), str(out / "errors.png"))


def test_evaluate_averages_the_fold_models_on_test_rows_only(trained, tmp_path):
    art, root = trained
    m = _evaluate(art, root, tmp_path)
    assert m["members"] == "folds" and m["checkpoints"] == ["fold0.pt", "fold1.pt"] and m["tta"] == 0
    assert m["n"] == 30 and set(m) >= {"accuracy", "macro_f1", "balanced_accuracy", "top2", "per_class"}
    assert "top3" not in m  # 3 classes
    pred = pd.read_csv(tmp_path / "pred.csv", dtype={"id": str})
    test_ids = set(art["table"].loc[art["table"]["split"] == "test", "id"])
    assert set(pred["id"]) == test_ids and len(pred) == 30
    # the probabilities are the mean of the two fold models' softmax
    data = load_data(art["split"], "soft", gray48=art["gray48"], guides_dir=art["guides"], splits=("test",))
    rows = data.test_rows()
    probs = []
    for k in (0, 1):
        model, info = load_checkpoint(root / "models" / f"fold{k}.pt")
        probs.append(predict(model, data, rows, InputSpec.from_dict(info["meta"]["input"])))
    np.testing.assert_allclose(pred[[f"prob_{c}" for c in CLASSES]].to_numpy(), np.mean(probs, 0), atol=1e-5)
    assert m["accuracy"] == pytest.approx((np.mean(probs, 0).argmax(1) == data.targets[rows].numpy()).mean())
    assert json.loads((tmp_path / "eval.json").read_text())["accuracy"] == m["accuracy"]
    for png in ("confusion.png", "errors.png"):
        img = cv2.imread(str(tmp_path / png))
        assert img is not None and img.shape[0] > 100 and img.std() > 5


def test_evaluate_prefers_final_and_tta_changes_probabilities(trained, tmp_path):
    art, root = trained
    models = root / "models"
    assert select_checkpoints(models) == ("folds", [models / "fold0.pt", models / "fold1.pt"])
    with pytest.raises(FileNotFoundError, match="final"):
        select_checkpoints(models, "final")
    plain = _evaluate(art, root, tmp_path / "plain")
    tta = _evaluate(art, root, tmp_path / "tta", tta=3)
    assert tta["tta"] == 3
    p0 = pd.read_csv(tmp_path / "plain/pred.csv")["prob_neutral"].to_numpy()
    p3 = pd.read_csv(tmp_path / "tta/pred.csv")["prob_neutral"].to_numpy()
    assert not np.allclose(p0, p3)
    assert _evaluate(art, root, tmp_path / "tta2", tta=3)["accuracy"] == tta["accuracy"]  # seeded
    (models / "final.pt").write_bytes((models / "fold1.pt").read_bytes())
    try:
        final = _evaluate(art, root, tmp_path / "final")
        assert final["members"] == "final" and final["checkpoints"] == ["final.pt"]
        assert _evaluate(art, root, tmp_path / "f2", members="folds")["accuracy"] == plain["accuracy"]
    finally:
        (models / "final.pt").unlink()


def test_evaluate_stage_help_and_missing_models(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "stages/evaluate.py"), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "test split" in res.stdout
    with pytest.raises(FileNotFoundError, match="run the train stage"):
        select_checkpoints(tmp_path)


def test_ten_crops_are_the_corners_the_centre_and_their_mirrors():
    from ferpipe.evaluate.run import resolve_params, ten_crops
    x = torch.arange(2 * 10 * 10, dtype=torch.float32).view(2, 1, 10, 10)
    views = ten_crops(x)                      # 90% of 10 px: 9 px crops
    assert len(views) == 10 and all(v.shape == (2, 1, 9, 9) for v in views)
    assert torch.equal(views[0], x[..., :9, :9]) and torch.equal(views[3], x[..., 1:, 1:])
    assert torch.equal(views[4], x[..., 0:9, 0:9])  # centre: offset (10 - 9) // 2 = 0
    assert all(torch.equal(views[i + 5], views[i].flip(-1)) for i in range(5))
    with pytest.raises(ValueError, match="tta_mode must be one of random, tencrop"):
        resolve_params({"tta_mode": "fivecrop"})
