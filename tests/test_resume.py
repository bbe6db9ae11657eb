"""Snapshots and resume (train.snapshot_every): a training run killed after epoch k and run again gives the
weights, history, metrics and dvclive files of a run that was never stopped, bitwise; finished folds are
not retrained; other params start fresh; the snapshots go once the outputs are written. And the
per-epoch regression plot (train.plot_every) of a valence/arousal run. On real FER-2013 faces (the
valence/arousal values GENERATED from the class, as tests/test_valence.py's); the sequence stage's
resume is tested on real CK+ in tests/test_sequences.py.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import fer_slice
from ferpipe.store import write_h5
from ferpipe.train import loop
from ferpipe.train.run import run_train


class Killed(Exception):
    """Stands for a kill: raised inside the training loop, so the stage fails with its outputs unwritten."""


def count_epochs(monkeypatch, kill_at: int | None = None) -> list:
    """Count the epochs the loop runs (one validation pass each); with `kill_at`, the validation pass of that
    epoch (counted over the whole run) raises Killed: the run dies after epoch kill_at - 1."""
    real, calls = loop.evaluate_rows, []

    def counting(*args, **kwargs):
        calls.append(1)
        if len(calls) == kill_at:
            raise Killed(f"killed in epoch {kill_at} of the run")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate_rows", counting)
    return calls


def real_split(fer_dir: Path, root: Path, classes: tuple, per_class: int, regression: bool = False) -> dict:
    """gray48.h5 + split.csv of the first `per_class` real FER-2013 training faces of `classes`, 3 folds;
    with `regression` a valence_arousal split whose values are GENERATED from the class (test_valence's VA
    plus noise)."""
    from test_valence import VA
    images, labels = fer_slice(fer_dir, "train", per_class, classes)
    n = len(images)
    ids = np.array([f"f{i:04d}" for i in range(n)])
    root.mkdir(parents=True, exist_ok=True)
    write_h5(root / "gray48.h5", {"images": images, "ids": ids})
    table = pd.DataFrame({"id": ids, "index": np.arange(n), "split": "train", "fold": np.arange(n) % 3})
    if regression:
        rng = np.random.default_rng(0)
        va = np.clip(np.array([VA[c] for c in labels]) + rng.normal(0, 0.1, (n, 2)), -1, 1).round(4)
        table = table.assign(target=-1, target_name="", valence=va[:, 0], arousal=va[:, 1])
    else:
        table = table.assign(target=[classes.index(c) for c in labels], target_name=labels)
    table.to_csv(root / "split.csv", index=False)
    return {"split": str(root / "split.csv"), "gray48": str(root / "gray48.h5"), "guides": str(root / "guides")}


def params(**train) -> dict:
    base = {"folds": [0, 1], "max_epochs": 6, "patience": 0, "batch_size": 32, "snapshot_every": 2, "threads": 1,
            "log_every": 0, "progress": False, "device": "cpu"}
    return {"model": "baseline", "task": "classes", "train": {**base, **train}}


def train(art: dict, out: Path, prm: dict, snaps: Path) -> dict:
    return run_train(prm, art["split"], art["gray48"], art["guides"], str(out / "models"), str(out / "train.json"),
                     str(out / "live"), snapshots=snaps)


def files(folder: Path) -> dict:
    """{relative path: bytes} of every file under a folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def faces(fer_dir, tmp_path_factory):
    """180 real FER-2013 training faces: 60 each of angry, happy, surprise, in 3 folds."""
    return real_split(fer_dir, tmp_path_factory.mktemp("faces"), ("angry", "happy", "surprise"), 60)


