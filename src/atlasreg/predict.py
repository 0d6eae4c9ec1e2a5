"""Prediction (nnU-Net style: predict -> export): a trained method applied to preprocessed cases,
giving tensors on the model grid and transforms in each case's model frame; nothing is written.
:mod:`atlasreg.export` turns them into images on each input's own grid."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

import SimpleITK as sitk

from .data.cases import Case, Preprocessing, placement_of, replace_placement
from .errors import AtlasregError
from .evaluation.consistency import inverse_consistency
from .evaluation.topology import jacobian_statistics
from .models.registry import Method
from .spatial.transforms import AffineSVFTransform


@dataclass
class CasePrediction:
    """One case's predictions on the model grid.

    case: the input (its own grid and geometry in ``case.grid``); itn: (C, *model size) ITN
    probabilities or None; transforms: 'onepass' / 'refine' -> batch-1 :class:`AffineSVFTransform`
    Phi in the case's model frame (the last is the final one); history: refinement losses (K + 1,)
    or None; transform_metrics: transform name -> {column of
    :data:`~atlasreg.contracts.TRANSFORM_METRIC_COLUMNS`: value}."""

    case: Case
    itn: torch.Tensor | None = None
    transforms: dict = field(default_factory=dict)
    history: torch.Tensor | None = None
    transform_metrics: dict = field(default_factory=dict)


def transform_statistics(transform: AffineSVFTransform, atlas_labelmap: torch.Tensor) -> dict[str, np.ndarray]:
    """Inverse consistency and regularity of a batch of atlas-to-subject transforms on the model grid.

    transform: batch B, Phi mapping atlas to subject space (Eqs. 7-8); atlas_labelmap: (1 or B, C, *size)
    one-hot or probabilistic atlas on the same grid. Returns numpy float64 arrays of shape (B,) keyed by
    the columns of :data:`~atlasreg.contracts.TRANSFORM_METRIC_COLUMNS`: ``mice_mm`` (mm),
    ``mice_voxels`` (voxels of the model grid), ``ic_dsc`` (paper Sec. 3.2, Table 6; NaN without atlas foreground), from
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


def segment_cases(module: Method, cases: list[Case], refinement: dict, refine: bool = True) -> dict:
    """ITN, 1-pass (Eq. 9) and refined (Eqs. 17-21) predictions for a batch of B cases on the model grid.
    refinement: overrides of the method's ``config['refinement']``.

    Returns a dict: ``itn`` probabilities (B, C, *S) (methods with an ITN); ``transforms``: 'onepass'
    and 'refine' -> :class:`AffineSVFTransform` of batch B in the cases' model frames (those the
    model's method has, see the module docstring; the last is the final one); ``history``: refinement
    loss history (K+1, B); ``transform_metrics``: transform name -> :func:`transform_statistics`
    (numpy arrays (B,)). refine=False skips the refinement (1-pass only). Raises AtlasregError
    naming the case's file for a normalised image or an ITN output with NaN or infinite values."""
    for c in cases:  # cases are normalised to finite values (data.cases.image_on_grid); in-memory ones too
        if not bool(torch.isfinite(c.image).all()):
            raise AtlasregError("the normalised image holds NaN or infinite values", c.path or c.name)
    images = torch.cat([c.image for c in cases]).to(module.device)
    out = module.predict(images)
    if "itn" in out and not bool(torch.isfinite(out["itn"]).all()):  # e.g. a checkpoint with NaN weights
        bad = [c.path or c.name for c, ok in zip(cases, torch.isfinite(out["itn"]).flatten(1).all(1)) if not ok]
        raise AtlasregError("the model's segmentation (ITN) holds NaN or infinite values; is the checkpoint "
                            "damaged?", bad[0])
    masks = [c.mask for c in cases]
    if all(m is not None for m in masks):
        out["mask"] = torch.cat(masks).to(module.device)
    refined = module.refine(images, out, refinement) if refine else None
    if refined is not None:
        out["transforms"]["refine"], out["history"] = refined["transform"], refined["history"]
    out["transform_metrics"] = {name: transform_statistics(tr, module.atlas_labelmap)
                                for name, tr in out["transforms"].items()}
    return out


def localise(module: Method, cases: list[Case]) -> list[Case]:
    """The test-time first pass (paper Sec. 3.2: crop around the structure found by a first ITN pass):
    where the config centres the model grid on the labels (``data.preprocessing.centre: labels``) or
    searches the orientation (``orientation_search``), the ITN segments each case on its current
    placement, and the case is placed again on the ITN's foreground centroid, in the orientation whose
    ITN labels best overlap the atlas labelmap. This repeats up to ``localisation_passes`` times (a
    structure near the edge of the first, image-centred grid is cut off there, which pulls its centroid
    towards the image centre) and stops for a case once its placement keeps its orientation and its
    centre moves less than one model voxel. Other configs and methods without an ITN return `cases`
    unchanged."""
    prep = Preprocessing.from_config(module.config)
    if (prep.centre != "labels" and prep.orientation_search == "none") or not cases:
        return cases
    passes = int((module.config["data"].get("preprocessing") or {}).get("localisation_passes", 3))
    reference = module.atlas_labelmap if bool(getattr(module, "atlas_ready", True)) else None
    voxel = max(prep.spacing)
    cases, moving = list(cases), list(range(len(cases)))
    for _ in range(passes):
        with torch.no_grad():
            first = module.predict(torch.cat([cases[j].image for j in moving]).to(module.device))
        if "itn" not in first:
            return cases
        still = []
        for k, j in enumerate(moving):
            case = cases[j]
            array = sitk.GetArrayFromImage(case.source)
            grid = placement_of(array, None, case.physical, prep, first["itn"][k:k + 1], case.placed, reference)
            shift = float(np.linalg.norm(np.subtract(grid.centre, case.placed.centre)))
            same = np.allclose(grid.direction_matrix, case.placed.direction_matrix, atol=1e-6)
            cases[j] = replace_placement(case, grid, prep)
            if shift >= voxel or not same:
                still.append(j)
        moving = still
        if not moving:
            break
    return cases


def predict_cases(module: Method, cases: list[Case], refinement: dict | None = None,
                  refine: bool = True) -> list[CasePrediction]:
    """Predict a batch of cases at once (refinement runs them together, each with its own STN copy):
    one :class:`CasePrediction` per case, in order, after the first pass of :func:`localise`.
    refinement: overrides of the method's ``config['refinement']``; refine=False: 1-pass only."""
    cases = localise(module, cases)
    res = segment_cases(module, cases, refinement or {}, refine)  # Method.refine merges the overrides
    out = []
    for j, case in enumerate(cases):
        out.append(CasePrediction(
            case, res["itn"][j] if "itn" in res else None,
            {name: tr[j] for name, tr in res["transforms"].items()},
            res["history"][:, j] if "history" in res else None,
            {name: {col: float(values[j]) for col, values in stats.items()}
             for name, stats in res["transform_metrics"].items()}))
    return out
