"""Inter-subject correspondence through atlas space (Atlas-ISTN, Sinclair et al. 2022, Sec. 3.2
'Inter-Subject Correspondence', Eqs. 22-23): map points and labelmaps of one segmented subject onto
another by composing the transforms to and from the common atlas.

Inputs are two case folders written by ``atlasreg segment`` (their contract and file names:
:mod:`atlasreg.contracts`). The atlas points of every case lie in ONE atlas world frame, that of the
saved atlas (the atlas image of the training run's atlas folder, on the centred model grid of
:meth:`atlasreg.spatial.grid.Grid.centred`: centre at the world origin, identity direction, mm). Each
folder holds the case's transforms in world units (mm) in two forms:

* the inverse transform (:data:`~atlasreg.contracts.INVERSE_TRANSFORM`) -- Phi^-1: a subject point p
  (world, mm) to its atlas point Phi^-1(p) (atlas world, mm); the forward transform
  (:data:`~atlasreg.contracts.FORWARD_TRANSFORM`) -- Phi: an atlas point q to its subject point Phi(q).
  ITK composite transforms: an affine part (the case's frame and the affine of Eq. 7, or its inverse)
  and a displacement field on the model grid (the exponential of the SVF, Eqs. 2-3).
* the inverse displacement field (:data:`~atlasreg.contracts.INVERSE_FIELD`, on the input's grid) and
  the forward one (:data:`~atlasreg.contracts.FORWARD_FIELD`, on the atlas grid): the same maps as ITK
  displacement-field images, ``p -> p + d(p)``.

This module maps with the ``.h5`` composites; of the NIfTI fields it reads only the grid of the inverse
displacement field (the input's grid, the output grid of :func:`map_labelmap`), because

* inside the model's field of view the composites *are* the model's transforms (the affine part
  exact, the dense part linearly interpolated on the model grid, as the model evaluates it), whereas
  the inverse NIfTI field is that map resampled onto the input grid, which adds a second linear
  interpolation between the input's voxel centres;
* outside the grid of a displacement field ITK uses a zero displacement. In a composite only the
  deformable part drops out there and the affine part, which carries the whole offset between the
  subject's and the atlas's world frames, still applies; a NIfTI field holds that offset in its
  values, so a point outside its grid would not move at all -- tens to hundreds of mm from where it
  belongs. (atlasreg's own transforms continue the dense part's border value outside the model grid,
  :class:`atlasreg.spatial.transforms.DisplacementField`; only there can the maps used here differ
  from the model's, and :func:`map_points` warns when a point passes there.)

With one atlas frame for all cases no change of frame is needed. Point push-forward A -> B (Eq. 23
applied to points)::

    p_B = Phi_B( Phi_A^-1(p_A) )          A's inverse transform, then B's forward transform

Pull-back for resampling A's images onto B's grid (Eq. 23 applied to images, y_B = y_A o T)::

    T_{B->A}(p_B) = Phi_A( Phi_B^-1(p_B) )  B's inverse transform, then A's forward transform

ITK's resampling convention: ``sitk.Resample(moving, reference, T)`` sets each output voxel at point p
of the reference grid to ``moving(T(p))``; T maps *output* points to *input* points (a pull-back). Hence
resampling A's labelmap onto B's grid needs T_{B->A}, built from B's inverse and A's forward transform,
and mapping points needs the opposite composition. Neither needs a transform to be inverted
numerically; the two compositions are inverses of each other as far as each case's forward and inverse
transforms are (the paper's inverse consistency, MICE / IC-DSC of Table 6).

(Naming: the paper calls Phi_i "the transformation from subject i to atlas space", the direction in
which it moves images; as a map of *points*, which is how it enters the compositions of Eqs. 22-23
(y_i^a = y^a o Phi_i^-1) and how it is used here and in :mod:`atlasreg.segment`, Phi maps atlas points
to subject points and Phi^-1 subject points to atlas points.)
"""

from __future__ import annotations

import argparse
import csv
import io as _stdio
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .contracts import FORWARD_FIELD, FORWARD_TRANSFORM, INVERSE_FIELD, INVERSE_TRANSFORM
from .data.io import read_any, read_labelmap, read_transform_file, verify_file, write_image, write_text
from .errors import AtlasregError
from .spatial.grid import Grid

