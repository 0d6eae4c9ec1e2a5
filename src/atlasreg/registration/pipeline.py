"""Pairwise image registration: rigid -> affine -> deformable (issue 12, `atlasreg register`).

The stages are atlasreg's own building blocks, in world units (mm) on each image's own grid:

1. ``rigid``: the global rigid search of :func:`atlasreg.registration.rigid.rigid_search`
   (Cross-Sim-NGF, WBIR 2022), which finds rotations up to 180 degrees without a starting point;
2. ``affine``: Adam instance optimisation of an affine map (:func:`atlasreg.registration.instance.optimise`,
   model 'affine') on top of the rigid one. After a rigid stage, the coarsest pyramid level is fitted
   twice, from the rigid search's result and from the fields of view's centres (:func:`centres_start`),
   and the lower final loss continues: the search is a global heuristic that can prefer a wrong
   rotation (chest X-rays, docs/results.md), and the stage's summary records which start was kept;
3. ``deformable``: Adam instance optimisation of a stationary velocity field (default; diffeomorphic,
   with an exact inverse), a B-spline or a dense displacement, with diffusion (or bending)
   regularisation weighted by lambda in world units and, by default in 2D, a penalty on Jacobian
   determinants below 0.1 (:func:`atlasreg.losses.regularisers.folding_penalty`), on top of the affine
   one (VoxelMorph++ and ConvexAdam use the same instance optimisation).

Every transform maps fixed world points to moving world points (the pull-back ITK's resampling
uses), so ``warped = moving o T`` lies on the fixed grid.

Intensities: each image is clipped to its 0.5-99.5 percentiles inside its mask and z-scored there
(LNCC, MIND, NGF and MI do not need it; MSE does, and the same step for all keeps the losses' scales
comparable).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import AtlasregError
from ..spatial.grid import Grid
from ..spatial.transforms import AffineTransform, Transform

STAGES = ("rigid", "affine", "deformable")
DEFORMABLE_MODELS = ("svf", "bspline", "dense")
#: The deformable stage's regularisers (instance.REGULARISERS, named here so that the command line
#: validates them without importing the optimiser).
REGULARISERS = ("diffusion", "bending")

#: Default regularisation weight lambda (diffusion, world units) per similarity: each similarity has its
#: own scale. LNCC's 5.0 was chosen on a mouse-brain pair (docs/results.md: Dice 0.782 and 0.44% folded
#: voxels with 1.0, 0.830 and none with 5, 0.826 with 20); MIND's 0.25 and MI's 1.0 on JSRT chest X-ray
#: calibration pairs with the 2D folding penalty (docs/results.md; 3D not calibrated); the others are
#: provisional.
DEFAULT_LAMBDA = {"lncc": 5.0, "mse": 0.1, "mind": 0.25, "ngf": 0.5, "mi": 1.0}
#: Pyramid levels (downsampling factors) per image dimension: the finest optimisation is at half
#: resolution, as ConvexAdam's instance optimisation (grid spacing 2); the transform is then evaluated at
#: any resolution. 3D: on the 0.15 mm mouse grid (1.1 M voxels) the full-resolution level took 830 s of
#: the 900 s (loaded machine). 2D: a coarser first level (8) gives the capture range that chest X-rays
#: whose lungs differ in height by a third need (docs/results.md).
DEFAULT_LEVELS = {2: (8, 4, 2), 3: (4, 2)}
#: The affine stage's own pyramid per image dimension where the caller gives no levels (None: the
#: deformable stage's). 2D: 16, 8, 4, chosen on JSRT calibration pairs (docs/results.md).
DEFAULT_AFFINE_LEVELS = {2: (16, 8, 4), 3: None}
DEFAULT_ITERATIONS = (100, 60, 30)
#: The SVF is never finer than the finest level's grid downsampled by this factor, per image dimension
#: (VoxelMorph's ``int_downsize``; see :func:`~atlasreg.registration.instance.optimise`). 3D: 2, chosen
#: with the 3D LNCC window below on 6 mouse-brain calibration pairs that the reported ones do not use
#: (docs/results.md: Dice 0.812 -> 0.829 and 14.5 -> 10.6 s per pair on one thread, both changes
#: together); 2D: 2 as well (30 JSRT calibration pairs: Dice 0.901 against 0.898 with 1, and faster).
DEFAULT_SVF_FACTOR = {2: 2, 3: 2}
#: LNCC's default window, in voxels of the fixed image per image dimension (converted to mm): 3D 9,
#: chosen on the same mouse pairs (docs/results.md); 2D 5, as calibrated on JSRT.
LNCC_WINDOW_VOXELS = {2: 5, 3: 9}
#: Default similarity per image dimension. 3D: LNCC (mouse-brain MRI, docs/results.md). 2D: mutual
#: information, chosen on 180 JSRT chest X-ray calibration pairs that the reported ones do not use
#: (rigid -> affine -> SVF; docs/results.md): about as good as MIND-SSC on average and far better where
#: the lungs must stretch by a third (local descriptors lose the diaphragm's edge there), with the 2D
#: folding penalty against MI's folds. LNCC follows the ribs, which do not move with the lung borders.
DEFAULT_SIMILARITY = {2: "mi", 3: "lncc"}
#: Weight of the folding penalty of the deformable stage per image dimension (0: off). 2D: 100; with MI
#: on the 180 JSRT calibration pairs, 10 left 1-4 folded pixels in 3 pairs, 100 in 1 pair (one pixel),
#: at the same Dice (docs/results.md); 3D: off (no fold on the 30 mouse-brain pairs without it).
DEFAULT_FOLD_WEIGHT = {2: 100.0, 3: 0.0}
#: Early stop of a pyramid level (``optimise``'s tolerance: the mean objective of the last 10 iterations
#: fell by less than this fraction against the 10 before) per image dimension (0: off). 2D: 1e-2 (on the
#: 180 JSRT calibration pairs the same Dice as 3e-3 and a fifth less time; docs/results.md); 3D: off
#: (not calibrated).
DEFAULT_TOLERANCE = {2: 1e-2, 3: 0.0}


@dataclass
class RegistrationResult:
    """The result of :func:`register_images`. transform: fixed world points -> moving world points
    (batch 1, mm); inverse: moving -> fixed (None where the deformable model has no exact inverse:
    'bspline', 'dense'); stages: one dict per stage run (name, seconds, similarity before and after);
    fixed_grid, moving_grid: the images' own grids."""

    transform: Transform
    inverse: Transform | None
    fixed_grid: Grid
    moving_grid: Grid
    stages: list[dict] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return float(sum(s["seconds"] for s in self.stages))

    #: The settings used, defaults resolved (similarity, lambda, levels, iterations, ...).
    settings: dict = field(default_factory=dict)


