"""Transforms of Atlas-ISTN as pure functions (paper Sec. 2.1-2.2, Eqs. 1-3 and 6-8).

Conventions are those of :mod:`atlasreg.spatial.grid`: grid-centred world coordinates (mm), point
components in ITK order (x, y[, z]), ``align_corners=False``. A transform is represented by the point
map it induces on a grid: ``points[n, i, j, :] = Phi(x_ij)``; warping an image ``I`` by it gives
``I o Phi``. No function here keeps state; :class:`SpatialTransform` is a plain value returned by the STN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .grid import half_extent_tensor, identity_points

_INTERP = {2: "bilinear", 3: "trilinear"}


def _check_field(v: torch.Tensor, spacing: Sequence[float]) -> int:
    d = v.dim() - 2
    if d not in (2, 3) or v.shape[1] != d:
        raise ValueError(f"expected a vector field (N, D, *spatial) with D = 2 or 3, got {tuple(v.shape)}")
    if len(spacing) != d:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {d}D field")
    return d


def sample(image: torch.Tensor, points: torch.Tensor, spacing: Sequence[float],
           mode: str = "bilinear", padding: str = "border") -> torch.Tensor:
    """Sample ``image`` at grid-centred world ``points``.

    image: (N, C, *spatial_in) on a grid with `spacing` (ITK order, mm), centred at 0.
    points: (N or 1, *spatial_out, D) world coordinates (x, y[, z]).
    Returns (N, C, *spatial_out). mode: 'bilinear' (linear in 2D and 3D) or 'nearest'.
    """
    d = image.dim() - 2
    if points.shape[-1] != d:
        raise ValueError(f"points have {points.shape[-1]} components, image is {d}D")
    if points.shape[0] != image.shape[0]:
        points = points.expand(image.shape[0], *points.shape[1:])
    half = half_extent_tensor(image.shape[2:], spacing, device=points.device, dtype=points.dtype)
    return _grid_sample(image, points / half, mode, padding)


def _grid_sample(image: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear",
                 padding: str = "border") -> torch.Tensor:
    """grid_sample with this module's convention (align_corners=False); grid in [-1, 1] units."""
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding, align_corners=False)


def warp(image: torch.Tensor, points: torch.Tensor, spacing: Sequence[float],
         mode: str = "bilinear", padding: str = "border") -> torch.Tensor:
    """Warp an image or one-hot labelmap: returns ``image o Phi`` with Phi given by ``points``.

    One-hot labelmaps are warped channel by channel with linear interpolation (paper Sec. 2.2);
    the result stays a partition of unity. Shapes as in :func:`sample`.
    """
    return sample(image, points, spacing, mode=mode, padding=padding)


