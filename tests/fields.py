"""Shared test fixtures: smooth velocity fields with known, low-frequency content; the field of view
in which atlasreg's and ITK's displacement fields agree."""

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


def in_atlas_fov(points: torch.Tensor, grid: Grid, margin_voxels: float = 1.0) -> torch.Tensor:
    """Points whose atlas position lies inside the atlas grid, `margin_voxels` away from its faces."""
    half = torch.tensor(grid.half_extent) - margin_voxels * torch.tensor(grid.spacing)
    return (grid.world_to_centred(points).abs() <= half).all(-1)


def inside_fov(to_atlas, native: Grid, model: Grid) -> torch.Tensor:
    """Input voxels inside the field of view: both the point after the affine part (where the .h5's
    dense part is interpolated; ITK uses a zero displacement outside a field, atlasreg its border
    value) and the final atlas point lie inside the atlas grid. (*native.size) bool."""
    affine_part = to_atlas.simplified().transforms[0]
    return in_atlas_fov(affine_part.on_grid(native)[0], model) & in_atlas_fov(to_atlas.on_grid(native)[0], model)
