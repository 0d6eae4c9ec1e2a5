"""The ITN of Atlas-ISTN: a U-Net (Ronneberger 2015; Atlas-ISTN Sec. 2.2, Fig. 3 left)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .layers import conv, conv_relu, memory_format, to_memory_format, upsample


class UNet(nn.Module):
    """U-Net with strided convolutions down, linear upsampling up, ReLU, no batch normalisation.

    Layout of the reference 2D/3D U-Net of Atlas-ISTN: two convolutions at full resolution; per
    coarser scale a strided (linear) convolution and one convolution + ReLU; per decoder scale one
    convolution + ReLU on [upsampled, skip]; a 1x1 convolution to the logits.

    ndim: 2 or 3; in_channels: image channels; num_classes: C including background;
    channels: features per scale (reference for 2D letter B: 8, 16, 32, 64).
    forward(x: (N, in_channels, *spatial)) -> raw logits (N, C, *spatial) (no softmax; Eq. 4).
    Spatial sizes must be divisible by 2 ** (len(channels) - 1); raises ValueError otherwise.
    """

    def __init__(self, ndim: int, in_channels: int, num_classes: int,
                 channels: Sequence[int] = (8, 16, 32, 64)):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        self.ndim, self.depth = ndim, len(channels) - 1
        c = list(channels)
        self.inc = nn.Sequential(conv_relu(ndim, in_channels, c[0]), conv_relu(ndim, c[0], c[0]))
        self.down = nn.ModuleList(
            nn.Sequential(conv(ndim, c[i], c[i + 1], stride=2), conv_relu(ndim, c[i + 1], c[i + 1]))
            for i in range(self.depth))
        self.up = upsample(ndim)
        self.dec = nn.ModuleList(conv_relu(ndim, c[i + 1] + c[i], c[i]) for i in reversed(range(self.depth)))
        self.out = conv(ndim, c[0], num_classes, kernel=1)
        self.to(memory_format=memory_format(ndim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = 2 ** self.depth
        if any(s % m for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} must be divisible by {m}")
        skips = [self.inc(to_memory_format(x))]
        for block in self.down:
            skips.append(block(skips[-1]))
        h = skips.pop()
        for block in self.dec:
            h = block(torch.cat([self.up(h), skips.pop()], dim=1))
        return self.out(h)
