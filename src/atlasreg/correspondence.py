"""Inter-subject correspondence through atlas space (Atlas-ISTN, Sinclair et al. 2022, Sec. 3.2
'Inter-Subject Correspondence', Eqs. 22-23): map points and labelmaps of one segmented subject onto
another by composing the transforms to and from the common atlas.

Inputs are two case folders written by ``atlasreg segment`` (see :mod:`atlasreg.segment`), each with

* ``inverse_displacement.nii.gz`` -- Phi^-1: a subject point p (world, mm) maps to the atlas point
  ``p + d_inv(p)``. Sampled on the subject's input grid.
* ``forward_displacement.nii.gz`` -- Phi: an atlas point q maps to the subject point ``q + d_fwd(q)``.
  Sampled on the same grid, with the atlas *placed on the subject's input grid*: an atlas point of
  grid-centred model coordinates ``x`` (mm along the image axes) lies at world ``q = c + R x``, where
  ``c`` is the world position of the input grid's centre and ``R`` its direction matrix (the model grid
  and the native grid share centre and direction: :meth:`atlasreg.spatial.grid.Grid.resampled`).

Both fields are vector images in world units along the world axes, ITK displacement-field convention.
(Naming: the paper calls Phi_i "the transformation from subject i to atlas space", the direction in
which it moves images; as a map of *points*, which is how it enters the compositions of Eqs. 22-23
(y_i^a = y^a o Phi_i^-1) and how it is used here and in :mod:`atlasreg.segment`, Phi maps atlas points
to subject points and Phi^-1 subject points to atlas points.)

Because each subject's copy of the atlas sits on its own grid, going from subject A's atlas frame to
subject B's needs the rigid change of frame (the same atlas coordinate ``x`` in both)::

    F_{A->B}(q_A) = c_B + R_B R_A^T (q_A - c_A)

Point push-forward A -> B (Eq. 23 applied to points)::

    p_B = Phi_B( F_{A->B}( Phi_A^-1(p_A) ) )          uses A's inverse field, B's forward field

Pull-back for resampling A's images onto B's grid (Eq. 23 applied to images, y_B = y_A o T)::

    T_{B->A}(p_B) = Phi_A( F_{B->A}( Phi_B^-1(p_B) ) )  uses B's inverse field, A's forward field

ITK's resampling convention: ``sitk.Resample(moving, reference, T)`` sets each output voxel at point p
of the reference grid to ``moving(T(p))``; T maps *output* points to *input* points (a pull-back). Hence
resampling A's labelmap onto B's grid needs T_{B->A}, built from B's inverse and A's forward field, and
mapping points needs the opposite composition. Neither needs a field to be inverted numerically; the
two compositions are inverses of each other as far as each case's forward and inverse fields are
(the paper's inverse consistency, MICE / IC-DSC of Table 6).

``sitk.DisplacementFieldTransform`` interpolates a field linearly and gives a *zero* displacement for
points farther than half a voxel outside the field's grid; :func:`map_points` warns when a point falls
there.
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

from .data import io as _io
from .data.io import read_any, read_labelmap, write_image, write_text
from .errors import AtlasregError
from .spatial.grid import Grid

__all__ = [
    "FORWARD_FIELD",
    "INVERSE_FIELD",
    "read_displacement_field",
    "frame_change_transform",
    "subject_to_subject_transform",
    "map_points",
    "map_labelmap",
    "read_points_csv",
    "write_points_csv",
    "map_points_csv",
    "cmd_correspond",
    "add_correspond_parser",
]

FORWARD_FIELD = "forward_displacement.nii.gz"
INVERSE_FIELD = "inverse_displacement.nii.gz"
_FIELD_FILES = {"forward": FORWARD_FIELD, "inverse": INVERSE_FIELD}
_COORDS = ("x", "y", "z")


# --------------------------------------------------------------------------------------------------
# displacement fields and transforms


def _one_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Exception thrown in SimpleITK")]
    text = lines[-1] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _case_dir(case) -> Path:
    case = Path(case)
    if not case.exists():
        raise AtlasregError("case folder not found", case)
    if not case.is_dir():
        raise AtlasregError("is not a folder; expected a case output folder of `atlasreg segment`", case)
    return case


def read_displacement_field(case, which: str) -> sitk.Image:
    """Read and check one displacement field of a case folder of ``atlasreg segment``.

    case: the case folder; which: ``"forward"`` (Phi, atlas -> subject, ``forward_displacement.nii.gz``)
    or ``"inverse"`` (Phi^-1, subject -> atlas, ``inverse_displacement.nii.gz``).

    Returns a ``sitkVectorFloat64`` image of D components (D = 2 or 3, the image dimension), world units
    (mm) along the world axes, with the subject input image's size, spacing, origin and direction.

    Raises AtlasregError naming the folder (missing, not a folder) or the field file (missing -- the
    model did not register, e.g. a U-Net without a fixed atlas --, unreadable, not a D-component vector
    image, not 2D/3D, NaN or infinite displacements).
    """
    if which not in _FIELD_FILES:
        raise ValueError(f"which must be 'forward' or 'inverse', got {which!r}")
    path = _case_dir(case) / _FIELD_FILES[which]
    if not path.is_file():
        raise AtlasregError(
            f"{which} displacement field not found; `atlasreg segment` writes it for models that register "
            "the atlas (Atlas-ISTN, VML, a U-Net with a fixed atlas)", path)
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
    check = getattr(_io, "_nifti_has_nonfinite", None)  # ITK 5 reads NaN in NIfTI as 0; look at the bytes
    if nonfinite or (check is not None and check(path)):
        raise AtlasregError("displacement field contains NaN or infinite values", path)
    return field


def _field_dimension(case, which: str) -> int:
    """Dimension of a case's field from its header only (a full read when that fails, for the error)."""
    path = _case_dir(case) / _FIELD_FILES[which]
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        return int(reader.GetDimension())
    except RuntimeError:
        return read_displacement_field(case, which).GetDimension()


