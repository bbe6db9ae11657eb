"""The pipeline as two Python calls, for users who do not use DVC (as the Emotion SDK's train/eval).

    from ferpipe.workflow import train, evaluate
    fit = train("../shared/data/fer2013", "runs/vgg", model="vgg", task="classes",
                train={"folds": [0], "max_epochs": 40, "lr_schedule": "cosine"})
    test = evaluate("runs/vgg", tta=10)
    print(fit["val_acc"], fit["best_epoch"], test["accuracy"], test["top3"])
    # then: Recognizer("runs/vgg/models") applies the model to photos and videos

Both run the stages' own library functions (ingest, gray48, landmarks and the one guide map the
model needs, split, train, evaluate) with the defaults of params.yaml, writing the same artifacts a
`dvc repro` writes, under one work folder instead of the repository. There is no caching: every
call recomputes its stages (DVC is what skips unchanged work).
"""
from __future__ import annotations

import os
from pathlib import Path

from ferpipe.params import load_params

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def _defaults(params: str | os.PathLike | None) -> dict:
    return load_params(Path(params) if params else REPO_PARAMS)  # an absent file: {}


def train(dataset: str | os.PathLike, workdir: str | os.PathLike, model: str = "vgg", task: str = "classes",
          fmt: str = "folder", train: dict | None = None, params: str | os.PathLike | None = None,
          workers: int = 0, progress: bool = True) -> dict:
    """Preprocess `dataset` (a reader format, default the Kaggle folder layout) and train `model`.

    ``train``: overrides of params.yaml's train section (e.g. folds, max_epochs, lr_schedule).
    Returns the train metrics plus ``val_acc`` (mean over the folds run, None without folds),
    ``best_epoch`` and ``models`` (the checkpoint folder, ready for ferpipe.recognize.Recognizer).
    """
    from ferpipe.data.gray import run_gray
    from ferpipe.data.ingest import run_ingest
    from ferpipe.data.split import run_split
    from ferpipe.models import MODEL_SPECS
    from ferpipe.train.run import run_train

    if model not in MODEL_SPECS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODEL_SPECS)}")
    prm = _defaults(params)
    w = Path(workdir)
    d = w / "data"
    ing = prm.get("ingest") or {}
    run_ingest(fmt, str(dataset), "", d / "ingest/images.h5", d / "ingest/manifest.csv", d / "ingest/rejects.csv",
               None, None, size=int(ing.get("size", 48)), workers=workers, progress=progress)
    run_gray(str(d / "ingest/images.h5"), str(d / "gray48/images.h5"), None, int((prm.get("gray48") or {}).get("size", 48)))
    spec = MODEL_SPECS[model]
    kinds = sorted({spec["image"], spec["guide"]} - {"gray48", None})
    if kinds:
        from ferpipe.faces.landmarks import PASSES, run_landmarks
        from ferpipe.guides.maps import run_guide

        lm = prm.get("landmarks") or {}
        if set(kinds) - {"saliency"}:
            run_landmarks(str(d / "ingest/images.h5"), str(d / "landmarks/landmarks.h5"), None, None,
                          size=int(lm.get("size", 96)), passes=lm.get("passes", PASSES), workers=workers)
        for kind in kinds:
            landmarks = None if kind == "saliency" else str(d / "landmarks/landmarks.h5")
            run_guide(kind, str(d / "gray48/images.h5"), landmarks, str(d / f"guides/{kind}.h5"), None,
                      **((prm.get("guides") or {}).get(kind) or {}))
    sp = prm.get("split") or {}
    run_split(str(d / "ingest/manifest.csv"), str(d / "split/split.csv"), str(w / "split.json"), task,
              int(sp.get("folds", 5)), int(sp.get("seed", 2020)), tuple(sp.get("test", ["test"])))
    train_prm = {**(prm.get("train") or {}), **(train or {})}
    metrics = run_train({"model": model, "task": task, "train": train_prm}, str(d / "split/split.csv"),
                        str(d / "gray48/images.h5"), str(d / "guides"), str(w / "models"), str(w / "train.json"),
                        None)
    return {**metrics, "val_acc": metrics.get("val_acc_mean"), "best_epoch": metrics.get("best_epoch_mean"),
            "models": str(w / "models")}


def evaluate(workdir: str | os.PathLike, params: str | os.PathLike | None = None, **evaluate_params) -> dict:
    """Test-split metrics of a `train` run: accuracy, macro_f1, balanced_accuracy, top2/top3, per class.
    Keywords override params.yaml's evaluate section (members, tta, ...)."""
    from ferpipe.evaluate.run import run_evaluate

    prm = _defaults(params)
    w = Path(workdir)
    d = w / "data"
    ev = {**(prm.get("evaluate") or {}), **evaluate_params}
    return run_evaluate({"evaluate": ev}, str(w / "models"), str(d / "split/split.csv"), str(d / "gray48/images.h5"),
                        str(d / "guides"), str(w / "eval.json"), str(w / "predictions.csv"),
                        str(w / "confusion.png"), str(w / "errors.png"))