def normalise_intensities(array: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Clip to the 0.5-99.5 percentiles inside `mask` (default: everywhere) and z-score there.
    array: any shape; returns float32 of the same shape. A constant image becomes zeros."""
    a = np.asarray(array, dtype=np.float64)
    inside = a[mask > 0] if mask is not None else a.ravel()
    if inside.size == 0:
        inside = a.ravel()
    lo, hi = np.percentile(inside, [0.5, 99.5])
    a = np.clip(a, lo, hi)
    inside = np.clip(inside, lo, hi)
    sd = float(inside.std())
    return ((a - float(inside.mean())) / (sd if sd > 0 else 1.0)).astype(np.float32)


def default_iterations(levels: Sequence[int]) -> list[int] | int:
    """Adam iterations per level when none are given: the last len(levels) of (100, 60, 30), coarse to
    fine; 50 per level for more than three levels."""
    levels = tuple(levels)
    return list(DEFAULT_ITERATIONS[-len(levels):]) if len(levels) <= len(DEFAULT_ITERATIONS) else 50


def _level_spacing(grid: Grid, size: Sequence[int]) -> tuple[float, ...]:
    """The spacing (ITK order, mm) of `grid`'s field of view sampled with `size` voxels (array order),
    as :meth:`Grid.downsample` makes the pyramid levels."""
    extent = np.asarray(grid.spacing) * np.asarray(grid.size_xyz)
    return tuple(float(e / n) for e, n in zip(extent, tuple(size)[::-1]))


def centres_start(fixed_grid: Grid, moving_grid: Grid, device=None) -> AffineTransform:
    """The translation that maps the centre of the fixed field of view onto the moving one's (world
    units, mm; no rotation): the identity for images that share their field of view."""
    shift = torch.as_tensor(moving_grid.centre - fixed_grid.centre, dtype=torch.float32, device=device)
    return AffineTransform(torch.eye(fixed_grid.ndim, device=device)[None], shift[None])


def _best_affine_start(rigid: AffineTransform, centres: AffineTransform,
                       fit: Callable[[AffineTransform], tuple],
                       score: Callable[[AffineTransform], float] | None = None) -> tuple:
    """Fit the affine stage's coarsest level from the rigid search's result and from the field-of-view
    centres (`fit(start) -> (transform, history)`), and keep the fit with the lower loss (ties go to the
    rigid search): `score(transform)` where given (the similarity at the stage's finest level: the 2D
    affine pyramid starts on 16 x 16 chest X-rays, too coarse to compare two fits), else the fit's final
    loss. Returns (transform, history, record): record names the start kept and the two losses
    ('loss_from_rigid', 'loss_from_centres'), for the stage's summary."""
    from_rigid, history_rigid = fit(rigid)
    from_centres, history_centres = fit(centres)
    if score is None:
        loss_rigid, loss_centres = history_rigid[-1]["similarity"], history_centres[-1]["similarity"]
    else:
        loss_rigid, loss_centres = score(from_rigid), score(from_centres)
    record = {"start": "rigid search" if loss_rigid <= loss_centres else "field-of-view centres",
              "loss_from_rigid": loss_rigid, "loss_from_centres": loss_centres}
    if loss_rigid <= loss_centres:
        return from_rigid, history_rigid, record
    return from_centres, history_centres, record


