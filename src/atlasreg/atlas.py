"""The population atlas of Atlas-ISTN (Sec. 2.3, Eqs. 15-16): labelmap and image on the model grid."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .contracts import ATLAS_IMAGE, ATLAS_LABELMAP, ATLAS_PROBABILITIES
from .data.io import atomic_directory, write_image
from .data.preprocessing import indices_to_values
from .spatial.grid import Grid


def atlas_init(labelmaps: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 15, t = 0: channel-wise mean of the unaligned training cases.
    labelmaps: (n, C, *S) one-hot; images: (n, 1, *S). Returns ((1, C, *S), (1, 1, *S))."""
    return labelmaps.mean(0, keepdim=True), images.mean(0, keepdim=True)


def atlas_update(atlas: torch.Tensor, warped_mean: torch.Tensor, eta: float) -> torch.Tensor:
    """Eq. 15, t >= 1: (1 - eta) z^a_{t-1} + eta * mean_i(z_i o Phi_i) (the mean is Eq. 16)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    return (1.0 - eta) * atlas + eta * warped_mean


def save_atlas(labelmap: torch.Tensor, image: torch.Tensor, labels: Sequence[int], grid: Grid,
               out_dir: str | Path) -> dict[str, Path]:
    """Write the atlas folder `out_dir` (:mod:`atlasreg.contracts`): images on the model grid `grid`
    (:meth:`Grid.centred`: centred at the world origin, identity direction; its world coordinates are
    the model's, so transforms that atlasreg writes apply to these files as they are): the labelmap
    (argmax, declared label values, int32), the probabilities (C-component float32 vector image) and
    the image (float32). labelmap: (1, C, *grid.size); image: (1, 1, *grid.size). Returns the paths,
    keyed by file name (:data:`~atlasreg.contracts.ATLAS_LABELMAP`, ...). The folder is written all or
    nothing (:func:`atlasreg.data.io.atomic_directory`; an existing one is replaced), so a run killed
    while writing never leaves a partial atlas. Raises ValueError when the atlas is not on `grid`."""
    out_dir = Path(out_dir)
    if tuple(labelmap.shape[2:]) != grid.size:
        raise ValueError(f"atlas of shape {tuple(labelmap.shape[2:])} is not on the grid {grid.size}")
    lab = labelmap[0].detach().cpu().float()
    arg = indices_to_values(lab.argmax(0).numpy(), labels).astype(np.int32)
    probs = sitk.GetImageFromArray(lab.movedim(0, -1).numpy(), isVector=True)
    imgs = {ATLAS_LABELMAP: sitk.GetImageFromArray(arg),
            ATLAS_PROBABILITIES: probs,
            ATLAS_IMAGE: sitk.GetImageFromArray(image[0, 0].detach().cpu().float().numpy())}
    with atomic_directory(out_dir) as tmp:
        for name, img in imgs.items():
            grid.copy_information_to(img)
            write_image(img, tmp / name)
    return {name: out_dir / name for name in imgs}