def _frame(field: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(centre c (D,), direction R (D, D), orthonormalised) of a field's (= the input image's) grid."""
    grid = Grid.from_sitk(field)
    u, _, vt = np.linalg.svd(grid.direction_matrix)  # NIfTI stores directions in float32: clean them
    return np.asarray(grid.centre, dtype=np.float64), u @ vt


def frame_change_transform(from_grid: sitk.Image | Grid, to_grid: sitk.Image | Grid) -> sitk.AffineTransform:
    """Rigid change of atlas frame between two subjects' grids: ``q -> c_to + R_to R_from^T (q - c_from)``.

    from_grid / to_grid: images (any pixel type, e.g. the displacement fields) or
    :class:`~atlasreg.spatial.grid.Grid` objects whose centre ``c`` (world mm) and direction ``R`` place
    the atlas for each subject (the atlas point of model coordinates x lies at ``c + R x``). Returns a
    D-dimensional ``sitk.AffineTransform`` (a rotation, or a rotation-reflection when the handedness of
    the two directions differs, plus a translation; lengths are kept).
    """
    c_from, r_from = _frame_of(from_grid)
    c_to, r_to = _frame_of(to_grid)
    if c_from.shape != c_to.shape:
        raise ValueError(f"grids of different dimension: {c_from.size}D and {c_to.size}D")
    t = sitk.AffineTransform(int(c_from.size))
    t.SetMatrix((r_to @ r_from.T).ravel().tolist())
    t.SetCenter(c_from.tolist())
    t.SetTranslation((c_to - c_from).tolist())  # y = M (q - c_from) + c_from + (c_to - c_from)
    return t


def _frame_of(grid) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(grid, Grid):
        u, _, vt = np.linalg.svd(grid.direction_matrix)
        return np.asarray(grid.centre, dtype=np.float64), u @ vt
    return _frame(grid)


def _check_same_dimension(a: sitk.Image, b: sitk.Image, case_a, case_b, which_b: str) -> None:
    if a.GetDimension() != b.GetDimension():
        raise AtlasregError(
            f"case is {b.GetDimension()}D but {Path(case_a)} is {a.GetDimension()}D; correspondence needs "
            "two cases of the same dimension", Path(case_b) / _FIELD_FILES[which_b])


def _compose(first_field: sitk.Image, frame: sitk.Transform, last_field: sitk.Image) -> sitk.CompositeTransform:
    """last_field o frame o first_field (each field as a DisplacementFieldTransform, p -> p + d(p))."""
    dim = first_field.GetDimension()
    composite = sitk.CompositeTransform(dim)
    # SimpleITK applies a CompositeTransform's transforms last-added first.
    composite.AddTransform(sitk.DisplacementFieldTransform(sitk.Image(last_field)))
    composite.AddTransform(frame)
    composite.AddTransform(sitk.DisplacementFieldTransform(sitk.Image(first_field)))
    return composite


def subject_to_subject_transform(case_a, case_b) -> sitk.Transform:
    """The pull-back from subject B to subject A through atlas space (Atlas-ISTN Eqs. 22-23).

    ``T(p_B) = Phi_A( F_{B->A}( Phi_B^-1(p_B) ) )``: given a world point of subject B (mm), returns the
    corresponding world point of subject A (mm). Built from B's ``inverse_displacement.nii.gz``, the
    rigid change of atlas frame ``F_{B->A}(q) = c_A + R_A R_B^T (q - c_B)`` and A's
    ``forward_displacement.nii.gz``.

    This is the transform ITK's resampling wants to bring A's images onto B's grid:
    ``sitk.Resample(image_of_A, grid_of_B, T, ...)`` samples A at ``T(p)`` for every voxel p of B
    (Eq. 23 with i = A, j = B: y_B = y_A o T). To move *points* from A to B use :func:`map_points`
    (the opposite composition).

    Returns a D-dimensional ``sitk.CompositeTransform`` (D = 2 or 3). Points farther than half a voxel
    outside a field's grid get a zero displacement from that field.

    Raises AtlasregError naming the folder or file: case folder missing; displacement field missing,
    unreadable or invalid (:func:`read_displacement_field`); A and B of different dimension.
    """
    return _pull_back(case_a, case_b)[0]


def _pull_back(case_a, case_b) -> tuple[sitk.CompositeTransform, sitk.Image]:
    """(the transform of :func:`subject_to_subject_transform`, B's inverse field)."""
    inv_b = read_displacement_field(case_b, "inverse")
    fwd_a = read_displacement_field(case_a, "forward")
    _check_same_dimension(fwd_a, inv_b, case_a, case_b, "inverse")
    return _compose(inv_b, frame_change_transform(inv_b, fwd_a), fwd_a), inv_b


def _outside(points: np.ndarray, image: sitk.Image) -> np.ndarray:
    """(n,) bool: points (n, D) farther than half a voxel outside the image grid, where ITK's
    DisplacementFieldTransform gives a zero displacement."""
    grid = Grid.from_sitk(image)
    scaled = np.linalg.inv(grid.direction_matrix @ np.diag(grid.spacing))
    index = (points - np.asarray(grid.origin)) @ scaled.T  # continuous indices (n, D), ITK order
    size = np.asarray(grid.size_xyz)
    tol = 1e-6
    return np.any((index < -0.5 - tol) | (index > size - 0.5 + tol), axis=1)


def map_points(points_a, case_a, case_b, warn: bool = True) -> np.ndarray:
    """Push world points of subject A to subject B through atlas space (Atlas-ISTN Eqs. 22-23).

    ``p_B = Phi_B( F_{A->B}( Phi_A^-1(p_A) ) )`` with A's ``inverse_displacement.nii.gz`` (A -> atlas in
    A's frame), the rigid change of atlas frame ``F_{A->B}(q) = c_B + R_B R_A^T (q - c_A)`` and B's
    ``forward_displacement.nii.gz`` (atlas in B's frame -> B).

    points_a: array-like (n, D) of world coordinates in mm, ITK order (x, y[, z]); n may be 0.
    Returns a float64 array (n, D) of world coordinates in mm of subject B.

    When ``warn``, issues a UserWarning counting the points that lie outside A's field grid, or whose
    atlas point lies outside B's field grid (a zero displacement is used there, so their mapping is
    unreliable).

    Raises ValueError when points_a is not a finite (n, D) array; AtlasregError naming the folder or
    file as :func:`subject_to_subject_transform` does, and naming case_a when D is not the cases'
    dimension.
    """
    pts = np.asarray(points_a, dtype=np.float64)
    if pts.ndim != 2:
        raise ValueError(f"points must be an (n, D) array, got shape {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise ValueError("points contain NaN or infinite coordinates")
    inv_a = read_displacement_field(case_a, "inverse")
    fwd_b = read_displacement_field(case_b, "forward")
    _check_same_dimension(inv_a, fwd_b, case_a, case_b, "forward")
    dim = inv_a.GetDimension()
    if pts.shape[1] != dim:
        raise AtlasregError(f"points have {pts.shape[1]} coordinates but the cases are {dim}D", case_a)
    frame = frame_change_transform(inv_a, fwd_b)
    outside_a = _outside(pts, inv_a)
    to_atlas = sitk.DisplacementFieldTransform(sitk.Image(inv_a))
    atlas_b = np.array([frame.TransformPoint(to_atlas.TransformPoint(p.tolist())) for p in pts],
                       dtype=np.float64).reshape(-1, dim)
    outside_b = _outside(atlas_b, fwd_b)
    to_b = sitk.DisplacementFieldTransform(sitk.Image(fwd_b))
    out = np.array([to_b.TransformPoint(q.tolist()) for q in atlas_b], dtype=np.float64).reshape(-1, dim)
    if warn and (outside_a.any() or outside_b.any()):
        warnings.warn(
            f"{int(outside_a.sum())} of {len(pts)} point(s) lie outside the grid of {Path(case_a)} and "
            f"{int(outside_b.sum())} map to atlas points outside the grid of {Path(case_b)}; a zero "
            "displacement is used there", stacklevel=2)
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
    y_B = y_A o Phi_A o F_{B->A} o Phi_B^-1, with the pull-back of :func:`subject_to_subject_transform`).

    labelmap_a_path: integer labelmap in subject A's world space (any grid: e.g. A's
    ``refine_labelmap.png`` or a reference segmentation), same dimension as the cases.
    out_path: file to write (``.nii.gz``, ``.png`` for 2D, ...), written atomically with
    :func:`atlasreg.data.io.write_image`; parent folders are created.
    labels: the declared label values, ``labels[0]`` the background (default: 0 plus the values present
    in the file). Every value of the file must be declared.
    interpolation: ``"linear"`` (default: each label's indicator is resampled with linear interpolation
    and each voxel takes the label of largest weight, ties to the earlier label) or ``"nearest"``.

    The output has B's input grid (size, spacing mm, origin mm, direction: those of B's displacement
    fields, i.e. of B's ``*_labelmap`` files) and only declared label values; B voxels that map outside
    A's labelmap get the background. Pixel type: UInt8 when all labels fit, else UInt16, else Int32.

    Returns out_path. Raises AtlasregError naming the file: labelmap missing, unreadable, non-integer,
    undeclared values (:func:`atlasreg.data.io.read_labelmap`), of another dimension than the cases;
    case folder or displacement field problems (:func:`subject_to_subject_transform`); an output PNG
    that cannot hold the result.
    """
    if interpolation not in ("linear", "nearest"):
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    lab_path, out_path = Path(labelmap_a_path), Path(out_path)
    transform, reference = _pull_back(case_a, case_b)  # checks the cases first; B's field: B's grid
    ndim = reference.GetDimension()
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
    grid_b = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
    grid_b.CopyInformation(reference)
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
    CSV files, case folders or displacement fields."""
    header, rows, points = read_points_csv(points_csv, ndim=_field_dimension(case_a, "inverse"))
    mapped = map_points(points, case_a, case_b)
    return write_points_csv(out_path, header, rows, mapped)


