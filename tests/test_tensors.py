"""Runs larger than memory: TensorData streaming its rows from the packed HDF5 files (train.memory_gb),
the block writer and row reader of ferpipe.store, on a real FER-2013 slice run through the stages'
own functions (ingest -> gray48 -> saliency guide -> split)."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from ferpipe.data.augment import BatchAugment
from ferpipe.data.gray import run_gray
from ferpipe.data.ingest import run_ingest
from ferpipe.data.split import run_split
from ferpipe.data.tensors import DiskPixels, available_ram, load_data, memory_budget
from ferpipe.guides.maps import run_guide
from ferpipe.models.checkpoint import load_checkpoint
from ferpipe.store import h5_writer, read_h5, read_rows
from ferpipe.train.data import channel_stats
from ferpipe.train.run import run_train

TINY = 1e-9  # GiB: no run fits, every batch is read from the files
CLASSES = ("angry", "happy", "neutral", "sad")


@pytest.fixture(scope="module")
def real(fer_dir, tmp_path_factory) -> dict:
    """Real FER-2013 faces (30 train + 8 test per class of CLASSES) through ingest, gray48, the saliency
    guide and the split stage's functions: the artifacts a guided and a plain model train on."""
    root = tmp_path_factory.mktemp("real")
    for split, n in (("train", 30), ("test", 8)):
        for cls in CLASSES:
            (root / "fer" / split / cls).mkdir(parents=True)
            for f in sorted((fer_dir / split / cls).iterdir())[:n]:
                shutil.copy(f, root / "fer" / split / cls / f.name)
    run_ingest("folder", root / "fer", "", root / "ingest.h5", root / "manifest.csv", root / "rejects.csv", None, None,
               workers=1, progress=False)
    run_gray(str(root / "ingest.h5"), str(root / "gray48.h5"), None)
    run_guide("saliency", str(root / "gray48.h5"), None, str(root / "guides" / "saliency.h5"))
    run_split(str(root / "manifest.csv"), str(root / "split.csv"), str(root / "split.json"), task="polarity", folds=2)
    return {"root": root, "split": str(root / "split.csv"), "gray48": str(root / "gray48.h5"),
            "guides": str(root / "guides")}


def both(real, model: str, splits=("train", "test")):
    mem = load_data(real["split"], model, gray48=real["gray48"], guides_dir=real["guides"], splits=splits)
    disk = load_data(real["split"], model, gray48=real["gray48"], guides_dir=real["guides"], splits=splits,
                     memory_gb=TINY)
    return mem, disk


@pytest.mark.parametrize("model", ["baseline", "saliency"])
def test_streamed_batches_are_the_in_memory_batches_bit_for_bit(real, model):
    mem, disk = both(real, model)
    assert not mem.streaming and disk.streaming and isinstance(disk.pixels, DiskPixels)
    assert disk.pixels.shape == tuple(mem.pixels.shape) == (152, 1 if model == "baseline" else 2, 48, 48)
    assert torch.equal(disk.pixels[:], mem.pixels)  # every row, in split.csv order
    assert torch.equal(disk.pixels[torch.tensor([5, 0]), 0], mem.pixels[torch.tensor([5, 0]), 0])
    rows = disk.train_rows(exclude_fold=0)
    assert torch.equal(rows, mem.train_rows(exclude_fold=0))
    assert torch.equal(disk.class_counts(rows), mem.class_counts(rows))
    assert channel_stats(disk.pixels, rows) == channel_stats(mem.pixels, rows)
    mean, std = channel_stats(mem.pixels, rows)
    for d in (mem, disk):
        d.spec.mean, d.spec.std = mean, std
    idx = torch.tensor([17, 3, 3, 90, 0, 151, 42])  # any order, repeats: as a sampler may ask
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(1))
    for augment in (None, "train"):
        a = BatchAugment.from_params({"hflip": 0.5, "degrees": 10, "scale": [0.9, 1.1], "translate": 0.1}, seed=7)
        b = BatchAugment.from_params({"hflip": 0.5, "degrees": 10, "scale": [0.9, 1.1], "translate": 0.1}, seed=7)
        for batch in [idx, *rows[order].split(32)]:
            got = disk.batch(batch, b if augment else None)
            want = mem.batch(batch, a if augment else None)
            assert len(got) == len(want) == 3
            for g, w in zip(got, want):
                assert (g is None and w is None) or (g.dtype == w.dtype and torch.equal(g, w))


