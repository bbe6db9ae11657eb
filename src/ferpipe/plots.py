"""Pictures people look at: contact sheets of packed images, with landmarks drawn on top."""
from __future__ import annotations

import os

import cv2
import numpy as np

from ferpipe.store import atomic_path


def sample_indices(n: int, k: int, seed: int = 0) -> np.ndarray:
    """k evenly spread, deterministic indices into n items (all of them if n <= k)."""
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def grid(rows: list[np.ndarray], cell: int = 96, labels: list[str] | None = None) -> np.ndarray:
    """Tile rows of images (each row a list/array of HxW or HxWx3 uint8) into one BGR sheet.

    Each image is resized to cell x cell; an optional label is written at the start of each row.
    """
    label_w = 110 if labels else 0
    ncol = max(len(r) for r in rows)
    sheet = np.full((len(rows) * cell, label_w + ncol * cell, 3), 32, np.uint8)
    for r, row in enumerate(rows):
        if labels:
            cv2.putText(sheet, labels[r][:14], (4, r * cell + cell // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                        (255, 255, 255), 1, cv2.LINE_AA)
        for c, img in enumerate(row):
            img = np.asarray(img)
            if img.ndim == 2:
                img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
            img = cv2.resize(img, (cell, cell), interpolation=cv2.INTER_NEAREST)
            sheet[r * cell:(r + 1) * cell, label_w + c * cell:label_w + (c + 1) * cell] = img
    return sheet


def sheet_images(images: np.ndarray) -> np.ndarray:
    """Packed images as ``grid`` draws them: gray [N, S, S] as they are, RGB [N, S, S, 3] turned to BGR."""
    images = np.asarray(images)
    return images[..., ::-1] if images.ndim == 4 else images


def draw_points(img: np.ndarray, points: np.ndarray, cell: int = 96, color=(0, 255, 0)) -> np.ndarray:
    """Upscale a gray image to cell px and draw normalized (x, y) points on it."""
    big = cv2.cvtColor(cv2.resize(img, (cell, cell), interpolation=cv2.INTER_CUBIC), cv2.COLOR_GRAY2BGR)
    for x, y in np.asarray(points) * cell:
        cv2.circle(big, (int(round(x)), int(round(y))), 1, color, -1, cv2.LINE_AA)
    return big


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        ok, buf = cv2.imencode(".png", image)
        if not ok:
            raise RuntimeError(f"could not encode {path}")
        tmp.write_bytes(buf.tobytes())
