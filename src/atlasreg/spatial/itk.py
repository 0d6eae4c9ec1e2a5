"""Transforms to and from ITK: SimpleITK transform objects and files that SimpleITK, ITK-SNAP, 3D
Slicer, ANTs and elastix's transformix read.

ITK's convention is atlasreg's: a transform maps points of the *fixed* (output) space to the
*moving* (input) space, and ``sitk.Resample(moving, fixed_grid, T)`` gives ``moving o T``, which is
:meth:`atlasreg.spatial.transforms.Transform.warp`. World coordinates are ITK's physical coordinates
(LPS for medical images read by ITK), in mm.

Files:

* an affine part: an ITK transform file (``.tfm`` / ``.txt`` / ``.mat``), ``AffineTransform_double``;
* a dense displacement field: an ITK displacement-field image (``.nii.gz``, ``.nrrd``, ``.mha``): a vector
  image of D float64 components in world units along the world axes, on the field's grid, whose value
  at a point p is ``T(p) - p``;
* a composite (affine and dense parts in sequence): an ITK ``.h5`` transform file holding a
  ``CompositeTransform`` whose parts ITK applies last-added first;
* a cubic B-spline free-form deformation: ITK's own ``BSplineTransform`` (same control points and
  coefficients; ITK evaluates it only where all 4^D control points exist, and leaves points near the
  border of the control grid unmoved, atlasreg counts missing control points as zero).

An SVF is exported as its exponential (a displacement field): ITK files have no stationary velocity
field type that SimpleITK applies. Outside a displacement field's grid ITK uses a zero displacement,
while atlasreg's :class:`~atlasreg.spatial.transforms.DisplacementField` continues the border value
(see there); inside the field of view they agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import AtlasregError
from .grid import Grid
from .transforms import (
    AffineTransform, BSplineTransform, Composite, DisplacementField, StationaryVelocityField, Transform,
)

_FIELD_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
_TRANSFORM_EXTENSIONS = (".h5", ".hdf5", ".tfm", ".txt", ".mat")


def field_image(displacement: torch.Tensor, grid: Grid) -> sitk.Image:
    """A displacement (D, *grid.size) in mm along the world axes as an ITK displacement-field image
    (``sitkVectorFloat64``, D components) with `grid`'s geometry."""
    if displacement.dim() != grid.ndim + 1 or displacement.shape[0] != grid.ndim or \
            tuple(displacement.shape[1:]) != grid.size:
        raise ValueError(f"displacement of shape {tuple(displacement.shape)} does not match the grid {grid.size}")
    arr = displacement.detach().movedim(0, -1).cpu().double().numpy()
    img = sitk.GetImageFromArray(arr, isVector=True)
    grid.copy_information_to(img)
    return img


def field_from_image(image: sitk.Image, padding: str = "border") -> DisplacementField:
    """A displacement-field image (D components, world units along world axes) as a batch-1
    :class:`DisplacementField` on the image's grid. Raises ValueError for a wrong component count."""
    d = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() != d:
        raise ValueError(f"a {d}D displacement field needs {d} components per voxel, got "
                         f"{image.GetNumberOfComponentsPerPixel()}")
    arr = sitk.GetArrayFromImage(image).astype(np.float32)  # (*size, D)
    u = torch.from_numpy(arr).movedim(-1, 0)[None]
    return DisplacementField(u, Grid.from_sitk(image), padding)


def to_sitk(transform: Transform, index: int = 0) -> sitk.Transform:
    """Batch entry `index` of an atlasreg transform as a SimpleITK transform (affine ->
    ``AffineTransform``; displacement field or SVF -> ``DisplacementFieldTransform`` on its grid;
    composite -> ``CompositeTransform``, adjacent affine parts merged)."""
    if isinstance(transform, Composite):
        parts = transform.simplified().transforms
        if len(parts) == 1:
            return to_sitk(parts[0], index)
        out = sitk.CompositeTransform(transform.ndim)
        for part in reversed(parts):  # ITK applies the last-added transform first
            out.AddTransform(to_sitk(part, index))
        return out
    if isinstance(transform, AffineTransform):
        A = transform.matrix[index].detach().cpu().double().numpy()
        t = transform.translation[index].detach().cpu().double().numpy()
        out = sitk.AffineTransform(transform.ndim)
        out.SetMatrix(tuple(A.ravel().tolist()))
        out.SetTranslation(tuple(t.tolist()))
        return out
    if isinstance(transform, BSplineTransform):
        g = transform.control_grid
        out = sitk.BSplineTransform(transform.ndim, 3)
        # ITK's fixed parameters: grid size, origin, spacing, direction; parameters: the coefficient
        # images, one per component, x fastest (= C order of the array-order tensor).
        out.SetFixedParameters([float(v) for v in (*g.size_xyz, *g.origin, *g.spacing, *g.direction)])
        coef = transform.coefficients[index if transform.batch_size > 1 else 0].detach().cpu().double()
        out.SetParameters(tuple(coef.reshape(transform.ndim, -1).ravel().tolist()))
        return out
    if isinstance(transform, StationaryVelocityField):
        transform = transform.field
    if isinstance(transform, DisplacementField):
        u = transform.u[index if transform.batch_size > 1 else 0]
        return sitk.DisplacementFieldTransform(field_image(u, transform.grid))
    raise TypeError(f"no ITK form for {type(transform).__name__}")


