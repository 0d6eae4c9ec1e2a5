"""Baselines of the DeepATLAS one-shot chest X-ray experiment (issue 15 item 7, 2D;
benchmarks/deepatlas_experiment.py): the same labelled JSRT training cases (training[:1] = JPCLN002 for
one-shot, training[:5] for few-shot, from the JSRT training split of configs/jsrt.yaml) and the same
test sets (JSRT validation split, 39 cases: right lung, left lung, heart; Montgomery, 110 cases: lungs,
labels 1 and 2 merged), evaluated the same way (`atlasreg evaluate`, and the paper's Eq. 16 HD95 beside
atlasreg's), for three baselines:

* ``unet``: the U-Net (configs/variants/jsrt_unet.yaml: the ITN alone, L_s only) trained on the k cases;
  its output ``itn``;
* ``atlas_istn``: Atlas-ISTN (configs/jsrt.yaml) trained on the k cases; its outputs ``itn``, ``onepass``
  and ``refine`` (test-time refinement, the config's 50 iterations). Atlas-ISTN trained on all 158
  training cases is not retrained here: docs/results.md, "JSRT chest X-rays and Montgomery (issues 2
  and 3)";
* ``registration`` (one-shot only): ``atlasreg register TEST_IMAGE JPCLN002 --labels JPCLN002_LABELMAP``
  (fixed: the test image; moving: the labelled case; defaults: rigid -> affine -> SVF, LNCC), its
  ``warped_labels.nii.gz`` (on the fixed image's grid) evaluated as the case's ``onepass`` labelmap.

``--experiment mouse``: the same baselines in 3D on the mouse brain (configs/variants/mouse_brain_0.4mm.yaml
and configs/variants/mouse_brain_0.4mm_unet.yaml trained on its first 1 or 5 training scans; registration of the
first scan; the 4 validation scans, over 40 labels and with the hemispheres grouped; mm).

Run by hand from the repository root; every step already done is skipped (a killed training resumes):

    PYTHONPATH=src python benchmarks/deepatlas_baselines.py [RUN_DIR] [--experiment chest|mouse] [--shots 1,5] [--cases N]
        [--methods unet,atlas_istn,registration] [--tiny]

RUN_DIR (default runs/deepatlas_baselines) receives ``<method>_<k>shot/`` (training runs),
``seg_<method>_<k>shot_<test set>/`` (segmentation runs; registration: one ``atlasreg register`` folder
per case), ``eval_...`` (``atlasreg evaluate`` folders, for ``atlasreg report``), ``symmetric_hd95.csv``
(the columns of deepatlas_experiment.py's; ``variant`` = method and output, e.g. ``atlas_istn refine``),
``summary.md`` (Dice and HD95 mean ± SD per structure and test set; HD95 in pixels) and
``timings.yaml`` (wall seconds of every step; median wall seconds per training step from TensorBoard).

Training length. With 1 or 5 cases an epoch is ONE step (batch size 8 > k), so the config's 300 epochs
would be 300 steps against 6,000 (20 a epoch) for the 158-case model. Seconds per step measured on this
CPU (2 cores, shared with a DeepATLAS pretraining and a segmentation benchmark; 30-40 epoch runs,
median / mean gap between logged steps, the epoch's end with its checkpoint and atlas update
included): Atlas-ISTN 1-shot 0.42 / 0.75 s, 5-shot 0.71 / 1.14 s; U-Net 1-shot 0.14 / 0.22 s, 5-shot
0.36 / 0.48 s. Each model trains EPOCHS = 800 optimiser steps (chest: 800 epochs, 800 to 4,000 case
presentations, augmented; mouse, batch 2: 800 epochs for one scan, 267 epochs of 3 steps for five):
Atlas-ISTN 5-shot, the slowest, 9.5 min at the median and 15 min at the mean, within the 10-15 min
budget; the same number of steps for every model and k. The settings counted in epochs are scaled by
epochs / 300 (:func:`schedule`); chest: fade-in e0 = tau = 66.7 epochs (25 of 300), the learning
rate halves every 800 epochs (once over the run, as 300 of 300), and the atlas update rate eta = 1 - 0.99^(300
/ 800) = 0.0038 a epoch, so that the initial atlas keeps the same weight after the run (0.99^300).
Augmentation stays on (the config's). data.validation is set to null: no validation (or Montgomery)
labelmap is read during training (the training split is the k named cases; checked after training).

--tiny: 5 epochs, registration with 5 iterations a level, and --cases 4 unless given: the pipeline end to
end in minutes. --cases N: the first N cases of each test set.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import statistics
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

from deepatlas_experiment import (EXPERIMENTS, ablation_markdown, add_common_arguments, evaluate,  # noqa: E402
                                  evaluated, labelled_training, run, step_wall_times, symmetric_rows, test_sets,
                                  write_tables, write_timings)

from atlasreg.config import load_config  # noqa: E402
from atlasreg.contracts import (REGISTERED_LABELS, case_labelmap_path, read_run_config,  # noqa: E402
                                run_paths)
from atlasreg.data.cases import pairs_from_spec  # noqa: E402

#: method -> (its config in an experiment, name in the evaluation folders, outputs scored in
#: symmetric_hd95.csv).
LEARNED = {"unet": (lambda e: e.unet_config, "U-Net", ("itn",)),
           "atlas_istn": (lambda e: e.labelled_config, "Atlas-ISTN", ("itn", "onepass", "refine"))}
METHODS = (*LEARNED, "registration")
#: Optimiser steps of each learned baseline (= epochs with 1-5 chest cases; :func:`schedule`); see the module docstring.
EPOCHS = 800
TINY_EPOCHS = 5
#: `atlasreg register` options of --tiny (the defaults otherwise).
TINY_REGISTER = ["--iterations", "5"]


def schedule(steps: int, config_file: Path, cases: int = 1) -> list[str]:
    """--set overrides training for `steps` optimiser steps on `cases` labelled cases with the settings
    of `config_file` (configs/jsrt.yaml, configs/variants/mouse_brain_0.4mm.yaml, the U-Net variants): epochs =
    steps / ceil(cases / batch_size) (chest, batch 8: one step an epoch for 1-5 cases; mouse, batch 2:
    3 steps an epoch for 5 cases), the settings counted in epochs scaled from the config's own epochs
    (fade-in e0 and tau, lr_halving_epochs), the atlas update rate eta such that (1 - eta)^epochs =
    (1 - eta_config)^epochs_config, and no validation split."""
    t = load_config(config_file)["training"]
    epochs = max(1, round(steps / math.ceil(cases / t["batch_size"])))
    s = epochs / t["epochs"]
    eta = 1.0 - (1.0 - t["atlas_eta"]) ** (1.0 / s)
    return [f"training.epochs={epochs}",
            f"training.fade_in={{e0: {t['fade_in']['e0'] * s:.6g}, tau: {t['fade_in']['tau'] * s:.6g}}}",
            f"training.lr_halving_epochs={t['lr_halving_epochs'] * s:.6g}", f"training.atlas_eta={eta:.6g}",
            "data.validation=null"]


def check_training_run(run_dir: Path, chosen: list[str], test_names: set[str]) -> None:
    """Exit unless the training run's stored config trained on exactly the cases `chosen`, none of them
    a test case, and read no validation split."""
    config = read_run_config(run_dir)
    names = [p.name for p in pairs_from_spec(config["data"]["train"])]
    if names != chosen or set(names) & test_names or config["data"].get("validation"):
        sys.exit(f"{run_dir}: trained on {names} (validation split {config['data'].get('validation')}); "
                 f"expected {chosen} and no validation split")


def seconds_per_step(run_dir: Path) -> float | None:
    """Median wall seconds between consecutive logged training steps of a run (TensorBoard)."""
    events = step_wall_times(run_dir)
    gaps = [w1 - w0 for (s0, w0), (s1, w1) in zip(events, events[1:]) if s1 == s0 + 1]
    return round(statistics.median(gaps), 4) if gaps else None


def register_all(pairs, moving, out: Path, options: list[str]) -> float:
    """``atlasreg register`` of the labelled case `moving` (image and labelmap) to every test image of
    `pairs` (fixed) into ``out/<case>/``, its warped labelmap copied to ``onepass_labelmap.nii.gz`` for
    `atlasreg evaluate`; cases already done are skipped. Returns the wall seconds."""
    seconds = 0.0
    out.mkdir(parents=True, exist_ok=True)
    for pair in pairs:
        case = out / pair.name
        onepass = case_labelmap_path(case, "onepass", ".nii.gz")
        if onepass.is_file():
            continue
        if not case.is_dir():  # `register` writes its folder at once, complete or not at all
            seconds += run("register", pair.image, moving.image, "--out", case, "--labels", moving.label,
                           "--quiet", *options)
        shutil.copyfile(case / REGISTERED_LABELS, onepass)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, "runs/deepatlas_baselines")
    parser.add_argument("--compare", type=Path, help="RUN_DIR of deepatlas_experiment.py: write comparison.md, "
                        "DeepATLAS against each baseline with the same labelled cases (paired Wilcoxon)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--tiny", action="store_true", help="5 epochs and 4 test cases (a smoke run)")
    args = parser.parse_args()
    out = Path(args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases = args.cases if args.cases is not None else (4 if args.tiny else None)
    shots = [int(k) for k in args.shots.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"unknown method(s) {unknown}; expected some of {list(METHODS)}")
    experiment = EXPERIMENTS[args.experiment]

    training = labelled_training(experiment)        # the baselines learn from these labelled cases only
    tests = test_sets(cases, experiment)
    test_names = {p.name for t in test_sets(None, experiment).values() for p in t.pairs}
    timings: dict = {"steps_per_model": TINY_EPOCHS if args.tiny else EPOCHS, "steps": {}, "seconds_per_step": {},
                     "test_cases": {k: len(t.pairs) for k, t in tests.items()}}
    rows: list[dict] = []
    for method in methods:
        for k in (shots if method != "registration" else [k for k in shots if k == 1]):
            chosen = training[:k]
            if method in LEARNED:
                config_of, name, outputs = LEARNED[method]
                config = config_of(experiment)
                run_dir = out / f"{method}_{k}shot"
                checkpoint = run_paths(run_dir).final_checkpoint
                if not checkpoint.is_file():
                    sets = [*schedule(TINY_EPOCHS if args.tiny else EPOCHS, config, k),
                            f"data.train.cases={json.dumps([p.name for p in chosen])}"]
                    timings["steps"][f"train {method} {k}-shot"] = run(
                        "train", config, "--out", run_dir, "--quiet", *[a for s in sets for a in ("--set", s)])
                check_training_run(run_dir, [p.name for p in chosen], test_names)
                timings["seconds_per_step"][f"{method} {k}-shot"] = seconds_per_step(run_dir)
            else:
                name, outputs = "Registration", ("onepass",)
            for test_set, ts in tests.items():
                seg = out / f"seg_{method}_{k}shot_{ts.seg or test_set}"
                evaluation = out / f"eval_{method}_{k}shot_{test_set}"
                if not evaluated(evaluation):
                    if method in LEARNED:  # `segment` skips the case folders already complete
                        timings["steps"][f"segment {method} {k}-shot {test_set}"] = run(
                            "segment", *[p.image for p in ts.pairs], "--checkpoint", checkpoint, "--out", seg,
                            "--quiet")
                        source = ["--checkpoint", checkpoint]
                    else:
                        timings["steps"][f"register {k}-shot {test_set}"] = register_all(
                            ts.pairs, chosen[0], seg, TINY_REGISTER if args.tiny else [])
                        source = ["--config", experiment.labelled_config]
                    evaluate(seg, ts, source, f"{name} {k}-shot", evaluation)
                for output in outputs:
                    variant = method if method == "registration" else f"{method} {output}"
                    rows += symmetric_rows(evaluation, variant, k, test_set, output=output)
    summary = write_tables(out, rows, experiment.unit)
    if args.compare:
        with open(args.compare / "symmetric_hd95.csv", newline="") as f:
            theirs = [dict(r, shots=int(r["shots"]), **{k: float(r[k]) for k in ("dice", "hd95", "hd95_avg")})
                      for r in csv.DictReader(f) if r["variant"] == "deepatlas"]
        (out / "comparison.md").write_text("".join(
            f"\n{k} labelled case(s), baseline - DeepATLAS:\n\n" + ablation_markdown(theirs + rows, experiment.unit,
                                                                                   shots=k) for k in shots))
    write_timings(out / "timings.yaml", timings)
    print(summary)
    print("Atlas-ISTN trained on all the training cases: docs/results.md, 'JSRT chest X-rays and Montgomery "
          "(issues 2 and 3)' and 'Mouse brain: Atlas-ISTN trained'")


if __name__ == "__main__":
    main()
