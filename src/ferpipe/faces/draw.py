"""Drawing 68-point landmarks as the 8 face regions (white on black), as Guided-ST's guide images.

iBUG 68-point indexing. Every region but the jaw is drawn as a FILLED convex hull; the jaw is an
open polyline. Drawing is anti-aliased (cv2.LINE_AA, sub-pixel coordinates) so edge pixels carry
partial intensities; that is what makes the soft map's threshold rule (pixels >= 38 -> 255)
meaningful on a 48x48 drawing.
"""
from __future__ import annotations

import cv2
import numpy as np

# name -> (first, last + 1) of the iBUG 68 indices
REGIONS: dict[str, tuple[int, int]] = {
    "jaw": (0, 17),
    "right_brow": (17, 22),
    "left_brow": (22, 27),
    "nose": (27, 36),            # bridge 27-30 + lower nose 31-35
    "right_eye": (36, 42),
    "left_eye": (42, 48),
    "mouth": (48, 60),           # outer lip contour
    "inner_mouth": (60, 68),
}
HULL_REGIONS = tuple(name for name in REGIONS if name != "jaw")

_SHIFT = 4                       # cv2 fixed-point fractional bits: coordinates in 1/16 px
_SCALE = 1 << _SHIFT


def _fixed(points_px: np.ndarray, size: int) -> np.ndarray:
    """Float pixel coordinates -> int32 fixed point (clipped far outside so int32 never overflows)."""
    pts = np.clip(np.asarray(points_px, np.float64), -4 * size, 5 * size)
    return np.rint(pts * _SCALE).astype(np.int32)


def draw_regions(points_px: np.ndarray, size: int, thickness: int = 1, jaw: bool = True,
                 out: np.ndarray | None = None, skip: tuple[str, ...] = ()) -> np.ndarray:
    """Draw one face's 68 points (x, y) in PIXELS of a size x size image as the 8 regions.

    Returns uint8 [size, size]: 255 on the regions, 0 elsewhere, anti-aliased edges. `thickness` is
    the jaw line's width; `jaw=False` leaves the jaw out (the dilation guide), as does "jaw" in `skip`
    (names of REGIONS left undrawn). Non-finite points draw nothing (the image stays black). `out`,
    if given, is drawn into (it must be zeros).
    """
    unknown = sorted(set(skip) - set(REGIONS))
    if unknown:
        raise ValueError(f"unknown face regions {unknown} (one of {list(REGIONS)})")
    pts = np.asarray(points_px)
    if pts.shape != (68, 2):
        raise ValueError(f"draw_regions: expected points of shape (68, 2), got {pts.shape}")
    img = np.zeros((size, size), np.uint8) if out is None else out
    if not np.isfinite(pts).all():
        return img
    fx = _fixed(pts, size)
    for name in HULL_REGIONS:
        if name in skip:
            continue
        a, b = REGIONS[name]
        hull = cv2.convexHull(fx[a:b])
        cv2.fillConvexPoly(img, hull, 255, cv2.LINE_AA, _SHIFT)
    if jaw and "jaw" not in skip:
        a, b = REGIONS["jaw"]
        cv2.polylines(img, [fx[a:b]], False, 255, int(thickness), cv2.LINE_AA, _SHIFT)
    return img


def draw_regions_batch(landmarks: np.ndarray, size: int, thickness: int = 1, jaw: bool = True,
                       skip: tuple[str, ...] = ()) -> np.ndarray:
    """Draw N faces: landmarks float [N, 68, 2] (x, y) NORMALIZED to [0, 1] -> uint8 [N, size, size]."""
    lm = np.asarray(landmarks, np.float64)
    if lm.ndim != 3 or lm.shape[1:] != (68, 2):
        raise ValueError(f"draw_regions_batch: expected landmarks [N, 68, 2], got {lm.shape}")
    out = np.zeros((len(lm), size, size), np.uint8)
    px = lm * size
    for i in range(len(lm)):
        draw_regions(px[i], size, thickness, jaw, out=out[i], skip=tuple(skip))
    return out
