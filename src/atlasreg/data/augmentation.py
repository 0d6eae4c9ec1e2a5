"""Spatial augmentation (Atlas-ISTN Sec. 3.2: translation +-8 voxels, rotation +-15 degrees, scaling
0.9-1.1) with MONAI's RandAffine, applied identically to the image and its one-hot labelmap."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from monai.transforms import RandAffine

from ..config import ConfigError


def make_spatial_augmentation(cfg: dict, ndim: int, spacing: Sequence[float], seed: int | None = None) -> Callable:
    """Returns f(image (N, 1, *S), labelmap (N, C, *S)[, mask (N, 1, *S)]) -> the augmented pair (and
    mask, moved with zero padding; then the labels' foreground too) (a new random affine per case).

    cfg: {translation_voxels, rotation_degrees, scale: [lo, hi], probability}. Translation is in voxels
    of the model grid: one range for every axis, or one per array axis. Rotation in degrees: one range
    (2D; 3D: the same about every axis), or one per array axis in 3D, about axes (0, 1, 2) of the
    (z, y, x) array, so [45, 0, 0] turns the slices in-plane only (anisotropic cine MRI). seed: seeds
    MONAI's own random state (which the global seeds do not reach), so the same seed gives the same
    augmentation. The function's attribute ``random_states`` holds those states (numpy RandomStates of
    RandAffine and of its RandAffineGrid), which checkpoints store so that a resumed run draws the same
    affines. Raises ConfigError for a per-axis
    list of the wrong length."""
    rot = _per_axis(cfg["rotation_degrees"], 1 if ndim == 2 else 3, "rotation_degrees")
    rot = tuple(math.radians(r) for r in rot)
    lo, hi = cfg["scale"]
    tr = _per_axis(cfg["translation_voxels"], ndim, "translation_voxels")
    rand = RandAffine(
        prob=float(cfg.get("probability", 1.0)),
        rotate_range=rot,
        translate_range=tr,
        scale_range=((lo - 1.0, hi - 1.0),) * ndim,
        mode="bilinear",
        padding_mode="border",
    )
    if seed is not None:
        rand.set_random_state(seed=int(seed))

    def augment(image: torch.Tensor, labelmap: torch.Tensor, mask: torch.Tensor | None = None):
        both = torch.cat([image, labelmap], dim=1)
        if mask is None:
            out = torch.stack([_plain(rand(x)) for x in both])
            return out[:, :1].contiguous(), out[:, 1:].contiguous()
        # With a field-of-view mask, the same affine moves the foreground labels and the mask with zero
        # padding (no anatomy and no scan enter from outside), and the background channel is 1 - the rest.
        fg = torch.cat([labelmap[:, 1:], mask], dim=1)
        outs, moved = [], []
        for x, y in zip(image, fg):
            outs.append(_plain(rand(x)))
            moved.append(_plain(rand(y, randomize=False, padding_mode="zeros")))
        out, moved = torch.stack(outs), torch.stack(moved)
        lab = moved[:, :-1]
        lab = torch.cat([(1.0 - lab.sum(1, keepdim=True)).clamp(0.0, 1.0), lab], dim=1)
        return out[:, :1].contiguous(), lab.contiguous(), moved[:, -1:].contiguous()

    augment.random_states = (rand.R, rand.rand_affine_grid.R)
    return augment


def _per_axis(value, n: int, key: str) -> tuple[float, ...]:
    """A number, repeated n times, or a list of n numbers; ValueError naming `key` otherwise."""
    if isinstance(value, (int, float)):
        return (float(value),) * n
    values = tuple(float(v) for v in value)
    if len(values) != n:
        raise ConfigError(f"training.augmentation.{key}", f"expected one number or a list of {n}, got {list(value)}")
    return values


def _plain(x) -> torch.Tensor:
    """MONAI returns MetaTensors; strip the metadata so Lightning and autograd see plain tensors."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
