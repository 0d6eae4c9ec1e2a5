"""Tests of atlasreg.models.optim: the fused Adam gives the same steps as PyTorch's default Adam."""

import torch

from atlasreg.models.optim import adam


def test_fused_adam_matches_the_default_update():
    torch.manual_seed(0)
    start = [torch.randn(8, 3), torch.randn(5)]
    a = [p.clone().requires_grad_() for p in start]
    b = [p.clone().requires_grad_() for p in start]
    opt_a, opt_b = adam(a, 1e-2), torch.optim.Adam(b, lr=1e-2)
    assert opt_a.param_groups[0]["fused"] is True
    for _ in range(20):
        for params, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            (params[0].square().sum() + params[1].sin().sum()).backward()
            opt.step()
    for x, y in zip(a, b):
        assert (x - y).abs().max() < 1e-6
    assert (a[0] - start[0]).abs().max() > 0.1  # it did move
