"""Image geometry and coordinate conventions: one :class:`Grid` for images and for the model grid.

One convention throughout atlasreg (documented in docs/architecture.md):

* Tensors are ``(N, C, *spatial)`` with spatial dims in array order ``(z, y, x)`` / ``(y, x)``, as
  ``SimpleITK.GetArrayFromImage`` returns them.
* Points and vector fields carry their components in ITK order ``(x, y[, z])``, as
  ``torch.nn.functional.grid_sample`` expects in its last dimension. Vector fields are stored
  channel-first ``(N, D, *spatial)``, point sets channel-last ``(N, *spatial, D)``.
* Points are **world coordinates** (mm, ITK's physical space): voxel index ``i`` (ITK order) of a grid
  lies at ``origin + direction @ (spacing * i)``.
* The model grid (and the saved atlas) is :meth:`Grid.centred`: centre at the world origin, identity
  direction. Each case is resampled onto ``case_grid.resampled(model size, model spacing)``, which
  shares the case's centre and direction, so a case's *frame* (:meth:`Grid.frame`, a rigid map
  ``x -> centre + direction @ x``) carries model (atlas) coordinates to the case's world coordinates.
* Sampling uses ``align_corners=False``: a grid of ``n`` voxels of spacing ``s`` spans
  ``n s`` around its centre, and the normalised coordinate of a point is its offset from the centre
  along the grid axes divided by ``n s / 2`` (:meth:`Grid.world_to_normalised`), as ITK places
  voxel centres.
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
    ``direction``: row-major D x D direction cosine matrix (ITK convention), orthonormal.
    Raises ValueError for a size that is not 2D/3D, a spacing or origin of the wrong length, a
    non-positive spacing or a direction of the wrong size.
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...] | None = None
    direction: tuple[float, ...] | None = None

    def __post_init__(self):
        d = len(self.size)
        if d not in (2, 3):
            raise ValueError(f"Grid must be 2D or 3D, got size {tuple(self.size)}")
        if len(self.spacing) != d:
            raise ValueError(f"spacing {tuple(self.spacing)} does not match size {tuple(self.size)}")
        if any(float(s) <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be positive, got {tuple(self.spacing)}")
        if any(int(n) < 1 for n in self.size):
            raise ValueError(f"size must be positive, got {tuple(self.size)}")
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        origin = (0.0,) * d if self.origin is None else tuple(float(o) for o in self.origin)
        direction = (tuple(np.eye(d).ravel().tolist()) if self.direction is None
                     else tuple(float(x) for x in np.asarray(self.direction, dtype=np.float64).ravel()))
        if len(origin) != d:
            raise ValueError(f"origin {origin} does not match size {self.size}")
        if len(direction) != d * d:
            raise ValueError(f"direction has {len(direction)} entries, expected {d * d}")
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)
        # Cached (not a field): sampling on the model grid takes a fast path that skips the frame.
        object.__setattr__(self, "_centred", bool(np.all(self.centre == 0.0))
                           and bool(np.all(self.direction_matrix == np.eye(d))))

    # ---------------------------------------------------------------- construction
    @classmethod
    def centred(cls, size: Sequence[int], spacing: Sequence[float]) -> "Grid":
        """Grid of `size` (array order) and `spacing` (ITK order, mm) centred at the world origin with
        identity direction: the model grid and the saved atlas's grid. Its world coordinates equal its
        grid-centred coordinates."""
        size = tuple(int(s) for s in size)
        offset = np.asarray(spacing, dtype=np.float64) * (np.asarray(size[::-1]) - 1) / 2.0
        return cls(size, tuple(spacing), tuple((-offset).tolist()), None)

    @classmethod
    def from_sitk(cls, image) -> "Grid":
        """The grid of a SimpleITK image (size, spacing, origin, direction)."""
        return cls(size=tuple(reversed(image.GetSize())), spacing=image.GetSpacing(),
                   origin=image.GetOrigin(), direction=image.GetDirection())

    def to_dict(self) -> dict:
        """Plain-Python form (YAML/JSON/checkpoint safe); :meth:`from_dict` reads it back."""
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        return cls(tuple(d["size"]), tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]))

    def copy_information_to(self, image) -> None:
        """Set spacing, origin and direction of a SimpleITK image (same size) to this grid's."""
        if tuple(image.GetSize()) != self.size_xyz:
            raise ValueError(f"image size {image.GetSize()} differs from the grid's {self.size_xyz}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    def reference_image(self):
        """An empty SimpleITK image with this geometry (the reference grid of ``sitk.Resample``)."""
        import SimpleITK as sitk

        img = sitk.Image(list(self.size_xyz), sitk.sitkUInt8)
        self.copy_information_to(img)
        return img

    # ---------------------------------------------------------------- properties
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
        """World coordinates of the centre of the field of view, (D,) float64."""
        offset = np.asarray(self.spacing) * (np.asarray(self.size_xyz) - 1) / 2.0
        return np.asarray(self.origin) + self.direction_matrix @ offset

    @property
    def is_centred(self) -> bool:
        """True if the centre is exactly the world origin and the direction the identity (as for
        :meth:`centred`); world and grid-centred coordinates then coincide."""
        return self._centred

    def same_frame(self, other: "Grid", tol: float = 1e-6) -> bool:
        """True if both grids share centre (within `tol` mm) and direction (within `tol`)."""
        return (self.ndim == other.ndim and np.allclose(self.centre, other.centre, atol=tol, rtol=0)
                and np.allclose(self.direction_matrix, other.direction_matrix, atol=tol, rtol=0))

    def frame(self) -> tuple[np.ndarray, np.ndarray]:
        """(R, c): the rigid map ``x -> c + R x`` from grid-centred to world coordinates (float64)."""
        return self.direction_matrix, self.centre

    # ---------------------------------------------------------------- derived grids
    def resampled(self, size: Sequence[int], spacing: Sequence[float]) -> "Grid":
        """Grid of the given size (array order) and spacing (ITK order), same centre and direction."""
        new = Grid(tuple(size), tuple(spacing), None, self.direction)
        offset = np.asarray(new.spacing) * (np.asarray(new.size_xyz) - 1) / 2.0
        origin = self.centre - self.direction_matrix @ offset
        return Grid(new.size, new.spacing, tuple(origin.tolist()), self.direction)

    def resize(self, size: Sequence[int]) -> "Grid":
        """Grid of `size` (array order) over the same field of view (spacing scaled), same centre."""
        size = tuple(int(s) for s in size)
        if len(size) != self.ndim:
            raise ValueError(f"size {size} does not match a {self.ndim}D grid")
        spacing = tuple(s * n / m for s, n, m in zip(self.spacing, self.size_xyz, reversed(size)))
        return self.resampled(size, spacing)

    def downsample(self, factor: int = 2) -> "Grid":
        """The grid of ``max(1, n // factor)`` voxels per axis over the same field of view (the STN's
        half-resolution SVF grid for factor 2, Atlas-ISTN Sec. 2.2)."""
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        return self.resize(tuple(max(1, n // factor) for n in self.size))

    def crop_or_pad(self, size: Sequence[int]) -> "Grid":
        """Grid of `size` (array order) with the same spacing, centre and direction: a crop where
        `size` is smaller, a pad where it is larger."""
        return self.resampled(size, self.spacing)

    # ---------------------------------------------------------------- coordinates
    def points(self, device=None, dtype=torch.float32, centred: bool = False) -> torch.Tensor:
        """World coordinates of the voxel centres, (1, *size, D), components (x, y[, z]) in mm.
        centred=True gives grid-centred coordinates instead (offsets from the centre along the grid
        axes), which equal world coordinates for a :meth:`centred` grid."""
        pts = _centred_points(self.size, self.spacing, device, dtype)
        if centred or self.is_centred:
            return pts
        R = torch.as_tensor(self.direction_matrix, device=device, dtype=dtype)
        c = torch.as_tensor(self.centre, device=device, dtype=dtype)
        return pts @ R.T + c

    def world_to_centred(self, points: torch.Tensor) -> torch.Tensor:
        """World points (..., D) -> grid-centred coordinates (..., D)."""
        if self.is_centred:
            return points
        R = torch.as_tensor(self.direction_matrix, device=points.device, dtype=points.dtype)
        c = torch.as_tensor(self.centre, device=points.device, dtype=points.dtype)
        return (points - c) @ R

    def centred_to_world(self, points: torch.Tensor) -> torch.Tensor:
        """Grid-centred coordinates (..., D) -> world points (..., D)."""
        if self.is_centred:
            return points
        R = torch.as_tensor(self.direction_matrix, device=points.device, dtype=points.dtype)
        c = torch.as_tensor(self.centre, device=points.device, dtype=points.dtype)
        return points @ R.T + c

    def half_extent_tensor(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """(D,) tensor of n s / 2 per axis, ITK order."""
        return torch.tensor(self.half_extent, device=device, dtype=dtype)

    def world_to_normalised(self, points: torch.Tensor, centred: bool = False) -> torch.Tensor:
        """World points (..., D) -> grid_sample's normalised coordinates (align_corners=False): -1 and
        1 are the outer faces of the first and last voxels. centred=True: the points are already
        grid-centred coordinates."""
        half = self.half_extent_tensor(points.device, points.dtype)
        return (points if centred else self.world_to_centred(points)) / half

    def normalised_to_world(self, points: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`world_to_normalised`."""
        return self.centred_to_world(points * self.half_extent_tensor(points.device, points.dtype))

    def index_to_world(self, index: np.ndarray) -> np.ndarray:
        """Continuous voxel indices (..., D) in ITK order -> world points (..., D), float64."""
        index = np.asarray(index, dtype=np.float64)
        return np.asarray(self.origin) + (index * np.asarray(self.spacing)) @ self.direction_matrix.T

    def world_to_index(self, points):
        """World points (..., D) -> continuous voxel indices (..., D) in ITK order (voxel centres at
        integers). A NumPy array gives float64 NumPy, a tensor a tensor of its dtype (differentiable,
        e.g. for interpolating control points)."""
        if not isinstance(points, torch.Tensor):
            return self.world_to_index(torch.as_tensor(np.asarray(points, dtype=np.float64))).numpy()
        half = torch.tensor([(n - 1) / 2.0 for n in self.size_xyz], device=points.device, dtype=points.dtype)
        spacing = torch.tensor(self.spacing, device=points.device, dtype=points.dtype)
        return self.world_to_centred(points) / spacing + half

    def contains(self, points: torch.Tensor) -> torch.Tensor:
        """Boolean mask (...) of world points (..., D) inside the field of view."""
        return (self.world_to_normalised(points).abs() <= 1.0).all(dim=-1)


def _centred_points(size: Sequence[int], spacing: Sequence[float], device=None,
                    dtype=torch.float32) -> torch.Tensor:
    d = len(size)
    size_xyz = list(reversed(size))
    axes = [(torch.arange(n, device=device, dtype=dtype) - (n - 1) / 2.0) * s
            for n, s in zip(size_xyz, spacing)]
    mesh = torch.meshgrid(*reversed(axes), indexing="ij")  # array order (z, y, x)
    return torch.stack(list(reversed(mesh)), dim=-1).unsqueeze(0).reshape(1, *size, d)
