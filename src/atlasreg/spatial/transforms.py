"""Spatial transforms as frozen objects, and the pure functions under them (Atlas-ISTN Sec. 2.1-2.2,
Eqs. 1-3 and 6-8).

Conventions are those of :mod:`atlasreg.spatial.grid`: world coordinates (mm), point components in
ITK order (x, y[, z]), ``align_corners=False``. A transform is a batch of N maps of world points,
``T(x)``; warping an image ``I`` by it gives ``I o T`` (the value of I at ``T(x)`` for every output
point x), which is also ITK's resampling convention (``sitk.Resample`` maps output points to input
points). Every transform maps points (:meth:`Transform.points`), gives its point map on a grid
(:meth:`Transform.on_grid`), warps images and labelmaps (:meth:`Transform.warp`), gives its Jacobian
determinant (:meth:`Transform.jacobian_determinant`) and inverts where it can
(:meth:`Transform.inverse`). They keep no mutable state; parameters may be network outputs with
gradients. Export to and import from ITK files: :mod:`atlasreg.spatial.itk`.

The family:

* :class:`AffineTransform` ``x -> A x + t`` (general matrix, or TRS by :meth:`AffineTransform.from_trs`,
  Eq. 1); exact inverse.
* :class:`DisplacementField` ``x -> x + u(x)``, u a dense field on a :class:`Grid` (linear
  interpolation; border padding outside the field of view); no exact inverse.
* :class:`StationaryVelocityField` ``x -> exp(v)(x)`` by scaling and squaring (Eqs. 2-3), optionally
  upsampled to an output grid; exact inverse ``exp(-v)``.
* :class:`Composite` of any of these, applied in the order given; inverse where every part inverts.
  :func:`compose_transform` builds the Atlas-ISTN transform Phi = T o exp(v) (Eqs. 6-8) as an
  :class:`AffineSVFTransform`.

* :class:`BSplineTransform` ``x -> x + sum_k c_k B(x - p_k)``: a cubic B-spline free-form
  deformation on a control-point grid (Rueckert 1999), for instance optimisation; no exact inverse.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .grid import Grid

_INTERP = {2: "bilinear", 3: "trilinear"}


# ---------------------------------------------------------------- sampling

def _grid_sample(image: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear",
                 padding: str = "border") -> torch.Tensor:
    """grid_sample with this module's convention (align_corners=False); grid in [-1, 1] units."""
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding, align_corners=False)


def sample(image: torch.Tensor, points: torch.Tensor, grid: Grid, mode: str = "bilinear",
           padding: str = "border", centred: bool = False) -> torch.Tensor:
    """Sample ``image`` at world ``points``.

    image: (N, C, *grid.size) on `grid`. points: (N or 1, *spatial_out, D) world coordinates (x, y[, z])
    in mm, or grid-centred coordinates if `centred`; spatial_out may have any number of dims (a point
    list (N, P, D) too). Returns (N, C, *spatial_out). mode: 'bilinear'
    (linear in 2D and 3D) or 'nearest'; padding: 'border', 'zeros' or 'reflection' outside the field
    of view. Raises ValueError if the image does not match the grid or the points' dimension.
    """
    d = image.dim() - 2
    if points.shape[-1] != d:
        raise ValueError(f"points have {points.shape[-1]} components, image is {d}D")
    if tuple(image.shape[2:]) != grid.size:
        raise ValueError(f"image of spatial shape {tuple(image.shape[2:])} is not on the grid {grid.size}")
    if points.shape[0] != image.shape[0]:
        points = points.expand(image.shape[0], *points.shape[1:])
    if points.dim() != d + 2:  # a point set of any shape (N, ..., D): sampled as (N, P, 1[, 1], D)
        shape = points.shape[1:-1]
        flat = points.reshape(points.shape[0], -1, *[1] * (d - 1), d)
        out = _grid_sample(image, grid.world_to_normalised(flat, centred=centred), mode, padding)
        return out.reshape(*out.shape[:2], *shape)
    return _grid_sample(image, grid.world_to_normalised(points, centred=centred), mode, padding)


