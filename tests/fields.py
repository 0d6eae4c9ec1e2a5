"""Shared test fixtures: smooth velocity fields with known, low-frequency content."""

import math

import torch

from atlasreg.spatial.grid import identity_points


def smooth_svf(size, spacing, amplitude, seed=0, terms=3):
    """A smooth velocity field (sum of `terms` random low-frequency sines per component) in mm,
    shape (1, D, *size), channels (x, y[, z])."""
    g = torch.Generator().manual_seed(seed)
    pts = identity_points(size, spacing)[0]
    d = len(size)
    half = torch.tensor([n * s / 2 for n, s in zip(reversed(size), spacing)])
    v = torch.zeros(d, *size)
    for c in range(d):
        for _ in range(terms):
            k = torch.randn(d, generator=g) * math.pi / half
            v[c] += amplitude * torch.sin((pts * k).sum(-1) + torch.rand(1, generator=g) * 2 * math.pi)
    return v[None]