__all__ = [
    "FORWARD_FIELD",
    "INVERSE_FIELD",
    "FORWARD_TRANSFORM",
    "INVERSE_TRANSFORM",
    "read_displacement_field",
    "read_case_transform",
    "subject_to_subject_transform",
    "map_points",
    "map_labelmap",
    "read_points_csv",
    "write_points_csv",
    "map_points_csv",
    "cmd_correspond",
    "add_correspond_parser",
]

_FIELD_FILES = {"forward": FORWARD_FIELD, "inverse": INVERSE_FIELD}
_TRANSFORM_FILES = {"forward": FORWARD_TRANSFORM, "inverse": INVERSE_TRANSFORM}
_REGISTERS = "`atlasreg segment` writes it for models that register the atlas (Atlas-ISTN, VML, a U-Net " \
             "with a fixed atlas)"
_COORDS = ("x", "y", "z")


# --------------------------------------------------------------------------------------------------
# transforms and displacement fields of a case folder


def _one_line(exc: Exception) -> str:
    """One line out of SimpleITK's multi-line exception text (:func:`atlasreg.data.io._short_reason`:
    without its 'sitk::ERROR:' prefix; 'unrecognised or corrupt file format' for a file no reader takes)."""
    from .data.io import _short_reason

    return _short_reason(exc)


def _case_dir(case) -> Path:
    case = Path(case)
    if not case.exists():
        raise AtlasregError("case folder not found", case)
    if not case.is_dir():
        raise AtlasregError("is not a folder; expected a case output folder of `atlasreg segment`", case)
    return case


def read_displacement_field(case, which: str) -> sitk.Image:
    """Read and check one displacement field of a case folder of ``atlasreg segment``.

    case: the case folder; which: ``"forward"`` (Phi, atlas -> subject, :data:`FORWARD_FIELD`, on the
    atlas grid) or ``"inverse"`` (Phi^-1, subject -> atlas, :data:`INVERSE_FIELD`, on the subject's
    input grid).

    Returns a ``sitkVectorFloat64`` image of D components (D = 2 or 3, the image dimension), world units
    (mm) along the world axes, with its grid's size, spacing, origin and direction.

    Raises AtlasregError naming the folder (missing, not a folder) or the field file (missing -- the
    model did not register, e.g. a U-Net without a fixed atlas --, unreadable, not a D-component vector
    image, not 2D/3D, NaN or infinite displacements).
    """
    if which not in _FIELD_FILES:
        raise ValueError(f"which must be 'forward' or 'inverse', got {which!r}")
    path = _case_dir(case) / _FIELD_FILES[which]
    if not path.is_file():
        raise AtlasregError(f"{which} displacement field not found; {_REGISTERS}", path)
    nonfinite_on_disk = verify_file(path)  # ITK 5 reads NaN in NIfTI as 0 and a truncated file as zeros
    try:
        field = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise AtlasregError(f"cannot read displacement field: {_one_line(exc)}", path) from None
    dim = field.GetDimension()
    ncomp = field.GetNumberOfComponentsPerPixel()
    if dim not in (2, 3):
        raise AtlasregError(f"displacement field is {dim}D; expected 2D or 3D", path)
    if ncomp != dim:
        raise AtlasregError(
            f"is not a {dim}D displacement field: {ncomp} component(s) per pixel, expected {dim}", path)
    if field.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise AtlasregError("displacement field has complex values", path)
    field = sitk.Cast(field, sitk.sitkVectorFloat64)
    nonfinite = not np.all(np.isfinite(sitk.GetArrayViewFromImage(field)))
    if nonfinite or nonfinite_on_disk:
        raise AtlasregError("displacement field contains NaN or infinite values", path)
    return field


def _downcast(tx: sitk.Transform) -> sitk.Transform:
    return tx.Downcast() if hasattr(tx, "Downcast") else tx


def _parts(tx: sitk.Transform) -> list[sitk.Transform]:
    """The parts of a (possibly nested) ITK transform in the order they act on a point (ITK applies a
    CompositeTransform's transforms last-added first)."""
    tx = _downcast(tx)
    if tx.GetName() != "CompositeTransform":
        return [tx]
    return [p for i in reversed(range(tx.GetNumberOfTransforms())) for p in _parts(tx.GetNthTransform(i))]