def warp(image: torch.Tensor, points: torch.Tensor, grid: Grid, mode: str = "bilinear",
         padding: str = "border") -> torch.Tensor:
    """Warp an image or one-hot labelmap on `grid`: returns ``image o T`` with T given by its `points`.

    One-hot labelmaps are warped channel by channel with linear interpolation (paper Sec. 2.2); the
    result stays a partition of unity. Shapes as in :func:`sample`.
    """
    return sample(image, points, grid, mode=mode, padding=padding)


def resample(tensor: torch.Tensor, source: Grid, target: Grid, mode: str = "bilinear",
             padding: str = "border") -> torch.Tensor:
    """Resample (N, C, *source.size) onto `target` (identity transform in world space).
    Returns (N, C, *target.size). Grids sharing centre and direction (a case's own grid and its model
    grid) are sampled in grid-centred coordinates, which is exact up to interpolation."""
    if source.same_frame(target):
        pts = target.points(tensor.device, tensor.dtype, centred=True)
        return sample(tensor, pts, source, mode, padding, centred=True)
    return sample(tensor, target.points(tensor.device, tensor.dtype), source, mode, padding)


def resize_field(u: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Linear resampling of a displacement field to `size` (array order) over the same field of
    view. Values are world units and stay unchanged (no rescaling needed, unlike voxel units)."""
    d = u.dim() - 2
    return F.interpolate(u, size=tuple(size), mode=_INTERP[d], align_corners=False)


def _check_field(v: torch.Tensor, grid: Grid) -> int:
    d = v.dim() - 2
    if d not in (2, 3) or v.shape[1] != d:
        raise ValueError(f"expected a vector field (N, D, *spatial) with D = 2 or 3, got {tuple(v.shape)}")
    if tuple(v.shape[2:]) != grid.size:
        raise ValueError(f"field of spatial shape {tuple(v.shape[2:])} is not on the grid {grid.size}")
    return d


def scaling_and_squaring(v: torch.Tensor, grid: Grid, steps: int = 6) -> torch.Tensor:
    """Exponential of an SVF by scaling and squaring (Arsigny 2006; Atlas-ISTN Eqs. 2-3).

    v: (N, D, *grid.size) velocity in world units (mm), components (x, y[, z]) along the grid axes.
    Returns the displacement u of phi = exp(v), phi(x) = x + u(x), same shape and units. The inverse
    phi^-1 = exp(-v) is ``scaling_and_squaring(-v, ...)``. Raises ValueError for a malformed field or
    negative `steps`.
    """
    _check_field(v, grid)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    # Integrated in grid_sample's normalised units ([-1, 1] over the field of view, per axis), which
    # equals `u = u + sample(u, x + u)` in mm but saves a rescaling of the points at every squaring.
    d = v.dim() - 2
    half = grid.half_extent_tensor(v.device, v.dtype)
    scale = half.view(1, d, *[1] * d)
    ident = grid.points(v.device, v.dtype, centred=True) / half
    u = v / (scale * 2 ** steps)
    for _ in range(steps):
        u = u + _grid_sample(u, ident + u.movedim(1, -1))
    return u * scale


# ---------------------------------------------------------------- affine algebra (Eq. 1)

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
    Returns (A, t) with A (N, D, D), t (N, D).
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


# ---------------------------------------------------------------- Jacobian

def jacobian_determinant(points: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Jacobian determinant of a point map by central finite differences (one-sided at borders).

    points: (N, *grid.size, D) mm at the voxel centres of `grid` (the derivatives are taken along the
    grid axes; with an orthonormal direction the determinant is that of the world-space map).
    Returns (N, *size); 1 everywhere for the identity, <= 0 where the map folds.
    """
    d = points.shape[-1]
    if points.dim() != d + 2 or grid.ndim != d or tuple(points.shape[1:-1]) != grid.size:
        raise ValueError(f"points must be (N, *grid.size, D) on the grid {grid.size}, got {tuple(points.shape)}")
    cols = []
    for j in range(d):  # derivative along grid axis j (ITK order), which is array dim (d - j)
        cols.append(torch.gradient(points, spacing=float(grid.spacing[j]), dim=d - j)[0])
    jac = torch.stack(cols, dim=-1)  # (..., i, j) = d p_i / d x_j along the grid axes
    # the closed form of a 2 x 2 or 3 x 3 determinant: cheaper than a batched LU on every voxel and
    # differentiable at singular matrices (the folding penalty optimises through it)
    if d == 2:
        det = jac[..., 0, 0] * jac[..., 1, 1] - jac[..., 0, 1] * jac[..., 1, 0]
    else:
        det = (jac[..., 0, 0] * (jac[..., 1, 1] * jac[..., 2, 2] - jac[..., 1, 2] * jac[..., 2, 1])
               - jac[..., 0, 1] * (jac[..., 1, 0] * jac[..., 2, 2] - jac[..., 1, 2] * jac[..., 2, 0])
               + jac[..., 0, 2] * (jac[..., 1, 0] * jac[..., 2, 1] - jac[..., 1, 1] * jac[..., 2, 0]))
    # Derivatives along the grid axes are those along world axes times the direction matrix R, so
    # det J_world = det J_grid / det R (det R = +-1).
    if np.linalg.det(grid.direction_matrix) < 0:
        det = -det
    return det


# ---------------------------------------------------------------- transform objects

class Transform:
    """A batch of N spatial maps of world points (mm). Subclasses are frozen dataclasses; see the
    module docstring for the conventions."""

    def points(self, x: torch.Tensor) -> torch.Tensor:
        """T(x) for world points x (N or 1, *spatial, D). Returns (N, *spatial, D) mm."""
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        raise NotImplementedError

    @property
    def batch_size(self) -> int:
        raise NotImplementedError

    def _like(self) -> torch.Tensor:
        """A tensor of this transform's device and dtype."""
        raise NotImplementedError

    def on_grid(self, grid: Grid) -> torch.Tensor:
        """The point map T(x) at the voxel centres x of `grid`: (N, *grid.size, D) mm."""
        ref = self._like()
        pts = self.points(grid.points(ref.device, ref.dtype))
        return pts.expand(self.batch_size, *pts.shape[1:])

    def displacement(self, grid: Grid) -> torch.Tensor:
        """T(x) - x at the voxel centres of `grid`: (N, D, *grid.size) mm along the world axes
        (ITK's displacement-field convention)."""
        ref = self._like()
        return (self.on_grid(grid) - grid.points(ref.device, ref.dtype)).movedim(-1, 1)

    def warp(self, image: torch.Tensor, image_grid: Grid, grid: Grid | None = None, mode: str = "bilinear",
             padding: str = "border") -> torch.Tensor:
        """``image o T`` sampled at the voxel centres of `grid` (default: `image_grid`).
        image: (N or 1, C, *image_grid.size). Returns (N, C, *grid.size)."""
        pts = self.on_grid(grid or image_grid)
        if image.shape[0] != pts.shape[0]:
            image = image.expand(pts.shape[0], *image.shape[1:])
        return sample(image, pts, image_grid, mode, padding)

    def jacobian_determinant(self, grid: Grid) -> torch.Tensor:
        """det of the Jacobian of T at the voxel centres of `grid` (finite differences), (N, *grid.size)."""
        return jacobian_determinant(self.on_grid(grid), grid)

    def inverse(self) -> "Transform":
        """The exact inverse transform. Raises ValueError if this transform has none."""
        raise ValueError(f"{type(self).__name__} has no exact inverse")

    def then(self, other: "Transform") -> "Composite":
        """``other o self``: apply this transform, then `other`."""
        return Composite((self, other))

    def __getitem__(self, index) -> "Transform":
        """The transforms of the batch entries `index` (an int keeps a batch of 1)."""
        raise NotImplementedError

    def _sliced(self, new: "Transform", index) -> "Transform":
        """`new`, the batch slice `index` of this transform, with the values this one has already
        computed (exp(v), the inverse, its point map) sliced too, so that taking a case out of a
        batch never integrates an SVF again."""
        own = {f.name for f in fields(self)}
        for name, value in self.__dict__.items():
            if name not in own:  # a cached_property's value
                new.__dict__[name] = value[_batch_index(index)] if isinstance(value, torch.Tensor) else value[index]
        return new


def _batch_index(index) -> slice | list:
    return slice(index, index + 1) if isinstance(index, int) else index


@dataclass(frozen=True, eq=False)
class AffineTransform(Transform):
    """T(x) = A x + t. matrix A: (N, D, D); translation t: (N, D) mm. Exact inverse."""

    matrix: torch.Tensor
    translation: torch.Tensor

    def __post_init__(self):
        if self.matrix.dim() != 3 or self.matrix.shape[1] != self.matrix.shape[2] or \
                self.translation.shape != self.matrix.shape[:2]:
            raise ValueError(f"expected matrix (N, D, D) and translation (N, D), got "
                             f"{tuple(self.matrix.shape)} and {tuple(self.translation.shape)}")

    @classmethod
    def from_trs(cls, translation: torch.Tensor, angles: torch.Tensor, log_scale: torch.Tensor) -> "AffineTransform":
        """T = M_t R_theta D_s (Atlas-ISTN Eq. 1); shapes as in :func:`affine_trs`."""
        return cls(*affine_trs(translation, angles, log_scale))

    @classmethod
    def identity(cls, ndim: int, batch: int = 1, device=None, dtype=torch.float32) -> "AffineTransform":
        return cls(torch.eye(ndim, device=device, dtype=dtype).expand(batch, ndim, ndim).clone(),
                   torch.zeros(batch, ndim, device=device, dtype=dtype))

    @classmethod
    def from_numpy(cls, matrix: np.ndarray, translation: np.ndarray, dtype=torch.float32) -> "AffineTransform":
        """A batch-1 transform from a (D, D) matrix and a (D,) translation."""
        return cls(torch.as_tensor(np.asarray(matrix), dtype=dtype)[None],
                   torch.as_tensor(np.asarray(translation), dtype=dtype)[None])

    @classmethod
    def grid_frame(cls, grid: Grid, dtype=torch.float32) -> "AffineTransform":
        """The rigid map from `grid`'s grid-centred coordinates to world coordinates,
        ``x -> centre + direction @ x``: carries model (atlas) coordinates to a case's world space."""
        R, c = grid.frame()
        return cls.from_numpy(R, c, dtype)

    @property
    def ndim(self) -> int:
        return self.matrix.shape[-1]

    @property
    def batch_size(self) -> int:
        return self.matrix.shape[0]

    def _like(self) -> torch.Tensor:
        return self.matrix

    def points(self, x: torch.Tensor) -> torch.Tensor:
        return apply_affine(self.matrix, self.translation, x)

    def inverse(self) -> "AffineTransform":
        return AffineTransform(*invert_affine(self.matrix, self.translation))

    def compose(self, inner: "AffineTransform") -> "AffineTransform":
        """``self o inner`` as one affine transform."""
        return AffineTransform(self.matrix @ inner.matrix,
                               (self.matrix @ inner.translation.unsqueeze(-1)).squeeze(-1) + self.translation)

    def __getitem__(self, index) -> "AffineTransform":
        i = _batch_index(index)
        return AffineTransform(self.matrix[i], self.translation[i])


@dataclass(frozen=True, eq=False)
class DisplacementField(Transform):
    """T(x) = x + u(x) with u a dense field on `grid`, linearly interpolated.

    u: (N, D, *grid.size) mm along the world axes. padding: how u continues outside the grid's field
    of view ('border': the nearest value, so a transform that also has an affine part continues it;
    'zeros': the identity there). No exact inverse (an SVF has one).
    """

    u: torch.Tensor
    grid: Grid
    padding: str = "border"

    def __post_init__(self):
        _check_field(self.u, self.grid)

    @property
    def ndim(self) -> int:
        return self.grid.ndim

    @property
    def batch_size(self) -> int:
        return self.u.shape[0]

    def _like(self) -> torch.Tensor:
        return self.u

    def _world_u(self) -> torch.Tensor:
        return self.u

    def points(self, x: torch.Tensor) -> torch.Tensor:
        n = max(x.shape[0], self.batch_size)
        u = self.u.expand(n, *self.u.shape[1:])
        return x + sample(u, x, self.grid, padding=self.padding).movedim(1, -1)

    def on_grid(self, grid: Grid) -> torch.Tensor:
        if grid == self.grid:  # at its own voxel centres the field needs no interpolation
            return grid.points(self.u.device, self.u.dtype) + self.u.movedim(1, -1)
        return super().on_grid(grid)

    def __getitem__(self, index) -> "DisplacementField":
        return DisplacementField(self.u[_batch_index(index)], self.grid, self.padding)


@dataclass(frozen=True, eq=False)
class StationaryVelocityField(Transform):
    """phi = exp(v), integrated by scaling and squaring (Arsigny 2006; Atlas-ISTN Eqs. 2-3).

    v: (N, D, *grid.size) velocity in mm on `grid` (for Atlas-ISTN the half-resolution grid of the
    model grid, Sec. 2.2). steps: squarings. output_grid: the grid the integrated displacement is
    linearly upsampled to (default `grid`), as Atlas-ISTN does before warping. The exact inverse is
    exp(-v). The displacement is computed once, when first needed.
    """

    v: torch.Tensor
    grid: Grid
    steps: int = 6
    output_grid: Grid | None = None

    def __post_init__(self):
        _check_field(self.v, self.grid)
        if not np.array_equal(self.grid.direction_matrix, np.eye(self.grid.ndim)):
            # Scaling and squaring adds v along the grid axes; world and grid axes must agree.
            raise ValueError("an SVF needs a grid with identity direction (e.g. the model grid)")
        if self.output_grid is not None and self.output_grid.ndim != self.grid.ndim:
            raise ValueError("output_grid must have the SVF's dimension")

    @property
    def ndim(self) -> int:
        return self.grid.ndim

    @property
    def batch_size(self) -> int:
        return self.v.shape[0]

    def _like(self) -> torch.Tensor:
        return self.v

    @cached_property
    def displacement_on_svf_grid(self) -> torch.Tensor:
        """u of exp(v) = id + u on the SVF's own grid, (N, D, *grid.size) mm (what Eq. 13 regularises)."""
        return scaling_and_squaring(self.v, self.grid, self.steps)

    @cached_property
    def field(self) -> DisplacementField:
        """exp(v) as a :class:`DisplacementField` on the output grid."""
        out = self.output_grid or self.grid
        u = self.displacement_on_svf_grid
        return DisplacementField(u if out == self.grid else resize_field(u, out.size), out)

    def points(self, x: torch.Tensor) -> torch.Tensor:
        return self.field.points(x)

    def on_grid(self, grid: Grid) -> torch.Tensor:
        return self.field.on_grid(grid)

    def inverse(self) -> "StationaryVelocityField":
        return StationaryVelocityField(-self.v, self.grid, self.steps, self.output_grid)

    def __getitem__(self, index) -> "StationaryVelocityField":
        return self._sliced(StationaryVelocityField(self.v[_batch_index(index)], self.grid, self.steps,
                                                    self.output_grid), index)


def _cubic_bspline_weights(u: torch.Tensor) -> list[torch.Tensor]:
    """The four cubic B-spline weights of control points i0 - 1 .. i0 + 2 for fractional offsets u in
    [0, 1) from control point i0 (they sum to 1)."""
    u2, u3 = u * u, u * u * u
    return [(1 - u) ** 3 / 6, (3 * u3 - 6 * u2 + 4) / 6, (-3 * u3 + 3 * u2 + 3 * u + 1) / 6, u3 / 6]


@dataclass(frozen=True, eq=False)
class BSplineTransform(Transform):
    """Free-form deformation (Rueckert et al. 1999): T(x) = x + sum_k c_k B(x - p_k), B the tensor
    product of cubic B-splines scaled to the control-point spacing.

    coefficients: (N, D, *control_grid.size) displacement coefficients in mm along the world axes, on
    the control points `control_grid` (a :class:`Grid`; its spacing is the knot spacing). Control
    points outside the grid count as zero, so T is the identity more than two knot spacings outside it.
    No exact inverse. Evaluated exactly at any points (4^D control points per point).
    """

    coefficients: torch.Tensor
    control_grid: Grid

    def __post_init__(self):
        _check_field(self.coefficients, self.control_grid)

    @property
    def ndim(self) -> int:
        return self.control_grid.ndim

    @property
    def batch_size(self) -> int:
        return self.coefficients.shape[0]

    def _like(self) -> torch.Tensor:
        return self.coefficients

    def displacement_at(self, x: torch.Tensor) -> torch.Tensor:
        """u(x) for world points x (N or 1, ..., D): (N, ..., D) mm."""
        n, d = max(x.shape[0], self.batch_size), self.ndim
        shape = x.shape[1:-1]
        t = self.control_grid.world_to_index(x.reshape(x.shape[0], -1, d)).expand(n, -1, d)
        base = torch.floor(t)
        weights = [_cubic_bspline_weights(t[..., j] - base[..., j]) for j in range(d)]  # per axis, 4 x (n, P)
        coeffs = self.coefficients.expand(n, *self.coefficients.shape[1:]).reshape(n, d, -1)
        size_xyz = self.control_grid.size_xyz
        strides = [1] * d  # flat index = sum_j i_j * stride_j, ITK axis 0 (x) fastest
        for j in range(1, d):
            strides[j] = strides[j - 1] * size_xyz[j - 1]
        out = torch.zeros(n, d, t.shape[1], device=t.device, dtype=coeffs.dtype)
        for offsets in torch.cartesian_prod(*[torch.arange(-1, 3)] * d).reshape(-1, d).tolist():
            w = torch.ones_like(t[..., 0])
            flat = torch.zeros_like(t[..., 0], dtype=torch.long)
            inside = torch.ones_like(t[..., 0], dtype=torch.bool)
            for j, o in enumerate(offsets):
                idx = base[..., j].long() + o
                inside &= (idx >= 0) & (idx < size_xyz[j])
                w = w * weights[j][o + 1]
                flat = flat + idx.clamp(0, size_xyz[j] - 1) * strides[j]
            gathered = torch.gather(coeffs, 2, flat[:, None, :].expand(n, d, -1))
            out = out + gathered * (w * inside)[:, None, :]
        return out.movedim(1, -1).reshape(n, *shape, d)

    def points(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.displacement_at(x)

    def __getitem__(self, index) -> "BSplineTransform":
        return BSplineTransform(self.coefficients[_batch_index(index)], self.control_grid)


@dataclass(frozen=True, eq=False)
class Composite(Transform):
    """Transforms applied in the order given: ``Composite((T1, T2))(x) = T2(T1(x))``. The inverse
    (where every part inverts) is computed once and kept."""

    transforms: tuple[Transform, ...] = field(default_factory=tuple)

    def __post_init__(self):
        parts = []
        for t in self.transforms:  # flatten nested composites
            parts.extend(t.transforms if isinstance(t, Composite) else [t])
        if not parts:
            raise ValueError("a composite needs at least one transform")
        if len({t.ndim for t in parts}) != 1:
            raise ValueError("all parts of a composite must have the same dimension")
        object.__setattr__(self, "transforms", tuple(parts))

    @property
    def ndim(self) -> int:
        return self.transforms[0].ndim

    @property
    def batch_size(self) -> int:
        return max(t.batch_size for t in self.transforms)

    def _like(self) -> torch.Tensor:
        return self.transforms[0]._like()

    def points(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x = t.points(x)
        return x

    def on_grid(self, grid: Grid) -> torch.Tensor:
        x = self.transforms[0].on_grid(grid)
        for t in self.transforms[1:]:
            x = t.points(x)
        return x.expand(self.batch_size, *x.shape[1:])

    @cached_property
    def _inverse(self) -> "Composite":
        return Composite(tuple(t.inverse() for t in reversed(self.transforms)))

    def inverse(self) -> "Composite":
        return self._inverse

    def simplified(self) -> "Composite":
        """The same map with runs of consecutive affine parts merged into one affine transform."""
        parts: list[Transform] = []
        for t in self.transforms:
            if parts and isinstance(t, AffineTransform) and isinstance(parts[-1], AffineTransform):
                parts[-1] = t.compose(parts[-1])
            else:
                parts.append(t)
        return Composite(tuple(parts))

    def __getitem__(self, index) -> "Composite":
        return self._sliced(Composite(tuple(t[index] for t in self.transforms)), index)


@dataclass(frozen=True, eq=False)
class AffineSVFTransform(Composite):
    """Atlas-ISTN's Phi = T o phi, phi = exp(v) (Eqs. 6-8): maps atlas (model-grid) points to subject
    points in the subject's model-grid frame. ``y_i o Phi`` is the subject in atlas space (Eq. 12) and
    ``y^a o Phi^-1`` the atlas in subject space (Eq. 11). `grid` is the model grid; ``svf`` and
    ``affine`` give the parts (None where the STN variant has none)."""

    grid: Grid | None = None

    @property
    def svf(self) -> StationaryVelocityField | None:
        return next((t for t in self.transforms if isinstance(t, StationaryVelocityField)), None)

    @property
    def affine(self) -> AffineTransform | None:
        return next((t for t in self.transforms if isinstance(t, AffineTransform)), None)

    def forward_points(self) -> torch.Tensor:
        """Phi(x) at the model grid's voxel centres, (N, *size, D) mm."""
        return self.on_grid(self.grid)

    @cached_property
    def _inverse_points(self) -> torch.Tensor:
        return self.inverse().on_grid(self.grid)

    def inverse_points(self) -> torch.Tensor:
        """Phi^-1(x) = phi^-1(T^-1(x)) at the model grid's voxel centres, (N, *size, D) mm."""
        return self._inverse_points

    def __getitem__(self, index) -> "AffineSVFTransform":
        return self._sliced(AffineSVFTransform(tuple(t[index] for t in self.transforms), self.grid), index)


def compose_transform(v_half: torch.Tensor | None, A: torch.Tensor | None, t: torch.Tensor | None,
                      grid: Grid, steps: int = 6) -> AffineSVFTransform:
    """Transformation computation module C(v, T) of Atlas-ISTN (Eq. 6, Fig. 4).

    v_half: SVF (N, D, *half_size) mm on ``grid.downsample(2)``, or None; A (N, D, D), t (N, D): affine
    part, or None. The SVF is integrated by scaling and squaring at half resolution and linearly
    upsampled to `grid`; Phi^-1 integrates exp(-v) when it is first asked for (the atlas update,
    Eq. 16, never asks). Raises ValueError if neither part is given or the SVF is not at half
    resolution of `grid`.
    """
    if v_half is None and A is None:
        raise ValueError("a transform needs an SVF, an affine part, or both")
    parts: list[Transform] = []
    if v_half is not None:
        half = grid.downsample(2)
        if tuple(v_half.shape[2:]) != half.size:
            raise ValueError(f"SVF of size {tuple(v_half.shape[2:])} is not at half resolution of {grid.size}")
        parts.append(StationaryVelocityField(v_half, half, steps, grid))
    if A is not None:
        parts.append(AffineTransform(A, t))
    return AffineSVFTransform(tuple(parts), grid)