def test_a_killed_run_resumes_bitwise_and_keeps_its_finished_folds(faces, tmp_path, monkeypatch, capsys):
    """Folds 0 and 1, 6 epochs each, a snapshot every 2, augmentation and dropout on: killed in fold 1's 5th
    epoch (after its snapshot at epoch 4), run again: fold 0 is taken from its final snapshot (no epoch
    trained), fold 1 trains epochs 5 and 6 only, and models, train.json and the dvclive curves are byte for
    byte those of an uninterrupted run. The snapshots are gone after the successful run."""
    snaps = tmp_path / "snaps"
    count_epochs(monkeypatch, kill_at=6 + 5)
    with pytest.raises(Killed):
        train(faces, tmp_path / "a", params(), snaps)
    assert not (tmp_path / "a/models").exists() and not (tmp_path / "a/train.json").exists()  # no outputs
    [run] = list(snaps.iterdir())
    assert sorted(p.name for p in run.iterdir()) == ["fold0.pt", "fold1.pt"]
    fold1 = torch.load(run / "fold1.pt", weights_only=True)   # the project refuses pickles that run code
    assert fold1["epoch"] == 4 and not fold1["done"] and len(fold1["result"]["history"]) == 4
    assert torch.load(run / "fold0.pt", weights_only=True)["done"]
    assert sorted(fold1["rng"][0]) == ["augment", "cuda", "torch"] and fold1["rng"][0]["augment"] is not None

    capsys.readouterr()
    epochs = count_epochs(monkeypatch)
    resumed = train(faces, tmp_path / "a", params(), snaps)
    err = capsys.readouterr().err
    assert len(epochs) == 2, "fold 0 was retrained or fold 1 restarted"
    assert "resuming a stopped run" in err and "fold 0: finished in an earlier run (6 epochs)" in err
    assert "fold 1: resumed from its snapshot after epoch 4" in err
    assert not snaps.exists()  # removed once the outputs were written

    whole = train(faces, tmp_path / "b", params(), tmp_path / "snaps_b")
    assert len(epochs) == 2 + 12 and resumed == whole
    for name in ("models", "live"):
        a, b = files(tmp_path / "a" / name), files(tmp_path / "b" / name)
        assert a.keys() == b.keys() and a == b, name
    assert (tmp_path / "a/train.json").read_bytes() == (tmp_path / "b/train.json").read_bytes()
    curve = (tmp_path / "a/live/fold1/plots/metrics/val/loss.tsv").read_text().splitlines()
    assert [int(line.split()[0]) for line in curve[1:]] == [1, 2, 3, 4, 5, 6]  # epochs 1-4 replayed from the snapshot
    history = torch.load(tmp_path / "a/models/fold1.pt", weights_only=True)["meta"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]


def test_other_params_start_fresh_and_snapshot_every_0_writes_nothing(faces, tmp_path, monkeypatch, capsys):
    snaps = tmp_path / "snaps"
    count_epochs(monkeypatch, kill_at=4)
    with pytest.raises(Killed):
        train(faces, tmp_path / "a", params(folds=[0]), snaps)
    [first] = list(snaps.iterdir())
    assert torch.load(first / "fold0.pt", weights_only=True)["epoch"] == 2
    # another learning rate: another run-id; the old snapshots go, every epoch trains
    capsys.readouterr()
    epochs = count_epochs(monkeypatch)
    train(faces, tmp_path / "a", params(folds=[0], lr=3e-4), snaps)
    err = capsys.readouterr().err
    assert len(epochs) == 6 and "snapshots of another run (other params, data or code) removed" in err
    assert "resum" not in err and not snaps.exists()
    # params that change no result (reporting, snapshot_every) keep the run-id: the run resumes
    count_epochs(monkeypatch, kill_at=4)
    with pytest.raises(Killed):
        train(faces, tmp_path / "a", params(folds=[0]), snaps)
    epochs = count_epochs(monkeypatch)
    train(faces, tmp_path / "a", params(folds=[0], snapshot_every=3, log_every=2), snaps)
    assert len(epochs) == 4 and "resumed from its snapshot after epoch 2" in capsys.readouterr().err
    # other data (split.csv rewritten): a fresh start
    count_epochs(monkeypatch, kill_at=4)
    with pytest.raises(Killed):
        train(faces, tmp_path / "a", params(folds=[0]), snaps)
    split = Path(faces["split"])
    split.write_text(split.read_text())   # same rows, a new file: other data as far as a run-id can tell
    epochs = count_epochs(monkeypatch)
    train(faces, tmp_path / "a", params(folds=[0]), snaps)
    assert len(epochs) == 6 and "removed" in capsys.readouterr().err
    # snapshot_every 0: a killed run leaves nothing behind, and the next run starts from epoch 1
    count_epochs(monkeypatch, kill_at=4)
    with pytest.raises(Killed):
        train(faces, tmp_path / "a", params(folds=[0], snapshot_every=0), snaps)
    assert not snaps.exists()
    with pytest.raises(ValueError, match="train.snapshot_every must be a whole number of epochs >= 0"):
        train(faces, tmp_path / "a", params(snapshot_every=-1), snaps)


