"""Benchmark the sequence stages on real CK+ (../shared/data/sequences) and print tables of figures.

Steps (each cached in --out; run all, or name some):
  prep       CK+ through the real stage scripts: ingest (-S dataset.format=ck_sequences) -> gray48
  pretrain   a registry Simple-CNN ("baseline") trained on FER-2013 train (10% held out for the best
             epoch), the CNN the LSTM-on-CNN features come from; its FER-2013 PublicTest accuracy
  features   features stage speed (images/s): the FER CNN over the CK+ frames and over FER-2013 test
  compare    subject-independent 10-fold on CK+ (262 sequences, 7 classes), same folds for every row:
             the single-frame apex CNN (last frame only) vs sequence models, with training time;
             accuracy after the first k frames for the sequence models (anticipation)

--cnn CHECKPOINT uses another FER-2013 CNN for the frozen-feature rows (e.g. the train stage's
models/fold0.pt of `dvc exp run -S task=classes -S model=vgg`): `features` then dumps its "flatten"
layer (the classifier's input) to features_<name>_flatten.h5, and the rows named "frozen CNN" use it.

    .venv/bin/python bench/sequences.py [steps ...] [--out /tmp/ferpipe-bench-seq] [--threads 1] [--cnn PT]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "src"))

from ferpipe.data.labels import FER2013_CLASSES  # noqa: E402
from ferpipe.data.augment import BatchAugment  # noqa: E402
from ferpipe.data.tensors import TensorData  # noqa: E402
from ferpipe.models import build_model  # noqa: E402
from ferpipe.models.inputs import InputSpec  # noqa: E402
from ferpipe.models.checkpoint import save_checkpoint  # noqa: E402
from ferpipe.sequences.features import load_cnn, run_cnn, run_features  # noqa: E402
from ferpipe.sequences.config import SequenceConfig  # noqa: E402
from ferpipe.sequences.data import load_sequences  # noqa: E402
from ferpipe.sequences.train import cross_validate  # noqa: E402
from ferpipe.train.loop import CrossEntropy, FitConfig, Runtime, evaluate_rows, fit, seed_everything  # noqa: E402


def sh(cmd):
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{res.stdout}\n{res.stderr}")
    return res.stdout


def prep(out: Path):
    py = sys.executable
    t0 = time.perf_counter()
    sh([py, "stages/ingest.py", "-S", "dataset.format=ck_sequences", "-S", f"dataset.path={SHARED / 'sequences'}",
        "-S", "ingest.workers=1",
        "--out", out / "ingest/images.h5", "--manifest", out / "ingest/manifest.csv", "--rejects", out / "ingest/rejects.csv",
        "--metrics", out / "ingest.json", "--sheet", out / "ingest.png", "--quiet"])
    sh([py, "stages/gray48.py", "--images", out / "ingest/images.h5", "--out", out / "gray48/images.h5", "--sheet", ""])
    print(f"prep: CK+ ingest + gray48 in {time.perf_counter() - t0:.1f} s: {json.loads((out / 'ingest.json').read_text())}")


def load_fer(split: str):
    images, labels = [], []
    for c, name in enumerate(FER2013_CLASSES):
        for f in sorted((SHARED / "fer2013" / split / name).iterdir()):
            images.append(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE))
            labels.append(c)
    return np.stack(images), np.array(labels)


def pretrain(out: Path, epochs: int, seed: int = 2020):
    """Simple-CNN on FER-2013 train with the pipeline's loop (ferpipe.train.loop.fit): Adam 1e-3, batch 128,
    flip + shift 3 px, the best epoch by accuracy on a 10% hold-out."""
    path = out / f"fer_baseline_{epochs}ep.pt"
    if path.exists():
        print(f"pretrain: cached {path}")
        return path
    t0 = time.perf_counter()
    x, y = load_fer("train")
    xt, yt = load_fer("test")
    rng = np.random.default_rng(seed)
    held = np.zeros(len(x), bool)
    held[rng.permutation(len(x))[: len(x) // 10]] = True
    table = pd.DataFrame({"target": np.concatenate([y, yt]), "fold": np.r_[np.where(held, 0, 1), np.full(len(yt), -1)],
                          "split": ["train"] * len(x) + ["test"] * len(yt)})
    data = TensorData(np.concatenate([x, xt])[:, None], table, list(FER2013_CLASSES), InputSpec())
    seed_everything(seed)
    model = build_model("baseline", len(FER2013_CLASSES))
    cfg = FitConfig(max_epochs=epochs, patience=0, batch_size=128, lr=1e-3, select="accuracy", seed=seed, log_every=1)
    res = fit(model, data, data.val_rows(1), data.val_rows(0), cfg, Runtime(torch.device("cpu")),
              augment=BatchAugment.from_params({"hflip": 0.5, "translate": 3 / 48}, seed=seed))
    model.load_state_dict(res.best_state)
    test = evaluate_rows(model, data, data.test_rows(), CrossEntropy(), Runtime(torch.device("cpu")))[1]
    save_checkpoint(path, model, "baseline", list(FER2013_CLASSES),
                    meta={"dataset": "fer2013", "holdout_acc": res.best_val_acc, "publictest_acc": test, "epochs": epochs})
    print(f"pretrain: FER-2013 Simple-CNN, best hold-out {res.best_val_acc:.4f}, PublicTest {test:.4f}, "
          f"{time.perf_counter() - t0:.0f} s")
    return path


def cnn_features(out: Path, cnn: Path) -> Path:
    """The --cnn checkpoint's flatten layer over the CK+ frames (cached per checkpoint file name)."""
    path = out / f"features_{cnn.parent.parent.name}_{cnn.stem}_flatten.h5"
    m = run_features(out / "gray48/images.h5", out / "ingest/manifest.csv", path, checkpoint=cnn, layer="flatten")
    print(f"features: {cnn} flatten -> {path.name}: {m['shape']}, {m['images_per_s']} frames/s")
    return path