# --------------------------------------------------------------------------------------------------
# command line


def cmd_correspond(args) -> int:
    """``atlasreg correspond``: map a labelmap or CSV points of one segmented case onto another."""
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
    return its parser; it sets ``func=cmd_correspond``."""
    c = subparsers.add_parser(
        "correspond", help="map a labelmap or points of one segmented case onto another via the atlas "
        "(Eqs. 22-23)",
        description="Inter-subject correspondence through atlas space (Atlas-ISTN Eqs. 22-23), using the "
        "displacement fields that `atlasreg segment` writes in each case folder.")
    c.add_argument("--from", dest="from_case", required=True, metavar="CASE_DIR",
                   help="case folder of `atlasreg segment` of the source subject A")
    c.add_argument("--to", dest="to_case", required=True, metavar="CASE_DIR",
                   help="case folder of `atlasreg segment` of the target subject B")
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--labelmap", metavar="FILE",
                      help="labelmap of A to resample onto B's grid (e.g. CASE_DIR/refine_labelmap.nii.gz)")
    what.add_argument("--points", metavar="FILE.csv",
                      help="CSV of world points (mm) of A, columns x,y[,z] (other columns are kept)")
    c.add_argument("--out", required=True, metavar="FILE",
                   help="output labelmap (.nii.gz, .png, ...) or CSV file")
    c.add_argument("--labels", metavar="L0,L1,...",
                   help="declared label values, background first (default: 0 and the values present)")
    c.add_argument("--interpolation", choices=("linear", "nearest"), default="linear",
                   help="labelmap interpolation: per-label linear + argmax (default) or nearest neighbour")
    c.set_defaults(func=cmd_correspond)
    return c
