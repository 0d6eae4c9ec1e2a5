"""Where the time of one Letter-B training step goes (run by hand; prints figures, asserts nothing).

One Atlas-ISTN step (ITN + STN forward, L_s + L_a2s + L_s2a + lambda L_reg, backward, Adam) on a
synthetic batch of 10 64x64 images: milliseconds per step, then torch.profiler's operator table.

    python benchmarks/letter_b_profile.py --threads 2
    python benchmarks/letter_b_profile.py --threads 2 --compare-upsample   # A/B, see docs/results.md

--compare-upsample times, in one process and alternating, the network as built and the same network
with plain nn.Upsample (no channels_last gradient), 7 rounds of 20 steps each.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from atlasreg.config import load_config
from atlasreg.losses import label_mse
from atlasreg.models.atlas_istn import AtlasISTNModule, deformation_losses
from atlasreg.models.optim import adam


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--compare-upsample", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "letter_b.yaml")
    if args.compare_upsample:
        compare_upsample(cfg)
        return
    net = AtlasISTNModule(cfg).net
    step = make_step(net)

    for _ in range(10):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}: "
          f"{(time.perf_counter() - t0) / args.steps * 1000:.1f} ms per training step (batch 10)")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def compare_upsample(cfg) -> None:
    nets = {"as built": AtlasISTNModule(cfg).net, "plain nn.Upsample": AtlasISTNModule(cfg).net}
    for part in (nets["plain nn.Upsample"].itn, nets["plain nn.Upsample"].stn):
        part.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
    steps = {name: make_step(net) for name, net in nets.items()}
    times = {name: [] for name in nets}
    for _ in range(7):
        for name, step in steps.items():
            for _ in range(3):
                step()
            t0 = time.perf_counter()
            for _ in range(20):
                step()
            times[name].append((time.perf_counter() - t0) / 20 * 1000)
    for name, t in times.items():
        print(f"{name}: ms per step {' '.join(f'{x:.1f}' for x in t)}; median {sorted(t)[3]:.1f}")


def make_step(net):
    """One training step of `net` on a fixed synthetic batch (closure)."""
    image = torch.randn(10, 1, 64, 64)
    labelmap = torch.zeros(10, 2, 64, 64)
    labelmap[:, 0] = 1
    labelmap[:, 0, 20:40, 20:40], labelmap[:, 1, 20:40, 20:40] = 0, 1
    atlas = labelmap[:1].clone()
    opt = adam(net.parameters(), 1e-3)

    def step():
        logits, transform = net(image, atlas, None, True)
        d = deformation_losses(transform, labelmap, atlas)
        loss = label_mse(logits, labelmap) + d["a2s"] + d["s2a"] + 0.126 * d["reg"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


if __name__ == "__main__":
    main()
