"""Speed of Atlas-ISTN on the Letter-B config (run by hand; prints figures, asserts nothing).

Measures: training images per second and seconds per epoch (training and atlas update separately),
refinement seconds per case (K = 50 iterations, outputs written), and peak resident memory.

    python benchmarks/letter_b_speed.py --epochs 3 --threads 2

This machine's speed drifts by up to 40% between runs and days; docs/results.md ("Letter-B speed")
compares with the authors' reference run back to back on the same day.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from atlasreg.config import load_config
from atlasreg.models.train import EpochTimer, load_module, train
from atlasreg.segment import segment

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "letter-b"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-cases", default="B1-B1000", help="1000 images, as the reference figures")
    ap.add_argument("--refine-cases", type=int, default=100)
    ap.add_argument("--cases-at-once", type=int, default=25)
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="atlasreg-bench-"))
    try:
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "letter_b.yaml", {
            "data": {"train": {"images": str(args.data / "clean"), "image_suffix": "_img",
                               "label_suffix": "_seg", "cases": args.train_cases}},
            "training": {"epochs": args.epochs}})
        timer = EpochTimer()
        train(cfg, work / "run", resume=False, progress=False, timer=timer)
        n = 1000 if args.train_cases == "B1-B1000" else None
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
        for e, (tr, at) in enumerate(timer.times):
            imgs = f"{n / tr:.0f} images/s" if n else ""
            print(f"epoch {e}: training {tr:.2f} s ({imgs}), atlas update {at:.2f} s, total {tr + at:.2f} s")
        steady = timer.times[1:] or timer.times
        tr = sum(t for t, _ in steady) / len(steady)
        at = sum(a for _, a in steady) / len(steady)
        print(f"steady state: training {tr:.2f} s/epoch, atlas update {at:.2f} s/epoch"
              + (f", {n / tr:.0f} training images/s" if n else ""))

        module = load_module(work / "run" / "model.ckpt")
        inputs = sorted((args.data / "corrupt").glob("*_img.png"))[: args.refine_cases]
        t0 = time.perf_counter()
        segment(module, inputs, work / "seg", {"iterations": 50, "cases_at_once": args.cases_at_once},
                progress=False, image_suffix="_img")
        dt = time.perf_counter() - t0
        print(f"segment + refine (K=50, outputs written): {dt / len(inputs):.3f} s/case "
              f"({len(inputs)} cases, {args.cases_at_once} at once)")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        print(f"peak resident memory: {peak / 1024 ** 2:.2f} GiB ({peak / 1024:.0f} MiB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
