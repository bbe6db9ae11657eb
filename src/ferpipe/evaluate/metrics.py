"""Classification metrics from predicted probabilities, and the predictions table.

``classification_metrics(y, probs, classes)`` -> accuracy, macro_f1 (over the classes present in y
or predicted), balanced_accuracy (mean
per-class recall over the classes present in y), auc (binary ROC AUC, or one-vs-rest macro over the
classes present with both outcomes), top2/top3 (only when there are more than 2/3 classes),
per-class precision/recall/f1/support, n. ``regression_metrics`` -> per target mse, rmse, Pearson r,
CCC (and for valence the sign agreement) and their means. Every value is a plain float/int, ready
for JSON. Images and sequences use these alike.

Predictions CSV columns: id, actual, predicted (class names, for DVC's confusion template),
correct, confidence (probability of the predicted class), prob_<class> per class; for a regression
(``regression_table``): id, actual_<target>, predicted_<target> per target.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import (confusion_matrix, f1_score,
                             precision_recall_fscore_support, roc_auc_score, top_k_accuracy_score)

PROB_PREFIX = "prob_"


def classification_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    y = np.asarray(y, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (len(y), len(classes)):
        raise ValueError(f"probs must be [n={len(y)}, classes={len(classes)}], got {probs.shape}")
    if len(y) == 0:
        raise ValueError("no rows to evaluate")
    labels = np.arange(len(classes))
    pred = probs.argmax(1)
    out = {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()),
        # over the classes in y or predicted: a class absent from a (sequence) fold's test rows and never
        # predicted there would otherwise count as F1 0 and pull the fold's mean down
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        # the mean recall over the classes in y (sklearn's balanced_accuracy_score, without its warning when a
        # sequence fold's test rows lack a class that is predicted)
        "balanced_accuracy": float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)])),
        "auc": auc_score(y, probs),
    }
    for k in (2, 3):
        if len(classes) > k:
            out[f"top{k}"] = float(top_k_accuracy_score(y, probs, k=k, labels=labels))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    out["per_class"] = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                        for i, c in enumerate(classes)}
    return out


def auc_score(y: np.ndarray, probs: np.ndarray) -> float:
    """Binary ROC AUC (2 classes) or one-vs-rest macro AUC over the classes present with both outcomes."""
    K = probs.shape[1]
    if K == 2:
        return float(roc_auc_score(y == 1, probs[:, 1])) if 0 < (y == 1).sum() < len(y) else float("nan")
    scores = [roc_auc_score(y == c, probs[:, c]) for c in range(K) if 0 < (y == c).sum() < len(y)]
    return float(np.mean(scores)) if scores else float("nan")


def concordance_cc(a: np.ndarray, b: np.ndarray) -> float:
    """Lin's concordance correlation coefficient of two 1-d arrays (population moments):
    2 cov / (var_a + var_b + (mean_a - mean_b)^2); NaN when both are constant."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    denom = a.var() + b.var() + (a.mean() - b.mean()) ** 2
    return float(2 * np.mean((a - a.mean()) * (b - b.mean())) / denom) if denom > 0 else float("nan")


def regression_metrics(y: np.ndarray, pred: np.ndarray, names: list[str]) -> dict:
    """Per target (AffectNet's figures): mse_<name>, rmse_<name>, pearson_<name>, ccc_<name> (concordance
    correlation), and for valence sagr_valence (sign agreement: the share of rows whose predicted valence
    has the true one's sign); and the means over the targets mse, rmse, pearson, ccc (y, pred [n, len(names)])."""
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    out = {}
    for j, name in enumerate(names):
        a, b = y[:, j], pred[:, j]
        out[f"mse_{name}"] = float(np.mean((a - b) ** 2))
        out[f"rmse_{name}"] = float(np.sqrt(out[f"mse_{name}"]))
        out[f"pearson_{name}"] = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
        out[f"ccc_{name}"] = concordance_cc(a, b)
        if name == "valence":
            out["sagr_valence"] = float(np.mean(np.sign(a) == np.sign(b)))
    out["mse"] = float(np.mean([out[f"mse_{n}"] for n in names]))
    out["rmse"] = float(np.mean([out[f"rmse_{n}"] for n in names]))
    nan = float("nan")
    out["pearson"] = float(np.nanmean([out[f"pearson_{n}"] for n in names])) if names else nan
    ccc = [out[f"ccc_{n}"] for n in names if not np.isnan(out[f"ccc_{n}"])]
    out["ccc"] = float(np.mean(ccc)) if ccc else nan
    return out