def _is_field(tx: sitk.Transform) -> bool:
    return tx.GetName() == "DisplacementFieldTransform"


def _read_parts(case, which: str) -> tuple[list[sitk.Transform], Path]:
    """(parts of the case's transform in the order they act, its file), checked as
    :func:`read_case_transform` describes."""
    if which not in _TRANSFORM_FILES:
        raise ValueError(f"which must be 'forward' or 'inverse', got {which!r}")
    path = _case_dir(case) / _TRANSFORM_FILES[which]
    if not path.is_file():
        raise AtlasregError(f"{which} transform not found; {_REGISTERS} (case folders written before "
                            "atlasreg wrote .h5 transforms must be segmented again)", path)
    try:
        tx = read_transform_file(path)  # a truncated .h5 is refused; HDF5's error stack is not printed
    except RuntimeError as exc:
        text = str(exc)
        reason = ("not an ITK transform file" if "Could not create Transform IO object" in text
                  else _one_line(exc))
        raise AtlasregError(f"cannot read transform: {reason}", path) from None
    dim = tx.GetDimension()
    if dim not in (2, 3):
        raise AtlasregError(f"transform is {dim}D; expected 2D or 3D", path)
    parts = _parts(tx)
    if not parts:
        raise AtlasregError("transform file holds an empty composite transform", path)
    for part in parts:
        if _is_field(part):
            field = part.GetDisplacementField()
            finite = np.all(np.isfinite(sitk.GetArrayViewFromImage(field)))
        else:
            finite = np.all(np.isfinite(part.GetParameters())) and np.all(np.isfinite(part.GetFixedParameters()))
        if not finite:
            raise AtlasregError(f"transform has NaN or infinite values in its {part.GetName()}", path)
    return parts, path


def read_case_transform(case, which: str) -> sitk.Transform:
    """Read and check one transform of a case folder of ``atlasreg segment`` (world units, mm).

    case: the case folder; which: ``"forward"`` (Phi: atlas world point -> subject world point,
    :data:`FORWARD_TRANSFORM`) or ``"inverse"`` (Phi^-1: subject -> atlas, :data:`INVERSE_TRANSFORM`).
    Returns a D-dimensional SimpleITK transform (D = 2 or 3), as written: a ``CompositeTransform`` of an
    affine part and a displacement field on the model grid, or one of them alone.

    Raises AtlasregError naming the folder (missing, not a folder) or the file (missing -- the model did
    not register, or the folder predates the .h5 files --, unreadable, empty, not 2D/3D, NaN or
    infinite parameters or displacements).
    """
    parts, _ = _read_parts(case, which)
    if len(parts) == 1:
        return parts[0]
    return _composite(parts)


def _composite(parts: Sequence[sitk.Transform]) -> sitk.CompositeTransform:
    """One CompositeTransform applying `parts` in the order given."""
    composite = sitk.CompositeTransform(parts[0].GetDimension())
    for part in reversed(parts):  # SimpleITK applies a CompositeTransform's transforms last-added first
        composite.AddTransform(part)
    return composite


def _dimension(parts: Sequence[sitk.Transform]) -> int:
    return parts[0].GetDimension()


def _check_same_dimension(a: Sequence[sitk.Transform], b: Sequence[sitk.Transform], case_a, path_b: Path) -> None:
    if _dimension(a) != _dimension(b):
        raise AtlasregError(
            f"case is {_dimension(b)}D but {Path(case_a)} is {_dimension(a)}D; correspondence needs "
            "two cases of the same dimension", path_b)


