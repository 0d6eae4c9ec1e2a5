"""Per-structure segmentation metrics on integer labelmaps, in world units.

Overlap and surface distances come from MONAI's maintained implementations
(``monai.metrics.compute_dice``, ``compute_hausdorff_distance`` with ``percentile`` and ``spacing``,
``compute_average_surface_distance`` with ``symmetric=True``); this module only converts labelmaps to
binary masks, converts the spacing from ITK order to array order, and handles empty structures.
Topology is checked with :func:`labelmap_connected_components` (``scipy.ndimage.label``).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Sequence

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    import torch

__all__ = ["segmentation_metrics", "symmetric_hd95", "batch_dice_hd95", "labelmap_connected_components",
           "METRIC_NAMES"]

METRIC_NAMES = ("dice", "hd", "hd95", "hd95_avg", "asd")


def _checked(prediction, reference, labels, spacing):
    """(prediction, reference as arrays, labels as ints, spacing in array axis order) after the checks
    of :func:`segmentation_metrics` (ValueError)."""
    prediction = np.asarray(prediction)
    reference = np.asarray(reference)
    if prediction.shape != reference.shape:
        raise ValueError(f"shape mismatch: prediction {prediction.shape} vs reference {reference.shape}")
    if prediction.ndim not in (2, 3):
        raise ValueError(f"labelmaps must be 2-D or 3-D, got shape {prediction.shape}")
    labels = [int(v) for v in labels]
    if not labels:
        raise ValueError("labels is empty (expected the background value first)")
    return prediction, reference, labels, _array_spacing(spacing, prediction.ndim)


def _array_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    """ITK-order spacing (x, y[, z]) -> array-order spacing ([z,] y, x); None -> all ones."""
    if spacing is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in np.asarray(spacing, dtype=float).ravel())
    if len(spacing) != ndim:
        raise ValueError(f"spacing has {len(spacing)} values for a {ndim}-D labelmap (expected {ndim}, "
                         f"in ITK order x, y{', z' if ndim == 3 else ''})")
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be positive and finite, got {spacing}")
    return tuple(reversed(spacing))


def segmentation_metrics(prediction: np.ndarray, reference: np.ndarray, labels: Sequence[int],
                         spacing: Sequence[float] | None = None,
                         include_background: bool = False) -> dict[int, dict[str, float]]:
    """Dice, Hausdorff distance, 95th-percentile Hausdorff distance and average surface distance per label.

    Parameters
    ----------
    prediction, reference:
        Integer labelmaps of identical shape in numpy array order, (z, y, x) for 3-D or (y, x) for 2-D.
        Voxel values are the declared label values (e.g. 0 and 255), not class indices.
    labels:
        Declared label values, background first (``labels[0]`` is the background).
    spacing:
        Voxel size in ITK order (x, y[, z]), as ``SimpleITK.Image.GetSpacing()`` reports it; it is reversed
        to array order internally. ``None`` means unit spacing (distances in voxels).
    include_background:
        Also evaluate ``labels[0]``.

    Returns
    -------
    ``{label_value: {"dice", "hd", "hd95", "hd95_avg", "asd"}}`` for every foreground label (and the background when
    ``include_background``), as Python floats. Distances are in world units (mm when the spacing is in
    mm):

    - ``dice``: ``monai.metrics.compute_dice``, 2|P∩R| / (|P| + |R|).
    - ``hd``: ``monai.metrics.compute_hausdorff_distance`` (symmetric, maximum over surface points).
    - ``hd95``: the same with ``percentile=95`` (so ``hd95 <= hd``): the MAXIMUM of the two directed 95th
      percentiles (MONAI's symmetric form).
    - ``hd95_avg``: their MEAN, the "symmetric HD95" of DeepATLAS (Chang, Eq. 16; :func:`symmetric_hd95`),
      so ``hd95_avg <= hd95``; for comparing with papers that report it.
    - ``asd``: ``monai.metrics.compute_average_surface_distance`` with ``symmetric=True``: the mean of the
      distances of the surface points of both masks to the other surface.

    Empty structures: if the label is absent from both prediction and reference, dice = 1.0 (perfect
    agreement on absence) and the distances are NaN; if it is absent from exactly one, dice = 0.0 and
    the distances are NaN. Either case emits a ``UserWarning`` naming the label; MONAI's own warnings are
    suppressed.

    Raises
    ------
    ValueError
        If the shapes differ, the labelmaps are not 2-D or 3-D, ``labels`` is empty, or ``spacing`` has
        the wrong length or non-positive values.
    """
    prediction, reference, labels, array_spacing = _checked(prediction, reference, labels, spacing)

    import torch  # local imports: MONAI takes seconds to import
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

    evaluated = labels if include_background else labels[1:]
    results: dict[int, dict[str, float]] = {}
    for value in evaluated:
        pred_mask = prediction == value
        ref_mask = reference == value
        pred_any, ref_any = bool(pred_mask.any()), bool(ref_mask.any())
        if not (pred_any and ref_any):
            dice = 1.0 if not (pred_any or ref_any) else 0.0
            which = ("prediction and reference" if not (pred_any or ref_any)
                     else "prediction" if not pred_any else "reference")
            warnings.warn(f"label {value} is empty in the {which}: dice = {dice}, distances are NaN",
                          UserWarning, stacklevel=2)
            results[value] = {"dice": dice, **{name: math.nan for name in METRIC_NAMES[1:]}}
            continue
        # (batch=1, channel=1, *spatial) binary masks; one channel so include_background=True keeps it.
        p = torch.from_numpy(pred_mask[None, None].astype(np.float32))
        r = torch.from_numpy(ref_mask[None, None].astype(np.float32))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dice = compute_dice(p, r, include_background=True, ignore_empty=False)
            hd = compute_hausdorff_distance(p, r, include_background=True, spacing=array_spacing)
            there, back = _directed_hd95(p, r, array_spacing)
            asd = compute_average_surface_distance(p, r, include_background=True, symmetric=True,
                                                   spacing=array_spacing)
        results[value] = {"dice": float(dice.item()), "hd": float(hd.item()), "hd95": max(there, back),
                          "hd95_avg": 0.5 * (there + back), "asd": float(asd.item())}
    return results


def symmetric_hd95(prediction: np.ndarray, reference: np.ndarray, labels: Sequence[int],
                   spacing: Sequence[float] | None = None, include_background: bool = False) -> dict[int, float]:
    """The symmetric 95th-percentile Hausdorff distance of DeepATLAS (Chang, Sec. 5.6.1, Eq. 16) per label:
    ``0.5 (HD95(Y, Y^) + HD95(Y^, Y))``, the MEAN of the two directed 95th percentiles, where
    ``HD95(A, B)`` is the 95th percentile of the distances from each surface point of A to the nearest
    surface point of B. atlasreg's standard ``hd95`` (:func:`segmentation_metrics`, MONAI's symmetric
    form) is the MAXIMUM of the two, so this is never larger; the two agree when both directions do.

    prediction, reference: integer labelmaps of one shape, array order, declared label values;
    labels: declared values, background first; spacing: ITK order (x, y[, z]), None for voxels. Each
    directed distance is ``monai.metrics.compute_hausdorff_distance(..., percentile=95, directed=True)``
    (surface points: the masks' edges; linear interpolation between ranks, torch.quantile). Returns
    ``{label: distance}`` in world units for every foreground label (and the background with
    ``include_background``); NaN, with a UserWarning naming the label, where the label is absent
    from either labelmap. Raises ValueError as :func:`segmentation_metrics`."""
    prediction, reference, labels, array_spacing = _checked(prediction, reference, labels, spacing)

    import torch  # local import: MONAI (in _directed_hd95) takes seconds to import

    out: dict[int, float] = {}
    for value in (labels if include_background else labels[1:]):
        p, r = prediction == value, reference == value
        if not (p.any() and r.any()):
            warnings.warn(f"label {value} is empty in the {'prediction' if not p.any() else 'reference'}: the "
                          "symmetric HD95 is NaN", UserWarning, stacklevel=2)
            out[value] = math.nan
            continue
        pt = torch.from_numpy(p[None, None].astype(np.float32))
        rt = torch.from_numpy(r[None, None].astype(np.float32))
        there, back = _directed_hd95(pt, rt, array_spacing)
        out[value] = 0.5 * (there + back)
    return out


def _directed_hd95(prediction, reference, array_spacing) -> tuple[float, float]:
    """The two directed 95th-percentile surface distances (prediction -> reference, reference ->
    prediction) of (1, 1, *spatial) float masks, by ``monai.metrics.compute_hausdorff_distance(...,
    percentile=95, directed=True)`` (MONAI's symmetric HD95 is their maximum); its warnings are
    suppressed (the callers warn about empty masks themselves)."""
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        there = compute_hausdorff_distance(prediction, reference, include_background=True, percentile=95,
                                           directed=True, spacing=array_spacing)
        back = compute_hausdorff_distance(reference, prediction, include_background=True, percentile=95,
                                          directed=True, spacing=array_spacing)
    return float(there.item()), float(back.item())


def batch_dice_hd95(prediction, reference, num_classes: int,
                    spacing: Sequence[float] | None = None) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Dice and 95th-percentile Hausdorff distance per case and foreground class of a batch of labelmaps
    on one grid: the two metrics of :func:`segmentation_metrics` in one MONAI call each, for monitoring
    (training's validation pass, :mod:`atlasreg.models.monitor`).

    prediction, reference: (N, *S) integer class indices in ``[0, num_classes)`` (channel order of the
    declared labels, 0 = background; 2-D or 3-D S), torch tensors or numpy arrays. spacing: voxel size
    in ITK order (x, y[, z]) or None (distances in voxels).

    Returns float64 tensors ``dice`` (N, C - 1) and ``hd95`` (N, C - 1), distances in world units:
    ``monai.metrics.compute_dice`` and ``compute_hausdorff_distance(percentile=95)`` on the one-hot masks.
    Empty structures as in :func:`segmentation_metrics`, without warnings: absent from both, Dice 1 and
    HD95 NaN; from one, Dice 0 and HD95 NaN. Raises ValueError for mismatched shapes, a labelmap that
    is not (N, *S) with S 2-D or 3-D, class indices out of range, or a bad spacing.
    """
    import torch  # local imports: MONAI takes seconds to import
    from monai.metrics import compute_dice, compute_hausdorff_distance

    prediction = torch.as_tensor(np.asarray(prediction) if not torch.is_tensor(prediction) else prediction)
    reference = torch.as_tensor(np.asarray(reference) if not torch.is_tensor(reference) else reference)
    if prediction.shape != reference.shape:
        raise ValueError(f"shape mismatch: prediction {tuple(prediction.shape)} vs reference "
                         f"{tuple(reference.shape)}")
    if prediction.ndim not in (3, 4):
        raise ValueError(f"expected (N, *S) labelmaps with S 2-D or 3-D, got shape {tuple(prediction.shape)}")
    for name, t in (("prediction", prediction), ("reference", reference)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"{name} holds class indices outside [0, {num_classes})")
    array_spacing = _array_spacing(spacing, prediction.ndim - 1)
    p = torch.nn.functional.one_hot(prediction.long(), num_classes).movedim(-1, 1)[:, 1:].float()
    r = torch.nn.functional.one_hot(reference.long(), num_classes).movedim(-1, 1)[:, 1:].float()
    with warnings.catch_warnings():  # MONAI warns for empty masks, handled below
        warnings.simplefilter("ignore")
        dice = compute_dice(p, r, include_background=True, ignore_empty=False).double()
        hd95 = compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                          spacing=array_spacing).double()
    p_any, r_any = p.flatten(2).any(2), r.flatten(2).any(2)
    both = p_any & r_any
    dice = torch.where(both, dice, (~(p_any | r_any)).double())  # 1 where absent from both, else 0
    hd95 = torch.where(both, hd95, torch.full_like(hd95, math.nan))
    return dice, hd95


def labelmap_connected_components(labelmap: np.ndarray, label: int) -> int:
    """Number of connected components of the structure ``labelmap == label``.

    Uses ``scipy.ndimage.label`` with full connectivity (8-neighbourhood in 2-D, 26 in 3-D), so
    diagonally touching voxels belong to one component. Returns 0 if the label is absent. Used to check
    topology (a well-formed single organ has exactly one component).
    """
    mask = np.asarray(labelmap) == label
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    _, count = ndimage.label(mask, structure=structure)
    return int(count)
