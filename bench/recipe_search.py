"""Recipe search: many short FER-2013 7-class trainings side by side, to choose the `cpu60` recipe.

Each configuration runs the stage scripts themselves (stages/train.py, then stages/evaluate.py with
TTA 0 and 10) as its own process, all in parallel, on the packed FER-2013 of
`python bench/recipe_search.py --pack DIR` (gray48 uint8 array, xz-compressed, + split.csv: about
56 MB, small enough to travel to a GPU machine). Selection is by the validation accuracy of fold 0
(the `fold0_*` runs); PublicTest is reported, never used to choose. The `all_*` runs train the same
recipe on every training row (train.folds=none, train.final=true) as the recipe itself does.

    python bench/recipe_search.py --pack /tmp/fer7pack --gray48 data/gray48/images.h5 --split data/split/split.csv
    python bench/recipe_search.py --data /tmp/fer7pack --out /tmp/search --device cuda --deadline 480

Epoch budgets are CPU budgets: a configuration's epochs times its CPU epoch time on 2 cores must fit
the recipe's hour, whatever device the search itself runs on.
"""
from __future__ import annotations

import argparse
import json
import lzma
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
COMMON = ["-S", "train.lr_schedule=cosine", "-S", "train.patience=0", "-S", "train.class_weights=false"]
VGG24 = ["-S", "train.model_kwargs={width: 24}"]
VGG32 = ["-S", "train.model_kwargs={width: 32}"]
STRONG_AUG = ["-S", "train.augment={hflip: 0.5, degrees: 15, scale: [0.85, 1.15], translate: 0.12}"]
# name -> train overrides (model vgg); fold0_* select, all_* are the recipe as it would ship
CONFIGS: dict[str, list[str]] = {
    "fold0_w24_e60": VGG24 + ["-S", "train.max_epochs=60"],
    "fold0_w24_e60_ls": VGG24 + ["-S", "train.max_epochs=60", "-S", "train.label_smoothing=0.1"],
    "fold0_w24_e60_aug": VGG24 + ["-S", "train.max_epochs=60"] + STRONG_AUG,
    "fold0_w24_e60_wd": VGG24 + ["-S", "train.max_epochs=60", "-S", "train.weight_decay=0.0005"],
    "fold0_w24_e60_lr2": VGG24 + ["-S", "train.max_epochs=60", "-S", "train.lr=0.002"],
    "fold0_w32_e40": VGG32 + ["-S", "train.max_epochs=40"],
    "fold0_w16_e120": ["-S", "train.model_kwargs={width: 16}", "-S", "train.max_epochs=120"],
    "fold0_w24_e60_ls_aug": VGG24 + ["-S", "train.max_epochs=60", "-S", "train.label_smoothing=0.1"] + STRONG_AUG,
    "all_w24_e60": VGG24 + ["-S", "train.max_epochs=60"],
    "all_w24_e60_ls": VGG24 + ["-S", "train.max_epochs=60", "-S", "train.label_smoothing=0.1"],
    "all_w24_e60_ls_aug": VGG24 + ["-S", "train.max_epochs=60", "-S", "train.label_smoothing=0.1"] + STRONG_AUG,
    "all_w32_e40": VGG32 + ["-S", "train.max_epochs=40"],
}
# Round 2: on 2 CPU cores CompactVGG width 24 trains at ~190 img/s (146 s per FER-2013 epoch), so 60
# epochs do not fit an hour. These thin-first-block variants train ~1.4-2x faster; their epoch
# counts fit ~55 minutes of 2-core training.
THIN = ["-S", "train.model_kwargs={channels: [16, 32, 96, 192], convs: [1, 2, 2, 2]}", "-S", "train.max_epochs=40"]
FIVE = ["-S", "train.model_kwargs={channels: [16, 32, 64, 128, 256], convs: [1, 2, 2, 2, 2]}", "-S", "train.max_epochs=40"]
W24_1 = ["-S", "train.model_kwargs={channels: [24, 48, 96, 192], convs: [1, 2, 2, 2]}", "-S", "train.max_epochs=30"]
CONFIGS.update({"fold0_thin_e40": THIN, "all_thin_e40": THIN, "fold0_five_e40": FIVE, "all_five_e40": FIVE,
                "fold0_w24c1_e30": W24_1, "all_w24c1_e30": W24_1})


