"""Inverse consistency of atlas-to-subject transformations (Atlas-ISTN paper Sec. 3.2,
'Inter-Subject Correspondence', Table 6): masked inverse consistency error (MICE) and
inverse consistency Dice (IC-DSC).

Derivation of the composition in atlasreg's convention. ``I o Phi`` is ``warp(I, forward_points)``,
i.e. ``(I o Phi)(x) = I(Phi(x))``. The paper's ``(G o Phi^-1) o Phi`` is therefore computed as

    J   = warp(G, inverse_points)   # J(x) = G(Phi^-1(x))
    G_IC = warp(J, forward_points)  # G_IC(x) = J(Phi(x)) = G(Phi^-1(Phi(x)))

and likewise ``y_IC = warp(warp(y^a, inverse_points), forward_points)``. With ``G`` the grid of
voxel-centre coordinates, ``G_IC(x) = Phi^-1(Phi(x))`` up to the linear interpolation of the discrete
intermediate image ``J`` (exactly the interpolation error the paper's metric includes), so
``||G - G_IC||`` is the round-trip error atlas -> subject -> atlas at atlas voxel ``x``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from atlasreg.spatial.grid import Grid
from atlasreg.spatial.transforms import Transform, warp

__all__ = ["inverse_consistency"]


def inverse_consistency(transform: Transform, atlas_labelmap: torch.Tensor, grid: Grid | None = None,
                        inverse: Transform | None = None) -> dict[str, np.ndarray]:
    """MICE and IC-DSC of a batch of transforms (Atlas-ISTN Sec. 3.2, Table 6).

    Parameters
    ----------
    transform:
        Any :class:`~atlasreg.spatial.transforms.Transform` Phi of batch N (atlas to subject space),
        e.g. an :class:`~atlasreg.spatial.transforms.AffineSVFTransform`.
    grid:
        The atlas grid on which the error is measured; default ``transform.grid`` (the model grid).
    inverse:
        The transform used as Phi^-1; default ``transform.inverse()`` (any transform pair can be
        checked this way).
    atlas_labelmap:
        Atlas labelmap y^a, one-hot or probabilistic, ``(1 or N, C, *size)`` on the same grid, channel 0
        the background.

    Returns
    -------
    Dict of numpy float64 arrays, per case:

    - ``mice_mm`` ``(N,)``: mean of ``||G - G_IC||`` in mm over the atlas structures of interest, the
      voxels where ``argmax_c y^a != 0`` (paper footnote 8); G are the grid-centred world coordinates
      of the voxel centres and ``G_IC = (G o Phi^-1) o Phi`` (see the module docstring);
    - ``mice_voxels`` ``(N,)``: the same with each component of ``G - G_IC`` divided by the spacing of
      its axis before taking the norm (the paper's "in terms of voxels");
    - ``ic_dsc`` ``(N,)``: mean over foreground labels of the Dice between ``argmax y^a`` and
      ``argmax y_IC``, ``y_IC = (y^a o Phi^-1) o Phi``; labels absent from both are left out of the mean;
    - ``ic_dsc_per_label`` ``(N, C - 1)``: the per-label Dice (NaN for a label absent from both).

    MICE values are NaN when the atlas has no foreground voxel, ``ic_dsc`` when no foreground label is
    present. Both maps are sampled with border padding, so parts of Phi leaving the field of view add
    to the error. Computed without gradients.

    Raises
    ------
    ValueError
        If the labelmap's shape does not match the transform grid, it has fewer than 2 channels, or its
        batch is neither 1 nor N.
    """
    grid = grid if grid is not None else transform.grid
    size, spacing = grid.size, grid.spacing
    d = len(size)
    if atlas_labelmap.dim() != d + 2 or tuple(atlas_labelmap.shape[2:]) != size:
        raise ValueError(f"atlas labelmap of shape {tuple(atlas_labelmap.shape)} does not match the "
                         f"transform grid {size} (expected (1 or N, C, *size))")
    channels = atlas_labelmap.shape[1]
    if channels < 2:
        raise ValueError(f"atlas labelmap needs a background and at least one foreground channel, "
                         f"got {channels}")
    with torch.no_grad():
        fwd = transform.on_grid(grid).detach()
        inv = (inverse if inverse is not None else transform.inverse()).on_grid(grid).detach()
        n = fwd.shape[0]
        if atlas_labelmap.shape[0] not in (1, n):
            raise ValueError(f"atlas labelmap batch {atlas_labelmap.shape[0]} is neither 1 nor {n}")
        y = atlas_labelmap.detach().to(device=fwd.device, dtype=fwd.dtype)
        y = y.expand(n, *y.shape[1:])

        # G: (N, D, *size) image of voxel-centre world coordinates, components (x, y[, z]).
        grid_pts = grid.points(fwd.device, fwd.dtype)
        g = grid_pts.movedim(-1, 1).expand(n, *grid_pts.movedim(-1, 1).shape[1:])
        g_ic = warp(warp(g, inv, grid), fwd, grid)                # G(Phi^-1(Phi(x)))
        y_ic = warp(warp(y, inv, grid), fwd, grid)                # y^a(Phi^-1(Phi(x)))

        diff = (g - g_ic).movedim(1, -1)                          # (N, *size, D) mm
        sp = torch.tensor(spacing, device=diff.device, dtype=diff.dtype)
        err_mm = diff.norm(dim=-1).reshape(n, -1).double()
        err_vox = (diff / sp).norm(dim=-1).reshape(n, -1).double()

        lab_a = y.argmax(dim=1).reshape(n, -1)
        lab_ic = y_ic.argmax(dim=1).reshape(n, -1)
        fg = lab_a != 0
        fg_count = fg.sum(dim=1).double()
        nan = torch.tensor(math.nan, dtype=torch.float64, device=fg.device)
        mice_mm = torch.where(fg_count > 0, (err_mm * fg).sum(1) / fg_count.clamp(min=1), nan)
        mice_vox = torch.where(fg_count > 0, (err_vox * fg).sum(1) / fg_count.clamp(min=1), nan)

        dice = torch.full((n, channels - 1), math.nan, dtype=torch.float64)
        for c in range(1, channels):
            a, b = lab_a == c, lab_ic == c
            denom = (a.sum(1) + b.sum(1)).double()
            inter = (a & b).sum(1).double()
            dice[:, c - 1] = torch.where(denom > 0, 2 * inter / denom.clamp(min=1), nan).cpu()

    dice_np = dice.numpy()
    present = ~np.isnan(dice_np)
    ic = np.full(n, math.nan)
    rows = present.any(axis=1)
    ic[rows] = np.nanmean(dice_np[rows], axis=1)
    return {
        "mice_mm": mice_mm.cpu().numpy(),
        "mice_voxels": mice_vox.cpu().numpy(),
        "ic_dsc": ic,
        "ic_dsc_per_label": dice_np,
    }
