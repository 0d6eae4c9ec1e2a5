"""DeepATLAS on chest X-rays, end to end (issue 15 item 7, 2D): self-supervised pretraining on the JSRT and
Montgomery images without their labels (configs/deepatlas_chest.yaml), templates from ONE labelled case of
the JSRT training split of configs/jsrt.yaml (and from 5: few-shot), propagation to the JSRT validation
split (right lung, left lung, heart) and to Montgomery (lungs: labels 1 and 2 merged), `atlasreg
evaluate` folders (Dice, HD95 per structure), the paper's symmetric HD95 (Eq. 16) beside atlasreg's, and
optionally the ablations of Table 5 (explicit-only, implicit-only, MSE instead of features; one-shot).

``--experiment mouse``: the same in 3D (item 7's mouse brain): pretraining on the 14 images of the
training split of configs/mouse_brain.yaml without their labelmaps (configs/deepatlas_mouse.yaml; the 4
validation scans are NOT seen, unlike the chest run's ATLAS-ext setting), templates from its first 1
and 5 labelled scans, propagation to the 4 validation scans, evaluated over the 40 labels (37 occur)
and again with the hemispheres grouped (20 structures, :data:`HEMISPHERES_GROUPED`); distances in mm.

Run by hand from the repository root; every step already done is skipped (pretraining resumes):

    PYTHONPATH=src python benchmarks/deepatlas_experiment.py [RUN_DIR] [--experiment chest|mouse]
        [--ablations | --variants V,...] [--shots 1,5] [--cases N] [--set KEY=VALUE ...] [--tiny]

RUN_DIR (default runs/deepatlas_experiment) receives ``<variant>/`` (the pretraining runs), templates,
segmentation runs (``seg_<variant>_<k>shot_<test set>``), evaluation folders (``eval_...``, for
``atlasreg report``), ``symmetric_hd95.csv`` (per case and structure, from the evaluation folders: Dice,
atlasreg's HD95 = the maximum of the two directed 95th percentiles, and Eq. 16's ``hd95_avg`` = their
mean), ``summary.md`` (means per structure),
``figures/`` (:func:`make_figures`: the learned atlas with the templates, best / median / worst
propagated cases) and ``timings.yaml``: the wall seconds of every step, the seconds per training step of each stage
measured from the run's TensorBoard log, and the estimated pretraining time of the config's schedule
(without --tiny and --set) and of the paper's (20,000 autoencoder steps, 7,500 per level) from those
seconds per step.

--tiny: a few steps per stage (the same network and images) and --cases 4 unless given: proves the
pipeline end to end in minutes and measures the seconds per step for the estimate. --cases N: only the
first N test cases of each test set.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from atlasreg.cli import main as atlasreg  # noqa: E402
from atlasreg.config import load_config, parse_set  # noqa: E402
from atlasreg.data.cases import pairs_from_spec  # noqa: E402
from atlasreg.data.dataset import find_pairs  # noqa: E402

CONFIG = REPO / "configs" / "deepatlas_chest.yaml"
JSRT_CONFIG = REPO / "configs" / "jsrt.yaml"
CHEST = REPO.parent / "shared" / "data" / "chest-xray"
#: The mouse brain's 20 structures from its 40 labels: value 100 + i merges Left i and Right i + 20.
HEMISPHERES_GROUPED = ";".join(f"{100 + i}={i},{i + 20}" for i in range(1, 21))


@dataclass(frozen=True)
class TestSet:
    """One test set: its ``atlasreg evaluate --test-set`` title, image/labelmap pairs, the ``--merge`` of
    its evaluation (None: every declared label), and the key of the test set whose segmentation folders
    it shares (None: its own; a second evaluation of the same images, e.g. the hemispheres grouped)."""

    title: str
    pairs: list
    merge: str | None = None
    seg: str | None = None


@dataclass(frozen=True)
class Experiment:
    """A DeepATLAS experiment: the pretraining config; the Atlas-ISTN and U-Net configs whose training
    split's first k cases are the labelled cases (templates and baselines); the test sets; the unit of
    the distances (the PNGs store no spacing)."""

    config: Path
    labelled_config: Path
    unet_config: Path
    test_sets: Callable[[], dict[str, TestSet]]
    unit: str
    sees_test_images: bool = False   # pretraining reads the test images unlabelled (ATLAS-ext, Sec. 3.2)


def _chest_tests() -> dict[str, TestSet]:
    """The JSRT validation split of configs/jsrt.yaml (39 cases; right lung, left lung, heart) and
    Montgomery (110 cases; lungs, reference value 255 = our labels 1 and 2)."""
    return {"jsrt": TestSet("JSRT validation", pairs_from_spec(load_config(JSRT_CONFIG)["data"]["validation"])),
            "montgomery": TestSet("Montgomery (lungs)", find_pairs(CHEST / "montgomery" / "images",
                                                                   CHEST / "montgomery" / "labels"), "255=1,2")}


def _mouse_tests() -> dict[str, TestSet]:
    """The validation split of configs/mouse_brain.yaml (4 scans), evaluated over all 40 labels (37
    occur) and with the hemispheres grouped (20 structures; :data:`HEMISPHERES_GROUPED`)."""
    pairs = pairs_from_spec(load_config(REPO / "configs" / "mouse_brain.yaml")["data"]["validation"])
    return {"mouse": TestSet("mouse brain validation", pairs),
            "mouse_grouped": TestSet("mouse brain validation, hemispheres grouped", pairs, HEMISPHERES_GROUPED,
                                     seg="mouse")}


EXPERIMENTS = {
    "chest": Experiment(CONFIG, JSRT_CONFIG, REPO / "configs" / "variants" / "jsrt_unet.yaml", _chest_tests, "px",
                        sees_test_images=True),
    "mouse": Experiment(REPO / "configs" / "deepatlas_mouse.yaml",
                        REPO / "configs" / "variants" / "mouse_brain_0.4mm.yaml",
                        REPO / "configs" / "variants" / "mouse_brain_0.4mm_unet.yaml", _mouse_tests, "mm"),
}
#: The ablations of Table 5 (Sec. 5.4): settings over the config.
ABLATIONS = {"explicit_only": ["deepatlas.losses.implicit=false"],
             "implicit_only": ["deepatlas.losses.explicit=false"],
             "mse": ["deepatlas.losses.similarity=mse"]}
#: The paper's schedule (Secs. 5.2.6, 5.3.2) at the config's batch size, for the second estimate.
PAPER = ["deepatlas.autoencoder.steps=20000", "deepatlas.steps_per_level=7500", "deepatlas.head_warmup_steps=500",
         "deepatlas.lr_warmup_steps=500"]
TINY = ["deepatlas.autoencoder.steps=5", "deepatlas.seed_steps=5", "deepatlas.steps_per_level=5",
        "deepatlas.head_warmup_steps=3", "deepatlas.lr_warmup_steps=1", "deepatlas.checkpoint_every=5"]


def labelled_training(experiment: Experiment = EXPERIMENTS["chest"]) -> list:
    """The training split of the experiment's labelled config (chest: configs/jsrt.yaml, 158 cases,
    seeded 80%; mouse: configs/mouse_brain.yaml, 14 scans): the one- and few-shot runs take its first k
    cases."""
    return pairs_from_spec(load_config(experiment.labelled_config)["data"]["train"])


def test_sets(cases: int | None = None, experiment: Experiment = EXPERIMENTS["chest"]) -> dict[str, TestSet]:
    """The experiment's test sets (:class:`TestSet`), only the first `cases` of each if given."""
    return {k: TestSet(t.title, t.pairs[:cases] if cases else t.pairs, t.merge, t.seg)
            for k, t in experiment.test_sets().items()}


