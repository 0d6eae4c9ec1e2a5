"""Same numbers across code versions (run by hand; prints figures, asserts nothing): trains a short
Letter-B run (3 epochs on 60 generated cases), prints the atlas sums and the sum of |weights|, then
segments 10 generated corrupt cases and prints mean Dice / HD95 per output. Run it with the
PYTHONPATH of two checkouts and compare the printed lines:

    PYTHONPATH=<old checkout>/src python benchmarks/same_numbers.py --out /tmp/same_old
    PYTHONPATH=src python benchmarks/same_numbers.py --out /tmp/same_new
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from atlasreg.config import load_config
from atlasreg.data.dataset import find_pairs
from atlasreg.data.letter_b import write_letter_b_dataset
from atlasreg.evaluation.evaluate import evaluate_predictions
from atlasreg.models.train import load_module, train
from atlasreg.segment import segment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = args.out / "data"
    if not (data / "test").is_dir():
        write_letter_b_dataset(data / "train", 60, seed=0, start_index=1)
        write_letter_b_dataset(data / "test", 10, seed=0, corrupt=True, start_index=61)
    cfg = load_config(None, {
        "name": "same_numbers", "data": {"labels": {0: "background", 255: "letter"}, "spacing": [1.0, 1.0],
                                         "train": {"images": str(data / "train"), "image_suffix": "_img",
                                                   "label_suffix": "_seg"}},
        "model": {"ndim": 2, "size": [64, 64], "spacing": [2.0, 2.0]},
        "training": {"epochs": 3, "fade_in": {"e0": 1, "tau": 1}}, "refinement": {"iterations": 10}})
    ckpt = train(cfg, args.out / "model", resume=False, progress=False)
    m = load_module(ckpt)
    print("atlas sums", float(m.atlas_labelmap.double().sum()), float(m.atlas_image.double().sum()))
    print("sum |weights|", float(sum(p.detach().double().abs().sum() for p in m.parameters())))
    segment(m, [data / "test"], args.out / "seg", progress=False, image_suffix="_img")
    refs = {p.name: p.image for p in find_pairs(data / "test", image_suffix="_seg")}
    _, summary = evaluate_predictions(args.out / "seg", refs, cfg["data"]["labels"], args.out / "eval")
    for row in csv.DictReader(open(Path(summary).parent / "summary.csv")):
        print(f"{row['method']:8s} Dice {float(row['dice_mean']):.3f}  HD95 {float(row['hd95_mean']):.2f}")


if __name__ == "__main__":
    main()
