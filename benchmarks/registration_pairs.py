"""Pairwise registration benchmark (issue 12): atlasreg against elastix, ANTs SyN and ConvexAdam.

Every ordered pair (fixed, moving) of the first N cases of a set is registered by each method; each
method runs in a subprocess of its own (its time and peak memory, VmHWM, are its own) and writes its transform
as an ITK displacement field on the fixed grid (fixed world point p -> moving world point p + d(p),
mm). This script then scores every method the same way: the moving labelmap is resampled with that
field by SimpleITK (nearest neighbour), Dice and HD95 per structure against the fixed labelmap
(:func:`atlasreg.evaluation.registration.propagated_label_metrics`, MONAI), and the Jacobian
determinant of the field (atlasreg's direction-aware one; see `_score`) inside the fixed
brain (labels > 0 dilated by 2 voxels): the fraction <= 0 and the SD of log det J over det J > 0.

Times: ``seconds`` is the registration alone (the worker imports its libraries and reads the images
first); ``wall_s`` the whole worker process (Python start, imports, reading, registration, writing the
field), what one command-line call per pair costs.

Methods (``--methods``, comma-separated):
- ``atlasreg``: `atlasreg.registration.pipeline.register_images`, affine -> SVF, its defaults (LNCC in 3D, MIND in 2D)
  (``--levels``, ``--lam``, ``--iterations`` and ``--similarity`` change them for a calibration
  run, ``--tag`` names it);
- ``atlasreg_rigid``: the same with the global rigid start first;
- ``atlasreg_affine``: affine only (atlasreg without the deformable instance optimisation);
- ``elastix``: itk-elastix, its default 'affine' + 'bspline' parameter maps;
- ``ants``: antspyx ``registration(type_of_transform='SyN')`` (its affine start included), run with
  the Python of ``--ants-python`` (antspyx needs another NumPy than atlasreg's environment);
- ``convexadam``: convexAdam's ``convex_adam_pt`` with its MIND defaults, on the moving image
  resampled onto the fixed grid (it has no affine part and needs one grid).
The tools are optional benchmark dependencies (``pip install itk-elastix==0.25.4 convexadam==0.2.0``;
``antspyx==0.6.3`` in its own virtual environment), never required by atlasreg.

Results are appended to ``<out>/results.csv`` (one row per pair and method; a rerun skips the rows
there), and a Markdown summary (mean over pairs) is printed. Example (30 pairs of 6 mouse volumes):

    python benchmarks/registration_pairs.py --set mouse --cases 6 --out runs/regbench \
        --methods atlasreg,atlasreg_rigid,atlasreg_affine,elastix,ants,convexadam --threads 2

Sets (``--set``): ``mouse`` (3D, 0.15 mm, 37 structures; atlasreg gets the brain mask, voxels > 0) and
``jsrt`` (2D chest X-rays, 256 x 256 PNGs without spacing: distances in pixels; right lung, left lung,
heart; the whole image; ConvexAdam is left out, its MIND-SSC and convex step being 3D only).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

#: mask: the fixed image's region given to atlasreg (brain-extracted MRI: the voxels > 0; None: all);
#: methods: those that run on the set (ConvexAdam's MIND-SSC and convex step are 3D only).
SETS = {
    "mouse": {"images": "mouse-brain-mri/images", "labels": "mouse-brain-mri/labels", "suffix": ".nii.gz",
              "mask": "positive", "methods": None},
    "jsrt": {"images": "chest-xray/jsrt/images", "labels": "chest-xray/jsrt/labels", "suffix": ".png",
             "mask": None, "methods": {"atlasreg", "atlasreg_rigid", "atlasreg_affine", "elastix", "ants"}},
}
#: atlasreg's settings that the script passes on to each worker (command-line options of the same name).
WORKER_OPTIONS = ("levels", "lam", "iterations", "similarity", "svf_factor", "affine_similarity", "model",
                  "regulariser", "affine_levels", "fold_weight", "tolerance")
COLUMNS = ("fixed", "moving", "method", "seconds", "wall_s", "peak_mb", "dice_mean", "hd95_mean", "dice_before",
           "nonpositive_jacobian_percent", "std_log_jacobian", "n_labels")


# ------------------------------------------------------------------------------------------ workers

def _load_libraries(method: str) -> None:
    """Import what `method` runs on before the clock starts: torch (with torch._dynamo, which
    torch.optim imports at its first use: ConvexAdam's optimiser; atlasreg's instance optimisation has
    its own Adam), MONAI for atlasreg's rigid start (the search blurs with MONAI's
    GaussianFilter; importing MONAI takes about 2 s, more where itk is installed, which MONAI then
    imports too), itk's elastix module (itk loads lazily at first use), ants."""
    if method.startswith("atlasreg") or method == "convexadam":
        import torch._dynamo  # noqa: F401

        import atlasreg.registration.pipeline  # noqa: F401
        if method == "atlasreg_rigid":
            import monai.networks.layers  # noqa: F401
    elif method == "elastix":
        import itk

        itk.ParameterObject, itk.elastix_registration_method  # noqa: B018 - loads the module
    elif method == "ants":
        import ants  # noqa: F401


