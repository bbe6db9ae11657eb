"""The FER-2013 face template: mean 68-point landmarks of FER-2013 training crops where a detector found the face.

ferpipe.faces.detect aligns faces found in photos onto this template, so that a face cut out of a
photo is framed the way the FER-2013 crops the models learned from are framed (tight box, forehead
partly cut). The landmarks come from the landmarks stage's own cascade (ferpipe.faces.landmarks) at
its default size; only faces with found=True count.

    .venv/bin/python bench/fer_template.py [--data ../shared/data/fer2013] [--per-class 400]
prints the template as the Python literal held in src/ferpipe/faces/detect.py (FER_TEMPLATE).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ferpipe.data.decode import decode_image
from ferpipe.faces.landmarks import detect_landmarks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/fer2013")
    p.add_argument("--per-class", type=int, default=400, help="first N images (sorted names) of each train class")
    a = p.parse_args()
    files = [f for d in sorted((a.data / "train").iterdir()) for f in sorted(d.iterdir())[:a.per_class]]
    images = np.stack([decode_image(f, 48) for f in files])
    lm = detect_landmarks(images, workers=2)
    pts = lm.points[lm.found]
    mean = pts.mean(axis=0)
    print(f"# {len(pts)} of {len(files)} faces found; spread (mean per-point std): {pts.std(axis=0).mean():.4f}")
    print("FER_TEMPLATE = np.array([")
    for i in range(0, 68, 4):
        print("    " + " ".join(f"[{x:.4f}, {y:.4f}]," for x, y in mean[i:i + 4]))
    print("], np.float32)")


if __name__ == "__main__":
    main()