def features(out: Path, ckpt: Path, layers=("fc1", "dropout")):
    rows = []
    for layer in layers:
        m = run_features(out / "gray48/images.h5", out / "ingest/manifest.csv", out / f"features_{layer}.h5",
                         checkpoint=ckpt, layer=layer, batch_size=1024)
        rows.append((f"features stage, CK+ 1043 frames, layer {layer}", m["images_per_s"], m["seconds"], m["shape"]))
    run_features(out / "gray48/images.h5", out / "ingest/manifest.csv", out / "features_images.h5", mode="images")
    xt, _ = load_fer("test")
    model, info = load_cnn(ckpt)
    run_cnn(model, xt[:512], "fc1")  # warm-up
    for bs in (256, 1024, 4096):
        t0 = time.perf_counter()
        run_cnn(model, xt, "fc1", bs)
        dt = time.perf_counter() - t0
        rows.append((f"run_cnn fc1, FER-2013 test 3543 frames, batch {bs}", round(len(xt) / dt, 1), round(dt, 2), [50, 1, 1]))
    print("\n| what | images/s | seconds | shape |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |")


COMPARE = {
    # name: (features file, config overrides); same 10 folds for every row
    "apex CNN (frame, last frame, from scratch)": ("images", dict(model="frame", max_len=1, encoder="simple", augment=True)),
    "apex CNN (frame, last frame, FER init)": ("images", dict(model="frame", max_len=1, encoder="simple", augment=True,
                                                              encoder_init="FER")),
    "LSTM on frozen FER-CNN fc1 features": ("fc1", dict(model="lstm")),
    "CBM-15 on frozen FER-CNN fc1 features (1x1)": ("fc1", dict(model="cbm")),
    "CBM-15 on frozen FER-CNN feature maps (3x3, 16 ch)": ("dropout", dict(model="cbm", cbm={"hidden": 16})),
    "LSTM end-to-end (simple encoder, from scratch)": ("images", dict(model="lstm", encoder="simple", augment=True)),
    "LSTM end-to-end (simple encoder, FER init)": ("images", dict(model="lstm", encoder="simple", augment=True,
                                                                   encoder_init="FER")),
    "LSTM end-to-end (simple encoder, FER init, hidden 64)": ("images", dict(model="lstm", encoder="simple", augment=True,
                                                                              encoder_init="FER",
                                                                              lstm={"hidden": 64})),
    "LSTM end-to-end (FER init, hidden 64), anticipation loss": ("images", dict(
        model="lstm", encoder="simple", augment=True, encoder_init="FER", lstm={"hidden": 64},
        anticipation_first=4, anticipation_weight=1.0)),
    "LSTM-on-CNN end-to-end (Simple-CNN up to fc1, FER init)": ("images", dict(
        model="lstm", encoder="simple_fc", augment=True, encoder_init="FER")),
    "CBM-15 end-to-end on Simple-CNN fc1 (1x1, FER init)": ("images", dict(
        model="cbm", encoder="simple_fc", augment=True, encoder_init="FER")),
    "CBM-15 end-to-end (simple encoder, FER init, 16 ch)": ("images", dict(model="cbm", encoder="simple", augment=True,
                                                                            encoder_init="FER", cbm={"hidden": 16})),
    # rows on the --cnn checkpoint's features (the classifier's input, e.g. 192-d for vgg)
    "apex frame on frozen CNN features (frame model, last frame)": ("cnn", dict(model="frame", max_len=1)),
    "LSTM on frozen CNN features": ("cnn", dict(model="lstm")),
    "LSTM on frozen CNN features, anticipation loss": ("cnn", dict(model="lstm", anticipation_first=4)),
    "CBM-15 on frozen CNN features": ("cnn", dict(model="cbm")),
}


