"""The split stage: targets for the chosen task, k folds on the training portion, the test split apart.

Honest evaluation: folds are made only from the dataset's training rows; the rows of the
`test` splits (FER-2013 PublicTest in ../shared/data/fer2013) get fold -1 and are never used for
model selection. Where the manifest has subjects (CK+ Sxxx), folds are subject-independent.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import KFold, StratifiedGroupKFold, StratifiedKFold

from ferpipe.data.labels import class_list, polarity
from ferpipe.store import write_csv, write_json, writes

TASKS = ("classes", "polarity", "valence_arousal")
POLARITY = ["neutral", "positive", "negative"]


def targets(manifest: pd.DataFrame, task: str) -> tuple[pd.DataFrame, list[str], pd.Series]:
    """Per-row targets for a task; returns (targets frame, class names, exclusion reason per row).

    classes: index into the dataset's class list; polarity: Guided-ST 3-class (valence rules when the
    data has valence, else the name mapping; surprise has no polarity and is excluded);
    valence_arousal: the two floats (rows without them are excluded).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}'; choose from {list(TASKS)}")
    n = len(manifest)
    reason = pd.Series([""] * n, index=manifest.index, dtype=object)
    out = pd.DataFrame(index=manifest.index)
    names = manifest["label_name"].fillna("").astype(str)
    if task == "valence_arousal":
        va = manifest[["valence", "arousal"]].astype(float)
        out["valence"], out["arousal"] = va["valence"], va["arousal"]
        reason[va.isna().any(axis=1)] = "no valence/arousal"
        out["target"], out["target_name"] = -1, ""
        return out, [], reason
    if task == "classes":
        classes = class_list(sorted(set(names) - {""}))
        index = {c: i for i, c in enumerate(classes)}
        out["target"] = [index.get(x, -1) for x in names]
    else:
        classes = POLARITY
        val = manifest["valence"].astype(float) if "valence" in manifest else pd.Series(np.nan, index=manifest.index)
        # the Guided-ST CSV already carries polarity names
        direct = {c: i for i, c in enumerate(POLARITY)}
        pol = []
        for name, v in zip(names, val):
            if name in direct:
                pol.append(direct[name])
                continue
            p = polarity(name, None if np.isnan(v) else float(v)) if (name or not np.isnan(v)) else None
            pol.append(-1 if p is None else p)
        out["target"] = pol
    out["target"] = out["target"].astype(int)
    reason[(out["target"] < 0) & (names == "")] = "no label"
    reason[(out["target"] < 0) & (names != "")] = f"no {task} target for this label"
    out["target_name"] = [classes[t] if t >= 0 else "" for t in out["target"]]
    return out, classes, reason


def make_split(manifest: pd.DataFrame, task: str = "polarity", folds: int = 5, seed: int = 2020,
               test=("test",), dataset_folds: bool = True) -> tuple[pd.DataFrame, dict]:
    """Return (split table, summary). The table has one row per used image: id, index (row in the
    packed arrays), split (train/test), fold (0..k-1 for train, -1 for test), targets.

    `dataset_folds`: where the dataset brings its own folds (the manifest's `fold`, e.g. Guided-ST's
    distribution CSV) for every used training row, those are the folds (numbered 0..k-1 in their
    order; `folds` is then ignored) so published results can be reproduced; else folds are drawn."""
    if folds < 2:
        raise ValueError(f"split.folds must be >= 2 (got {folds})")
    tg, classes, reason = targets(manifest, task)
    table = pd.DataFrame({"id": manifest["id"].astype(str), "index": np.arange(len(manifest))})
    table = pd.concat([table, tg.reset_index(drop=True)], axis=1)
    splits = manifest["split"].astype(str).to_numpy()
    is_test = np.isin(splits, list(test))
    is_train = splits == "train"
    reason = reason.to_numpy().copy()
    reason[(reason == "") & ~is_train & ~is_test] = "split not used (neither train nor split.test)"
    used = reason == ""
    table["split"] = np.where(is_test, "test", "train")
    table["fold"] = -1
    train = np.flatnonzero(used & is_train)
    if len(train) < folds:
        raise ValueError(f"only {len(train)} usable training rows for {folds} folds")
    subjects = manifest["subject"].fillna("").astype(str).to_numpy() if "subject" in manifest else np.full(len(manifest), "")
    grouped = bool((subjects[train] != "").all())
    given = (pd.to_numeric(manifest["fold"], errors="coerce").fillna(-1).astype(int).to_numpy()
             if "fold" in manifest else np.full(len(manifest), -1))
    fold_source = "drawn"
    if dataset_folds and (given[train] >= 0).all():
        present = np.unique(given[train])
        if len(present) < 2:
            raise ValueError(f"the dataset's own folds put every training row in fold {present[0]}; "
                             "set split.dataset_folds=false to draw folds")
        fold = table["fold"].to_numpy().copy()
        fold[train] = np.searchsorted(present, given[train])
        table["fold"], folds, fold_source, grouped = fold, len(present), "dataset", False
        kf = []
    elif task == "valence_arousal":
        kf = KFold(folds, shuffle=True, random_state=seed).split(train)
    elif grouped:
        kf = StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(
            train, table["target"].to_numpy()[train], subjects[train])
    else:
        y = table["target"].to_numpy()[train]
        counts = np.bincount(y)
        if counts[counts > 0].min() < folds:
            raise ValueError(f"a class has fewer than {folds} training rows ({dict(enumerate(counts))}); lower split.folds")
        kf = StratifiedKFold(folds, shuffle=True, random_state=seed).split(train, y)
    if fold_source == "drawn":
        fold = table["fold"].to_numpy().copy()
        for k, (_, val) in enumerate(kf):
            fold[train[val]] = k
        table["fold"] = fold
    excluded = pd.Series(reason[~used]).value_counts().to_dict()
    table = table[used].reset_index(drop=True)
    summary = {
        "task": task, "classes": classes, "folds": folds, "fold_source": fold_source, "seed": seed,
        "subject_independent": grouped,
        "train": int((table["split"] == "train").sum()), "test": int((table["split"] == "test").sum()),
        "excluded": {k: int(v) for k, v in excluded.items()},
    }
    if classes:
        summary["per_class_train"] = {c: int(((table["split"] == "train") & (table["target"] == i)).sum())
                                      for i, c in enumerate(classes)}
        summary["per_class_test"] = {c: int(((table["split"] == "test") & (table["target"] == i)).sum())
                                     for i, c in enumerate(classes)}
    return table, summary


@writes("out_path", "summary_path")
def run_split(manifest_path: str, out_path: str, summary_path: str, task: str = "polarity", folds: int = 5,
              seed: int = 2020, test=("test",), dataset_folds: bool = True) -> dict:
    manifest = pd.read_csv(manifest_path, keep_default_na=False, na_values=[""],
                           dtype={"id": str, "label_name": str, "subject": str, "sequence_id": str})
    table, summary = make_split(manifest, task, folds, seed, tuple(test), dataset_folds)
    write_csv(out_path, table)
    write_json(summary_path, summary)
    return summary
