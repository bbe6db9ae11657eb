"""ferpipe.workflow: the pipeline as train() / evaluate() calls on a real FER-2013 slice, no DVC."""
from __future__ import annotations

import shutil

import pytest

from ferpipe.recognize import Recognizer
from ferpipe.workflow import evaluate, train


def test_train_then_evaluate_then_recognize(fer_dir, tmp_path):
    for split, n in (("train", 10), ("test", 4)):
        for c in ("happy", "sad", "surprise"):
            dst = tmp_path / "fer" / split / c
            dst.mkdir(parents=True)
            for f in sorted((fer_dir / split / c).iterdir())[:n]:
                shutil.copy(f, dst / f.name)
    fit = train(tmp_path / "fer", tmp_path / "run", model="soft", task="classes", workers=1, progress=False,
                train={"folds": [0], "max_epochs": 2, "threads": 1, "log_every": 0, "progress": False})
    assert fit["n_folds"] == 1 and 1 <= fit["best_epoch"] <= 2 and 0 <= fit["val_acc"] <= 1
    assert (tmp_path / "run/data/guides/soft.h5").is_file()           # the guide the model needs, only it
    assert not (tmp_path / "run/data/guides/saliency.h5").exists()
    test = evaluate(tmp_path / "run", tta=0, threads=1)
    assert test["n"] == 12 and 0 <= test["accuracy"] <= 1 and "top2" in test and "top3" not in test
    rec = Recognizer(fit["models"])
    assert rec.classes == ["happy", "sad", "surprise"]
    with pytest.raises(ValueError, match="unknown model"):
        train(tmp_path / "fer", tmp_path / "x", model="nope")
