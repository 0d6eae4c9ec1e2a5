"""What the validation pass of training costs against a training epoch (run by hand; prints figures,
asserts nothing).

Trains configs/letter_b.yaml (B1-B900) for a few epochs with B901-B1000 as `data.validation`, then
times, on the trained model, the parts of the pass (atlasreg.models.monitor.ValidationMonitor): ITN and
1-pass Dice/HD95 of every validation case, refinement of `refine_validation_cases` cases, the images;
and the per-step loss logging (StepLosses). It prints their seconds against an epoch's (training +
atlas update, the mean of the epochs after the first) and the cost per epoch at the default settings
(a pass every validation_every epochs, refinement every refine_validation_every, images every
images_every):

    python benchmarks/validation_cost.py --epochs 3 --threads 2
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from atlasreg.config import DEFAULTS, load_config
from atlasreg.models.monitor import StepLosses, ValidationMonitor
from atlasreg.models.train import EpochTimer, load_module, train, training_dataset, validation_dataset

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "letter-b"


def _seconds(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-cases", default="B1-B900")
    ap.add_argument("--validation-cases", default="B901-B1000")
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="atlasreg-valcost-"))
    split = {"images": str(args.data / "clean"), "image_suffix": "_img", "label_suffix": "_seg"}
    try:
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "letter_b.yaml", {
            "data": {"train": dict(split, cases=args.train_cases),
                     "validation": dict(split, cases=args.validation_cases)},
            "training": {"epochs": args.epochs, "validation_every": 0, "images_every": 0}})
        timer = EpochTimer()
        train(cfg, work / "run", resume=False, progress=False, timer=timer)
        epochs = timer.times[1:] or timer.times
        epoch = sum(a + b for a, b in epochs) / len(epochs)

        module = load_module(work / "run" / "model.ckpt")
        module.config["data"]["num_workers"] = cfg["data"]["num_workers"]
        cases = validation_dataset(cfg, training_dataset(cfg, work / "run"))
        t = dict(DEFAULTS["training"], atlas_batch_size=cfg["training"]["atlas_batch_size"])
        monitor = ValidationMonitor(cases, t)
        module.net.eval()
        onepass = _seconds(lambda: monitor.evaluate(module, refine=False), 2)
        both = _seconds(lambda: monitor.evaluate(module, refine=True))
        images = _seconds(lambda: monitor.images(module), 2)
        print(monitor.evaluate(module, refine=False))

        from lightning.pytorch.loggers import TensorBoardLogger

        logger = TensorBoardLogger(work / "tb", name="x")
        step = StepLosses()
        fake = SimpleNamespace(step_losses={k: torch.tensor(0.1) for k in
                                            ("loss/total", "loss/seg", "loss/a2s", "loss/s2a", "loss/reg", "w")})
        n = 2000
        t0 = time.perf_counter()
        for i in range(n):
            step.on_train_batch_end(SimpleNamespace(global_step=i + 1, log_every_n_steps=1, logger=logger),
                                    fake, None, None, i)
        per_step = (time.perf_counter() - t0) / n
        steps = -(-len(training_dataset(cfg, work / "run")) // int(cfg["training"]["batch_size"]))

        refine = both - onepass
        d = DEFAULTS["training"]
        per_epoch = (onepass / d["validation_every"] + refine / d["refine_validation_every"]
                     + images / d["images_every"])
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {len(cases)} validation cases")
        for e, (tr, at) in enumerate(timer.times):
            print(f"epoch {e}: training {tr:.2f} s, atlas update {at:.2f} s")
        print(f"epoch (mean of epochs 1-): {epoch:.2f} s")
        print(f"ITN + 1-pass Dice/HD95 of {len(cases)} cases: {onepass:.2f} s ({100 * onepass / epoch:.1f}% of an "
              f"epoch)")
        print(f"refinement of {d['refine_validation_cases']} cases with their Dice/HD95: {refine:.2f} s "
              f"({100 * refine / epoch:.1f}%)")
        print(f"images: {images:.2f} s ({100 * images / epoch:.1f}%)")
        print(f"step losses to TensorBoard: {1e3 * per_step:.3f} ms per step, {steps * per_step:.3f} s per epoch "
              f"({100 * steps * per_step / epoch:.2f}%)")
        print(f"at the defaults (every {d['validation_every']} / {d['refine_validation_every']} / "
              f"{d['images_every']} epochs): {per_epoch:.2f} s per epoch = {100 * per_epoch / epoch:.1f}% of an "
              f"epoch; the most in one epoch (all three due): {100 * (onepass + refine + images) / epoch:.0f}%")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