def _worker(method: str, fixed_path: str, moving_path: str, field_path: str, options: dict) -> dict:
    """Register one pair with one method; writes the displacement field; returns its own timing."""
    import SimpleITK as sitk

    threads = int(options.get("threads") or 0)
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    fixed, moving = sitk.ReadImage(fixed_path, sitk.sitkFloat32), sitk.ReadImage(moving_path, sitk.sitkFloat32)
    _load_libraries(method)  # their import (seconds) is not registration time; the row's wall_s has it
    t0 = time.perf_counter()
    if method.startswith("atlasreg"):
        import torch

        from atlasreg.registration.pipeline import register_images
        from atlasreg.spatial.itk import write_transform

        if threads:
            torch.set_num_threads(threads)
        stages = {"atlasreg": ("affine", "deformable"), "atlasreg_rigid": ("rigid", "affine", "deformable"),
                  "atlasreg_affine": ("affine",)}[method]
        kwargs = {}
        if options.get("levels"):
            kwargs["levels"] = tuple(int(v) for v in options["levels"].split(","))
        if options.get("lam") is not None:
            kwargs["lam"] = float(options["lam"])
        if options.get("iterations"):
            kwargs["iterations"] = tuple(int(v) for v in options["iterations"].split(","))
        if options.get("similarity"):
            kwargs["similarity"] = options["similarity"]
        if options.get("affine_similarity"):
            kwargs["affine_similarity"] = options["affine_similarity"]
        if options.get("svf_factor"):
            kwargs["svf_factor"] = int(options["svf_factor"])
        if options.get("affine_levels"):
            kwargs["affine_levels"] = tuple(int(v) for v in options["affine_levels"].split(","))
        for name in ("fold_weight", "tolerance"):
            if options.get(name) is not None:
                kwargs[name] = float(options[name])
        for name in ("model", "regulariser"):
            if options.get(name):
                kwargs[name] = options[name]
        if options.get("mask") == "positive":  # brain-extracted: the brain is > 0
            kwargs["fixed_mask"] = sitk.BinaryThreshold(fixed, 1e-6, 1e30, 1, 0)
        result = register_images(fixed, moving, stages=stages, **kwargs)
        seconds = time.perf_counter() - t0
        write_transform(result.transform, field_path, grid=result.fixed_grid)
    elif method == "elastix":
        import itk

        if threads:
            itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
        f, m = itk.imread(fixed_path, itk.F), itk.imread(moving_path, itk.F)
        params = itk.ParameterObject.New()
        for name in ("affine", "bspline"):
            params.AddParameterMap(params.GetDefaultParameterMap(name))
        _, transform_params = itk.elastix_registration_method(f, m, parameter_object=params, log_to_console=False)
        seconds = time.perf_counter() - t0
        field = itk.transformix_deformation_field(m, transform_params)
        itk.imwrite(field, field_path)
    elif method == "ants":
        import ants

        f, m = ants.image_read(fixed_path), ants.image_read(moving_path)
        reg = ants.registration(f, m, type_of_transform="SyN")
        seconds = time.perf_counter() - t0
        composite = ants.apply_transforms(f, m, transformlist=reg["fwdtransforms"], compose=str(Path(field_path).parent / "ants_"))
        os.replace(composite, field_path)
    elif method == "convexadam":
        import numpy as np
        import torch
        from convexAdam.convex_adam_MIND import convex_adam_pt

        if threads:
            torch.set_num_threads(threads)
        on_fixed = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0)
        a_f, a_m = sitk.GetArrayFromImage(fixed), sitk.GetArrayFromImage(on_fixed)  # (z, y, x)
        disp = convex_adam_pt(a_f, a_m, device=torch.device("cpu"))  # voxels along the array axes
        seconds = time.perf_counter() - t0
        # array axes (z, y, x) in voxels -> ITK (x, y, z) index steps -> world mm through the direction
        steps = disp[..., ::-1] * np.asarray(fixed.GetSpacing())
        direction = np.asarray(fixed.GetDirection()).reshape(3, 3)
        world = steps @ direction.T
        img = sitk.GetImageFromArray(world.astype(np.float64), isVector=True)
        img.CopyInformation(fixed)
        sitk.WriteImage(img, field_path)
    else:
        raise SystemExit(f"unknown method {method}")
    return {"seconds": seconds, "peak_mb": _peak_mb()}


