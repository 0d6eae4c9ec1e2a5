"""What the test-time refinement fits: the ITN logits (the paper's Eq. 17) or the one-hot of their
argmax, per case, on the model grid (docs/results.md, "What the refinement fits, and three seeds").

For each case (placed as at test time, without its labels) it prints the mean ITN logit inside the
ITN's own argmax per structure, and for the 1-pass and refined atlas labelmaps: Dice with the ITN's
argmax, Dice with the reference labels resampled onto the model grid, the structure's voxels and the
fraction of them inside the scan's field of view; then the refinement loss at the first and last
iteration, and the mean Dice with the reference over the cases.

    python benchmarks/refine_target.py --checkpoint runs/acdc_seed1/atlas_istn/model.ckpt \\
        --data ../shared/data/acdc-3d --cases patient080_frame02 --targets logits labelmap

Targets: logits, labelmap, or sharpN (softmax(N x logits), a soft alternative, measured only here).
"""

from __future__ import annotations

import argparse

import numpy as np
import SimpleITK as sitk
import torch

from atlasreg.data.cases import Preprocessing, labels_on_grid, load_case
from atlasreg.models.registry import load_model
from atlasreg.predict import predict_cases
from atlasreg.spatial.transforms import warp


def dice(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    a, b = a == k, b == k
    total = int(a.sum() + b.sum())
    return 2 * int((a & b).sum()) / total if total else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="folder with images/ and labels/ (<case>.nii.gz)")
    p.add_argument("--cases", nargs="+", required=True)
    p.add_argument("--targets", nargs="+", default=["logits", "labelmap"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint)
    prep = Preprocessing.from_config(model.config)
    labels = [k for k in sorted(model.config["data"]["labels"]) if k != 0]
    plain_predict = model.predict
    for target in args.targets:
        sharp = float(target[5:]) if target.startswith("sharp") else None

        def predict(images, sharp=sharp):
            out = plain_predict(images)
            if sharp is not None:  # a soft target: the refinement fits these in place of the logits
                out["logits"] = torch.softmax(sharp * out["logits"], 1)
            return out

        model.predict = predict
        settings = {} if sharp is not None else {"target": target}
        scores = {"onepass": [], "refine": []}
        print(f"== target {target}")
        for name in args.cases:
            case = load_case(f"{args.data}/images/{name}.nii.gz", None, prep, name=name)
            pred = predict_cases(model, [case], settings)[0]
            c = pred.case
            reference = sitk.GetArrayFromImage(sitk.ReadImage(f"{args.data}/labels/{name}.nii.gz"))
            truth = labels_on_grid(reference, len(labels) + 1, c.physical, c.placed).argmax(1)[0]
            itn = pred.itn.argmax(0)
            with torch.no_grad():
                logits = plain_predict(c.image)["logits"][0]
            print(name, "mean logit inside the ITN's argmax:",
                  " ".join(f"{float(logits[k][itn == k].mean()):.2f}" for k in labels))
            inside = c.mask[0, 0] > 0.5
            for tname, tr in pred.transforms.items():
                atlas = warp(model.atlas_labelmap, tr.inverse_points(), model.net.grid).argmax(1)[0]
                scores[tname].append([dice(atlas, truth, k) for k in labels])
                print(f"  {tname:8s} Dice with ITN " + " ".join(f"{dice(atlas, itn, k):.2f}" for k in labels)
                      + "  with reference " + " ".join(f"{d:.2f}" for d in scores[tname][-1])
                      + "  voxels " + " ".join(str(int((atlas == k).sum())) for k in labels)
                      + "  inside the scan " + " ".join(
                          f"{float(((atlas == k) & inside).sum()) / max(1, int((atlas == k).sum())):.2f}" for k in labels))
            print(f"  refinement loss {float(pred.history[0]):.4f} -> {float(pred.history[-1]):.4f}")
        for tname, values in scores.items():
            print(f"mean Dice with reference, {tname}, target {target}: "
                  + " ".join(f"{v:.3f}" for v in np.mean(values, 0)))
    model.predict = plain_predict


if __name__ == "__main__":
    main()
