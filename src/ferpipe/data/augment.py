"""Batched augmentation on tensors, on the device: flip + small affine, one grid_sample. Training
augments its batches with it, the evaluate stage its test-time augmentation (evaluate.tta).

The image and its guide map are channels of ONE tensor [B, C, S, S], so a single
``affine_grid`` / ``grid_sample`` applies the SAME random transform to both (a guide map that
stopped matching its face would teach the localization net nonsense).

Per sample: horizontal flip with probability ``hflip``, rotation uniform in +-``degrees``, zoom
uniform in ``scale`` = [lo, hi] (> 1 zooms in), shift uniform in +-``translate`` of the side.
Outside pixels are 0 (black, like torchvision's RandomAffine fill=0). Random numbers come from a
CPU ``torch.Generator`` seeded from the params, so a run is reproducible on any device.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


class BatchAugment:
    """Callable ``aug(x)`` on float [B, C, S, S]; returns a new tensor, the same transform per sample
    across channels. ``enabled`` is False when every knob is off (then ``aug(x)`` returns x). Its random
    numbers come from ``generator`` (a training snapshot saves and restores its state)."""

    def __init__(self, hflip: float = 0.5, degrees: float = 0.0, scale: Sequence[float] = (1.0, 1.0),
                 translate: float = 0.0, seed: int = 0, generator: torch.Generator | None = None):
        if not 0.0 <= float(hflip) <= 1.0:
            raise ValueError(f"augment.hflip is a probability in [0, 1], got {hflip}")
        if isinstance(scale, (int, float)):
            scale = (float(scale), float(scale))
        if len(scale) != 2 or not 0 < float(scale[0]) <= float(scale[1]):
            raise ValueError(f"augment.scale must be [lo, hi] with 0 < lo <= hi, got {scale}")
        if float(degrees) < 0 or float(translate) < 0:
            raise ValueError("augment.degrees and augment.translate must be >= 0")
        self.hflip = float(hflip)
        self.degrees = float(degrees)
        self.scale = (float(scale[0]), float(scale[1]))
        self.translate = float(translate)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(int(seed))

    @classmethod
    def from_params(cls, prm: dict | None, seed: int = 0) -> "BatchAugment":
        prm = dict(prm or {})
        unknown = set(prm) - {"hflip", "degrees", "scale", "translate"}
        if unknown:
            raise ValueError(f"unknown augment params {sorted(unknown)} (hflip, degrees, scale, translate)")
        return cls(hflip=prm.get("hflip", 0.0), degrees=prm.get("degrees", 0.0),
                   scale=prm.get("scale", (1.0, 1.0)), translate=prm.get("translate", 0.0), seed=seed)

    @property
    def affine(self) -> bool:
        return self.degrees > 0 or self.scale != (1.0, 1.0) or self.translate > 0

    @property
    def enabled(self) -> bool:
        return self.affine or self.hflip > 0

    def _uniform(self, n: int, lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=self.generator) * (hi - lo) + lo

    def theta(self, n: int) -> torch.Tensor:
        """n random 2x3 affine matrices (output -> input coordinates, normalized [-1, 1])."""
        flip = torch.where(torch.rand(n, generator=self.generator) < self.hflip, -1.0, 1.0)
        angle = self._uniform(n, -self.degrees, self.degrees) * (math.pi / 180.0)
        zoom = self._uniform(n, *self.scale)
        tx = self._uniform(n, -2 * self.translate, 2 * self.translate)
        ty = self._uniform(n, -2 * self.translate, 2 * self.translate)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        return torch.stack([torch.stack([cos * flip, -sin, tx], 1),
                            torch.stack([sin * flip, cos, ty], 1)], 1)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if not self.enabled or n == 0:
            return x
        if not self.affine:  # flips only: no resampling
            flip = (torch.rand(n, generator=self.generator) < self.hflip).to(x.device)
            return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        theta = self.theta(n).to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
