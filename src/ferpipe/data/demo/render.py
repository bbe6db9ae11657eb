"""One demo image: a template warped to its class, shaded, posed and photometrically jittered.

Shading completes what a warp cannot show: the dark open mouth of surprise, the nasolabial folds of a
smile, the furrow between lowered brows. Every image then gets its own expression strength, similarity
jitter (rotation, scale, shift), brightness/contrast/gamma, noise and a horizontal flip, all drawn from
``np.random.default_rng(seed)`` in a fixed order: the same seed gives byte-identical PNGs. One
cv2.remap per image samples the template through the composed map.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ferpipe.data.demo.expressions import MAX_STRENGTH, displacement
from ferpipe.data.demo.templates import Template, _apply, _invert


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