def _input_grid(case, ndim: int) -> sitk.Image:
    """An empty UInt8 image on the case's input grid: the grid of its :data:`INVERSE_FIELD`
    (header only). Raises AtlasregError naming the file: missing, unreadable, not `ndim`-D."""
    path = _case_dir(case) / INVERSE_FIELD
    if not path.is_file():
        raise AtlasregError(f"inverse displacement field not found (it gives the case's input grid); "
                            f"{_REGISTERS}", path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise AtlasregError(f"cannot read displacement field: {_one_line(exc)}", path) from None
    if reader.GetDimension() != ndim:
        raise AtlasregError(f"displacement field is {reader.GetDimension()}D but the case's transforms are "
                            f"{ndim}D", path)
    grid = sitk.Image(reader.GetSize(), sitk.sitkUInt8)
    grid.SetSpacing(reader.GetSpacing())
    grid.SetOrigin(reader.GetOrigin())
    grid.SetDirection(reader.GetDirection())
    return grid


def subject_to_subject_transform(case_a, case_b) -> sitk.Transform:
    """The pull-back from subject B to subject A through atlas space (Atlas-ISTN Eqs. 22-23).

    ``T(p_B) = Phi_A( Phi_B^-1(p_B) )``: given a world point of subject B (mm), returns the
    corresponding world point of subject A (mm). Built from B's inverse transform (B -> atlas) and A's
    forward transform (atlas -> A); both cases' atlas points share the atlas world frame.

    This is the transform ITK's resampling wants to bring A's images onto B's grid:
    ``sitk.Resample(image_of_A, grid_of_B, T, ...)`` samples A at ``T(p)`` for every voxel p of B
    (Eq. 23 with i = A, j = B: y_B = y_A o T). To move *points* from A to B use :func:`map_points`
    (the opposite composition).

    Returns a D-dimensional ``sitk.CompositeTransform`` (D = 2 or 3) of the parts of both transforms.
    Where a point falls outside the grid of a displacement-field part, that part gives a zero
    displacement (only the affine parts act).

    Raises AtlasregError naming the folder or file: case folder missing; transform missing, unreadable
    or invalid (:func:`read_case_transform`); A and B of different dimension.
    """
    return _composite(_pull_back_parts(case_a, case_b))


def _pull_back_parts(case_a, case_b) -> list[sitk.Transform]:
    inv_b, path_b = _read_parts(case_b, "inverse")
    fwd_a, _ = _read_parts(case_a, "forward")
    _check_same_dimension(fwd_a, inv_b, case_a, path_b)
    return inv_b + fwd_a


def _outside(points: np.ndarray, image: sitk.Image) -> np.ndarray:
    """(n,) bool: points (n, D) farther than half a voxel outside the image grid, where ITK's
    DisplacementFieldTransform gives a zero displacement."""
    index = Grid.from_sitk(image).world_to_index(points)  # continuous indices (n, D), ITK order
    size = np.asarray(image.GetSize())
    tol = 1e-6
    return np.any((index < -0.5 - tol) | (index > size - 0.5 + tol), axis=1)


def _apply(parts: Sequence[sitk.Transform], points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(parts applied in order to points (n, D), (n,) bool: the points that passed outside the grid
    of a displacement-field part)."""
    out = np.array(points, dtype=np.float64)
    outside = np.zeros(len(out), dtype=bool)
    for part in parts:
        if _is_field(part):
            outside |= _outside(out, part.GetDisplacementField())
        out = np.array([part.TransformPoint(p.tolist()) for p in out], dtype=np.float64).reshape(out.shape)
    return out, outside


def map_points(points_a, case_a, case_b, warn: bool = True) -> np.ndarray:
    """Push world points of subject A to subject B through atlas space (Atlas-ISTN Eqs. 22-23).

    ``p_B = Phi_B( Phi_A^-1(p_A) )`` with A's inverse transform (A -> atlas world) and B's forward
    transform (atlas world -> B); see the module docstring for why the .h5 composites
    and not the NIfTI fields.

    points_a: array-like (n, D) of world coordinates in mm, ITK order (x, y[, z]); n may be 0.
    Returns a float64 array (n, D) of world coordinates in mm of subject B.

    When ``warn``, issues a UserWarning counting the points that pass outside the model grid of the
    displacement-field part of A's inverse or B's forward transform: ITK uses a zero displacement
    there, so only the affine parts map them (atlasreg's model continues the field's border value).

    Raises ValueError when points_a is not a finite (n, D) array; AtlasregError naming the folder or
    file as :func:`subject_to_subject_transform` does, and naming case_a when D is not the cases'
    dimension.
    """
    pts = np.asarray(points_a, dtype=np.float64)
    if pts.ndim != 2:
        raise ValueError(f"points must be an (n, D) array, got shape {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise ValueError("points contain NaN or infinite coordinates")
    inv_a, path_a = _read_parts(case_a, "inverse")
    fwd_b, path_b = _read_parts(case_b, "forward")
    _check_same_dimension(inv_a, fwd_b, case_a, path_b)
    dim = _dimension(inv_a)
    if pts.shape[1] != dim:
        raise AtlasregError(f"points have {pts.shape[1]} coordinates but the cases are {dim}D", case_a)
    atlas, outside_a = _apply(inv_a, pts)
    out, outside_b = _apply(fwd_b, atlas)
    if warn and (outside_a.any() or outside_b.any()):
        warnings.warn(
            f"{int(outside_a.sum())} of {len(pts)} point(s) pass outside the displacement field's grid of "
            f"{path_a} and {int(outside_b.sum())} outside that of {path_b}; ITK uses a zero displacement "
            "there, so only the affine parts map them", stacklevel=2)
    return out


# --------------------------------------------------------------------------------------------------
# labelmaps


def _present_labels(path: Path) -> list[int]:
    """Integer values present in a labelmap file (first channel), for when none are declared."""
    img = read_any(path)
    if img.GetNumberOfComponentsPerPixel() > 1:
        img = sitk.VectorIndexSelectionCast(img, 0)
    if img.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        return [0]  # read_labelmap reports it
    values = np.unique(sitk.GetArrayViewFromImage(img))
    values = values[np.isfinite(values) & (values == np.round(values))]
    return [int(v) for v in values]


def _output_pixel_id(labels: Sequence[int], out_path: Path, ndim: int) -> int:
    lo, hi = min(labels), max(labels)
    png = out_path.name.lower().endswith(".png")
    if png and ndim != 2:
        raise AtlasregError(f"PNG can only hold 2D labelmaps, the cases are {ndim}D; write .nii.gz", out_path)
    if png and (lo < 0 or hi > 65535):
        raise AtlasregError(f"PNG cannot hold label values {lo}..{hi}; write .nii.gz", out_path)
    if lo >= 0 and hi <= 255:
        return sitk.sitkUInt8
    if lo >= 0 and hi <= 65535:
        return sitk.sitkUInt16
    return sitk.sitkInt32


def map_labelmap(labelmap_a_path, case_a, case_b, out_path, labels: Sequence[int] | None = None,
                 interpolation: str = "linear") -> Path:
    """Resample a labelmap of subject A onto subject B's grid through atlas space (Atlas-ISTN Eq. 23:
    y_B = y_A o Phi_A o Phi_B^-1, with the pull-back of :func:`subject_to_subject_transform`).

    labelmap_a_path: integer labelmap in subject A's world space (any grid: e.g. A's
    refined labelmap or a reference segmentation), same dimension as the cases.
    out_path: file to write (``.nii.gz``, ``.png`` for 2D, ...), written atomically with
    :func:`atlasreg.data.io.write_image`; parent folders are created.
    labels: the declared label values, ``labels[0]`` the background (default: 0 plus the values present
    in the file). Every value of the file must be declared.
    interpolation: ``"linear"`` (default: each label's indicator is resampled with linear interpolation
    and each voxel takes the label of largest weight, ties to the earlier label) or ``"nearest"``.

    The output has B's input grid (size, spacing mm, origin mm, direction: those of B's
    :data:`INVERSE_FIELD`, i.e. of B's labelmap files) and only declared label values;
    B voxels that map outside A's labelmap get the background. Pixel type: UInt8 when all labels fit,
    else UInt16, else Int32.

    Returns out_path. Raises AtlasregError naming the file: labelmap missing, unreadable, non-integer,
    undeclared values (:func:`atlasreg.data.io.read_labelmap`), of another dimension than the cases;
    case folder or transform problems (:func:`subject_to_subject_transform`); B's
    :data:`INVERSE_FIELD` missing or unreadable; an output PNG that cannot hold the result.
    """
    if interpolation not in ("linear", "nearest"):
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    lab_path, out_path = Path(labelmap_a_path), Path(out_path)
    parts = _pull_back_parts(case_a, case_b)  # checks the cases first
    ndim = _dimension(parts)
    reference = _input_grid(case_b, ndim)
    transform = _composite(parts)
    if labels is None:
        labels = [0] + sorted(v for v in _present_labels(lab_path) if v != 0)
    labels = [int(v) for v in labels]
    if not labels or len(set(labels)) != len(labels):
        raise AtlasregError(f"the declared labels must be distinct and not empty, got {labels}", lab_path)
    lab = read_labelmap(lab_path, labels, require_foreground=False)
    if lab.GetDimension() != ndim:
        raise AtlasregError(f"labelmap is {lab.GetDimension()}D but the cases are {ndim}D", lab_path)
    pixel_id = _output_pixel_id(labels, out_path, ndim)

    # Evaluate the composite once on B's grid: exact at B's voxel centres (the only points sampled).
    dense = sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, reference.GetSize(), reference.GetOrigin(),
        reference.GetSpacing(), reference.GetDirection())
    pull = sitk.DisplacementFieldTransform(dense)
    grid_b = reference
    background = labels[0]

    if interpolation == "nearest":
        out = sitk.Resample(lab, grid_b, pull, sitk.sitkNearestNeighbor, float(background), lab.GetPixelID())
        out = sitk.Cast(out, pixel_id)
    else:
        weights = []
        for value in labels:
            indicator = sitk.Cast(sitk.Equal(lab, int(value)), sitk.sitkFloat32)
            res = sitk.Resample(indicator, grid_b, pull, sitk.sitkLinear,
                                1.0 if value == background else 0.0, sitk.sitkFloat32)
            weights.append(sitk.GetArrayViewFromImage(res).copy())
        index = np.argmax(np.stack(weights), axis=0)
        values = np.asarray(labels, dtype=np.int64)[index]
        dtype = {sitk.sitkUInt8: np.uint8, sitk.sitkUInt16: np.uint16, sitk.sitkInt32: np.int32}[pixel_id]
        out = sitk.GetImageFromArray(values.astype(dtype))
        out.CopyInformation(grid_b)
    return write_image(out, out_path)


# --------------------------------------------------------------------------------------------------
# points in CSV files


def read_points_csv(path, ndim: int | None = None) -> tuple[list[str], list[list[str]], np.ndarray]:
    """Read world points from a CSV file with a header row holding columns ``x``, ``y`` and, for 3D,
    ``z`` (case-insensitive, surrounding spaces ignored), in world units (mm); any other columns (e.g.
    ``name``) are kept.

    ndim: the expected dimension (2 or 3); None: 3 when there is a ``z`` column, else 2.
    Returns (header as written, data rows as lists of strings, points float64 (n, ndim)).

    Raises AtlasregError naming the file: missing or unreadable; empty or without a header; missing
    ``x``/``y`` column, duplicate coordinate column, a ``z`` column for 2D cases or none for 3D; a row
    with another number of fields than the header; an empty, non-numeric or non-finite coordinate
    (naming the line).
    """
    path = Path(path)
    if not path.exists():
        raise AtlasregError("file not found", path)
    if path.is_dir():
        raise AtlasregError("is a folder, not a CSV file", path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise AtlasregError(f"cannot read CSV file: {exc}", path) from None
    try:
        rows = [r for r in csv.reader(_stdio.StringIO(text)) if r and any(f.strip() for f in r)]
    except csv.Error as exc:
        raise AtlasregError(f"malformed CSV: {exc}", path) from None
    if not rows:
        raise AtlasregError("is empty; expected a header row with columns x,y[,z]", path)
    header, data = rows[0], rows[1:]
    keys = [h.strip().lower() for h in header]
    for c in _COORDS:
        if keys.count(c) > 1:
            raise AtlasregError(f"has more than one '{c}' column", path)
    if "x" not in keys or "y" not in keys:
        raise AtlasregError(f"needs columns x,y[,z] in its header row, found {header}", path)
    has_z = "z" in keys
    if ndim is None:
        ndim = 3 if has_z else 2
    if ndim == 2 and has_z:
        raise AtlasregError("has a z column but the cases are 2D", path)
    if ndim == 3 and not has_z:
        raise AtlasregError("has no z column but the cases are 3D", path)
    cols = [keys.index(c) for c in _COORDS[:ndim]]
    points = np.zeros((len(data), ndim), dtype=np.float64)
    line_numbers = _data_line_numbers(text)
    for i, row in enumerate(data):
        line = line_numbers[i] if i < len(line_numbers) else i + 2
        if len(row) != len(header):
            raise AtlasregError(f"line {line}: {len(row)} fields, the header has {len(header)}", path)
        for j, col in enumerate(cols):
            field = row[col].strip()
            try:
                value = float(field)
            except ValueError:
                raise AtlasregError(
                    f"line {line}: {_COORDS[j]} = '{field}' is not a number", path) from None
            if not math.isfinite(value):
                raise AtlasregError(f"line {line}: {_COORDS[j]} = '{field}' is not finite", path)
            points[i, j] = value
    return header, data, points


def _data_line_numbers(text: str) -> list[int]:
    """1-based line numbers where the non-blank data rows (after the header) start."""
    reader = csv.reader(_stdio.StringIO(text))
    numbers, first = [], True
    line = 1
    for row in reader:
        if row and any(f.strip() for f in row):
            if first:
                first = False
            else:
                numbers.append(line)
        line = reader.line_num + 1
    return numbers


def write_points_csv(path, header: Sequence[str], rows: Sequence[Sequence[str]], points: np.ndarray) -> Path:
    """Write rows of a points CSV (as returned by :func:`read_points_csv`) with their ``x``, ``y``[, ``z``]
    fields replaced by ``points`` (n, D) (world mm, written with 6 decimals, i.e. to 1 nm); other columns
    unchanged. Atomic (:func:`atlasreg.data.io.write_text`). Returns the path."""
    keys = [h.strip().lower() for h in header]
    cols = [keys.index(c) for c in _COORDS[:points.shape[1]]]
    buffer = _stdio.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row, p in zip(rows, points):
        row = list(row)
        for col, v in zip(cols, p):
            row[col] = f"{float(v):.6f}"
        writer.writerow(row)
    return write_text(path, buffer.getvalue())


def map_points_csv(points_csv, case_a, case_b, out_path) -> Path:
    """Map the points of a CSV file (world mm of subject A, columns x,y[,z]; see
    :func:`read_points_csv`) to subject B with :func:`map_points` and write them, with the other columns
    kept, to ``out_path`` (atomically). Returns out_path. Raises AtlasregError naming the file for bad
    CSV files, case folders or transforms."""
    header, rows, points = read_points_csv(points_csv, ndim=_dimension(_read_parts(case_a, "inverse")[0]))
    mapped = map_points(points, case_a, case_b)
    return write_points_csv(out_path, header, rows, mapped)


# --------------------------------------------------------------------------------------------------
# command line


def cmd_correspond(args) -> int:
    """``atlasreg correspond``: map a labelmap or CSV points of one segmented case onto another."""
    from .data.io import check_output_file, remove_temporaries

    out_file = check_output_file(args.out)  # before anything is read or written
    remove_temporaries(out_file.parent, name=out_file.name)  # those a killed run left beside it
    case_a, case_b = Path(args.from_case), Path(args.to_case)
    if args.labelmap:
        labels = _parse_labels(args.labels) if getattr(args, "labels", None) else None
        out = map_labelmap(args.labelmap, case_a, case_b, args.out, labels=labels,
                           interpolation=getattr(args, "interpolation", "linear"))
        print(f"labelmap of {case_a.name} on the grid of {case_b.name}: {out}")
    else:
        out = map_points_csv(args.points, case_a, case_b, args.out)
        print(f"points of {case_a.name} mapped to {case_b.name}: {out}")
    return 0


def _parse_labels(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise AtlasregError(f"--labels expects comma-separated integers, background first (e.g. 0,1,2), "
                            f"got '{text}'") from None


def add_correspond_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``correspond`` command to an argparse sub-parser collection (``add_subparsers()``) and
    return its parser; it runs :func:`cmd_correspond`. Defined in :func:`atlasreg.cli.add_correspond_parser`,
    which builds it without importing this module (torch, SimpleITK)."""
    from .cli import add_correspond_parser as add

    return add(subparsers)
