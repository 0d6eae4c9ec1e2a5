"""The bad-input table of docs/results.md (issue 14): every row of tests/bad_inputs_rows.py run as
`atlasreg` runs it (in-process, stdout and stderr captured at the file descriptors), printed as a
Markdown table: command | input | exit status | message (first 120 characters) | files left behind.
Trains one tiny model first (a few seconds). Asserts nothing; tests/test_bad_inputs.py checks the rows.

    PYTHONPATH=src python benchmarks/bad_inputs.py [--command segment]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bad_inputs_rows import ROWS, left_behind, make_material, problems, run_row  # noqa: E402


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--command", help="only the rows of this command")
    args = ap.parse_args()
    rows = [r for r in ROWS if not args.command or r.command == args.command]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        material = make_material(Path(tmp) / "material")
        print("| command | input | exit status | message | files left behind |")
        print("|---|---|---|---|---|")
        failed = []
        for i, r in enumerate(rows):
            folder = Path(tmp) / "rows" / f"{i:03d}"
            res = run_row(r, material, folder)

            def short(text: str) -> str:  # paths relative to the row's folder; material/... for the shared inputs
                return text.replace(f"{folder}/", "").replace(f"{material.root}/", "material/").replace(tmp, "$TMP")

            lines = res.message.splitlines()
            errors = [ln for ln in lines if ln.startswith("atlasreg: error:")]
            shown = short(errors[-1] if errors else lines[0] if lines else "")[:120]
            if len(lines) > 1:
                shown += f" (and {len(lines) - 1} other line(s) on stderr, e.g. '{short(lines[0])[:40]}')"
            print(f"| {r.command} | {cell(r.input)} | {res.status} | {cell(shown)} | "
                  f"{cell(short(left_behind(res)))} |", flush=True)
            if problems(res):
                failed.append((r, problems(res)))
    counts = {c: sum(r.command == c for r in rows) for c in dict.fromkeys(r.command for r in rows)}
    print(f"\n{len(rows)} rows ({', '.join(f'{c} {n}' for c, n in counts.items())}); "
          f"{len(rows) - len(failed)} as required (status 2, one line naming the file or key, nothing left "
          f"behind; a segment input that fails alone: status 1, its line and the summary, the case failed "
          f"in the case manifest, the good cases written); {time.perf_counter() - t0:.0f} s")
    by_defect: dict[str, list[str]] = {}
    for r, found in failed:
        by_defect.setdefault(r.defect or "not known (a new defect)", []).append(f"{r.id} ({'; '.join(found)})")
    for defect, ids in by_defect.items():
        print(f"\nNot as required, {len(ids)} row(s); defect: {defect}:\n")
        for text in ids:
            print(f"- {text}")


if __name__ == "__main__":
    main()
