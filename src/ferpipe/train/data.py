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


STATS_BLOCK_BYTES = 16 * 2**20  # pixels summed at once by channel_stats (4x that as int32)


def channel_stats(pixels, rows: torch.Tensor | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (n - 1) of uint8 pixels [N, C, S, S] / 255 over `rows` (all when None).

    `pixels`: a tensor, or the ``DiskPixels`` of a run too large for memory, read here in blocks of
    rows. The sums are exact integers and the figures computed from them once, so they depend on
    neither the block size nor the device nor whether the pixels were in memory."""
    rows = torch.arange(len(pixels)) if rows is None else rows
    channels, per_row = pixels.shape[1], math.prod(pixels.shape[2:])
    n = len(rows) * per_row
    if n == 0:
        return [math.nan] * channels, [math.nan] * channels
    s1 = s2 = 0
    for block in rows.split(max(1, STATS_BLOCK_BYTES // (channels * per_row))):
        x = pixels[block].to(torch.int32)
        s1 = s1 + x.sum(dim=(0, 2, 3), dtype=torch.int64)
        s2 = s2 + (x * x).sum(dim=(0, 2, 3), dtype=torch.int64)
    sums = list(zip(s1.tolist(), s2.tolist()))
    mean = [a / (255 * n) for a, _ in sums]
    std = [max(math.sqrt(Fraction(n * b - a * a, n * max(n - 1, 1))) / 255, 1e-6) for a, b in sums]
    return mean, std
