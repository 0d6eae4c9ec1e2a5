"""Speed and memory of Atlas-ISTN on the 3D configs (run by hand; prints figures, asserts nothing).

For each config: seconds per epoch (training and atlas update, from a short real training run on the
config's own training split), refinement seconds per case for K = 50, K = 100 and the config's own K (one validation case
after the test-time first pass, no outputs written) and the peak resident memory of that process
(CPU) or peak CUDA memory (GPU). Every config runs in a fresh process, so each peak is its own.

    python benchmarks/volume_speed.py configs/acdc.yaml configs/mouse_brain.yaml --epochs 2 --threads 2
    python benchmarks/volume_speed.py configs/acdc.yaml --device cuda   # where a GPU is lent

Time with nothing else running on the machine: the figures are worthless under CPU contention.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def measure(config_path: str, epochs: int, threads: int, device: str) -> dict:
    from atlasreg.config import load_config
    from atlasreg.data.cases import Preprocessing, load_case, pairs_from_spec
    from atlasreg.models.train import EpochTimer, load_module, train
    from atlasreg.predict import localise

    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="atlasreg-vol-"))
    try:
        cfg = load_config(config_path, {"training": {"epochs": epochs}})
        timer = EpochTimer()
        train(cfg, work / "run", resume=False, progress=False, timer=timer, device=device)
        steady = timer.times[1:] or timer.times
        out = {"config": config_path, "device": device, "threads": torch.get_num_threads(),
               "model_size": cfg["model"]["size"], "model_spacing": cfg["model"]["spacing"],
               "train_s_per_epoch": sum(t for t, _ in steady) / len(steady),
               "atlas_s_per_epoch": sum(a for _, a in steady) / len(steady),
               "first_epoch_s": sum(timer.times[0])}
        module = load_module(work / "run" / "model.ckpt", device)
        prep = Preprocessing.from_config(module.config)
        pair = pairs_from_spec(cfg["data"]["validation"])[0]
        case = localise(module, [load_case(pair.image, None, prep, name=pair.name)])[0]
        image = case.image.to(module.device)
        predicted = module.predict(image)
        predicted["mask"] = case.mask.to(module.device)
        out["refine_s_per_case"] = {}
        for k in sorted({50, 100, int(cfg["refinement"]["iterations"])}):
            module.refine(image, predicted, {"iterations": 2})  # warm-up
            if module.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            module.refine(image, predicted, {"iterations": k})
            if module.device.type == "cuda":
                torch.cuda.synchronize()
            out["refine_s_per_case"][k] = time.perf_counter() - t0
        out["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if module.device.type == "cuda":
            out["peak_cuda_MiB"] = torch.cuda.max_memory_allocated() / 2 ** 20
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the timed run (the first one is not counted)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: measure in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.configs[0], args.epochs, args.threads, args.device)))
        return
    print(f"torch {torch.__version__}, device {args.device}, threads {args.threads}, {args.epochs} epochs each")
    for cfg in args.configs:
        res = subprocess.run([sys.executable, __file__, cfg, "--one", "--epochs", str(args.epochs),
                              "--threads", str(args.threads), "--device", args.device],
                             capture_output=True, text=True)
        if res.returncode:
            print(f"{cfg}: failed\n{res.stderr[-2000:]}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        mem = f"peak RSS {r['peak_rss_MiB']:.0f} MiB" + (
            f", peak CUDA {r['peak_cuda_MiB']:.0f} MiB" if "peak_cuda_MiB" in r else "")
        refine = ", ".join(f"K={k} {seconds:.1f} s/case" for k, seconds in r["refine_s_per_case"].items())
        print(f"{cfg}: model grid {r['model_size']} at {r['model_spacing']} mm; "
              f"training {r['train_s_per_epoch']:.1f} s/epoch + atlas update {r['atlas_s_per_epoch']:.1f} s/epoch "
              f"(first epoch {r['first_epoch_s']:.1f} s, reads the files); refinement {refine}; {mem}")


if __name__ == "__main__":
    main()
