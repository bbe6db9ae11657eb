"""torchvision backbones adapted to 1-channel faces, and loading weights from a local file.

Nothing here downloads: weights come only from a file path you pass.

``resnet18``: torchvision's ResNet-18 with conv1 = 3x3, stride 1, 1 input channel, no max-pool
(a 48 px face keeps 48x48 at layer1 and 6x6 at layer4) and fc = Linear(512, num_classes).
``GrayInput``: the mixin that gives a torchvision classifier the registry's ``forward(x, guide=None)``
(the model zoo, ``ferpipe.models.zoo``, is built on it).

Loading a checkpoint (``load_weights``), the policy chosen:

* The file may hold a bare state_dict or a dict with one under ``state_dict`` / ``model`` /
  ``net``; a ``module.`` prefix (DataParallel/DDP) is stripped.
* Keys whose shapes match are copied.
* The stem conv's weight (``model.stem_key``, default ``conv1.weight``) of another shape is
  *adapted*, not dropped: the input channels are summed (3 -> 1; exact for a grayscale image
  stacked to 3 channels) or spread (1 -> 3, divided by 3), then, only if the kernel sizes differ,
  the kernel is resampled (7x7 -> 3x3 by area averaging) and scaled by (old area / new area) so a
  flat patch gives about the same response. This is an approximation (the stride and the scale
  change too); fine-tune all layers afterwards.
* Head keys (``fc.*`` and ``model.head_path``) whose shapes differ (another class count), and head
  keys of another layout, are skipped and the new head keeps its fresh initialization.
* What a model may declare (class attributes), for the checkpoints of its reference architecture:
  ``optional_keys``: its keys a file need not have (fnmatch patterns or prefixes: RMN's masks, CBAM's
  attention when loading a plain ResNet-50); ``drop_keys``: file keys it leaves out by design (the
  auxiliary classifiers of GoogLeNet / Inception-v3 checkpoints); ``translate_keys(state)``: renames
  another layout's keys to its own (torchvision's old DenseNet names, pytorchcv's CBAM/BAM ResNets).
* Every adapted / skipped / missing key is logged (logger ``ferpipe.models.backbones``) and
  returned in a report. A model key that is neither loaded nor allowed to be missing, or a file
  key the model does not have (outside the head), is an error: it means the wrong file.
"""
from __future__ import annotations

import fnmatch
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ferpipe.tv import torchvision

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model", "net", "model_state_dict")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state_dict from a local file (never a URL); FileNotFoundError names a missing file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state_dict (nor a dict with one under {_WRAPPER_KEYS})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def adapt_conv_weight(w: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Adapt a conv weight [O, I, k, k] to ``shape`` [O, I', k', k'] (same O).

    Input channels: I -> 1 sums; 1 -> I' repeats and divides by I'. Kernel: resampled by area
    averaging (shrink) or bilinear interpolation (grow), scaled by k*k / (k'*k').
    """
    out_c, in_c, kh, kw = shape
    if w.dim() != 4 or w.shape[0] != out_c:
        raise ValueError(f"cannot adapt conv weight {tuple(w.shape)} to {tuple(shape)}")
    if w.shape[1] != in_c:
        if in_c == 1:
            w = w.sum(dim=1, keepdim=True)
        elif w.shape[1] == 1:
            w = w.repeat(1, in_c, 1, 1) / in_c
        else:
            raise ValueError(f"cannot adapt conv input channels {w.shape[1]} -> {in_c}")
    if tuple(w.shape[-2:]) != (kh, kw):
        area = w.shape[-2] * w.shape[-1]
        if kh <= w.shape[-2] and kw <= w.shape[-1]:
            w = F.adaptive_avg_pool2d(w, (kh, kw))
        else:
            w = F.interpolate(w, size=(kh, kw), mode="bilinear", align_corners=True)
        w = w * (area / (kh * kw))
    return w.contiguous()


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``key`` starts with, or fnmatches, one of ``patterns``."""
    return any(key.startswith(p) or fnmatch.fnmatchcase(key, p) for p in patterns)


