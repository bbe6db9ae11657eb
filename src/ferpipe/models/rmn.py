"""Residual Masking Network (Pham & Tran, ICPR 2020; pip ``rmn``), written afresh.

Architecture (facts read from phamquiluan/ResidualMaskingNetwork, ``resmasking_dropout1``):

* ResNet-34 body: stem, then BasicBlock stages [3, 4, 6, 3] with 64/128/256/512 channels.
* After each stage s a *masking block* of depth 4, 3, 2, 1 computes a mask M (same shape as the
  stage output) and the features become ``x * (1 + M)``.
* A masking block of depth d on C channels is a small U-Net of BasicBlocks whose width doubles
  at each level: encoder BasicBlock(C->2C) at full size, then d-1 times MaxPool2 +
  BasicBlock(2^i C -> 2^(i+1) C); decoder d-1 times ConvTranspose(k2, s2)+BN+ReLU halving the
  width, concatenation with the encoder output of that size, BasicBlock(2^(i+1) C -> 2^i C);
  a last BasicBlock(2C -> C) (its shortcut is the 1x1 conv + BN) and a softmax over channels.
  BasicBlocks that change width use a 1x1 conv + BN shortcut. Convs are Kaiming-initialized and
  the last BN of every BasicBlock inside a mask starts at zero (as the reference does).
* Head: global average pool, Dropout(0.4), Linear(512, num_classes).

Differences from the reference, for sizes it never saw:

* ``stem``: ``"standard"`` is the ImageNet stem (7x7 stride 2 + 3x3 max-pool; 224 px -> 56 at
  stage 1, as the reference). ``"small"`` is a 3x3 stride-1 conv without max-pool, so a 48 px face
  is 48 at stage 1 and 6 at stage 4 and the U-Nets still have room to pool. Default: small when
  ``in_size`` < 112. (The small stem at 48 px costs about as much compute as the standard stem at
  224 px; ``stem="standard"`` at 48 px is ~16x cheaper but leaves 12/6/3/2 px per stage.)
* The U-Net pools with ``ceil_mode=True`` (never reaches 0 px) and, when an upsampled map does
  not match its skip connection (odd sizes), it is resized to the skip's size (bilinear). For
  even sizes this is exactly the reference computation.
* ``in_channels``: the reference stacks grayscale to 3 channels (default here too, so ImageNet
  ResNet-34 weights fit); ``in_channels=1`` gives a 1-channel stem. A [B,1,S,S] input is
  expanded to the stem's channels inside forward.

``weights_path`` loads a local state_dict: an RMN checkpoint of this module, or a plain torchvision
ResNet-34 (the masks then keep their initialization; conv1 is adapted to the stem, the head is
skipped), see ``ferpipe.models.backbones.load_weights``.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ferpipe.models.backbones import load_weights
from ferpipe.tv import torchvision

BasicBlock = torchvision.models.resnet.BasicBlock

STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_BLOCKS = (3, 4, 6, 3)   # ResNet-34
MASK_DEPTHS = (4, 3, 2, 1)    # the paper's masking-block depths, stage 1 to 4


def _block(cin: int, cout: int) -> BasicBlock:
    """BasicBlock cin -> cout at stride 1, with a 1x1 conv + BN shortcut when widths differ."""
    down = None
    if cin != cout:
        down = nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, bias=False), nn.BatchNorm2d(cout))
    return BasicBlock(cin, cout, stride=1, downsample=down)


class _Up(nn.Sequential):
    """ConvTranspose2d(k2, s2) + BN + ReLU: doubles the size, halves the width."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class MaskingBlock(nn.Module):
    """U-Net of BasicBlocks producing a softmax-over-channels mask the shape of its input."""

    def __init__(self, channels: int, depth: int):
        super().__init__()
        if depth < 1:
            raise ValueError(f"masking depth must be >= 1, got {depth}")
        self.depth = depth
        widths = [channels * 2 ** i for i in range(depth + 1)]  # C, 2C, ..., 2^depth C
        self.down = nn.ModuleList(_block(widths[i], widths[i + 1]) for i in range(depth))
        self.pool = nn.MaxPool2d(kernel_size=2, ceil_mode=True)
        # decoder level i (from deep to shallow): up 2^(i+1)C -> 2^i C, cat skip, block -> 2^i C
        self.up = nn.ModuleList(_Up(widths[i + 1], widths[i]) for i in range(depth - 1, 0, -1))
        self.merge = nn.ModuleList(_block(widths[i + 1], widths[i]) for i in range(depth - 1, 0, -1))
        self.out = _block(widths[1], widths[0])
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        skips.pop()  # the deepest level is x itself
        for up, merge in zip(self.up, self.merge):
            skip = skips.pop()
            x = up(x)
            if x.shape[-2:] != skip.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = merge(torch.cat([x, skip], dim=1))
        return torch.softmax(self.out(x), dim=1)


class RMN(nn.Module):
    """Residual Masking Network: ResNet-34 + a masking block after each stage.

    ``forward(x, guide=None)``: x [B, 1 or in_channels, S, S]; ``guide`` is ignored.
    """

    head_path = "fc.1"
    optional_keys = ("mask",)  # a plain ResNet-34 checkpoint has no masks: they keep their initialization

    def __init__(
        self,
        num_classes: int = 7,
        in_size: int = 224,
        in_channels: int = 3,
        stem: str | None = None,
        mask_depths: tuple[int, ...] = MASK_DEPTHS,
        dropout: float = 0.4,
        weights_path: str | os.PathLike | None = None,
    ):
        super().__init__()
        if stem is None:
            stem = "small" if in_size < 112 else "standard"
        if stem not in ("small", "standard"):
            raise ValueError(f"stem must be 'small' or 'standard', got {stem!r}")
        if len(mask_depths) != 4:
            raise ValueError(f"mask_depths needs one depth per stage (4), got {mask_depths}")
        self.num_classes = int(num_classes)
        self.in_size = int(in_size)
        self.in_channels = int(in_channels)
        self.stem = stem
        if stem == "standard":
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        cin = 64
        for s, (width, blocks) in enumerate(zip(STAGE_WIDTHS, STAGE_BLOCKS), start=1):
            stride = 1 if s == 1 else 2
            down = None
            if stride != 1 or cin != width:
                down = nn.Sequential(nn.Conv2d(cin, width, 1, stride=stride, bias=False),
                                     nn.BatchNorm2d(width))
            layer = [BasicBlock(cin, width, stride=stride, downsample=down)]
            layer += [BasicBlock(width, width) for _ in range(blocks - 1)]
            setattr(self, f"layer{s}", nn.Sequential(*layer))
            cin = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(512, self.num_classes))
        for m in self.modules():  # the body (masks are added below and initialize themselves)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for s, (width, depth) in enumerate(zip(STAGE_WIDTHS, mask_depths), start=1):
            setattr(self, f"mask{s}", MaskingBlock(width, depth))
        if weights_path is not None:
            load_weights(self, weights_path)

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"image must be [B, C, H, W], got {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            if x.shape[1] != 1:
                raise ValueError(f"image has {x.shape[1]} channels, RMN takes {self.in_channels} (or 1)")
            x = x.expand(-1, self.in_channels, -1, -1)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for s in range(1, 5):
            x = getattr(self, f"layer{s}")(x)
            x = x * (1 + getattr(self, f"mask{s}")(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)