def test_a_snapshot_of_another_fit_is_not_resumed(faces, tmp_path, capsys):
    """fit checks its own key too (settings, rows, model shape, processes): a snapshot file of another fit
    at its path is ignored, saying so, and the fit trains from epoch 1."""
    from ferpipe.data.tensors import load_data
    from ferpipe.models import build_model
    data = load_data(faces["split"], "baseline", gray48=faces["gray48"], guides_dir=faces["guides"])
    cpu = loop.Runtime(torch.device("cpu"), threads=1)
    cfg = loop.FitConfig(max_epochs=2, batch_size=32, snapshot_every=1, log_every=0, progress=False)
    path = tmp_path / "fit.pt"
    loop.seed_everything(0)
    first = loop.fit(build_model("baseline", 3), data, data.train_rows(0), data.val_rows(0), cfg, cpu, snapshot=path)
    assert torch.load(path, weights_only=True)["done"]
    again = loop.fit(build_model("baseline", 3), data, data.train_rows(0), data.val_rows(0), cfg, cpu, snapshot=path)
    assert again.history == first.history and "finished in an earlier run" in capsys.readouterr().err
    loop.seed_everything(0)
    other = loop.fit(build_model("baseline", 3), data, data.train_rows(1), data.val_rows(1), cfg, cpu, snapshot=path)
    assert "is of another fit" in capsys.readouterr().err and len(other.history) == 2
    path.write_bytes(b"not a torch file")
    loop.fit(build_model("baseline", 3), data, data.train_rows(1), data.val_rows(1), cfg, cpu, snapshot=path)
    assert "is unreadable" in capsys.readouterr().err


# ---------------------------------------------------------------------------- regression plots

@pytest.fixture(scope="module")
def valence(fer_dir, tmp_path_factory):
    """120 real FER-2013 training faces (24 of each of test_valence's 5 classes) with GENERATED valence/arousal."""
    return real_split(fer_dir, tmp_path_factory.mktemp("valence"), ("angry", "happy", "neutral", "sad", "surprise"),
                      24, regression=True)


def test_valence_arousal_runs_draw_a_regression_plot_every_n_epochs_and_resume_them(valence, tmp_path, monkeypatch):
    """plot_every 2 of a 5-epoch valence/arousal fold: plots/images/regression/2.png and 4.png in its dvclive
    folder, the evaluate stage's scatter; killed in epoch 5 and resumed (snapshot after epoch 4): the same
    plots, byte for byte, as an uninterrupted run's. plot_every 0: none."""
    prm = params(folds=[0], max_epochs=5, select="loss", plot_every=2, snapshot_every=4)
    prm["task"] = "valence_arousal"
    count_epochs(monkeypatch, kill_at=5)
    with pytest.raises(Killed):
        train(valence, tmp_path / "a", prm, tmp_path / "snaps")
    count_epochs(monkeypatch)
    train(valence, tmp_path / "a", prm, tmp_path / "snaps")
    train(valence, tmp_path / "b", prm, tmp_path / "snaps_b")
    plots = tmp_path / "a/live/fold0/plots/images/regression"
    assert sorted(p.name for p in plots.iterdir()) == ["2.png", "4.png"]
    assert files(plots) == files(tmp_path / "b/live/fold0/plots/images/regression")
    assert files(tmp_path / "a/models") == files(tmp_path / "b/models")
    pictures = [Image.open(io.BytesIO(p.read_bytes())) for p in sorted(plots.iterdir())]
    assert all(im.format == "PNG" and im.width > 1.5 * im.height for im in pictures)  # two panels side by side
    assert (plots / "2.png").read_bytes() != (plots / "4.png").read_bytes()           # the model moved
    prm["train"]["plot_every"] = 0
    train(valence, tmp_path / "c", prm, tmp_path / "snaps_c")
    assert not (tmp_path / "c/live/fold0/plots/images").exists()
    assert json.loads((tmp_path / "c/train.json").read_text())["folds"]["0"]["epochs"] == 5


def test_regression_png_is_the_evaluate_scatter_on_the_targets_scale():
    """The per-epoch plot is evaluate/plots.py's scatter (RMSE and CCC per target in its titles) of the
    validation batches, de-standardized: value = z * std + mean."""
    from ferpipe.evaluate.metrics import regression_metrics
    from ferpipe.evaluate.plots import scatter_png_bytes
    g = torch.Generator().manual_seed(0)
    y, out = torch.randn(40, 2, generator=g), torch.randn(40, 2, generator=g)
    scale = loop.TargetScale(["valence", "arousal"], [0.1, -0.2], [0.5, 0.25])
    png = loop.regression_png([(y[:25], out[:25]), (y[25:], out[25:])], scale, "fold 0, epoch 5")
    ty = y.double().numpy() * [0.5, 0.25] + [0.1, -0.2]
    tp = out.double().numpy() * [0.5, 0.25] + [0.1, -0.2]
    assert png == scatter_png_bytes(ty, tp, scale.names, "fold 0, epoch 5", regression_metrics(ty, tp, scale.names))
    assert png != scatter_png_bytes(y.numpy(), out.numpy(), scale.names, "fold 0, epoch 5",
                                    regression_metrics(y.numpy(), out.numpy(), scale.names))
