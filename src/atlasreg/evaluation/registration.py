"""Registration metrics in the style of Learn2Reg (Hering et al., IEEE TMI 42(3), 2023): target
registration error of landmarks, overlap of propagated labels, regularity of the transform and inverse
consistency of a transform pair. World units (mm) throughout.

Convention (that of :mod:`atlasreg.spatial.transforms` and ITK's resampling): a registration of a
moving image onto a fixed image gives a transform T that maps FIXED points to MOVING points, so the
warped moving image is ``moving o T`` on the fixed grid. Hence

* landmark error: ``TRE_i = |T(f_i) - m_i|`` for corresponding fixed and moving landmarks f_i, m_i
  (the initial error, before registration, is ``|f_i - m_i|``);
* propagated labels: the moving labelmap warped by T onto the fixed grid, compared with the fixed
  labelmap (:func:`atlasreg.evaluation.metrics.segmentation_metrics`: Dice and HD95 from MONAI);
* regularity: the Jacobian determinant of T on the fixed grid
  (:func:`atlasreg.evaluation.topology.jacobian_statistics`);
* inverse consistency: ``|T_inv(T(x)) - x|`` at the fixed grid's voxel centres.

This module only reads the landmark files and combines the existing metrics; the metrics themselves
live in :mod:`~atlasreg.evaluation.metrics`, :mod:`~atlasreg.evaluation.topology` and
:mod:`~atlasreg.spatial.transforms`.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from atlasreg.correspondence import read_points_csv
from atlasreg.data.preprocessing import indices_to_values, one_hot, values_to_indices
from atlasreg.errors import AtlasregError
from atlasreg.evaluation.metrics import segmentation_metrics
from atlasreg.evaluation.topology import jacobian_statistics
from atlasreg.spatial.grid import Grid
from atlasreg.spatial.transforms import Transform

__all__ = [
    "read_landmarks", "read_landmark_pair", "target_registration_error", "propagate_labels",
    "propagated_label_metrics", "transform_regularity", "inverse_consistency_error",
]


# ---------------------------------------------------------------- landmarks

def read_landmarks(path, ndim: int | None = None) -> np.ndarray:
    """Landmarks of a CSV file: a header row with columns ``x``, ``y`` and, in 3D, ``z`` (world
    coordinates, mm, ITK's physical space; other columns such as a name are allowed and ignored), one
    landmark per row. ndim: the expected dimension; None: 3 when there is a ``z`` column, else 2.

    Returns float64 (n, ndim). Raises AtlasregError naming the file: missing, unreadable, without the
    coordinate columns, a row with a missing, non-numeric or non-finite coordinate (naming the line),
    or no landmark at all (the reader :func:`atlasreg.correspondence.read_points_csv`).
    """
    _, _, points = read_points_csv(path, ndim)
    if len(points) == 0:
        raise AtlasregError("has no landmarks (only a header row)", path)
    return points


def read_landmark_pair(fixed_path, moving_path, ndim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Corresponding landmarks of a fixed and a moving image: row i of one file is row i of the other.

    Returns (fixed (n, D), moving (n, D)) float64, mm. Raises AtlasregError naming the file: as
    :func:`read_landmarks`, and for a moving file with another number of rows or dimension than the
    fixed file.
    """
    fixed = read_landmarks(fixed_path, ndim)
    moving_dim = ndim if ndim is not None else fixed.shape[1]
    try:
        moving = read_landmarks(moving_path, moving_dim)
    except AtlasregError as exc:
        if ndim is None and "z column" in str(exc):
            raise AtlasregError(f"has {'no' if moving_dim == 3 else 'a'} z column but the fixed landmarks "
                                f"({Path(fixed_path).name}) are {moving_dim}D", moving_path) from None
        raise
    if len(moving) != len(fixed):
        raise AtlasregError(f"has {len(moving)} landmarks, the fixed landmarks ({Path(fixed_path).name}) "
                            f"have {len(fixed)}; rows must correspond", moving_path)
    return fixed, moving


def _as_landmarks(points, what: str) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] not in (2, 3) or len(points) == 0:
        raise ValueError(f"{what} landmarks must be an (n, 2 or 3) array with n >= 1, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError(f"{what} landmarks are not all finite")
    return points


def target_registration_error(transform: Transform | None, fixed, moving) -> dict:
    """Target registration error of corresponding landmarks (Learn2Reg's TRE), in mm.

    Parameters
    ----------
    transform:
        A batch-1 :class:`~atlasreg.spatial.transforms.Transform` mapping fixed points to moving points
        (world, mm; see the module docstring), or None for the identity (the initial error only).
    fixed, moving:
        The landmarks: paths of two CSV files (:func:`read_landmark_pair`) or (n, D) arrays of world
        coordinates (mm, ITK order x, y[, z]) with corresponding rows.

    Returns
    -------
    Dict: ``tre_mm`` (n,) float64 array ``|T(f_i) - m_i|``; ``tre_mean_mm``, ``tre_median_mm``,
    ``tre_max_mm``, ``tre_std_mm`` (ddof 0) floats; the same four for the identity as
    ``initial_tre_*_mm`` (``|f_i - m_i|``), and ``n_landmarks``.

    Raises
    ------
    AtlasregError
        For bad landmark files (naming the file), or landmarks of another dimension than the transform
        (naming the fixed file).
    ValueError
        For arrays of the wrong shape, a transform of batch size other than 1, or non-finite mapped
        points.
    """
    if isinstance(fixed, (str, Path)) or isinstance(moving, (str, Path)):
        if not (isinstance(fixed, (str, Path)) and isinstance(moving, (str, Path))):
            raise ValueError("give both landmark sets as CSV paths or both as arrays")
        source = fixed
        fixed, moving = read_landmark_pair(fixed, moving)
    else:
        source = None
        fixed, moving = _as_landmarks(fixed, "fixed"), _as_landmarks(moving, "moving")
        if fixed.shape != moving.shape:
            raise ValueError(f"fixed landmarks {fixed.shape} and moving landmarks {moving.shape} differ in shape")
    out = {"n_landmarks": len(fixed)}
    initial = np.linalg.norm(fixed - moving, axis=1)
    mapped = fixed
    if transform is not None:
        if transform.ndim != fixed.shape[1]:
            message = f"has {fixed.shape[1]}-D landmarks, the transform is {transform.ndim}-D"
            if source is not None:
                raise AtlasregError(message, source)
            raise ValueError(f"the landmarks are {fixed.shape[1]}-D, the transform is {transform.ndim}-D")
        if transform.batch_size != 1:
            raise ValueError(f"TRE needs a transform of batch size 1, got {transform.batch_size}")
        like = transform._like()
        with torch.no_grad():
            pts = torch.as_tensor(fixed, dtype=like.dtype, device=like.device)[None]
            mapped = transform.points(pts)[0].detach().cpu().double().numpy()
        if not np.isfinite(mapped).all():
            raise ValueError("the transform maps some landmarks to non-finite points")
    tre = np.linalg.norm(mapped - moving, axis=1)
    for prefix, values in (("tre", tre), ("initial_tre", initial)):
        out[f"{prefix}_mean_mm"] = float(values.mean())
        out[f"{prefix}_median_mm"] = float(np.median(values))
        out[f"{prefix}_max_mm"] = float(values.max())
        out[f"{prefix}_std_mm"] = float(values.std())
    out["tre_mm"] = tre
    return out


# ---------------------------------------------------------------- propagated labels

def propagate_labels(moving_labelmap: np.ndarray, labels: Sequence[int], transform: Transform,
                     moving_grid: Grid, fixed_grid: Grid) -> np.ndarray:
    """Warp a moving labelmap onto the fixed grid: ``moving_labels o T``.

    Every label's indicator is warped with linear interpolation and each fixed voxel takes the label
    of largest weight (as Atlas-ISTN warps labelmaps, paper Sec. 2.2); outside the moving image's
    field of view the weights are 0, so the voxel is background (``labels[0]``).

    moving_labelmap: integer array of declared label values on `moving_grid` (array order); labels: the
    declared values, background first; transform: batch 1, fixed points -> moving points (mm).
    Returns an integer array of label values on `fixed_grid` (array order). Raises ValueError for a
    labelmap that does not match its grid, undeclared values or a transform of batch size other than 1.
    """
    moving_labelmap = np.asarray(moving_labelmap)
    if tuple(moving_labelmap.shape) != moving_grid.size:
        raise ValueError(f"moving labelmap of shape {moving_labelmap.shape} is not on its grid {moving_grid.size}")
    if transform.batch_size != 1:
        raise ValueError(f"propagate_labels needs a transform of batch size 1, got {transform.batch_size}")
    like = transform._like()
    indices = torch.from_numpy(values_to_indices(moving_labelmap, labels))[None]
    probabilities = one_hot(indices, len(labels)).to(device=like.device, dtype=like.dtype)
    with torch.no_grad():
        warped = transform.warp(probabilities, moving_grid, fixed_grid, padding="zeros")
    return indices_to_values(warped[0].argmax(0).cpu().numpy(), labels)


def propagated_label_metrics(propagated: np.ndarray, fixed_labelmap: np.ndarray, labels: Sequence[int],
                             spacing: Sequence[float] | None) -> dict:
    """Dice and HD95 (mm) of a propagated labelmap against the fixed labelmap, per foreground label and
    averaged (Learn2Reg's DSC and HD95).

    propagated, fixed_labelmap: integer labelmaps of label values on the fixed grid (array order);
    labels: declared values, background first; spacing: the fixed grid's voxel size, ITK order (mm).
    Uses :func:`atlasreg.evaluation.metrics.segmentation_metrics` (MONAI), including its handling of
    labels absent from one or both maps (Dice 1 or 0, HD95 NaN; its warnings are silenced here).

    Returns ``{"per_label": {label: {"dice", "hd", "hd95", "asd"}}, "dice_mean", "hd95_mean"}``; the
    means run over the foreground labels (HD95 over those where it is defined; NaN if none).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        per_label = segmentation_metrics(propagated, fixed_labelmap, labels, spacing)
    dice = [v["dice"] for v in per_label.values()]
    hd95 = [v["hd95"] for v in per_label.values() if not math.isnan(v["hd95"])]
    return {"per_label": per_label, "dice_mean": float(np.mean(dice)) if dice else math.nan,
            "hd95_mean": float(np.mean(hd95)) if hd95 else math.nan}


# ---------------------------------------------------------------- regularity and inverse consistency

def transform_regularity(transform: Transform, grid: Grid, mask: torch.Tensor | None = None) -> dict:
    """Folding and smoothness of a transform on `grid` (Learn2Reg's %|J|<=0 and SD log|J|), per case.

    The Jacobian determinant of T at the voxel centres of `grid` (central differences, mm) by
    :func:`atlasreg.evaluation.topology.jacobian_statistics`. Returns numpy float64 arrays (N,):
    ``fraction_nonpositive`` (fraction of voxels with det J <= 0, in [0, 1]; multiply by 100 for
    Learn2Reg's percentage), ``std_log_jacobian`` (SD of log det J over the voxels with det J > 0;
    Learn2Reg instead clips det J to [1e-9, 1e9] and keeps the folded voxels, so the two differ when
    there is folding), ``n_voxels``. mask: optional region (N or 1, [1,] *grid.size), nonzero inside.
    """
    with torch.no_grad():
        return jacobian_statistics(transform.on_grid(grid), grid, mask)


def inverse_consistency_error(forward: Transform, inverse: Transform, grid: Grid,
                              mask: torch.Tensor | None = None) -> dict:
    """Inverse-consistency error of a transform pair: ``e(x) = |T_inv(T(x)) - x|`` (mm) at the voxel
    centres x of `grid`, per case.

    The composition is evaluated exactly at the points (``forward.then(inverse)``: every transform's
    own interpolation, no resampled intermediate image), so an affine transform and its exact inverse
    give 0 up to rounding. This differs from MICE (:func:`atlasreg.evaluation.consistency.inverse_consistency`,
    the paper's Table 6), which warps a coordinate image through both transforms and so adds the
    linear interpolation of the intermediate image, and averages over the atlas foreground only.

    forward, inverse: transforms of the same dimension (batch N or 1); mask: optional region
    (N or 1, [1,] *grid.size), nonzero inside. Returns numpy float64 arrays (N,): ``ice_mean_mm``,
    ``ice_max_mm``, ``ice_mean_voxels`` (each component divided by the grid spacing of its axis before
    the norm), ``n_voxels``; NaN for an empty mask. Raises ValueError for transforms of different
    dimension or a malformed mask.
    """
    if forward.ndim != inverse.ndim or forward.ndim != grid.ndim:
        raise ValueError(f"transforms of dimension {forward.ndim} and {inverse.ndim} on a {grid.ndim}-D grid")
    with torch.no_grad():
        round_trip = forward.then(inverse).on_grid(grid)
        x = grid.points(round_trip.device, round_trip.dtype)
        diff = (round_trip - x).double()
        n = diff.shape[0]
        err = diff.norm(dim=-1).reshape(n, -1)
        spacing = torch.tensor(grid.spacing, dtype=diff.dtype, device=diff.device)
        err_vox = (diff / spacing).norm(dim=-1).reshape(n, -1)
        if mask is None:
            inside = torch.ones_like(err, dtype=torch.bool)
        else:
            m = torch.as_tensor(mask, device=err.device)
            if m.dim() == grid.ndim + 2:
                if m.shape[1] != 1:
                    raise ValueError(f"mask with a channel dim must have one channel, got {tuple(m.shape)}")
                m = m[:, 0]
            if tuple(m.shape[1:]) != grid.size or m.shape[0] not in (1, n):
                raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the grid {grid.size} "
                                 f"(expected (N or 1, [1,] *size))")
            inside = m.reshape(m.shape[0], -1).bool().expand(n, -1)
    count = inside.sum(1).cpu().numpy().astype(np.float64)
    mean_mm, max_mm, mean_vox = (np.full(n, math.nan) for _ in range(3))
    for i in range(n):
        if count[i]:
            e, ev = err[i][inside[i]], err_vox[i][inside[i]]
            mean_mm[i], max_mm[i], mean_vox[i] = float(e.mean()), float(e.max()), float(ev.mean())
    return {"ice_mean_mm": mean_mm, "ice_max_mm": max_mm, "ice_mean_voxels": mean_vox, "n_voxels": count}
