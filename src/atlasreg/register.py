"""`atlasreg register FIXED MOVING --out DIR`: pairwise image registration (rigid -> affine ->
deformable, :mod:`atlasreg.registration.pipeline`) with its outputs on the fixed image's grid.

Written into DIR (all at once: the folder appears complete or not at all):

* ``warped.nii.gz`` (file names: :mod:`atlasreg.contracts`): the moving image resampled onto the
  fixed grid (``moving o T``, linear);
* ``warped_labels.nii.gz`` (with ``--labels``): the moving labelmap on the fixed grid (per-label
  linear interpolation and argmax);
* the forward transform (``.h5``) and displacement field: T, fixed world points -> moving world
  points (mm), as an ITK transform file and as an ITK displacement field ``T(x) - x`` on the fixed
  grid. This is the transform ITK resamples the moving image with: ``sitk.Resample(moving, fixed, T)``
  gives ``warped``;
* the inverse transform and displacement field (on the moving grid): T^-1, moving ->
  fixed points, where the model has an exact inverse (affine stages, SVF);
* ``summary.yaml``: settings, seconds per stage, the similarity before and after each stage, the
  Jacobian statistics of T on the fixed grid, and with ``--fixed-labels`` Dice and HD95 per label
  before and after, with ``--fixed-landmarks``/``--moving-landmarks`` the target registration error.

This module holds no torch import at its top, so building the command line stays fast.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .errors import AtlasregError

from .contracts import (FORWARD_FIELD, FORWARD_TRANSFORM, INVERSE_FIELD, INVERSE_TRANSFORM,  # noqa: F401
                        REGISTERED_IMAGE as WARPED, REGISTERED_LABELS as WARPED_LABELS,
                        REGISTRATION_SUMMARY as SUMMARY)


def _read_mask(path, image, name: str):
    import SimpleITK as sitk

    from .data.io import read_any, same_geometry

    if path is None:
        return None
    mask = read_any(path)
    if not same_geometry(mask, image):
        raise AtlasregError(f"the {name} mask's grid (size, spacing, origin or direction) differs from its image", path)
    return sitk.Cast(mask, sitk.sitkUInt8)


def _read_labels(path, image):
    import numpy as np
    import SimpleITK as sitk

    from .data.io import read_any, same_geometry

    lab = read_any(path)
    if not same_geometry(lab, image):
        raise AtlasregError("the labelmap's grid (size, spacing, origin or direction) differs from its image", path)
    arr = sitk.GetArrayFromImage(lab)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise AtlasregError("a labelmap must hold integer label values", path)
        arr = arr.astype(np.int64)
    return arr


def _label_metrics(moving_labels, fixed_labels, warped_labels, result) -> dict:
    """Dice and HD95 (mm) of the moving labelmap against the fixed one, before (the identity in world
    coordinates) and after registration (`warped_labels`, already on the fixed grid)."""
    import numpy as np
    import torch

    from .evaluation.registration import propagate_labels, propagated_label_metrics
    from .spatial.transforms import AffineTransform

    labels = sorted(set(np.unique(moving_labels).tolist()) | set(np.unique(fixed_labels).tolist()) | {0})
    d = result.fixed_grid.ndim
    identity = AffineTransform(torch.eye(d)[None], torch.zeros(1, d))
    before = propagate_labels(moving_labels, labels, identity, result.moving_grid, result.fixed_grid)
    out = {}
    for name, warped in (("before", before), ("after", warped_labels)):
        m = propagated_label_metrics(warped, fixed_labels, labels, result.fixed_grid.spacing)
        out[name] = {"dice_mean": m["dice_mean"], "hd95_mean_mm": m["hd95_mean"],
                     "per_label": {int(k): {"dice": float(v["dice"]), "hd95_mm": float(v["hd95"])}
                                   for k, v in m["per_label"].items()}}
    return out


def cmd_register(args) -> int:
    import numpy as np
    import SimpleITK as sitk
    import torch
    import yaml

    from .data.io import atomic_directory, check_output_folder, read_image, remove_temporaries, write_image, \
        write_text
    from .devices import resolve_device
    from .evaluation.registration import propagate_labels, read_landmark_pair, target_registration_error, \
        transform_regularity
    from .registration.pipeline import DEFAULT_LAMBDA, DEFAULT_SVF_FACTOR, default_iterations, register_images
    from .spatial.itk import write_transform

    out = check_output_folder(args.out)  # before anything is read or written
    remove_temporaries(out.parent, name=out.name)  # a killed run's temporary folder beside it
    fixed, moving = read_image(args.fixed), read_image(args.moving)
    if fixed.GetDimension() != moving.GetDimension():
        raise AtlasregError(f"is {moving.GetDimension()}D but the fixed image {args.fixed} is "
                            f"{fixed.GetDimension()}D", args.moving)
    fixed_mask = _read_mask(args.mask, fixed, "fixed")
    moving_mask = _read_mask(args.moving_mask, moving, "moving")
    moving_labels = _read_labels(args.labels, moving) if args.labels else None
    fixed_labels = _read_labels(args.fixed_labels, fixed) if args.fixed_labels else None
    landmarks = None
    if bool(args.fixed_landmarks) != bool(args.moving_landmarks):
        raise AtlasregError("give both --fixed-landmarks and --moving-landmarks, or neither")
    if args.fixed_landmarks:
        landmarks = read_landmark_pair(args.fixed_landmarks, args.moving_landmarks, fixed.GetDimension())
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    iterations = None
    if args.iterations:
        iterations = [int(x) for x in args.iterations.split(",")]
        iterations = iterations[0] if len(iterations) == 1 else iterations
    levels = tuple(int(x) for x in args.levels.split(","))
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    def progress(stage):
        if not args.quiet:
            print(f"{stage} ...", flush=True)

    t0 = time.perf_counter()
    try:
        result = register_images(fixed, moving, similarity=args.similarity, stages=stages, model=args.model,
                                 lam=args.lam, iterations=iterations, levels=levels, fixed_mask=fixed_mask,
                                 moving_mask=moving_mask, device=device, svf_factor=args.svf_factor,
                                 affine_similarity=args.affine_similarity,
                                 progress=progress)
    except ValueError as exc:
        raise AtlasregError(str(exc).splitlines()[0]) from None
    seconds = time.perf_counter() - t0
    T = result.transform
    summary = {
        "fixed": str(Path(args.fixed).resolve()), "moving": str(Path(args.moving).resolve()),
        "similarity": args.similarity, "affine_similarity": args.affine_similarity or args.similarity,
        "stages": list(stages), "model": args.model,
        "lambda": DEFAULT_LAMBDA[args.similarity] if args.lam is None else args.lam, "levels": list(levels),
        "iterations": default_iterations(levels) if iterations is None else iterations,
        "svf_factor": DEFAULT_SVF_FACTOR[fixed.GetDimension()] if args.svf_factor is None else args.svf_factor,
        "seconds": round(seconds, 3),
        "stage_results": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in s.items()}
                          for s in result.stages],
        "transform": "forward: fixed world points -> moving world points (mm); inverse: moving -> fixed",
    }
    with torch.no_grad():
        reg = transform_regularity(T, result.fixed_grid)
    summary["jacobian"] = {"fraction_nonpositive": float(reg["fraction_nonpositive"][0]),
                           "std_log_jacobian": float(reg["std_log_jacobian"][0])}
    warped_labels = None
    if moving_labels is not None:  # propagated once: written, and scored against the fixed labels
        labels = sorted(set(np.unique(moving_labels).tolist()) | {0})
        warped_labels = propagate_labels(moving_labels, labels, T, result.moving_grid, result.fixed_grid)
    if fixed_labels is not None and warped_labels is not None:
        summary["labels"] = _label_metrics(moving_labels, fixed_labels, warped_labels, result)
    if landmarks is not None:
        tre = target_registration_error(T, *landmarks)
        summary["landmarks"] = {k: float(v) for k, v in tre.items() if k != "tre_mm"}

    with atomic_directory(out) as tmp:
        moving_t = torch.from_numpy(sitk.GetArrayFromImage(moving).astype(np.float32))[None, None].to(device)
        with torch.no_grad():
            warped = T.warp(moving_t, result.moving_grid, result.fixed_grid, padding="zeros")
        img = sitk.GetImageFromArray(warped[0, 0].cpu().numpy())
        img.CopyInformation(fixed)
        write_image(img, tmp / WARPED)
        if warped_labels is not None:
            lab_img = sitk.GetImageFromArray(warped_labels.astype(np.int32))
            lab_img.CopyInformation(fixed)
            write_image(lab_img, tmp / WARPED_LABELS)
        write_transform(T, tmp / FORWARD_TRANSFORM)
        write_transform(T, tmp / FORWARD_FIELD, grid=result.fixed_grid)
        if result.inverse is not None:
            write_transform(result.inverse, tmp / INVERSE_TRANSFORM)
            write_transform(result.inverse, tmp / INVERSE_FIELD, grid=result.moving_grid)
        write_text(tmp / SUMMARY, yaml.safe_dump(summary, sort_keys=False))
    if not args.quiet:
        line = f"registered in {seconds:.1f} s; |J|<=0: {100 * summary['jacobian']['fraction_nonpositive']:.3f}%"
        if "labels" in summary:
            line += (f"; Dice {summary['labels']['before']['dice_mean']:.3f} -> "
                     f"{summary['labels']['after']['dice_mean']:.3f}")
        if "landmarks" in summary:
            line += (f"; TRE {summary['landmarks']['initial_tre_mean_mm']:.2f} -> "
                     f"{summary['landmarks']['tre_mean_mm']:.2f} mm")
        print(line)
    print(f"written to {out}")
    return 0


def add_register_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``register`` command to an argparse sub-parser collection and return its parser."""
    r = subparsers.add_parser(
        "register", help="register a moving image to a fixed image (rigid -> affine -> deformable)",
        description="Pairwise registration in world units: a global rigid search (Cross-Sim-NGF), Adam on "
        "an affine map, then on an SVF (diffeomorphic, exact inverse), B-spline or dense field with "
        "diffusion regularisation. Outputs lie on the fixed image's grid.")
    r.add_argument("fixed", help="fixed image (NIfTI, MetaImage, NRRD, PNG, ...)")
    r.add_argument("moving", help="moving image, any grid of the same dimension")
    r.add_argument("--out", required=True, help="output folder (warped image, transforms, summary.yaml)")
    r.add_argument("--similarity", default="lncc", choices=("lncc", "mind", "ngf", "mi", "mse"),
                   help="lncc or mse for the same modality; mind, mi or ngf across modalities")
    r.add_argument("--affine-similarity", default=None, choices=("lncc", "mind", "ngf", "mi", "mse"),
                   help="the affine stage's similarity (default: --similarity)")
    r.add_argument("--stages", default="rigid,affine,deformable",
                   help="comma-separated subsequence of rigid,affine,deformable")
    r.add_argument("--model", default="svf", choices=("svf", "bspline", "dense"), help="deformable model")
    r.add_argument("--lambda", dest="lam", type=float, default=None,
                   help="diffusion regularisation weight (world units; default per similarity)")
    r.add_argument("--iterations", default=None,
                   help="Adam iterations per level, one number or one per level (default 100,60,30)")
    r.add_argument("--levels", default="4,2", help="pyramid downsampling factors, coarse to fine (1: full "
                   "resolution)")
    r.add_argument("--svf-factor", type=int, default=None,
                   help="the SVF is never finer than the finest level's grid downsampled by this factor "
                   "(default 2 in 3D, 1 in 2D)")
    r.add_argument("--mask", help="fixed-image mask (nonzero inside) on the fixed grid")
    r.add_argument("--moving-mask", help="moving-image mask on the moving grid")
    r.add_argument("--labels", help="moving labelmap to warp onto the fixed grid")
    r.add_argument("--fixed-labels", help="fixed labelmap: Dice and HD95 before and after in summary.yaml")
    r.add_argument("--fixed-landmarks", help="CSV of fixed world points (columns x,y[,z], mm)")
    r.add_argument("--moving-landmarks", help="CSV of the corresponding moving world points")
    r.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:<index>")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    r.add_argument("--quiet", action="store_true", help="print only where the outputs went")
    r.set_defaults(func=cmd_register)
    return r