def _peak_mb() -> float:
    """This process's peak resident memory (MB): VmHWM of /proc/self/status, the high-water mark of
    its own address space. Not getrusage's ru_maxrss, which on Linux also holds the parent's resident
    size at the fork (measured: a worker started by a 218 MB parent reported 218 MB, VmHWM 14 MB);
    ru_maxrss is the fallback where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------ scoring

def _score(fixed_labels_path: Path, moving_labels_path: Path, field_path: Path) -> dict:
    """Dice and HD95 of the moving labels resampled by SimpleITK with the field, and the field's
    Jacobian determinant inside the dilated foreground. The Jacobian is atlasreg's (central
    differences of the world-space map, direction-aware), not SimpleITK's
    DisplacementFieldJacobianDeterminant: that filter differentiates along the index axes and ignores
    the direction matrix (ITK issue #5358, fixed upstream in 2025 but not in the SimpleITK installed
    here); on the mouse volumes, direction diag(-1, -1, 1), it reported folds where there are none."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from atlasreg.evaluation.registration import propagated_label_metrics, transform_regularity
    from atlasreg.spatial.grid import Grid
    from atlasreg.spatial.itk import read_transform

    fixed_lab = sitk.ReadImage(str(fixed_labels_path))
    moving_lab = sitk.ReadImage(str(moving_labels_path))
    field = sitk.Cast(sitk.ReadImage(str(field_path)), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(sitk.Image(field))
    warped = sitk.Resample(moving_lab, fixed_lab, transform, sitk.sitkNearestNeighbor, 0)
    identity = sitk.Resample(moving_lab, fixed_lab, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    f = sitk.GetArrayFromImage(fixed_lab)
    labels = [0] + sorted(int(v) for v in np.unique(f) if v != 0)
    spacing = fixed_lab.GetSpacing()
    after = propagated_label_metrics(sitk.GetArrayFromImage(warped), f, labels, spacing)
    before = propagated_label_metrics(sitk.GetArrayFromImage(identity), f, labels, spacing)
    brain = sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.Cast(fixed_lab > 0, sitk.sitkUInt8),
                                                     [2] * fixed_lab.GetDimension())) > 0
    regularity = transform_regularity(read_transform(field_path), Grid.from_sitk(fixed_lab),
                                      torch.from_numpy(brain)[None])
    return {"dice_mean": after["dice_mean"], "hd95_mean": after["hd95_mean"], "dice_before": before["dice_mean"],
            "nonpositive_jacobian_percent": 100.0 * float(regularity["fraction_nonpositive"][0]),
            "std_log_jacobian": float(regularity["std_log_jacobian"][0]), "n_labels": len(labels) - 1}


# ------------------------------------------------------------------------------------------ driver

