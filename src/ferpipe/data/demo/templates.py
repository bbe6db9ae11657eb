"""The identity templates of the demo: face images that ship with scikit-image, landmarked and aligned.

Nothing is downloaded. The identities are face images that ship with scikit-image: the astronaut
(``skimage.data.astronaut()``) and the 100 faces of ``skimage.data.lfw_subset()`` (its first 100
images are 25x25 faces, the last 100 are non-faces). dlib's HOG detector + 68-point predictor find the
landmarks of each template once; templates without a face, or with a clearly open mouth (they would
not read as neutral), are dropped. Every template is aligned by a similarity transform onto one
mirror-symmetric mean shape (the canonical frame, in [0,1]^2 image units). Mirrored templates would
add no identities: every image is flipped at random anyway.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

# index of each of the 68 landmarks in the horizontally mirrored face (iBUG 300-W order)
MIRROR = np.array(
    list(range(16, -1, -1))                      # jaw
    + list(range(26, 16, -1))                    # brows
    + [27, 28, 29, 30] + [35, 34, 33, 32, 31]    # nose
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]  # eyes
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lips
    + [64, 63, 62, 61, 60, 67, 66, 65]           # inner lips
)

MAX_MOUTH_OPEN = 0.15  # inner-lip gap / eye distance above which a template is not neutral
ALIGN_POINTS = np.arange(17, 68)  # brows, nose, eyes, mouth: the jaw line is the least reliable


@dataclass
class Template:
    name: str
    image: np.ndarray    # float32 [H, W] in [0, 1]
    to_canon: np.ndarray  # 2x3 similarity: template pixel (x, y) -> canonical unit coords
    points: np.ndarray   # float64 [68, 2] landmarks in canonical units


@lru_cache(maxsize=1)
def _hog_detector():
    import dlib

    return dlib.get_frontal_face_detector()  # ~0.15 s to build: build it once


def _dlib():
    import dlib

    from ferpipe.faces.models import dlib_model

    return _hog_detector(), dlib.shape_predictor(dlib_model())


def _landmarks(gray: np.ndarray, detector, predictor) -> np.ndarray | None:
    """68 (x, y) pixel landmarks of the largest face dlib's HOG finds (upsample 0, then 1), or None."""
    for upsample in (0, 1):
        rects = detector(gray, upsample)
        if len(rects):
            rect = max(rects, key=lambda r: r.area())
            shape = predictor(gray, rect)
            return np.array([(p.x, p.y) for p in shape.parts()], np.float64)
    return None


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama, no reflection) mapping src points onto dst, as 2x3."""
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    cov = d.T @ s / len(src)
    u, sv, vt = np.linalg.svd(cov)
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rot = u @ sign @ vt
    scale = np.trace(np.diag(sv) @ sign) / (s ** 2).sum(1).mean()
    m = np.empty((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = md - scale * rot @ ms
    return m


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Affine 2x3 m applied to points [N, 2] (no BLAS: see _kernel)."""
    x, y = pts[:, 0:1], pts[:, 1:2]
    return np.concatenate([m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]], 1)


def _invert(m: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(m.astype(np.float64))


def _mouth_open(pts: np.ndarray) -> float:
    eyes = np.linalg.norm(pts[36:42].mean(0) - pts[42:48].mean(0))
    gap = np.linalg.norm(pts[[61, 62, 63]] - pts[[67, 66, 65]], axis=1).mean()
    return float(gap / eyes)


@lru_cache(maxsize=1)
def load_templates() -> tuple[tuple[Template, ...], dict]:
    """The identity templates (deterministic; computed once per process) and a report on them."""
    import skimage.data

    detector, predictor = _dlib()
    raw: list[tuple[str, np.ndarray, np.ndarray]] = []
    report = {"candidates": 0, "no_face": [], "open_mouth": []}

    # astronaut: a generous crop around the face, at a resolution a 96-128 px output can use
    astro = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2GRAY)
    report["candidates"] += 1
    pts = _landmarks(astro, detector, predictor)
    if pts is None:
        report["no_face"].append("astronaut")
    else:
        cx, cy = pts.mean(0)
        half = int(1.1 * np.ptp(pts[:, 0]))
        x0, y0 = int(cx) - half, int(cy) - half
        crop = astro[max(y0, 0):y0 + 2 * half, max(x0, 0):x0 + 2 * half]
        k = 160 / crop.shape[1]
        crop = cv2.resize(crop, (160, round(crop.shape[0] * k)), interpolation=cv2.INTER_AREA)
        raw.append(("astronaut", crop, (pts - (max(x0, 0), max(y0, 0))) * k))

    # LFW subset: images 0-99 are faces (25x25, float); 4x cubic upscaling lets dlib see them
    lfw = skimage.data.lfw_subset()[:100]
    for i, face in enumerate(lfw):
        report["candidates"] += 1
        big = cv2.resize(np.round(face * 255).astype(np.uint8), (100, 100), interpolation=cv2.INTER_CUBIC)
        pts = _landmarks(big, detector, predictor)
        if pts is None:
            report["no_face"].append(f"lfw{i:03d}")
            continue
        raw.append((f"lfw{i:03d}", big, pts))

    kept = []
    for name, img, pts in raw:
        if _mouth_open(pts) > MAX_MOUTH_OPEN:
            report["open_mouth"].append(name)
        else:
            kept.append((name, img, pts))

    # canonical frame: the mean shape of the LFW crops (tight faces, like FER-2013), in unit
    # coords, made mirror-symmetric about x = 0.5; one Procrustes refinement
    lfw_pts = [p / img.shape[1] for n, img, p in kept if n.startswith("lfw")]
    mean = np.mean(lfw_pts, 0) if lfw_pts else np.mean([p / img.shape[1] for _, img, p in kept], 0)
    for _ in range(2):
        mirrored = mean[MIRROR].copy()
        mirrored[:, 0] = 1.0 - mirrored[:, 0]
        mean = (mean + mirrored) / 2
        aligned = [_apply(_similarity(p[ALIGN_POINTS], mean[ALIGN_POINTS]), p) for _, _, p in kept]
        target = np.mean(aligned, 0)
        # keep the scale and placement of the LFW framing, take only the shape from the refinement
        mean = _apply(_similarity(target[ALIGN_POINTS], mean[ALIGN_POINTS]), target)

    templates = []
    for name, img, pts in kept:
        m = _similarity(pts[ALIGN_POINTS], mean[ALIGN_POINTS])
        templates.append(Template(name, img.astype(np.float32) / 255.0, m, _apply(m, pts)))
    report["kept"] = len(templates)
    return tuple(templates), report