def register_images(fixed: sitk.Image, moving: sitk.Image, *, similarity: str | None = None,
                    stages: Sequence[str] = STAGES, model: str = "svf", lam: float | None = None,
                    iterations: int | Sequence[int] | None = None, levels: Sequence[int] | None = None,
                    fixed_mask: sitk.Image | None = None, moving_mask: sitk.Image | None = None,
                    device: str | torch.device = "cpu", similarity_options: dict | None = None,
                    svf_factor: int | None = None, affine_similarity: str | None = None,
                    regulariser: str = "diffusion", affine_levels: Sequence[int] | None = None,
                    fold_weight: float | None = None, initial: Transform | None = None,
                    tolerance: float | None = None,
                    progress: Callable[[str], None] | None = None) -> RegistrationResult:
    """Register `moving` to `fixed` (scalar SimpleITK images, 2D or 3D, any grids).

    similarity: 'lncc' (same modality), 'mind' or 'mi' or 'ngf' (across modalities), 'mse' (same
    modality and intensity scale): the losses of :mod:`atlasreg.losses.similarity`; default
    :data:`DEFAULT_SIMILARITY` of the image dimension.
    stages: a subsequence of ('rigid', 'affine', 'deformable'), run in that order, each starting from
    the previous one's transform (none: the identity in world coordinates). model: the deformable
    part, 'svf' (default), 'bspline' or 'dense'. regulariser: the deformable stage's penalty,
    'diffusion' (default; first derivatives) or 'bending' (second derivatives), both in world units
    (:mod:`atlasreg.losses.regularisers`). lam: its weight (default :data:`DEFAULT_LAMBDA` of the
    similarity, set for diffusion). levels: the pyramid's downsampling factors, coarse to fine
    (default :data:`DEFAULT_LEVELS` of the image dimension).
    iterations: Adam iterations per pyramid level of the affine and deformable stages (one int, or one
    per level; default :func:`default_iterations`: 100 / 60 / 30 for three levels, 60 / 30 for two).
    tolerance: a pyramid level stops once the mean objective of its last 10 iterations is below that of
    the 10 before by less than this fraction (default :data:`DEFAULT_TOLERANCE`; 0: every iteration
    runs; see :func:`~atlasreg.registration.instance.optimise`).
    fold_weight: weight of the folding penalty on the deformable stage
    (:func:`~atlasreg.losses.regularisers.folding_penalty`; default :data:`DEFAULT_FOLD_WEIGHT`).
    initial: the transform (fixed -> moving world points, batch 1) the first stage after the rigid search
    starts from, instead of the identity, when there is no rigid stage (e.g. :func:`centres_start` for
    images whose world frames are unrelated).
    affine_levels: the affine stage's own pyramid (default :data:`DEFAULT_AFFINE_LEVELS` where `levels`
    is not given either and that has one, else `levels`; ANTs and elastix also give each
    stage its own schedule); its iterations are `iterations` where that is one int, else
    :func:`default_iterations` of it. fixed_mask, moving_mask: binary images on the images' grids; only
    voxels inside count.
    affine_similarity: the affine stage's similarity (default `similarity`), e.g. 'mi', a global
    statistic, before a local one for the deformable stage.
    svf_factor: the SVF is never finer than the finest level's grid downsampled by this factor (default
    :data:`DEFAULT_SVF_FACTOR` for the image's dimension; see :func:`~atlasreg.registration.instance.optimise`).
    Returns a :class:`RegistrationResult`. Raises AtlasregError for an unknown stage, model,
    regulariser or similarity, images of different dimension, or a mask off its image's grid.
    """
    from ..losses.similarity import build_similarity
    from .instance import optimise, per_level, similarity_at

    stages = tuple(stages)
    if not stages or any(s not in STAGES for s in stages) or list(stages) != sorted(stages, key=STAGES.index):
        raise AtlasregError(f"--stages: expected a subsequence of {','.join(STAGES)}, got {','.join(stages) or 'none'}")
    if model not in DEFORMABLE_MODELS:
        raise AtlasregError(f"--model: expected one of {', '.join(DEFORMABLE_MODELS)}, got {model!r}")
    if regulariser not in REGULARISERS:
        raise AtlasregError(f"--regulariser: expected one of {', '.join(REGULARISERS)}, got {regulariser!r}")
    if fixed.GetDimension() != moving.GetDimension():
        raise AtlasregError(f"the fixed image is {fixed.GetDimension()}D and the moving image "
                            f"{moving.GetDimension()}D")
    fixed_grid, moving_grid = Grid.from_sitk(fixed), Grid.from_sitk(moving)
    similarity = DEFAULT_SIMILARITY.get(fixed_grid.ndim, "lncc") if similarity is None else similarity
    masks = []
    for name, mask, image in (("fixed", fixed_mask, fixed), ("moving", moving_mask, moving)):
        if mask is None:
            masks.append(None)
            continue
        if mask.GetSize() != image.GetSize():
            raise AtlasregError(f"the {name} mask has size {mask.GetSize()}, its image {image.GetSize()}")
        m = sitk.GetArrayFromImage(mask) > 0
        if not m.any():
            raise AtlasregError(f"the {name} mask is empty")
        masks.append(m)
    arrays = [normalise_intensities(sitk.GetArrayFromImage(img), m) for img, m in zip((fixed, moving), masks)]
    f_t, m_t = (torch.from_numpy(a)[None, None].to(device) for a in arrays)
    fm_t, mm_t = (None if m is None else torch.from_numpy(m.astype(np.float32))[None, None].to(device) for m in masks)
    affine_similarity = similarity if affine_similarity is None else affine_similarity
    for option, name in (("--similarity", similarity), ("--affine-similarity", affine_similarity)):
        if name not in DEFAULT_LAMBDA:
            raise AtlasregError(f"{option}: expected one of {', '.join(DEFAULT_LAMBDA)}, got {name!r}")
    lam = DEFAULT_LAMBDA[similarity] if lam is None else float(lam)
    if affine_levels is None and levels is None:
        affine_levels = DEFAULT_AFFINE_LEVELS.get(fixed_grid.ndim)
    levels = tuple(int(f) for f in (DEFAULT_LEVELS[fixed_grid.ndim] if levels is None else levels))
    svf_factor = DEFAULT_SVF_FACTOR[fixed.GetDimension()] if svf_factor is None else int(svf_factor)
    fold_weight = DEFAULT_FOLD_WEIGHT[fixed_grid.ndim] if fold_weight is None else float(fold_weight)
    tolerance = DEFAULT_TOLERANCE[fixed_grid.ndim] if tolerance is None else float(tolerance)
    if not (np.isfinite(tolerance) and tolerance >= 0):
        raise AtlasregError(f"--tolerance: expected a number >= 0, got {tolerance}")
    if not fold_weight >= 0:
        raise AtlasregError(f"--fold-weight: expected a weight >= 0, got {fold_weight}")
    if iterations is None:
        iterations = default_iterations(levels)
    if affine_levels is None:
        affine_levels, affine_iterations = levels, iterations
    else:
        affine_levels = tuple(int(f) for f in affine_levels)
        affine_iterations = iterations if isinstance(iterations, (int, np.integer)) else default_iterations(affine_levels)
    for option, values in (("--levels", levels), ("--affine-levels", affine_levels)):
        if not values or any(f < 1 for f in values):
            raise AtlasregError(f"{option}: expected downsampling factors >= 1, got {','.join(map(str, values))}")

    def level_similarity(name: str):
        """The similarity `name` as optimise's callable, built per pyramid level: the LNCC window in mm
        and the NGF gradients follow the level's spacing. similarity_options go to `similarity`."""
        options = dict(similarity_options or {}) if name == similarity else {}
        if name == "lncc":
            options.setdefault("window_mm", LNCC_WINDOW_VOXELS[fixed_grid.ndim] * float(np.mean(fixed_grid.spacing)))
        modules: dict[tuple, torch.nn.Module] = {}

        def fn(warped, fixed_level, mask):
            spacing = _level_spacing(fixed_grid, fixed_level.shape[2:])
            if spacing not in modules:
                modules[spacing] = build_similarity(name, spacing, **options)
            return modules[spacing](fixed_level, warped, mask)
        return fn

    similarity_fns = {"affine": level_similarity(affine_similarity), "deformable": level_similarity(similarity)}

    current: Transform | None = None if initial is None or "rigid" in stages else initial
    result_stages: list[dict] = []
    for stage in stages:
        t0 = time.perf_counter()
        extra: dict = {}
        if progress:
            progress(stage)
        if stage == "rigid":
            from .rigid import rigid_search

            current = rigid_search(f_t.cpu(), m_t.cpu(), fixed_grid, moving_grid,
                                   None if fm_t is None else fm_t.cpu(), None if mm_t is None else mm_t.cpu())
            current = AffineTransform(current.matrix.to(f_t.device), current.translation.to(f_t.device))
            history = []
        else:
            kind = "affine" if stage == "affine" else model
            common = dict(similarity=similarity_fns[stage], model=kind, regulariser=None if kind == "affine" else regulariser,
                          lam=0.0 if kind == "affine" else lam, fixed_mask=fm_t, moving_mask=mm_t,
                          svf_factor=svf_factor, fold_weight=0.0 if kind == "affine" else fold_weight,
                          tolerance=tolerance)
            stage_levels = affine_levels if stage == "affine" else levels
            its = per_level(affine_iterations if stage == "affine" else iterations, stage_levels)
            if stage == "affine" and result_stages and result_stages[-1]["stage"] == "rigid":
                # The rigid search is a global heuristic; an affine fit from the field-of-view centres
                # competes with it at the coarsest level (the chest X-rays of docs/results.md: the search
                # turned 6 of 39 upright pairs by 40-180 degrees; this check kept all 6 upright).
                def score(transform: AffineTransform) -> float:  # the similarity at the stage's finest level
                    return similarity_at(f_t, fixed_grid, m_t, moving_grid, transform, similarity_fns[stage],
                                         stage_levels[-1], fm_t, mm_t)

                current, history, extra = _best_affine_start(
                    current, centres_start(fixed_grid, moving_grid, f_t.device),
                    lambda start: optimise(f_t, fixed_grid, m_t, moving_grid, levels=stage_levels[:1],
                                           iterations=its[:1], initial=start, **common),
                    score if len(stage_levels) > 1 else None)
                if len(stage_levels) > 1:
                    current, finer = optimise(f_t, fixed_grid, m_t, moving_grid, levels=tuple(stage_levels[1:]),
                                              iterations=its[1:], initial=current, **common)
                    history = history + finer
            else:
                current, history = optimise(f_t, fixed_grid, m_t, moving_grid, levels=tuple(stage_levels),
                                            iterations=its, initial=current, **common)
        result_stages.append({"stage": stage, "seconds": time.perf_counter() - t0,
                              "similarity_first": history[0]["similarity"] if history else None,
                              "similarity_last": history[-1]["similarity"] if history else None, **extra})
    inverse = None
    try:
        inverse = current.inverse()
    except ValueError:
        pass
    settings = {"similarity": similarity, "affine_similarity": affine_similarity, "model": model,
                "regulariser": regulariser, "lambda": lam, "fold_weight": fold_weight, "levels": list(levels),
                "iterations": iterations if isinstance(iterations, (int, np.integer)) else list(iterations),
                "affine_levels": list(affine_levels),
                "affine_iterations": (affine_iterations if isinstance(affine_iterations, (int, np.integer))
                                      else list(affine_iterations)),
                "svf_factor": svf_factor, "tolerance": tolerance}
    return RegistrationResult(current, inverse, fixed_grid, moving_grid, result_stages, settings)
