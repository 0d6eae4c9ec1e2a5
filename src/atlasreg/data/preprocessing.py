"""Label maps: one-hot over a declared label list, back to label values, and the largest connected
component per structure. (Resampling and intensity normalisation of cases: :mod:`atlasreg.data.cases`.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch



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
