"""From files to model-grid tensors: read (with geometry), validate, normalise, one-hot, resample."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import SimpleITK as sitk
import torch

from ..errors import AtlasregError
from ..spatial.grid import Grid
from .dataset import CasePair, find_pairs, select_cases
from .io import check_dimension, read_image, read_labelmap, same_geometry
from .preprocessing import one_hot, to_model_grid, values_to_indices, zero_mean_unit_variance


@dataclass
class Case:
    """One case on the model grid. image: (1, 1, *size) normalised; labelmap: (1, C, *size) soft
    one-hot or None; grid: the file's own grid (for writing outputs back); source: the sitk image."""

    name: str
    image: torch.Tensor
    labelmap: torch.Tensor | None
    grid: Grid
    source: sitk.Image
    path: str


NO_GEOMETRY_FORMATS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _apply_spacing(image: sitk.Image, spacing, path) -> sitk.Image:
    """Set the configured spacing (config data.spacing) on images from formats that store none
    (PNG, JPEG, BMP, TIFF); files with real geometry (NIfTI, NRRD, MHA) keep their own."""
    if spacing is not None and str(path).lower().endswith(NO_GEOMETRY_FORMATS):
        image.SetSpacing(tuple(float(s) for s in spacing))
    return image


def load_case(image_path, label_path, labels: Sequence[int], model_grid: Grid, spacing_override=None,
              require_foreground: bool = True, name: str | None = None) -> Case:
    """Read one image (and labelmap), check them, and resample onto `model_grid` (the centred model
    grid, :meth:`Grid.centred`) placed on the case (same centre and direction as the file's grid).
    Raises AtlasregError naming the file for every bad input."""
    image = _apply_spacing(read_image(image_path), spacing_override, image_path)
    img_t, grid = _image_on_model_grid(image, model_grid, image_path)
    lab_t = None
    if label_path is not None:
        # Size and geometry are compared after the configured spacing is applied to both files.
        lab = _apply_spacing(read_labelmap(label_path, labels, require_foreground=False), spacing_override,
                             label_path)
        if lab.GetSize() != image.GetSize():
            raise AtlasregError(f"size {lab.GetSize()} differs from image {image_path} {image.GetSize()}",
                                label_path)
        if not same_geometry(lab, image):
            raise AtlasregError(f"geometry (spacing, origin or direction) differs from image {image_path}",
                                label_path)
        idx = values_to_indices(sitk.GetArrayFromImage(lab), labels)
        if require_foreground and not idx.any():
            raise AtlasregError(f"has no foreground (only label {labels[0]})", label_path)
        oh = one_hot(torch.from_numpy(idx)[None], len(labels))
        lab_t = to_model_grid(oh, grid, model_grid)
    return Case(name or case_name(image_path), img_t, lab_t, grid, image, str(image_path))


def _image_on_model_grid(image: sitk.Image, model_grid: Grid, path) -> tuple[torch.Tensor, Grid]:
    check_dimension(image, model_grid.ndim, path)
    grid = Grid.from_sitk(image)
    arr = zero_mean_unit_variance(sitk.GetArrayFromImage(image))
    return to_model_grid(torch.from_numpy(arr)[None, None], grid, model_grid), grid


def case_from_image(image: sitk.Image, model_grid: Grid, name: str = "case", path: str = "") -> Case:
    """A case from an image already in memory (no labelmap): normalised and resampled onto
    `model_grid` placed on the image's own grid, as :func:`load_case` does for files. `path` names the
    source in errors and in the outputs (empty: in memory). Raises AtlasregError for an image of the
    wrong dimension or with non-finite values."""
    import numpy as np

    where = path or f"image {name!r}"
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise AtlasregError(f"has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected a "
                            "scalar image", where)
    if not np.isfinite(sitk.GetArrayViewFromImage(image)).all():
        raise AtlasregError("contains NaN or infinite values", where)
    img_t, grid = _image_on_model_grid(image, model_grid, where)
    return Case(name, img_t, None, grid, image, path)


def case_name(path) -> str:
    """File name without its image extension (handles .nii.gz)."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".png", ".nrrd", ".mha", ".mhd"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
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
