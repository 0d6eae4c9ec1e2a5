"""Export (nnU-Net style: predict -> export): a case's model-grid predictions as images on the input's
own grid and geometry, transforms in world coordinates and ITK files, written as the case folder of
``atlasreg segment`` (its contract, names and writers: :mod:`atlasreg.contracts`).

Every output is computed on the input's grid directly: labelmaps and the deformed atlas image sample
the atlas once at ``Phi^-1`` of each input voxel (one interpolation, not a warp on the model grid
followed by a resampling), and the ITN output is resampled from the model grid placed on the case.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .contracts import (  # noqa: F401 - the case folder's names, re-exported
    DEFORMED_ATLAS_IMAGE, FORWARD_FIELD, FORWARD_TRANSFORM, INVERSE_FIELD, INVERSE_TRANSFORM, case_labelmap_path,
    labelmap_extension, transform_metrics_csv, write_case_info, write_transform_metrics,
)
from .data.cases import Case
from .data.io import atomic_directory, write_image
from .data.preprocessing import indices_to_values, largest_components
from .spatial.grid import Grid
from .spatial.itk import field_image, write_transform
from .spatial.transforms import AffineSVFTransform, AffineTransform, Composite, resample


def _labelmap_image(indices: np.ndarray, labels: Sequence[int], case: Case, ext: str) -> sitk.Image:
    values = indices_to_values(indices, labels)
    dtype = np.uint8 if (ext == ".png" and max(labels) < 256) else (np.uint16 if ext == ".png" else np.int16
                                                                      if max(labels) < 32768 else np.int32)
    img = sitk.GetImageFromArray(values.astype(dtype))
    img.CopyInformation(case.source)
    return img


def _float_image(array: torch.Tensor, case: Case) -> sitk.Image:
    img = sitk.GetImageFromArray(array.detach().cpu().numpy().astype(np.float32))
    img.CopyInformation(case.source)
    return img


def world_transforms(transform: AffineSVFTransform, frame: AffineTransform | Grid) -> tuple[Composite, Composite]:
    """A case's atlas-to-subject transform Phi (model frame, batch 1) in world coordinates.

    frame: the case's model-to-file-world map, or the placed model grid whose frame it is (:meth:`~atlasreg.data.cases.Case.frame`: the placed
    model grid's centre c and direction R, and the physical -> file map where a declared spacing
    replaced a missing one). Returns ``(to_subject, to_atlas)``: ``to_subject`` maps atlas world points
    (the saved atlas's grid, :meth:`Grid.centred`) to the subject's world points, ``x -> F(Phi(x))``
    (``c + R Phi(x)`` without a declared spacing); ``to_atlas`` is its exact inverse
    ``Phi^-1(F^-1(y))``. In ITK terms ``to_atlas`` resamples the atlas onto the subject (fixed =
    subject) and ``to_subject`` resamples the subject into atlas space (fixed = atlas)."""
    like = transform._like()
    if isinstance(frame, Grid):  # the model grid placed on the case: its frame
        frame = AffineTransform.grid_frame(frame, dtype=torch.float64)
    frame = AffineTransform(frame.matrix.to(like), frame.translation.to(like))
    return Composite((transform, frame)), Composite((frame.inverse(), transform.inverse()))


def _atlas_indices(probabilities: torch.Tensor, grid: Grid, connected: bool) -> np.ndarray:
    """Label indices (*grid.size) of atlas probabilities (C, *grid.size) sampled on `grid`: their argmax,
    with resampling gaps closed when `connected` (see :func:`native_outputs`)."""
    probs = probabilities.detach().cpu().numpy()  # the warp's own precision: float32 would make new ties
    indices = probs.argmax(0)
    if connected:
        from .atlas_topology import connect_structures

        indices, _ = connect_structures(indices, probs, tuple(reversed(grid.spacing)))
    return indices


def native_outputs(case: Case, labels: Sequence[int], model_grid: Grid,
                   itn_probabilities: torch.Tensor | None = None,
                   transforms: Mapping[str, AffineSVFTransform] | None = None,
                   atlas_labelmap: torch.Tensor | None = None,
                   atlas_image: torch.Tensor | None = None, connected: bool = False) -> dict:
    """A case's outputs on its own grid, in memory.

    itn_probabilities: (C, *model_grid.size) ITN probabilities on the model grid placed on the case;
    transforms: 'onepass' and/or 'refine' -> batch-1 Phi in the case's model frame (the last one given
    is the final one); atlas_labelmap (1, C, *size) and atlas_image (1, 1, *size) on `model_grid`.
    connected: the atlas is the one-hot of a labelmap with one component per structure
    (``refinement.atlas_topology: connected``): the labelmaps sampled from it ('atlas', 'onepass',
    'refine') get the gaps that resampling onto the input grid cut into thin structures closed
    (:func:`atlasreg.atlas_topology.connect_structures`, the sampled one-hot as probabilities).
    Returns a dict: ``labelmaps``: output name ('itn', 'itn_lcc', 'atlas', 'onepass', 'refine', those
    that apply) -> SimpleITK image of declared label values with the input's geometry;
    ``deformed_atlas_image`` (float32 image) and ``to_atlas`` / ``to_subject`` (world transforms of the
    final registration, :func:`world_transforms`) where the method registers; ``inverse_displacement``
    (on the input grid) and ``forward_displacement`` (on the atlas grid): their displacement-field
    images."""
    native = case.grid
    ext = labelmap_extension(case.path)
    if case.placed is None:  # a Case built by hand: the model grid on the case's centre and axes
        case.placed = case.physical.resampled(model_grid.size, model_grid.spacing)
    placed, physical = case.placed, case.physical
    transforms = dict(transforms or {})
    out: dict = {"labelmaps": {}}
    with torch.no_grad():
        if itn_probabilities is not None:
            indices = resample(itn_probabilities[None], placed, physical)[0].argmax(0).cpu().numpy()
            out["labelmaps"]["itn"] = _labelmap_image(indices, labels, case, ext)
            out["labelmaps"]["itn_lcc"] = _labelmap_image(largest_components(indices, len(labels)), labels, case, ext)
        if transforms and atlas_labelmap is not None:
            atlas_native = resample(atlas_labelmap, placed, physical)[0]
            out["labelmaps"]["atlas"] = _labelmap_image(_atlas_indices(atlas_native, native, connected),
                                                        labels, case, ext)
        for name, transform in transforms.items():
            out["to_subject"], out["to_atlas"] = world_transforms(transform, case.frame(torch.float64))
            if atlas_labelmap is not None:
                probs = out["to_atlas"].warp(atlas_labelmap, model_grid, native)[0]
                out["labelmaps"][name] = _labelmap_image(_atlas_indices(probs, native, connected), labels, case, ext)
        if "to_atlas" in out:
            if atlas_image is not None:
                img = out["to_atlas"].warp(atlas_image, model_grid, native)[0, 0]
                out["deformed_atlas_image"] = _float_image(img, case)
            out["inverse_displacement"] = field_image(out["to_atlas"].displacement(native)[0], native)
            out["forward_displacement"] = field_image(out["to_subject"].displacement(model_grid)[0], model_grid)
    return out


def write_case_outputs(out_dir: Path, case: Case, labels: Sequence[int], model_grid: Grid,
                       itn_probabilities: torch.Tensor | None = None,
                       transforms: Mapping[str, AffineSVFTransform] | None = None,
                       atlas_labelmap: torch.Tensor | None = None, atlas_image: torch.Tensor | None = None,
                       transform_metrics: Mapping[str, Mapping[str, float]] | None = None,
                       connected: bool = False) -> Path:
    """Write one case's outputs atomically into ``out_dir/<case.name>`` (contract: :mod:`atlasreg.contracts`).

    Arguments as in :func:`native_outputs`, plus transform_metrics: transform name -> {column of
    :data:`~atlasreg.contracts.TRANSFORM_METRICS`: value}. The case information (the input image's
    absolute path) is always written. Returns the case folder; on any error nothing of it is written (an older folder of the
    same name is kept)."""
    ext = labelmap_extension(case.path)
    outputs = native_outputs(case, labels, model_grid, itn_probabilities, transforms, atlas_labelmap, atlas_image,
                             connected)
    return write_outputs(Path(out_dir) / case.name, case, outputs, ext, transform_metrics)


def write_outputs(final: Path, case: Case, outputs: dict, ext: str,
                  transform_metrics: Mapping[str, Mapping[str, float]] | None = None) -> Path:
    """Write :func:`native_outputs` as a case folder `final`, all or nothing."""
    with atomic_directory(final) as tmp:
        write_case_info(tmp, case.path)
        if transform_metrics:
            write_transform_metrics(tmp, transform_metrics)
        for name, img in outputs["labelmaps"].items():
            write_image(img, case_labelmap_path(tmp, name, ext))
        if "deformed_atlas_image" in outputs:
            write_image(outputs["deformed_atlas_image"], tmp / DEFORMED_ATLAS_IMAGE)
        if "to_atlas" in outputs:
            write_image(outputs["inverse_displacement"], tmp / INVERSE_FIELD)
            write_image(outputs["forward_displacement"], tmp / FORWARD_FIELD)
            write_transform(outputs["to_atlas"], tmp / INVERSE_TRANSFORM)
            write_transform(outputs["to_subject"], tmp / FORWARD_TRANSFORM)
    return final
