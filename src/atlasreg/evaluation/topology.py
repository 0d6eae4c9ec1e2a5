"""Topology of segmentations and regularity of transformations.

* :func:`topology_per_structure` counts connected components and holes of every structure of an
  integer labelmap (``scipy.ndimage.label``), to check that warped atlas labelmaps keep the atlas
  topology (the motivation of Atlas-ISTN, paper Sec. 1 and Sec. 2.2: a diffeomorphic warp of the atlas
  labelmap preserves its topology, unlike a voxel-wise ITN prediction).
* :func:`jacobian_statistics` summarises the Jacobian determinant of a point map (folding fraction and
  the spread of log det J), computed with :func:`atlasreg.spatial.transforms.jacobian_determinant`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from atlasreg.spatial.grid import Grid
from atlasreg.spatial.transforms import jacobian_determinant

__all__ = ["topology_per_structure", "count_holes", "jacobian_statistics"]


def _touches_border(labelled: np.ndarray, count: int) -> np.ndarray:
    """Boolean array (count + 1,): entry k is True when component k touches the image border."""
    touching = np.zeros(count + 1, dtype=bool)
    for axis in range(labelled.ndim):
        for index in (0, -1):
            face = np.take(labelled, index, axis=axis)
            touching[np.unique(face)] = True
    return touching


def count_holes(mask: np.ndarray) -> int:
    """Number of holes of a binary mask (2-D) or enclosed cavities (3-D).

    A hole is a connected component of the complement ``~mask`` that does not touch the image border.
    The complement is labelled with the connectivity complementary to the full foreground connectivity
    (4-neighbourhood in 2-D for the 8-connected foreground, 6-neighbourhood in 3-D for the 26-connected
    foreground), so that a one-voxel-thick diagonal wall still separates inside from outside.

    In 3-D this counts cavities (the second Betti number), not tunnels: a solid torus has 0 holes.
    Regions enclosed by the structure count whatever fills them (background or another label), e.g. the
    blood pool enclosed by a myocardium ring. A hole cut by the image border is not counted.

    mask: boolean (or 0/1) array, 2-D (y, x) or 3-D (z, y, x). Raises ValueError for other ranks.
    """
    mask = np.asarray(mask).astype(bool)
    if mask.ndim not in (2, 3):
        raise ValueError(f"mask must be 2-D or 3-D, got shape {mask.shape}")
    if not mask.any():
        return 0
    structure = ndimage.generate_binary_structure(mask.ndim, 1)  # 4- / 6-connectivity
    labelled, count = ndimage.label(~mask, structure=structure)
    if count == 0:
        return 0
    touching = _touches_border(labelled, count)
    return int(count - touching[1:].sum())


def topology_per_structure(labelmap: np.ndarray, labels: Sequence[int]) -> dict[int, dict[str, int]]:
    """Connected components and holes of every foreground structure of an integer labelmap.

    Parameters
    ----------
    labelmap:
        Integer labelmap, 2-D ``(y, x)`` or 3-D ``(z, y, x)`` (numpy array order), voxel values being the
        declared label values.
    labels:
        Declared label values, background first (``labels[0]`` is the background and is skipped), as in
        :func:`atlasreg.evaluation.metrics.segmentation_metrics`.

    Returns
    -------
    ``{label: {"components": int, "holes": int}}`` for every foreground label:

    - ``components``: connected components of ``labelmap == label`` with full connectivity
      (8-neighbourhood in 2-D, 26 in 3-D), as :func:`~atlasreg.evaluation.metrics.labelmap_connected_components`.
    - ``holes``: :func:`count_holes` of the structure: components of its complement that do not touch
      the image border, labelled with the complementary connectivity (4 in 2-D, 6 in 3-D). In 3-D these
      are enclosed cavities (tunnels are not counted).

    An absent label has 0 components and 0 holes. A ring (annulus) has 1 component and 1 hole, a hollow
    ball 1 component and 1 cavity.

    Raises
    ------
    ValueError
        If the labelmap is not 2-D or 3-D or ``labels`` is empty.
    """
    labelmap = np.asarray(labelmap)
    if labelmap.ndim not in (2, 3):
        raise ValueError(f"labelmap must be 2-D or 3-D, got shape {labelmap.shape}")
    labels = [int(v) for v in labels]
    if not labels:
        raise ValueError("labels is empty (expected the background value first)")
    full = ndimage.generate_binary_structure(labelmap.ndim, labelmap.ndim)
    out: dict[int, dict[str, int]] = {}
    for value in labels[1:]:
        mask = labelmap == value
        _, components = ndimage.label(mask, structure=full)
        out[value] = {"components": int(components), "holes": count_holes(mask)}
    return out


def _broadcast_mask(mask: torch.Tensor, det: torch.Tensor) -> torch.Tensor:
    """Mask (N or 1, [1,] *spatial) -> boolean (N, *spatial) like det."""
    mask = torch.as_tensor(mask, device=det.device)
    if mask.dim() == det.dim() + 1:
        if mask.shape[1] != 1:
            raise ValueError(f"mask with a channel dim must have one channel, got {tuple(mask.shape)}")
        mask = mask[:, 0]
    if mask.dim() != det.dim() or tuple(mask.shape[1:]) != tuple(det.shape[1:]) \
            or mask.shape[0] not in (1, det.shape[0]):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the Jacobian determinant "
                         f"{tuple(det.shape)} (expected (N or 1, [1,] *spatial))")
    return mask.bool().expand_as(det)


def jacobian_statistics(points: torch.Tensor, grid: Grid,
                        mask: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Folding and log-Jacobian spread of a point map, per case.

    Parameters
    ----------
    points:
        Point map ``(N, *grid.size, D)`` in mm at the voxel centres of `grid`, components
        (x, y[, z]), e.g. ``AffineSVFTransform.forward_points()`` (Phi) or ``inverse_points()`` (Phi^-1).
    grid:
        The :class:`~atlasreg.spatial.grid.Grid` the points are given on.
    mask:
        Optional region, ``(N or 1, *spatial)`` or ``(N or 1, 1, *spatial)``, nonzero = inside; the
        statistics are then computed over the voxels inside the mask only.

    Returns
    -------
    Dict of numpy float64 arrays of shape ``(N,)``:

    - ``fraction_nonpositive``: fraction of (masked) voxels with det J <= 0 (folding), in [0, 1];
    - ``std_log_jacobian``: standard deviation (ddof = 0) of log det J over the (masked) voxels with
      det J > 0; 0 for any rigid/affine map; NaN when no such voxel exists;
    - ``n_voxels``: number of voxels evaluated (the mask size).

    ``fraction_nonpositive`` is NaN for an empty mask. det J uses central finite differences
    (:func:`~atlasreg.spatial.transforms.jacobian_determinant`).

    Raises
    ------
    ValueError
        For a malformed point map, spacing or mask.
    """
    with torch.no_grad():
        det = jacobian_determinant(points.detach(), grid).double()  # (N, *spatial)
        flat_mask = None if mask is None else _broadcast_mask(mask, det).reshape(det.shape[0], -1)
    det = det.reshape(det.shape[0], -1).cpu().numpy()
    if flat_mask is not None:
        flat_mask = flat_mask.cpu().numpy()
    n = det.shape[0]
    frac = np.full(n, math.nan)
    std = np.full(n, math.nan)
    count = np.zeros(n)
    for i in range(n):
        values = det[i] if flat_mask is None else det[i][flat_mask[i]]
        count[i] = values.size
        if values.size == 0:
            continue
        frac[i] = float(np.mean(values <= 0))
        positive = values[values > 0]
        if positive.size:
            std[i] = float(np.std(np.log(positive)))
    return {"fraction_nonpositive": frac, "std_log_jacobian": std, "n_voxels": count}
