"""DeepATLAS on files (issue 15 items 4-5): one-shot templates from labelled exams, their propagation
and bounding-cube crops, each written on the inputs' own grids (``atlasreg deepatlas template``,
``propagate``, ``crop``; folder contracts in :mod:`atlasreg.contracts`).

Geometry. A case is read by atlasreg's data path (:func:`atlasreg.data.cases.load_case`): normalised
and resampled onto the model grid *placed* on it (``Case.placed``: the model's size and spacing, the
case's centre and axes). The network gives its coordinate map c on that placed grid
(:meth:`~atlasreg.deepatlas.method.DeepAtlasModule.coordinates`). Every voxel of the input's own grid
(``Case.physical``: the file's grid, with the declared spacing where the file stores none) is a world
point; :func:`native_coordinates` finds it on the placed grid (corner-aligned normalised coordinates,
:func:`atlasreg.deepatlas.coordinates.world_to_coordinates`) and samples c there linearly, so the
coordinate map lives on the input's grid (Sec. 3.2.1: "linear interpolation resampling"). Outside the
placed grid's corner voxels the map keeps its border value (as grid_sample's 'border' padding), as
Atlas-ISTN's outputs continue their transforms outside the model's field of view.

Template (Sec. 5.2.7, Eq. 14; :func:`build_template`): the labelled exams' one-hot labelmaps over the
declared labels (background included), *on their own grids*, are fitted jointly by the template M on
:func:`~atlasreg.deepatlas.method.template_grid` (:func:`~atlasreg.deepatlas.template.template_mask`, the
input voxels inside the placed model grid weighted 1, the others 0). By linearity the fitted channels
sum to 1. Propagation (:func:`propagate_files`): ``M o c_n`` on each input's grid, the label of a voxel
the argmax over the declared labels (written as declared values, as the case folder's ``onepass``
labelmap: one forward pass, no registration).

Crop (Sec. 5.2.4; :func:`crop_files`): a template box (normalised template coordinates, or the bounding
box of one structure of a template, with a margin) is projected onto each case by the least-squares
affine of :func:`~atlasreg.deepatlas.template.cube_affine` over the case's voxels inside the scan, and
the input's raw intensities are resampled on the box's grid, the region "in a standard field of view
and orientation" (Fig. 8).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from ..contracts import (COMPLETE, IN_PROGRESS, SEGMENT_INFO, case_labelmap_path, labelmap_extension,
                         read_segment_info, read_template_info, template_paths, write_case_info, write_crop_info,
                         write_segment_info, write_template_info, CASE_INFO, CROP_IMAGE)
from ..data.cases import Case, Preprocessing, load_case
from ..data.dataset import CasePair, find_pairs
from ..data.io import atomic_directory, read_labelmap, write_image
from ..data.preprocessing import indices_to_values, values_to_indices
from ..errors import AtlasregError
from ..outputs import claim_output, file_sha256
from ..spatial.grid import Grid
from .coordinates import coordinates_to_world, sample_at, world_to_coordinates
from .method import DeepAtlasModule, template_grid
from .template import cube_affine, cube_vertices, propagate, template_mask

__all__ = ["native_coordinates", "build_template", "Template", "read_template", "propagate_files", "template_box",
           "crop_files"]


def _preprocessing(module: DeepAtlasModule, labels: Sequence[int] | None = None) -> Preprocessing:
    """The checkpoint's preprocessing, with `labels` as the declared labels when given."""
    import dataclasses

    prep = Preprocessing.from_config(module.config)
    return prep if labels is None else dataclasses.replace(prep, labels=tuple(int(v) for v in labels))


