"""Resident memory of a long batch segmentation, case by case (issue 16 item 2; run by hand, prints
figures, asserts nothing).

One process runs :func:`atlasreg.segment.segment` on the first N test cases of a
`benchmarks/scale_out.py` data folder (its 1-process model), with reading in this process
(``num_workers=0``) so that everything lands in one resident set, and prints the resident set
(VmRSS, after a garbage collection) every 50 cases. ``--no-release`` replaces
:func:`atlasreg.devices.release_free_memory` by a no-op: the behaviour before the fix (the resident
set grew by about 0.1 MiB a case; glibc kept the pages freed by the writers).

    python benchmarks/scale_out.py segment --data /tmp/scale_out --cases 1000 --repeats 1 --processes 1
    python benchmarks/segment_memory.py --data /tmp/scale_out --cases 500 [--no-release]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/scale_out"))
    parser.add_argument("--cases", type=int, default=500)
    parser.add_argument("--iterations", type=int, default=5, help="refinement iterations K")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-release", action="store_true", help="without release_free_memory (before the fix)")
    args = parser.parse_args()

    import torch

    import atlasreg.segment as segment_module
    from atlasreg.models.train import load_module

    torch.set_num_threads(args.threads)
    if args.no_release:
        segment_module.release_free_memory = lambda: None
    images = sorted((args.data / "test").glob("*_img.png"))[: args.cases]
    out = args.data / "segment_memory"
    shutil.rmtree(out, ignore_errors=True)
    checkpoint = args.data / "model_1" / "model.ckpt"
    module = load_module(checkpoint, "cpu")
    predict, done = segment_module.predict_cases, [0]

    def predict_and_report(*a, **k):
        result = predict(*a, **k)
        before = done[0]
        done[0] += len(result)
        if done[0] // 50 > before // 50:
            gc.collect()
            print(f"{done[0]:5d} cases  resident {resident_mib():7.1f} MiB", flush=True)
        return result

    segment_module.predict_cases = predict_and_report
    print(f"{len(images)} cases, K = {args.iterations}, release_free_memory {'off' if args.no_release else 'on'}")
    segment_module.segment(module, images, out, {"iterations": args.iterations}, progress=False,
                           checkpoint=checkpoint, num_workers=0)
    print(f"end  resident {resident_mib():.1f} MiB")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
