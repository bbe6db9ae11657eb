"""Valence / arousal (task valence_arousal) end to end on REAL FER-2013 faces with GENERATED values.

No AffectNet is available here, so this lays the first images of five FER-2013 classes out as AffectNet's
folder (training.csv, validation.csv, Manually_Annotated_Images/<expression code>/<file>; face box =
the whole 48x48 image) with valence/arousal GENERATED from the class (``VA`` below, plus Gaussian noise,
clipped to [-1, 1]), then runs the pipeline's own stage scripts on it: ingest (format affectnet) ->
gray48 -> split (task valence_arousal; validation.csv, made from FER-2013 PublicTest, is the test split)
-> train -> evaluate. The numbers say that the regression path trains and measures, not how a model
does on real valence/arousal annotations.

    .venv/bin/python bench/valence_generated.py --per-class 400 --test-per-class 100 -S train.max_epochs=20
prints metrics/results.json and the per-target figures of eval.json; everything lands under --out.
tests/test_valence.py builds its data with ``affectnet_layout`` from here.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# generated (valence, arousal) per FER-2013 class, roughly where AffectNet's annotators put these expressions
VA = {"happy": (0.7, 0.4), "sad": (-0.6, -0.3), "angry": (-0.5, 0.6), "neutral": (0.0, -0.2), "surprise": (0.3, 0.8)}
AFFECTNET_CODE = {"neutral": 0, "happy": 1, "sad": 2, "surprise": 3, "fear": 4, "disgust": 5, "angry": 6}


def affectnet_layout(fer_dir: Path, root: Path, train_per_class: int = 80, test_per_class: int = 16,
                     noise: float = 0.1, seed: int = 2020) -> Path:
    """AffectNet's folder under `root` from the first images (sorted names) of the ``VA`` classes of a
    FER-2013 folder (train -> training.csv, test -> validation.csv); valence/arousal GENERATED: the
    class's ``VA`` value plus N(0, noise), clipped to [-1, 1]. Returns `root`."""
    rng = np.random.default_rng(seed)
    imgs = root / "Manually_Annotated_Images"
    header = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal\n"
    for name, split, n in (("training.csv", "train", train_per_class), ("validation.csv", "test", test_per_class)):
        lines = []
        for cls, (v, a) in VA.items():
            code = AFFECTNET_CODE[cls]
            (imgs / str(code)).mkdir(parents=True, exist_ok=True)
            for f in sorted((fer_dir / split / cls).iterdir())[:n]:
                rel = f"{code}/{split}_{f.name}"
                shutil.copy(f, imgs / rel)
                val, aro = np.clip(np.array([v, a]) + rng.normal(0, noise, 2), -1, 1)
                lines.append(f"{rel},0,0,48,48,,{code},{val:.4f},{aro:.4f}")
        (root / name).write_text(header + "\n".join(lines) + "\n")
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared/data/fer2013", help="FER-2013 folder layout")
    p.add_argument("--out", type=Path, default=Path("/tmp/ferpipe-valence"))
    p.add_argument("--per-class", type=int, default=400, help="training images per class (FER-2013 train)")
    p.add_argument("--test-per-class", type=int, default=100, help="test images per class (FER-2013 PublicTest)")
    p.add_argument("--noise", type=float, default=0.1, help="std of the noise added to the generated values")
    p.add_argument("--model", default="baseline")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("-S", dest="set", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to stages/train.py: a train param for this run, the full key (repeatable), "
                        "e.g. -S train.max_epochs=20")
    a = p.parse_args()
    out = a.out
    if out.exists():
        shutil.rmtree(out)
    data = affectnet_layout(a.data, out / "affectnet", a.per_class, a.test_per_class, a.noise)
    params = out / "params.yaml"
    params.write_text(
        f"recipe: generated_va\ntask: valence_arousal\nmodel: {a.model}\n"
        f"dataset: {{format: affectnet, path: {data}, root: {data / 'Manually_Annotated_Images'}}}\n"
        f"ingest: {{size: 48, workers: {a.threads}, max_file_mb: 0}}\ngray48: {{size: 48}}\n"
        "split: {folds: 5, seed: 2020, test: [val], dataset_folds: true}\n"
        f"train: {{folds: [0], final: false, select: loss, threads: {a.threads}, log_every: 5, progress: false}}\n"
        f"evaluate: {{threads: {a.threads}}}\n")
    d = {k: str(out / v) for k, v in {"ingest": "data/ingest/images.h5", "manifest": "data/ingest/manifest.csv",
                                      "gray48": "data/gray48/images.h5", "split": "data/split/split.csv",
                                      "guides": "data/guides", "models": "models"}.items()}
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO / "src")}
    prm = ["--params", str(params)]

    def stage(name: str, *args: str) -> None:
        cmd = [sys.executable, str(REPO / "stages" / f"{name}.py"), *prm, *args]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, env=env, cwd=out)

    stage("ingest", "--out", d["ingest"], "--manifest", d["manifest"], "--rejects", str(out / "data/ingest/rejects.csv"),
          "--metrics", str(out / "metrics/ingest.json"), "--sheet", "", "--quiet")
    stage("gray48", "--images", d["ingest"], "--out", d["gray48"], "--sheet", "")
    stage("split", "--manifest", d["manifest"], "--out", d["split"], "--summary", str(out / "metrics/split.json"))
    common = ["--split", d["split"], "--gray48", d["gray48"], "--guides", d["guides"], "--models", d["models"]]
    stage("train", *common, "--metrics", str(out / "metrics/train.json"), "--live", "",
          "--curves", str(out / "plots/curves.png"), *[x for s in a.set for x in ("-S", s)])
    stage("evaluate", *common, "--metrics", str(out / "metrics/eval.json"), "--results", str(out / "metrics/results.json"),
          "--train-metrics", str(out / "metrics/train.json"), "--predictions", str(out / "plots/predictions.csv"),
          "--confusion", str(out / "plots/scatter.png"), "--errors", str(out / "plots/errors.png"))
    ev = json.loads((out / "metrics/eval.json").read_text())
    print(json.dumps(json.loads((out / "metrics/results.json").read_text())))
    for t in ("valence", "arousal"):
        print(f"{t}: " + ", ".join(f"{k} {ev[f'{k}_{t}']:.3f}" for k in ("rmse", "pearson", "ccc")
                                   if f"{k}_{t}" in ev) + (f", sagr {ev['sagr_valence']:.3f}" if t == "valence" else ""))


if __name__ == "__main__":
    main()