def _pairs(data: Path, name: str, n: int, skip: int = 0) -> list[tuple[Path, Path, Path, Path]]:
    spec = SETS[name]
    images = sorted((data / spec["images"]).glob("*" + spec["suffix"]))[skip:skip + n]
    labels = [data / spec["labels"] / p.name for p in images]
    return [(images[i], labels[i], images[j], labels[j]) for i in range(len(images)) for j in range(len(images))
            if i != j]


def _case(path: Path) -> str:
    return path.name.split(".")[0]


def _summary(rows: list[dict]) -> str:
    import numpy as np

    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = ["| method | pairs | Dice | HD95 (mm) | %abs(J)<=0 | SD log J | s / pair | process s / pair | peak MB |",
           "|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        def stat(key, fmt):
            v = np.array([float(r[key]) for r in rs], float)
            return f"{np.nanmean(v):{fmt}} ± {np.nanstd(v):{fmt}}"
        sec = np.array([float(r["seconds"]) for r in rs])
        out.append(f"| {m} | {len(rs)} | {stat('dice_mean', '.3f')} | {stat('hd95_mean', '.2f')} | "
                   f"{stat('nonpositive_jacobian_percent', '.3f')} | {stat('std_log_jacobian', '.3f')} | "
                   f"{np.median(sec):.1f} (median) | {np.nanmedian([float(r.get('wall_s') or 'nan') for r in rs]):.1f} | "
                   f"{np.median([float(r['peak_mb']) for r in rs]):.0f} |")
    before = np.array([float(r["dice_before"]) for r in rows if r["method"] == methods[0]])
    out.append(f"\nDice before registration (identity in world coordinates): {before.mean():.3f}")
    return "\n".join(out)


def _paired(rows: list[dict], reference: str) -> str:
    """`reference` against every other method over the pairs both ran: mean Dice difference, pairs won,
    Wilcoxon signed-rank p (scipy), median of the other's seconds / the reference's."""
    import numpy as np
    from scipy.stats import wilcoxon

    by: dict[str, dict] = {}
    for r in rows:
        by.setdefault(r["method"], {})[(r["fixed"], r["moving"])] = r
    if reference not in by:
        raise SystemExit(f"--compare: no rows of method {reference!r}")
    ref = by[reference]
    lines = [f"| {reference} against | pairs | Dice difference | pairs won | p | time ratio (median) |",
             "|---|---:|---:|---:|---:|---:|"]
    for method, other in by.items():
        keys = sorted(set(ref) & set(other))
        if method == reference or not keys:
            continue
        d = np.array([float(ref[k]["dice_mean"]) - float(other[k]["dice_mean"]) for k in keys])
        ratio = np.median([float(other[k]["seconds"]) / float(ref[k]["seconds"]) for k in keys])
        p = wilcoxon(d).pvalue if np.any(d != 0) else float("nan")
        lines.append(f"| {method} | {len(keys)} | {d.mean():+.3f} | {int((d > 0).sum())} | {p:.1g} | {ratio:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", default="mouse", choices=sorted(SETS))
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--cases", type=int, default=6, help="first N cases: N (N - 1) ordered pairs")
    p.add_argument("--skip", type=int, default=0,
                   help="leave out the first K cases (a calibration run on cases the reported pairs do not use)")
    p.add_argument("--max-pairs", type=int, default=None)
    p.add_argument("--methods", default="atlasreg,atlasreg_rigid,atlasreg_affine,elastix,ants,convexadam")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--levels", default=None, help="atlasreg pyramid levels, e.g. 4,2 (default: its own)")
    p.add_argument("--lam", type=float, default=None, help="atlasreg lambda (default: its own)")
    p.add_argument("--iterations", default=None, help="atlasreg Adam iterations per level, e.g. 120,60 (default: its own)")
    p.add_argument("--similarity", default=None, help="atlasreg similarity (default: its own per dimension)")
    p.add_argument("--affine-similarity", default=None, help="atlasreg: the affine stage's similarity (default: --similarity)")
    p.add_argument("--svf-factor", type=int, default=None,
                   help="atlasreg: the SVF is never finer than the finest level's grid downsampled by "
                   "this factor (default: its own)")
    p.add_argument("--model", default=None, help="atlasreg: the deformable model, svf, bspline or dense (default: svf)")
    p.add_argument("--fold-weight", type=float, default=None, help="atlasreg: the folding penalty's weight (default: its own)")
    p.add_argument("--regulariser", default=None, help="atlasreg: diffusion or bending (default: diffusion)")
    p.add_argument("--affine-levels", default=None, help="atlasreg: the affine stage's pyramid, e.g. 8,4,2 "
                   "(default: its own)")
    p.add_argument("--tolerance", type=float, default=None, help="atlasreg: a pyramid level's early-stop "
                   "tolerance (default: its own)")
    p.add_argument("--keep-fields", action="store_true", help="keep each method's displacement field (10 MB per "
                   "mouse pair) under OUT/fields, to score it again later")
    p.add_argument("--compare", default=None, help="also print METHOD paired against every other method")
    p.add_argument("--tag", default="", help="suffix of the method names in the results (calibration runs)")
    p.add_argument("--ants-python", default="/work/venv-ants/bin/python")
    p.add_argument("--worker", nargs=4, metavar=("METHOD", "FIXED", "MOVING", "FIELD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    options = {"threads": args.threads, "mask": SETS[args.set]["mask"],
               **{option: getattr(args, option) for option in WORKER_OPTIONS}}
    if args.worker:
        print(json.dumps(_worker(*args.worker, options)), flush=True)
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.csv"
    rows = list(csv.DictReader(open(results))) if results.is_file() else []
    done = {(r["fixed"], r["moving"], r["method"]) for r in rows}
    pairs = _pairs(Path(args.data), args.set, args.cases, args.skip)[: args.max_pairs]
    methods = [m for m in args.methods.split(",") if m and m != "none"]  # none: only the summary
    runs_on = SETS[args.set]["methods"]
    if runs_on is not None and set(methods) - runs_on:
        print(f"not on {args.set} (2D): {', '.join(sorted(set(methods) - runs_on))}", file=sys.stderr)
        methods = [m for m in methods if m in runs_on]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(args.threads))
    for k, (fi, fl, mi, ml) in enumerate(pairs):
        for method in methods:
            name = method + args.tag
            key = (_case(fi), _case(mi), name)
            if key in done:
                continue
            work = out / "fields" / f"{key[0]}__{key[1]}"
            work.mkdir(parents=True, exist_ok=True)
            field = work / f"{name}.nii.gz"
            python = args.ants_python if method == "ants" else sys.executable
            cmd = [python, __file__, "--worker", method, str(fi), str(mi), str(field), "--out", str(out),
                   "--threads", str(args.threads), "--set", args.set]
            for option in WORKER_OPTIONS:  # the worker gets the same options
                if options[option] is not None:
                    cmd += [f"--{option.replace('_', '-')}", str(options[option])]
            start = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=work)  # transformix writes there
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                print(f"{key}: failed\n{proc.stderr[-2000:]}", file=sys.stderr, flush=True)
                continue
            timing = json.loads(proc.stdout.strip().splitlines()[-1])
            row = {"fixed": key[0], "moving": key[1], "method": name, **timing, "wall_s": wall, **_score(fl, ml, field)}
            if not args.keep_fields:
                field.unlink()  # 10 MB per field: only the scores are kept
            rows.append(row)
            new = not results.is_file()
            with open(results, "a", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=COLUMNS)
                if new:
                    writer.writeheader()
                writer.writerow({c: row.get(c) for c in COLUMNS})
            print(f"[{k + 1}/{len(pairs)}] {key[0]} <- {key[1]} {name}: Dice {row['dice_mean']:.3f} "
                  f"(before {row['dice_before']:.3f}), HD95 {row['hd95_mean']:.2f} mm, "
                  f"|J|<=0 {row['nonpositive_jacobian_percent']:.3f}%, {row['seconds']:.1f} s, "
                  f"{row['peak_mb']:.0f} MB", flush=True)
    print(_summary(rows))
    if args.compare:
        print(_paired(rows, args.compare))


if __name__ == "__main__":
    main()
