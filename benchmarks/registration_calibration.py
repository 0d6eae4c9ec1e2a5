"""Calibrate atlasreg's registration defaults on pairs the reported benchmark does not use.

Registers each pair in-process with ``register_images`` under the settings given as JSON (no process
start per pair, so a setting costs only its registrations), and prints one JSON line per pair:
seconds, Dice over the structures (labels propagated by atlasreg) and the Jacobian statistics of
atlasreg's own direction-aware determinant; then one summary line (mean Dice, mean and max folding,
mean SD log J, median seconds).

Sets (``--set``): ``mouse`` (brain mask from the fixed image, voxels > 0; ``--pairs`` are indices into
the sorted image list of ../shared/data/mouse-brain-mri) and ``jsrt`` (the whole image). ``--cases N
--skip K`` takes every ordered pair of cases K .. K+N-1 instead of ``--pairs``. The calibration of
docs/results.md used the mouse pairs 6-7, 7-6, 8-9, 9-10, 10-11, 11-8 (cases 7-12 of the sorted list;
the reported pairs use the first six), one thread, two runs at a time:

    python benchmarks/registration_calibration.py --pairs 6:7 8:9 10:11 --settings '{"svf_factor": 2}'
    python benchmarks/registration_calibration.py --set jsrt --skip 6 --cases 10 --stages rigid,affine,deformable \
        --settings '{"similarity": "mi", "lam": 1.0}'

``--affine-iterations 60,0`` replaces the affine stage's iterations per level (a variant tried and not
kept).
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--set", default="mouse", choices=("mouse", "jsrt"))
    p.add_argument("--pairs", nargs="+", default=None, help="FIXED:MOVING indices into the sorted image list")
    p.add_argument("--cases", type=int, default=None, help="every ordered pair of N cases (instead of --pairs)")
    p.add_argument("--skip", type=int, default=0, help="with --cases: leave out the first K cases")
    p.add_argument("--stages", default="affine,deformable", help="register_images's stages")
    p.add_argument("--settings", default="{}", help="JSON keyword arguments of register_images")
    p.add_argument("--affine-iterations", default=None, help="the affine stage's iterations per level, e.g. 60,0")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import numpy as np
    import SimpleITK as sitk
    import torch

    import atlasreg.registration.instance as instance
    from atlasreg.evaluation.registration import propagate_labels, propagated_label_metrics, transform_regularity
    from atlasreg.registration.pipeline import register_images

    torch.set_num_threads(args.threads)
    if args.affine_iterations:
        affine_its = tuple(int(v) for v in args.affine_iterations.split(","))
        optimise = instance.optimise

        def patched(*a, **k):  # the affine stage only; the pipeline calls instance.optimise by name
            if k.get("model") == "affine":
                k["iterations"] = affine_its[-len(k["levels"]):]
            return optimise(*a, **k)
        instance.optimise = patched
    settings = json.loads(args.settings)
    folder, suffix = {"mouse": ("mouse-brain-mri", ".nii.gz"), "jsrt": ("chest-xray/jsrt", ".png")}[args.set]
    images = sorted(glob.glob(str(Path(args.data) / folder / "images" / f"*{suffix}")))
    if args.cases:
        chosen = range(args.skip, args.skip + args.cases)
        pairs = [f"{i}:{j}" for i in chosen for j in chosen if i != j]
    elif args.pairs:
        pairs = args.pairs
    else:
        p.error("give --pairs or --cases")
    stages = tuple(args.stages.split(","))
    rows = []
    for pair in pairs:
        fi, mi = (images[int(i)] for i in pair.split(":"))
        fixed, moving = sitk.ReadImage(fi, sitk.sitkFloat32), sitk.ReadImage(mi, sitk.sitkFloat32)
        fixed_lab = sitk.GetArrayFromImage(sitk.ReadImage(fi.replace("images", "labels")))
        moving_lab = sitk.GetArrayFromImage(sitk.ReadImage(mi.replace("images", "labels")))
        t0 = time.perf_counter()
        mask = sitk.BinaryThreshold(fixed, 1e-6, 1e30, 1, 0) if args.set == "mouse" else None
        r = register_images(fixed, moving, stages=stages, fixed_mask=mask, **settings)
        seconds = time.perf_counter() - t0
        labels = sorted(set(np.unique(moving_lab).tolist()) | {0})
        warped = propagate_labels(moving_lab, labels, r.transform, r.moving_grid, r.fixed_grid)
        metrics = propagated_label_metrics(warped, fixed_lab, labels, r.fixed_grid.spacing)
        with torch.no_grad():
            reg = transform_regularity(r.transform, r.fixed_grid)
        row = {"pair": pair, "settings": settings, "affine_iterations": args.affine_iterations,
               "seconds": round(seconds, 2), "dice": round(float(metrics["dice_mean"]), 4),
               "folded_percent": 100 * float(reg["fraction_nonpositive"][0]),
               "std_log_jacobian": round(float(reg["std_log_jacobian"][0]), 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    column = {k: np.array([r[k] for r in rows], float) for k in ("dice", "folded_percent", "std_log_jacobian", "seconds")}
    print(json.dumps({"summary": True, "set": args.set, "stages": args.stages, "settings": settings, "pairs": len(rows),
                      "dice": round(float(column["dice"].mean()), 4),
                      "folded_percent_mean": round(float(column["folded_percent"].mean()), 4),
                      "folded_percent_max": round(float(column["folded_percent"].max()), 4),
                      "pairs_folded": int((column["folded_percent"] > 0).sum()),
                      "std_log_jacobian": round(float(column["std_log_jacobian"].mean()), 3),
                      "median_seconds": round(float(np.median(column["seconds"])), 2)}), flush=True)


if __name__ == "__main__":
    main()
