"""Segmentation of new images with a trained Atlas-ISTN: ITN, 1-pass and refined labelmaps, transforms
and the deformed atlas image, all written on each input's own grid and geometry.

Output contract, one folder per case ``<out>/<case>/`` (written all or nothing):
  itn_labelmap<ext>, itn_lcc_labelmap<ext> (largest connected component per structure),
  onepass_labelmap<ext>, refine_labelmap<ext>, atlas_labelmap<ext>  (declared label values; <ext> = the
  input's extension, .png or .nii.gz...), deformed_atlas_image.nii.gz (float). The transforms of the
  final (refined, else 1-pass) registration, consistent as files with the saved atlas
  (``<model>/atlas/atlas_image.nii.gz``, on the centred model grid) with no hidden re-centring:
  inverse_displacement.nii.gz: on the input's grid, the ITK displacement field that maps each input
  (subject) point p to the atlas point p + d(p) (Phi^-1, Eq. 8, with the case's frame); resampling the
  saved atlas with it onto the input gives the 1-pass/refined segmentation;
  forward_displacement.nii.gz: on the atlas grid, the field that maps each atlas point q to the subject
  point q + d(q) (Phi, Eq. 7); it resamples the input into atlas space;
  inverse_transform.h5 and forward_transform.h5: the same maps as ITK composite transforms (affine
  part + displacement field on the model grid), for SimpleITK, ANTs, 3D Slicer.
  Vector images hold world units along the world axes. Outside the model's field of view both maps
  continue the affine part (the dense part keeps its border value in the NIfTI fields; ITK's
  displacement-field transform in the .h5 files uses zero there).
  Which files exist depends on the model's method: Atlas-ISTN writes all; a U-Net writes itn and
  itn_lcc only, plus onepass (its untrained STN: the identity), refine and atlas when it has a fixed
  atlas (the paper's 'Independent'); VML has no ITN and writes onepass and atlas.
  case.yaml: ``image: <absolute path of the input image>`` (always written; the report draws the image
  from it).
  transform_metrics.csv: one row per transform the method has (``onepass``: the 1-pass transform of
  Eq. 9; ``refine``: the refined one of Eq. 21), columns
  ``method,mice_mm,mice_voxels,ic_dsc,nonpositive_jacobian_fraction,std_log_jacobian``, computed on the
  model grid (not the input's): MICE in mm and in voxels of the model grid and IC-DSC of the atlas
  labelmap (paper Sec. 3.2 'Inter-Subject Correspondence', Table 6; see
  :func:`atlasreg.evaluation.consistency.inverse_consistency`), and the fraction of model-grid voxels
  with det J(Phi) <= 0 and the standard deviation of log det J(Phi) over the whole grid (forward
  transform Phi, Eq. 7; :func:`atlasreg.evaluation.topology.jacobian_statistics`). Not written when the
  method has no transform (a U-Net without a fixed atlas).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import yaml
from tqdm import tqdm

from .data.cases import Case, case_name, load_case
from .data.dataset import find_pairs
from .data.io import atomic_directory, write_image
from .data.preprocessing import indices_to_values, largest_components, to_native_grid
from .errors import AtlasregError
from .evaluation.consistency import inverse_consistency
from .evaluation.evaluate import TRANSFORM_METRIC_COLUMNS
from .evaluation.topology import jacobian_statistics
from .models.atlas_istn import AtlasISTNModule
from .spatial.grid import Grid
from .spatial.itk import field_image, write_transform
from .spatial.transforms import AffineSVFTransform, AffineTransform, Composite

LABELMAP_OUTPUTS = ("itn", "itn_lcc", "onepass", "refine", "atlas")
TRANSFORM_OUTPUTS = ("onepass", "refine")  # transforms whose statistics go to transform_metrics.csv
FORWARD_FIELD = "forward_displacement.nii.gz"
INVERSE_FIELD = "inverse_displacement.nii.gz"
FORWARD_TRANSFORM = "forward_transform.h5"
INVERSE_TRANSFORM = "inverse_transform.h5"
DEFORMED_ATLAS_IMAGE = "deformed_atlas_image.nii.gz"


def _extension(path: str) -> str:
    name = path.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(path).suffix.lower()


def collect_inputs(inputs: Sequence[str | Path], image_suffix: str = "") -> list[tuple[str, Path]]:
    """(case name, image file) for a list of files and/or folders. In folders, every image file whose
    name ends with `image_suffix` before the extension (e.g. '_img'); the suffix is dropped from the
    case name. Raises AtlasregError for a missing path, no images, or colliding case names."""
    found: list[tuple[str, Path]] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found.extend((p.name, p.image) for p in find_pairs(item, image_suffix=image_suffix))
        elif item.exists():
            name = case_name(item)
            if image_suffix and name.endswith(image_suffix):
                name = name[: -len(image_suffix)]
            found.append((name, item))
        else:
            raise AtlasregError("file not found", item)
    if not found:
        raise AtlasregError("no input images given")
    names = [n for n, _ in found]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AtlasregError(f"several inputs share the case name(s) {dup[:5]}; outputs would collide")
    return found


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


def transform_metrics_csv(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """Text of ``transform_metrics.csv``: header ``TRANSFORM_METRIC_COLUMNS`` and one row per
    transform, ``metrics``: method name -> {column: value} (the columns after ``method``; a missing value
    is written empty). Floats are written with ``repr`` (full precision, ``nan`` for NaN)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(TRANSFORM_METRIC_COLUMNS)
    for method, values in metrics.items():
        writer.writerow([method, *(repr(float(values[c])) if c in values else ""
                                   for c in TRANSFORM_METRIC_COLUMNS[1:])])
    return buffer.getvalue()