def check_split(experiment: Experiment, tests: dict[str, TestSet]) -> None:
    """Exit unless pretraining reads no image of a test set (by case name), for an experiment that
    does not declare that it does (``sees_test_images``)."""
    spec = dict(load_config(experiment.config)["data"]["train"], labels=None)
    seen = {p.name for p in pairs_from_spec(spec, need_labels=False)}
    leaked = sorted(seen & {p.name for t in tests.values() for p in t.pairs})
    if leaked and not experiment.sees_test_images:
        sys.exit(f"{experiment.config.name}: pretraining reads test images {leaked[:3]}")


def run(*argv) -> float:
    """`atlasreg ARGV` in this process; its wall seconds. Exits on an error."""
    t0 = time.perf_counter()
    status = atlasreg([str(a) for a in argv])
    if status != 0:
        sys.exit(f"atlasreg {' '.join(map(str, argv))}: exit status {status}")
    return time.perf_counter() - t0


def step_wall_times(run_dir: Path) -> list[tuple[int, float]]:
    """(step, wall time in s since the epoch) of every training step a run logged to TensorBoard
    (``loss_step/total`` under ``RUN_DIR/logs``), sorted by step; a step logged twice keeps its last time."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []
    for log in sorted((run_dir / "logs").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(log), size_guidance={"scalars": 0})
        acc.Reload()
        if "loss_step/total" in acc.Tags()["scalars"]:
            events += [(e.step, e.wall_time) for e in acc.Scalars("loss_step/total")]
    return sorted(dict(events).items())


def seconds_per_step(run_dir: Path, config: dict) -> dict[str, float]:
    """Median wall seconds between consecutive training steps of each stage kind and level ('stage 3/5',
    'head warm-up 3/5', 'autoencoder'), from the wall times of the run's TensorBoard step losses."""
    from atlasreg.deepatlas.method import schedule, stage_at

    events = step_wall_times(run_dir)
    stages = schedule(config)
    gaps: dict[str, list[float]] = {}
    for (s0, w0), (s1, w1) in zip(events, events[1:]):
        if s1 == s0 + 1 and stage_at(stages, s1) is stage_at(stages, s0):
            gaps.setdefault(stage_at(stages, s1).name, []).append(w1 - w0)
    return {name: statistics.median(values) for name, values in gaps.items()}


