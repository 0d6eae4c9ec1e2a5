"""Mean Dice, HD95 and Eq. 16 HD95 per method of `atlasreg evaluate` folders, over every (case,
structure) whose reference holds the structure (reference_components > 0: a label declared but absent
from a scan, like the mouse brain's 22, 30 and 37, does not count). One Markdown row per folder and
method; the number of structures is that of the structures present in some reference.

    python benchmarks/evaluation_means.py runs/mouse2/eval_atlas_istn runs/mouse2/eval_atlas_istn_grouped ...

--per-structure FOLDER:METHOD=TITLE ...: instead, one row per structure (in the first folder's order)
and one column per named folder and method, "Dice / Eq. 16 HD95" (means over the cases whose reference
holds the structure; n/a where no distance is defined), e.g.

    python benchmarks/evaluation_means.py --per-structure \
        runs/deepatlas_mouse/eval_deepatlas_1shot_mouse_grouped:onepass=DeepATLAS \
        runs/deepatlas_mouse_baselines/eval_registration_1shot_mouse_grouped:onepass=registration

--criteria FOLDER:METHOD FOLDER:METHOD ...: issue 11's acceptance, per structure, for the first
(the candidate, e.g. refine) against the others (e.g. the ITN and the U-Net): its mean HD95 at or below
each of theirs, and its mean Dice at least the best of theirs minus --dice-tolerance (0.02). Means
over the cases whose reference holds the structure; a case where a method predicts nothing has no
HD95 (NaN) and counts as an infinite one, so a missed structure never looks close. Prints a row per
structure and the number of structures that meet both, e.g.

    python benchmarks/evaluation_means.py --criteria runs/mouse3/eval_atlas_istn:refine \
        runs/mouse3/eval_atlas_istn:itn runs/mouse3/eval_unet:itn

--paired CANDIDATE BASELINE FOLDER ...: the paper's paired test (Sec. 3.1; one-sided, percentile
bootstrap, 10,000 resamples, 98% interval; atlasreg.evaluation.statistics.paired_bootstrap) of method
CANDIDATE against method BASELINE, per structure, over the (case, structure) pairs of every folder
pooled (e.g. several trainings' validation parts): the mean difference of Dice and of HD95 (positive:
the candidate is better), its interval, and the one-sided p-value. A pair where either method missed
the structure (HD95 NaN) is left out of the HD95 test and counted in the row. This answers whether a
mean that misses the criteria by a little is a difference at all, e.g.

    python benchmarks/evaluation_means.py --paired refine itn runs/acdc_split/ce_seed{1,2}_eval

With --against FOLDER ..., the baseline's rows come from those folders, the i-th paired with the i-th
evaluation folder by case: the same method of two runs, e.g. refine with two settings,

    python benchmarks/evaluation_means.py --paired refine refine runs/acdc_rot/seed2_eval \
        --against runs/acdc_split/ce_seed2_lam06g1_eval
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from atlasreg.contracts import read_metrics_per_case, read_transforms_per_case  # noqa: E402
from atlasreg.evaluation.statistics import paired_bootstrap  # noqa: E402


def _nanmean(values: list[float]) -> float:
    """Mean of the finite values; NaN (without numpy's warning) when there are none (e.g. hd95_avg of
    a folder evaluated before that column existed)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _present(folder: Path) -> list[dict]:
    """The rows of the folder's metrics_per_case.csv whose reference holds the structure."""
    return [r for r in read_metrics_per_case(folder) if r["reference_components"] > 0]


def means(folder: Path) -> list[dict]:
    """Per method of the evaluation folder: structures present, mean Dice, HD95, hd95_avg and ASD
    (NaN-ignoring), the structures with a mean Dice above 0.5, the structures with one connected
    component in every case, and the holes summed over cases and structures."""
    rows = _present(folder)
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        by: dict[str, list[dict]] = {}
        for r in mine:
            by.setdefault(r["structure"], []).append(r)
        out.append({"method": method, "structures": len(by),
                    **{k: _nanmean([r[k] for r in mine]) for k in ("dice", "hd95", "hd95_avg", "asd")},
                    "dice_above_half": sum(np.mean([r["dice"] for r in rs]) > 0.5 for rs in by.values()),
                    "one_component": sum(all(r["components"] == 1 for r in rs) for rs in by.values()),
                    "holes": int(sum(r["holes"] for r in mine))})
    return out


