"""TensorData.batch() with the pixels in memory vs streamed from the HDF5 files (train.memory_gb), CPU.

(1) Real FER-2013 at 48 px: ingest + gray48 through the stages' own functions (the block writer)
    into a temp folder, the saliency guide from ferpipe.guides.maps, the split of make_split.
    For the baseline (one file) and the saliency-guided model (two files): the load time, the
    channel statistics, and images/s of batch() over the shuffled training rows (batch 128) with
    the training augmentation and without it (the gather alone, plus the /255 and standardization);
    then a baseline training step (forward/backward/Adam) for scale.
    Then whether a one-batch read-ahead thread (reading batch k+1 while batch k trains) would gain
    anything: baseline training steps on streamed batches, the file cold (evicted from the page cache
    first: posix_fadvise DONTNEED on this file only) and warm. The baseline is the cheapest model, so
    it gives reading its largest share of a step.
(2) A generated array at 224 px (--rows, default 40,000 = 1.9 GiB: FER faces upscaled) written with
    the block writer: the gather and augmented batch() figures streamed cold and warm and in memory,
    and a resnet18 training step at 224 px (batch 4) for scale.

    .venv/bin/python bench/stream_speed.py [--data ../shared/data/fer2013] [--rows 40000] [--batches 30]
        [--tmp /tmp] [--threads 0]

Keep the machine otherwise idle: on 2 shared cores another busy process slows every figure (the
load average is printed). The temp folder (about 2.1 GB at the default --rows) is removed at the end.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as stages/train.py does

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ferpipe.data.augment import BatchAugment
from ferpipe.data.gray import run_gray
from ferpipe.data.ingest import run_ingest
from ferpipe.data.split import make_split
from ferpipe.data.tensors import DiskPixels, TensorData, load_data
from ferpipe.guides.maps import make_guide
from ferpipe.imaging import resize_batch
from ferpipe.models import build_model
from ferpipe.models.inputs import InputSpec
from ferpipe.store import h5_writer, read_h5, write_csv, write_h5
from ferpipe.train.data import channel_stats

REPO = Path(__file__).resolve().parents[1]
AUGMENT = {"hflip": 0.5, "degrees": 10, "scale": [0.9, 1.1], "translate": 0.1}
STREAM = 1e-9  # GiB: nothing fits, every batch is read from the files


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def batch_rate(data: TensorData, batches: list[torch.Tensor], augment: bool) -> float:
    """images/s of data.batch over these index batches."""
    aug = BatchAugment.from_params(AUGMENT, seed=0) if augment else None
    n = sum(len(b) for b in batches)
    _, s = timed(lambda: [data.batch(b, aug) for b in batches])
    return n / s


def shuffled(rows: torch.Tensor, size: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    order = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]
    return list(order.split(size))[:count]


def fer_part(fer: Path, tmp: Path, n_batches: int) -> None:
    (_, t_ingest) = timed(lambda: run_ingest("folder", fer, "", tmp / "ingest.h5", tmp / "manifest.csv",
                                             tmp / "rejects.csv", None, None, workers=0, progress=False))
    (_, t_gray) = timed(lambda: run_gray(str(tmp / "ingest.h5"), str(tmp / "gray48.h5"), None))
    data = read_h5(tmp / "gray48.h5")
    (tmp / "guides").mkdir()
    saliency = make_guide("saliency", data["images"], None)
    write_h5(tmp / "guides" / "saliency.h5", {"images": saliency, "ids": data["ids"]})
    manifest = pd.read_csv(tmp / "manifest.csv", dtype={"id": str, "label_name": str}, keep_default_na=False)
    table, _ = make_split(manifest, "classes", folds=5, seed=2020, test=("test",))
    write_csv(tmp / "split.csv", table)
    print(f"FER-2013: {len(data['ids'])} images; ingest {t_ingest:.1f} s, gray48 {t_gray:.2f} s (block writer)\n")
    print(f"{'48 px, batch 128':34s} {'load s':>7s} {'stats s':>8s} {'gather img/s':>13s} {'augmented img/s':>16s}")
    for model in ("baseline", "saliency"):
        for mode, gb in (("in memory", 0), ("streamed", STREAM)):
            d, t_load = timed(lambda: load_data(tmp / "split.csv", model, gray48=tmp / "gray48.h5",
                                                guides_dir=tmp / "guides", splits=("train",), memory_gb=gb))
            rows = d.train_rows()
            (d.spec.mean, d.spec.std), t_stats = timed(lambda: channel_stats(d.pixels, rows))
            batches = shuffled(rows, 128, n_batches)
            print(f"{model + ', ' + mode:34s} {t_load:7.2f} {t_stats:8.2f} {batch_rate(d, batches, False):13.0f} "
                  f"{batch_rate(d, batches, True):16.0f}", flush=True)
    readahead(tmp, n_batches)


class ReadAhead:
    """Stands for DiskPixels in data.pixels: `prefetch(rows)` starts reading those rows in a thread, and
    the next ``pixels[rows]`` of the same rows takes that read (what TensorData could do if the loop
    said which batch comes next; batch() says only the current one)."""

    def __init__(self, pixels: DiskPixels):
        self.pixels, self.pool, self.pending = pixels, ThreadPoolExecutor(1), None

    def prefetch(self, rows: torch.Tensor) -> None:
        self.pending = (rows, self.pool.submit(self.pixels.__getitem__, rows))

    def __getitem__(self, rows):
        if self.pending is not None and self.pending[0] is rows:
            out, self.pending = self.pending[1].result(), None
            return out
        return self.pixels[rows]


def readahead(tmp: Path, n_batches: int) -> None:
    """Training steps of the baseline (the cheapest model: the largest share of reading) on streamed
    batches, reading and training in turn vs reading batch k+1 while batch k trains; cold and warm."""
    path = tmp / "gray48.h5"
    d = load_data(tmp / "split.csv", "baseline", gray48=path, guides_dir=tmp / "guides", splits=("train",),
                  memory_gb=STREAM)
    d.spec.mean, d.spec.std = channel_stats(d.pixels, d.train_rows())
    disk = d.pixels
    net = build_model("baseline", len(d.classes))
    opt = torch.optim.Adam(net.parameters())
    batches = shuffled(d.train_rows(), 128, n_batches, seed=2)

    def steps(ahead: bool) -> float:
        aug = BatchAugment.from_params(AUGMENT, seed=0)
        d.pixels = ReadAhead(disk) if ahead else disk
        t0 = time.perf_counter()
        for k, b in enumerate(batches):
            x, _, y = d.batch(b, aug)  # takes the read started during the previous step, if any
            if ahead and k + 1 < len(batches):
                d.pixels.prefetch(batches[k + 1])  # batch k+1 is read while batch k trains
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        d.pixels = disk
        return time.perf_counter() - t0

    steps(False)  # warm-up
    for state in ("cold", "warm"):
        if state == "cold":
            evict(path)
        serial = steps(False)
        if state == "cold":
            evict(path)
        ahead = steps(True)
        n = sum(len(b) for b in batches)
        print(f"baseline training, streamed, {state}: {n / serial:.0f} img/s reading and training in turn, "
              f"{n / ahead:.0f} img/s with a one-batch read-ahead ({(serial - ahead) / serial * 100:+.1f}% time)",
              flush=True)
    print()


def evict(path: Path) -> None:
    """Drop this file's pages from the page cache (the next reads come from the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def big_part(fer_gray: Path, tmp: Path, n_rows: int, n_batches: int) -> None:
    faces = resize_batch(read_h5(fer_gray, ["images"])["images"][:2000], 224)
    path = tmp / "big224.h5"

    def write():
        with h5_writer(path, {"stage": "bench"}, rows=n_rows) as out:
            step = 1000
            for start in range(0, n_rows, step):
                k = min(step, n_rows - start)
                out.append("images", np.roll(faces, start, axis=0)[:k])
            out.write("ids", np.array([f"r{i}" for i in range(n_rows)]))
    _, t_write = timed(write)
    gib = n_rows * 224 * 224 / 2**30
    print(f"224 px: {n_rows} rows, {gib:.2f} GiB written by the block writer in {t_write:.1f} s "
          f"({gib / t_write:.2f} GiB/s, file {path.stat().st_size / 2**30:.2f} GiB)")
    table = pd.DataFrame({"id": [f"r{i}" for i in range(n_rows)], "index": np.arange(n_rows),
                          "target": np.arange(n_rows) % 7, "split": "train", "fold": np.arange(n_rows) % 5})
    classes = [f"c{i}" for i in range(7)]
    spec = InputSpec(size=224, mean=[0.5], std=[0.25])
    disk = TensorData(DiskPixels([path], np.arange(n_rows)), table, classes, spec)
    batches = shuffled(disk.train_rows(), 128, n_batches)
    print(f"{'224 px, batch 128':34s} {'load s':>7s} {'':8s} {'gather img/s':>13s} {'augmented img/s':>16s}")
    evict(path)
    cold = batch_rate(disk, batches, False)
    warm = batch_rate(disk, batches, False)
    aug = batch_rate(disk, batches[:max(1, n_batches // 3)], True)
    print(f"{'streamed, cold (from the disk)':34s} {'':7s} {'':8s} {cold:13.0f}")
    print(f"{'streamed, warm (page cache)':34s} {'':7s} {'':8s} {warm:13.0f} {aug:16.0f}")
    pixels, t_load = timed(lambda: disk.pixels.load())
    mem = TensorData(pixels, table, classes, spec)
    print(f"{'in memory':34s} {t_load:7.2f} {'':8s} {batch_rate(mem, batches, False):13.0f} "
          f"{batch_rate(mem, batches[:max(1, n_batches // 3)], True):16.0f}", flush=True)
    del mem, pixels

    # for scale: a 224 px model's training step
    net = build_model("resnet18", 7)
    opt = torch.optim.Adam(net.parameters())

    def step(b):
        x, _, y = disk.batch(b)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    first, second = shuffled(disk.train_rows(), 4, 2, seed=1)
    step(first)  # warm-up
    _, s = timed(lambda: step(second))
    print(f"{'resnet18 training step (scale)':34s} {'':7s} {'':8s} {4 / s:13.1f} img/s (batch 4, streamed)\n",
          flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "fer2013")
    p.add_argument("--rows", type=int, default=40000, help="rows of the generated 224 px array")
    p.add_argument("--batches", type=int, default=30, help="batches timed per figure")
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="where the temp folder goes")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = every core)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    print(f"CPU, {torch.get_num_threads()} threads, load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        fer_part(a.data, Path(tmp), a.batches)
        big_part(Path(tmp) / "gray48.h5", Path(tmp), a.rows, a.batches)
    print(f"load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