def compare(out: Path, ckpt: Path, names, epochs: int, patience: int, folds: int, cnn: Path | None = None):
    rows = []
    for name in names:
        feat, over = COMPARE[name]
        over = {**over}
        if over.get("encoder_init") == "FER":
            over["encoder_init"] = str(ckpt)
        section = {"folds": folds, "train": {"epochs": epochs, "patience": patience}}
        for key, value in over.items():  # the flat names of COMPARE into the params layout
            if key in SequenceConfig.TRAIN_KEYS:
                section["train"][key] = value
            elif key.startswith("anticipation_"):
                section.setdefault("anticipation", {})[key[len("anticipation_"):]] = value
            else:
                section[key] = value
        cfg = SequenceConfig.from_params(section)
        if feat == "cnn":
            if cnn is None:
                print(f"{name}: skipped (needs --cnn)")
                continue
            path = out / f"features_{cnn.parent.parent.name}_{cnn.stem}_flatten.h5"
        else:
            path = out / f"features_{feat}.h5"
        data = load_sequences(path, "classify")
        t0 = time.perf_counter()
        cv = cross_validate(data, cfg, progress=lambda s: print(f"  {name}: {s}", flush=True))
        dt = time.perf_counter() - t0
        k = cv.get("by_first_k", {})
        rows.append((name, cv["mean"]["accuracy"], cv["std"]["accuracy"], cv["mean"]["macro_f1"], cv["pooled"]["accuracy"],
                     " / ".join(f"{v['mean']:.3f}" for v in k.values()), dt))
        print(f"{name}: {cv['mean']['accuracy']:.4f} +- {cv['std']['accuracy']:.4f} ({dt:.0f} s)", flush=True)
        with open(out / "compare.jsonl", "a") as f:
            f.write(json.dumps({"name": name, "cnn": str(cnn) if feat == "cnn" else ckpt.name, "mean": cv["mean"], "std": cv["std"], "pooled": cv["pooled"],
                                "by_first_k": k, "seconds": dt, "epochs": epochs, "patience": patience}) + "\n")
    print(f"\nCK+ 262 sequences, {folds}-fold subject-independent (same folds), max {epochs} epochs, patience {patience}, "
          f"FER CNN {ckpt.name}")
    print("| model | mean acc | std | macro-F1 | pooled acc | acc after first k=1/2/3/4 frames | train s (all folds) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.4f} | {r[2]:.4f} | {r[3]:.4f} | {r[4]:.4f} | {r[5]} | {r[6]:.0f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("steps", nargs="*", default=["prep", "pretrain", "features", "compare"])
    p.add_argument("--out", default="/tmp/ferpipe-bench-seq")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pretrain-epochs", type=int, default=30, help="FER-2013 epochs of the CNN (cached per value)")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--patience", type=int, default=30)
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--only", nargs="*", help="compare: names (substrings) of the rows to run")
    p.add_argument("--cnn", type=Path, help="another CNN checkpoint for the 'frozen CNN' rows (see above)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / f"fer_baseline_{a.pretrain_epochs}ep.pt"
    if "prep" in a.steps:
        prep(out)
    if "pretrain" in a.steps:
        ckpt = pretrain(out, a.pretrain_epochs)
    if "features" in a.steps:
        if a.cnn:
            cnn_features(out, a.cnn)
        else:
            features(out, ckpt)
    if "compare" in a.steps:
        names = [n for n in COMPARE if not a.only or any(s.lower() in n.lower() for s in a.only)]
        compare(out, ckpt, names, a.epochs, a.patience, a.folds, a.cnn)


if __name__ == "__main__":
    main()
