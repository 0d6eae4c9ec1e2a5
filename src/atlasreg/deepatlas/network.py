"""The DeepATLAS coordinate network F: exam -> coordinate map c_n (Sec. 2.2, 2.2.1, 5.2.1-5.2.3).

Architecture (one code path for 2D and 3D; :class:`Backbone` is shared with the autoencoder of
Sec. 5.3, :mod:`atlasreg.deepatlas.autoencoder`):

* *Pre-activation convolutional block* (:class:`ConvBlock`, Sec. 2.2): group normalisation, leaky ReLU
  (negative slope 0.1), 3x3(x3) convolution with weight standardisation (Qiao et al. 2019,
  :class:`WSConv`).
* *Residual block* (:class:`ResidualBlock`): two such blocks with a residual connection between their
  outputs, ``y1 = B1(x); y = y1 + B2(y1)``.
* *Encoder*: one convolution on the input, then one residual block per resolution level l = 0..L, a
  parameterless downsampling between levels. Channels ``channels[l]`` (paper: 8 doubling to 128, L = 4,
  5.2.1).
* *Decoder*: from the deepest level, ``d_L = e_L`` and ``d_l = up(R_l(d_{l+1})) + e_l`` (a residual block
  at the coarser level followed by a parameterless upsampling; the skip connection is an addition,
  "implemented as residual operations").
* *Resampling* (5.2.2): linear interpolation with corner alignment (``align_corners=True``,
  :func:`atlasreg.deepatlas.coordinates.resize`); level sizes ``s_{l+1} = ceil(s_l / 2)`` per axis, so
  odd sizes work and an axis of ``2 m - 1`` voxels is subsampled exactly onto every other voxel.
* *Multi-resolution heads* (2.2.1): at each level a residual block and a convolutional block give a
  fixed-depth feature map ``f_l`` (``head_channels`` channels); ``g_L = f_L`` and
  ``g_l = a_l f_l + up(g_{l+1})`` (the residual combination with the upsampled map of the previous
  level); ONE shared block (group norm, leaky ReLU, convolution to D channels, tanh), the same weights
  at every level, gives ``c_l = tanh(S(g_l))`` in [-1, 1]^D.
* *Staged optimisation* (5.2.3): :attr:`CoordinateNet.active_levels` = k runs the k coarsest heads
  only (levels L .. L-k+1); the output is the finest active level's map, upsampled to the input size
  by default (as the paper does for the loss). :meth:`CoordinateNet.head_warmup_loss` is the paper's
  pretraining of a newly switched-on head: the difference between ``c_l`` and the upsampled
  ``c_{l+1}``, to be minimised over :meth:`CoordinateNet.level_parameters` (the parameters the new
  level brings) with every other weight frozen.

The output: ``(N, D, *spatial)`` corner-aligned normalised template coordinates, channel k the template
axis k in ITK order (x, y[, z]), as :mod:`atlasreg.deepatlas.coordinates` defines (and grid_sample
reads, ``align_corners=True``).

Choices where the paper is not explicit (each the simplest reading that fits its text):

* *Residual block with a change of channels*: "a residual connection between successive convolutional
  layer outputs" is read literally, ``y1 + B2(y1)``: the first block changes the channels, so no
  projection shortcut is needed.
* *Encoder/decoder counts*: one residual block per level in the encoder (levels 0..L) and one per
  upsampling step in the decoder; the deepest decoder map is the deepest encoder map.
* *Group normalisation*: ``gcd(norm_groups, channels)`` groups (``norm_groups = 8`` by default; the paper
  gives no number), with the usual learnable per-channel scale and shift.
* *Weight standardisation* on every 3x3 convolution except the shared tanh head's: a standardised
  kernel has unit variance per weight, so its output's scale grows with the fan-in (about 15 at 8
  fixed-depth channels in 3D) and would saturate the tanh from the first step. The shared head's
  convolution is an ordinary one (PyTorch's default initialisation). Convolutions keep their bias.
* *The zero residual of a new level* (5.2.3: "an identity residual function ... f_l = 0"): each level
  below the deepest multiplies ``f_l`` by a learnable scalar gate ``a_l`` initialised to 0 (as ReZero,
  Bachlechner et al. 2020). A weight-standardised kernel cannot be zero-initialised (its standard
  deviation would be 0), so the gate is what makes ``f_l = 0`` exactly when the level is switched on.
  The output is then ``tanh(S(up(g_{l+1})))``, which is not the upsampled previous output
  ``up(tanh(S(g_{l+1})))``: the shared block (normalisation, leaky ReLU, a 3x3 convolution, tanh) does
  not commute with upsampling (up to 3.6 voxels apart with a small random network, and 0.8-1.9 voxels
  with a 1x1 shared convolution, so no reading of the head makes them equal). Hence the paper's head
  pretraining step, which :meth:`CoordinateNet.head_warmup_loss` provides; after it the two agree to
  0.13 voxel (tests/test_deepatlas_network.py measures both differences).
* *Parameters of a level* (the "current resolution head" trained alone in the warm-up): the head
  (residual block, convolutional block, gate) of level l and the decoder block that produces
  ``d_l``, which no coarser head uses.

Size: at the paper's settings (3D, one input channel, channels 8..128, L = 4) this network has
2,725,383 parameters with 32 head channels (3,376,647 with 128) against the paper's 4,277,617 (5.2.1).
The paper does not give the fixed depth, the group count or its shortcuts, so its count cannot be
reproduced; the literal reading of Sec. 2.2 (a residual block before each downsampling and upsampling)
has exactly the blocks counted here, so the difference lies in details the paper leaves out.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .coordinates import resize

__all__ = ["WSConv", "ConvBlock", "ResidualBlock", "Backbone", "CoordinateNet", "level_sizes"]

_NEGATIVE_SLOPE = 0.1


class _Standardise(nn.Module):
    """Weight standardisation (Qiao et al. 2019, Eq. 5): each output filter to zero mean and unit
    variance over its input channels and kernel positions."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, w.dim()))
        mean = w.mean(dim=dims, keepdim=True)
        var = w.var(dim=dims, keepdim=True, unbiased=False)
        return (w - mean) / torch.sqrt(var + self.eps)


