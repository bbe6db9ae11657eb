"""A compact VGG-style CNN for 48x48 grayscale: the fast CPU model of the pipeline.

Not one of the old systems' networks: it is here because issue 3 asks for the best 7-class FER-2013
model within 60 minutes of CPU training, and on 2 CPU cores the Simple-CNN is too small and the
48 px ResNet-18 (16 img/s) too slow. ``blocks`` blocks of ``convs`` 3x3 conv + BatchNorm + ReLU and a
2x2 max-pool, ``width * 2**b`` channels in block b (or an explicit ``channels`` list, one per block),
then global average pooling, dropout and one Linear. At width 24 it has 661,375 parameters
(7 classes) and trains at about 190 img/s on 2 cores (fwd/bwd/Adam, batch 128).

Where the time goes on CPU: the two full-resolution (48 px) convolutions of block 0, with their
BatchNorm and ReLU, cost as much as the rest. ``channels=[16, 32, 96, 192], convs=[1, 2, 2, 2]``
(one thin conv at 48 px) trains about 2x faster with about the same parameter count.

The weights and the input are kept channels-last: oneDNN's convolutions run about 1.3-1.5x faster
that way on CPU (measured at batch 128: width 16 914 -> 1,359 img/s, width 24 467 -> 596 img/s).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class CompactVGG(nn.Module):
    head_path = "head"

    def __init__(self, num_classes: int, width: int = 24, blocks: int = 4, dropout: float = 0.5,
                 in_channels: int = 1, channels: list[int] | None = None, convs: int | list[int] = 2):
        super().__init__()
        if channels is None:
            if width < 1 or blocks < 1:
                raise ValueError(f"width and blocks must be >= 1, got width={width}, blocks={blocks}")
            channels = [int(width) * 2 ** b for b in range(int(blocks))]
        channels = [int(c) for c in channels]
        convs = [int(convs)] * len(channels) if isinstance(convs, int) else [int(n) for n in convs]
        if not channels or min(channels) < 1 or len(convs) != len(channels) or min(convs) < 1:
            raise ValueError(f"channels (one per block, >= 1) and convs (an int or one per block, >= 1) "
                             f"do not fit: channels={channels}, convs={convs}")
        layers: list[nn.Module] = []
        cin = int(in_channels)
        for cout, n in zip(channels, convs):
            for _ in range(n):
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                           nn.ReLU(inplace=True)]
                cin = cout
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cin, int(num_classes))
        self.num_classes = int(num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.features[0].in_channels:
            raise ValueError(f"image must be [B, {self.features[0].in_channels}, H, W], got {tuple(x.shape)}")
        x = self.features(x.contiguous(memory_format=torch.channels_last))
        return self.head(self.dropout(torch.flatten(self.pool(x), 1)))
