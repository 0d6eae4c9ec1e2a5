"""From files to model-grid tensors: read (with geometry), validate, normalise, one-hot, resample."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import AtlasregError
from ..spatial.grid import Grid
from .dataset import CasePair, dicom_stem, find_pairs, select_cases
from .io import NO_GEOMETRY_FORMATS, has_no_spacing  # noqa: F401 (defined in io, which the report uses without torch)
from .io import check_dimension, is_dicom_file, read_image, read_labelmap, same_geometry
from ..spatial.transforms import AffineTransform, resample
from .placement import canonical_direction, mask_centroid, orientation_candidates, overlap_score, place
from .preprocessing import one_hot, values_to_indices


@dataclass(frozen=True)
class Preprocessing:
    """How a file becomes model-grid tensors (config ``data`` and ``model``; docs/architecture.md).

    labels: declared label values (channel order, background first); size: model grid size (array
    order, voxels); spacing: model grid spacing (ITK order, mm); ndim: 2 or 3.
    spacing_override: spacing (ITK order, mm) for files that store none: formats without geometry
    (PNG, JPEG, BMP, TIFF) and headers with unit spacing and identity direction (NIfTI whose pixdim
    was lost, e.g. ACDC); outputs keep the file's own header.
    orientation: 'native' (model axes along the file's axes) or an axis code such as 'RAS' (every
    volume resampled onto the same anatomical axes, from its header's direction);
    orientation_search: 'none' | 'in_plane' | 'axes': discrete flips and axis swaps tried per case
    against a reference labelmap (:mod:`atlasreg.data.placement`); reference: the labelmap file of the
    training-time reference (None: no search at training time).
    centre: where the model grid is centred: 'image' (the image centre), 'foreground' (centroid of the
    voxels above `foreground_threshold`), 'labels' (centroid of the labelmap's foreground in training;
    at test time of the ITN's first pass).
    intensity: 'zscore' (whole image), 'zscore_foreground' (mean and SD of the voxels above
    `foreground_threshold`, for skull-stripped MRI) or 'rescale' (clip range to [0, 1], for CT);
    applied after clipping to `clip_range` (raw units, e.g. a CT window) and/or `clip_percentiles`
    (e.g. (0.5, 99.5) for MRI). pad_value: raw intensity outside the scan (None: the image minimum);
    labels are padded with background, and the loss is masked outside the scan's field of view."""

    labels: tuple[int, ...]
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    ndim: int
    spacing_override: tuple[float, ...] | None = None
    orientation: str = "native"
    orientation_search: str = "none"
    reference: str | None = None
    centre: str = "image"
    intensity: str = "zscore"
    clip_range: tuple[float, float] | None = None
    clip_percentiles: tuple[float, float] | None = None
    foreground_threshold: float = 0.0
    pad_value: float | None = None

    @classmethod
    def from_config(cls, cfg: dict) -> "Preprocessing":
        """From a merged experiment config (``data`` and ``model`` sections)."""
        m, d = cfg["model"], cfg["data"]
        spacing = d.get("spacing")
        pre = d.get("preprocessing") or {}

        def pair(v):
            return None if v is None else tuple(float(x) for x in v)
        return cls(tuple(int(v) for v in d["labels"]), tuple(int(s) for s in m["size"]),
                   tuple(float(s) for s in m["spacing"]), int(m["ndim"]), pair(spacing),
                   pre.get("orientation", "native"), pre.get("orientation_search", "none"),
                   pre.get("reference"), pre.get("centre", "image"), pre.get("intensity", "zscore"),
                   pair(pre.get("clip_range")), pair(pre.get("clip_percentiles")),
                   float(pre.get("foreground_threshold", 0.0)),
                   None if pre.get("pad_value") is None else float(pre["pad_value"]))

    @property
    def model_grid(self) -> Grid:
        """The model grid (:meth:`Grid.centred` of size and spacing)."""
        return Grid.centred(self.size, self.spacing)

    def key(self) -> str:
        """Hex digest of these settings and of the preprocessing code (the cache folder's name)."""
        from .case_dataset import preprocessing_key

        return preprocessing_key(self)


@dataclass
class Case:
    """One case on the model grid placed on it.

    image: (1, 1, *size) normalised; labelmap: (1, C, *size) soft one-hot or None; mask: (1, 1, *size)
    the fraction of each model voxel inside the scan (0 outside its field of view); grid: the file's
    own grid (outputs are written on it, with its header); physical: the same voxels with the
    declared spacing where the file stores none (else equal to grid); placed: the model grid placed on
    the case in the physical world (:mod:`atlasreg.data.placement`); source: the image as read (raw
    intensities, the file's header); stats: the intensity normalisation (lo, hi, scale, offset)."""

    name: str
    image: torch.Tensor
    labelmap: torch.Tensor | None
    grid: Grid
    source: sitk.Image
    path: str
    physical: Grid | None = None
    placed: Grid | None = None
    mask: torch.Tensor | None = None
    stats: tuple | None = None

    def __post_init__(self):
        if self.physical is None:
            self.physical = self.grid

    def file_to_physical(self) -> AffineTransform | None:
        """The affine map from the file's world coordinates to the physical ones (where the declared
        spacing replaced a missing one), or None when they agree."""
        if self.physical == self.grid:
            return None
        to_f = AffineTransform.from_numpy(*_index_to_world(self.grid), torch.float64)
        to_p = AffineTransform.from_numpy(*_index_to_world(self.physical), torch.float64)
        return to_p.compose(to_f.inverse())

    def frame(self, dtype=torch.float32, device=None) -> AffineTransform:
        """Model (atlas) coordinates -> the file's world coordinates: the placed grid's frame, then the
        physical -> file map (an :class:`AffineTransform` of batch 1)."""
        frame = AffineTransform.grid_frame(self.placed, dtype=torch.float64)
        m = self.file_to_physical()
        if m is not None:
            frame = m.inverse().compose(frame)
        return AffineTransform(frame.matrix.to(device=device, dtype=dtype),
                               frame.translation.to(device=device, dtype=dtype))


def _index_to_world(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """(M, o): world = M @ index + o (ITK order)."""
    return grid.direction_matrix @ np.diag(grid.spacing), np.asarray(grid.origin, dtype=np.float64)


def physical_grid(image: sitk.Image, spacing_override, path) -> Grid:
    """The grid of `image` with `spacing_override` (config ``data.spacing``) where the file stores no
    spacing (:func:`has_no_spacing`); the file's own grid otherwise."""
    grid = Grid.from_sitk(image)
    if spacing_override is not None and has_no_spacing(image, path):
        if len(spacing_override) != grid.ndim:
            raise AtlasregError(f"data.spacing {list(spacing_override)} does not match the {grid.ndim}D image", path)
        grid = Grid(grid.size, tuple(float(s) for s in spacing_override), grid.origin, grid.direction)
    return grid


def load_case(image_path, label_path, prep: Preprocessing, require_foreground: bool = True,
              name: str | None = None, placement: Grid | None = None) -> Case:
    """Read one image (and labelmap), check them, and resample them onto the model grid placed on the
    case (:func:`placement_of`, or `placement` when given: the test-time second pass). Raises
    AtlasregError naming the file for every bad input, among them an image with a single voxel along
    an axis (:func:`check_voxels`) and one that covers no voxel centre of the model grid (e.g. 4x4
    voxels of 0.1 mm on 2 mm model voxels: nothing to segment). Degenerate inputs that can still be
    segmented give one warning per file and process (``warnings.warn("<file>: ...")``, see
    :func:`_warn_once`): an image whose intensities are one value after clipping ("constant
    intensity 7: normalised to zeros"; the normalised image and its padding are then 0, never NaN)
    and content cut off by the model's field of view (:func:`cropping_message`)."""
    image = read_image(image_path)
    check_dimension(image, prep.ndim, image_path)
    check_voxels(image, image_path)
    indices = None
    if label_path is not None:
        lab = read_labelmap(label_path, prep.labels, require_foreground=False)
        if lab.GetSize() != image.GetSize():
            raise AtlasregError(f"size {lab.GetSize()} differs from image {image_path} {image.GetSize()}",
                                label_path)
        if not same_geometry(lab, image):
            raise AtlasregError(f"geometry (spacing, origin or direction) differs from image {image_path}",
                                label_path)
        idx = values_to_indices(sitk.GetArrayFromImage(lab), prep.labels)
        if require_foreground and not idx.any():
            raise AtlasregError(f"has no foreground (only label {prep.labels[0]})", label_path)
        indices = idx
    return _case_on_model_grid(image, indices, prep, name or case_name(image_path), str(image_path), placement)


def _case_on_model_grid(image: sitk.Image, indices: np.ndarray | None, prep: Preprocessing, name: str,
                        path: str, placement: Grid | None = None) -> Case:
    """The checked image (and label indices on its grid) as a :class:`Case` on the model grid placed
    on it (:func:`placement_of` unless `placement` is given): the one path of files and in-memory images."""
    where = path or f"image {name!r}"
    phys = physical_grid(image, prep.spacing_override, path or name)
    array = sitk.GetArrayFromImage(image)
    stats = intensity_stats(array, prep)
    if stats[1] <= stats[0]:
        _warn_once(_constant_message(array, stats), where, once=bool(path))
    if placement is None:
        placement = placement_of(array, indices, phys, prep)
    img_t, mask = image_on_grid(array, phys, placement, stats, prep, where)
    if not bool(mask.any()):
        extent = "x".join(f"{n * s:.4g}" for n, s in zip(phys.size_xyz, phys.spacing))
        raise AtlasregError(f"image extent {extent} mm covers no voxel centre of the model grid (spacing "
                            f"{'x'.join(f'{s:.4g}' for s in prep.spacing)} mm); nothing to segment", where)
    cropped = cropping_message(array, indices, phys, placement, prep)
    if cropped is not None:
        _warn_once(cropped, where, once=bool(path))
    lab_t = None if indices is None else labels_on_grid(indices, len(prep.labels), phys, placement)
    return Case(name, img_t, lab_t, Grid.from_sitk(image), image, path, phys, placement, mask, stats)


def check_voxels(image: sitk.Image, where) -> None:
    """Raise AtlasregError naming `where` ("image is 1x1 voxels; a 2D model needs at least 2 voxels
    along every axis (nothing to segment)") for an image with a single voxel along any axis: a 1x1
    or 1x1x1 image, a 1xN strip, a 3D volume of one slice. Linear resampling onto the model grid
    interpolates between neighbouring voxels; along an axis of one voxel there is no neighbour, so
    the image is a point, a line or a plane, not a 2D or 3D image: it covers only the model voxels
    whose centres fall inside its one voxel's width (often none: the whole case would be padding,
    its labelmap background, its field-of-view mask 0), and the model has nothing to segment."""
    size = image.GetSize()
    if min(size) < 2:
        raise AtlasregError(f"image is {'x'.join(str(n) for n in size)} voxels; a {len(size)}D model needs at "
                            "least 2 voxels along every axis (nothing to segment)", where)


#: (file, message) of every degenerate-input warning given in this process (:func:`_warn_once`).
_WARNED: set[tuple[str, str]] = set()


def _warn_once(message: str, where: str, once: bool = True) -> None:
    """``warnings.warn("<where>: <message>")`` (`where`: the file) the first time this process meets
    this file and message when `once`: a file is read more than once per run (training reads a case
    every epoch when the case cache is off), and a degenerate input is reported once. Images in memory
    (``once=False``) are reported every time. (DataLoader workers are separate processes: with
    ``data.num_workers > 0`` and ``data.cache: false``, each epoch's workers report a case again; with
    the cache, a case is read from its files once. ``atlasreg segment`` reads its cases in workers and
    shows their warnings once per run.)"""
    if once:
        key = (str(where), message)
        if key in _WARNED:
            return
        _WARNED.add(key)
    warnings.warn(f"{where}: {message}", stacklevel=3)


def _constant_message(array: np.ndarray, stats) -> str:
    """What a warning says of an image whose clipped intensities are one value (normalised to 0)."""
    a_lo, a_hi = float(array.min()), float(array.max())
    if a_lo == a_hi:
        return f"constant intensity {a_lo:.6g}: normalised to zeros"
    return (f"intensities in [{a_lo:.6g}, {a_hi:.6g}] are all {stats[0]:.6g} after clipping; normalised to "
            "zeros")


#: Fraction of the content's voxels outside the model grid from which :func:`cropping_message` warns: a
#: sliver at the edge of a structure that nearly fills the field of view is not worth a warning (the
#: mouse brain scans lose 0.02-0.16% of their foreground voxels at the edge of the model grid).
CROP_WARNING_FRACTION = 0.01


def cropping_message(array: np.ndarray, indices: np.ndarray | None, phys: Grid, placed: Grid,
                     prep: Preprocessing) -> str | None:
    """What a warning says when the content that the model grid is centred on (``prep.centre``: the
    whole image; the voxels above ``foreground_threshold``; the labelled voxels, checked only when a
    labelmap is given) lies partly outside the placed model grid `placed`, i.e. is cropped; None
    when less than :data:`CROP_WARNING_FRACTION` of its voxels lie outside. array: raw image (array order) and indices: label indices, both on
    `phys`, the case's physical grid (mm).

    The extent (mm, ITK order along the model's axes) is that of the content's bounding box in the
    image's voxels (voxel edges), so exact where the model's axes follow the image's (``orientation:
    native``) and an upper bound otherwise. A voxel counts as outside when its centre lies outside the
    model grid's field of view (size x spacing around its centre); the fraction outside is counted by
    nearest-neighbour resampling of the model grid's support onto the image grid (SimpleITK), only
    when a corner of the bounding box lies outside (a convex field of view then holds the whole box)."""
    if prep.centre == "labels":
        if indices is None:  # test time: the structure is found by the ITN's first pass (predict.localise)
            return None
        content, what, of = indices > 0, "the labelled structures", "their voxels"
    elif prep.centre == "foreground":
        content = array > prep.foreground_threshold
        what, of = f"the foreground (intensities above {prep.foreground_threshold:g})", "its voxels"
    else:
        content, what, of = None, "the image", "the image's voxels"
    if content is not None and not content.any():
        content, what, of = None, "the image", "the image's voxels"  # placed on the image centre
    if content is None:
        first, last = np.zeros(phys.ndim, dtype=np.int64), np.asarray(phys.size) - 1
    else:
        nonzero = [np.flatnonzero(content.any(axis=tuple(j for j in range(phys.ndim) if j != k)))
                   for k in range(phys.ndim)]
        first = np.array([n[0] for n in nonzero])
        last = np.array([n[-1] for n in nonzero])
    # bounding box corners (voxel centres, ITK order) -> continuous indices of the placed grid
    lo, hi = first[::-1].astype(np.float64), last[::-1].astype(np.float64)
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(phys.ndim, -1)
    to_world = phys.direction_matrix @ np.diag(phys.spacing)
    world = to_world @ corners + np.asarray(phys.origin)[:, None]
    from_world = np.diag(1.0 / np.asarray(placed.spacing)) @ placed.direction_matrix.T
    index = from_world @ (world - np.asarray(placed.origin)[:, None])
    size = np.asarray(placed.size_xyz, dtype=np.float64)[:, None]
    if np.all(index >= -0.5 - 1e-6) and np.all(index <= size - 0.5 + 1e-6):
        return None
    support = sitk.Image(list(placed.size_xyz), sitk.sitkUInt8) + 1
    placed.copy_information_to(support)
    inside = sitk.GetArrayFromImage(sitk.Resample(support, phys.reference_image(), sitk.Transform(),
                                                  sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)) > 0
    total = int(content.sum()) if content is not None else inside.size
    outside = total - int((inside & content).sum() if content is not None else inside.sum())
    if outside < CROP_WARNING_FRACTION * total:
        return None
    # extent of the box (voxel edges) along the model's axes
    counts = (hi - lo + 1.0) * np.asarray(phys.spacing)
    along = np.abs(placed.direction_matrix.T @ phys.direction_matrix) @ counts
    fov = np.asarray(placed.size_xyz) * np.asarray(placed.spacing)
    fmt = "x".join
    text = (f"extent {fmt(f'{v:.4g}' for v in along)} mm of {what} "
            + ("exceeds" if np.any(along > fov * (1 + 1e-6)) else "lies partly outside")
            + f" the model's field of view {fmt(f'{v:.4g}' for v in fov)} mm: {100.0 * outside / total:.3g}% "
            f"of {of} lie outside and were cropped; the region around "
            f"({', '.join(f'{c:.6g}' for c in placed.centre)}) mm was used")
    return text


def placement_of(array: np.ndarray, indices: np.ndarray | None, phys: Grid, prep: Preprocessing,
                 probabilities: torch.Tensor | None = None, prob_grid: Grid | None = None,
                 reference: torch.Tensor | None = None) -> Grid:
    """The model grid placed on a case (centre and direction, :mod:`atlasreg.data.placement`).
    array: raw image (array order) on `phys`; indices: label indices on `phys` or None; probabilities
    (1, C, *S) on `prob_grid`: the ITN's first pass (test time, for centre 'labels' and the
    orientation search, scored against `reference` (1, C, *S) on the model grid, the atlas labelmap).
    Only the probabilities' argmax is used: the softmax of logits regressed onto one-hot labels (MSE,
    Sec. 2.1) is soft, its background below 0.5 nearly everywhere, so thresholding it finds the whole
    grid. Falls back to the image centre when no foreground is found."""
    model = prep.model_grid
    if probabilities is not None:
        probabilities = one_hot(probabilities.argmax(1), probabilities.shape[1])
    base = canonical_direction(prep.orientation, prep.ndim, phys.direction_matrix)
    centre = None
    if prep.centre == "foreground":
        centre = mask_centroid(array > prep.foreground_threshold, phys)
    elif prep.centre == "labels":
        if indices is not None:
            centre = mask_centroid(indices > 0, phys)
        elif probabilities is not None:
            centre = mask_centroid(probabilities[0, 0].cpu().numpy() < 0.5, prob_grid)
    if centre is None:
        centre = phys.centre
    candidates = orientation_candidates(prep.orientation_search, prep.ndim)
    if len(candidates) == 1:
        return place(model, centre, base @ candidates[0])
    if indices is not None:
        if prep.reference is None:
            return place(model, centre, base)
        source = one_hot(torch.from_numpy(indices)[None], len(prep.labels))
        source_grid = phys
        reference = reference_labelmap(prep)
    elif probabilities is not None and reference is not None:
        source, source_grid = probabilities, prob_grid
    else:
        return place(model, centre, base)
    scores = []
    reference = reference.detach().float().cpu()
    source = source.detach().float().cpu()
    # Compared at the reference's size: the candidates are scored on a model grid scaled by the ratio
    # of foreground sizes (an end-systolic heart against an end-diastolic reference), so that the score
    # tells orientations apart rather than sizes.
    v_src = float((1.0 - source[:, 0]).sum()) * float(np.prod(source_grid.spacing))
    v_ref = float((1.0 - reference[:, 0]).sum()) * float(np.prod(model.spacing))
    s = (v_src / v_ref) ** (1.0 / prep.ndim) if v_src > 0 and v_ref > 0 else 1.0
    scaled = Grid(model.size, tuple(sp * s for sp in model.spacing))
    for P in candidates:
        moved = resample(source, source_grid, place(scaled, centre, base @ P), padding="zeros")
        scores.append(overlap_score(moved, reference))
    best = int(np.argmax(scores))
    return place(model, centre, base @ candidates[best])


@functools.lru_cache(maxsize=4)
def reference_labelmap(prep: Preprocessing) -> torch.Tensor:
    """The training-time reference of the orientation search: the labelmap file ``prep.reference``
    on the model grid centred on its labels, in the canonical orientation without search (1, C, *S)."""
    if prep.reference is None:
        raise AtlasregError("the orientation search needs a reference labelmap (data.preprocessing.reference)")
    lab = read_labelmap(prep.reference, prep.labels)
    idx = values_to_indices(sitk.GetArrayFromImage(lab), prep.labels)
    phys = physical_grid(lab, prep.spacing_override, prep.reference)
    base = canonical_direction(prep.orientation, prep.ndim, phys.direction_matrix)
    centre = mask_centroid(idx > 0, phys) if prep.centre == "labels" else phys.centre
    grid = place(prep.model_grid, centre, base)
    return labels_on_grid(idx, len(prep.labels), phys, grid)


def intensity_stats(array: np.ndarray, prep: Preprocessing) -> tuple[float, float, float, float]:
    """(lo, hi, scale, offset): the image's normalisation, ``clip(x, lo, hi) * scale + offset``,
    computed on its own voxels (never on padding). See :class:`Preprocessing` for the methods.

    Statistics (mean and SD, percentiles) are numpy's float32 reductions, bit-identical to earlier
    versions, wherever they agree with float64 ones (:func:`_mean_std`); float64 otherwise: float32
    overflows for intensities near 1e19 and beyond (squares, then sums, above 3.4e38) and underflows
    near 1e-20 and below (issue 14), so any finite float32 image gets finite statistics."""
    a = array.astype(np.float32, copy=False)
    lo, hi = float(a.min()), float(a.max())
    if prep.clip_range is not None:
        lo, hi = max(lo, prep.clip_range[0]), min(hi, prep.clip_range[1])
    if prep.clip_percentiles is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            p_lo, p_hi = np.percentile(a, prep.clip_percentiles)
        if not (np.isfinite(p_lo) and np.isfinite(p_hi)):  # (b - a) interpolated in float32 overflowed
            p_lo, p_hi = np.percentile(a.astype(np.float64), prep.clip_percentiles)
        lo, hi = max(lo, float(p_lo)), min(hi, float(p_hi))
    if hi < lo:
        hi = lo
    c = np.clip(a, lo, hi) if (lo > a.min() or hi < a.max()) else a
    if prep.intensity == "rescale":
        scale = 1.0 / (hi - lo) if hi > lo else 1.0
        return lo, hi, scale, -lo * scale
    if prep.intensity == "zscore_foreground":
        fg = c[a > prep.foreground_threshold]
        c = fg if fg.size > 1 else c
    elif prep.intensity != "zscore":
        raise AtlasregError(f"unknown intensity normalisation {prep.intensity!r}")
    mean, std = _mean_std(c)
    scale = 1.0 / std if std > 0 else 1.0
    return lo, hi, scale, -mean * scale


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and SD of float32 `values`: numpy's float32 reductions where they agree with float64 ones
    within 1e-4 SD + 1e-6 |mean| (every ordinary image: results stay bit-identical to earlier
    versions), else the float64 ones (float32 overflow, underflow or cancellation)."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        m32, s32 = float(values.mean()), float(values.std())
    m64, s64 = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
    tol = 1e-4 * s64 + 1e-6 * abs(m64)
    if np.isfinite(m32) and np.isfinite(s32) and abs(m32 - m64) <= tol and abs(s32 - s64) <= tol:
        return m32, s32
    return m64, s64


#: |offset| of a z-score above which float32 ``x * scale + offset`` would cancel (ulp of 1e4: 1e-3).
_FLOAT32_OFFSET_LIMIT = 1e4


def image_on_grid(array: np.ndarray, phys: Grid, target: Grid, stats, prep: Preprocessing, where: str = ""
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw image (array order, on `phys`) -> (normalised image (1, 1, *S), field-of-view mask
    (1, 1, *S)) on `target`, by SimpleITK's linear resampling (see :func:`sitk_resample`). Outside the
    scan the raw image is `prep.pad_value` (the image minimum by default).

    ``raw * scale + offset`` is computed in float32 (as in earlier versions) when scale and offset are
    normal float32 numbers and |offset| <= 1e4, else in float64 (intensities near 3e38 or 1e-30, or a
    mean far above the SD), then rounded to float32. Raises AtlasregError naming `where` (the file)
    if the result is still not finite."""
    lo, hi, scale, offset = stats
    pad = float(array.min()) if prep.pad_value is None else prep.pad_value
    a = np.clip(array.astype(np.float32, copy=False), lo, hi)
    raw = sitk_resample(a, phys, target, default=float(np.clip(pad, lo, hi)))
    ones = np.ones(array.shape, dtype=np.float32)
    mask = sitk_resample(ones, phys, target, default=0.0)
    tiny = float(np.finfo(np.float32).tiny)
    with np.errstate(over="ignore"):
        s32, o32 = np.float32(scale), np.float32(offset)
    if np.isfinite(s32) and abs(float(s32)) >= tiny and np.isfinite(o32) and abs(offset) <= _FLOAT32_OFFSET_LIMIT:
        normalised = raw * s32 + o32
    else:
        normalised = (raw.astype(np.float64) * scale + offset).astype(np.float32)
    if not np.all(np.isfinite(normalised)):
        raise AtlasregError(f"intensities in [{lo:.6g}, {hi:.6g}] cannot be normalised to finite float32 "
                            "values", where or None)
    img = torch.from_numpy(normalised)[None, None]
    return img.float(), torch.from_numpy(mask)[None, None]


def labels_on_grid(indices: np.ndarray, num_classes: int, phys: Grid, target: Grid) -> torch.Tensor:
    """Label indices (array order, on `phys`) -> soft one-hot (1, C, *S) on `target`: every channel
    resampled linearly (SimpleITK), background 1 outside the scan (padding invents no anatomy)."""
    fg = np.stack([(indices == c).astype(np.float32) for c in range(1, num_classes)], axis=-1)
    out = sitk_resample(fg, phys, target, default=0.0, vector=True)
    out = np.moveaxis(out.reshape(*target.size, num_classes - 1), -1, 0)
    bg = np.clip(1.0 - out.sum(0, keepdims=True), 0.0, 1.0)
    return torch.from_numpy(np.concatenate([bg, out]).astype(np.float32))[None]


def sitk_resample(array: np.ndarray, source: Grid, target: Grid, default: float = 0.0,
                  vector: bool = False) -> np.ndarray:
    """Linear resampling of an array (array order; a trailing component axis if `vector`) from
    `source` onto `target` with ``sitk.Resample`` (identity transform in world space, `default`
    outside the source). SimpleITK rather than our own sampler because it is ITK's reference
    implementation of physical-space resampling (the same that viewers and other tools use for these
    files); our torch sampler is kept for what must be differentiable or batched on the device
    (warps, model -> input grid of network outputs). Returns float32 (array order)."""
    img = sitk.GetImageFromArray(array.astype(np.float32, copy=False), isVector=vector)
    source.copy_information_to(img)
    out = sitk.Resample(img, target.reference_image(), sitk.Transform(), sitk.sitkLinear, float(default),
                        sitk.sitkVectorFloat32 if vector else sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).astype(np.float32, copy=False)


def case_from_image(image: sitk.Image, prep: Preprocessing, name: str = "case", path: str = "") -> Case:
    """A case from an image already in memory (no labelmap), placed and normalised as
    :func:`load_case` does for files. `path` names the source in errors and in the outputs (empty: in
    memory). Raises AtlasregError for an image of the wrong dimension, with non-finite values, with a
    single voxel along an axis or covering no model voxel; warns as :func:`load_case` does (naming
    `path`, or ``image '<name>'`` every time for an image in memory)."""
    where = path or f"image {name!r}"
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise AtlasregError(f"has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected a "
                            "scalar image", where)
    if not np.isfinite(sitk.GetArrayViewFromImage(image)).all():
        raise AtlasregError("contains NaN or infinite values", where)
    check_dimension(image, prep.ndim, where)
    check_voxels(image, where)
    return _case_on_model_grid(sitk.Cast(image, sitk.sitkFloat32), None, prep, name, path)


def replace_placement(case: Case, placement: Grid, prep: Preprocessing) -> Case:
    """The same case on another placement of the model grid (test-time second pass); no labelmap."""
    array = sitk.GetArrayFromImage(case.source)
    img_t, mask = image_on_grid(array, case.physical, placement, case.stats, prep, case.path or case.name)
    return Case(case.name, img_t, None, case.grid, case.source, case.path, case.physical, placement, mask,
                case.stats)


def case_name(path) -> str:
    """File name without its image extension (handles .nii.gz); a DICOM file without ``.dcm`` /
    ``.dicom``; a folder (a DICOM series) or a DICOM file without those extensions (e.g. named by its
    SOP Instance UID), its whole name."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".png", ".nrrd", ".mha", ".mhd"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    if Path(path).is_dir() or is_dicom_file(path):
        return dicom_stem(name)
    return Path(path).stem


def model_grid(cfg: dict) -> Grid:
    """The model grid of a config: ``model.size`` and ``model.spacing``, centred (:meth:`Grid.centred`)."""
    return Grid.centred(cfg["model"]["size"], cfg["model"]["spacing"])


def pairs_from_spec(spec: dict, need_labels: bool = True) -> list[CasePair]:
    """Pairs described by a config data section {images, labels?, csv?, image_suffix?, label_suffix?, cases?}."""
    if not spec:
        raise AtlasregError("no data section given")
    pairs = find_pairs(spec.get("images"), spec.get("labels"), spec.get("csv"),
                       spec.get("image_suffix", ""), spec.get("label_suffix", ""))
    pairs = select_cases(pairs, spec.get("cases"))
    if need_labels:
        missing = [p.image for p in pairs if p.label is None]
        if missing:
            raise AtlasregError("no labelmap for this image", missing[0])
    return pairs
