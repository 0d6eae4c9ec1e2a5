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

`atlasreg register-to-atlas SCAN --checkpoint MODEL --out DIR` does the same with the trained model's
atlas image as the fixed image (its centred model grid, as ``atlasreg train`` writes it in
``<run>/atlas``) and the scan as the moving one, so ``warped`` is the scan in atlas space; it also
writes the atlas files it used and, where the transform has an exact inverse, the atlas labelmap on the
scan's own grid (``atlas_labels_on_moving.nii.gz``). ``--labels`` (the scan's labelmap) is then scored
against the atlas labelmap.

This module holds no torch import at its top, so building the command line stays fast.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .config import IMAGE_SIMILARITIES
from .errors import AtlasregError

from .contracts import (ATLAS_DIR, ATLAS_IMAGE, ATLAS_LABELMAP, ATLAS_LABELS_ON_MOVING, FINAL_CHECKPOINT,  # noqa: F401
                        FORWARD_FIELD, FORWARD_TRANSFORM, INVERSE_FIELD, INVERSE_TRANSFORM,
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


def _factors(text: str, option: str) -> tuple[int, ...]:
    """Comma-separated pyramid downsampling factors (coarse to fine, each >= 1) as a tuple. Raises
    AtlasregError naming `option` for anything else."""
    try:
        factors = tuple(int(x) for x in text.split(","))
    except ValueError:
        factors = ()
    if not factors or min(factors) < 1:
        raise AtlasregError(f"{option}: expected comma-separated downsampling factors >= 1, e.g. 4,2; got {text!r}")
    return factors


def cmd_register_to_atlas(args) -> int:
    """`atlasreg register-to-atlas`: :func:`cmd_register` with the checkpoint's atlas image as the
    fixed image. Raises AtlasregError naming the checkpoint if it holds no built atlas."""
    import tempfile

    import SimpleITK as sitk
    import torch

    from .atlas import save_atlas
    from .models.registry import load_model
    from .spatial.grid import Grid

    module = load_model(args.checkpoint)
    atlas_image, atlas_labelmap = getattr(module, "atlas_image", None), getattr(module, "atlas_labelmap", None)
    ready = getattr(module, "atlas_ready", None)
    if atlas_image is None or atlas_labelmap is None or (isinstance(ready, torch.Tensor) and not bool(ready)):
        raise AtlasregError("holds no atlas image (train an Atlas-ISTN model to build one)", args.checkpoint)
    m = module.config["model"]
    grid = Grid.centred(m["size"], m["spacing"])
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(args.moving))
        reader.ReadImageInformation()
        dim = reader.GetDimension()
    except RuntimeError:
        dim = None  # unreadable: cmd_register says so, naming the file
    if dim is not None and dim != grid.ndim:
        raise AtlasregError(f"is {dim}D but the model's atlas is {grid.ndim}D", args.moving)
    with tempfile.TemporaryDirectory(prefix="atlasreg-atlas-") as tmp:
        paths = save_atlas(atlas_labelmap, atlas_image, module.labels, grid, Path(tmp) / ATLAS_DIR)
        args.fixed, args.fixed_labels = str(paths[ATLAS_IMAGE]), str(paths[ATLAS_LABELMAP])
        args.mask = args.fixed_landmarks = args.moving_landmarks = None
        return cmd_register(args, atlas={"checkpoint": str(Path(args.checkpoint).resolve()), "paths": paths})


def cmd_register(args, atlas: dict | None = None) -> int:
    import numpy as np
    import SimpleITK as sitk
    import torch
    import yaml

    from .data.io import atomic_directory, check_output_folder, read_image, remove_temporaries, write_image, \
        write_text
    from .devices import resolve_device
    from .evaluation.registration import propagate_labels, read_landmark_pair, target_registration_error, \
        transform_regularity
    from .registration.pipeline import centres_start, register_images
    from .spatial.grid import Grid
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
    levels = _factors(args.levels, "--levels") if args.levels else None
    affine_levels = _factors(args.affine_levels, "--affine-levels") if args.affine_levels else None
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    def progress(stage):
        if not args.quiet:
            print(f"{stage} ...", flush=True)

    initial = None
    if atlas is not None and "rigid" not in stages:
        # the atlas's world frame (the centred model grid) is unrelated to the scan's: start from the
        # fields of view's centres, not from the identity
        initial = centres_start(Grid.from_sitk(fixed), Grid.from_sitk(moving), device)
    t0 = time.perf_counter()
    try:
        result = register_images(fixed, moving, similarity=args.similarity, stages=stages, model=args.model,
                                 lam=args.lam, iterations=iterations, levels=levels, fixed_mask=fixed_mask,
                                 moving_mask=moving_mask, device=device, svf_factor=args.svf_factor,
                                 affine_similarity=args.affine_similarity, regulariser=args.regulariser,
                                 affine_levels=affine_levels, fold_weight=args.fold_weight, initial=initial,
                                 tolerance=args.tolerance, progress=progress)
    except ValueError as exc:
        raise AtlasregError(str(exc).splitlines()[0]) from None
    seconds = time.perf_counter() - t0
    T = result.transform
    summary = {
        "fixed": str(Path(args.fixed).resolve()), "moving": str(Path(args.moving).resolve()),
        "stages": list(stages), **result.settings,
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
        if atlas is not None:
            import shutil

            for path in atlas["paths"].values():
                shutil.copyfile(path, tmp / Path(path).name)
            if result.inverse is not None:  # the atlas labelmap on the scan's own grid
                atlas_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(atlas["paths"][ATLAS_LABELMAP])))
                values = sorted(set(np.unique(atlas_labels).tolist()) | {0})
                on_moving = propagate_labels(atlas_labels, values, result.inverse, result.fixed_grid,
                                             result.moving_grid)
                lab_img = sitk.GetImageFromArray(on_moving.astype(np.int32))
                lab_img.CopyInformation(moving)
                write_image(lab_img, tmp / ATLAS_LABELS_ON_MOVING)
            summary["atlas_checkpoint"] = atlas["checkpoint"]
            summary["fixed"] = str((out / ATLAS_IMAGE).resolve())  # the copy beside the results
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


