"""Model registry: every model the pipeline trains, built by name, all called ``model(x, guide=None)``.

``MODEL_SPECS[name]`` says which packed artifacts training must load for that model:

* ``image``: the image the network (and, for STNs, the sampler) sees: ``"gray48"`` (the gray48
  stage), ``"patches"`` / ``"weighted"`` (the collage written by the guide_patches / guide_weighted stages).
* ``guide``: the guide map the localization net sees (``None``: no guide is passed). Guide kinds
  are the names of the guide_<kind> stages' outputs.
* ``family``: ``deep_emotion`` | ``rmn`` | ``resnet`` | ``vgg`` | ``zoo``; ``stn_mode``: ``None`` |
  ``"original"`` | ``"guided"``; ``in_size``: the default input side.

=========  =========  =========  ==========  ========
name       image      guide      model       stn_mode
=========  =========  =========  ==========  ========
baseline   gray48     -          SimpleCNN   -
original   gray48     -          STN         original
landmarks  gray48     landmarks  STN         guided
soft       gray48     soft       STN         guided
dilation   gray48     dilation   STN         guided
saliency   gray48     saliency   STN         guided
patches    patches    landmarks  STN         guided
weighted   weighted   landmarks  STN         guided
rmn        gray48     -          RMN         -
resnet18   gray48     -          GrayResNet  -
vgg        gray48     -          CompactVGG  -
=========  =========  =========  ==========  ========

The ``zoo`` family, RMN's benchmark models (``ferpipe.models.zoo``, gray48 image, no guide, 1-channel
stem, input side ``in_size``: default 48, 75 for inception_v3): vgg19, vgg19_bn, efficientnet_b2,
googlenet, resnet34, inception_v3, bam_resnet50, cbam_resnet50, densenet121, resnet152.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from ferpipe.models.backbones import load_weights, read_state_dict, resnet18
from ferpipe.models.deep_emotion import STN, Localization, SimpleCNN
from ferpipe.models.rmn import RMN, MaskingBlock
from ferpipe.models.vgg import CompactVGG
from ferpipe.models.zoo import DEFAULT_SIZE, ZOO_NAMES, build_zoo


def _spec(family: str, image: str = "gray48", guide: str | None = None,
          stn_mode: str | None = None, in_size: int = 48) -> dict[str, Any]:
    return {"family": family, "image": image, "guide": guide, "stn_mode": stn_mode, "in_size": in_size}


# train_sequence's models (ferpipe.models.sequence; not built by build_model: they take frame sequences)
SEQUENCE_MODELS = ("lstm", "cbm", "convlstm", "frame")

MODEL_SPECS: dict[str, dict[str, Any]] = {
    "baseline": _spec("deep_emotion"),
    "original": _spec("deep_emotion", stn_mode="original"),
    "landmarks": _spec("deep_emotion", guide="landmarks", stn_mode="guided"),
    "soft": _spec("deep_emotion", guide="soft", stn_mode="guided"),
    "dilation": _spec("deep_emotion", guide="dilation", stn_mode="guided"),
    "saliency": _spec("deep_emotion", guide="saliency", stn_mode="guided"),
    "patches": _spec("deep_emotion", image="patches", guide="landmarks", stn_mode="guided"),
    "weighted": _spec("deep_emotion", image="weighted", guide="landmarks", stn_mode="guided"),
    "rmn": _spec("rmn"),
    "resnet18": _spec("resnet"),
    "vgg": _spec("vgg"),
    **{name: _spec("zoo", in_size=DEFAULT_SIZE[name]) for name in ZOO_NAMES},
}
MODEL_NAMES = tuple(MODEL_SPECS)


def _factory(name: str) -> Callable[..., nn.Module]:
    spec = MODEL_SPECS[name]
    if spec["family"] == "deep_emotion":
        if spec["stn_mode"] is None:
            return lambda num_classes, **kw: SimpleCNN(num_classes, **kw)
        return lambda num_classes, **kw: STN(num_classes, mode=spec["stn_mode"], **kw)
    if spec["family"] == "rmn":
        return lambda num_classes, **kw: RMN(num_classes, **{"in_size": spec["in_size"], **kw})
    if spec["family"] == "vgg":
        return lambda num_classes, **kw: CompactVGG(num_classes, **kw)
    if spec["family"] == "zoo":
        return lambda num_classes, **kw: build_zoo(name, num_classes, **{"in_size": spec["in_size"], **kw})
    return lambda num_classes, **kw: resnet18(num_classes, **kw)


def build_model(name: str, num_classes: int, **kw: Any) -> nn.Module:
    """Build a registry model. Extra keywords go to its constructor:

    SimpleCNN/STN: ``in_size``, ``dropout`` (STN also ``theta_bound``); RMN: ``in_size``, ``in_channels``, ``stem``,
    ``mask_depths``, ``dropout``, ``weights_path``; resnet18: ``weights_path``, ``in_channels``, ``in_size``;
    vgg: ``width``, ``blocks``, ``dropout``, ``in_channels``; zoo models: ``in_size``, ``weights_path``,
    ``in_channels``. SimpleCNN/STN take ``in_channels`` too: every registry model takes 3 (RGB, ingest.color
    rgb), the training stage passes it for RGB runs.
    """
    if name not in MODEL_SPECS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return _factory(name)(int(num_classes), **kw)


def needs_guide(name: str) -> bool:
    """Whether training must pass a guide map to this registry model."""
    return MODEL_SPECS[name]["guide"] is not None


def _resolve(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return parent, attr


def get_head(model: nn.Module) -> nn.Linear:
    """The final classification layer: ``model.head_path`` if defined, else the last nn.Linear."""
    path = getattr(model, "head_path", None)
    if path is None:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"{type(model).__name__} has no nn.Linear head")
        path = linears[-1]
    head = model.get_submodule(path)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__}.{path} is {type(head).__name__}, not nn.Linear")
    return head


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the final Linear for a freshly initialized one with ``num_classes`` outputs.

    For transfer learning between label sets; every other weight is kept. Works in place and
    returns the model. The new layer is on the old one's device and dtype.
    """
    old = get_head(model)
    path = getattr(model, "head_path", None) or [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    new = nn.Linear(old.in_features, int(num_classes), bias=old.bias is not None)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent, attr = _resolve(model, path)
    setattr(parent, attr, new)
    if hasattr(model, "num_classes"):
        model.num_classes = int(num_classes)
    if isinstance(model, STN):
        model.classifier.num_classes = int(num_classes)
    return model


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "MODEL_SPECS", "MODEL_NAMES", "build_model", "needs_guide", "get_head", "replace_head",
    "count_params", "SimpleCNN", "Localization", "STN", "RMN", "MaskingBlock", "resnet18", "CompactVGG",
    "load_weights", "read_state_dict", "ZOO_NAMES", "build_zoo",
]