def native_coordinates(module: DeepAtlasModule, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """The coordinate map of `case` on its own grid (module docstring): ``c`` (1, D, *native size),
    corner-aligned template coordinates, and ``inside`` (1, 1, *native size) float, 1 at the voxels
    inside the placed model grid (between its corner voxel centres), 0 elsewhere."""
    device = module.atlas.tensor.device
    c = module.coordinates(case.image.to(device))
    points = case.physical.points(device=device, dtype=torch.float64)  # (1, *native, D) world, mm
    u = world_to_coordinates(points, case.placed).movedim(-1, 1).to(c.dtype)  # (1, D, *native)
    inside = (u.abs() <= 1.0 + 1e-6).all(1, keepdim=True).to(c.dtype)
    with torch.no_grad():
        return sample_at(c, u, padding="border"), inside


# ------------------------------------------------------------------------------------------ template
def _pairs(images: Sequence[str | Path], labelmaps: Sequence[str | Path]) -> list[CasePair]:
    """(name, image, labelmap) of the labelled exams: two folders paired by case name
    (:func:`atlasreg.data.dataset.find_pairs`) or files paired in order. AtlasregError naming the first
    image without a labelmap, a missing path or two exams of one name."""
    images, labelmaps = [Path(p) for p in images], [Path(p) for p in labelmaps]
    if not images:
        raise AtlasregError("a template needs at least one labelled image (--images)")
    if len(images) == 1 and len(labelmaps) == 1 and images[0].is_dir() and labelmaps[0].is_dir():
        pairs = find_pairs(images[0], labelmaps[0])
    else:
        for path in [*images, *labelmaps]:
            if not path.exists():
                raise AtlasregError("file not found", path)
        if len(labelmaps) < len(images):
            raise AtlasregError(f"no labelmap for this image: a template needs one labelmap per image (--labels, in "
                                f"the order of --images; {len(labelmaps)} for {len(images)} images)",
                                images[len(labelmaps)])
        if len(labelmaps) > len(images):
            raise AtlasregError(f"no image for this labelmap ({len(labelmaps)} labelmaps for {len(images)} images)",
                                labelmaps[len(images)])
        from ..data.cases import case_name

        pairs = [CasePair(case_name(i), i, lab) for i, lab in zip(images, labelmaps)]
    names = [p.name for p in pairs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise AtlasregError(f"several labelled images share the case name(s) {twice[:3]}")
    return pairs


def build_template(module: DeepAtlasModule, images: Sequence[str | Path], labelmaps: Sequence[str | Path],
                   out: str | Path, checkpoint: str | Path, labels: Mapping[int, str] | None = None,
                   smoothness: float | None = None, progress: bool = True) -> Path:
    """Fit the template mask M of one or a few labelled exams (Eq. 14; module docstring) and write the
    template folder `out` (all or nothing; :mod:`atlasreg.contracts`).

    images, labelmaps: image and labelmap files paired in order, or one folder of each paired by case
    name; each pair on a grid of its own. checkpoint: the file `module` was loaded from (recorded
    with its SHA-256: a template belongs to its model's coordinate space). labels: {value: name}, the
    declared labels (default: the checkpoint config's ``data.labels``); every labelmap value must be
    declared. smoothness: the membrane weight (default ``deepatlas.template_smoothness``). Every pair
    is read and checked before anything is written: AtlasregError naming the file of a missing or
    unreadable image or labelmap, a labelmap whose geometry or size differs from its image's, with
    undeclared values or no foreground. Returns the folder."""
    labels = {int(k): str(v) for k, v in (labels or module.config["data"]["labels"]).items()}
    values = list(labels)
    prep = _preprocessing(module, values)
    smoothness = float(module.config["deepatlas"]["template_smoothness"] if smoothness is None else smoothness)
    pairs = _pairs(images, labelmaps)
    cases = [load_case(p.image, p.label, prep, name=p.name) for p in pairs]  # all checked before writing
    coords, masks, weights = [], [], []
    for pair, case in tqdm(list(zip(pairs, cases)), desc="template", unit="case", disable=not progress,
                           leave=False):
        c, inside = native_coordinates(module, case)
        lab = sitk.GetArrayFromImage(read_labelmap(pair.label, values, require_foreground=False))
        onehot = torch.nn.functional.one_hot(torch.from_numpy(values_to_indices(lab, values)), len(values))
        coords.append(c.flatten(2))
        masks.append(onehot.reshape(1, -1, len(values)).movedim(-1, 1).to(c.dtype))
        weights.append(inside.flatten(2))
    d = coords[0].shape[1]
    shape = (1, -1, sum(x.shape[2] for x in coords), *[1] * (d - 1))  # all exams' voxels as one line of points
    grid = template_grid(module.config)
    M = template_mask(torch.cat(coords, 2).reshape(shape), torch.cat(masks, 2).reshape(shape), grid.size,
                      torch.cat(weights, 2).reshape(shape), smoothness=smoothness)
    probabilities = sitk.GetImageFromArray(M[0].movedim(0, -1).cpu().numpy().astype(np.float32), isVector=True)
    labelmap = sitk.GetImageFromArray(indices_to_values(M[0].argmax(0).cpu().numpy(), values).astype(np.int32))
    for image in (probabilities, labelmap):
        grid.copy_information_to(image)
    info = {"labels": labels, "checkpoint": str(Path(checkpoint).resolve()),
            "checkpoint_sha256": file_sha256(checkpoint),
            "cases": [{"name": p.name, "image": str(Path(p.image).resolve()), "labelmap": str(Path(p.label).resolve())}
                      for p in pairs],
            "smoothness": smoothness, "grid": grid.to_dict()}
    out = Path(out)
    with atomic_directory(out) as tmp:
        paths = template_paths(tmp)
        write_image(probabilities, paths.probabilities)
        write_image(labelmap, paths.labelmap)
        write_template_info(tmp, info)
    return out


class Template:
    """A template folder as read (:func:`read_template`): ``probabilities`` (1, C, *size) float32,
    ``labels`` {value: name}, ``grid`` its :class:`Grid`, ``info`` the rest of its information."""

    def __init__(self, folder: Path, probabilities: torch.Tensor, labels: dict[int, str], grid: Grid, info: dict):
        self.folder, self.probabilities, self.labels, self.grid, self.info = folder, probabilities, labels, grid, info

    @property
    def sha256(self) -> str:
        """SHA-256 of its probabilities file."""
        return file_sha256(template_paths(self.folder).probabilities)


def read_template(folder: str | Path, module: DeepAtlasModule, checkpoint: str | Path | None = None) -> Template:
    """Read a template folder for `module`. AtlasregError naming the folder or file when it is no
    template folder, its probabilities are unreadable or have another number of components than
    labels, its grid is not the model's template grid, or (with `checkpoint`) it was built with
    another checkpoint (another file's bytes: another coordinate space)."""
    from ..data.io import read_any

    folder = Path(folder)
    info = read_template_info(folder)
    paths = template_paths(folder)
    image = read_any(paths.probabilities)
    labels = info["labels"]
    if image.GetNumberOfComponentsPerPixel() != len(labels):
        raise AtlasregError(f"has {image.GetNumberOfComponentsPerPixel()} components for {len(labels)} labels",
                            paths.probabilities)
    grid = template_grid(module.config)
    if tuple(reversed(image.GetSize())) != grid.size:
        raise AtlasregError(f"template of size {list(reversed(image.GetSize()))} does not fit the model's template "
                            f"grid {list(grid.size)} (built for another model)", paths.probabilities)
    if checkpoint is not None and info.get("checkpoint_sha256") != file_sha256(checkpoint):
        raise AtlasregError(f"was built with another checkpoint ({info.get('checkpoint')}): a template belongs to its "
                            f"model's coordinate space; build one with --checkpoint {checkpoint}", folder)
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if not np.isfinite(array).all():
        raise AtlasregError("has NaN or infinite values", paths.probabilities)
    probabilities = torch.from_numpy(array).reshape(*grid.size, len(labels)).movedim(-1, 0)[None].contiguous()
    return Template(folder, probabilities, labels, grid, info)


# ------------------------------------------------------------------------------------------ propagation
def _labelmap_image(indices: np.ndarray, labels: Sequence[int], case: Case, ext: str) -> sitk.Image:
    """Declared label values on the case's own grid (its header), in the file type of the case folder's
    labelmaps (8 or 16 bit PNG, 16 or 32 bit otherwise)."""
    values = indices_to_values(indices, labels)
    big = max(abs(int(v)) for v in labels)
    dtype = (np.uint8 if big < 256 else np.uint16) if ext == ".png" else (np.int16 if big < 32768 else np.int32)
    image = sitk.GetImageFromArray(values.astype(dtype))
    image.CopyInformation(case.source)
    return image


def propagate_files(module: DeepAtlasModule, template: str | Path, inputs: Sequence[str | Path], out_dir: str | Path,
                    checkpoint: str | Path, image_suffix: str = "", progress: bool = True,
                    overwrite: bool = False) -> list[Path]:
    """One-shot segmentation of every input (files or folders, :func:`atlasreg.segment.collect_inputs`)
    by the template (Sec. 3.2.1; module docstring): one case folder per input in `out_dir`, written
    all or nothing, with the ``onepass`` labelmap (declared label values on the input's own grid and
    header) and the case information; the run's manifest (:data:`~atlasreg.contracts.SEGMENT_INFO`)
    names the checkpoint and the template (in progress until the last case is written), so
    ``atlasreg evaluate`` reads the folder as a segmentation run (:mod:`atlasreg.contracts`).
    The template is checked against the checkpoint, and every input is read and checked before
    anything is written (AtlasregError naming the file). A folder holding segmentations of another
    checkpoint or template is refused unless `overwrite`. Returns the case folders."""
    from ..segment import collect_inputs

    tpl = read_template(template, module, checkpoint)
    labels = list(tpl.labels)
    prep = _preprocessing(module, labels)
    files = collect_inputs(list(inputs), image_suffix)
    for name, path in tqdm(files, desc="checking", disable=not progress, leave=False):
        load_case(path, None, prep, name=name)
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    settings = {"template": str(tpl.folder.resolve()), "template_sha256": tpl.sha256}
    identity = {"checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": file_sha256(checkpoint),
                "refinement": settings}
    previous = read_segment_info(out_dir)
    owned = [p for p in out_dir.iterdir() if p.is_dir() and (p / CASE_INFO).is_file()] if out_dir.is_dir() else []
    cases = {n for n, _ in files}
    if claim_output(out_dir, out_dir / SEGMENT_INFO, previous, identity, owned, "segmentations", overwrite):
        cases |= {p.name for p in owned} | set(previous.get("cases") or [])
    write_segment_info(out_dir, checkpoint, settings, identity["checkpoint_sha256"], IN_PROGRESS, cases)
    written = []
    try:
        for name, path in tqdm(files, desc="propagating", unit="case", disable=not progress):
            case = load_case(path, None, prep, name=name)
            c, _ = native_coordinates(module, case)
            values = propagate(tpl.probabilities.to(c), c)[0]
            ext = labelmap_extension(case.path)
            image = _labelmap_image(values.argmax(0).cpu().numpy(), labels, case, ext)
            with atomic_directory(out_dir / case.name) as tmp:
                write_case_info(tmp, case.path)
                write_image(image, case_labelmap_path(tmp, "onepass", ext))
            written.append(out_dir / case.name)
    except AtlasregError:
        if not written:
            (out_dir / SEGMENT_INFO).unlink(missing_ok=True)
            if created:
                shutil.rmtree(out_dir, ignore_errors=True)
        raise
    write_segment_info(out_dir, checkpoint, settings, identity["checkpoint_sha256"], COMPLETE, cases)
    return written


# ------------------------------------------------------------------------------------------ crop
def template_box(template: Template, structure: str, margin: float = 0.1) -> tuple[list[float], list[float]]:
    """The bounding box (min, max; normalised template coordinates, ITK order) of the template voxels
    where `structure` (a declared label's name or value, not the background) has the largest value,
    widened by `margin` times its size on each side (Sec. 5.2.4: "a template bounding cube"). AtlasregError
    naming the template when the structure is unknown or nowhere the largest."""
    by_name = {v.lower(): k for k, v in template.labels.items()}
    key = structure.strip()
    value = int(key) if key.lstrip("-").isdigit() and int(key) in template.labels else by_name.get(key.lower())
    if value is None or value == list(template.labels)[0]:
        known = ", ".join(f"{v} ({n})" for v, n in list(template.labels.items())[1:])
        raise AtlasregError(f"no structure {structure!r} in the template (its structures: {known})", template.folder)
    channel = list(template.labels).index(value)
    where = (template.probabilities[0].argmax(0) == channel).nonzero().float()  # (P, D) array order
    if where.shape[0] == 0:
        raise AtlasregError(f"structure {structure!r} is nowhere the most likely label of the template",
                            template.folder)
    size = torch.tensor(template.grid.size, dtype=torch.float32)
    lo = (-1.0 + 2.0 * where.min(0).values / (size - 1)).flip(0)  # ITK order
    hi = (-1.0 + 2.0 * where.max(0).values / (size - 1)).flip(0)
    pad = margin * (hi - lo).clamp_min(2.0 / float(size.max() - 1))
    return (lo - pad).tolist(), (hi + pad).tolist()


def _orthogonal_header(matrix: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(spacing, direction) of the grid of orthogonal axes nearest to a (D, D) index-to-world matrix:
    the column norms and the orthogonal polar factor of the matrix with unit columns (SVD)."""
    spacing = np.linalg.norm(matrix, axis=0)
    u, _, vt = np.linalg.svd(matrix / spacing)
    rotation = u @ vt
    return tuple(float(s) for s in spacing), tuple(float(x) for x in rotation.ravel())


def crop_files(module: DeepAtlasModule, inputs: Sequence[str | Path], out_dir: str | Path,
               box_min: Sequence[float], box_max: Sequence[float], size: Sequence[int], image_suffix: str = "",
               progress: bool = True) -> list[Path]:
    """The bounding-cube crop of Sec. 5.2.4 of every input (module docstring): one folder per case in
    `out_dir` (all or nothing) with the crop image (:data:`~atlasreg.contracts.CROP_IMAGE`: the raw
    intensities on the box's grid of `size`, array order, linear, 0 outside the input) and its
    information (:data:`~atlasreg.contracts.CROP_INFO`, :mod:`atlasreg.contracts`). box_min,
    box_max: the box in normalised template coordinates (ITK order). Every input is read, and its
    projection fitted, before anything is written: AtlasregError naming the file of an unreadable
    input or of one that shows too little of the box. Returns the case folders."""
    from ..segment import collect_inputs

    files = collect_inputs(list(inputs), image_suffix)
    d = int(module.config["model"]["ndim"])
    size = tuple(int(n) for n in size)
    if len(size) != d or any(n < 2 for n in size) or len(box_min) != d or len(box_max) != d:
        raise AtlasregError(f"a {d}D crop needs {d} sizes >= 2 and a box of {d} minima and maxima, got size "
                            f"{list(size)} and box {list(box_min)} - {list(box_max)}")
    prep = _preprocessing(module)
    results = []
    for name, path in tqdm(files, desc="projecting", disable=not progress, leave=False):
        case = load_case(path, None, prep, name=name)
        c = module.coordinates(case.image.to(module.atlas.tensor.device))
        try:
            A, t = cube_affine(c, box_min, box_max, weights=(case.mask > 0.5).to(c))
        except AtlasregError as e:
            raise AtlasregError(str(e).replace("exam 0", "the image"), path) from None
        results.append((case, A[0].double(), t[0].double()))
    out_dir = Path(out_dir)
    written = []
    lo, hi = np.asarray(box_min, dtype=np.float64), np.asarray(box_max, dtype=np.float64)
    for case, A, t in tqdm(results, desc="cropping", unit="case", disable=not progress):
        # crop index i (ITK order) -> template point -> exam normalised point -> world (mm), all affine
        step = torch.from_numpy((hi - lo) / (np.asarray(size[::-1]) - 1.0))
        corners = torch.from_numpy(np.vstack([np.zeros(d), np.eye(d)]))  # index 0 and the unit steps
        template_points = torch.from_numpy(lo) + corners * step
        world = coordinates_to_world(template_points @ A.T + t, case.placed).numpy()
        origin, matrix = world[0], (world[1:] - world[0]).T  # world = origin + matrix @ i
        index = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in size], indexing="ij")
                            [::-1], -1)  # (*size, D) ITK-order indices
        points = torch.from_numpy(origin) + index @ torch.from_numpy(matrix).T
        native = case.physical.world_to_index(points)  # continuous indices of the input's grid
        extent = torch.tensor([n - 1.0 for n in case.physical.size_xyz], dtype=torch.float64)
        u = (2.0 * native / extent - 1.0).movedim(-1, 0)[None].float()
        raw = torch.from_numpy(sitk.GetArrayFromImage(case.source).astype(np.float32))[None, None]
        values = sample_at(raw, u, padding="zeros")[0, 0].numpy()
        image = sitk.GetImageFromArray(values)
        spacing, direction = _orthogonal_header(matrix)
        image.SetOrigin(tuple(float(x) for x in origin))
        image.SetSpacing(spacing)
        image.SetDirection(direction)
        vertices = cube_vertices(A[None], t[None], box_min, box_max)[0]
        homogeneous = np.eye(d + 1)
        homogeneous[:d, :d], homogeneous[:d, d] = matrix, origin
        info = {"image": str(Path(case.path).resolve()),
                "box": {"min": [float(x) for x in lo], "max": [float(x) for x in hi]}, "size": list(size),
                "index_to_world": homogeneous.tolist(),
                "vertices": coordinates_to_world(vertices, case.placed).tolist()}
        with atomic_directory(out_dir / case.name) as tmp:
            write_image(image, tmp / CROP_IMAGE)
            write_crop_info(tmp, info)
        written.append(out_dir / case.name)
    return written
