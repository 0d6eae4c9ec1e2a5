"""Image geometry and coordinate conventions.

One convention throughout atlasreg (documented in docs/architecture.md):

* Tensors are ``(N, C, *spatial)`` with spatial dims in array order ``(z, y, x)`` / ``(y, x)``, as
  ``SimpleITK.GetArrayFromImage`` returns them.
* Points and vector fields carry their components in ITK order ``(x, y[, z])``, as
  ``torch.nn.functional.grid_sample`` expects in its last dimension. Vector fields are stored
  channel-first ``(N, D, *spatial)``, point sets channel-last ``(N, *spatial, D)``.
* Inside the models, coordinates are *grid-centred world coordinates*: millimetres (world units)
  along the image axes, with the origin at the centre of the field of view. A world point is
  ``centre + direction @ p``. Since ``direction`` is orthonormal, lengths and the regulariser are the
  same in both frames; only written displacement fields are rotated into world axes.
* Sampling uses ``align_corners=False``: a grid of ``n`` voxels of spacing ``s`` spans
  ``[-n s / 2, n s / 2]`` and normalised coordinates are ``p / (n s / 2)``. Resampling to another
  size with the same field of view keeps the voxel centres consistent (as ITK does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class Grid:
    """Sampling grid of an image: size (array order), spacing, origin and direction (ITK order).

    ``size``: voxels per spatial dim in array order, e.g. (H, W) or (D, H, W).
    ``spacing``/``origin``: world units (mm) in ITK order (x, y[, z]).
    ``direction``: row-major D x D direction cosine matrix (ITK convention).
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...] | None = None
    direction: tuple[float, ...] | None = None

    def __post_init__(self):
        d = len(self.size)
        if d not in (2, 3):
            raise ValueError(f"Grid must be 2D or 3D, got size {self.size}")
        if len(self.spacing) != d:
            raise ValueError(f"spacing {self.spacing} does not match size {self.size}")
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be positive, got {self.spacing}")
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        if self.origin is None:
            object.__setattr__(self, "origin", (0.0,) * d)
        if self.direction is None:
            object.__setattr__(self, "direction", tuple(np.eye(d).ravel().tolist()))

    @property
    def ndim(self) -> int:
        return len(self.size)

    @property
    def size_xyz(self) -> tuple[int, ...]:
        return tuple(reversed(self.size))

    @property
    def half_extent(self) -> tuple[float, ...]:
        """Half the field of view per axis, ITK order (x, y[, z]), in world units."""
        return tuple(n * s / 2.0 for n, s in zip(self.size_xyz, self.spacing))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(self.ndim, self.ndim)

    @property
    def centre(self) -> np.ndarray:
        """World coordinates of the centre of the field of view."""
        offset = np.asarray(self.spacing) * (np.asarray(self.size_xyz) - 1) / 2.0
        return np.asarray(self.origin) + self.direction_matrix @ offset

    @classmethod
    def from_sitk(cls, image) -> "Grid":
        return cls(
            size=tuple(reversed(image.GetSize())),
            spacing=image.GetSpacing(),
            origin=image.GetOrigin(),
            direction=image.GetDirection(),
        )

    def copy_information_to(self, image) -> None:
        """Set spacing, origin and direction of a SimpleITK image (same size) to this grid's."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    def resampled(self, size: Sequence[int], spacing: Sequence[float]) -> "Grid":
        """Grid of the given size (array order) and spacing (ITK order), same centre and direction."""
        new = Grid(tuple(size), tuple(spacing), (0.0,) * self.ndim, self.direction)
        offset = np.asarray(new.spacing) * (np.asarray(new.size_xyz) - 1) / 2.0
        origin = self.centre - self.direction_matrix @ offset
        return Grid(new.size, new.spacing, tuple(origin.tolist()), self.direction)


def identity_points(size: Sequence[int], spacing: Sequence[float], device=None,
                    dtype=torch.float32) -> torch.Tensor:
    """Grid-centred world coordinates of the voxel centres.

    size: array order; spacing: ITK order (mm). Returns (1, *size, D) with components (x, y[, z]).
    """
    d = len(size)
    size_xyz = list(reversed(size))
    axes = [
        (torch.arange(n, device=device, dtype=dtype) - (n - 1) / 2.0) * s
        for n, s in zip(size_xyz, spacing)
    ]
    mesh = torch.meshgrid(*reversed(axes), indexing="ij")  # array order (z, y, x)
    return torch.stack(list(reversed(mesh)), dim=-1).unsqueeze(0).reshape(1, *size, d)


def half_extent_tensor(size: Sequence[int], spacing: Sequence[float], device=None,
                       dtype=torch.float32) -> torch.Tensor:
    """(D,) tensor of n * s / 2 in ITK order for a grid of `size` (array order), `spacing` (ITK)."""
    return torch.tensor([n * s / 2.0 for n, s in zip(reversed(size), spacing)],
                        device=device, dtype=dtype)
