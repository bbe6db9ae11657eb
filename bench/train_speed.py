"""Training speed on real FER-2013 (CPU): our loop vs the compute limit vs a PNG-per-item DataLoader.

For each model (Deep-Emotion baseline, original STN, the saliency-guided STN, torchvision resnet18)
at batch 128, images/s of:
  (a)  our training loop (ferpipe.train.loop.fit: in-memory uint8 tensors, index batches, batched
       flip/affine augmentation on the device, class-weighted CE, Adam) over N batches;
  (a0) the same with augmentation off;
  (b)  a pure in-memory forward/backward/Adam loop on ready float tensors (the compute limit);
  (c)  a PNG-per-item torch DataLoader like the old Deep-Emotion/Guided-ST code (PIL open per item,
       ToTensor + Normalize, shuffle, num_workers=2; guided models open a second PNG for the guide).
Then one full FER-2013 epoch of the baseline with our loop (all 28,322 training images + a
validation pass over the 3,543 PublicTest images).

The data are built in-process (about 10 s): ferpipe.data.readers.read_folder + ingest.decode_all
at 48 px, 7-class targets, the saliency guide from ferpipe.guides.maps (it needs no landmarks).

    .venv/bin/python bench/train_speed.py [--data ../shared/data/fer2013] [--batches 30] \
        [--models baseline original saliency resnet18] [--threads 0] [--no-epoch] [--nchw]

NHWC (channels_last, the trainer's default) against NCHW, and torch.compile against eager, side by side:
    farm-bench --vs '.venv/bin/python bench/train_speed.py --nchw' -- .venv/bin/python bench/train_speed.py
    farm-bench --vs '.venv/bin/python bench/train_speed.py' -- .venv/bin/python bench/train_speed.py --compile
(With --compile the loop figures include no compile time: each model's warm-up fit compiles it.)

Keep the machine otherwise idle: on 2 shared cores, another busy process slows every figure (the
load average is printed with the table). OMP_WAIT_POLICY defaults to PASSIVE as in the stage
scripts; run with OMP_WAIT_POLICY= (empty: the OpenMP default, spinning) in the environment to compare.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as stages/train.py does

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from ferpipe.data.augment import BatchAugment
from ferpipe.data.ingest import decode_all
from ferpipe.data.readers import read_folder
from ferpipe.data.split import make_split
from ferpipe.data.tensors import load_data
from ferpipe.guides.maps import make_guide
from ferpipe.models import MODEL_SPECS, build_model
from ferpipe.store import write_csv, write_h5
from ferpipe.train.data import channel_stats
from ferpipe.train.loop import FitConfig, Runtime, class_weights, fit, seed_everything
from ferpipe.tv import torchvision

REPO = Path(__file__).resolve().parents[1]
T = torchvision.transforms
AUGMENT = {"hflip": 0.5, "degrees": 10, "scale": [0.9, 1.1], "translate": 0.1}
MEMORY = [torch.channels_last]  # --nchw: the NCHW layout (train.channels_last=false), to compare side by side
COMPILE = [False]               # --compile: torch.compile the loop's model (train.compile=true)


def build_data(fer: Path, out: Path) -> tuple[str, list[str]]:
    """gray48 + saliency guide + split.csv for FER-2013 in `out`; returns (split.csv, PNG path per row)."""
    t0 = time.perf_counter()
    manifest, _ = read_folder(fer)
    images, ok, _ = decode_all(manifest, 48, workers=0, progress=False)
    manifest, images = manifest[ok].reset_index(drop=True), images[ok]
    ids = manifest["id"].to_numpy().astype(str)
    write_h5(out / "gray48.h5", {"images": images, "ids": ids})
    sal = make_guide("saliency", images, None)
    (out / "guides").mkdir(exist_ok=True)
    write_h5(out / "guides" / "saliency.h5", {"images": sal, "ids": ids, "found": np.ones(len(ids), bool)})
    table, _ = make_split(manifest, "classes", folds=5, seed=2020, test=("test",))
    write_csv(out / "split.csv", table)
    print(f"data: {len(images)} images built in {time.perf_counter() - t0:.1f} s "
          f"({int((table['split'] == 'train').sum())} train, {int((table['split'] == 'test').sum())} test)", flush=True)
    return str(out / "split.csv"), manifest["source"].astype(str).tolist()


class PngDataset(torch.utils.data.Dataset):
    """The old way: one PNG opened per item (two for a guided model), ToTensor + Normalize."""

    def __init__(self, paths: list[str], targets: np.ndarray, guided: bool):
        self.paths, self.targets, self.guided = paths, targets, guided
        self.tf = T.Compose([T.ToTensor(), T.Normalize((0.5,), (0.5,))])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = self.tf(Image.open(self.paths[i]).convert("L"))
        # Guided-ST reads the guide map from its own PNG; the same file stands in for it here
        guide = self.tf(Image.open(self.paths[i]).convert("L")) if self.guided else torch.zeros(0)
        return img, guide, int(self.targets[i])


def step_fn(model: nn.Module, opt, weights):
    crit = nn.CrossEntropyLoss(weight=weights)

    def step(x, g, y):
        loss = crit(model(x, g), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def bench_pure(name: str, n_batches: int, batch: int, classes: int) -> float:
    seed_everything(0)
    model = build_model(name, classes)
    model.train()
    model.to(memory_format=MEMORY[0])
    step = step_fn(model, torch.optim.Adam(model.parameters(), 1e-3), torch.ones(classes))
    x = torch.randn(batch, 1, 48, 48).contiguous(memory_format=MEMORY[0])
    g = torch.randn(batch, 1, 48, 48).contiguous(memory_format=MEMORY[0]) if MODEL_SPECS[name]["guide"] else None
    y = torch.randint(0, classes, (batch,))
    step(x, g, y)  # warm-up
    t0 = time.perf_counter()
    for _ in range(n_batches):
        step(x, g, y)
    return n_batches * batch / (time.perf_counter() - t0)


def bench_loop(name: str, data, rows: torch.Tensor, n_batches: int, batch: int, augment: bool, rt: Runtime) -> float:
    seed_everything(0)
    model = build_model(name, len(data.classes))
    data.spec.mean, data.spec.std = channel_stats(data.pixels, rows[:5000])
    weights = class_weights(data.class_counts(rows))
    aug = BatchAugment.from_params(AUGMENT if augment else {}, seed=0)
    cfg = FitConfig(max_epochs=1, batch_size=batch, log_every=0, progress=False,
                    channels_last=MEMORY[0] == torch.channels_last, compile=COMPILE[0])
    fit(model, data, rows[:2 * batch], None, cfg, rt, weights, aug)  # warm-up
    sub = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:n_batches * batch]]
    res = fit(model, data, sub, None, cfg, rt, weights, aug)
    return res.images / res.seconds


def bench_png(name: str, paths: list[str], targets: np.ndarray, n_batches: int, batch: int, classes: int) -> float:
    seed_everything(0)
    model = build_model(name, classes)
    model.train()
    step = step_fn(model, torch.optim.Adam(model.parameters(), 1e-3), torch.ones(classes))
    guided = MODEL_SPECS[name]["guide"] is not None
    loader = torch.utils.data.DataLoader(PngDataset(paths, targets, guided), batch_size=batch, shuffle=True,
                                         num_workers=2, drop_last=True, persistent_workers=False)
    it = iter(loader)
    x, g, y = next(it)  # workers started, first batch (warm-up)
    step(x, g if guided else None, y)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        x, g, y = next(it)
        step(x, g if guided else None, y)
    rate = n_batches * batch / (time.perf_counter() - t0)
    del it
    return rate


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "fer2013"), help="FER-2013 folder layout")
    p.add_argument("--batches", type=int, default=30, help="batches per measurement (resnet18/rmn: a sixth)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--models", nargs="+", default=["baseline", "original", "saliency", "resnet18"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = every core)")
    p.add_argument("--no-epoch", action="store_true", help="skip the full-epoch measurement")
    p.add_argument("--nchw", action="store_true", help="NCHW memory (train.channels_last=false) instead of NHWC")
    p.add_argument("--compile", action="store_true", help="torch.compile the loop's model (train.compile=true)")
    a = p.parse_args()
    MEMORY[0] = torch.contiguous_format if a.nchw else torch.channels_last
    COMPILE[0] = a.compile
    threads = a.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    rt = Runtime(torch.device("cpu"), threads=threads)
    with tempfile.TemporaryDirectory(prefix="ferpipe-speed-") as tmp:
        split_csv, sources = build_data(Path(a.data), Path(tmp))
        results = []
        for name in a.models:
            n = max(3, a.batches // 6) if name in ("resnet18", "rmn") else a.batches
            data = load_data(split_csv, name, gray48=Path(tmp) / "gray48.h5", guides_dir=Path(tmp) / "guides",
                             splits=("train",))
            rows = data.train_rows()
            paths = [sources[i] for i in data.table["index"]]
            targets = data.table["target"].to_numpy()
            r = {"model": name, "batches": n}
            r["b"] = bench_pure(name, n, a.batch, len(data.classes))
            r["a"] = bench_loop(name, data, rows, n, a.batch, True, rt)
            r["a0"] = bench_loop(name, data, rows, n, a.batch, False, rt)
            r["c"] = bench_png(name, paths, targets, n, a.batch, len(data.classes))
            results.append(r)
            print(f"{name}: loop {r['a']:.0f} img/s (no aug {r['a0']:.0f}), pure {r['b']:.0f}, png {r['c']:.0f}",
                  flush=True)
            del data
        load = os.getloadavg()
        print(f"\nbatch {a.batch}, {threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
              f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        print("| model | batches | (a) our loop img/s | (a0) no aug | (b) pure fwd/bwd | (c) PNG DataLoader "
              "| a/b | a0/b | a/c |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['model']} | {r['batches']} | {r['a']:.0f} | {r['a0']:.0f} | {r['b']:.0f} | {r['c']:.0f} "
                  f"| {r['a'] / r['b']:.0%} | {r['a0'] / r['b']:.0%} | {r['a'] / r['c']:.1f}x |")
        if not a.no_epoch:
            data = load_data(split_csv, "baseline", gray48=Path(tmp) / "gray48.h5", guides_dir=Path(tmp) / "guides")
            rows, val = data.train_rows(), data.test_rows()
            seed_everything(0)
            data.spec.mean, data.spec.std = channel_stats(data.pixels, rows)
            model = build_model("baseline", len(data.classes))
            cfg = FitConfig(max_epochs=1, batch_size=a.batch, log_every=0, progress=False,
                            channels_last=not a.nchw, compile=a.compile)
            t0 = time.perf_counter()
            res = fit(model, data, rows, val, cfg, rt, class_weights(data.class_counts(rows)),
                      BatchAugment.from_params(AUGMENT, seed=0))
            total = time.perf_counter() - t0
            print(f"\nbaseline, one FER-2013 epoch: {len(rows)} training images + validation on {len(val)} "
                  f"in {total:.1f} s ({res.images / total:.0f} training img/s incl. validation); "
                  f"val acc after 1 epoch {res.history[-1]['val_acc']:.3f}")


if __name__ == "__main__":
    main()
