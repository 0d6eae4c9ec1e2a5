"""Preprocessing: intensity normalisation, one-hot over a declared label list, and resampling between
an image's own grid and the model grid (same centre and direction, model size and spacing).

Resampling is done with linear interpolation of images and of one-hot labelmaps (soft labels), so that
a round trip model grid -> native grid loses little (the reference resamples labels by nearest
neighbour and writes its outputs at model resolution). Written in torch because the same sampler is
differentiable and used by the transforms.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..spatial.grid import Grid
from ..spatial.transforms import resample


def zero_mean_unit_variance(array: np.ndarray) -> np.ndarray:
    """(x - mean) / std over the whole image; a constant image maps to zeros."""
    array = array.astype(np.float32)
    std = float(array.std())
    return (array - float(array.mean())) / (std if std > 0 else 1.0)


def one_hot(indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label indices (N, *spatial) int64 in [0, C) -> one-hot (N, C, *spatial) float32."""
    return torch.nn.functional.one_hot(indices.long(), num_classes).movedim(-1, 1).float()


def values_to_indices(labelmap: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Map declared label values (e.g. 0, 255) to channel indices 0..C-1. Values must be declared
    (checked by the reader); unknown values raise ValueError."""
    lut = {int(v): i for i, v in enumerate(labels)}
    out = np.zeros(labelmap.shape, dtype=np.int64)
    present = np.unique(labelmap)
    unknown = [int(v) for v in present if int(v) not in lut]
    if unknown:
        raise ValueError(f"label values {unknown} are not in the declared list {list(labels)}")
    for v in present:
        out[labelmap == v] = lut[int(v)]
    return out


def indices_to_values(indices: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Channel indices 0..C-1 -> declared label values."""
    return np.asarray(labels)[indices]


def case_model_grid(native: Grid, model: Grid) -> Grid:
    """The model grid placed on a case: the model's size and spacing with the case grid's centre and
    direction (:meth:`Grid.resampled`). Model coordinates map to its world coordinates by the case's
    frame (:meth:`Grid.frame`)."""
    return native.resampled(model.size, model.spacing)


def to_model_grid(tensor: torch.Tensor, native: Grid, model: Grid, mode: str = "bilinear") -> torch.Tensor:
    """Resample (N, C, *native.size) onto the model grid placed on the case (:func:`case_model_grid`).
    Returns (N, C, *model.size)."""
    return resample(tensor, native, case_model_grid(native, model), mode=mode, padding="border")


def to_native_grid(tensor: torch.Tensor, model: Grid, native: Grid, mode: str = "bilinear") -> torch.Tensor:
    """Resample (N, C, *model.size) from the model grid placed on the case back onto the case's own
    grid. Returns (N, C, *native.size)."""
    return resample(tensor, case_model_grid(native, model), native, mode=mode, padding="border")


def largest_components(indices: np.ndarray, num_classes: int) -> np.ndarray:
    """Keep the largest connected component of every foreground structure (the paper's U-Net_lcc
    post-processing, Sec. 3.2); removed voxels become background (index 0).

    indices: label indices (*spatial) in [0, C). Full connectivity (8 in 2D, 26 in 3D), the same as
    the component counts of the evaluation. Uses SimpleITK's ConnectedComponent and RelabelComponent
    (which sorts components by size), so no extra dependency is needed.
    Returns an array like `indices`."""
    import SimpleITK as sitk

    out = np.zeros_like(indices)
    for c in range(1, num_classes):
        mask = indices == c
        if not mask.any():
            continue
        labelled = sitk.RelabelComponent(sitk.ConnectedComponent(
            sitk.GetImageFromArray(mask.astype(np.uint8)), True))
        out[sitk.GetArrayFromImage(labelled) == 1] = c
    return out
