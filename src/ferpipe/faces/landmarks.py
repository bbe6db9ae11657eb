"""68-point face landmarks: a cascade of face detectors, then dlib's 68-point shape predictor.

The old Guided-ST code ran dlib's HOG detector and sent the misses to MTCNN. FER-2013 faces are
tight 48 px crops, so one detector misses many; we try cheap detector passes first and costly ones
only on what is still missing ("pass-major": each pass runs over the whole chunk's remaining
images, which also lets MTCNN take them as one batch). Measured on 1,000 FER-2013 train images at
96 px (`bench/landmarks_passes.py`): dlib finds 73%, equalized +3, padded +4.5, MTCNN +11, MMOD +4.

Every image gets 68 points. `found` is True only when a detector produced the face box; otherwise
the predictor runs on a fixed box (the median dlib box on FER crops) and `method` is "fallback":
a flagged guess, never silent garbage.

Coordinates are (x, y) as a share of the image width and height, so they apply at any size. They
are NOT clipped to [0, 1]: dlib's predictor places points it infers beyond the border (a chin below a
tight FER crop) slightly outside, seen up to ~1.03; clipping would bend the face shape. Code that
indexes pixels with them must clip (the guide maps' drawing clips at the image border).

The detection workers die with the stage (ferpipe.pool): a killed run leaves no worker behind.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from tqdm import tqdm

from ferpipe.imaging import gray_images, resize_batch
from ferpipe.faces.models import dlib_model
from ferpipe.pool import spawn_pool
from ferpipe.store import writes

PASSES = ("dlib", "dlib_equalized", "dlib_padded", "mtcnn", "haar", "mmod")
FALLBACK = "fallback"
# median dlib HOG box on FER-2013 crops at 96 px (left, top, right, bottom), as a share of the size
FALLBACK_BOX = (0.06, 0.17, 0.97, 0.97)
PAD = 0.25  # dlib_padded: border (share of the size) replicated around the face so HOG sees margin


@dataclass
class Landmarks:
    points: np.ndarray  # float32 [N, 68, 2] normalized (x, y)
    found: np.ndarray  # bool [N]
    method: np.ndarray  # str [N]: the pass that found the face box, or "fallback"
    confidence: np.ndarray  # float32 [N]: the detector's own score (compare within one method)
    box: np.ndarray  # float32 [N, 4] normalized (left, top, right, bottom): the whole-pixel box the predictor used


class Detector:
    """Holds the models of the chosen passes (built once per worker process)."""

    def __init__(self, passes=PASSES):
        import dlib

        unknown = [p for p in passes if p not in PASSES]
        if unknown:
            raise ValueError(f"unknown landmark passes {unknown}; choose from {list(PASSES)}")
        self.passes = tuple(passes)
        self.dlib = dlib
        self.hog = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(dlib_model("shape_predictor_68_face_landmarks.dat"))
        self.mtcnn = self.haar = self.mmod = None
        if "mtcnn" in passes:
            import torch

            torch.set_num_threads(1)
            from ferpipe.tv import torchvision  # noqa: F401 - must precede facenet_pytorch
            from facenet_pytorch import MTCNN

            self.mtcnn = MTCNN(keep_all=True, device="cpu", post_process=False, min_face_size=20)
        if "haar" in passes:
            self.haar = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        if "mmod" in passes:
            self.mmod = dlib.cnn_face_detection_model_v1(dlib_model("mmod_human_face_detector.dat"))

    # each pass: (image) -> (box (l, t, r, b) in pixels, score) or None
    def _hog(self, img, pad=0):
        if pad:
            img = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        rects, scores, _ = self.hog.run(img, 0, 0.0)
        if not rects:
            return None
        i = int(np.argmax([r.area() for r in rects]))
        r = rects[i]
        return (r.left() - pad, r.top() - pad, r.right() - pad, r.bottom() - pad), float(scores[i])

    def _haar(self, img):
        rects, _, weights = self.haar.detectMultiScale3(img, 1.1, 3, minSize=(30, 30), outputRejectLevels=True)
        if len(rects) == 0:
            return None
        i = int(np.argmax(rects[:, 2] * rects[:, 3]))
        x, y, w, h = (int(v) for v in rects[i])
        return (x, y, x + w, y + h), float(np.ravel(weights)[i])

    def _mmod(self, img):
        dets = self.mmod(img, 0)
        if len(dets) == 0:
            return None
        d = max(dets, key=lambda d: d.rect.area())
        return (d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()), float(d.confidence)

    def _mtcnn_batch(self, imgs: np.ndarray) -> list:
        import warnings

        import torch

        # oneDNN's convolutions take a code path per CPU instruction set (AVX2, AVX-512, ...): its boxes
        # and scores differed in the last bits between machines. ATen's convolution does not (measured:
        # ONEDNN_MAX_CPU_ISA and ATEN_CPU_CAPABILITY change nothing then), at ~1.2x MTCNN time.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about TF32 on Intel GPUs when the flags change
            with torch.backends.mkldnn.flags(enabled=False):
                boxes, probs = self.mtcnn.detect(np.repeat(imgs[..., None], 3, axis=-1))
        out = []
        for b, p in zip(boxes, probs):
            if b is None:
                out.append(None)
                continue
            b = np.asarray(b, np.float32)
            i = int(np.argmax((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])))
            out.append((tuple(float(v) for v in b[i]), float(np.asarray(p, np.float32)[i])))
        return out

    def detect(self, imgs: np.ndarray) -> Landmarks:
        """Landmarks for uint8 [N, S, S] grayscale images (S ~ 96)."""
        n, h, w = imgs.shape
        pad = int(round(PAD * w))
        boxes: list = [None] * n
        method = np.full(n, FALLBACK, dtype=object)
        conf = np.zeros(n, np.float32)
        for name in self.passes:
            todo = [i for i in range(n) if boxes[i] is None]
            if not todo:
                break
            if name == "mtcnn":
                results = self._mtcnn_batch(imgs[todo])
            else:
                fn = {
                    "dlib": lambda im: self._hog(im),
                    "dlib_equalized": lambda im: self._hog(cv2.equalizeHist(im)),
                    "dlib_padded": lambda im: self._hog(im, pad),
                    "haar": self._haar,
                    "mmod": self._mmod,
                }[name]
                results = [fn(imgs[i]) for i in todo]
            for i, res in zip(todo, results):
                if res is not None:
                    boxes[i], conf[i] = res
                    method[i] = name
        points = np.empty((n, 68, 2), np.float32)
        box_arr = np.empty((n, 4), np.float32)
        fb = tuple(v * s for v, s in zip(FALLBACK_BOX, (w, h, w, h)))
        for i in range(n):
            l, t, r, b = (int(round(v)) for v in (boxes[i] if boxes[i] is not None else fb))
            shape = self.predictor(imgs[i], self.dlib.rectangle(l, t, r, b))
            points[i] = [(p.x, p.y) for p in shape.parts()]
            # the whole-pixel box the predictor ran on: a detector's float box differs in its last bits
            # between CPUs (BLAS code paths), the pixels it rounds to (and so the points) do not
            box_arr[i] = (l, t, r, b)
        conf = np.round(conf, 4)  # the same: a score, comparable within a method, to 4 decimals
        points /= np.array([w, h], np.float32)
        box_arr /= np.array([w, h, w, h], np.float32)
        found = method != FALLBACK
        return Landmarks(points, found, method.astype(str), conf, box_arr)


_worker: Detector | None = None


def _init(passes):
    global _worker
    cv2.setNumThreads(1)
    _worker = Detector(passes)


def _detect_chunk(imgs):
    return _worker.detect(imgs)


def detect_landmarks(images: np.ndarray, size: int = 96, passes=PASSES, workers: int = 1,
                     chunk: int = 256, progress: bool = True) -> Landmarks:
    """Landmarks for uint8 [N, H, W] grayscale images, in parallel over chunks, results in order.

    Images are resized to `size` first: dlib's HOG detector misses most faces at 48 px."""
    unknown = [p for p in passes if p not in PASSES]
    if unknown:
        raise ValueError(f"unknown landmark passes {unknown}; choose from {list(PASSES)}")
    chunks = [resize_batch(images[i:i + chunk], size) for i in range(0, len(images), chunk)]
    bar = tqdm(total=len(images), desc="landmarks", unit="img", disable=not progress)
    parts = []
    if workers <= 1:
        _init(passes)
        for c in chunks:
            parts.append(_detect_chunk(c))
            bar.update(len(c))
    else:
        # spawn, not fork: forking a process whose torch/OpenMP threads already ran deadlocks the child.
        # Each worker builds its own models once (dlib/torch objects don't pickle).
        with spawn_pool(workers, initializer=_init, initargs=(tuple(passes),)) as pool:
            for part in pool.imap(_detect_chunk, chunks):
                parts.append(part)
                bar.update(len(part.found))
    bar.close()
    if not parts:
        return Landmarks(np.zeros((0, 68, 2), np.float32), np.zeros(0, bool), np.zeros(0, str),
                         np.zeros(0, np.float32), np.zeros((0, 4), np.float32))
    return Landmarks(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                       ("points", "found", "method", "confidence", "box")))