def transform_means(folder: Path) -> list[dict]:
    """Per transform method of the folder's transforms_per_case.csv: the largest fraction of det J <= 0
    over the cases, and the means of SD log|J|, MICE (mm) and IC-DSC; [] when it has none."""
    rows = read_transforms_per_case(folder)
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        out.append({"method": method, "folds_max": max(r["nonpositive_jacobian_fraction"] for r in mine),
                    **{k: _nanmean([r[k] for r in mine]) for k in ("std_log_jacobian", "mice_mm", "ic_dsc")}})
    return out


def per_structure(columns: list[tuple[Path, str, str]]) -> str:
    """Markdown table: a row per structure (the first folder's order), a column per (folder, method,
    title) with the mean Dice / hd95_avg over the cases whose reference holds the structure."""
    tables = []
    for folder, method, _ in columns:
        rows = [r for r in _present(folder) if r["method"] == method]
        if not rows:
            raise SystemExit(f"{folder}: no rows of method {method!r}")
        by = {}
        for r in rows:
            by.setdefault(r["structure"], []).append(r)
        tables.append(by)
    lines = ["| structure | " + " | ".join(t for *_, t in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for structure in tables[0]:
        cells = []
        for by in tables:
            mine = by.get(structure, [])
            dice, hd = _nanmean([r["dice"] for r in mine]), _nanmean([r["hd95_avg"] for r in mine])
            cells.append("n/a" if not mine else f"{dice:.3f} / " + ("n/a" if np.isnan(hd) else f"{hd:.2f}"))
        left, _, right = structure.partition("+")  # "Left X+Right X" (evaluate --merge) -> "X (both sides)"
        name = f"{left[5:]} (both sides)" if left.startswith("Left ") and right == "Right " + left[5:] else structure
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _per_structure_means(folder: Path, method: str) -> dict[str, tuple[float, float]]:
    """{structure: (mean Dice, mean HD95)} of one method of an evaluation folder, over the cases whose
    reference holds the structure; the HD95 is infinite if the method missed it in any of them."""
    by: dict[str, list[dict]] = {}
    for r in _present(folder):
        if r["method"] == method:
            by.setdefault(r["structure"], []).append(r)
    if not by:
        raise SystemExit(f"{folder}: no rows of method {method!r}")
    return {s: (float(np.mean([r["dice"] for r in rows])),
                float(np.mean([r["hd95"] if np.isfinite(r["hd95"]) else np.inf for r in rows])))
            for s, rows in by.items()}


def criteria(candidate: tuple[Path, str], baselines: list[tuple[Path, str]], dice_tolerance: float = 0.02) -> str:
    """Markdown table of issue 11's acceptance per structure (see the module docstring) and a summary line."""
    cand = _per_structure_means(*candidate)
    bases = [_per_structure_means(*b) for b in baselines]
    names = [f"{f.name}:{m}" for f, m in [candidate, *baselines]]
    lines = ["| structure | " + " | ".join(f"{n} Dice / HD95" for n in names) + " | Dice ok | HD95 ok |",
             "|---|" + "---:|" * len(names) + "---|---|"]
    both = 0
    for structure, (dice, hd) in cand.items():
        others = [b.get(structure, (0.0, np.inf)) for b in bases]
        dice_ok = dice >= max(d for d, _ in others) - dice_tolerance
        hd_ok = hd <= min(h for _, h in others)
        both += dice_ok and hd_ok
        cells = [f"{d:.3f} / {h:.2f}" for d, h in [(dice, hd), *others]]
        lines.append(f"| {structure} | " + " | ".join(cells) + f" | {'yes' if dice_ok else 'NO'} | "
                     f"{'yes' if hd_ok else 'NO'} |")
    lines.append(f"\n{both} of {len(cand)} structures meet both (Dice tolerance {dice_tolerance}).")
    return "\n".join(lines)


def _test_cell(test: dict | None) -> str:
    return "n/a" if test is None else (f"{test['mean_difference']:+.3f} [{test['ci_low']:+.3f}, "
                                       f"{test['ci_high']:+.3f}], p {test['p_value']:.3f}")


def paired(candidate: str, baseline: str, folders: list[Path], against: list[Path] | None = None) -> str:
    """Markdown table of the paired bootstrap test of `candidate` against `baseline` (method names) per
    structure, over the (folder, case) pairs of every folder (see the module docstring). against: the
    baseline's rows come from these folders instead, the i-th paired with the i-th of `folders` (the
    same cases evaluated from another run)."""
    if against is not None and len(against) != len(folders):
        raise SystemExit(f"--against: {len(against)} folders for {len(folders)}")
    pairs: dict[str, dict[tuple, dict]] = {}
    for i, folder in enumerate(folders):
        for side, source, method in (("a", folder, candidate), ("b", against[i] if against else folder, baseline)):
            for r in _present(source):
                if r["method"] == method:
                    pairs.setdefault(r["structure"], {}).setdefault((i, r["case"]), {})[side] = r
    lines = [f"| structure | pairs | Dice {candidate} - {baseline} [98% CI], p | "
             f"HD95 {baseline} - {candidate} [98% CI], p | pairs without HD95 |", "|---|---:|---|---|---:|"]
    for structure, by_case in pairs.items():
        both = [v for v in by_case.values() if "a" in v and "b" in v]
        if len(both) < 2:
            continue
        dice = paired_bootstrap([v["a"]["dice"] for v in both], [v["b"]["dice"] for v in both])
        with_hd = [v for v in both if np.isfinite(v["a"]["hd95"]) and np.isfinite(v["b"]["hd95"])]
        hd = paired_bootstrap([v["a"]["hd95"] for v in with_hd], [v["b"]["hd95"] for v in with_hd],
                              higher_is_better=False) if len(with_hd) >= 2 else None
        lines.append(f"| {structure} | {len(both)} | {_test_cell(dice)} | {_test_cell(hd)} | "
                     f"{len(both) - len(with_hd)} |")
    return "\n".join(lines)


def _folder_method(spec: str) -> tuple[Path, str]:
    folder, _, method = spec.rpartition(":")
    if not folder or not method:
        raise SystemExit(f"expected FOLDER:METHOD, got {spec!r}")
    return Path(folder), method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("evaluations", nargs="*", type=Path)
    parser.add_argument("--per-structure", nargs="+", metavar="FOLDER:METHOD=TITLE",
                        help="a table per structure with a column per folder and method")
    parser.add_argument("--criteria", nargs="+", metavar="FOLDER:METHOD",
                        help="issue 11's acceptance per structure: the first against the others")
    parser.add_argument("--dice-tolerance", type=float, default=0.02)
    parser.add_argument("--paired", nargs=2, metavar=("CANDIDATE", "BASELINE"),
                        help="the paper's paired bootstrap test of two methods over the folders pooled")
    parser.add_argument("--against", nargs="+", type=Path, metavar="FOLDER",
                        help="with --paired: the baseline's rows from these folders, one per evaluation folder")
    args = parser.parse_args()
    if args.paired:
        if not args.evaluations:
            parser.error("--paired: give the evaluation folders")
        print(paired(*args.paired, args.evaluations, args.against))
        return
    if args.criteria:
        if len(args.criteria) < 2:
            parser.error("--criteria: a candidate and at least one baseline")
        specs = [_folder_method(s) for s in args.criteria]
        print(criteria(specs[0], specs[1:], args.dice_tolerance))
        return
    if args.per_structure:
        columns = []
        for spec in args.per_structure:
            where, _, title = spec.partition("=")
            folder, _, method = where.rpartition(":")
            if not folder or not method:
                raise SystemExit(f"--per-structure: expected FOLDER:METHOD=TITLE, got {spec!r}")
            columns.append((Path(folder), method, title or f"{Path(folder).name} {method}"))
        print(per_structure(columns))
        return
    if not args.evaluations:
        parser.error("give evaluation folders, or --per-structure")
    print("| evaluation | method | structures | Dice | HD95 | HD95 Eq. 16 | ASD | Dice > 0.5 | 1 component | holes |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for folder in args.evaluations:
        for m in means(folder):
            print(f"| {folder.name} | {m['method']} | {m['structures']} | {m['dice']:.3f} | {m['hd95']:.3f} | "
                  f"{m['hd95_avg']:.3f} | {m['asd']:.3f} | {m['dice_above_half']} | {m['one_component']} | "
                  f"{m['holes']} |")
    transforms = [(folder, t) for folder in args.evaluations for t in transform_means(folder)]
    if transforms:
        print("\n| evaluation | transform | max fraction det J <= 0 | SD log det J | MICE (mm) | IC-DSC |\n"
              "|---|---|---:|---:|---:|---:|")
        for folder, t in transforms:
            print(f"| {folder.name} | {t['method']} | {t['folds_max']:.4f} | {t['std_log_jacobian']:.3f} | "
                  f"{t['mice_mm']:.4f} | {t['ic_dsc']:.3f} |")


if __name__ == "__main__":
    main()