def _add_registration_options(r: argparse.ArgumentParser) -> None:
    """The options `register` and `register-to-atlas` share."""
    r.add_argument("--out", required=True, help="output folder (warped image, transforms, summary.yaml)")
    r.add_argument("--similarity", default=None, choices=IMAGE_SIMILARITIES,
                   help="lncc or mse for the same modality; mind, mi or ngf across modalities (default: lncc "
                   "in 3D, mi in 2D, as calibrated on mouse-brain MRI and chest X-ray pairs)")
    r.add_argument("--affine-similarity", default=None, choices=IMAGE_SIMILARITIES,
                   help="the affine stage's similarity (default: --similarity)")
    r.add_argument("--stages", default="rigid,affine,deformable",
                   help="comma-separated subsequence of rigid,affine,deformable")
    r.add_argument("--model", default="svf", choices=("svf", "bspline", "dense"), help="deformable model")
    r.add_argument("--regulariser", default="diffusion", choices=("diffusion", "bending"),
                   help="the deformable stage's penalty: first (diffusion) or second (bending) derivatives")
    r.add_argument("--lambda", dest="lam", type=float, default=None,
                   help="regularisation weight (world units; default per similarity, set for diffusion)")
    r.add_argument("--fold-weight", type=float, default=None,
                   help="weight of the penalty on Jacobian determinants below 0.1 (0: off; default 100 in 2D, "
                   "0 in 3D)")
    r.add_argument("--iterations", default=None,
                   help="Adam iterations per level, one number or one per level (default 100,60,30 for three "
                   "levels, 60,30 for two)")
    r.add_argument("--levels", default=None, help="pyramid downsampling factors, coarse to fine (1: full "
                   "resolution; default 8,4,2 in 2D, 4,2 in 3D)")
    r.add_argument("--affine-levels", default=None,
                   help="the affine stage's own pyramid (default 16,8,4 in 2D when --levels is not given, "
                   "else --levels)")
    r.add_argument("--tolerance", type=float, default=None,
                   help="a pyramid level stops once the mean objective of its last 10 iterations is below "
                   "that of the 10 before by less than this fraction (0: off; default 0.01 in 2D, 0 in 3D)")
    r.add_argument("--svf-factor", type=int, default=None,
                   help="the SVF is never finer than the finest level's grid downsampled by this factor "
                   "(default 2)")
    r.add_argument("--moving-mask", help="moving-image mask on the moving grid")
    r.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:<index>")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    r.add_argument("--quiet", action="store_true", help="print only where the outputs went")


def add_register_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``register`` and ``register-to-atlas`` commands to an argparse sub-parser collection and
    return the ``register`` parser."""
    r = subparsers.add_parser(
        "register", help="register a moving image to a fixed image (rigid -> affine -> deformable)",
        description="Pairwise registration in world units: a global rigid search (Cross-Sim-NGF), Adam on "
        "an affine map, then on an SVF (diffeomorphic, exact inverse), B-spline or dense field with "
        "diffusion regularisation. Outputs lie on the fixed image's grid.")
    r.add_argument("fixed", help="fixed image (NIfTI, MetaImage, NRRD, PNG, ...)")
    r.add_argument("moving", help="moving image, any grid of the same dimension")
    _add_registration_options(r)
    r.add_argument("--mask", help="fixed-image mask (nonzero inside) on the fixed grid")
    r.add_argument("--labels", help="moving labelmap to warp onto the fixed grid")
    r.add_argument("--fixed-labels", help="fixed labelmap: Dice and HD95 before and after in summary.yaml")
    r.add_argument("--fixed-landmarks", help="CSV of fixed world points (columns x,y[,z], mm)")
    r.add_argument("--moving-landmarks", help="CSV of the corresponding moving world points")
    r.set_defaults(func=cmd_register)
    a = subparsers.add_parser(
        "register-to-atlas", help="register a scan to a trained model's atlas image (rigid -> affine -> SVF)",
        description="`register` with the atlas image of a trained Atlas-ISTN checkpoint as the fixed image: "
        "the scan warped into atlas space, the transforms both ways, and the atlas labelmap on the scan's "
        "own grid.")
    a.add_argument("moving", metavar="scan", help="the scan (NIfTI, PNG, ...), of the model's dimension")
    a.add_argument("--checkpoint", required=True, help=f"{FINAL_CHECKPOINT} written by `atlasreg train`")
    _add_registration_options(a)
    a.add_argument("--labels", help="the scan's labelmap: warped into atlas space and scored against the atlas "
                   "labelmap in summary.yaml")
    a.set_defaults(func=cmd_register_to_atlas)
    return r
