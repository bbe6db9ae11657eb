"""Model input: how uint8 pixels become the float tensors ``model(image, guide)`` takes.

The input recipe a checkpoint needs at inference is stored in its meta under ``"input"``:
``{"image", "guide", "size", "mean", "std", "image_channels"}`` (mean/std per channel of the [0, 1]
pixels, computed on the training rows of that run; image_channels 3 for an RGB run, ingest.color rgb,
else 1: a checkpoint saved before it existed is gray). The channels are the image's (1 gray, or R, G, B)
then the guide's. ``prepare_input(images, guides, spec)`` turns uint8 arrays into
the float tensors the model expects: use it (or ``InputSpec``) wherever a checkpoint is applied.
Training, evaluation, recognition, export and the sequence features all feed models through here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ferpipe.models import MODEL_SPECS


@dataclass
class InputSpec:
    """How uint8 pixels become model input: channels, size, standardization."""

    image: str = "gray48"          # gray48 | patches | weighted (the artifact the image comes from)
    guide: str | None = None       # guide kind or None
    size: int = 48                 # side the model takes (batches are resized when it differs)
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    image_channels: int = 1        # 1 gray, 3 RGB (ingest.color rgb)

    @property
    def channels(self) -> int:
        """The image's channels, then the guide's one."""
        return self.image_channels + (0 if self.guide is None else 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "InputSpec":
        d = dict(d or {})
        return cls(**{k: d[k] for k in ("image", "guide", "size", "mean", "std", "image_channels") if k in d})


def model_size(name: str, model_kwargs: dict | None = None) -> int:
    """The input side a registry model is built for (``in_size`` kwarg or the spec's default)."""
    return int((model_kwargs or {}).get("in_size", MODEL_SPECS[name]["in_size"]))


def normalize(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """float [B, C, S, S] in [0, 1] -> resized to spec.size and standardized per channel."""
    if x.shape[-1] != spec.size or x.shape[-2] != spec.size:
        x = F.interpolate(x, size=(spec.size, spec.size), mode="bilinear", align_corners=False)
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def split_channels(x: torch.Tensor, image_channels: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, C, S, S] -> (image [B, image_channels, S, S], guide [B, 1, S, S] or None): the two arguments
    of model()."""
    k = int(image_channels)
    return x[:, :k], (x[:, k:k + 1] if x.shape[1] > k else None)


def image_planes(images: np.ndarray) -> np.ndarray:
    """Packed images channels first: gray [N, S, S] -> [N, 1, S, S], RGB [N, S, S, 3] -> [N, 3, S, S]."""
    images = np.asarray(images)
    return images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)


def prepare_input(images: np.ndarray, guides: np.ndarray | None, spec: InputSpec | dict,
                  device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 images [B, S, S] (RGB: [B, S, S, 3]) (+ guides [B, S, S]) -> (image, guide) float tensors
    for ``model(image, guide)``.

    ``spec`` is an InputSpec or a checkpoint's ``meta["input"]``.
    """
    spec = spec if isinstance(spec, InputSpec) else InputSpec.from_dict(spec)
    planes = image_planes(images)
    if planes.shape[1] != spec.image_channels:
        raise ValueError(f"this model takes {spec.image_channels}-channel images "
                         f"({'RGB' if spec.image_channels == 3 else 'gray'}), got {planes.shape[1]}-channel ones")
    arrays = [planes]
    if spec.guide is not None:
        if guides is None:
            raise ValueError(f"this model needs the '{spec.guide}' guide map as well as the image")
        arrays.append(np.asarray(guides)[:, None])
    x = torch.from_numpy(np.concatenate(arrays, axis=1)).to(device).float().div_(255.0)
    return split_channels(normalize(x, spec), spec.image_channels)
