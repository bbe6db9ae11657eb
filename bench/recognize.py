"""Front-door speed and accuracy: `ferpipe.recognize` with the bundled model vs the `fer` package.

Side by side in one run on this machine (2 cores), each figure the median of repeated runs:
  photo    one 640x480 photo with one face (scikit-image's astronaut on a gray canvas): detection +
           landmarks + classification, ms per photo (ferpipe.recognize; fer's FER().detect_emotions,
           its OpenCV Haar detector + Keras model);
  crops    every FER-2013 PublicTest image (../shared/data/fer2013/test, 3,543 48x48 crops) as an
           already-cropped face: faces/s, accuracy and macro-F1 (ferpipe: recognize_batch(crops=True);
           fer: detect_emotions with the whole image as the face rectangle, its only public API);
  video    a 640x480 clip with one face (CK+ frames from ../shared/data/sequences on a canvas):
           frames/s of recognize_video (every frame detected, tracked and classified);
  bound    what bounds the crops figure: the network's multiply-adds per face and the rate the CPU
           reached, against the time spent decoding PNGs.

`fer` needs TensorFlow, so it lives in a throwaway virtualenv, never in ferpipe's requirements:
    python3 -m venv /tmp/fervenv && /tmp/fervenv/bin/pip install fer
    .venv/bin/python bench/recognize.py --fer-python /tmp/fervenv/bin/python
(without --fer-python only ferpipe's figures are printed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import cv2
import numpy as np
import torch
from skimage import data as skdata
from sklearn.metrics import f1_score

from ferpipe.recognize import Recognizer

REPO = Path(__file__).resolve().parents[1]
FER_CODE = r'''
import json, sys, time, statistics, cv2, numpy as np
from fer.fer import FER
photo, files, reps = sys.argv[1], json.loads(open(sys.argv[2]).read()), int(sys.argv[3])
det = FER()
img = cv2.imread(photo)
det.detect_emotions(img)
times = []
for _ in range(reps):
    t = time.perf_counter(); faces = det.detect_emotions(img); times.append(time.perf_counter() - t)
labels = []
t = time.perf_counter()
for f in files:
    r = det.detect_emotions(cv2.imread(f), face_rectangles=[(0, 0, 48, 48)])
    labels.append(max(r[0]["emotions"], key=r[0]["emotions"].get) if r else "")
crops_s = time.perf_counter() - t
print(json.dumps({"photo_ms": 1000 * statistics.median(times), "faces": len(faces), "labels": labels,
                  "crops_per_s": len(files) / crops_s}))
'''


def canvas_photo(path: Path) -> np.ndarray:
    img = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)
    canvas = np.full((480, 640, 3), 90, np.uint8)
    canvas[:, 80:560] = cv2.resize(img, (480, 480), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(path), canvas)
    return canvas


def ck_clip(path: Path, sequences: Path, frames_per_image: int = 6) -> int:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (640, 480))
    k = 0
    for seq in sorted((sequences / "frames").iterdir())[:8]:
        for f in sorted(seq.iterdir()):
            face = cv2.resize(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), (200, 200), interpolation=cv2.INTER_CUBIC)
            for _ in range(frames_per_image):
                canvas = np.full((480, 640), 110, np.uint8)
                x, y = 120 + (2 * k) % 300, 120 + k % 9
                canvas[y:y + 200, x:x + 200] = face
                writer.write(cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR))
                k += 1
    writer.release()
    return k


def macs_per_face(model: torch.nn.Module, size: int) -> float:
    """Multiply-adds of one forward pass (conv and linear layers), counted with hooks."""
    total = [0]

    def hook(m, inp, out):
        if isinstance(m, torch.nn.Conv2d):
            total[0] += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, torch.nn.Linear):
            total[0] += out.numel() * m.in_features
    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 1, size, size))
    for h in hs:
        h.remove()
    return float(total[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--fer-python", help="python of a virtualenv with the fer package")
    p.add_argument("--reps", type=int, default=30)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_recognize_"))
    photo = canvas_photo(tmp / "photo.png")
    files = sorted(str(f) for f in (a.data / "fer2013" / "test").glob("*/*.png"))
    truth = [Path(f).parent.name for f in files]
    fer = Recognizer()
    print(f"load average before: {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}")

    fer.recognize(photo)
    times = []
    for _ in range(a.reps):
        t = time.perf_counter()
        res = fer.recognize(photo)
        times.append(time.perf_counter() - t)
    ours = {"photo_ms": 1000 * statistics.median(times), "faces": len(res.faces)}
    t = time.perf_counter()
    table = fer.recognize_batch(files, crops=True)
    ours["crops_per_s"] = len(files) / (time.perf_counter() - t)
    ours["labels"] = list(table["label"])

    n_frames = ck_clip(tmp / "clip.mp4", a.data / "sequences")
    t = time.perf_counter()
    video = fer.recognize_video(tmp / "clip.mp4")
    video_fps = n_frames / (time.perf_counter() - t)

    # what bounds the crops figure
    from ferpipe.data.decode import decode_image
    t = time.perf_counter()
    crops = np.stack([decode_image(f, 48) for f in files])
    decode_s = time.perf_counter() - t
    t = time.perf_counter()
    fer.classify(crops)
    net_s = time.perf_counter() - t
    macs = macs_per_face(fer.members[0].model, 48)

    theirs = None
    if a.fer_python:
        (tmp / "files.json").write_text(json.dumps(files))
        out = subprocess.run([a.fer_python, "-c", FER_CODE, str(tmp / "photo.png"), str(tmp / "files.json"),
                              str(a.reps)], capture_output=True, text=True)
        if out.returncode:
            print("fer failed:", out.stderr[-2000:])
        else:
            theirs = json.loads(out.stdout.strip().splitlines()[-1])

    def acc(labels):
        return 100 * float(np.mean(np.array(labels) == np.array(truth))), \
            100 * float(f1_score(truth, labels, average="macro", labels=sorted(set(truth))))

    print(f"\n| measure | ferpipe (bundled vgg) | fer {'(Haar + Keras)' if theirs else '(not run)'} | ratio |")
    print("|---|---|---|---|")
    rows = [("photo 640x480, one face: ms (median)", ours["photo_ms"], theirs and theirs["photo_ms"], "low"),
            ("PublicTest crops: faces/s", ours["crops_per_s"], theirs and theirs["crops_per_s"], "high")]
    for name, mine, other, better in rows:
        ratio = "" if not other else f"{(other / mine if better == 'low' else mine / other):.1f}x"
        print(f"| {name} | {mine:.1f} | {other:.1f} | {ratio} faster |" if other else f"| {name} | {mine:.1f} | - | |")
    a_ours = acc(ours["labels"])
    a_theirs = acc(theirs["labels"]) if theirs else None
    print(f"| PublicTest accuracy / macro-F1 (%) | {a_ours[0]:.2f} / {a_ours[1]:.2f} | "
          + (f"{a_theirs[0]:.2f} / {a_theirs[1]:.2f} |" if a_theirs else "- |") + " |")
    print(f"| faces found in the photo | {ours['faces']} | {theirs['faces'] if theirs else '-'} | |")
    print(f"| video 640x480, one face: frames/s ({n_frames} frames, face found in "
          f"{100 * video['success'].mean():.0f}%) | {video_fps:.1f} | - | |")
    print(f"\nbound of the crops figure: the network does {macs / 1e6:.1f} M multiply-adds per face; "
          f"{len(files)} faces took {net_s:.2f} s in the network ({len(files) / net_s:.0f} faces/s, "
          f"{2 * macs * len(files) / net_s / 1e9:.0f} GFLOP/s) and {decode_s:.2f} s decoding PNGs "
          f"({len(files) / decode_s:.0f} faces/s)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
