"""DeepATLAS coordinate maps: the conventions shared by the network, the warps, the losses and the
template (Chang, "DeepATLAS: One-Shot Localization for Biomedical Data", Secs. 2.1 and 5.2.2).

A *coordinate map* ``c`` of an exam is the network's output ``c_n = F(x_n)`` (Sec. 2.1): for every
voxel of the exam, the point of the learned template space C it shows.

* Shape ``(N, D, *spatial)``, channel-first like atlasreg's vector fields, spatial dims in array order
  ``(z, y, x)`` / ``(y, x)`` (docs/architecture.md). Channel ``k`` is the template coordinate along
  template axis ``k`` in **ITK order** ``(x, y[, z])``: channel 0 varies along the last array axis of
  the template. This is the order ``torch.nn.functional.grid_sample`` reads in the last dimension of
  its grid, so ``c.movedim(1, -1)`` samples a template tensor directly.
* Values are **normalised template coordinates in [-1, 1]** (the shared tanh head, Sec. 2.2.1) with
  **corner alignment** (``align_corners=True``, Sec. 5.2.2): -1 and +1 are the *centres* of the first
  and last voxels of any tensor on the template (the atlas X, a template mask M), whatever its size.
  This is the one place where DeepATLAS differs from the rest of atlasreg, which samples with
  ``align_corners=False`` (-1 and +1 the outer faces of the corner voxels; :mod:`atlasreg.spatial.grid`).
  Why: the paper's resampler preserves corners (5.2.2), and only with corner alignment is linear
  resampling of a coordinate map exact for the identity map at every resolution (the identity of an
  ``n``-voxel axis is ``linspace(-1, 1, n)``, a linear function that linear interpolation reproduces
  exactly), which is what lets each resolution's head refine the previous one as a residual (2.2.1).
  :func:`coordinates_to_world` converts to atlasreg's world coordinates on a :class:`Grid`.
* The *exam's own* normalised coordinates ``u`` use the same convention on the exam's grid: voxel
  index ``i`` along an axis of ``n`` voxels is at ``u = 2 i / (n - 1) - 1``. A warp between exams
  (the implicit warp Phi_I, Eqs. 5-7) is a map of such points, stored like a coordinate map.
* The identity coordinate map (:func:`identity_coordinates`) labels every exam voxel with its own
  normalised position: the exam *is* the template.

Jacobians (:func:`jacobian`) are derivatives of ``c`` (template-normalised units) with respect to the
exam's normalised coordinates ``u``, by central differences (one-sided at the borders): dimensionless,
the identity matrix for the identity map at any grid size. The DeepATLAS losses that use them are
invariant to a per-axis rescaling of ``u`` (voxels, mm, normalised units give the same loss; see
:func:`atlasreg.deepatlas.losses.smoothness_loss`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..spatial.grid import Grid

__all__ = ["check_coordinates", "identity_coordinates", "sample_at", "resize", "jacobian",
           "coordinates_to_world", "world_to_coordinates", "normalised_to_voxels"]

_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


def check_coordinates(c: torch.Tensor, name: str = "coordinate map") -> int:
    """Validate a coordinate map ``(N, D, *spatial)`` with D = 2 or 3 spatial dims and D channels;
    returns D. Raises ValueError naming `name` otherwise."""
    d = c.dim() - 2
    if d not in (2, 3) or c.shape[1] != d:
        raise ValueError(f"{name} must be (N, D, *spatial) with D = 2 or 3 channels and spatial dims, "
                         f"got shape {tuple(c.shape)}")
    return d


def identity_coordinates(size: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """The identity coordinate map of a grid of `size` (array order): ``(1, D, *size)``, channel k the
    normalised position (corner-aligned, [-1, 1]) along ITK axis k. Raises ValueError for a size that is
    not 2D/3D or an axis of fewer than 2 voxels (a corner-aligned axis needs two corners)."""
    size = tuple(int(n) for n in size)
    if len(size) not in (2, 3) or any(n < 2 for n in size):
        raise ValueError(f"a coordinate map needs a 2D or 3D size with >= 2 voxels per axis, got {size}")
    axes = [torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) for n in size]  # array order
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(list(reversed(mesh)), dim=0).unsqueeze(0)  # channels in ITK order


def sample_at(image: torch.Tensor, c: torch.Tensor, mode: str = "bilinear",
              padding: str = "border") -> torch.Tensor:
    """Sample `image` (N or 1, C, *size_t), a tensor on the template (or on an exam), at the points of a
    coordinate map `c` (N, D, *spatial): returns ``(N, C, *spatial)``, ``image o c``.

    Linear interpolation (``mode='bilinear'``, which is trilinear in 3D) with corner alignment
    (5.2.2); ``padding`` ('border', 'zeros', 'reflection') outside [-1, 1]. Differentiable in both
    `image` and `c`. Raises ValueError if the dimensions disagree.
    """
    d = check_coordinates(c)
    if image.dim() != d + 2:
        raise ValueError(f"image of shape {tuple(image.shape)} is not (N, C, *spatial) with {d} spatial dims")
    n = c.shape[0]
    if image.shape[0] not in (1, n):
        raise ValueError(f"image batch {image.shape[0]} does not match the coordinate batch {n}")
    if image.shape[0] != n:
        image = image.expand(n, *image.shape[1:])
    return F.grid_sample(image, c.movedim(1, -1), mode=mode, padding_mode=padding, align_corners=True)


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Linear resampling of a tensor (N, C, *spatial) to `size` (array order) over the same corner-
    aligned field of view: the parameterless resampler of Sec. 5.2.2, used for down- and upsampling in
    the networks and to bring a coarse coordinate map to full resolution (5.2.3). Exact for the
    identity coordinate map (a linear function). Returns x itself when the size already matches."""
    size = tuple(int(n) for n in size)
    if tuple(x.shape[2:]) == size:
        return x
    return F.interpolate(x, size=size, mode=_LINEAR[x.dim() - 2], align_corners=True)


