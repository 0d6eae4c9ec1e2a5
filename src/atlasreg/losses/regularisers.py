"""Regularisers of displacement fields in world units (Atlas-ISTN Eq. 13).

Weights such as lambda therefore do not change with resolution. Calibration against the reference
implementation (which penalises normalised [-1, 1] displacements, align_corners=True, on a 64^2 grid,
as mean((du/dx)^2 + (du/dy)^2) / 2 over components): its value equals ours / 63^2, so its
lambda = 500 corresponds to lambda = 500 / 63^2 = 0.126 here.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..spatial.grid import Grid
from ..spatial.transforms import jacobian_determinant


def diffusion_regulariser(u: torch.Tensor, spacing: Sequence[float], reduction: str = "mean") -> torch.Tensor:
    """Diffusion regulariser ||grad u||^2 (Atlas-ISTN Eq. 13), per-voxel mean.

    u: (N, D, *spatial) displacement in mm on a grid of `spacing` (ITK order, mm).
    Returns a scalar: mean over voxels and batch of sum_{i,j} (du_i/dx_j)^2 (dimensionless), by forward
    differences; with reduction='per_case' a (N,) tensor of per-case means. The same physical field gives the same value at any resolution (up to
    discretisation). Raises ValueError for a malformed field.
    """
    d = u.dim() - 2
    if d not in (2, 3) or u.shape[1] != d or len(spacing) != d:
        raise ValueError(f"expected (N, D, *spatial) with D = len(spacing), got {tuple(u.shape)}, {spacing}")
    total = u.new_zeros(u.shape[0])
    for j in range(d):  # x_j is array dim (2 + d - 1 - j)
        diff = torch.diff(u, dim=2 + d - 1 - j) / float(spacing[j])
        total = total + diff.pow(2).flatten(1).mean(1) * d  # mean over components -> sum over them
    if reduction == "per_case":
        return total
    if reduction == "mean":
        return total.mean()
    raise ValueError(f"unknown reduction {reduction!r}")


def bending_energy(u: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Bending energy sum_{i,j,k} (d^2 u_i / dx_j dx_k)^2, per-voxel mean, world units (mm^-2 * mm^2 /
    mm^2 = mm^-2). u: (N, D, *spatial) mm. Second differences by repeated forward differences."""
    d = u.dim() - 2
    if d not in (2, 3) or u.shape[1] != d or len(spacing) != d:
        raise ValueError(f"expected (N, D, *spatial) with D = len(spacing), got {tuple(u.shape)}, {spacing}")
    total = u.new_zeros(())
    for j in range(d):
        dj = torch.diff(u, dim=2 + d - 1 - j) / float(spacing[j])
        for k in range(d):
            dk = torch.diff(dj, dim=2 + d - 1 - k) / float(spacing[k])
            total = total + dk.pow(2).mean() * d
    return total


def folding_penalty(points: torch.Tensor, grid: Grid, margin: float = 0.1) -> torch.Tensor:
    """Penalty on folding: the per-voxel mean of ``max(0, margin - det J)`` (the negative Jacobian
    loss of Kuang and Schmah, "FAIM", MICCAI workshops 2019, with a margin so that a determinant is
    pushed up before it reaches 0, where a field resampled to a finer grid would fold).

    points: (N, *grid.size, D) a point map in mm at the voxel centres of the :class:`Grid` `grid`
    (x + u(x)); det J is :func:`atlasreg.spatial.transforms.jacobian_determinant` (central
    differences, one-sided at the borders), so a map without determinants below `margin` costs
    exactly 0. Returns a scalar (dimensionless). Raises ValueError for points off the grid or a margin
    outside [0, 1).
    """
    if not 0.0 <= float(margin) < 1.0:
        raise ValueError(f"margin must lie in [0, 1), got {margin}")
    return torch.relu(float(margin) - jacobian_determinant(points, grid)).mean()


class DiffusionRegulariser(nn.Module):
    """Module wrapper of :func:`diffusion_regulariser`."""

    def forward(self, u: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
        return diffusion_regulariser(u, spacing)
