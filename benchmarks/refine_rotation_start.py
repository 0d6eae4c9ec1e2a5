"""Does the refinement depend on where the 1-pass starts it? (issue 11; run by hand, prints figures,
asserts nothing.)

For each case, the trained STN's in-plane rotation (the Euler angle about z, the slice axis of ACDC's
model grid; the only angle in 2D) is turned by each of --offsets degrees before the test-time
refinement (Eqs. 17-21): the bias of the STN's rotation head is
shifted so that the 1-pass angle of this case becomes (its own angle + offset), kept inside the
head's bound. The refinement then optimises every STN weight, that bias included, as usual.
--max-rotation D widens (or narrows) that bound to D degrees for the refinement only (nets/stn.py,
``model.stn_max_rotation``; the bias shift keeps each start angle, so offset 0 is the 1-pass's own
angle): does the refinement go further when the affine part may? The refinement uses the
checkpoint's settings, or those of --refinement. Prints per case and offset the 1-pass angle, the
angle at the refinement's first and last step (degrees; with ``refinement.target: labelmap`` the STN's
input there is the ITN's one-hot, not its logits, so the first step's angle is not the 1-pass one),
the refinement loss at the first and last step, and Dice / HD95 per structure of the refined labelmap
against the reference (atlasreg.evaluate, on the input's own grid and units).

If the refined losses and labelmaps agree across offsets, the refinement reaches the same optimum
whatever the 1-pass rotation, and a case it fits worse than the ITN is not a matter of a bad start.

    PYTHONPATH=src python benchmarks/refine_rotation_start.py runs/acdc_split/ce_seed2/model.ckpt \
        --cases patient059_frame01 patient059_frame02 --offsets 0 25 -25 [--max-rotation 90] \
        [--refinement lambda=0.06 gamma=1]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import atlasreg
import atlasreg.models.refine as refine_module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--cases", nargs="+", required=True, help="case names: IMAGES/<case>.nii.gz")
    parser.add_argument("--images", default="../shared/data/acdc-3d/images")
    parser.add_argument("--labels", default="../shared/data/acdc-3d/labels")
    parser.add_argument("--offsets", nargs="+", type=float, default=[0.0, 15.0, 25.0, -15.0])
    parser.add_argument("--max-rotation", type=float, default=None,
                        help="the STN's rotation bound during the refinement, degrees (default: the model's)")
    parser.add_argument("--refinement", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of the checkpoint's refinement settings, e.g. lambda=0.06 gamma=1")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {k: float(v) if k != "iterations" else int(v)
                 for k, _, v in (item.partition("=") for item in args.refinement)}
    model = atlasreg.load_model(args.checkpoint, device="cpu")
    stn = model.module.net.stn
    index = stn.rotation.out_features - 1          # about z in 3D (R = Rz Ry Rx); the angle in 2D
    bias0 = stn.rotation.bias.detach().clone()
    calls: list[float] = []   # the pre-tanh angle of every STN call, the refinement's copies included
    stn.rotation.register_forward_hook(lambda m, i, o: calls.append(o.detach()[0, index].item()))  # copied with the STN
    seen: dict = {}
    original = refine_module.refine_transforms

    def recorded(*a, **k):
        seen["start"] = len(calls)
        transform, history = original(*a, **k)
        seen["history"] = history[:, 0]
        return transform, history

    refine_module.refine_transforms = recorded
    labels = list(model.labels)
    names = [model.labels[v] for v in labels[1:]]

    trained = stn.rotation_bound                                      # radians
    bound = math.radians(args.max_rotation) if args.max_rotation else trained

    def degrees(x: float) -> float:
        return math.degrees(math.tanh(x) * stn.rotation_bound)

    for case in args.cases:
        image, reference = Path(args.images) / f"{case}.nii.gz", Path(args.labels) / f"{case}.nii.gz"
        with torch.no_grad():
            stn.rotation.bias.copy_(bias0)
        stn.rotation_bound = trained
        calls.clear()
        model.segment(str(image), refine=False)
        own_x = calls[-1]
        own = degrees(own_x)
        stn.rotation_bound = bound
        limit = math.degrees(bound) - 0.5
        for offset in args.offsets:
            target = max(-limit, min(limit, own + offset))
            shift = math.atanh(math.radians(target) / bound) - own_x
            with torch.no_grad():
                stn.rotation.bias.copy_(bias0)
                stn.rotation.bias[index] += shift
            calls.clear()
            result = model.segment(str(image), **overrides)
            h = seen["history"]
            scores = atlasreg.evaluate(result.labelmap("refine"), str(reference), labels)
            cells = " ".join(f"{n} {scores[v]['dice']:.3f}/{scores[v]['hd95']:.2f}" for n, v in zip(names, labels[1:]))
            print(f"{case} offset {offset:+5.1f}: 1-pass angle {target:+6.1f}, refinement "
                  f"{degrees(calls[seen['start']]):+6.1f} -> "
                  f"{degrees(calls[-1]):+6.1f} deg, loss {float(h[0]):.4f} -> {float(h[-1]):.4f}; refine Dice/HD95 "
                  f"{cells}", flush=True)


if __name__ == "__main__":
    main()