def field_to_points(u: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Identity plus displacement. u: (N, D, *spatial) mm. Returns (N, *spatial, D) points."""
    _check_field(u, spacing)
    ident = identity_points(u.shape[2:], spacing, device=u.device, dtype=u.dtype)
    return ident + u.movedim(1, -1)


def scaling_and_squaring(v: torch.Tensor, spacing: Sequence[float], steps: int = 6) -> torch.Tensor:
    """Exponential of an SVF by scaling and squaring (Arsigny 2006; Atlas-ISTN Eqs. 2-3).

    v: (N, D, *spatial) velocity in world units (mm), components (x, y[, z]), on a grid of
    `spacing` (ITK order, mm). Returns the displacement u of phi = exp(v), phi(x) = x + u(x), same
    shape and units. The inverse phi^-1 = exp(-v) is ``scaling_and_squaring(-v, ...)``.
    Raises ValueError for a malformed field or negative `steps`.
    """
    _check_field(v, spacing)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    # Integrated in grid_sample's normalised units ([-1, 1] over the field of view, per axis), which
    # equals `u = u + sample(u, ident + u, spacing)` in mm but saves a rescaling of the points at
    # every squaring.
    d = v.dim() - 2
    half = half_extent_tensor(v.shape[2:], spacing, device=v.device, dtype=v.dtype)
    scale = half.view(1, d, *[1] * d)
    ident = identity_points(v.shape[2:], spacing, device=v.device, dtype=v.dtype) / half
    u = v / (scale * 2 ** steps)
    for _ in range(steps):
        u = u + _grid_sample(u, ident + u.movedim(1, -1))
    return u * scale


def resize_field(u: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Linear resampling of a displacement field to `size` (array order) over the same field of
    view. Values are world units and stay unchanged (no rescaling needed, unlike voxel units)."""
    d = u.dim() - 2
    return F.interpolate(u, size=tuple(size), mode=_INTERP[d], align_corners=False)


def half_resolution(size: Sequence[int], spacing: Sequence[float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Size (array order) and spacing (ITK order) of the half-resolution grid with the same field of
    view, on which the STN predicts the SVF (paper Sec. 2.2, 'Other practicalities')."""
    half = tuple(max(1, n // 2) for n in size)
    sp = tuple(s * n / h for s, n, h in zip(spacing, reversed(size), reversed(half)))
    return half, sp


# ---------------------------------------------------------------- affine (Eq. 1)

def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices from angles in radians. angles: (N, 1) in 2D, (N, 3) Euler angles about
    x, y, z in 3D (R = Rz Ry Rx). Returns (N, D, D) acting on (x, y[, z]) components."""
    if angles.shape[-1] == 1:
        c, s = torch.cos(angles[:, 0]), torch.sin(angles[:, 0])
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    if angles.shape[-1] != 3:
        raise ValueError(f"angles must be (N, 1) or (N, 3), got {tuple(angles.shape)}")
    one, zero = torch.ones_like(angles[:, 0]), torch.zeros_like(angles[:, 0])
    cx, sx = torch.cos(angles[:, 0]), torch.sin(angles[:, 0])
    cy, sy = torch.cos(angles[:, 1]), torch.sin(angles[:, 1])
    cz, sz = torch.cos(angles[:, 2]), torch.sin(angles[:, 2])
    rx = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, cx, -sx], -1),
                      torch.stack([zero, sx, cx], -1)], -2)
    ry = torch.stack([torch.stack([cy, zero, sy], -1), torch.stack([zero, one, zero], -1),
                      torch.stack([-sy, zero, cy], -1)], -2)
    rz = torch.stack([torch.stack([cz, -sz, zero], -1), torch.stack([sz, cz, zero], -1),
                      torch.stack([zero, zero, one], -1)], -2)
    return rz @ ry @ rx


def affine_trs(translation: torch.Tensor, angles: torch.Tensor, log_scale: torch.Tensor):
    """Affine T = M_t R_theta D_s without shear (Atlas-ISTN Eq. 1): T(x) = R diag(exp(log_scale)) x + t.

    translation: (N, D) mm; angles: (N, 1) or (N, 3) radians; log_scale: (N, D).
    Returns (A, t) with A (N, D, D), t (N, D), in grid-centred world coordinates.
    """
    scale = torch.diag_embed(torch.exp(log_scale))
    return rotation_matrix(angles) @ scale, translation


