"""The STN of Atlas-ISTN (Sec. 2.2, Eq. 5, Figs. 3-4): affine + SVF heads on an encoder-decoder.

The STN takes the foreground channels of the ITN logits and of the atlas labelmap (2(C-1) channels),
and returns the parameters of the transform; it keeps no state. The transform itself is computed by
:func:`atlasreg.spatial.transforms.compose_transform`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..spatial.grid import Grid
from ..spatial.transforms import affine_trs
from .layers import activation as make_activation, conv, conv_relu, memory_format, to_memory_format, upsample

VARIANTS = ("affine_svf", "svf", "affine")
#: Nonlinearities of the STN (`model.stn_activation`) and their slope for x < 0: the paper's ReLU, or
#: VoxelMorph's LeakyReLU(0.2), whose units cannot die.
ACTIVATIONS = {"relu": 0.0, "leaky_relu": 0.2}


class STN(nn.Module):
    """Encoder-decoder predicting an SVF at half resolution and/or bounded affine parameters.

    ndim: 2 or 3; in_channels: 2(C-1); grid: the model grid (:class:`~atlasreg.spatial.grid.Grid`,
    its size and spacing set the SVF's output unit); variant: 'affine_svf' (default), 'svf' or 'affine';
    channels: features at 1/2, 1/4, 1/8 resolution (reference: 16, 16, 32). The first convolution has
    stride 2, so the SVF head is at half resolution; coarser scales use strided (linear) convolutions
    followed by convolution + ReLU, and the SVF decoder one convolution + ReLU per scale. Affine heads are zero-initialised (identity at start) and bounded:
    |translation| <= half the field of view, |rotation| <= `max_rotation` degrees per angle (the paper's
    pi/4 = 45 by default), scale in [1/e, e]. The SVF
    head is zero-initialised, so the transform is exactly the identity at initialisation; its output
    unit is half the field of view per axis, converted to mm. The reference instead leaves its SVF head
    randomly initialised with a one-voxel unit. With a zero-initialised head and a one-voxel unit (32
    times smaller on Letter-B), Adam, which moves parameters by about lr per step whatever the
    gradient's scale, kept the SVF near zero and the decoder's ReLUs died during training.
    activation: 'relu' (the paper's) or 'leaky_relu' (slope 0.2, as VoxelMorph): with ReLU the SVF
    decoder's last 8 units can all die (measured on the mouse brain at 0.3 mm: the SVF became a
    constant, L_reg 1e-8, from epoch 71 of 220, and never came back); LeakyReLU units always pass a
    gradient. max_rotation: the rotation bound in degrees, in (0, 180]. Why not always 45: on ACDC the
    RV -> LV direction spans about 93 degrees between patients, and training turns the slices by up to
    40 degrees more; with the 45-degree bound the refinement of patient059 (50 degrees from the image
    axes) ended at the bound from every start, the SVF bending the rest (benchmarks/refine_rotation_start.py).
    Raises ValueError for an unknown variant or activation, a bound outside (0, 180], a grid of another
    dimension or a size not divisible by 8.

    forward(x: (N, in_channels, *size)) -> dict with 'svf' (N, D, *size/2) mm or None, and
    'A' (N, D, D), 't' (N, D) mm or None.
    """

    def __init__(self, ndim: int, in_channels: int, grid: Grid, variant: str = "affine_svf",
                 channels: Sequence[int] = (16, 16, 32), pool: int = 4, activation: str = "relu",
                 max_rotation: float = 45.0):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown STN variant {variant!r}; choose one of {VARIANTS}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown STN activation {activation!r}; choose one of {tuple(ACTIVATIONS)}")
        if not 0.0 < max_rotation <= 180.0:
            raise ValueError(f"the STN's rotation bound must be in (0, 180] degrees, got {max_rotation}")
        slope = ACTIVATIONS[activation]
        self.rotation_bound = math.radians(max_rotation)  # radians
        if grid.ndim != ndim:
            raise ValueError(f"the grid {grid.size} is not {ndim}D")
        if any(s % 8 for s in grid.size):
            raise ValueError(f"STN input size {grid.size} must be divisible by 8")
        self.ndim, self.variant = ndim, variant
        c1, c2, c3 = channels
        self.register_buffer("half_fov", grid.half_extent_tensor(), persistent=False)
        self.enc1 = nn.Sequential(conv(ndim, in_channels, c1, stride=2), make_activation(slope),
                                  conv_relu(ndim, c1, c1, negative_slope=slope))
        self.enc2 = nn.Sequential(conv(ndim, c1, c2, stride=2), conv_relu(ndim, c2, c2, negative_slope=slope))
        self.enc3 = nn.Sequential(conv(ndim, c2, c3, stride=2), conv_relu(ndim, c3, c3, negative_slope=slope))
        self.up = upsample(ndim)
        self.has_svf = variant in ("affine_svf", "svf")
        self.has_affine = variant in ("affine_svf", "affine")
        if self.has_svf:
            self.dec2 = conv_relu(ndim, c3 + c2, c2, negative_slope=slope)
            self.dec1 = nn.Sequential(conv_relu(ndim, c2 + c1, c1, negative_slope=slope),
                                      conv_relu(ndim, c1, max(c1 // 2, ndim), negative_slope=slope))
            self.svf_head = conv(ndim, max(c1 // 2, ndim), ndim)
            nn.init.zeros_(self.svf_head.weight)
            nn.init.zeros_(self.svf_head.bias)
        if self.has_affine:
            self.pool_size = pool
            self.fc = nn.Sequential(nn.Linear(c3 * pool ** ndim, 32), make_activation(slope))
            n_angles = 1 if ndim == 2 else 3
            self.translation = nn.Linear(32, ndim)
            self.rotation = nn.Linear(32, n_angles)
            self.log_scale = nn.Linear(32, ndim)
            for head in (self.translation, self.rotation, self.log_scale):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
        self.to(memory_format=memory_format(ndim))

    def forward(self, x: torch.Tensor, use_affine: bool = True) -> dict:
        """use_affine=False forces the affine part to the identity (delayed start of the affine part)."""
        h1 = self.enc1(to_memory_format(x))
        h2 = self.enc2(h1)
        h3 = self.enc3(h2)
        out = {"svf": None, "A": None, "t": None}
        if self.has_svf:
            d = self.dec2(torch.cat([self.up(h3), h2], 1))
            d = self.dec1(torch.cat([self.up(d), h1], 1))
            out["svf"] = self.svf_head(d) * self.half_fov.view(1, self.ndim, *[1] * self.ndim)
        if self.has_affine and use_affine:
            pooled = F.adaptive_avg_pool2d(h3, self.pool_size) if self.ndim == 2 else \
                F.adaptive_avg_pool3d(h3, self.pool_size)
            f = self.fc(pooled.flatten(1))
            t = torch.tanh(self.translation(f)) * self.half_fov
            angles = torch.tanh(self.rotation(f)) * self.rotation_bound
            log_s = torch.tanh(self.log_scale(f))
            out["A"], out["t"] = affine_trs(t, angles, log_s)
        return out
