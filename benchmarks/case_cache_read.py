"""Cost of reading training cases (run by hand; prints figures, asserts nothing): an uncached case
(read and resampled from its files), one pass of
the atlas update's DataLoader (batches of 25, no workers) over N cached Letter-B cases, and reading
one cached case as raw float32 (``np.fromfile``, the cache's format) against ``np.load`` of the same
array as ``.npy`` (the format first used).

    python benchmarks/case_cache_read.py --cases B1-B1000 --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from atlasreg.config import load_config
from atlasreg.data.case_dataset import CaseDataset

ROOT = Path(__file__).resolve().parents[1]


def per_call_ms(fn, n: int = 2000) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="B1-B1000")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "configs" / "letter_b.yaml", {"data": {"train": {"cases": args.cases}}})
    uncached = CaseDataset.from_config(cfg, "train", None)
    n = min(200, len(uncached))
    print(f"uncached (read + resample the PNG pair): {per_call_ms(lambda: [uncached[i] for i in range(n)], 1) / n:.2f} ms a case")
    with tempfile.TemporaryDirectory() as cache:
        data = CaseDataset.from_config(cfg, "train", cache)
        for i in range(len(data)):  # fill the cache
            data[i]
        for r in range(args.repeats):
            t0 = time.perf_counter()
            for _ in DataLoader(data, batch_size=25, shuffle=False, num_workers=0):
                pass
            print(f"pass {r + 1}: {time.perf_counter() - t0:.3f} s for {len(data)} cached cases")
        array = data[0][0].new_zeros(data._shape).numpy()
        raw, npy = Path(cache) / "x.f32", Path(cache) / "x.npy"
        array.tofile(raw)
        np.save(npy, array)
        print(f"one case {array.shape}: np.fromfile {per_call_ms(lambda: np.fromfile(raw, np.float32)):.3f} ms, "
              f"np.load {per_call_ms(lambda: np.load(npy, allow_pickle=False)):.3f} ms")


if __name__ == "__main__":
    main()
