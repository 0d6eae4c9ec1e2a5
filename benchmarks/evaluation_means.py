"""Mean Dice, HD95 and Eq. 16 HD95 per method of `atlasreg evaluate` folders, over every (case,
structure) whose reference holds the structure (reference_components > 0: a label declared but absent
from a scan, like the mouse brain's 22, 30 and 37, does not count). One Markdown row per folder and
method; the number of structures is that of the structures present in some reference.

    python benchmarks/evaluation_means.py runs/mouse2/eval_atlas_istn runs/mouse2/eval_atlas_istn_grouped ...
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


def means(folder: Path) -> list[dict]:
    """Per method of the evaluation folder: structures present, mean Dice, HD95 and hd95_avg (NaN-ignoring)."""
    rows = [r for r in read_metrics_per_case(folder) if r["reference_components"] > 0]
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        out.append({"method": method, "structures": len({r["structure"] for r in mine}),
                    **{k: _nanmean([r[k] for r in mine]) for k in ("dice", "hd95", "hd95_avg")}})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("evaluations", nargs="+", type=Path)
    args = parser.parse_args()
    print("| evaluation | method | structures | Dice | HD95 | HD95 Eq. 16 |\n|---|---|---:|---:|---:|---:|")
    for folder in args.evaluations:
        for m in means(folder):
            print(f"| {folder.name} | {m['method']} | {m['structures']} | {m['dice']:.3f} | {m['hd95']:.3f} | "
                  f"{m['hd95_avg']:.3f} |")


if __name__ == "__main__":
    main()
