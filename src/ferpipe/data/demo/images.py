"""The image demo: <split>/<class>/<n>_<identity>.png in the Kaggle FER-2013 folder layout (make_demo).

Train and test images come from disjoint identity sets (LFW may hold two photos of one person; the
subset has no names to check that).
"""
from __future__ import annotations

import os
import textwrap
import time

import cv2
import numpy as np

from ferpipe.data.demo.expressions import CLASSES, expression_targets, rbf_weights
from ferpipe.data.demo.render import render
from ferpipe.data.demo.templates import _hog_detector, load_templates
from ferpipe.store import staged, write_json, writes

SPLITS = ("train", "test")
DETECT_SIZE = 96      # the detection rate is measured like the landmarks stage sees faces


def split_identities(n: int, train_per_class: int, test_per_class: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint train/test template indices (shared only if there is a single identity)."""
    order = rng.permutation(n)
    if test_per_class <= 0:
        return order, order[:0]
    if train_per_class <= 0:
        return order[:0], order
    if n < 2:
        return order, order
    n_test = int(np.clip(round(n * test_per_class / (train_per_class + test_per_class)), 1, n - 1))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def detection_rate(images: list[np.ndarray]) -> float:
    """Share of images in which dlib's HOG frontal detector (96 px, upsample 0) finds a face."""
    if not images:
        return float("nan")
    det = _hog_detector()
    hits = 0
    for img in images:
        if img.shape != (DETECT_SIZE, DETECT_SIZE):
            interp = cv2.INTER_AREA if img.shape[0] > DETECT_SIZE else cv2.INTER_CUBIC
            img = cv2.resize(img, (DETECT_SIZE, DETECT_SIZE), interpolation=interp)
        hits += len(det(img, 0)) > 0
    return hits / len(images)


def generate(seed: int = 2020, train_per_class: int = 80, test_per_class: int = 20, size: int = 96):
    """Yield (split, class, file name, uint8 image) in a fixed order; no files written."""
    templates, _ = load_templates()
    if not templates:
        raise RuntimeError("dlib found no usable face in the packaged images")
    rng = np.random.default_rng(seed)
    train_ids, test_ids = split_identities(len(templates), train_per_class, test_per_class, rng)
    weights: dict[tuple[int, str], np.ndarray | None] = {}  # per (template, class), on first use

    def field(k: int, cls: str) -> np.ndarray | None:
        if (k, cls) not in weights:
            pts = templates[k].points
            weights[k, cls] = None if cls == "neutral" else rbf_weights(pts, expression_targets(cls, pts))
        return weights[k, cls]

    for split, ids, n in (("train", train_ids, train_per_class), ("test", test_ids, test_per_class)):
        for cls in CLASSES:
            # cycle through the identities (shuffled per class) so each is used about equally
            reps = -(-n // max(len(ids), 1))
            picks = np.concatenate([rng.permutation(ids) for _ in range(reps)])[:n] if n else []
            for i, k in enumerate(picks):
                t = templates[k]
                yield split, cls, f"{i:04d}_{t.name}.png", render(t, cls, size, rng, field(k, cls))


README = """\
ferpipe demo dataset (generated, not real data)
===============================================

Made by `python stages/demo.py` (ferpipe.data.demo.make_demo) with seed={seed},
train_per_class={train}, test_per_class={test}, size={size}. The same parameters give byte-identical
files, so there is nothing to download and nothing to keep.

Layout: the Kaggle FER-2013 folder layout, <split>/<class>/<n>_<identity>.png, grayscale PNG,
{size}x{size}. Classes: {classes}.

How it was made: face images that ship with scikit-image (the astronaut and the 100 faces of
lfw_subset, 25x25, upscaled 4x) were located with dlib's HOG detector and 68-point predictor and
aligned on their landmarks. {n_ids} identities were usable; dropped: no face found ({no_face}),
mouth open so not neutral ({open_mouth}). Each class is a smooth warp driven by landmark motions
(happy: mouth corners up and out, cheeks up, teeth; sad: corners down, inner brows up; surprise: brows
up, eyes wide, jaw dropped, dark open mouth; angry: inner brows down and together, lips pressed,
furrows), limited so that it never folds, with a random strength per image, then a random rotation
(+-10 deg), scale (0.9-1.1), shift, brightness/contrast/gamma, noise and horizontal flip.
Train ({n_train_ids} identities) and test ({n_test_ids} identities) use disjoint identities.
dlib's HOG detector (96 px, upsample 0) finds a face in {rate:.1%} of the images.

It exists so `dvc repro` runs end to end on a fresh machine; numbers measured on it say nothing about
real facial expression recognition.
"""


def _wrap(text: str, width: int = 100) -> str:
    paras = text.strip("\n").split("\n\n")
    body = [paras[0]] + [textwrap.fill(" ".join(p.split()), width) for p in paras[1:]]
    return "\n\n".join(body) + "\n"


@writes("metrics_path", dirs=["out_dir"])
def make_demo(out_dir: str | os.PathLike, seed: int = 2020, train_per_class: int = 80, test_per_class: int = 20,
              size: int = 96, metrics_path: str | os.PathLike | None = None) -> dict:
    """Write the demo dataset to out_dir (replacing any old one atomically) and return its metrics.

    The metrics (also written as JSON to metrics_path if given) hold images per split and class, the
    identities used and the share of images in which dlib's HOG detector finds a face. The returned
    dict also has "seconds" (generation time), which the JSON file leaves out to stay reproducible.
    """
    if size < 16:
        raise ValueError(f"size {size} is too small for a face")
    if train_per_class < 0 or test_per_class < 0:
        raise ValueError("images per class must be >= 0")
    t0 = time.perf_counter()
    templates, report = load_templates()
    tmp = staged(out_dir)  # this run's staging folder (ferpipe.store): it replaces out_dir whole on success
    counts = {s: {c: 0 for c in CLASSES} for s in SPLITS}
    used: dict[str, set] = {s: set() for s in SPLITS}
    images: dict[tuple[str, str], list[np.ndarray]] = {}
    for split in SPLITS:  # every class folder exists, even with 0 images per class
        for cls in CLASSES:
            (tmp / split / cls).mkdir(parents=True)
    for split, cls, name, img in generate(seed, train_per_class, test_per_class, size):
        ok, buf = cv2.imencode(".png", img)
        if not ok:
            raise RuntimeError(f"could not encode {name}")
        (tmp / split / cls / name).write_bytes(buf.tobytes())
        counts[split][cls] += 1
        used[split].add(name.split("_", 1)[1].removesuffix(".png"))
        images.setdefault((split, cls), []).append(img)
    seconds = time.perf_counter() - t0
    rates = {key: detection_rate(imgs) for key, imgs in images.items()}
    n_all = sum(len(v) for v in images.values())
    rate = sum(rates[k] * len(v) for k, v in images.items()) / n_all if n_all else float("nan")
    (tmp / "README.txt").write_text(_wrap(README.format(
        seed=seed, train=train_per_class, test=test_per_class, size=size, classes=", ".join(CLASSES),
        n_ids=len(templates), n_train_ids=len(used["train"]), n_test_ids=len(used["test"]),
        no_face=", ".join(report["no_face"]) or "none", open_mouth=", ".join(report["open_mouth"]) or "none",
        rate=rate)))

    def share(keys):
        n = sum(len(images[k]) for k in keys)
        return round(sum(rates[k] * len(images[k]) for k in keys) / n, 4) if n else None

    metrics = {
        "seed": seed,
        "size": size,
        "images": {s: {**counts[s], "total": sum(counts[s].values())} for s in SPLITS},
        "identities": {
            "candidates": report["candidates"],
            "no_face": len(report["no_face"]),
            "open_mouth_dropped": len(report["open_mouth"]),
            "usable": len(templates),
            "train": len(used["train"]),
            "test": len(used["test"]),
            "shared_train_test": len(used["train"] & used["test"]),
        },
        "face_detected": {
            "all": share(list(images)),
            **{s: share([k for k in images if k[0] == s]) for s in SPLITS},
            **{c: share([k for k in images if k[1] == c]) for c in CLASSES},
        },
    }
    if metrics_path:
        write_json(metrics_path, metrics)
    return {**metrics, "seconds": round(seconds, 2)}
