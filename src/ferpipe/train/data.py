"""What a training run records about its data: the per-channel statistics of its training rows
(``channel_stats``: the mean/std of the ``InputSpec`` saved in each checkpoint's meta["input"]) and
how its arrays were made (``preprocess_record``: meta["preprocess"], repeated by inference).

The arrays themselves are loaded by ``ferpipe.data.tensors`` (``load_data``, ``TensorData``); the
input recipe and the resize + standardization of a batch are ``ferpipe.models.inputs``.
"""
from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ferpipe.models.inputs import InputSpec
from ferpipe.store import read_attrs


def preprocess_record(spec: InputSpec, gray48: str | os.PathLike = "data/gray48/images.h5",
                      guides_dir: str | os.PathLike = "data/guides") -> dict:
    """How the arrays a model trains on were made, read from their HDF5 attrs (so it is what really
    ran, not what params.yaml says now). Kept in every checkpoint's meta["preprocess"]: inference
    (ferpipe.recognize) repeats exactly these steps on new images.

    {"ingest_size", "gray48_size", "landmarks": {"size", "passes"} or None, "guides": {kind: params},
     "face_margin": the ingest face crop's margin, None when ingest took the images as face crops}
    """
    from ferpipe.guides.maps import DEFAULT_PARAMS

    attrs = read_attrs(gray48) if Path(gray48).is_file() else {}
    size = int(attrs.get("size", spec.size))
    record = {"ingest_size": int(attrs.get("ingest_size", size)), "gray48_size": size, "landmarks": None,
              "guides": {}, "face_margin": float(attrs["face_margin"]) if attrs.get("face_crop") else None}
    for kind in {spec.image, spec.guide} - {"gray48", None}:
        path = Path(guides_dir) / f"{kind}.h5"
        g = read_attrs(path) if path.is_file() else {}
        record["guides"][kind] = {k: _plain(g.get(k, v)) for k, v in DEFAULT_PARAMS[kind].items()}
        if "landmarks_size" in g:
            record["landmarks"] = {"size": int(g["landmarks_size"]), "passes": [str(p) for p in g["landmarks_passes"]]}
    return record


def _plain(v):
    """numpy scalars from HDF5 attrs -> Python scalars (checkpoints are loaded with weights_only)."""
    return v.item() if isinstance(v, np.generic) else v


STATS_BLOCK_BYTES = 64 * 2**20  # pixels counted at once by channel_stats


def channel_stats(pixels, rows: torch.Tensor | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (n - 1) of uint8 pixels [N, C, S, S] / 255 over `rows` (all when None).

    `pixels`: a tensor, or the ``DiskPixels`` of a run too large for memory, read here in blocks of
    rows. From a histogram of the 256 values per channel (counted on the CPU: torch has no
    deterministic CUDA bincount), so the sums are exact integers: the figures depend on neither the
    block size nor the device nor whether the pixels were in memory (and it is 5x faster than float64)."""
    rows = torch.arange(len(pixels)) if rows is None else rows
    channels, per_row = pixels.shape[1], math.prod(pixels.shape[2:])
    n = len(rows) * per_row
    if n == 0:
        return [math.nan] * channels, [math.nan] * channels
    counts = torch.zeros(channels, 256, dtype=torch.int64)
    for block in rows.split(max(1, STATS_BLOCK_BYTES // (channels * per_row))):
        x = pixels[block].cpu()
        for c in range(channels):
            counts[c] += torch.bincount(x[:, c].reshape(-1), minlength=256)
    values = list(range(256))
    mean, std = [], []
    for row in counts.tolist():
        s1 = sum(v * k for v, k in zip(values, row))
        s2 = sum(v * v * k for v, k in zip(values, row))
        mean.append(s1 / (255 * n))
        std.append(max(math.sqrt(Fraction(n * s2 - s1 * s1, n * max(n - 1, 1))) / 255, 1e-6))
    return mean, std
