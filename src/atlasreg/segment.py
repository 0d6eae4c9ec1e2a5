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

from pathlib import Path
from typing import Iterable, Sequence

from tqdm import tqdm

from .data.cases import case_name, load_case
from .data.dataset import find_pairs
from .errors import AtlasregError
from .export import (  # noqa: F401 - the case folder's names and writer, re-exported
    DEFORMED_ATLAS_IMAGE, FORWARD_FIELD, FORWARD_TRANSFORM, INVERSE_FIELD, INVERSE_TRANSFORM,
    transform_metrics_csv, world_transforms, write_case_outputs,
)
from .models.registry import Method
from .predict import predict_cases, segment_cases, transform_statistics  # noqa: F401

LABELMAP_OUTPUTS = ("itn", "itn_lcc", "onepass", "refine", "atlas")
TRANSFORM_OUTPUTS = ("onepass", "refine")  # transforms whose statistics go to transform_metrics.csv


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


def segment(module: Method, inputs: Iterable[str | Path], out_dir: str | Path,
            refinement: dict | None = None, progress: bool = True, image_suffix: str = "") -> list[Path]:
    """Segment every input image (files or folders) and write the outputs under out_dir.

    All inputs are read and checked before anything is written; a bad input raises AtlasregError
    naming the file. Cases are then read again `cases_at_once` at a time, so peak memory does not grow
    with the number of inputs. refinement: overrides of config['refinement'] (iterations, lr, beta, gamma,
    lambda, cases_at_once). Returns the case output folders."""
    cfg = module.config
    ref = dict(cfg["refinement"], **(refinement or {}))
    labels = list(cfg["data"]["labels"].keys())
    grid = module.net.grid
    files = collect_inputs(list(inputs), image_suffix)

    def read(name, path):
        return load_case(path, None, labels, grid, cfg["data"]["spacing"], name=name)

    # Every input is read and checked before anything is written, but not kept: cases are read again
    # chunk by chunk below, so memory does not grow with the number of inputs (reading is about 2% of
    # the time of a refined case).
    for name, path in tqdm(files, desc="checking", disable=not progress, leave=False):
        read(name, path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    chunk = max(1, int(ref["cases_at_once"]))
    bar = tqdm(total=len(files), desc="segmenting", unit="case", disable=not progress)
    for i in range(0, len(files), chunk):
        group = [read(name, path) for name, path in files[i:i + chunk]]
        for pred in predict_cases(module, group, ref):
            written.append(write_case_outputs(out_dir, pred.case, labels, grid, pred.itn, pred.transforms,
                                              module.atlas_labelmap, module.atlas_image,
                                              transform_metrics=pred.transform_metrics))
        bar.update(len(group))
    bar.close()
    return written