def regression_table(ids, y: np.ndarray, pred: np.ndarray, names: list[str]) -> pd.DataFrame:
    """The predictions CSV of a regression: id, actual_<name> per target, predicted_<name> per target."""
    frame = pd.DataFrame({"id": np.asarray(ids).astype(str)})
    for j, n in enumerate(names):
        frame[f"actual_{n}"] = np.asarray(y, np.float64)[:, j].round(6)
    for j, n in enumerate(names):
        frame[f"predicted_{n}"] = np.asarray(pred, np.float64)[:, j].round(6)
    return frame


def confusion(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts [actual, predicted]."""
    return confusion_matrix(y, pred, labels=np.arange(n_classes))


def predictions_table(ids, y: np.ndarray, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    y = np.asarray(y, dtype=np.int64)
    pred = probs.argmax(1)
    names = np.asarray(classes, dtype=object)
    frame = pd.DataFrame({"id": np.asarray(ids).astype(str), "actual": names[y], "predicted": names[pred],
                          "correct": (pred == y).astype(int), "confidence": probs.max(1).round(6)})
    for i, c in enumerate(classes):
        frame[f"{PROB_PREFIX}{c}"] = probs[:, i].round(6)
    return frame


def read_predictions(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(ids, y, probs, classes) from a predictions table (the inverse of ``predictions_table``)."""
    classes = [c[len(PROB_PREFIX):] for c in frame.columns if c.startswith(PROB_PREFIX)]
    if not classes or not {"id", "actual"} <= set(frame.columns):
        raise ValueError("not a predictions table: needs id, actual and prob_<class> columns")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(frame["actual"].astype(str)) - set(index))
    if unknown:
        raise ValueError(f"actual labels {unknown} have no prob_ column")
    y = frame["actual"].astype(str).map(index).to_numpy(np.int64)
    probs = frame[[PROB_PREFIX + c for c in classes]].to_numpy(np.float64)
    return frame["id"].astype(str).to_numpy(), y, probs, classes


def headline(test: dict, train: dict | None = None, recipe: str | None = None) -> dict:
    """The one-screen summary of a run (metrics/results.json, the pipeline's DVC metrics file).

    ``test``: the evaluate metrics (accuracy, macro_f1, model); ``train``: the train stage's metrics
    (val_acc_mean/std over the folds, absent without cross-validation; folds_at_chance, final.at_chance).
    ``runs_at_chance`` counts the trained models (folds, final) that ended at chance level.
    A valence/arousal evaluation (``test`` has ccc): test_rmse, test_ccc (means over the targets), the folds'
    val_loss_mean / val_loss_std, model, recipe (no accuracy, no chance level).
    """
    train = train or {}
    if "ccc" in test and "accuracy" not in test:
        out = {"test_rmse": round(float(test["rmse"]), 4), "test_ccc": round(float(test["ccc"]), 4)}
        for key in ("val_loss_mean", "val_loss_std"):
            if train.get(key) is not None:
                out[key] = round(float(train[key]), 4)
        out["model"] = test.get("model")
        if recipe:
            out["recipe"] = recipe
        return out
    out = {"test_acc": round(float(test["accuracy"]), 4), "test_macro_f1": round(float(test["macro_f1"]), 4)}
    for key in ("val_acc_mean", "val_acc_std"):
        if train.get(key) is not None:
            out[key] = round(float(train[key]), 4)
    out["runs_at_chance"] = len(train.get("folds_at_chance") or []) + int(bool((train.get("final") or {}).get("at_chance")))
    out["model"] = test.get("model")
    if recipe:
        out["recipe"] = recipe
    return out
