"""A generated demo dataset: expression-warped faces, so the pipeline runs with no data at all.

Nothing is downloaded. The identities are face images that ship with scikit-image: the astronaut
(``skimage.data.astronaut()``) and the 100 faces of ``skimage.data.lfw_subset()`` (its first 100
images are 25x25 faces, the last 100 are non-faces). dlib's HOG detector + 68-point predictor find the
landmarks of each template once; templates without a face, or with a clearly open mouth (they would
not read as neutral), are dropped. Every template is aligned by a similarity transform onto one
mirror-symmetric mean shape (the canonical frame, in [0,1]^2 image units). Mirrored templates would
add no identities: every image is flipped at random anyway.

Each class is a smooth displacement field: the wanted motion of some landmarks (all others anchored
at zero) interpolated by Gaussian radial basis functions, so lips can part without dragging the
other lip along. Shading completes what a warp cannot show: the dark open mouth of surprise, the
nasolabial folds of a smile, the furrow between lowered brows. Every image then gets its own
expression strength, similarity jitter (rotation, scale, shift), brightness/contrast/gamma, noise and
a horizontal flip, all drawn from ``np.random.default_rng(seed)`` in a fixed order: the same seed gives
byte-identical PNGs. One cv2.remap per image samples the template through the composed map.

Train and test images come from disjoint identity sets (LFW may hold two photos of one person; the
subset has no names to check that).
"""
from __future__ import annotations

import os
import textwrap
import time
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from ferpipe.store import staged, write_json, writes

CLASSES = ("neutral", "happy", "sad", "surprise", "angry")
SPLITS = ("train", "test")

# index of each of the 68 landmarks in the horizontally mirrored face (iBUG 300-W order)
MIRROR = np.array(
    list(range(16, -1, -1))                      # jaw
    + list(range(26, 16, -1))                    # brows
    + [27, 28, 29, 30] + [35, 34, 33, 32, 31]    # nose
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]  # eyes
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lips
    + [64, 63, 62, 61, 60, 67, 66, 65]           # inner lips
)

SIGMA = 0.06          # RBF width in canonical units (the face is ~0.85 wide)
RIDGE = 1e-2          # keeps the RBF solve stable where landmarks nearly coincide
MAX_STRENGTH = 1.25   # per-image expression strength is drawn from [0.75, MAX_STRENGTH]
MIN_JACOBIAN = 0.2    # the warp may compress an area at most to this share: it never folds
MAX_MOUTH_OPEN = 0.15  # inner-lip gap / eye distance above which a template is not neutral
ALIGN_POINTS = np.arange(17, 68)  # brows, nose, eyes, mouth: the jaw line is the least reliable

DETECT_SIZE = 96      # the detection rate is measured like the landmarks stage sees faces


@dataclass
class Template:
    name: str
    image: np.ndarray    # float32 [H, W] in [0, 1]
    to_canon: np.ndarray  # 2x3 similarity: template pixel (x, y) -> canonical unit coords
    points: np.ndarray   # float64 [68, 2] landmarks in canonical units


# ----------------------------------------------------------------------------------------- templates
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


# ---------------------------------------------------------------------------------------- expressions
# Control landmarks of every warp: spread out (Gaussian RBFs between points closer than the kernel
# width would fold the image). Those a class does not move are anchored at zero displacement.
CONTROL = np.array([0, 4, 8, 12, 16,                      # jaw
                    17, 19, 21, 22, 24, 26,               # brows
                    28, 30, 33, 31, 35,                   # nose (not 27: brows need room)
                    36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47,  # eyes
                    48, 51, 54, 57])                      # mouth corners, upper and lower lip

