"""Test-time localisation error of a trained model (issue 11): for each case of a split with labels,
the distance (mm) between the model grid's centre found by the first ITN passes
(`atlasreg.predict.localise`, no labels) and the centre the labels give (training-time placement), and
whether the orientation search chose the same orientation. Prints one line per case and the median.

    python benchmarks/localisation_error.py runs/acdc/atlas_istn/model.ckpt --split validation
    python benchmarks/localisation_error.py runs/acdc/unet/model.ckpt --passes 1
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from atlasreg.data.case_dataset import CaseDataset
from atlasreg.data.cases import load_case
from atlasreg.models.train import load_module
from atlasreg.predict import localise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--passes", type=int, default=None, help="override data.preprocessing.localisation_passes")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    module = load_module(args.checkpoint)
    if args.passes is not None:
        module.config["data"]["preprocessing"]["localisation_passes"] = args.passes
    prep = CaseDataset.from_config(module.config, "train").preprocessing  # with the training reference
    errors, same = [], []
    for pair in CaseDataset.from_config(module.config, args.split).pairs:
        truth = load_case(pair.image, pair.label, prep).placed
        found = localise(module, [load_case(pair.image, None, prep)])[0].placed
        errors.append(float(np.linalg.norm(np.subtract(found.centre, truth.centre))))
        same.append(bool(np.allclose(found.direction_matrix, truth.direction_matrix, atol=1e-6)))
        print(f"{pair.name}: centre error {errors[-1]:.1f} mm, same orientation as with labels: {same[-1]}")
    print(f"median centre error {np.median(errors):.1f} mm (max {max(errors):.1f}); "
          f"same orientation {sum(same)}/{len(same)}")


if __name__ == "__main__":
    main()