@pytest.mark.parametrize("model", ["baseline", "saliency"])
def test_a_streamed_training_run_gives_the_same_metrics_and_weights(real, model, tmp_path, capsys):
    prm = {"folds": [0], "max_epochs": 2, "patience": 5, "threads": 1, "log_every": 0, "progress": False,
           "device": "cpu", "batch_size": 32}
    out = {}
    for mode, gb in (("memory", 0), ("stream", TINY)):
        d = tmp_path / mode
        metrics = run_train({"model": model, "task": "polarity", "train": {**prm, "memory_gb": gb}}, real["split"],
                            real["gray48"], real["guides"], str(d / "models"), str(d / "train.json"), None)
        weights = load_checkpoint(d / "models" / "fold0.pt")[0].state_dict()
        out[mode] = (metrics, weights, (d / "train.json").read_text())
    assert "batches are read from" in capsys.readouterr().out  # the streamed run says so
    (m1, w1, j1), (m2, w2, j2) = out["memory"], out["stream"]
    assert m1 == m2 and j1 == j2 and json.loads(j1)["folds"]["0"]["epochs"] == 2
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_evaluate_reads_test_rows_of_a_streamed_run(real):
    """evaluate gathers data.pixels[rows] and data.pixels[rows, 0]: the streamed pixels answer the same."""
    mem, disk = both(real, "saliency", splits=("test",))
    rows = disk.test_rows()
    assert len(rows) == 32
    assert torch.equal(disk.pixels[rows], mem.pixels[rows])
    assert torch.equal(disk.pixels[rows, 0], mem.pixels[rows, 0])
    assert torch.equal(disk.targets[rows], mem.targets[rows])


def test_memory_budget_param():
    assert memory_budget(2) == 2 * 2**30 and memory_budget(0.5, "cpu") == 2**29
    auto = memory_budget(0)
    assert 0 < auto <= available_ram() // 2 + 1
    for bad in (-1, "lots", float("inf"), float("nan"), None):
        with pytest.raises(ValueError, match="train.memory_gb must be a number >= 0"):
            memory_budget(bad)


def test_a_bad_memory_gb_is_a_clear_error(real, tmp_path):
    with pytest.raises(ValueError, match="train.memory_gb"):
        run_train({"model": "baseline", "task": "polarity", "train": {"folds": [0], "max_epochs": 1, "device": "cpu",
                                                                      "memory_gb": -2}},
                  real["split"], real["gray48"], real["guides"], str(tmp_path / "m"), str(tmp_path / "t.json"), None)
    assert not (tmp_path / "m").exists() and not (tmp_path / "t.json").exists()


def test_gray48_file_is_contiguous_and_rows_read_in_any_order(real):
    """The trainer's arrays are contiguous (fast random rows); ingest's growable array is chunked; read_rows
    gives the asked rows in the asked order from both."""
    want = read_h5(real["root"] / "ingest.h5")["images"]
    with h5py.File(real["gray48"]) as g, h5py.File(real["root"] / "ingest.h5") as i:
        assert g["images"].chunks is None and i["images"].chunks is not None
        rows = np.array([151, 0, 7, 7, 64, 3])
        np.testing.assert_array_equal(read_rows(g["images"], rows), want[rows])  # gray48 at 48 px == ingest
        np.testing.assert_array_equal(read_rows(i["images"], rows), want[rows])
        assert read_rows(i["images"], np.array([], int)).shape == (0, 48, 48)
        with pytest.raises(IndexError, match="outside"):
            read_rows(g["images"], np.array([152]))


def test_block_writer_checks_its_row_count_and_keeps_rows(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 5, 5), dtype=np.uint8)
    with h5_writer(tmp_path / "a.h5", {"stage": "t"}, rows=10) as out:
        out.append("images", x[:4])
        out.append("images", x[4:])
        out.write("ids", np.array([f"i{k}" for k in range(10)]))
    got = read_h5(tmp_path / "a.h5")
    np.testing.assert_array_equal(got["images"], x)
    with pytest.raises(ValueError, match=r"got \[4\] of 10 rows"):  # short: nothing published
        with h5_writer(tmp_path / "b.h5", rows=10) as out:
            out.append("images", x[:4])
    with pytest.raises(ValueError, match="12 rows appended to a file of 10"):
        with h5_writer(tmp_path / "b.h5", rows=10) as out:
            out.append("images", x)
            out.append("images", x[:2])
    assert not (tmp_path / "b.h5").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.h5"]
    keep = np.array([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], bool)
    with h5_writer(tmp_path / "c.h5") as out:  # growable: rows dropped after they were written
        for k in range(0, 10, 3):
            out.append("images", x[k:k + 3])
        out.keep("images", keep)
    np.testing.assert_array_equal(read_h5(tmp_path / "c.h5")["images"], x[keep])