def jacobian(c: torch.Tensor) -> torch.Tensor:
    """Local Jacobian matrices of a coordinate map (or of any point map stored like one).

    c: (N, D, *spatial). Returns ``(N, *spatial, D, D)`` with ``J[..., i, j] = d c_i / d u_j``: the
    derivative of template coordinate i (ITK order) along the exam's normalised axis j (ITK order,
    spacing ``2 / (n_j - 1)``), by central differences, one-sided at the borders (``torch.gradient``).
    Dimensionless; exactly the identity for :func:`identity_coordinates`. Raises ValueError for a
    malformed map or an axis of fewer than 2 voxels.
    """
    d = check_coordinates(c)
    if any(n < 2 for n in c.shape[2:]):
        raise ValueError(f"a Jacobian needs >= 2 voxels per axis, got spatial shape {tuple(c.shape[2:])}")
    cols = []
    for j in range(d):  # ITK axis j is array dim 2 + d - 1 - j
        dim = 2 + d - 1 - j
        cols.append(torch.gradient(c, spacing=2.0 / (c.shape[dim] - 1), dim=dim)[0])
    return torch.stack(cols, dim=-1).movedim(1, -2)  # (N, *spatial, i, j)


def coordinates_to_world(points: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Corner-aligned normalised points (..., D), ITK order, on `grid` -> world points (..., D) in mm.

    Normalised -1 / +1 are the centres of the grid's first / last voxels along each axis, so a point
    ``p`` is at grid-centred offset ``p (n - 1) s / 2`` (n voxels of spacing s), then placed by the
    grid's centre and direction (:meth:`Grid.centred_to_world`). Use the template's grid (e.g. the
    atlas's, :meth:`Grid.centred`) for template coordinates and an exam's grid for exam positions.
    """
    half = torch.tensor([(n - 1) * s / 2.0 for n, s in zip(grid.size_xyz, grid.spacing)],
                        device=points.device, dtype=points.dtype)
    return grid.centred_to_world(points * half)


def world_to_coordinates(points: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Inverse of :func:`coordinates_to_world`: world points (..., D) mm -> corner-aligned normalised
    points on `grid`. Raises ValueError for a grid with a single voxel along an axis."""
    if any(n < 2 for n in grid.size):
        raise ValueError(f"corner-aligned coordinates need >= 2 voxels per axis, grid size {grid.size}")
    half = torch.tensor([(n - 1) * s / 2.0 for n, s in zip(grid.size_xyz, grid.spacing)],
                        device=points.device, dtype=points.dtype)
    return grid.world_to_centred(points) / half


def normalised_to_voxels(u: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Differences of corner-aligned normalised coordinates, channel-first (N, D, *spatial) in ITK order,
    -> voxels of a grid of `size` (array order): component k times ``(n_k - 1) / 2``."""
    d = len(size)
    scale = torch.tensor([(n - 1) / 2.0 for n in reversed(tuple(size))], device=u.device, dtype=u.dtype)
    return u * scale.view(1, d, *[1] * (u.dim() - 2))
