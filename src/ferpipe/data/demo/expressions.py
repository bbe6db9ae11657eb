"""The demo's expressions: each class a smooth displacement field of the canonical face.

Each class is the wanted motion of some landmarks (all others anchored at zero) interpolated by
Gaussian radial basis functions, so lips can part without dragging the other lip along. The field is
limited so that the warp never folds the image, up to the largest per-image strength (MAX_STRENGTH).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

CLASSES = ("neutral", "happy", "sad", "surprise", "angry")

SIGMA = 0.06          # RBF width in canonical units (the face is ~0.85 wide)
RIDGE = 1e-2          # keeps the RBF solve stable where landmarks nearly coincide
MAX_STRENGTH = 1.25   # per-image expression strength is drawn from [0.75, MAX_STRENGTH]
MIN_JACOBIAN = 0.2    # the warp may compress an area at most to this share: it never folds

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