def world_transforms(transform: AffineSVFTransform, native: Grid) -> tuple[Composite, Composite]:
    """A case's atlas-to-subject transform Phi (model frame, batch 1) in world coordinates.

    Returns ``(to_subject, to_atlas)``: ``to_subject`` maps atlas world points (the saved atlas's
    grid, :meth:`Grid.centred`) to the subject's world points, ``x -> c + R Phi(x)`` with the case
    grid's centre c and direction R; ``to_atlas`` is its exact inverse ``Phi^-1(R^T (y - c))``. In ITK
    terms ``to_atlas`` resamples the atlas onto the subject (fixed = subject) and ``to_subject``
    resamples the subject into atlas space (fixed = atlas)."""
    frame = AffineTransform.grid_frame(native, dtype=transform._like().dtype)
    frame = AffineTransform(frame.matrix.to(transform._like().device), frame.translation.to(transform._like().device))
    return Composite((transform, frame)), Composite((frame.inverse(), transform.inverse()))


def write_case_outputs(out_dir: Path, case: Case, labels: Sequence[int], model_grid: Grid,
                       itn_probabilities: torch.Tensor | None = None,
                       transforms: Mapping[str, AffineSVFTransform] | None = None,
                       atlas_labelmap: torch.Tensor | None = None, atlas_image: torch.Tensor | None = None,
                       transform_metrics: Mapping[str, Mapping[str, float]] | None = None) -> Path:
    """Write one case's outputs atomically into ``out_dir/<case.name>`` (see the module docstring).

    itn_probabilities: (C, *model_grid.size) ITN probabilities on the model grid placed on the case
    (also gives 'itn_lcc'); transforms: 'onepass' and/or 'refine' -> batch-1 Phi in the case's model
    frame (the last one given is the case's final transform: its fields, ITK files and deformed atlas
    image are written); atlas_labelmap (1, C, *size) and atlas_image (1, 1, *size): the atlas on
    `model_grid`; transform_metrics: transform name -> {column of ``transform_metrics.csv``: value}.
    ``case.yaml`` (the input image's absolute path) is always written. Every output is computed on the
    input's own grid directly: the atlas is sampled once at ``Phi^-1`` of each input voxel. Returns the
    case folder; on any error nothing of it is written (an older folder of the same name is kept)."""
    ext = _extension(case.path)
    final = out_dir / case.name
    transforms = dict(transforms or {})
    native = case.grid
    with atomic_directory(final) as tmp:
        (tmp / "case.yaml").write_text(yaml.safe_dump({"image": str(Path(case.path).resolve())},
                                                      sort_keys=False), encoding="utf-8")
        if transform_metrics:
            (tmp / "transform_metrics.csv").write_text(transform_metrics_csv(transform_metrics),
                                                       encoding="utf-8")
        if itn_probabilities is not None:
            indices = to_native_grid(itn_probabilities[None], model_grid, native)[0].argmax(0).cpu().numpy()
            write_image(_labelmap_image(indices, labels, case, ext), tmp / f"itn_labelmap{ext}")
            lcc = largest_components(indices, len(labels))
            write_image(_labelmap_image(lcc, labels, case, ext), tmp / f"itn_lcc_labelmap{ext}")
        if transforms and atlas_labelmap is not None:
            atlas_native = to_native_grid(atlas_labelmap, model_grid, native)[0].argmax(0).cpu().numpy()
            write_image(_labelmap_image(atlas_native, labels, case, ext), tmp / f"atlas_labelmap{ext}")
        to_subject = to_atlas = None
        for name, transform in transforms.items():
            to_subject, to_atlas = world_transforms(transform, native)
            if atlas_labelmap is not None:
                with torch.no_grad():
                    probs = to_atlas.warp(atlas_labelmap, model_grid, native)[0]
                write_image(_labelmap_image(probs.argmax(0).cpu().numpy(), labels, case, ext),
                            tmp / f"{name}_labelmap{ext}")
        if to_atlas is not None:
            with torch.no_grad():
                if atlas_image is not None:
                    img = to_atlas.warp(atlas_image, model_grid, native)[0, 0]
                    write_image(_float_image(img, case), tmp / DEFORMED_ATLAS_IMAGE)
                write_image(field_image(to_atlas.displacement(native)[0], native), tmp / INVERSE_FIELD)
                write_image(field_image(to_subject.displacement(model_grid)[0], model_grid), tmp / FORWARD_FIELD)
                write_transform(to_atlas, tmp / INVERSE_TRANSFORM)
                write_transform(to_subject, tmp / FORWARD_TRANSFORM)
    return final


