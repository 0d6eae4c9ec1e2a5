"""Peak memory and seconds per epoch of training on N generated Letter-B cases: the lazy per-case data
(CaseDataset, with and without the case cache, 0 or 1 DataLoader workers) against an in-memory
baseline (run by hand; prints figures, asserts nothing).

    python benchmarks/lazy_data_scaling.py --data /tmp/letter-b-10k --cases 1000 10000 --epochs 3 \\
        --threads 2 --repeats 2

The cases B1..B<max N> are generated once into --data (about 11 ms a case on this CPU: 10,000 in about
2 minutes) and reused. Every configuration trains in its own subprocess (the Letter-B config of
configs/letter_b.yaml, `--epochs` epochs), in the order A B C ... A B C ... for `--repeats` rounds, so
slow drifts of the machine hit all alike. Each run reports its peak resident memory (ru_maxrss of the
training process; DataLoader workers separately, their pages shared with it by fork included), the
seconds of the start (reading the cases and the initial atlas, Eq. 15, which also fills the cache; the
in-memory baseline's preloading included), and per epoch the training and the atlas-update seconds
(EpochTimer), of which the first epoch is left out. The script prints medians over the rounds and the
ratios lazy / in-memory, and the growth of peak memory from the smallest to the largest N.

With the defaults this takes on the order of 1.5-2 hours (estimated from the per-case costs, 9 ms of
training and atlas update and 6 ms of reading an uncached case; N=10000 dominates); `--configs` runs a
subset.

The in-memory baseline is the former path, built here and not in the library: every case preloaded
into one image and one labelmap tensor (filled in place) and trained through a TensorDataset.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {  # name: (data.cache, data.num_workers); None: the in-memory baseline
    "in-memory": None,
    "lazy": (False, 0),
    "lazy+cache": (True, 0),
    "lazy+1worker": (False, 1),
    "lazy+cache+1worker": (True, 1),
}
ROOT = Path(__file__).resolve().parents[1]


def ensure_data(folder: Path, n: int) -> None:
    """B1..Bn (image and labelmap PNGs, 128x128) in `folder`; only missing cases are generated (case i
    depends only on (seed 0, i), so a folder grown in steps equals one written at once)."""
    from atlasreg.data.letter_b import write_letter_b_dataset

    missing = [i for i in range(1, n + 1)
               if not ((folder / f"B{i}_img.png").is_file() and (folder / f"B{i}_seg.png").is_file())]
    if not missing:
        return
    t0 = time.perf_counter()
    runs, start = [], missing[0]
    for a, b in zip(missing, missing[1:] + [None]):
        if b != a + 1:
            runs.append((start, a - start + 1))
            start = b
    for first, count in runs:
        write_letter_b_dataset(folder, count, seed=0, start_index=first)
    dt = time.perf_counter() - t0
    print(f"generated {len(missing)} Letter-B cases in {dt:.1f} s ({1000 * dt / len(missing):.1f} ms a case)",
          flush=True)


def child(args) -> None:
    """One training run; prints one JSON line with its figures."""
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import TensorDataset

    import atlasreg.models.train as train_module
    from atlasreg.config import load_config
    from atlasreg.data.case_dataset import CaseDataset

    setting = CONFIGS[args.child]
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="atlasreg-lazy-", dir=args.work))
    os.environ.pop(train_module.CACHE_ENV, None)  # the cache, if on, starts empty in work/run/cache
    try:
        cache, workers = setting if setting is not None else (False, 0)
        cfg = load_config(ROOT / "configs" / "letter_b.yaml", {
            "data": {"train": {"images": str(args.data), "image_suffix": "_img", "label_suffix": "_seg",
                               "cases": f"B1-B{args.n}"}, "cache": cache, "num_workers": workers},
            "training": {"epochs": args.epochs, "threads": args.threads}})
        preload_s = 0.0
        if setting is None:
            class InMemory(TensorDataset):
                """All cases in two tensors, filled in place (the former load_training_tensors)."""

                def __init__(self, cases: CaseDataset):
                    image, labelmap, _ = cases[0]
                    images = image.new_empty((len(cases), *image.shape))
                    labelmaps = labelmap.new_empty((len(cases), *labelmap.shape))
                    for i in range(len(cases)):
                        images[i], labelmaps[i], _ = cases[i]
                    super().__init__(images, labelmaps)
                    self.names = cases.names

            def preloaded(config, out_dir):
                nonlocal preload_s
                t0 = time.perf_counter()
                data = InMemory(CaseDataset.from_config(config, "train", None))
                preload_s = time.perf_counter() - t0
                return data

            train_module.training_dataset = preloaded

        class StartTimer(Callback):
            def on_fit_start(self, trainer, module):
                self.t0 = time.perf_counter()

            def on_train_start(self, trainer, module):
                self.seconds = time.perf_counter() - self.t0

        timer, start = train_module.EpochTimer(), StartTimer()
        train_module.train(cfg, work / "run", resume=False, progress=False, timer=timer, callbacks=[start])
        to_mib = 1 / 1024  # ru_maxrss is in KiB on Linux
        print(json.dumps({
            "start_s": preload_s + start.seconds, "epochs": timer.times,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * to_mib,
            "workers_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * to_mib,
            "threads": torch.get_num_threads(), "torch": torch.__version__}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summarise(runs: list[dict], skip_first: bool) -> dict:
    """Medians over the rounds of each run's mean over its counted epochs."""
    def per_epoch(run: dict, i: int) -> float:
        return statistics.mean(e[i] for e in (run["epochs"][1:] if skip_first else run["epochs"]))

    return {"train_s": statistics.median(per_epoch(r, 0) for r in runs),
            "atlas_s": statistics.median(per_epoch(r, 1) for r in runs),
            "start_s": statistics.median(r["start_s"] for r in runs),
            "peak_mib": statistics.median(r["peak_mib"] for r in runs),
            "workers_mib": statistics.median(r["workers_peak_mib"] for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="folder of the generated cases (reused)")
    ap.add_argument("--cases", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--epochs", type=int, default=3, help="the first is not counted (unless the only one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--work", type=Path, default=None, help="folder for the runs' outputs (default: temp)")
    ap.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    args.data.mkdir(parents=True, exist_ok=True)
    ensure_data(args.data, max(args.cases))
    results: dict = {}
    for r in range(args.repeats):
        for n in args.cases:
            for name in args.configs:
                cmd = [sys.executable, __file__, "--child", name, "--n", str(n), "--data", str(args.data),
                       "--epochs", str(args.epochs), "--threads", str(args.threads)]
                if args.work:
                    cmd += ["--work", str(args.work)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
                if out.returncode or not lines:
                    sys.exit(f"{name} (N={n}) failed:\n{out.stderr[-3000:]}")
                run = json.loads(lines[-1])
                results.setdefault((n, name), []).append(run)
                steady = run["epochs"][1:] or run["epochs"]
                print(f"round {r + 1} N={n:6d} {name:19s} start {run['start_s']:7.1f} s  "
                      f"train {statistics.mean(e[0] for e in steady):6.2f} s/epoch  "
                      f"atlas {statistics.mean(e[1] for e in steady):6.2f} s/epoch  peak {run['peak_mib']:6.0f} MiB",
                      flush=True)

    skip_first = args.epochs > 1
    print(f"\nmedians over {args.repeats} round(s); per run the mean over epochs "
          f"{'2..' if skip_first else '1 (first epoch included)'}{args.epochs if skip_first else ''}; "
          f"torch threads {args.threads}; peak = ru_maxrss of the training process (workers: largest worker)")
    print(f"{'N':>6} {'configuration':19s} {'start s':>8} {'train s/ep':>10} {'atlas s/ep':>10} {'peak MiB':>9} "
          f"{'workers MiB':>11} {'train ratio':>11} {'atlas ratio':>11} {'peak ratio':>10}")
    table = {key: summarise(runs, skip_first) for key, runs in results.items()}
    for n in args.cases:
        base = table.get((n, "in-memory"))
        for name in args.configs:
            s = table[(n, name)]
            ratios = ("" if base is None else f"{s['train_s'] / base['train_s']:11.3f} "
                      f"{s['atlas_s'] / base['atlas_s']:11.3f} {s['peak_mib'] / base['peak_mib']:10.3f}")
            print(f"{n:6d} {name:19s} {s['start_s']:8.1f} {s['train_s']:10.2f} {s['atlas_s']:10.2f} "
                  f"{s['peak_mib']:9.0f} {s['workers_mib']:11.0f} {ratios}")
    if len(args.cases) > 1:
        lo, hi = min(args.cases), max(args.cases)
        print(f"\npeak memory N={hi} / N={lo}:")
        for name in args.configs:
            print(f"  {name:19s} {table[(hi, name)]['peak_mib'] / table[(lo, name)]['peak_mib']:.3f}")


if __name__ == "__main__":
    main()
