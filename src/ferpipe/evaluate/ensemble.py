"""Ensembles of saved predictions: average the class probabilities of several predictions CSVs.

As RMN's 7-model ensemble did, but from files, so the members can be experiments trained apart:
save each experiment's predictions, e.g.
  git show <exp-ref>:plots/eval/predictions.csv > soft.csv     (refs from `dvc exp show`)
  python stages/ensemble.py soft.csv landmarks.csv baseline.csv --out metrics/ensemble.json
Rows are matched by id; every file must cover the same ids with the same actual labels and class
columns (otherwise it is an error, not a silent partial ensemble). Optional weights per file.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from ferpipe.evaluate.metrics import classification_metrics, predictions_table, read_predictions
from ferpipe.store import write_csv, write_json, writes


def read_csv(path: str | os.PathLike) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"id": str, "actual": str, "predicted": str}, keep_default_na=False)


def ensemble(frames: list[pd.DataFrame], weights: list[float] | None = None, names: list[str] | None = None
             ) -> tuple[pd.DataFrame, dict]:
    """(the averaged predictions table, its metrics incl. each member's accuracy)."""
    if not frames:
        raise ValueError("no predictions to ensemble")
    names = names or [f"member{i}" for i in range(len(frames))]
    weights = [1.0] * len(frames) if weights is None else [float(w) for w in weights]
    if len(weights) != len(frames) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"need one non-negative weight per file ({len(frames)}), not all zero")
    ids, y, probs, classes = read_predictions(frames[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"{names[0]}: duplicate ids")
    order = pd.Index(ids)
    total = probs * weights[0]
    members = {names[0]: float((probs.argmax(1) == y).mean())}
    for frame, w, name in zip(frames[1:], weights[1:], names[1:]):
        ids_i, y_i, p_i, classes_i = read_predictions(frame)
        if classes_i != classes:
            raise ValueError(f"{name}: classes {classes_i} differ from {names[0]}'s {classes}")
        if len(ids_i) != len(ids) or set(ids_i) != set(ids):
            raise ValueError(f"{name}: its {len(ids_i)} ids are not the same rows as {names[0]}'s {len(ids)}")
        pos = pd.Index(ids_i).get_indexer(order)
        if not np.array_equal(y_i[pos], y):
            raise ValueError(f"{name}: the actual labels differ from {names[0]}'s for the same ids")
        total += p_i[pos] * w
        members[name] = float((p_i.argmax(1) == y_i).mean())
    probs = total / sum(weights)
    metrics = {"members": members, "weights": dict(zip(names, weights)), "classes": classes,
               **classification_metrics(y, probs, classes)}
    return predictions_table(ids, y, probs, classes), metrics


@writes("out", "predictions")
def run_ensemble(paths: list[str], out: str | None = None, predictions: str | None = None,
                 weights: list[float] | None = None) -> dict:
    frames = [read_csv(p) for p in paths]
    table, metrics = ensemble(frames, weights, [str(p) for p in paths])
    if predictions:
        write_csv(predictions, table)
    if out:
        write_json(out, metrics)
    return metrics
