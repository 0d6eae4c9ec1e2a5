"""Success rate of the global rigid initialiser (registration/rigid.py, Cross-Sim-NGF) against the
rotation angle and the shift, on the synthetic 2D and 3D phantom of tests/test_rigid.py (issue 12,
item 3). Run by hand; prints a table per dimension and the time per case.

    python benchmarks/rigid_success.py                      # 2D and 3D, the defaults below
    python benchmarks/rigid_success.py --dims 3 --angles 0 90 180 --shifts 0 20 --repeats 2 \
        --step 30 --max-size 24                             # a quick 3D check

Each case: a known rotation (2D: +-angle at random; 3D: about a random axis) and a shift of the given
length in a random direction (mm), the moving image on another grid (other spacing, rotated and
flipped axes, a field of view that does not follow the shift, so large shifts lose part of the
phantom), its contrast inverted in every other repetition, Gaussian noise (--noise, a fraction of the
phantom's range) on both images. Success: every phantom voxel of the fixed image (phantom > 0.5) is
mapped within half a working voxel (h / 2) of its true position, and the rotation error is under
3 degrees (the tolerance of tests/test_rigid.py). In brackets: the cases near the pose (within 2 h and
10 degrees: a start an affine registration would likely refine). Also printed: the median of the
largest point error (mm) and the median rotation error over the successes, and the seconds per case.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_rigid import (OBLIQUE_2D, OBLIQUE_3D, TOLERANCE, TOLERANCE_DEGREES, AffineTransform,  # noqa: E402
                        errors, grid_around, pair, rotation)

from atlasreg.registration import rigid_search  # noqa: E402

#: Grids: fixed (array order size, spacing in mm ITK order, centre mm), moving (size, spacing, centre,
#: direction). The moving field of view is about 100 mm (2D) / 84 mm (3D) wide, enough for the
#: phantom (about 76 mm across) in any orientation when unshifted.
GRIDS = {
    2: (((64, 64), (1.5, 1.5), (1.0, -2.0)), ((64, 56), (1.8, 1.6), (3.0, -2.0), OBLIQUE_2D)),
    3: (((24, 32, 40), (1.8, 2.0, 2.5), (1.0, -2.0, 3.0)),
        ((36, 38, 40), (2.1, 2.2, 2.3), (2.0, -1.0, 1.0), OBLIQUE_3D)),
}


def case(ndim: int, angle: float, shift: float, rng: np.random.Generator, invert: bool, noise: float,
         settings: dict) -> tuple[bool, bool, float, float, float]:
    """One registration: (success, near, largest point error mm, rotation error degrees, seconds)."""
    if ndim == 2:
        R = rotation(2, angle * rng.choice([-1.0, 1.0]))
    else:
        R = rotation(3, angle, rng.normal(size=3))
    direction = rng.normal(size=ndim)
    t = direction / np.linalg.norm(direction) * shift
    true = AffineTransform.from_numpy(R, t, dtype=torch.float64)
    (fs, fsp, fc), (ms, msp, mc, mdir) = GRIDS[ndim]
    fixed_grid, moving_grid = grid_around(fs, fsp, fc), grid_around(ms, msp, mc, mdir)
    fixed, moving = pair(true, fixed_grid, moving_grid, invert)
    if noise:
        g = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
        scale = noise * float(fixed.max() - fixed.min())
        fixed = fixed + scale * torch.randn(fixed.shape, generator=g)
        moving = moving + scale * (3.0 if invert else 1.0) * torch.randn(moving.shape, generator=g)
    start = time.perf_counter()
    found = rigid_search(fixed, moving, fixed_grid, moving_grid, **settings)
    seconds = time.perf_counter() - start
    clean = pair(true, fixed_grid, moving_grid)[0]
    _, worst, angle_error = errors(found, true, fixed_grid, clean)
    extent = max(float(np.max(np.asarray(g.size_xyz) * np.asarray(g.spacing))) for g in (fixed_grid, moving_grid))
    h = max(settings.get("spacing") or 0.0, extent / (settings.get("max_size") or (64 if ndim == 2 else 32)))
    success = worst < TOLERANCE * h and angle_error < TOLERANCE_DEGREES
    return success, worst < 2.0 * h and angle_error < 10.0, worst, angle_error, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--angles", type=float, nargs="+", default=[0, 30, 60, 90, 120, 150, 180],
                        help="rotation angles in degrees")
    parser.add_argument("--shifts", type=float, nargs="+", default=[0, 10, 20], help="shift lengths in mm")
    parser.add_argument("--repeats", type=int, default=4, help="cases per angle and shift (random axis, direction)")
    parser.add_argument("--noise", type=float, default=0.05, help="noise SD as a fraction of the phantom's range")
    parser.add_argument("--step", type=float, default=None, help="rigid_search's global rotation step (degrees)")
    parser.add_argument("--max-size", type=int, default=None, help="rigid_search's max_size")
    parser.add_argument("--eps", type=float, default=1.0, help="rigid_search's eps")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = {"step": args.step, "max_size": args.max_size, "eps": args.eps}
    for ndim in args.dims:
        rng = np.random.default_rng(args.seed)
        print(f"\n{ndim}D: success (of {args.repeats}) by rotation angle (rows) and shift (columns); "
              f"settings {settings}, noise {args.noise}")
        print("angle  " + "".join(f"{f'{s:g} mm':>12s}" for s in args.shifts)
              + "   median max error (mm), angle error (deg)")
        times, failures, near_total = [], 0, 0
        for angle in args.angles:
            row, worst, angles = [], [], []
            for shift in args.shifts:
                ok = near = 0
                for r in range(args.repeats):
                    success, close, w, a, seconds = case(ndim, angle, shift, rng, r % 2 == 1, args.noise, settings)
                    ok += success
                    near += close
                    near_total += close
                    times.append(seconds)
                    if success:
                        worst.append(w)
                        angles.append(a)
                row.append(f"{ok}/{args.repeats} ({near})")
                failures += args.repeats - ok
            med = (f"{np.median(worst):.2f}, {np.median(angles):.2f}" if worst else "-")
            print(f"{angle:5g}  " + "".join(f"{c:>12s}" for c in row) + f"   {med}", flush=True)
        total = len(times)
        print(f"{ndim}D: {total - failures}/{total} successful, {near_total}/{total} near; seconds per case: "
              f"median {np.median(times):.2f}, max {np.max(times):.2f} ({torch.get_num_threads()} thread(s))")


if __name__ == "__main__":
    main()