def estimate(full: dict, measured: dict[str, float]) -> dict:
    """The full schedule's steps per stage times the measured seconds per step of that stage."""
    from atlasreg.deepatlas.method import schedule

    rows, total = [], 0.0
    for stage in schedule(full):
        per_step = measured.get(stage.name)
        seconds = None if per_step is None else per_step * stage.steps
        total += seconds or 0.0
        rows.append({"stage": stage.name, "steps": stage.steps, "seconds_per_step": per_step, "seconds": seconds})
    return {"stages": rows, "hours": total / 3600.0}


def evaluated(evaluation: Path) -> bool:
    """Whether `evaluation` is a complete ``atlasreg evaluate`` folder with Eq. 16's ``hd95_avg`` column
    (folders written before that column existed are evaluated again)."""
    from atlasreg.contracts import METRICS_PER_CASE

    path = evaluation / METRICS_PER_CASE
    if not path.is_file():
        return False
    with open(path, newline="") as f:
        return "hd95_avg" in next(csv.reader(f), [])


def symmetric_rows(evaluation: Path, variant: str, shots: int, test_set: str, output: str = "onepass") -> list[dict]:
    """Per case and structure of the ``<output>`` rows of the ``atlasreg evaluate`` folder `evaluation`:
    Dice, atlasreg's HD95 (the maximum of the two directed 95th percentiles) and Eq. 16's symmetric HD95
    (``hd95_avg``: their mean), in pixels (the PNGs store no spacing)."""
    from atlasreg.contracts import read_metrics_per_case

    return [{"variant": variant, "shots": shots, "test_set": test_set, "case": r["case"],
             "structure": r["structure"], "dice": r["dice"], "hd95": r["hd95"], "hd95_avg": r["hd95_avg"]}
            for r in read_metrics_per_case(evaluation) if r["method"] == output]


def add_common_arguments(parser: argparse.ArgumentParser, run_dir: str) -> None:
    """RUN_DIR, --experiment, --shots and --cases: the arguments both DeepATLAS scripts take."""
    parser.add_argument("run_dir", nargs="?", default=run_dir)
    parser.add_argument("--experiment", choices=sorted(EXPERIMENTS), default="chest",
                        help="chest: 2D chest X-rays (JSRT, Montgomery); mouse: 3D mouse brain MRI")
    parser.add_argument("--shots", default="1,5", help="labelled training cases per template or model")
    parser.add_argument("--cases", type=int, help="only the first N cases of each test set")


