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
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from atlasreg.contracts import read_metrics_per_case  # noqa: E402


def _nanmean(values: list[float]) -> float:
    """Mean of the finite values; NaN (without numpy's warning) when there are none (e.g. hd95_avg of
    a folder evaluated before that column existed)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _present(folder: Path) -> list[dict]:
    """The rows of the folder's metrics_per_case.csv whose reference holds the structure."""
    return [r for r in read_metrics_per_case(folder) if r["reference_components"] > 0]


def means(folder: Path) -> list[dict]:
    """Per method of the evaluation folder: structures present, mean Dice, HD95 and hd95_avg (NaN-ignoring)."""
    rows = _present(folder)
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        out.append({"method": method, "structures": len({r["structure"] for r in mine}),
                    **{k: _nanmean([r[k] for r in mine]) for k in ("dice", "hd95", "hd95_avg")}})
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("evaluations", nargs="*", type=Path)
    parser.add_argument("--per-structure", nargs="+", metavar="FOLDER:METHOD=TITLE",
                        help="a table per structure with a column per folder and method")
    args = parser.parse_args()
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
    print("| evaluation | method | structures | Dice | HD95 | HD95 Eq. 16 |\n|---|---|---:|---:|---:|---:|")
    for folder in args.evaluations:
        for m in means(folder):
            print(f"| {folder.name} | {m['method']} | {m['structures']} | {m['dice']:.3f} | {m['hd95']:.3f} | "
                  f"{m['hd95_avg']:.3f} |")


if __name__ == "__main__":
    main()