def apply_affine(A: torch.Tensor, t: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """T(p) = A p + t for points (N or 1, *spatial, D). Returns (N, *spatial, D)."""
    n, d = A.shape[0], A.shape[-1]
    flat = points.reshape(points.shape[0], -1, d).expand(n, -1, -1)
    out = flat @ A.transpose(1, 2) + t[:, None, :]
    return out.reshape(n, *points.shape[1:])


def invert_affine(A: torch.Tensor, t: torch.Tensor):
    """Inverse of T(x) = A x + t: (A^-1, -A^-1 t)."""
    A_inv = torch.linalg.inv(A)
    return A_inv, -(A_inv @ t.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------- composition (Eqs. 6-8)

@dataclass
class SpatialTransform:
    """Phi = T o phi and Phi^-1 = phi^-1 o T^-1 on one grid (Atlas-ISTN Eqs. 7-8).

    Phi maps atlas space to subject space: ``y_i o Phi`` is the subject in atlas space (Eq. 12) and
    ``y^a o Phi^-1`` the atlas in subject space (Eq. 11). Fields:
      A, t: affine part, (N, D, D) and (N, D) in mm, or None for no affine part;
      u, u_inv: displacements of phi and phi^-1, (N, D, *spatial) mm, or None for no SVF part;
      u_half: displacement of phi at the SVF resolution (what the regulariser acts on, Eq. 13);
      size, spacing: the grid (array order / ITK order mm) the fields live on;
      has_inverse: False when composed without Phi^-1 (``compose_transform(..., inverse=False)``).
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    A: torch.Tensor | None = None
    t: torch.Tensor | None = None
    u: torch.Tensor | None = None
    u_inv: torch.Tensor | None = None
    u_half: torch.Tensor | None = None
    spacing_half: tuple[float, ...] | None = None
    has_inverse: bool = True

    def _identity(self, like: torch.Tensor | None) -> torch.Tensor:
        ref = like if like is not None else self.A
        return identity_points(self.size, self.spacing, device=ref.device, dtype=ref.dtype)

    @property
    def batch_size(self) -> int:
        return (self.u if self.u is not None else self.A).shape[0]

    def forward_points(self) -> torch.Tensor:
        """Phi(x) = T(x + u(x)) for every grid point x. Returns (N, *size, D) mm."""
        pts = self._identity(self.u)
        if self.u is not None:
            pts = pts + self.u.movedim(1, -1)
        if self.A is not None:
            pts = apply_affine(self.A, self.t, pts)
        return pts.expand(self.batch_size, *pts.shape[1:])

    def inverse_points(self) -> torch.Tensor:
        """Phi^-1(x) = y + u_inv(y), y = T^-1(x). Returns (N, *size, D) mm.
        Raises ValueError if the transform was composed without its inverse."""
        if not self.has_inverse:
            raise ValueError("this transform was composed without its inverse (inverse=False)")
        pts = self._identity(self.u)
        if self.A is not None:
            A_inv, t_inv = invert_affine(self.A, self.t)
            pts = apply_affine(A_inv, t_inv, pts)
        if self.u_inv is not None:
            pts = pts + sample(self.u_inv, pts, self.spacing, padding="border").movedim(1, -1)
        return pts.expand(self.batch_size, *pts.shape[1:])


def compose_transform(v_half: torch.Tensor | None, A: torch.Tensor | None, t: torch.Tensor | None,
                      size: Sequence[int], spacing: Sequence[float], steps: int = 6,
                      inverse: bool = True) -> SpatialTransform:
    """Transformation computation module C(v, T) of Atlas-ISTN (Eq. 6, Fig. 4).

    v_half: SVF (N, D, *half_size) mm on the half-resolution grid of (size, spacing), or None;
    A, t: affine part or None. The SVF is integrated by scaling and squaring at half resolution
    (both exp(v) and exp(-v)), then linearly upsampled to `size`. Returns a SpatialTransform.
    inverse=False skips exp(-v) and the affine inverse, for callers that only warp subjects to the
    atlas (the atlas update, Eq. 16); the result's inverse_points() then raises ValueError.
    """
    size = tuple(size)
    spacing = tuple(float(s) for s in spacing)
    if v_half is None and A is None:
        raise ValueError("a transform needs an SVF, an affine part, or both")
    tr = SpatialTransform(size=size, spacing=spacing, A=A, t=t, has_inverse=inverse)
    if v_half is not None:
        _, sp_half = half_resolution(size, spacing)
        if tuple(v_half.shape[2:]) != half_resolution(size, spacing)[0]:
            raise ValueError(f"SVF of size {tuple(v_half.shape[2:])} is not at half resolution of {size}")
        u_half = scaling_and_squaring(v_half, sp_half, steps)
        tr.u_half, tr.spacing_half = u_half, sp_half
        tr.u = resize_field(u_half, size)
        if inverse:
            tr.u_inv = resize_field(scaling_and_squaring(-v_half, sp_half, steps), size)
    return tr


# ---------------------------------------------------------------- Jacobian

def jacobian_determinant(points: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Jacobian determinant of a point map by central finite differences (one-sided at borders).

    points: (N, *spatial, D) mm on a grid of `spacing` (ITK order). Returns (N, *spatial);
    1 everywhere for the identity, <= 0 where the map folds.
    """
    d = points.shape[-1]
    if points.dim() != d + 2 or len(spacing) != d:
        raise ValueError(f"points must be (N, *spatial, D) matching spacing, got {tuple(points.shape)}")
    cols = []
    for j in range(d):  # derivative along x_j, which is array dim (d - j) of (N, *spatial, D)
        dim = d - j
        cols.append(torch.gradient(points, spacing=float(spacing[j]), dim=dim)[0])
    jac = torch.stack(cols, dim=-1)  # (..., i, j) = d p_i / d x_j
    return torch.linalg.det(jac)