def pack(out: Path, gray48: Path, split: Path) -> None:
    from ferpipe.store import read_h5

    d = read_h5(gray48, ["images", "ids"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "images.xz").write_bytes(lzma.compress(np.ascontiguousarray(d["images"]).tobytes(), preset=6))
    (out / "ids.txt").write_text("\n".join(d["ids"]) + "\n")
    (out / "split.csv").write_bytes(split.read_bytes())
    print(f"packed {len(d['ids'])} images into {out}")


def unpack(data: Path, work: Path) -> tuple[Path, Path]:
    from ferpipe.store import write_h5

    ids = np.array((data / "ids.txt").read_text().splitlines())
    images = np.frombuffer(lzma.decompress((data / "images.xz").read_bytes()), np.uint8).reshape(len(ids), 48, 48)
    gray48 = work / "gray48.h5"
    write_h5(gray48, {"images": images, "ids": ids}, {"stage": "gray48", "size": 48})
    return gray48, data / "split.csv"


def launch(name: str, extra: list[str], gray48: Path, split: Path, out: Path, device: str, threads: int):
    o = out / name
    o.mkdir(parents=True, exist_ok=True)
    folds = ["-S", "train.folds=[0]"] if name.startswith("fold0") else ["-S", "train.folds=none", "-S", "train.final=true"]
    py = sys.executable
    train = [py, str(REPO / "stages/train.py"), "-S", "model=vgg", "--split", str(split), "--gray48", str(gray48),
             "--guides", str(out / "noguides"), "--models", str(o / "models"), "--metrics", str(o / "train.json"),
             "--live", "", "--curves", str(o / "curves.png"), "-S", f"train.device={device}", "-S", "train.amp=false",
             "-S", "train.deterministic=false", "-S", f"train.threads={threads}", "-S", "train.log_every=5", *COMMON,
             *folds, *extra]
    evals = [[py, str(REPO / "stages/evaluate.py"), "--models", str(o / "models"), "--split", str(split),
              "--gray48", str(gray48), "--guides", str(out / "noguides"), "--metrics", str(o / f"eval_tta{t}.json"),
              "--results", "", "--predictions", "", "--confusion", "", "--errors", "", "-S", f"evaluate.tta={t}",
              "-S", f"evaluate.device={device}", "-S", f"evaluate.threads={threads}"] for t in (0, 10)]
    script = " && ".join(" ".join(f"'{a}'" for a in cmd) for cmd in [train, *evals])
    log = open(o / "log.txt", "w")
    return subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def summarize(out: Path) -> list[dict]:
    rows = []
    for name in CONFIGS:
        o = out / name
        if not o.is_dir():
            continue
        row = {"name": name}
        if (o / "train.json").is_file():
            t = json.loads((o / "train.json").read_text())
            row["val_acc"] = t.get("val_acc_mean")
        for tta in (0, 10):
            p = o / f"eval_tta{tta}.json"
            if p.is_file():
                e = json.loads(p.read_text())
                row[f"test_acc_tta{tta}"], row[f"test_f1_tta{tta}"] = e["accuracy"], e["macro_f1"]
        if (o / "seconds").is_file():
            row["seconds"] = float((o / "seconds").read_text())
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pack", type=Path, help="write the packed data to this folder and exit")
    p.add_argument("--gray48", type=Path, default=Path("data/gray48/images.h5"))
    p.add_argument("--split", type=Path, default=Path("data/split/split.csv"))
    p.add_argument("--data", type=Path, help="a folder written by --pack")
    p.add_argument("--out", type=Path, default=Path("/tmp/recipe_search"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--deadline", type=float, default=480, help="seconds; runs still going are stopped")
    p.add_argument("--only", nargs="*", help="configuration names (default: all)")
    p.add_argument("--epochs", type=int, help="override every configuration's max_epochs (a smoke test)")
    a = p.parse_args()
    if a.pack:
        pack(a.pack, a.gray48, a.split)
        return
    a.out.mkdir(parents=True, exist_ok=True)
    gray48, split = unpack(a.data, a.out)
    t0 = time.time()
    smoke = ["-S", f"train.max_epochs={a.epochs}"] if a.epochs else []
    procs = {n: (launch(n, CONFIGS[n] + smoke, gray48, split, a.out, a.device, a.threads), time.time())
             for n in (a.only or CONFIGS)}
    while procs and time.time() - t0 < a.deadline:
        for n, (proc, start) in list(procs.items()):
            if proc.poll() is not None:
                (a.out / n / "seconds").write_text(f"{time.time() - start:.1f}")
                print(f"{n}: exit {proc.returncode} after {time.time() - start:.0f} s", flush=True)
                del procs[n]
        time.sleep(2)
    for n, (proc, _) in procs.items():
        proc.kill()
        print(f"{n}: stopped at the deadline", flush=True)
    rows = summarize(a.out)
    (a.out / "summary.json").write_text(json.dumps(rows, indent=1))
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