# Landmark motions per class, in eye distances: index -> (outward, up). "Outward" is away from the
# face's midline (mirrored for the two sides), "up" is towards the forehead.
MOTIONS: dict[str, dict[int, tuple[float, float]]] = {
    "neutral": {},
    "happy": {48: (0.11, 0.15), 54: (0.11, 0.15),          # mouth corners up and out
              51: (0.0, 0.02), 57: (0.0, -0.05),           # lips part a little (teeth)
              40: (0.0, 0.03), 41: (0.0, 0.03), 46: (0.0, 0.03), 47: (0.0, 0.03),  # cheeks push lids up
              4: (0.03, 0.02), 12: (0.03, 0.02)},          # cheeks widen
    "sad": {48: (-0.01, -0.13), 54: (-0.01, -0.13),        # mouth corners down
            57: (0.0, 0.04),                               # lower lip pushed up (pout)
            21: (-0.03, 0.13), 22: (-0.03, 0.13),          # inner brows up and together
            19: (0.0, 0.04), 24: (0.0, 0.04),
            17: (0.0, -0.04), 26: (0.0, -0.04),            # outer brows droop
            37: (0.0, -0.02), 38: (0.0, -0.02), 43: (0.0, -0.02), 44: (0.0, -0.02)},  # lids droop
    "surprise": {17: (0.0, 0.14), 19: (0.0, 0.20), 21: (0.0, 0.17),   # brows up, arched
                 22: (0.0, 0.17), 24: (0.0, 0.20), 26: (0.0, 0.14),
                 37: (0.0, 0.05), 38: (0.0, 0.05), 43: (0.0, 0.05), 44: (0.0, 0.05),  # eyes widen
                 40: (0.0, -0.01), 41: (0.0, -0.01), 46: (0.0, -0.01), 47: (0.0, -0.01),
                 48: (-0.07, -0.04), 54: (-0.07, -0.04),   # mouth narrows ...
                 57: (0.0, -0.22), 8: (0.0, -0.22),        # ... and the jaw drops
                 4: (0.0, -0.03), 12: (0.0, -0.03)},
    "angry": {21: (-0.05, -0.17), 22: (-0.05, -0.17),      # inner brows down and together
              19: (-0.02, -0.08), 24: (-0.02, -0.08),
              37: (0.0, -0.03), 38: (0.0, -0.03), 43: (0.0, -0.03), 44: (0.0, -0.03),  # glare
              48: (-0.06, 0.0), 54: (-0.06, 0.0),          # lips pressed and narrowed
              51: (0.0, -0.03), 57: (0.0, 0.04),
              31: (0.03, 0.01), 35: (0.03, 0.01)},         # nostrils flare
}


def expression_targets(cls: str, pts: np.ndarray) -> np.ndarray:
    """Wanted displacement (canonical units, y down) of each CONTROL landmark for a class."""
    if cls not in MOTIONS:
        raise ValueError(f"unknown class {cls!r} (known: {CLASSES})")
    eye = np.linalg.norm(pts[36:42].mean(0) - pts[42:48].mean(0))
    mid_x = pts[27:31, 0].mean()
    d = np.zeros((len(CONTROL), 2))
    for j, i in enumerate(CONTROL):
        if i in MOTIONS[cls]:
            out, up = MOTIONS[cls][i]
            d[j] = eye * np.array([out * (1.0 if pts[i, 0] >= mid_x else -1.0), -up])
    return d


def _kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Gaussian kernel matrix [len(a), len(b)] in float32.

    Written without BLAS on purpose: OpenBLAS threads make these tall, thin products ~50x slower
    on a busy machine.
    """
    a = a.astype(np.float32)
    b = b.astype(np.float32)
    dx = a[:, 0:1] - b[None, :, 0]
    dy = a[:, 1:2] - b[None, :, 1]
    return np.exp((dx * dx + dy * dy) * np.float32(-0.5 / SIGMA ** 2))


def rbf_weights(pts: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Gaussian RBF weights [len(CONTROL), 2] whose field moves each control landmark by ~its target.

    Where a face's landmarks lie so close that the full motion would fold the image (the Jacobian
    determinant of x -> x + d(x) falling below MIN_JACOBIAN at MAX_STRENGTH), the weights are scaled
    down until it does not.
    """
    c = pts[CONTROL].astype(np.float64)
    d2 = ((c[:, None] - c[None]) ** 2).sum(-1)
    k = np.exp(d2 * (-0.5 / SIGMA ** 2))
    w = np.linalg.solve(k + RIDGE * np.eye(len(c)), targets)
    return w * fold_limit(pts, w)


@lru_cache(maxsize=1)
def _check_grid() -> np.ndarray:
    u = np.linspace(-0.05, 1.05, 111)  # the visible part of the canonical frame
    gx, gy = np.meshgrid(u, u)
    return np.stack([gx.ravel(), gy.ravel()], 1)


