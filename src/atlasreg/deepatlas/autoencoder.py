"""The feature extractor of the DeepATLAS similarity loss: a multi-resolution autoencoder (Sec. 5.3,
Fig. 7), its reconstruction loss (5.3.2) and the non-linear intensity mapping of its target (5.3.1).

Architecture (5.3.2: "otherwise identical to the main DeepATLAS backbone"): the encoder-decoder
:class:`~atlasreg.deepatlas.network.Backbone` with one reconstruction head per resolution for the
finest ``heads`` levels (paper: two, full and half resolution). A head is a pre-activation block
(group norm, leaky ReLU 0.1, 3x3(x3) convolution to the image's channels) with no output activation
(5.3.1: an asymptotic activation would push the features to extreme values). The feature maps
``R = {r_0, r_1}`` used by Eq. 9 are the heads' activated inputs, "the feature maps generated after
leaky ReLU" (5.3.1): ``r_l = LeakyReLU(GroupNorm(d_l))`` with d_l the decoder map at level l.

All heads are trained at once (5.3.2): :meth:`FeatureAutoencoder.reconstruction_loss` sums the mean
squared errors of every head against the target resampled to its level (corner-aligned linear, the
resampler of 5.2.2). The target is the input, or an intensity mapping of it (5.3.1; for CT
:func:`ct_contrast_mapping`).

Choices where the paper is not explicit:

* *Where the heads sit*: on the decoder, as the coordinate network's heads, so both networks share
  one backbone and its conventions. The decoder's skip connections are additions, so full-resolution
  detail reaches the heads.
* *The head's convolution* is an ordinary (not weight-standardised) one, like the coordinate network's
  output head: a standardised kernel would scale the output with the fan-in.
* *Levels of the encoder*: as many as the coordinate network's (the ``channels`` argument); only the
  finest ``heads`` levels have heads.
* *Target of a coarse head*: the target resampled linearly with corner alignment (not box-averaged).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .coordinates import resize
from .network import Backbone, ConvBlock

__all__ = ["FeatureAutoencoder", "piecewise_linear", "ct_contrast_mapping", "CT_CONTRAST_KNOTS"]

#: The non-linear histogram mapping of 5.3.1: (Hounsfield units, normalised value) knots.
CT_CONTRAST_KNOTS = ((-256.0, 0.0), (-100.0, 0.15), (10.0, 0.30), (50.0, 0.70), (100.0, 0.85), (256.0, 1.0))


def piecewise_linear(x: torch.Tensor, knots: Sequence[tuple[float, float]]) -> torch.Tensor:
    """The piecewise linear function through `knots` ((x, y) pairs, x strictly increasing), constant
    beyond the first and last knot; element-wise, any shape. Raises ValueError for fewer than 2 knots
    or x not increasing."""
    xs = torch.tensor([k[0] for k in knots], dtype=x.dtype, device=x.device)
    ys = torch.tensor([k[1] for k in knots], dtype=x.dtype, device=x.device)
    if len(knots) < 2 or not bool((xs[1:] > xs[:-1]).all()):
        raise ValueError(f"knots need >= 2 points with strictly increasing x, got {list(knots)}")
    xc = x.clamp(xs[0], xs[-1])
    i = torch.bucketize(xc, xs[1:-1])  # segment index 0..len-2
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return y0 + (xc - x0) * (y1 - y0) / (x1 - x0)


def ct_contrast_mapping(hu: torch.Tensor) -> torch.Tensor:
    """The autoencoder's reconstruction target for CT (5.3.1): Hounsfield units mapped piecewise
    linearly through :data:`CT_CONTRAST_KNOTS` (-256 -> 0, -100 -> 0.15, 10 -> 0.30, 50 -> 0.70,
    100 -> 0.85, 256 -> 1), clipped to [0, 1] outside [-256, 256] HU."""
    return piecewise_linear(hu, CT_CONTRAST_KNOTS)


class FeatureAutoencoder(nn.Module):
    """Multi-resolution autoencoder of Sec. 5.3 (see the module docstring).

    ndim 2 or 3; in_channels (1); channels per level (paper: the backbone's, (8, 16, 32, 64, 128));
    heads: reconstruction heads at levels 0..heads-1 (paper: 2); out_channels of a reconstruction
    (the image's, 1). Raises ValueError for a bad configuration or input.
    """

    def __init__(self, ndim: int, in_channels: int = 1, channels: Sequence[int] = (8, 16, 32, 64, 128),
                 heads: int = 2, out_channels: int = 1, norm_groups: int = 8):
        super().__init__()
        self.backbone = Backbone(ndim, in_channels, channels, norm_groups)
        if not 1 <= heads <= self.backbone.levels + 1:
            raise ValueError(f"heads must be in 1..{self.backbone.levels + 1}, got {heads}")
        self.heads = nn.ModuleList([ConvBlock(ndim, c, out_channels, norm_groups, standardise=False)
                                    for c in self.backbone.channels[:heads]])

    def _decoded(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Decoder maps of the head levels, fine to coarse: [d_0, ..., d_{heads-1}]."""
        maps = self.backbone(x, finest=0)[::-1]  # d_0 first
        return maps[: len(self.heads)]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps R of Eq. 9, fine to coarse: ``r_l = LeakyReLU(GroupNorm(d_l))`` (the heads'
        activated inputs, 5.3.1), each (N, channels[l], *s_l)."""
        return [head[1](head[0](d)) for head, d in zip(self.heads, self._decoded(x))]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Reconstructions, fine to coarse: level l is (N, out_channels, *s_l), unbounded (no output
        activation, 5.3.1)."""
        return [head(d) for head, d in zip(self.heads, self._decoded(x))]

    def reconstruction_loss(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Sum over the heads of the mean squared error between each reconstruction and the target (the
        input by default; e.g. :func:`ct_contrast_mapping` of the raw CT) resampled to the head's level
        (5.3, 5.3.2; all heads trained simultaneously). Units: the target's, squared. Raises ValueError
        if the target's shape differs from the reconstruction's at full resolution."""
        target = x if target is None else target
        recon = self(x)
        if target.shape[0] != x.shape[0] or target.shape[1] != recon[0].shape[1] or target.shape[2:] != x.shape[2:]:
            raise ValueError(f"target of shape {tuple(target.shape)} does not match the reconstruction "
                             f"{tuple(recon[0].shape)}")
        return sum(F.mse_loss(r, resize(target, r.shape[2:])) for r in recon)
