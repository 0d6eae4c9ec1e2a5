"""Seconds of the DeepATLAS template solver (Eq. 14, :func:`atlasreg.deepatlas.template.template_mask`)
on a synthetic 3D problem: K labels of random values on an exam of EXAM voxels (array order) whose
coordinate map covers 80% of a template of TEMPLATE voxels. Prints the median of --repeats runs.

    OMP_NUM_THREADS=1 python benchmarks/template_speed.py --labels 4 41 --exam 32,48,40 80,128,112
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from atlasreg.deepatlas.coordinates import identity_coordinates  # noqa: E402
from atlasreg.deepatlas.template import template_mask  # noqa: E402


def shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=int, nargs="+", default=[4, 41])
    parser.add_argument("--exam", type=shape, nargs="+", default=[(32, 48, 40)])
    parser.add_argument("--template", type=shape, default=(64, 96, 80))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| exam | template | labels | seconds (median) |\n|---|---|---:|---:|")
    for exam in args.exam:
        c = identity_coordinates(exam) * 0.8 + 0.05 * torch.randn(1, 3, 1, 1, 1)
        for k in args.labels:
            labels = torch.randint(0, k, (1, *exam))
            masks = torch.nn.functional.one_hot(labels, k).movedim(-1, 1).float()
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                template_mask(c, masks, args.template)
                times.append(time.perf_counter() - t0)
            print(f"| {'x'.join(map(str, exam))} | {'x'.join(map(str, args.template))} | {k} | "
                  f"{statistics.median(times):.1f} |")


if __name__ == "__main__":
    main()