def fold_limit(pts: np.ndarray, w: np.ndarray) -> float:
    """Largest factor f <= 1 with det(I + s f J(x)) >= MIN_JACOBIAN for every s <= MAX_STRENGTH."""
    if not np.any(w):
        return 1.0
    x = _check_grid()
    h = 1e-3
    jx = (displacement(x + [h, 0], pts, w) - displacement(x - [h, 0], pts, w)) / (2 * h)
    jy = (displacement(x + [0, h], pts, w) - displacement(x - [0, h], pts, w)) / (2 * h)
    tr = jx[:, 0] + jy[:, 1]
    dj = jx[:, 0] * jy[:, 1] - jx[:, 1] * jy[:, 0]
    # det(I + tJ) = 1 + t tr + t^2 det J, a quadratic in t: find the first t where it dips too low
    t = np.linspace(0.0, MAX_STRENGTH, 126)[1:, None]
    ok = (1.0 + t * tr + t * t * dj).min(1) >= MIN_JACOBIAN
    if ok.all():
        return 1.0
    first_bad = int(np.argmin(ok))
    return float(t[first_bad - 1, 0] / MAX_STRENGTH) if first_bad > 0 else 0.0


def displacement(x: np.ndarray, pts: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The forward displacement field at points x [N, 2] (canonical units)."""
    k = _kernel(x, pts[CONTROL])
    w = w.astype(np.float32)
    return np.stack([(k * w[:, 0]).sum(1), (k * w[:, 1]).sum(1)], 1).astype(np.float64)


# -------------------------------------------------------------------------------------------- render
def _curve(a: np.ndarray, m: np.ndarray, b: np.ndarray, n: int = 10) -> np.ndarray:
    """n points of the quadratic Bezier from a to b passing through m at its middle."""
    c = 2.0 * m - (a + b) / 2.0
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * a + 2 * (1 - t) * t * c + t ** 2 * b


def _poly(pts: np.ndarray) -> list[np.ndarray]:
    return [np.round(pts * 16).astype(np.int32)]  # 4 fractional bits for cv2's shift=4


def _shade(size: int, q: np.ndarray, cls: str, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """What a warp cannot show, drawn at output-space landmarks q (pixels) of the moved face.

    Returns (dark, teeth): per-pixel blend weights towards black (open mouth, folds, furrows) and
    towards a light grey (teeth).
    """
    dark = np.zeros((size, size), np.float32)
    teeth = np.zeros((size, size), np.float32)
    eye = float(np.linalg.norm(q[36:42].mean(0) - q[42:48].mean(0)))
    lw = max(1, round(eye / 22))
    down = (q[8] - q[27]) / max(np.linalg.norm(q[8] - q[27]), 1e-6)  # unit vector chin-wards
    if cls in ("happy", "surprise"):
        left, right = q[60], q[64]
        top = q[62]
        gap = 0.14 if cls == "happy" else 0.10
        bottom = q[66] + down * gap * eye * strength           # the lower inner lip, a bit lower still
        mouth = np.concatenate([_curve(left, top, right), _curve(right, bottom, left)[1:-1]])
        cv2.fillPoly(dark, _poly(mouth), 0.85, cv2.LINE_AA, shift=4)
        if cls == "happy":                                     # the upper teeth fill most of the gap
            tb = top + (bottom - top) * 0.7
            inner = np.concatenate([_curve(left, top, right), _curve(right, tb, left)[1:-1]])
            cv2.fillPoly(teeth, _poly(inner), 0.75, cv2.LINE_AA, shift=4)
            for wing, corner in ((q[31], q[48]), (q[35], q[54])):   # nasolabial folds
                out = wing - q[33]
                start = wing + out * 0.4
                end = corner + (corner - q[51]) * 0.12 + down * 0.08 * eye
                mid = (start + end) / 2 + out * 0.35
                cv2.polylines(dark, _poly(_curve(start, mid, end, 8)), False, 0.3 * strength, lw, cv2.LINE_AA,
                              shift=4)
    elif cls == "angry":
        mid = (q[21] + q[22]) / 2
        half = q[22] - q[21]
        for side in (-0.2, 0.2):                               # vertical furrows between the brows
            top = mid + half * side - down * 0.10 * eye
            bot = mid + half * side * 0.8 + down * 0.12 * eye
            cv2.polylines(dark, _poly(np.stack([top, bot])), False, 0.35 * strength, lw, cv2.LINE_AA, shift=4)
    elif cls == "sad":
        mid = (q[21] + q[22]) / 2 - down * 0.12 * eye          # a crease above the raised inner brows
        cv2.polylines(dark, _poly(_curve(q[20] - down * 0.05 * eye, mid, q[23] - down * 0.05 * eye, 8)),
                      False, 0.2 * strength, lw, cv2.LINE_AA, shift=4)
    blur = max(0.5, eye / 40)
    if dark.any():
        dark = cv2.GaussianBlur(dark, (0, 0), blur)
    if teeth.any():
        teeth = cv2.GaussianBlur(teeth, (0, 0), blur)
    return dark, teeth


@dataclass
class Look:
    """Everything random about one rendered image (see draw_look)."""
    strength: float
    angle: float
    scale: float
    shift: np.ndarray
    contrast: float
    brightness: float
    gamma: float
    noise_sd: float
    flip: bool
    noise: np.ndarray


def draw_look(size: int, rng: np.random.Generator) -> Look:
    """Every random draw of one image, in a fixed order whatever the class: reproducible per seed."""
    strength = rng.uniform(0.75, MAX_STRENGTH)
    angle = np.deg2rad(rng.uniform(-10, 10))
    scale = rng.uniform(0.9, 1.1)
    shift = rng.uniform(-0.04, 0.04, 2)
    contrast = rng.uniform(0.7, 1.3)
    brightness = rng.uniform(-0.12, 0.12)
    gamma = np.exp(rng.uniform(-0.3, 0.3))
    noise_sd = rng.uniform(0.0, 0.03)
    flip = rng.random() < 0.5
    noise = rng.standard_normal((size, size)).astype(np.float32)
    return Look(strength, angle, scale, shift, contrast, brightness, gamma, noise_sd, flip, noise)


def render(t: Template, cls: str, size: int, rng: np.random.Generator,
           weights: np.ndarray | None = None) -> np.ndarray:
    """One uint8 [size, size] image of template t showing class cls, with random jitter from rng."""
    return compose(t, cls, size, draw_look(size, rng), weights)


def compose(t: Template, cls: str, size: int, look: Look, weights: np.ndarray | None = None) -> np.ndarray:
    """Template t warped to class cls at look.strength (0 = neutral), posed and shaded as `look` says."""
    strength, angle, scale, shift = look.strength, look.angle, look.scale, look.shift
    contrast, brightness, gamma, noise_sd, flip, noise = (look.contrast, look.brightness, look.gamma,
                                                          look.noise_sd, look.flip, look.noise)

    # jitter J: canonical unit coords -> output unit coords, about the image centre
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    jit = np.array([[c, -s, 0.0], [s, c, 0.0]])
    jit[:, 2] = 0.5 - jit[:, :2] @ [0.5, 0.5] + shift
    jit_inv = _invert(jit)

    # backward map: output pixel centre -> canonical (inverse jitter) -> undo expression (fixed point)
    u = (np.arange(size) + 0.5) / size
    gx, gy = np.meshgrid(u, u)
    xq = np.stack([gx.ravel(), gy.ravel()], 1)
    xc = _apply(jit_inv, xq)
    pts_out = t.points
    if weights is not None:
        w = weights * strength
        src = xc - displacement(xc, t.points, w)
        src = xc - displacement(src, t.points, w)
        pts_out = t.points + displacement(t.points, t.points, w)
    else:
        src = xc
    src_px = _apply(_invert(t.to_canon), src).astype(np.float32)
    mx = src_px[:, 0].reshape(size, size)
    my = src_px[:, 1].reshape(size, size)
    img = cv2.remap(t.image, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)

    q = _apply(jit, pts_out) * size - 0.5  # output pixel coords of the moved landmarks
    dark, teeth = _shade(size, q, cls, min(strength, 1.0))
    if dark.any() or teeth.any():
        ref = float(np.percentile(img, 95))  # teeth a shade below the brightest skin
        img = img * (1.0 - dark) * (1.0 - teeth) + teeth * ref * 0.95 + dark * (1.0 - teeth) * 0.05

    # photometry: contrast about the mean, brightness, gamma, noise
    img = (img - img.mean()) * contrast + img.mean() + brightness
    img = np.clip(img, 0.0, 1.0) ** gamma
    img = img + noise * noise_sd
    out = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out[:, ::-1]) if flip else out


# ---------------------------------------------------------------------------------------- the dataset
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


# ------------------------------------------------------------------------------------- sequences
SEQUENCE_CLASSES = ("happy", "sad", "surprise", "angry")  # each sequence starts neutral, like CK+


def generate_sequences(seed: int = 2020, per_class: int = 12, frames: int = 6, size: int = 96):
    """Yield (sequence_id, subject, class, frame number, uint8 image) in a fixed order.

    A sequence is one identity and one pose/photometry (``draw_look``) going from neutral (strength
    0) to its apex strength along a smoothstep, with fresh sensor noise and a small head drift per
    frame: the CK+ onset-to-apex layout. Ids are CK+-like, ``S<identity>_<n>``, so the subject is
    the identity and folds can keep subjects apart.
    """
    if frames < 2:
        raise ValueError(f"a sequence needs at least 2 frames, got {frames}")
    templates, _ = load_templates()
    if not templates:
        raise RuntimeError("dlib found no usable face in the packaged images")
    rng = np.random.default_rng(seed)
    per_subject: dict[int, int] = {}
    fields_: dict[tuple[int, str], np.ndarray] = {}
    for cls in SEQUENCE_CLASSES:
        reps = -(-per_class // len(templates))
        picks = np.concatenate([rng.permutation(len(templates)) for _ in range(reps)])[:per_class] if per_class else []
        for k in picks:
            k = int(k)
            per_subject[k] = per_subject.get(k, 0) + 1
            sid = f"S{k:03d}_{per_subject[k]:03d}"
            if (k, cls) not in fields_:
                pts = templates[k].points
                fields_[k, cls] = rbf_weights(pts, expression_targets(cls, pts))
            look = draw_look(size, rng)
            apex = look.strength
            for f in range(frames):
                u = f / (frames - 1)
                look.strength = apex * u * u * (3 - 2 * u)
                look.noise = rng.standard_normal((size, size)).astype(np.float32)
                look.shift = look.shift + rng.uniform(-0.005, 0.005, 2)
                yield sid, f"S{k:03d}", cls, f + 1, compose(templates[k], cls, size, look, fields_[k, cls])


@writes("metrics_path", dirs=["out_dir"])
def make_demo_sequences(out_dir: str | os.PathLike, seed: int = 2020, per_class: int = 12, frames: int = 6,
                        size: int = 96, metrics_path: str | os.PathLike | None = None) -> dict:
    """Write demo sequences in the CK+ layout of ../shared/data/sequences (replacing out_dir atomically):
    ``frames/<sequence>/<sequence>_<frame:08d>.png`` and ``labels.csv`` (sequence_id, label,
    frame_count, subject). Returns (and writes to metrics_path) counts per class and subjects."""
    if size < 16:
        raise ValueError(f"size {size} is too small for a face")
    if per_class < 1:
        raise ValueError("sequences per class must be >= 1")
    tmp = staged(out_dir)  # this run's staging folder (ferpipe.store): it replaces out_dir whole on success
    rows: dict[str, dict] = {}
    for sid, subject, cls, number, img in generate_sequences(seed, per_class, frames, size):
        folder = tmp / "frames" / sid
        folder.mkdir(parents=True, exist_ok=True)
        ok, buf = cv2.imencode(".png", img)
        if not ok:
            raise RuntimeError(f"could not encode {sid} frame {number}")
        (folder / f"{sid}_{number:08d}.png").write_bytes(buf.tobytes())
        row = rows.setdefault(sid, {"sequence_id": sid, "label": cls, "frame_count": 0, "subject": subject})
        row["frame_count"] += 1
    lines = ["sequence_id,label,frame_count,subject"] + [
        f"{r['sequence_id']},{r['label']},{r['frame_count']},{r['subject']}" for r in sorted(rows.values(), key=lambda r: r["sequence_id"])]
    (tmp / "labels.csv").write_text("\n".join(lines) + "\n")
    (tmp / "README.txt").write_text(_wrap(SEQUENCE_README.format(
        seed=seed, per_class=per_class, frames=frames, size=size, classes=", ".join(SEQUENCE_CLASSES))))
    metrics = {"seed": seed, "size": size, "frames_per_sequence": frames, "sequences": len(rows),
               "per_class": {c: sum(r["label"] == c for r in rows.values()) for c in SEQUENCE_CLASSES},
               "subjects": len({r["subject"] for r in rows.values()})}
    if metrics_path:
        write_json(metrics_path, metrics)
    return metrics


SEQUENCE_README = """\
ferpipe demo sequences (generated, not real data)
=================================================

Made by `python stages/demo.py --sequences` (ferpipe.data.demo.make_demo_sequences) with seed={seed},
per_class={per_class}, frames={frames}, size={size}. The same parameters give byte-identical files.

Layout: the CK+ layout of ferpipe's sequence readers (format ck_sequences):
frames/<sequence>/<sequence>_<frame>.png and labels.csv (sequence_id,label,frame_count,subject).
Classes: {classes}. Sequence ids are S<identity>_<n>: the subject is the identity.

Each sequence is one face of the image demo (same templates and expression warps) going from neutral
to its apex expression along a smoothstep, with one pose and photometry per sequence, fresh noise and
a small head drift per frame. It exists so the sequence stages run on a fresh machine; numbers
measured on it say nothing about real facial expression recognition.
"""