def load_weights(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    head_prefixes: tuple[str, ...] | None = None,
    allow_missing: tuple[str, ...] = (),
    adapt_keys: tuple[str, ...] | None = None,
) -> dict[str, list]:
    """Copy weights from a local checkpoint into ``model`` (policy in the module docstring).

    ``head_prefixes``: keys that may be skipped in either direction (the classifier head);
    default ``fc.`` plus ``model.head_path`` (so a model trained on another label set loads with
    its head left fresh: the transfer-learning case).
    ``allow_missing``: model key prefixes or fnmatch patterns the file need not have (e.g. RMN's
    ``mask`` blocks when loading a plain ResNet-34), added to ``model.optional_keys``.
    ``adapt_keys``: conv weights adapted when their shapes differ; default ``model.stem_key``
    (``conv1.weight``). Returns {"loaded", "adapted", "skipped", "missing"}.
    """
    if head_prefixes is None:
        head_prefixes = ("fc.",)
        if getattr(model, "head_path", None):
            head_prefixes += (model.head_path + ".",)
    if adapt_keys is None:
        adapt_keys = (getattr(model, "stem_key", "conv1.weight"),)
    allow_missing = tuple(allow_missing) + tuple(getattr(model, "optional_keys", ()))
    drop = tuple(getattr(model, "drop_keys", ()))
    source = read_state_dict(path)
    if hasattr(model, "translate_keys"):
        source = model.translate_keys(source)
    target = model.state_dict()
    new_state, report = {}, {"loaded": [], "adapted": [], "skipped": [], "missing": []}
    unexpected = []
    for key, value in source.items():
        if key not in target:
            if key.startswith(head_prefixes):
                report["skipped"].append((key, "head key not in this model"))
            elif _matches(key, drop):
                report["skipped"].append((key, "not part of this model"))
            else:
                unexpected.append(key)
            continue
        want = target[key]
        if value.shape == want.shape:
            new_state[key] = value.to(want.dtype)
            report["loaded"].append(key)
        elif key in adapt_keys:
            new_state[key] = adapt_conv_weight(value.float(), want.shape).to(want.dtype)
            report["adapted"].append((key, tuple(value.shape), tuple(want.shape)))
        elif key.startswith(head_prefixes):
            report["skipped"].append((key, f"shape {tuple(value.shape)} != {tuple(want.shape)}"))
        else:
            raise ValueError(
                f"{path}: {key} has shape {tuple(value.shape)}, the model needs {tuple(want.shape)}"
            )
    if unexpected:
        raise ValueError(f"{path}: keys this model does not have: {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)} in all)")
    missing = [k for k in target if k not in new_state]
    bad = [k for k in missing if not (k.startswith(head_prefixes) or _matches(k, allow_missing))]
    if bad:
        raise ValueError(f"{path}: no weights for {bad[:8]}{' ...' if len(bad) > 8 else ''} "
                         f"({len(bad)} in all); is it a checkpoint of this architecture?")
    report["missing"] = missing
    model.load_state_dict(new_state, strict=False)
    for key, old, new in report["adapted"]:
        log.warning("%s: adapted %s %s -> %s", path, key, old, new)
    for key, why in report["skipped"]:
        log.warning("%s: skipped %s (%s); it keeps its fresh initialization", path, key, why)
    if missing:
        log.warning("%s: %d model keys not in the file keep their initialization: %s",
                    path, len(missing), missing[:8])
    log.info("%s: loaded %d tensors", path, len(report["loaded"]))
    return report


class GrayInput:
    """Mixin giving a torchvision classifier the registry's ``forward(x, guide=None)``.

    ``guide`` is ignored. A 1-channel x is expanded when the stem (the conv whose weight is
    ``stem_key``) takes more channels; x smaller than ``min_size`` pixels is refused with a clear
    error rather than a shape error deep inside the network.
    """

    stem_key = "conv1.weight"
    head_path = "fc"
    min_size = 1

    @property
    def stem_conv(self) -> nn.Conv2d:
        return self.get_submodule(self.stem_key.rpartition(".")[0])

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        want = self.stem_conv.in_channels
        if x.dim() != 4:
            raise ValueError(f"image must be [B, C, H, W], got {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"{type(self).__name__} needs images of at least {self.min_size} px, "
                             f"got {tuple(x.shape[-2:])}")
        if x.shape[1] != want:
            if x.shape[1] != 1:
                raise ValueError(f"image has {x.shape[1]} channels, the model takes {want} (or 1)")
            x = x.expand(-1, want, -1, -1)
        return super().forward(x)


class GrayResNet(GrayInput, torchvision.models.ResNet):
    """torchvision ResNet whose forward takes (x, guide=None) like every registry model."""


def resnet18(num_classes: int, weights_path: str | os.PathLike | None = None,
             in_channels: int = 1, in_size: int = 48) -> GrayResNet:
    """ResNet-18 for 48x48 grayscale: conv1 3x3 stride 1 (``in_channels`` in: 3 for RGB), no max-pool.

    ``in_size``: the side training resizes the batches to (the Emotion SDK recipe: 100); the network
    pools adaptively, so it does not change with it.

    ``weights_path``: a local state_dict (e.g. torchvision's ImageNet resnet18, 3-channel 7x7
    conv1, 1000 classes): conv1 is adapted and a head of another size skipped, see ``load_weights``.
    """
    model = GrayResNet(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    model.num_classes = int(num_classes)
    model.in_size = int(in_size)
    if weights_path is not None:
        load_weights(model, weights_path)
    return model
