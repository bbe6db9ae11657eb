"""RMN's model zoo: the ImageNet architectures its paper benchmarks on FER-2013, for 1-channel faces.

Residual Masking Network (Pham et al., ICPR 2020) compares VGG19, EfficientNet-b2, GoogLeNet,
ResNet34, Inception-v3, BAM-ResNet50, CBAM-ResNet50, DenseNet121 and ResNet152 with its own network
(``rmn``). Each is here as a registry model, built by ``build_zoo(name, num_classes, ...)``:

* The architecture is the reference one unchanged (torchvision's constructor; CBAM/BAM in
  ``ferpipe.models.attention``), except two things: the head has ``num_classes`` outputs, and the
  stem conv takes **one** input channel. That conv's weights are the reference's 3-channel weights
  summed over the input channels, so the model computes exactly what the reference computes on the
  grayscale image stacked to 3 channels (RMN's input), at a third of the stem's cost. A torchvision
  checkpoint loads the same way (``load_weights`` sums its conv1), and the equality holds for it too.
* No auxiliary classifiers (GoogLeNet's aux1/aux2, Inception-v3's AuxLogits): RMN drops GoogLeNet's
  and computes but never uses Inception's; their keys in a checkpoint are skipped.
  ``transform_input`` is off: the training stage standardizes the input itself.
* ``in_size`` is the side the training stage resizes the faces to (RMN: 224); the network itself
  does not change with it. They pool adaptively, so one model takes any side from its ``min_size``
  up (the smallest side it runs on, measured): 75 px for Inception-v3 (unpadded convs in its stem
  and reductions; torchvision documents 75 too), 32 for VGG19 (five 2x2 pools), 29 for DenseNet121,
  15 for GoogLeNet, any for the ResNets and EfficientNet. The registry default is 48 (the gray48
  images as they are; 75 for Inception-v3): cheap on a CPU, but the last feature maps are 1-2 px
  there. ``model_kwargs: {in_size: 224}`` is RMN's setting.
* ``weights_path``: a local state_dict of the reference architecture, torchvision's ImageNet
  checkpoints (3-channel stem, 1000 classes: the stem is summed, the head skipped), a ferpipe or RMN
  FER checkpoint (``{"net": ...}`` wrappers are unwrapped), pytorchcv's CBAM/BAM ResNet-50 layout,
  or torchvision's old DenseNet key names (``norm.1`` for ``norm1``). Nothing is downloaded.
  timm's ResNets share torchvision's key names; its other layouts are not translated.
"""
from __future__ import annotations

import os
import re
from typing import Callable

import torch
import torch.nn as nn

from ferpipe.models.attention import bam_resnet50, cbam_resnet50
from ferpipe.models.backbones import GrayInput, GrayResNet, adapt_conv_weight, load_weights
from ferpipe.tv import torchvision

tvm = torchvision.models


class GrayVGG(GrayInput, tvm.VGG):
    stem_key = "features.0.weight"
    head_path = "classifier.6"
    min_size = 32


class GrayEfficientNet(GrayInput, tvm.EfficientNet):
    stem_key = "features.0.0.weight"
    head_path = "classifier.1"


class GrayGoogLeNet(GrayInput, tvm.GoogLeNet):
    stem_key = "conv1.conv.weight"
    drop_keys = ("aux1.", "aux2.")
    min_size = 15


class GrayInception3(GrayInput, tvm.Inception3):
    stem_key = "Conv2d_1a_3x3.conv.weight"
    drop_keys = ("AuxLogits.",)
    min_size = 75


_OLD_DENSENET = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


class GrayDenseNet(GrayInput, tvm.DenseNet):
    stem_key = "features.conv0.weight"
    head_path = "classifier"
    min_size = 29

    @staticmethod
    def translate_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """torchvision's DenseNet ImageNet files still use ``denselayerN.norm.1``: rename to ``norm1``."""
        return {_OLD_DENSENET.sub(r"\1\2", k): v for k, v in state.items()}


def _vgg19(num_classes: int, batch_norm: bool) -> GrayVGG:
    return GrayVGG(tvm.vgg.make_layers(tvm.vgg.cfgs["E"], batch_norm=batch_norm), num_classes=num_classes)


def _efficientnet_b2(num_classes: int) -> GrayEfficientNet:
    # torchvision's efficientnet_b2 builder, without the weights machinery (a private helper: a
    # torchvision upgrade that renames it fails this model's tests, not silently)
    setting, last_channel = tvm.efficientnet._efficientnet_conf("efficientnet_b2", width_mult=1.1, depth_mult=1.2)
    return GrayEfficientNet(setting, dropout=0.3, last_channel=last_channel, num_classes=num_classes)


ARCHS: dict[str, Callable[[int], nn.Module]] = {
    "vgg19": lambda n: _vgg19(n, batch_norm=False),
    "vgg19_bn": lambda n: _vgg19(n, batch_norm=True),
    "efficientnet_b2": _efficientnet_b2,
    "googlenet": lambda n: GrayGoogLeNet(num_classes=n, aux_logits=False, transform_input=False, init_weights=True),
    "resnet34": lambda n: GrayResNet(tvm.resnet.BasicBlock, [3, 4, 6, 3], num_classes=n),
    "inception_v3": lambda n: GrayInception3(num_classes=n, aux_logits=False, transform_input=False,
                                             init_weights=True),
    "bam_resnet50": bam_resnet50,
    "cbam_resnet50": cbam_resnet50,
    "densenet121": lambda n: GrayDenseNet(32, (6, 12, 24, 16), 64, num_classes=n),
    "resnet152": lambda n: GrayResNet(tvm.resnet.Bottleneck, [3, 8, 36, 3], num_classes=n),
}
ZOO_NAMES = tuple(ARCHS)
DEFAULT_SIZE = {name: 75 if name == "inception_v3" else 48 for name in ZOO_NAMES}


def gray_stem(model: nn.Module) -> nn.Module:
    """Replace the stem conv (``model.stem_key``) by a 1-channel one holding its weights summed over
    the input channels. In place; returns the model."""
    old = model.stem_conv
    new = nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    old.groups, old.bias is not None, old.padding_mode,
                    device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(adapt_conv_weight(old.weight, new.weight.shape))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    parent, _, attr = model.stem_key.rpartition(".")[0].rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


def build_zoo(name: str, num_classes: int, in_size: int | None = None,
              weights_path: str | os.PathLike | None = None, in_channels: int = 1) -> nn.Module:
    """Zoo model ``name`` (see ``ZOO_NAMES``) with a 1-channel stem (``in_channels`` 3: the reference's
    RGB stem, for ingest.color rgb) and ``num_classes`` outputs."""
    if name not in ARCHS:
        raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(ZOO_NAMES)}")
    if int(in_channels) not in (1, 3):
        raise ValueError(f"{name} takes 1 (gray) or 3 (RGB) input channels, got in_channels={in_channels}")
    model = ARCHS[name](int(num_classes))
    if int(in_channels) == 1:
        model = gray_stem(model)
    model.num_classes = int(num_classes)
    model.in_size = int(DEFAULT_SIZE[name] if in_size is None else in_size)
    if model.in_size < model.min_size:
        raise ValueError(f"{name} needs in_size >= {model.min_size}, got {model.in_size}")
    if weights_path is not None:
        load_weights(model, weights_path)
    return model