def evaluate(seg: Path, ts: TestSet, source: list, label: str, evaluation: Path) -> None:
    """``atlasreg evaluate`` of the segmentation folder `seg` against the test set's references, the
    labels from `source` (``--checkpoint C`` or ``--config C``), into `evaluation` (replaced)."""
    run("evaluate", seg, "--references", ts.pairs[0].label.parent, *source, "--test-set", ts.title,
        "--label", label, *(["--merge", ts.merge] if ts.merge else []), "--out", evaluation, "--quiet",
        "--overwrite")


def write_timings(path: Path, timings: dict) -> None:
    """Write `timings` to the YAML file `path`, keeping the wall seconds of the steps that an earlier run
    of the script did and this one skipped (a rerun only adds or replaces steps)."""
    earlier = yaml.safe_load(path.read_text()) if path.is_file() else None
    steps = {**(earlier or {}).get("steps", {}), **timings.get("steps", {})}
    path.write_text(yaml.safe_dump({**(earlier or {}), **timings, "steps": steps}, sort_keys=False))


def write_tables(out: Path, rows: list[dict], unit: str) -> str:
    """``symmetric_hd95.csv`` (the rows) and ``summary.md`` (:func:`summary_markdown`) in `out`; returns
    the summary."""
    with open(out / "symmetric_hd95.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = summary_markdown(rows, unit)
    (out / "summary.md").write_text(summary)
    return summary


def summary_markdown(rows: list[dict], unit: str = "px") -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["shots"], r["test_set"], r["structure"]), []).append(r)
    lines = [f"| Variant | Shots | Test set | Structure | n | Dice | HD95 (max, {unit}) | HD95 Eq. 16 (mean, {unit}) |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    for (variant, shots, test_set, structure), group in groups.items():
        def mean(key):
            values = [g[key] for g in group if np.isfinite(g[key])]
            return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "n/a"
        lines.append(f"| {variant} | {shots} | {test_set} | {structure} | {len(group)} | {mean('dice')} | "
                     f"{mean('hd95')} | {mean('hd95_avg')} |")
    return "\n".join(lines) + "\n"


def ablation_markdown(rows: list[dict], unit: str = "px", reference: str = "deepatlas", shots: int = 1) -> str:
    """Every other variant against `reference` (default: each ablation against the full loss, one-shot),
    per test set and structure, over the cases with `shots` labelled cases: the mean paired difference
    (variant - reference) of Dice and of Eq. 16's HD95, with the paired Wilcoxon signed-rank p-value
    (scipy; cases with a NaN distance left out). A last row per test set, structure "all", pools the
    (structure, case) pairs: with few test cases (4 mouse scans) a per-structure p cannot fall below 0.125."""
    from scipy.stats import wilcoxon

    table: dict[str, dict[tuple, tuple[float, float]]] = {}
    for r in rows:
        if r["shots"] == shots:
            table.setdefault(r["variant"], {})[(r["test_set"], r["structure"], r["case"])] = (r["dice"], r["hd95_avg"])
    full = table.get(reference, {})
    lines = [f"| Variant | Test set | Structure | n | Dice - {reference} | p | HD95 Eq. 16 - {reference} ({unit}) | p |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for variant, values in table.items():
        if variant == reference:
            continue
        groups = [(g, [k for k in values if k[:2] == g and k in full]) for g in dict.fromkeys(k[:2] for k in values)]
        for test_set in dict.fromkeys(g[0] for g, _ in groups):
            groups.append(((test_set, "all"), [k for g, keys in groups if g[0] == test_set for k in keys]))
        for group, keys in groups:
            cells = []
            for i in range(2):
                pairs = np.array([(full[k][i], values[k][i]) for k in keys], dtype=float)
                pairs = pairs[np.isfinite(pairs).all(1)]
                diff = pairs[:, 1] - pairs[:, 0]
                p_value = wilcoxon(pairs[:, 0], pairs[:, 1]).pvalue if len(pairs) and diff.any() else float("nan")
                cells += [f"{diff.mean():+.3f}" if len(diff) else "n/a", f"{p_value:.2g}"]
            lines.append(f"| {variant} | {group[0]} | {group[1]} | {len(keys)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _middle_slice(array: np.ndarray) -> np.ndarray:
    """A 2D array as it is; a volume's middle slice along its first array axis."""
    return array if array.ndim == 2 else array[array.shape[0] // 2]


def make_figures(out: Path, run_dir: Path, shots: list[int], tests: dict, rows: list[dict]) -> list[Path]:
    """``figures/atlas_templates.png``: the learned atlas image X (channel 0, on the template grid) alone
    and with each template's labelmap as contours; ``figures/cases_<test set>.png``: the best, median and
    worst case of 1-shot propagation by mean Dice over the structures (image, propagated labelmap in
    orange, reference in sky blue; :func:`atlasreg.report.figures.qualitative_figure`)."""
    import SimpleITK as sitk
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from atlasreg.contracts import atlas_paths, run_paths, template_paths
    from atlasreg.report import figures

    folder = out / "figures"
    folder.mkdir(exist_ok=True)
    written = []
    atlas_file = atlas_paths(run_paths(run_dir).atlas).image
    templates = [(k, template_paths(out / f"template_deepatlas_{k}shot").labelmap) for k in shots]
    templates = [(k, path) for k, path in templates if path.is_file()]
    if atlas_file.is_file():
        atlas = _middle_slice(sitk.GetArrayFromImage(sitk.ReadImage(str(atlas_file))))
        fig = Figure(figsize=(3.2 * (1 + len(templates)), 3.6))
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, 1 + len(templates), squeeze=False)[0]
        for ax, (title, labelmap) in zip(axes, [("learned atlas X", None)] + [
                (f"template, {k} labelled case{'s' if k > 1 else ''}", path) for k, path in templates]):
            ax.imshow(atlas, cmap="gray")
            if labelmap is not None:
                template = _middle_slice(sitk.GetArrayFromImage(sitk.ReadImage(str(labelmap))))
                values = sorted(set(np.unique(template)) - {0})   # more than 8 (the mouse brain's 40): cycled
                palette = list(figures.OKABE_ITO.values())
                for i, value in enumerate(values):
                    colour = palette[i % len(palette)]
                    ax.contour(template == value, levels=[0.5], colors=colour, linewidths=1.2)
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
        fig.savefig(folder / "atlas_templates.png", dpi=120, bbox_inches="tight")
        written.append(folder / "atlas_templates.png")
    for test_set, ts in tests.items():
        if ts.seg is not None:       # the same images as another test set: one figure
            continue
        pairs = ts.pairs
        seg = out / f"seg_deepatlas_1shot_{test_set}"
        per_case: dict[str, list[float]] = {}
        for r in rows:
            if r["variant"] == "deepatlas" and r["shots"] == 1 and r["test_set"] == test_set:
                per_case.setdefault(r["case"], []).append(r["dice"])
        ranked = sorted(per_case, key=lambda c: np.mean(per_case[c]), reverse=True)
        if not ranked or not seg.is_dir():
            continue
        picks = [(ranked[0], "best"), (ranked[len(ranked) // 2], "median"), (ranked[-1], "worst")]
        png = figures.qualitative_figure(seg, {p.name: str(p.label) for p in pairs}, [c for c, _ in picks],
                                         [f"{t} 1-shot Dice {np.mean(per_case[c]):.3f}" for c, t in picks],
                                         outputs=(("onepass", "DeepATLAS, 1 labelled case"),))
        if png is not None:
            (folder / f"cases_{test_set}.png").write_bytes(png)
            written.append(folder / f"cases_{test_set}.png")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, "runs/deepatlas_experiment")
    parser.add_argument("--ablations", action="store_true", help="also the explicit-only, implicit-only and MSE runs")
    parser.add_argument("--variants", help="comma-separated subset of deepatlas," + ",".join(ABLATIONS) +
                        " to run (default: deepatlas, and the ablations with --ablations); two processes may "
                        "run different variants into one RUN_DIR, and a last run of all of them gathers the tables")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--tiny", action="store_true", help="a few steps per stage and 4 test cases (a smoke run)")
    args = parser.parse_args()
    out = Path(args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    sets = [*(TINY if args.tiny else []), *args.set]
    cases = args.cases if args.cases is not None else (4 if args.tiny else None)
    shots = [int(k) for k in args.shots.split(",")]

    experiment = EXPERIMENTS[args.experiment]
    config_file = experiment.config
    training = labelled_training(experiment)        # templates come from these labelled cases only
    tests = test_sets(cases, experiment)
    check_split(experiment, tests)
    timings: dict = {"steps": {}}
    rows: list[dict] = []
    variants = {"deepatlas": [], **(ABLATIONS if args.ablations else {})}
    if args.variants:
        chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = sorted(set(chosen) - {"deepatlas", *ABLATIONS})
        if unknown:
            sys.exit(f"unknown variant(s) {unknown}; expected some of {['deepatlas', *ABLATIONS]}")
        variants = {v: ([] if v == "deepatlas" else ABLATIONS[v]) for v in chosen}
    for variant, extra in variants.items():
        run_dir = out / variant
        overrides = [*sets, *extra]
        config = load_config(config_file, parse_set(overrides))
        checkpoint = run_dir / "model.ckpt"
        argv = ["deepatlas", "pretrain", config_file, "--out", run_dir, "--quiet"]
        timings["steps"][f"pretrain {variant}"] = run(*argv, *[a for s in overrides for a in ("--set", s)])
        for k in (shots if variant == "deepatlas" else [1]):
            template = out / f"template_{variant}_{k}shot"
            if not template.is_dir():
                chosen = training[:k]
                timings["steps"][f"template {variant} {k}-shot"] = run(
                    "deepatlas", "template", "--checkpoint", checkpoint, "--images", *[p.image for p in chosen],
                    "--labels", *[p.label for p in chosen], "--out", template, "--quiet")
            for test_set, ts in tests.items():
                seg = out / f"seg_{variant}_{k}shot_{ts.seg or test_set}"
                evaluation = out / f"eval_{variant}_{k}shot_{test_set}"
                if not evaluated(evaluation):
                    if not evaluation.is_dir() and not (ts.seg and (seg / "segment.yaml").is_file()):
                        timings["steps"][f"propagate {variant} {k}-shot {test_set}"] = run(
                            "deepatlas", "propagate", *[p.image for p in ts.pairs], "--checkpoint", checkpoint,
                            "--template", template, "--out", seg, "--quiet")
                    label = "DeepATLAS" if variant == "deepatlas" else f"DeepATLAS {variant}"
                    evaluate(seg, ts, ["--checkpoint", checkpoint], f"{label} {k}-shot", evaluation)
                rows += symmetric_rows(evaluation, variant, k, test_set)
        if variant == "deepatlas":
            measured = seconds_per_step(run_dir, config)
            full = load_config(config_file)
            timings["seconds_per_step"] = measured
            timings["full_schedule_estimate"] = estimate(full, measured)
            timings["paper_schedule_estimate"] = estimate(load_config(config_file, parse_set(PAPER)), measured)
            timings["test_cases"] = {k: len(t.pairs) for k, t in tests.items()}
    summary = write_tables(out, rows, experiment.unit)
    if len({r["variant"] for r in rows}) > 1:
        (out / "ablations.md").write_text(ablation_markdown(rows, experiment.unit))
    write_timings(out / ("timings.yaml" if "deepatlas" in variants else f"timings_{'_'.join(variants)}.yaml"),
                  timings)
    for path in make_figures(out, out / "deepatlas", shots, tests, rows):
        print(f"figure: {path}")
    print(summary)
    if "full_schedule_estimate" not in timings:
        return
    est, paper = timings["full_schedule_estimate"], timings["paper_schedule_estimate"]
    print(f"pretraining at the measured seconds per step: the schedule of {config_file.name} about {est['hours']:.1f} h, "
          f"the paper's (20,000 + 5 x 7,500 steps) about {paper['hours']:.1f} h at batch size "
          f"{load_config(config_file)['training']['batch_size']}")


if __name__ == "__main__":
    main()
