"""CBAM-ResNet-50 and BAM-ResNet-50: torchvision's ResNet-50 with attention blocks of our own.

The two attention ResNets of RMN's benchmark (it took them from pytorchcv; the facts below were
read from the papers, the authors' code and pytorchcv, the code is ours). Both keep torchvision's
ResNet-50 module names, so a torchvision (or timm) ResNet-50 checkpoint initializes the body and the
attention blocks keep their initialization; ``translate_keys`` reads pytorchcv's layout, where the
ImageNet weights of both models and RMN's FER-2013 checkpoints come from.

* CBAM (Woo et al., ECCV 2018): after each bottleneck's last BN, before the residual addition,
  channel attention then spatial attention. Channel: one MLP C -> C/16 -> C (ReLU, biases) shared
  by the average- and the max-pooled vector, sigmoid of the sum. Spatial: the max and the mean over
  channels (in that order, as the authors' code), a 7x7 conv 2 -> 1 without bias, BN, sigmoid.
  pytorchcv's cbam_resnet50 has 28,089,624 parameters (1000 classes, 3-channel input).
* BAM (Park et al., BMVC 2018): one module after each of stages 1-3 (256, 512, 1024 channels),
  ``x * (1 + sigmoid(Mc(x) * Ms(x)))``. Channel branch: average pool, C -> C/16 (bias, BN, ReLU)
  -> C. Spatial branch: 1x1 conv C -> C/16, two 3x3 convs dilated 4, each with bias, BN and ReLU,
  then a 1x1 conv to one map. The paper writes sigmoid(Mc + Ms); the authors' code and pytorchcv
  multiply, and their weights were trained so: we multiply. pytorchcv's bam_resnet50 has
  25,915,099 parameters.

The MLPs are 1x1 convolutions (the same parameters as Linear layers): the head stays the only
``nn.Linear`` of the network, which is what the features stage's ``flatten`` tap relies on.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from ferpipe.models.backbones import GrayResNet
from ferpipe.tv import torchvision

Bottleneck = torchvision.models.resnet.Bottleneck
RESNET50_BLOCKS = [3, 4, 6, 3]


class CBAM(nn.Module):
    """Convolutional Block Attention Module: channel, then spatial attention (see module docstring)."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        mid = channels // reduction
        self.mlp = nn.Sequential(nn.Conv2d(channels, mid, 1), nn.ReLU(inplace=True), nn.Conv2d(mid, channels, 1))
        self.spatial = nn.Sequential(nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False),
                                     nn.BatchNorm2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.sigmoid(self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True)))
        s = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(s))


