"""Tests of atlasreg.nets.layers: linear upsampling with the channels_last gradient layout."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

from atlasreg.nets.layers import LinearUpsample, memory_format


@pytest.mark.parametrize("ndim", [2, 3])
def test_linear_upsample_matches_interpolate_in_value_and_gradient(ndim):
    torch.manual_seed(0)
    mode = {2: "bilinear", 3: "trilinear"}[ndim]
    x = torch.randn(2, 3, *[4] * ndim).contiguous(memory_format=memory_format(ndim)).requires_grad_()
    skip = torch.randn(2, 2, *[8] * ndim)
    w = torch.randn(2, 5, *[8] * ndim)

    def loss(up):
        # as in a U-Net decoder: the upsampled gradient is a channel slice of the concatenation's
        return (torch.cat([up(x), skip], 1) * w).sum()

    grads = []
    for up in (LinearUpsample(ndim),
               lambda t: F.interpolate(t, scale_factor=2, mode=mode, align_corners=False)):
        assert up(x).shape == (2, 3, *[8] * ndim)
        (g,) = torch.autograd.grad(loss(up), x)
        grads.append(g)
    assert torch.equal(LinearUpsample(ndim)(x),
                       F.interpolate(x, scale_factor=2, mode=mode, align_corners=False))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-6)


def test_linear_upsample_backward_hands_on_channels_last_gradient():
    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = LinearUpsample(2)(x)
    layouts = []
    y.grad_fn.register_hook(lambda gin, gout: layouts.append(
        gin[0].is_contiguous(memory_format=torch.channels_last)))
    g = torch.randn(2, 5, 8, 8).contiguous(memory_format=torch.channels_last)[:, :3]
    assert not g.is_contiguous(memory_format=torch.channels_last)
    y.backward(g)
    assert layouts == [True]


def test_linear_upsample_inside_vmap_gives_the_per_case_gradients():
    torch.manual_seed(1)
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    up = LinearUpsample(2)
    batched = vmap(lambda xi: up(xi.unsqueeze(0))[0] ** 2)(x).sum()
    (g_batched,) = torch.autograd.grad(batched, x)
    (g_plain,) = torch.autograd.grad((up(x) ** 2).sum(), x)
    torch.testing.assert_close(g_batched, g_plain)


def test_linear_upsample_without_gradient_is_plain_interpolation():
    x = torch.randn(1, 2, 4, 4)
    y = LinearUpsample(2)(x)
    assert y.grad_fn is None
    assert torch.equal(y, F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
