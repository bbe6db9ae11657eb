"""Resizing images and turning colour into gray: the one rule each that every stage and the
recognizer use (area down, cubic up; ITU-R 601-2 luma).

Its own module at the bottom of the house: ingest (data/decode), gray48 (data/gray), the landmarks
cascade and the photo face crop (faces/) all resize, and none of them should import another's stage.
Images are gray uint8 [H, W] or, under ``ingest.color: rgb``, RGB uint8 [H, W, 3]; a packed array of
them is [N, S, S] or [N, S, S, 3]. Landmarks and guide maps work on gray: ``gray_images`` gives it.
"""
from __future__ import annotations

import cv2
import numpy as np


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W] (or [H, W, 3]) -> [size, size] (or [size, size, 3], each channel alike): area when
    both sides shrink, cubic otherwise, copy-free if equal."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return np.ascontiguousarray(image)
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_CUBIC
    return cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=interp)


def resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 [N, H, W] (or [N, H, W, 3]) to [N, size, size] (or [N, size, size, 3]) with ``resize``."""
    if images.shape[1:3] == (size, size):
        return images.copy()
    out = np.empty((len(images), size, size, *images.shape[3:]), np.uint8)
    for i, im in enumerate(images):
        out[i] = resize(im, size)
    return out


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] in RGB order -> uint8 [...]: PIL's ITU-R 601-2 luma in its own integer arithmetic
    (L = (19595 R + 38470 G + 7471 B + 2**15) >> 16), so a colour image gives the gray that decoding it
    as gray gives, and three equal channels give that channel back exactly."""
    a = np.asarray(rgb)
    if a.dtype != np.uint8 or a.shape[-1:] != (3,):
        raise ValueError(f"rgb_to_gray needs uint8 [..., 3], got {a.dtype} {a.shape}")
    w = a.astype(np.uint32)
    return ((w[..., 0] * 19595 + w[..., 1] * 38470 + w[..., 2] * 7471 + 0x8000) >> 16).astype(np.uint8)


def gray_images(images: np.ndarray) -> np.ndarray:
    """A packed image array -> its gray: [N, S, S] as it is, RGB [N, S, S, 3] through ``rgb_to_gray``.
    What the landmarks and guide stages (and the recognizer's landmarks) see."""
    images = np.asarray(images)
    return rgb_to_gray(images) if images.ndim == 4 else images