def transform_statistics(transform: AffineSVFTransform, atlas_labelmap: torch.Tensor) -> dict[str, np.ndarray]:
    """Inverse consistency and regularity of a batch of atlas-to-subject transforms on the model grid.

    transform: batch B, Phi mapping atlas to subject space (Eqs. 7-8); atlas_labelmap: (1 or B, C, *size)
    one-hot or probabilistic atlas on the same grid. Returns numpy float64 arrays of shape (B,) keyed by
    the columns of ``transform_metrics.csv``: ``mice_mm`` (mm), ``mice_voxels`` (voxels of the model
    grid), ``ic_dsc`` (paper Sec. 3.2, Table 6; NaN without atlas foreground), from
    :func:`~atlasreg.evaluation.consistency.inverse_consistency`; ``nonpositive_jacobian_fraction`` (in
    [0, 1]) and ``std_log_jacobian`` (dimensionless) of det J(Phi) over the whole grid, from
    :func:`~atlasreg.evaluation.topology.jacobian_statistics`. Computed without gradients. Raises
    ValueError if the labelmap does not match the transform grid."""
    with torch.no_grad():
        ic = inverse_consistency(transform, atlas_labelmap)
        jac = jacobian_statistics(transform.forward_points().detach(), transform.grid)
    return {"mice_mm": ic["mice_mm"], "mice_voxels": ic["mice_voxels"], "ic_dsc": ic["ic_dsc"],
            "nonpositive_jacobian_fraction": jac["fraction_nonpositive"],
            "std_log_jacobian": jac["std_log_jacobian"]}


def segment_cases(module: AtlasISTNModule, cases: list[Case], refinement: dict) -> dict:
    """ITN, 1-pass (Eq. 9) and refined (Eqs. 17-21) predictions for a batch of B cases on the model grid.

    Returns a dict: ``itn`` probabilities (B, C, *S) (methods with an ITN); ``transforms``: 'onepass'
    and 'refine' -> :class:`AffineSVFTransform` of batch B in the cases' model frames (those the
    model's method has, see the module docstring; the last is the final one); ``history``: refinement
    loss history (K+1, B); ``transform_metrics``: transform name -> :func:`transform_statistics`
    (numpy arrays (B,))."""
    images = torch.cat([c.image for c in cases]).to(module.device)
    out = module.predict(images)
    refined = module.refine(images, out, refinement)
    if refined is not None:
        out["transforms"]["refine"], out["history"] = refined["transform"], refined["history"]
    out["transform_metrics"] = {name: transform_statistics(tr, module.atlas_labelmap)
                                for name, tr in out["transforms"].items()}
    return out


def segment(module: AtlasISTNModule, inputs: Iterable[str | Path], out_dir: str | Path,
            refinement: dict | None = None, progress: bool = True, image_suffix: str = "") -> list[Path]:
    """Segment every input image (files or folders) and write the outputs under out_dir.

    All inputs are read and checked before anything is written; a bad input raises AtlasregError
    naming the file. refinement: overrides of config['refinement'] (iterations, lr, beta, gamma,
    lambda, cases_at_once). Returns the case output folders."""
    cfg = module.config
    ref = dict(cfg["refinement"], **(refinement or {}))
    labels = list(cfg["data"]["labels"].keys())
    grid = module.net.grid
    files = collect_inputs(list(inputs), image_suffix)
    cases = [load_case(f, None, labels, grid, cfg["data"]["spacing"], name=n)
             for n, f in tqdm(files, desc="reading", disable=not progress, leave=False)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    chunk = max(1, int(ref["cases_at_once"]))
    bar = tqdm(total=len(cases), desc="segmenting", unit="case", disable=not progress)
    for i in range(0, len(cases), chunk):
        group = cases[i:i + chunk]
        res = segment_cases(module, group, ref)
        for j, case in enumerate(group):
            metrics = {name: {col: float(values[j]) for col, values in stats.items()}
                       for name, stats in res["transform_metrics"].items()}
            written.append(write_case_outputs(
                out_dir, case, labels, grid, res["itn"][j] if "itn" in res else None,
                {name: tr[j] for name, tr in res["transforms"].items()},
                module.atlas_labelmap, module.atlas_image, transform_metrics=metrics))
        bar.update(len(group))
    bar.close()
    return written