class BAM(nn.Module):
    """Bottleneck Attention Module: ``x * (1 + sigmoid(channel(x) * spatial(x)))``."""

    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4):
        super().__init__()
        mid = channels // reduction
        self.channel = nn.Sequential(nn.Conv2d(channels, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                                     nn.Conv2d(mid, channels, 1))
        layers: list[nn.Module] = [nn.Conv2d(channels, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True)]
        for _ in range(2):
            layers += [nn.Conv2d(mid, mid, 3, padding=dilation, dilation=dilation), nn.BatchNorm2d(mid),
                       nn.ReLU(inplace=True)]
        self.spatial = nn.Sequential(*layers, nn.Conv2d(mid, 1, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + torch.sigmoid(self.channel(x.mean((2, 3), keepdim=True)) * self.spatial(x)))


class CBAMBottleneck(Bottleneck):
    """torchvision's Bottleneck with CBAM on the residual branch, before the addition."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cbam = CBAM(self.conv3.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.cbam(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


class CBAMResNet(GrayResNet):
    optional_keys = ("layer*.cbam.*",)  # absent from a plain ResNet-50 checkpoint

    @staticmethod
    def translate_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return from_pytorchcv(state)


class BAMResNet(GrayResNet):
    """ResNet with a BAM after stages 1, 2 and 3 (``bam1``..``bam3``)."""

    optional_keys = ("bam",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3), start=1):
            setattr(self, f"bam{i}", BAM(layer[-1].conv3.out_channels))

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.bam1(self.layer1(x))
        x = self.bam2(self.layer2(x))
        x = self.bam3(self.layer3(x))
        x = self.layer4(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))

    @staticmethod
    def translate_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return from_pytorchcv(state)


def cbam_resnet50(num_classes: int) -> CBAMResNet:
    return CBAMResNet(CBAMBottleneck, RESNET50_BLOCKS, num_classes=num_classes)


def bam_resnet50(num_classes: int) -> BAMResNet:
    return BAMResNet(Bottleneck, RESNET50_BLOCKS, num_classes=num_classes)


# pytorchcv names, relative to features.stage<s>.unit<u>. -> ours, relative to layer<s>.<u-1>.
_UNIT_KEYS = [
    (r"(?:res_unit\.)?body\.conv(\d)\.conv\.", r"conv\1."),
    (r"(?:res_unit\.)?body\.conv(\d)\.bn\.", r"bn\1."),
    (r"(?:res_unit\.)?identity_conv\.conv\.", "downsample.0."),
    (r"(?:res_unit\.)?identity_conv\.bn\.", "downsample.1."),
    (r"cbam\.ch_gate\.mlp\.fc1\.", "cbam.mlp.0."),
    (r"cbam\.ch_gate\.mlp\.fc2\.", "cbam.mlp.2."),
    (r"cbam\.sp_gate\.conv\.conv\.", "cbam.spatial.0."),
    (r"cbam\.sp_gate\.conv\.bn\.", "cbam.spatial.1."),
]
# pytorchcv's BAM sits in front of unit 1 of stages 2-4: features.stage<s>.unit1.bam. -> bam<s-1>.
_BAM_KEYS = [
    ("ch_att.init_fc.fc.", "channel.0."), ("ch_att.init_fc.bn.", "channel.1."), ("ch_att.final_fc.", "channel.3."),
    ("sp_att.init_conv.conv.", "spatial.0."), ("sp_att.init_conv.bn.", "spatial.1."),
    ("sp_att.dil_convs.conv1.conv.", "spatial.3."), ("sp_att.dil_convs.conv1.bn.", "spatial.4."),
    ("sp_att.dil_convs.conv2.conv.", "spatial.6."), ("sp_att.dil_convs.conv2.bn.", "spatial.7."),
    ("sp_att.final_conv.", "spatial.9."),
]
_PTCV_MARK = "features.init_block.conv.conv.weight"


def _rename_pytorchcv(key: str) -> str:
    if key.startswith("features.init_block.conv.conv."):
        return "conv1." + key.removeprefix("features.init_block.conv.conv.")
    if key.startswith("features.init_block.conv.bn."):
        return "bn1." + key.removeprefix("features.init_block.conv.bn.")
    if key.startswith("output."):
        return "fc." + key.removeprefix("output.")
    m = re.match(r"features\.stage(\d)\.unit(\d+)\.(.*)$", key)
    if not m:
        return key
    stage, unit, tail = int(m[1]), int(m[2]), m[3]
    if tail.startswith("bam."):
        tail = tail.removeprefix("bam.")
        for old, new in _BAM_KEYS:
            if tail.startswith(old):
                return f"bam{stage - 1}.{new}{tail.removeprefix(old)}"
        return key
    for pattern, repl in _UNIT_KEYS:
        new, n = re.subn("^" + pattern, repl, tail)
        if n:
            return f"layer{stage}.{unit - 1}.{new}"
    return key


def from_pytorchcv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """pytorchcv's (cbam|bam)_resnet50 keys -> ours; any other state_dict is returned unchanged.

    Keys it does not know stay as they are (load_weights then names them). The attention MLPs'
    Linear weights [out, in] become 1x1 conv weights [out, in, 1, 1].
    """
    if _PTCV_MARK not in state:
        return state
    out = {}
    for key, value in state.items():
        new = _rename_pytorchcv(key)
        if value.dim() == 2 and re.search(r"(cbam\.mlp|bam\d\.channel)\.\d\.weight$", new):
            value = value[:, :, None, None]
        out[new] = value
    return out
