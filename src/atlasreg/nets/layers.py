"""Dimension-generic building blocks: one code path for 2D and 3D."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_UPSAMPLE = {2: "bilinear", 3: "trilinear"}


def conv(ndim: int, cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Module:
    """3x3(x3) convolution with 'same' padding (stride 2 halves the size)."""
    return getattr(nn, f"Conv{ndim}d")(cin, cout, kernel_size=kernel, stride=stride, padding=kernel // 2)


def activation(negative_slope: float = 0.0) -> nn.Module:
    """ReLU, or LeakyReLU with this slope for x < 0 when it is above 0."""
    return nn.LeakyReLU(negative_slope, inplace=True) if negative_slope > 0 else nn.ReLU(inplace=True)


def conv_relu(ndim: int, cin: int, cout: int, stride: int = 1, negative_slope: float = 0.0) -> nn.Sequential:
    """Convolution + ReLU (LeakyReLU with `negative_slope` > 0)."""
    return nn.Sequential(conv(ndim, cin, cout, stride), activation(negative_slope))


class LinearUpsample(nn.Module):
    """Linear upsampling by 2 (bilinear/trilinear, align_corners=False, as the paper prefers over
    transposed convolutions). (N, C, *S) -> (N, C, *2S).

    The backward pass first brings the incoming gradient into the channels_last layout. In a U-Net
    decoder that gradient is a channel slice of the concatenation's gradient, which suits neither
    layout, and PyTorch's CPU upsampling backward is then about 3x slower: this makes a whole Letter-B
    training step 3-11% faster (2D and 3D; `benchmarks/letter_b_profile.py --compare-upsample`).
    Values are unchanged.
    """

    def __init__(self, ndim: int):
        super().__init__()
        self.mode = _UPSAMPLE[ndim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(x, scale_factor=2, mode=self.mode, align_corners=False)
        return _GradInMemoryFormat.apply(y) if y.requires_grad else y


class _GradInMemoryFormat(torch.autograd.Function):
    """Identity whose backward returns the gradient in the layout of :func:`memory_format`."""

    generate_vmap_rule = True  # usable inside torch.func.vmap

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return to_memory_format(grad)


def upsample(ndim: int) -> nn.Module:
    """Linear upsampling by 2: a :class:`LinearUpsample`."""
    return LinearUpsample(ndim)


def memory_format(ndim: int) -> torch.memory_format:
    """channels_last layout for 2D/3D: oneDNN convolutions on CPU are up to 15x faster with it than
    with the default contiguous layout at the small channel counts used here (measured on 2 cores)."""
    return torch.channels_last if ndim == 2 else torch.channels_last_3d


def to_memory_format(x: torch.Tensor) -> torch.Tensor:
    """x in the layout of :func:`memory_format`. Inside torch.func.vmap layouts cannot be queried; the
    tensor is then returned as it is."""
    try:
        return x.contiguous(memory_format=memory_format(x.dim() - 2))
    except RuntimeError:
        return x
