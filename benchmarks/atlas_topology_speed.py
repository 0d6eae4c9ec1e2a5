"""Seconds of atlasreg.atlas_topology.connect_structures on a trained model's atlas (its model grid) and
on that atlas upsampled to a given size (about an input grid), median of 3 runs, and what it changed.

    python benchmarks/atlas_topology_speed.py runs/mouse4/atlas_istn --size 80 144 96
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from atlasreg.atlas_topology import connect_structures
from atlasreg.contracts import ATLAS_PROBABILITIES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a training run folder (its atlas/ holds the probabilities)")
    parser.add_argument("--size", type=int, nargs="+", default=None, help="upsampled grid, array order")
    args = parser.parse_args()
    image = sitk.ReadImage(str(args.run / "atlas" / ATLAS_PROBABILITIES))
    spacing = list(reversed(image.GetSpacing()))
    probs = torch.from_numpy(np.moveaxis(sitk.GetArrayFromImage(image), -1, 0))[None]
    grids = [("model grid", probs, spacing)]
    if args.size:
        factor = [s * n / m for s, n, m in zip(spacing, probs.shape[2:], args.size)]
        grids.append(("upsampled", torch.nn.functional.interpolate(probs, size=tuple(args.size), mode="trilinear",
                                                                   align_corners=False), factor))
    for name, p, sp in grids:
        p = p[0].numpy()
        indices = p.argmax(0)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            out, changes = connect_structures(indices, p, sp)
            times.append(time.perf_counter() - start)
        print(f"{name} {tuple(indices.shape)}: {statistics.median(times):.3f} s, {int((out != indices).sum())} of "
              f"{indices.size} voxels changed; {changes}")


if __name__ == "__main__":
    main()