def WSConv(ndim: int, cin: int, cout: int, kernel: int = 3) -> nn.Module:
    """A 'same'-padded convolution (Conv2d/Conv3d) whose kernel is weight-standardised on every use
    (a :mod:`torch.nn.utils.parametrize` parametrisation; ``.weight`` is the standardised kernel)."""
    layer = getattr(nn, f"Conv{ndim}d")(cin, cout, kernel_size=kernel, padding=kernel // 2)
    parametrize.register_parametrization(layer, "weight", _Standardise())
    return layer


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ConvBlock(nn.Sequential):
    """Pre-activation convolutional block (Sec. 2.2): GroupNorm -> LeakyReLU(0.1) -> 3x3(x3) conv
    (weight-standardised unless ``standardise=False``). (N, cin, *S) -> (N, cout, *S)."""

    def __init__(self, ndim: int, cin: int, cout: int, norm_groups: int = 8, standardise: bool = True):
        conv = (WSConv(ndim, cin, cout) if standardise
                else getattr(nn, f"Conv{ndim}d")(cin, cout, kernel_size=3, padding=1))
        super().__init__(_norm(cin, norm_groups), nn.LeakyReLU(_NEGATIVE_SLOPE), conv)


class ResidualBlock(nn.Module):
    """Two pre-activation blocks with a residual connection between their outputs (Sec. 2.2):
    ``y1 = B1(x); return y1 + B2(y1)``. (N, cin, *S) -> (N, cout, *S)."""

    def __init__(self, ndim: int, cin: int, cout: int, norm_groups: int = 8):
        super().__init__()
        self.first = ConvBlock(ndim, cin, cout, norm_groups)
        self.second = ConvBlock(ndim, cout, cout, norm_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.first(x)
        return y + self.second(y)


def level_sizes(size: Sequence[int], levels: int) -> list[tuple[int, ...]]:
    """Spatial sizes (array order) of resolution levels 0..levels: ``s_{l+1} = ceil(s_l / 2)`` per axis.
    Raises ValueError if the deepest level has an axis of fewer than 2 voxels (corner-aligned
    resampling and coordinate maps need two corners per axis)."""
    sizes = [tuple(int(n) for n in size)]
    for _ in range(levels):
        sizes.append(tuple((n + 1) // 2 for n in sizes[-1]))
    if any(n < 2 for n in sizes[-1]):
        raise ValueError(f"input of spatial size {sizes[0]} is too small for {levels} downsamplings "
                         f"(deepest level {sizes[-1]}; each axis needs >= 2 voxels there)")
    return sizes


class Backbone(nn.Module):
    """Fully convolutional encoder-decoder with pre-activation residual blocks and additive skip
    connections (Sec. 2.2; see the module docstring).

    ``channels``: channels per level 0..L (L = len(channels) - 1 downsamplings). ``forward(x, finest)``
    returns the decoder maps ``[d_L, ..., d_finest]`` (coarse to fine), computing the decoder only
    down to level `finest`. x: (N, in_channels, *S), 2D or 3D, any size with >= 2 voxels per axis at
    the deepest level. Raises ValueError for a malformed input.
    """

    def __init__(self, ndim: int, in_channels: int, channels: Sequence[int], norm_groups: int = 8):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        channels = tuple(int(c) for c in channels)
        if len(channels) < 1 or any(c < 1 for c in channels) or in_channels < 1:
            raise ValueError(f"channels must be positive, got in_channels={in_channels}, channels={channels}")
        self.ndim, self.in_channels, self.channels = ndim, in_channels, channels
        self.stem = WSConv(ndim, in_channels, channels[0])
        self.encoder = nn.ModuleList(
            [ResidualBlock(ndim, channels[max(l - 1, 0)], channels[l], norm_groups) for l in range(len(channels))])
        # decoder[l] makes d_l from d_{l+1} (at level l+1's resolution), l = 0..L-1
        self.decoder = nn.ModuleList(
            [ResidualBlock(ndim, channels[l + 1], channels[l], norm_groups) for l in range(len(channels) - 1)])

    @property
    def levels(self) -> int:
        """L, the number of downsamplings (levels are 0..L)."""
        return len(self.channels) - 1

    def check_input(self, x: torch.Tensor) -> list[tuple[int, ...]]:
        """Validate x and return the level sizes. Raises ValueError naming the problem."""
        if x.dim() != self.ndim + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (N, {self.in_channels}, *spatial) with {self.ndim} spatial dims, "
                             f"got {tuple(x.shape)}")
        return level_sizes(x.shape[2:], self.levels)

    def forward(self, x: torch.Tensor, finest: int = 0) -> list[torch.Tensor]:
        sizes = self.check_input(x)
        if not 0 <= finest <= self.levels:
            raise ValueError(f"finest level must be in 0..{self.levels}, got {finest}")
        skips = []
        h = self.stem(x)
        for l, block in enumerate(self.encoder):
            if l > 0:
                h = resize(h, sizes[l])
            h = block(h)
            skips.append(h)
        out = [skips[-1]]
        for l in range(self.levels - 1, finest - 1, -1):
            out.append(resize(self.decoder[l](out[-1]), sizes[l]) + skips[l])
        return out


class CoordinateNet(nn.Module):
    """The DeepATLAS coordinate network (Secs. 2.2, 2.2.1, 5.2.1): exam (N, in_channels, *S) ->
    coordinate map c (N, D, *S) in [-1, 1]^D (see the module docstring for the architecture, the
    conventions and the choices).

    Parameters: ``ndim`` 2 or 3; ``in_channels`` (1 for an image); ``channels`` per level (paper:
    (8, 16, 32, 64, 128)); ``head_channels`` the fixed depth of the head feature maps f_l (paper: not
    given; 32 by default); ``norm_groups``; ``active_levels`` (1..L+1, default all) how many heads run,
    from the coarsest.

    Raises ValueError for a bad configuration or input.
    """

    def __init__(self, ndim: int, in_channels: int = 1, channels: Sequence[int] = (8, 16, 32, 64, 128),
                 head_channels: int = 32, norm_groups: int = 8, active_levels: int | None = None):
        super().__init__()
        self.backbone = Backbone(ndim, in_channels, channels, norm_groups)
        if head_channels < 1:
            raise ValueError(f"head_channels must be >= 1, got {head_channels}")
        self.ndim = ndim
        chans = self.backbone.channels
        self.heads = nn.ModuleList(
            [nn.Sequential(ResidualBlock(ndim, c, c, norm_groups), ConvBlock(ndim, c, head_channels, norm_groups))
             for c in chans])
        # a_l for l = 0..L-1 (the deepest level has no previous level); 0: f_l = 0 when switched on.
        # One parameter per level, so that a level's warm-up leaves the other levels' gates alone.
        self.gates = nn.ParameterList([nn.Parameter(torch.zeros(())) for _ in chans[:-1]])
        self.shared_head = ConvBlock(ndim, head_channels, ndim, norm_groups, standardise=False)
        self._active = self.levels + 1
        if active_levels is not None:
            self.active_levels = active_levels

    # ---------------------------------------------------------------- levels
    @property
    def levels(self) -> int:
        """L: the heads are at levels 0 (full resolution) .. L (coarsest)."""
        return self.backbone.levels

    @property
    def active_levels(self) -> int:
        """Number of heads that run, from the coarsest (5.2.3): k runs levels L .. L-k+1."""
        return self._active

    @active_levels.setter
    def active_levels(self, k: int) -> None:
        if not 1 <= int(k) <= self.levels + 1:
            raise ValueError(f"active_levels must be in 1..{self.levels + 1}, got {k}")
        self._active = int(k)

    @property
    def finest_level(self) -> int:
        """The level whose head gives the output: L - active_levels + 1."""
        return self.levels - self._active + 1

    def level_parameters(self, level: int | None = None) -> list[nn.Parameter]:
        """The parameters first used when `level` (default: the finest active level) is switched on:
        its head, its gate and the decoder block that produces its decoder map; for the deepest level
        L, every parameter used at that stage (encoder, head L, shared head). The head warm-up of
        5.2.3 trains these and freezes the rest."""
        level = self.finest_level if level is None else int(level)
        if not 0 <= level <= self.levels:
            raise ValueError(f"level must be in 0..{self.levels}, got {level}")
        if level == self.levels:
            return [*self.backbone.stem.parameters(), *self.backbone.encoder.parameters(),
                    *self.heads[level].parameters(), *self.shared_head.parameters()]
        return [*self.heads[level].parameters(), *self.backbone.decoder[level].parameters(), self.gates[level]]

    # ---------------------------------------------------------------- forward
    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Coordinate maps of the active levels, coarse to fine: ``[c_L, ..., c_finest]``, each
        (N, D, *s_l) at its own level's size."""
        decoded = self.backbone(x, self.finest_level)
        out, g = [], None
        for i, d in enumerate(decoded):
            level = self.levels - i
            f = self.heads[level](d)
            g = f if g is None else self.gates[level] * f + resize(g, f.shape[2:])
            out.append(torch.tanh(self.shared_head(g)))
        return out

    def forward(self, x: torch.Tensor, full_resolution: bool = True) -> torch.Tensor:
        """The coordinate map of the finest active level, (N, D, *S) upsampled to the input size S
        (5.2.3: a coarse level's map is upsampled to full resolution for the loss), or at its own
        level's size with ``full_resolution=False``."""
        c = self.forward_levels(x)[-1]
        return resize(c, x.shape[2:]) if full_resolution else c

    def head_warmup_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The head pretraining loss of 5.2.3: mean squared difference between the finest active map
        ``c_l`` and the upsampled previous map ``c_{l+1}`` (held fixed), in normalised units squared.
        Minimise it over :meth:`level_parameters` with the other parameters frozen. Raises ValueError
        with a single active level (no previous level)."""
        if self._active < 2:
            raise ValueError("the head warm-up needs at least 2 active levels (a previous level to copy)")
        maps = self.forward_levels(x)
        target = resize(maps[-2], maps[-1].shape[2:]).detach()
        return F.mse_loss(maps[-1], target)