@writes("out_path", "metrics_path", "sheet_path")
def run_landmarks(images_path: str, out_path: str, metrics_path: str | None, sheet_path: str | None,
                  size: int = 96, passes=PASSES, workers: int = 0, chunk: int = 256) -> dict:
    """The landmarks stage: read normalized images, write landmarks.h5, metrics and a contact sheet
    (one output set: a failed or killed run leaves the previous three as they were). RGB images
    (ingest.color rgb) are searched in their gray (``ferpipe.imaging.gray_images``)."""
    if int(size) < 1 or int(chunk) < 1:
        raise ValueError(f"landmarks size and chunk must be >= 1, got {size} and {chunk}")
    from ferpipe.params import workers as n_workers
    from ferpipe.plots import draw_points, grid, write_png
    from ferpipe.store import read_h5, write_h5, write_json

    data = read_h5(images_path, ["images", "ids"])
    data["images"] = gray_images(data["images"])
    lm = detect_landmarks(data["images"], size=size, passes=passes, workers=n_workers(workers), chunk=chunk)
    write_h5(out_path, {"landmarks": lm.points, "found": lm.found, "method": lm.method,
                        "confidence": lm.confidence, "box": lm.box, "ids": data["ids"]},
             {"stage": "landmarks", "size": size, "passes": list(passes),
              "coords": "(x, y) as a share of the image width/height; points past the border fall "
                        "slightly outside [0, 1] (not clipped)"})
    n = len(lm.found)
    methods = list(passes) + [FALLBACK]
    metrics = {"images": n, "found_share": float(lm.found.mean()) if n else 0.0,
               "share": {m: float((lm.method == m).mean()) if n else 0.0 for m in methods}}
    if metrics_path:
        write_json(metrics_path, metrics)
    if sheet_path:
        rows, labels = [], []
        for m in methods:
            idx = np.flatnonzero(lm.method == m)[:10]
            if len(idx):
                color = (0, 255, 0) if m != FALLBACK else (0, 0, 255)
                rows.append([draw_points(data["images"][i], lm.points[i], color=color) for i in idx])
                labels.append(f"{m} {metrics['share'][m]:.0%}")
        if rows:
            write_png(sheet_path, grid(rows, cell=96, labels=labels))
    return metrics
