"""Shared test fixtures: smooth velocity fields with known, low-frequency content."""

import math

import torch

from atlasreg.spatial.grid import Grid


def smooth_svf(grid: Grid, amplitude, seed=0, terms=3):
    """A smooth velocity field (sum of `terms` random low-frequency sines per component) in mm on
    `grid`, shape (1, D, *grid.size), channels (x, y[, z])."""
    g = torch.Generator().manual_seed(seed)
    pts = grid.points(centred=True)[0]
    d = grid.ndim
    half = torch.tensor(grid.half_extent)
    v = torch.zeros(d, *grid.size)
    for c in range(d):
        for _ in range(terms):
            k = torch.randn(d, generator=g) * math.pi / half
            v[c] += amplitude * torch.sin((pts * k).sum(-1) + torch.rand(1, generator=g) * 2 * math.pi)
    return v[None]
