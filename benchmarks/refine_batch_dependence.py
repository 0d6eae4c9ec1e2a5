"""Batch dependence of test-time refinement (issue 11; run by hand, prints figures, asserts nothing).

Case A is refined alone and together with three other cases (K = 50 and 100 by default), and the
script prints the largest difference of case A's refined Phi (forward_points) and Phi^-1
(inverse_points) over the model grid, in mm and in model-grid voxels (each component divided by the
spacing of its axis), of the translation of its affine part and of its loss history, and the CPU
time of both calls.

The model: by default a small 3D Atlas-ISTN (model grid 16 x 32 x 32 array order, spacing 2 x 2 x 6
mm ITK order, 4 labels) trained for a few Adam steps (Eq. 14) on synthetic ellipsoid cases (three
structures with a random pose), so that its STN predicts non-trivial transforms; the refinement
targets are the one-hot labelmaps of four test cases (standing for the logits of a good ITN). With
--checkpoint, a trained model (e.g. an ACDC run) and the ITN logits and field-of-view masks of the
first --cases cases of its --split or of --images (case A first).

--diagnose also follows case A through both refinements step by step: where its weights part first
and by how much, with the gradient of that weight in both runs and Adam's sqrt(v) (the gain of Adam's
step on a gradient difference is lr / (sqrt(v) + eps)), and per weight tensor the gradient and weight
differences at the steps of --diagnose-steps.

    PYTHONPATH=src python benchmarks/refine_batch_dependence.py [--seed 1 --lr 3e-3] [--diagnose]
    PYTHONPATH=src python benchmarks/refine_batch_dependence.py --checkpoint runs/acdc/model.ckpt --iterations 50
    PYTHONPATH=src python benchmarks/refine_batch_dependence.py --checkpoint runs/letter_b/model.ckpt \
        --iterations 50 --cases 16 --images $(for i in 903 901 902 $(seq 904 916); do
            echo data/letter-b/corrupt/B${i}_img.png; done)
"""

from __future__ import annotations

import argparse
import time

import torch

from atlasreg.config import load_config
from atlasreg.losses import label_mse
from atlasreg.models.atlas_istn import AtlasISTNModule, deformation_losses
from atlasreg.models.optim import adam
from atlasreg.models.refine import refine_transforms
from atlasreg.spatial.grid import Grid

SIZE = (16, 32, 32)          # array order (z, y, x)
SPACING = (2.0, 2.0, 6.0)    # ITK order (x, y, z), mm
LABELS = {0: "background", 1: "a", 2: "b", 3: "c"}


