"""Segmentation of new images with a trained Atlas-ISTN: ITN, 1-pass and refined labelmaps, transforms
and the deformed atlas image, all written on each input's own grid and geometry.

Output contract, one folder per case ``<out>/<case>/`` (written all or nothing):
  itn_labelmap<ext>, itn_lcc_labelmap<ext> (largest connected component per structure),
  onepass_labelmap<ext>, refine_labelmap<ext>, atlas_labelmap<ext>  (declared label values; <ext> = the
  input's extension, .png or .nii.gz...), deformed_atlas_image.nii.gz (float),
  forward_displacement.nii.gz and inverse_displacement.nii.gz (refined transform, or the 1-pass one
  without refinement; vector images in world units along the world axes, ITK displacement-field
  convention: a point p of the input grid maps to p + d(p)). Which files exist depends on the model's
  method: Atlas-ISTN writes all; a U-Net writes itn and itn_lcc only, plus onepass (its untrained STN:
  the identity), refine and atlas when it has a fixed atlas (the paper's 'Independent'); VML has no ITN
  and writes onepass and atlas. The inverse field maps input (subject) points into atlas space, so it is the field that
  resamples the atlas onto the input (Phi^-1, Eq. 8); the forward field Phi (Eq. 7) maps atlas points
  into the subject, with the atlas placed on the input's grid (same centre and direction).
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
from .models.refine import refine_transforms
from .spatial.grid import identity_points
from .spatial.transforms import SpatialTransform, warp

LABELMAP_OUTPUTS = ("itn", "itn_lcc", "onepass", "refine", "atlas")
TRANSFORM_OUTPUTS = ("onepass", "refine")  # transforms whose statistics go to transform_metrics.csv


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


def _displacement_image(points: torch.Tensor, spacing: Sequence[float], case: Case) -> sitk.Image:
    """points (*size, D) of a transform on the model grid -> displacement on the native grid, world axes."""
    size = points.shape[:-1]
    disp = points - identity_points(size, spacing, dtype=points.dtype)[0]
    native = to_native_grid(disp.movedim(-1, 0)[None], spacing, case.grid)[0]  # (D, *native)
    world = torch.einsum("ij,j...->i...", torch.as_tensor(case.grid.direction_matrix, dtype=native.dtype), native)
    img = sitk.GetImageFromArray(world.movedim(0, -1).cpu().numpy().astype(np.float64), isVector=True)
    img.CopyInformation(case.source)
    return img


def _float_image(array: torch.Tensor, case: Case) -> sitk.Image:
    img = sitk.GetImageFromArray(array.cpu().numpy().astype(np.float32))
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


def write_case_outputs(out_dir: Path, case: Case, labels: Sequence[int], spacing: Sequence[float],
                       probs: dict[str, torch.Tensor], atlas_image: torch.Tensor | None = None,
                       fwd_points: torch.Tensor | None = None, inv_points: torch.Tensor | None = None,
                       transform_metrics: Mapping[str, Mapping[str, float]] | None = None) -> Path:
    """Write one case's outputs atomically into ``out_dir/<case.name>`` (see the module docstring).

    probs: name -> (C, *size) probabilities on the model grid (an 'itn' entry also gives 'itn_lcc');
    atlas_image: (1, *size) deformed atlas image; fwd_points / inv_points: (*size, D) points in mm on
    the model grid; transform_metrics: transform name ('onepass', 'refine') -> {column of
    ``transform_metrics.csv``: value} for this case (written as ``transform_metrics.csv`` when not
    None and not empty). ``case.yaml`` (the input image's absolute path) is always written. Outputs
    given as None are not written. Returns the case folder; on any error nothing of it is written
    (an older folder of the same name is kept)."""
    ext = _extension(case.path)
    final = out_dir / case.name
    with atomic_directory(final) as tmp:
        (tmp / "case.yaml").write_text(yaml.safe_dump({"image": str(Path(case.path).resolve())},
                                                      sort_keys=False), encoding="utf-8")
        if transform_metrics:
            (tmp / "transform_metrics.csv").write_text(transform_metrics_csv(transform_metrics),
                                                       encoding="utf-8")
        for name, p in probs.items():
            indices = to_native_grid(p[None], spacing, case.grid)[0].argmax(0).cpu().numpy()
            write_image(_labelmap_image(indices, labels, case, ext), tmp / f"{name}_labelmap{ext}")
            if name == "itn":
                lcc = largest_components(indices, len(labels))
                write_image(_labelmap_image(lcc, labels, case, ext), tmp / f"itn_lcc_labelmap{ext}")
        if atlas_image is not None:
            img_native = to_native_grid(atlas_image[None], spacing, case.grid)[0, 0]
            write_image(_float_image(img_native, case), tmp / "deformed_atlas_image.nii.gz")
        if fwd_points is not None:
            write_image(_displacement_image(fwd_points, spacing, case), tmp / "forward_displacement.nii.gz")
        if inv_points is not None:
            write_image(_displacement_image(inv_points, spacing, case), tmp / "inverse_displacement.nii.gz")
    return final


def transform_statistics(transform: SpatialTransform, atlas_labelmap: torch.Tensor) -> dict[str, np.ndarray]:
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
        jac = jacobian_statistics(transform.forward_points().detach(), transform.spacing)
    return {"mice_mm": ic["mice_mm"], "mice_voxels": ic["mice_voxels"], "ic_dsc": ic["ic_dsc"],
            "nonpositive_jacobian_fraction": jac["fraction_nonpositive"],
            "std_log_jacobian": jac["std_log_jacobian"]}


def segment_cases(module: AtlasISTNModule, cases: list[Case], refinement: dict) -> dict:
    """ITN, 1-pass (Eq. 9) and refined (Eqs. 17-21) results for a batch of B cases on the model grid.

    Returns a dict of tensors: itn/onepass/refine/atlas probabilities (B, C, *S) (those the model's
    method has, see the module docstring), deformed atlas image (B, 1, *S), forward/inverse points
    (B, *S, D) in mm of the final (refined, else 1-pass) transform, refinement loss history (K+1, B);
    and ``transform_metrics``: transform name ('onepass', 'refine'; those the method has, none for a
    U-Net without a fixed atlas) -> :func:`transform_statistics` (numpy arrays (B,))."""
    net = module.net
    atlas_lab, atlas_img = module.atlas_labelmap, module.atlas_image
    images = torch.cat([c.image for c in cases])
    b = images.shape[0]
    atlas_b = atlas_lab.expand(b, -1, *atlas_lab.shape[2:])
    registers = module.method != "unet" or module.fixed_atlas() is not None
    out: dict = {}
    final = None
    transforms: dict[str, SpatialTransform] = {}
    with torch.no_grad():
        logits = net.itn(images) if net.itn is not None else None
        if logits is not None:
            out["itn"] = torch.softmax(logits, 1)
        if registers:
            final = transforms["onepass"] = net.transform(net.stn_input(images, logits, atlas_lab, atlas_img))
            out["onepass"] = warp(atlas_b, final.inverse_points(), net.spacing)
            out["atlas"] = atlas_b
    if registers and logits is not None:
        final, out["history"] = refine_transforms(
            net, logits, atlas_lab, int(refinement["iterations"]), float(refinement["lr"]),
            float(refinement["beta"]), float(refinement["gamma"]), float(refinement["lambda"]))
        transforms["refine"] = final
        with torch.no_grad():
            out["refine"] = warp(atlas_b, final.inverse_points(), net.spacing)
    out["transform_metrics"] = {name: transform_statistics(tr, atlas_lab) for name, tr in transforms.items()}
    if final is not None:
        with torch.no_grad():
            inv = final.inverse_points()
            out["deformed_atlas_image"] = warp(atlas_img.expand(b, -1, *atlas_img.shape[2:]), inv, net.spacing)
            out["inverse_points"] = inv
            out["forward_points"] = final.forward_points()
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
    m = cfg["model"]
    files = collect_inputs(list(inputs), image_suffix)
    cases = [load_case(f, None, labels, m["size"], m["spacing"], m["ndim"], cfg["data"]["spacing"], name=n)
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
            probs = {k: res[k][j] for k in LABELMAP_OUTPUTS if k in res}
            extra = {k: res[k][j] if k in res else None
                     for k in ("deformed_atlas_image", "forward_points", "inverse_points")}
            metrics = {name: {col: float(values[j]) for col, values in stats.items()}
                       for name, stats in res["transform_metrics"].items()}
            written.append(write_case_outputs(out_dir, case, labels, m["spacing"], probs,
                                              extra["deformed_atlas_image"], extra["forward_points"],
                                              extra["inverse_points"], transform_metrics=metrics))
        bar.update(len(group))
    bar.close()
    return written



