"""Faces in photos and video frames: detection, 68 landmarks, and a crop framed like FER-2013's.

The pipeline's own stages work on datasets of face crops (FER-2013, CK+ after ingest). A photo is
different: the face can be anywhere and any size. ``FaceDetector.detect(gray)`` finds every face
with a cascade of passes, cheapest first, stopping at the first pass that finds any face:

  hog_fast  dlib's HOG detector on the photo scaled so that a face of ``fast_fraction`` of the
            short side is just detectable (dlib finds faces of about 70 px and up): ~12 ms at 640x480;
  hog       the same on the full-resolution photo (faces down to ~70 px): ~32 ms at 640x480;
  mtcnn     facenet-pytorch's MTCNN (faces down to ``min_face`` px): ~55-110 ms at 640x480.

dlib's 68-point predictor then runs on each box at full resolution. The landmarks place the crop:
``align_face`` maps them onto ``FER_TEMPLATE`` (the mean landmarks of FER-2013 crops, from
``bench/fer_template.py``) with a similarity transform (rotation, scale, shift), so a face cut out of
a photo is framed, scaled and levelled the way the training crops are. The crop is taken at the
face's own resolution and then resized with ``ferpipe.imaging.resize`` exactly as ingest resizes a crop.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ferpipe.imaging import resize
from ferpipe.faces.models import dlib_model

DETECTOR_PASSES = ("hog_fast", "hog", "mtcnn")
DLIB_MIN_FACE = 70  # px: about the smallest face dlib's HOG detector finds without upsampling

# Mean (x, y) of the 68 points on FER-2013 training crops, normalized to the crop side:
# `.venv/bin/python bench/fer_template.py` (2,684 found faces of the first 400 per class).
FER_TEMPLATE = np.array([
    [0.0933, 0.3853], [0.0975, 0.4932], [0.1111, 0.6000], [0.1332, 0.7040],
    [0.1720, 0.8004], [0.2313, 0.8845], [0.3076, 0.9489], [0.3965, 0.9921],
    [0.4974, 1.0021], [0.5989, 0.9915], [0.6891, 0.9480], [0.7672, 0.8838],
    [0.8279, 0.7995], [0.8667, 0.7017], [0.8875, 0.5957], [0.8989, 0.4870],
    [0.9020, 0.3773], [0.1604, 0.2935], [0.2114, 0.2504], [0.2809, 0.2387],
    [0.3528, 0.2487], [0.4205, 0.2767], [0.5559, 0.2750], [0.6249, 0.2456],
    [0.6981, 0.2339], [0.7697, 0.2454], [0.8238, 0.2879], [0.4891, 0.3633],
    [0.4893, 0.4347], [0.4891, 0.5054], [0.4892, 0.5773], [0.4102, 0.6279],
    [0.4490, 0.6422], [0.4911, 0.6538], [0.5332, 0.6416], [0.5725, 0.6270],
    [0.2387, 0.3757], [0.2827, 0.3492], [0.3372, 0.3493], [0.3841, 0.3844],
    [0.3338, 0.3958], [0.2800, 0.3955], [0.5984, 0.3828], [0.6448, 0.3467],
    [0.6997, 0.3460], [0.7451, 0.3718], [0.7034, 0.3922], [0.6491, 0.3934],
    [0.3437, 0.7742], [0.3949, 0.7416], [0.4511, 0.7255], [0.4922, 0.7359],
    [0.5337, 0.7249], [0.5916, 0.7406], [0.6461, 0.7724], [0.5948, 0.8257],
    [0.5386, 0.8494], [0.4936, 0.8541], [0.4489, 0.8501], [0.3937, 0.8267],
    [0.3661, 0.7751], [0.4513, 0.7621], [0.4926, 0.7657], [0.5344, 0.7615],
    [0.6229, 0.7737], [0.5353, 0.7951], [0.4928, 0.8001], [0.4507, 0.7955],
], np.float32)


@dataclass
class Face:
    """One face in a photo: box (x0, y0, x1, y1) and landmarks [68, 2] (x, y) in the photo's pixels."""

    box: np.ndarray
    confidence: float   # the detector's own score (dlib HOG: SVM margin; MTCNN: probability)
    method: str         # the detector pass that found it
    landmarks: np.ndarray


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 least-squares similarity transform (rotation, uniform scale, shift) taking src points to dst
    (Umeyama 1991, no reflection)."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rot = u @ np.diag(sign) @ vt
    scale = (sig * sign).sum() / max(s.var(0).sum(), 1e-12)
    m = np.empty((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - m[:, :2] @ mu_s
    return m


def align_face(gray: np.ndarray, landmarks: np.ndarray, size: int, margin: float = 1.0) -> np.ndarray:
    """uint8 [size, size]: the face cut out of `gray` so its landmarks sit on FER_TEMPLATE.

    ``margin`` > 1 shows more around the face (the template shrinks about the crop centre). The crop
    is first taken at the face's own resolution (no aliasing when a large face shrinks), then resized
    to `size` with ferpipe.imaging.resize, as ingest resizes; outside the photo the border is replicated.
    """
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    target = (FER_TEMPLATE - 0.5) / float(margin) + 0.5
    unit = similarity(landmarks, target)                        # photo px -> [0, 1] crop coordinates
    native = int(np.clip(round(1.0 / max(np.hypot(*unit[0, :2]), 1e-9)), 8, 1024))  # photo px per crop side
    m = unit * native
    crop = cv2.warpAffine(np.ascontiguousarray(gray), m, (native, native), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)
    return resize(crop, size)


class FaceDetector:
    """Faces with 68 landmarks in uint8 gray photos, through the passes of the module docstring."""

    def __init__(self, passes=DETECTOR_PASSES, fast_fraction: float = 0.2, min_face: int = 20,
                 min_confidence: float = 0.2, mtcnn_threshold: float = 0.9):
        import dlib

        unknown = [p for p in passes if p not in DETECTOR_PASSES]
        if unknown or not passes:
            raise ValueError(f"unknown face detector passes {unknown}; choose from {list(DETECTOR_PASSES)}")
        self.passes = tuple(passes)
        self.fast_fraction = float(fast_fraction)
        self.min_face = int(min_face)
        self.min_confidence = float(min_confidence)
        self.mtcnn_threshold = float(mtcnn_threshold)
        self.dlib = dlib
        self.hog = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(dlib_model("shape_predictor_68_face_landmarks.dat"))
        self._mtcnn = None

    def _hog(self, gray: np.ndarray, scale: float) -> list[tuple[np.ndarray, float]]:
        img = gray if scale >= 1.0 else cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        rects, scores, _ = self.hog.run(img, 0, self.min_confidence)
        s = min(scale, 1.0)
        return [(np.array([r.left(), r.top(), r.right(), r.bottom()], np.float32) / s, float(c))
                for r, c in zip(rects, scores)]

    def _mtcnn_boxes(self, gray: np.ndarray) -> list[tuple[np.ndarray, float]]:
        if self._mtcnn is None:
            from ferpipe.tv import torchvision  # noqa: F401 - must precede facenet_pytorch
            from facenet_pytorch import MTCNN

            self._mtcnn = MTCNN(keep_all=True, device="cpu", post_process=False, min_face_size=self.min_face)
        boxes, probs = self._mtcnn.detect(np.repeat(gray[None, ..., None], 3, axis=-1))
        if boxes[0] is None:
            return []
        b, p = np.asarray(boxes[0], np.float32), np.asarray(probs[0], np.float32)
        return [(b[i], float(p[i])) for i in range(len(b)) if p[i] >= self.mtcnn_threshold]

    def boxes(self, gray: np.ndarray) -> tuple[list[tuple[np.ndarray, float]], str]:
        """(boxes with scores, the pass that found them) — ([], "") when no pass finds a face."""
        h, w = gray.shape
        for name in self.passes:
            if name == "hog_fast":
                scale = DLIB_MIN_FACE / max(self.fast_fraction * min(h, w), 1.0)
                if scale >= 0.95:       # the photo is small: the full-resolution pass does the same work
                    continue
                found = self._hog(gray, scale)
            elif name == "hog":
                found = self._hog(gray, 1.0)
            else:
                found = self._mtcnn_boxes(gray)
            if found:
                return found, name
        return [], ""

    def landmarks(self, gray: np.ndarray, box: np.ndarray) -> np.ndarray:
        """dlib's 68 points (x, y) in pixels for a face box (x0, y0, x1, y1)."""
        l, t, r, b = (int(round(float(v))) for v in box)
        shape = self.predictor(gray, self.dlib.rectangle(l, t, r, b))
        return np.array([(p.x, p.y) for p in shape.parts()], np.float32)

    def detect(self, gray: np.ndarray) -> list[Face]:
        """Every face in a uint8 gray photo [H, W], largest first."""
        gray = np.ascontiguousarray(gray)
        if gray.dtype != np.uint8 or gray.ndim != 2:
            raise ValueError(f"detect needs a uint8 gray image [H, W], got {gray.dtype} {gray.shape}")
        found, method = self.boxes(gray)
        faces = [Face(box, conf, method, self.landmarks(gray, box)) for box, conf in found]
        faces.sort(key=lambda f: -float((f.box[2] - f.box[0]) * (f.box[3] - f.box[1])))
        return faces