def ellipsoid_cases(n: int, grid: Grid, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n synthetic cases on `grid`: images (n, 1, *size) and one-hot labelmaps (n, 4, *size).

    Structure 1 is a large ellipsoid, 2 a smaller one inside it, 3 a separate one beside them; each
    case moves all three by a random translation (up to +-8, +-8, +-12 mm), scales them by 0.85-1.15
    and jitters the centres of 2 and 3 by up to +-3 mm. Image intensity = label value + noise."""
    pts = grid.points()[0]                                    # (*size, 3) mm, (x, y, z)
    centres = torch.tensor([[0.0, 0.0, 0.0], [4.0, 2.0, 0.0], [-16.0, -10.0, 12.0]])
    radii = torch.tensor([[20.0, 16.0, 30.0], [9.0, 7.0, 14.0], [7.0, 7.0, 18.0]])
    images, labels = [], []
    for _ in range(n):
        shift = (torch.rand(3, generator=gen) * 2 - 1) * torch.tensor([8.0, 8.0, 12.0])
        scale = 0.85 + 0.3 * torch.rand(3, generator=gen)
        lab = torch.zeros(SIZE, dtype=torch.long)
        for k in range(3):
            jitter = (torch.rand(3, generator=gen) * 2 - 1) * 3.0 if k else torch.zeros(3)
            c = centres[k] * scale + shift + jitter
            inside = (((pts - c) / (radii[k] * scale)) ** 2).sum(-1) <= 1.0
            lab[inside] = k + 1
        img = lab.float() + 0.2 * torch.randn(SIZE, generator=gen)
        images.append(((img - img.mean()) / img.std())[None])
        labels.append(torch.nn.functional.one_hot(lab, 4).permute(3, 0, 1, 2).float())
    return torch.stack(images), torch.stack(labels)


def trained_module(steps: int, seed: int = 0) -> tuple[AtlasISTNModule, torch.Tensor]:
    """A 3D Atlas-ISTN after `steps` Adam steps (lr 3e-3, batch 4) of Eq. 14 with w = 1 on 16 synthetic
    ellipsoid cases; the atlas is the mean of their labelmaps (Eq. 15 at t = 0). Returns the module
    and the one-hot labelmaps of 4 test cases (a fresh draw): the refinement targets, standing for
    the logits of a good ITN (a few dozen steps leave this ITN predicting background only)."""
    torch.manual_seed(seed)
    cfg = load_config(None, {"data": {"labels": LABELS},
                             "model": {"ndim": 3, "size": list(SIZE), "spacing": list(SPACING),
                                       "itn_channels": [8, 16, 32, 64], "stn_channels": [16, 16, 32]}})
    module = AtlasISTNModule(cfg)
    net = module.net
    gen = torch.Generator().manual_seed(seed)
    images, labels = ellipsoid_cases(16, net.grid, gen)
    _, test_labels = ellipsoid_cases(4, net.grid, gen)
    module.atlas_labelmap.copy_(labels.mean(0, keepdim=True))
    module.atlas_image.copy_(images.mean(0, keepdim=True))
    opt = adam(net.parameters(), 3e-3)
    lam = float(cfg["training"]["lambda"])
    for _ in range(steps):
        idx = torch.randperm(16, generator=gen)[:4]
        logits, tr = net(images[idx], module.atlas_labelmap)
        d = deformation_losses(tr, labels[idx], module.atlas_labelmap)
        loss = label_mse(logits, labels[idx]) + d["a2s"] + d["s2a"] + lam * d["reg"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    module.eval()
    return module, test_labels


def voxel_difference(a: torch.Tensor, b: torch.Tensor, spacing=SPACING) -> tuple[float, float]:
    """Largest |a - b| over points (..., D) mm: in mm, and in model-grid voxels (each component divided
    by the spacing of its axis, ITK order)."""
    d = (a - b).abs()
    return float(d.max()), float((d / torch.tensor(spacing, dtype=d.dtype)).max())


def compare(module: AtlasISTNModule, logits: torch.Tensor, iterations: int, lr: float, **kw) -> dict:
    """Case A (logits[0]) refined alone and with the other cases of `logits`: the differences."""
    mask = kw.pop("mask", None)
    first = {} if mask is None else {"mask": mask[:1]}
    every = {} if mask is None else {"mask": mask}
    t0 = time.process_time()
    alone, h_alone = refine_transforms(module.net, logits[:1], module.atlas_labelmap, iterations, lr, **kw,
                                       **first)
    t1 = time.process_time()
    together, h_together = refine_transforms(module.net, logits, module.atlas_labelmap, iterations, lr, **kw,
                                             **every)
    t2 = time.process_time()
    spacing = module.net.grid.spacing
    fwd = voxel_difference(alone.forward_points()[0], together.forward_points()[0], spacing)
    inv = voxel_difference(alone.inverse_points()[0], together.inverse_points()[0], spacing)
    with torch.no_grad():
        onepass = module.net.transform(module.net.label_stn_input(logits[:1], module.atlas_labelmap))
    moved = float((alone.forward_points()[0] - onepass.forward_points()[0]).norm(dim=-1).max())
    disp = float((alone.forward_points()[0] - module.net.grid.points()[0]).norm(dim=-1).max())
    t_diff = float((alone.affine.translation[0] - together.affine.translation[0]).abs().max()) \
        if alone.affine is not None else float("nan")
    return {"fwd": fwd, "inv": inv, "t": t_diff, "loss": float((h_alone[:, 0] - h_together[:, 0]).abs().max()),
            "moved": moved, "disp": disp, "s_alone": t1 - t0, "s_together": t2 - t1}


def diagnose(module: AtlasISTNModule, logits: torch.Tensor, iterations: int, lr: float, report: list[int],
             mask: torch.Tensor | None = None) -> None:
    """Case A refined alone and in the batch of all cases, recording case A's gradients, weights and
    Adam second moments at every step (by wrapping the optimiser refine_transforms builds). Prints per
    step where case A's weights differ most (with that weight's gradient in both runs and Adam's
    sqrt(v)) and, at the steps in `report`, per weight tensor the largest gradient difference (relative
    and absolute) and weight difference."""
    import atlasreg.models.refine as refine

    shapes = [w.shape for w in module.net.stn.parameters()]
    n_tensors = len(shapes)

    def case_a(tensors: list) -> list:
        # one leaf per case and weight tensor (B * P tensors), or stacked copies (P tensors (B, ...))
        return tensors[:n_tensors] if tensors[0].shape == shapes[0] else [t[0] for t in tensors]

    runs = {}
    for name, lg, mk in (("alone", logits[:1], None if mask is None else mask[:1]), ("together", logits, mask)):
        steps = []
        orig = refine.adam

        def recording_adam(params, lr_, _orig=orig, steps=steps):
            opt = _orig(params, lr_)
            step = opt.step

            def recorded_step(*a, **k):
                ps = opt.param_groups[0]["params"]
                grads = [g.clone() for g in case_a([p.grad for p in ps])]
                out = step(*a, **k)
                beta2, t = opt.param_groups[0]["betas"][1], len(steps) + 1
                steps.append((grads, [w.detach().clone() for w in case_a(ps)],   # sqrt of bias-corrected v
                              [(v / (1 - beta2 ** t)).sqrt() for v in case_a([opt.state[p]["exp_avg_sq"]
                                                                              for p in ps])]))
                return out
            opt.step = recorded_step
            return opt

        refine.adam = recording_adam
        try:
            refine_transforms(module.net, lg, module.atlas_labelmap, iterations, lr,
                              **({} if mk is None else {"mask": mk}))
        finally:
            refine.adam = orig
        runs[name] = steps
    names = [k for k, _ in module.net.stn.named_parameters()]
    print("per step: case A's largest weight difference, its tensor; that weight's gradient alone / with "
          "neighbours and Adam's sqrt(v); sum of |weight differences|")
    for s, ((ga, wa, va), (gt, wt, _)) in enumerate(zip(runs["alone"], runs["together"]), 1):
        dw = [(a - b).abs() for a, b in zip(wa, wt)]
        i = max(range(n_tensors), key=lambda j: float(dw[j].max()))
        j = int(dw[i].argmax())
        print(f"  step {s:3d}: {float(dw[i].max()):.2e} in {names[i]:18s} g {float(ga[i].flatten()[j]):+.2e} / "
              f"{float(gt[i].flatten()[j]):+.2e}, sqrt(v) {float(va[i].flatten()[j]):.2e}; "
              f"sum {sum(float(d.sum()) for d in dw):.2e}")
    for s in report:
        if s > iterations:
            continue
        (ga, wa, _), (gt, wt, _) = runs["alone"][s - 1], runs["together"][s - 1]
        print(f"  step {s}: per tensor max|dgrad| / max|grad|, max|dgrad| (max|grad|), max|dweight|")
        for i, n in enumerate(names):
            scale = float(ga[i].abs().max())
            dg = float((ga[i] - gt[i]).abs().max())
            print(f"    {n:28s} {dg / max(scale, 1e-30):9.2e} {dg:9.2e} ({scale:8.2e}) "
                  f"{float((wa[i] - wt[i]).abs().max()):9.2e}")


def checkpoint_cases(checkpoint: str, split: str, images: list[str] | None,
                     n: int) -> tuple[AtlasISTNModule, torch.Tensor, torch.Tensor | None]:
    """A trained model and the ITN logits (n, C, *size) and field-of-view masks (n, 1, *size) of n cases
    on its model grid: the first n `images` (files, preprocessed as the model's config says), or else
    the first n cases of its config's data split `split` (as in training)."""
    from atlasreg.data.case_dataset import CaseDataset
    from atlasreg.data.cases import Preprocessing, load_case
    from atlasreg.models.registry import load_model

    module = load_model(checkpoint)
    if images:
        prep = Preprocessing.from_config(module.config)
        cases = [load_case(path, None, prep) for path in images[:n]]
        image = torch.cat([c.image for c in cases])
        masks = [c.mask for c in cases]
        mask = torch.cat(masks) if all(m is not None for m in masks) else None
    else:
        cases = CaseDataset.from_config(module.config, split)
        image = torch.stack([cases[i][0] for i in range(n)])
        mask = torch.stack([cases[i][3] for i in range(n)])
    with torch.no_grad():
        logits = module.net.itn(image)
    return module, logits, mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--iterations", type=int, nargs="+", default=[50, 100])
    ap.add_argument("--lr", type=float, default=1e-3, help="refinement learning rate (config default)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", help="a trained model instead of the synthetic one (e.g. an ACDC run); "
                    "the refinement targets are its ITN logits of --cases cases of --images or --split")
    ap.add_argument("--split", default="validation", help="data split of the checkpoint's config")
    ap.add_argument("--images", nargs="+", help="image files instead of --split")
    ap.add_argument("--cases", type=int, default=4, help="case A and its neighbours (--checkpoint)")
    ap.add_argument("--diagnose", action="store_true")
    ap.add_argument("--diagnose-steps", type=int, nargs="+", default=[1, 2, 5, 20, 50])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.process_time()
    mask = None
    if args.checkpoint:
        module, logits, mask = checkpoint_cases(args.checkpoint, args.split, args.images, args.cases)
        print(f"{args.checkpoint}: model grid {tuple(module.net.grid.size)} (array order), spacing "
              f"{module.net.grid.spacing} mm (ITK order); targets: ITN logits of {logits.shape[0]} "
              f"{'given' if args.images else args.split} cases")
    else:
        module, logits = trained_module(args.train_steps, args.seed)
        print(f"3D model {SIZE} (array order), spacing {SPACING} mm (ITK order), {args.train_steps} training "
              f"steps in {time.process_time() - t0:.1f} s")
    print(f"refinement lr {args.lr}, case A alone vs A + {logits.shape[0] - 1} cases")
    for k in args.iterations:
        r = compare(module, logits, k, args.lr, mask=mask)
        print(f"K={k:4d}: Phi  max diff {r['fwd'][0]:.3e} mm = {r['fwd'][1]:.3e} voxel | "
              f"Phi^-1 {r['inv'][0]:.3e} mm = {r['inv'][1]:.3e} voxel | translation {r['t']:.3e} mm | "
              f"loss {r['loss']:.2e}")
        print(f"        (case A: |Phi(x) - x| up to {r['disp']:.1f} mm, refinement moved Phi by up to "
              f"{r['moved']:.2f} mm; CPU {r['s_alone']:.2f} s alone, {r['s_together']:.2f} s for "
              f"{logits.shape[0]} cases)")
    if args.diagnose:
        diagnose(module, logits, max(args.diagnose_steps), args.lr, args.diagnose_steps, mask)


if __name__ == "__main__":
    main()
