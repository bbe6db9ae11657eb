"""Resizing gray images: the one rule every stage and the recognizer use (area down, cubic up).

Its own module at the bottom of the house: ingest (data/decode), gray48 (data/gray), the landmarks
cascade and the photo face crop (faces/) all resize, and none of them should import another's stage.
"""
from __future__ import annotations

import cv2
import numpy as np


def resize(gray: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W] -> [size, size]: area when both sides shrink, cubic otherwise, copy-free if equal."""
    h, w = gray.shape
    if (h, w) == (size, size):
        return np.ascontiguousarray(gray)
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_CUBIC
    return cv2.resize(np.ascontiguousarray(gray), (size, size), interpolation=interp)


def resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 [N, H, W] to [N, size, size] with ``resize``."""
    if images.shape[1:] == (size, size):
        return images.copy()
    out = np.empty((len(images), size, size), np.uint8)
    for i, im in enumerate(images):
        out[i] = resize(im, size)
    return out
