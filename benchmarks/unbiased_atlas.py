"""Unbiased atlas (issue 12 item 6): atlas bias with and without the penalty on the running mean of
the velocity fields (`training.unbiased_weight`).

Trains the demo's Letter-B Atlas-ISTN twice on the same generated data and seed, without and with the
penalty, then measures on the training cases (no augmentation):
- bias_svf_mm: RMS over the SVF grid of the mean (over cases) non-linear displacement u_i of exp(v_i),
  mm: zero when the atlas sits at the cases' mean shape in the non-linear sense;
- bias_full_mm: the same for the full transform Phi_i (affine and SVF) on the model grid;
- mean_abs_svf_mm: mean |u_i| (how much each case still deforms; a bias-free atlas need not deform
  less).
Example:

    python benchmarks/unbiased_atlas.py --out runs/unbiased --cases 100 --epochs 30 --weight 10
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def atlas_bias(module, dataset) -> dict:
    net = module.net
    sum_u = sum_phi = None
    abs_u = 0.0
    n = 0
    with torch.no_grad():
        for i in range(len(dataset)):
            image, labelmap, _, _ = dataset[i]
            _, transform = net(image[None], module.atlas_labelmap, module.atlas_image, True)
            u = transform.svf.displacement_on_svf_grid if transform.svf is not None else torch.zeros(1)
            phi = transform.forward_points() - net.grid.points(dtype=u.dtype)[None]
            sum_u = u if sum_u is None else sum_u + u
            sum_phi = phi if sum_phi is None else sum_phi + phi
            abs_u += float(u.norm(dim=1).mean())
            n += 1
    mean_u, mean_phi = sum_u / n, sum_phi / n
    return {"bias_svf_mm": float(mean_u.norm(dim=1).pow(2).mean().sqrt()),
            "bias_full_mm": float(mean_phi.norm(dim=-1).pow(2).mean().sqrt()),
            "mean_abs_svf_mm": abs_u / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--weight", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    from atlasreg.data.letter_b import write_letter_b_dataset
    from atlasreg.demo import demo_config
    from atlasreg.models.train import load_module, train, training_dataset

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "train"
    if not data.is_dir():
        write_letter_b_dataset(data, args.cases, seed=0)
    rows = []
    for weight in (0.0, args.weight):
        cfg = demo_config(data, args.epochs)
        cfg["training"]["unbiased_weight"] = weight
        t0 = time.perf_counter()
        ckpt = train(cfg, out / f"w{weight:g}", resume=True, progress=False)
        module = load_module(ckpt)
        bias = atlas_bias(module, training_dataset(module.config, out / f"w{weight:g}"))
        rows.append({"unbiased_weight": weight, **bias, "train_s": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    print("| unbiased_weight | bias SVF (mm) | bias full (mm) | mean abs SVF (mm) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['unbiased_weight']:g} | {r['bias_svf_mm']:.3f} | {r['bias_full_mm']:.3f} | "
              f"{r['mean_abs_svf_mm']:.3f} |")


if __name__ == "__main__":
    main()