def from_sitk(transform: sitk.Transform, dtype=torch.float32) -> Transform:
    """A SimpleITK transform as a batch-1 atlasreg transform: composites part by part, displacement
    fields as :class:`DisplacementField` (zero padding, as ITK), every matrix-offset transform (affine,
    Euler, similarity, versor, translation, ...) as :class:`AffineTransform`. Raises ValueError for a
    transform type atlasreg cannot represent (e.g. ITK's B-spline transform, for now)."""
    tx = transform.Downcast() if hasattr(transform, "Downcast") else transform
    name = tx.GetName()
    d = tx.GetDimension()
    if name == "CompositeTransform":
        parts = [from_sitk(tx.GetNthTransform(i), dtype) for i in range(tx.GetNumberOfTransforms())]
        return Composite(tuple(reversed(parts)))
    if name == "DisplacementFieldTransform":
        return field_from_image(tx.GetDisplacementField(), padding="zeros")
    if name == "BSplineTransform":
        fixed = np.asarray(tx.GetFixedParameters(), dtype=np.float64)
        size = tuple(int(round(v)) for v in fixed[:d])
        grid = Grid(size[::-1], fixed[2 * d:3 * d], fixed[d:2 * d], fixed[3 * d:3 * d + d * d])
        coef = torch.as_tensor(np.asarray(tx.GetParameters()), dtype=dtype).reshape(1, d, *grid.size)
        return BSplineTransform(coef, grid)
    if name == "TranslationTransform":
        return AffineTransform.from_numpy(np.eye(d), np.asarray(tx.GetOffset()), dtype)
    if hasattr(tx, "GetMatrix") and hasattr(tx, "GetTranslation") and hasattr(tx, "GetCenter"):
        A = np.asarray(tx.GetMatrix(), dtype=np.float64).reshape(d, d)
        c = np.asarray(tx.GetCenter(), dtype=np.float64)
        t = np.asarray(tx.GetTranslation(), dtype=np.float64)
        return AffineTransform.from_numpy(A, t + c - A @ c, dtype)  # A (x - c) + c + t
    raise ValueError(f"ITK transform type {name} is not supported")


def _extension(path: Path) -> str:
    name = path.name.lower()
    for ext in _FIELD_EXTENSIONS + _TRANSFORM_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def write_transform(transform: Transform, path: str | Path, index: int = 0, grid: Grid | None = None) -> Path:
    """Write batch entry `index` of `transform` atomically in the ITK form its extension names:
    ``.h5``/``.tfm``/``.txt``/``.mat`` -> an ITK transform file (:func:`to_sitk`); ``.nii.gz``/``.nii``/
    ``.nrrd``/``.mha`` -> a displacement-field image of ``T(p) - p`` sampled on `grid` (default: the
    field's own grid for a displacement field or SVF; required otherwise). Returns the path.
    Raises ValueError for an unknown extension or a missing grid."""
    from ..data.io import atomic_file, write_image

    path = Path(path)
    ext = _extension(path)
    if ext in _FIELD_EXTENSIONS:
        if grid is None:
            inner = transform.field if isinstance(transform, StationaryVelocityField) else transform
            if not isinstance(inner, DisplacementField):
                raise ValueError("writing this transform as a displacement-field image needs a grid")
            grid = inner.grid
        disp = transform[index].displacement(grid)[0]
        return write_image(field_image(disp, grid), path)
    if ext in _TRANSFORM_EXTENSIONS:
        tx = to_sitk(transform, index)
        with atomic_file(path) as tmp:  # the temporary name keeps the extension, which picks the format
            sitk.WriteTransform(tx, str(tmp))
        return path
    raise ValueError(f"unknown transform file extension {path.name!r}; use one of "
                     f"{', '.join(_TRANSFORM_EXTENSIONS + _FIELD_EXTENSIONS)}")


def read_transform(path: str | Path, dtype=torch.float32) -> Transform:
    """Read an ITK transform file or displacement-field image (see :func:`write_transform`) as a
    batch-1 atlasreg transform. Raises AtlasregError naming the file if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise AtlasregError("transform file not found", path)
    ext = _extension(path)
    try:
        if ext in _FIELD_EXTENSIONS:
            from ..data.io import verify_file

            verify_file(path)
            return field_from_image(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))
        from ..data.io import read_transform_file

        return from_sitk(read_transform_file(path), dtype)
    except (RuntimeError, ValueError) as e:
        msg = [ln for ln in str(e).splitlines() if ln.strip()]
        raise AtlasregError(f"cannot read transform: {(msg[-1] if msg else type(e).__name__)[:200]}", path) from None
