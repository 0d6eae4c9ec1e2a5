"""`atlasreg report`: evaluation folders -> one self-contained HTML page (figures embedded, opens
offline) and the same tables as Markdown (figures as PNG files beside it).

Contents, per test set (paper Sec. 3): accuracy table in the layout of Tables 1, 2 and 7 with
significance marks; topology, Jacobian and inverse-consistency table (Table 6); paired comparisons of
one column (default 'Refine') against every other; ITN-vs-refine scatter (Fig. 12); qualitative panels
for the best, median and worst case (Figs. 6-7); the quality-control ranking. Across test sets: metric
bars (Fig. 8), the lambda* sensitivity study (Figs. 8, 15) and the atlas at the start and end of
training (Fig. 9).
"""

from __future__ import annotations

import base64
import datetime
import html
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from ..contracts import (EVALUATION_INFO, FIGURE_DIR, REPORT_HTML, REPORT_INFO, REPORT_MD, RUN_CONFIG,
                         read_report_info, read_run_config, write_report_info)
from ..data.io import atomic_directory, write_text
from ..outputs import claim_output
from ..errors import AtlasregError
from ..evaluation.quality import ranking_quality
from . import figures
from .results import METRIC_TITLES, METRICS, Evaluation, ResultTable, collect, column_name, load_evaluation
from .tables import (Cell, claims_table, comparison_table, metric_table, pairwise_table, to_html, to_markdown,
                     topology_table)

CSS = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.85em}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f0f0f0}
td:first-child,td:nth-child(2){text-align:left}img{max-width:100%}h2{border-bottom:1px solid #ccc}
.note{color:#555;font-size:0.9em}"""


class _Page:
    """Collects the report as parallel HTML and Markdown fragments; figures go to both (kept as PNG
    bytes in `figures` until the report is written)."""

    def __init__(self):
        self.html: list[str] = []
        self.md: list[str] = []
        self.figures: dict[str, bytes] = {}

    def heading(self, text: str, level: int = 2) -> None:
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")
        self.md.append(f"{'#' * level} {text}\n")

    def text(self, text: str) -> None:
        self.html.append(f"<p class='note'>{html.escape(text)}</p>")
        self.md.append(text + "\n")

    def table(self, rows: list[list[Cell]]) -> None:
        if len(rows) < 2:
            return
        self.html.append(to_html(rows))
        self.md.append(to_markdown(rows) + "\n")

    def figure(self, png: bytes | None, caption: str) -> None:
        if png is None:
            return
        name = f"figure{len(self.figures) + 1:02d}.png"
        self.figures[name] = png
        data = base64.b64encode(png).decode("ascii")
        self.html.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption)}'>"
                         f"<figcaption class='note'>{html.escape(caption)}</figcaption></figure>")
        self.md.append(f"![{caption}]({FIGURE_DIR}/{name})\n\n*{caption}*\n")


def _case_means(values: dict, column: str, metric: str = "dice") -> dict[str, float]:
    """Per case mean over structures of one column's metric."""
    per_case: dict[str, list[float]] = {}
    for per_col in values.values():
        for case, v in per_col.get(column, {}).get(metric, {}).items():
            per_case.setdefault(case, []).append(v)
    return {c: float(np.nanmean(v)) for c, v in per_case.items()}


def _declared_spacing(info: dict) -> list[float] | None:
    """``data.spacing`` (ITK order, mm; for files that store no spacing) of the training run whose
    checkpoint an evaluation names (the run folder holding it, :func:`atlasreg.contracts.run_paths`), or
    None without a checkpoint, a run configuration or a declared spacing. AtlasregError naming the run
    configuration when the spacing is not a list of positive numbers."""
    checkpoint = info.get("checkpoint")
    if not checkpoint:
        return None
    run_dir = Path(checkpoint).parent
    if not (run_dir / RUN_CONFIG).is_file() and (run_dir.parent / RUN_CONFIG).is_file():
        run_dir = run_dir.parent  # a checkpoint inside the run's checkpoint folder (the last epoch's)
    data = read_run_config(run_dir).get("data")
    spacing = data.get("spacing") if isinstance(data, dict) else None
    if spacing is None:
        return None
    if not (isinstance(spacing, list) and spacing and all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in spacing)):
        raise AtlasregError(f"data.spacing = {spacing!r} is not a list of positive numbers", run_dir / RUN_CONFIG)
    return [float(s) for s in spacing]


def _qualitative(page: _Page, table: ResultTable, test_set: str, column: str) -> None:
    ev: Evaluation | None = table.source.get((test_set, column))
    if ev is None:
        return
    dice = _case_means(table.values[test_set], column)
    ranked = sorted((c for c in dice if not math.isnan(dice[c])), key=lambda c: dice[c], reverse=True)
    if not ranked:
        return
    picks = [(ranked[0], f"best {column} DSC"), (ranked[len(ranked) // 2], f"median {column} DSC"),
             (ranked[-1], f"worst {column} DSC")]
    predictions = Path(ev.info.get("predictions") or ev.path)
    png = figures.qualitative_figure(predictions, ev.info.get("references") or {}, [c for c, _ in picks],
                                     [t for _, t in picks], spacing=_declared_spacing(ev.info))
    page.figure(png, f"{test_set}: image; ITN, 1-pass and refine contours (orange) with the reference "
                     "(sky blue); deformed atlas grid after refinement (yellow) (paper Figs. 6-7).")


def _quality(page: _Page, ev: Evaluation) -> None:
    rows = ev.quality
    if not rows:
        return
    score = np.array([float(r["qc_score"]) for r in rows])
    error = 1.0 - np.array([float(r["refine_dice"]) for r in rows])
    res = ranking_quality(score, error)
    page.text(f"Quality control ({ev.test_set}): score = 1 - DSC(ITN, refine), computed without reference. "
              f"Spearman correlation with the true refine error (1 - DSC): {res['spearman']:.2f}; "
              f"of the {res['k']} truly worst cases, {res['recall'] * 100:.0f}% are among the {res['k']} "
              "flagged ones.")
    flagged = sorted((r for r in rows if r["flagged"]), key=lambda r: -float(r["qc_score"]))
    cells = [[Cell(h, header=True) for h in ("Flagged case", "QC score", "ITN outside refine", "Refine DSC")]]
    cells += [[Cell(r["case"]), Cell(f"{float(r['qc_score']):.3f}"), Cell(f"{float(r['itn_outside_refine']):.3f}"),
               Cell(f"{float(r['refine_dice']):.3f}")] for r in flagged]
    page.table(cells)


def _sensitivity_evaluations(folders: Sequence[str | Path]) -> list[tuple[float, Evaluation]]:
    """(refinement lambda, evaluation) of each folder of the sensitivity study; AtlasregError naming the
    folder when it is not an evaluation or records no lambda."""
    out = []
    for folder in folders:
        ev = load_evaluation(folder)
        lam = (ev.info.get("refinement") or {}).get("lambda")
        if lam is None:
            raise AtlasregError(f"no refinement lambda in {EVALUATION_INFO} (segment with `atlasreg segment`, "
                                "which records it)", ev.path)
        out.append((lam, ev))
    return out


def _sensitivity(page: _Page, evaluations: Sequence[tuple[float, Evaluation]], column: str) -> None:
    if not evaluations:
        return
    by_set: dict[str, list] = {}
    for lam, ev in evaluations:
        stats = {}
        for metric in METRICS:
            v = np.array([r[metric] for r in ev.rows if column_name(ev.info, r["method"]) == column], float)
            stats[metric] = (float(np.nanmean(v)), float(np.nanstd(v))) if v.size else (math.nan, math.nan)
        by_set.setdefault(ev.test_set, []).append((float(lam), stats))
    page.heading("Sensitivity to the refinement regularisation weight λ*")
    for test_set, points in by_set.items():
        cells = [[Cell(h, header=True) for h in ("λ*", "DSC ↑", "HD ↓", "HD95 ↓", "ASD ↓")]]
        for lam, st in sorted(points, key=lambda p: p[0]):
            cells.append([Cell(f"{lam:g}")] + [Cell(f"{st[m][0]:.3f} ± {st[m][1]:.3f}") for m in METRICS])
        page.text(f"{test_set}: {column} for each λ* (world units; 0.126 equals the reference's 500).")
        page.table(cells)
        page.figure(figures.sensitivity_figure(points), f"{test_set}: refinement against λ* (paper Figs. 8, 15).")


def build_report(evaluations: Sequence[str | Path], out_dir: str | Path, sensitivity: Sequence[str | Path] = (),
                 reference: str = "Refine", title: str = "atlasreg evaluation report",
                 n_boot: int = 10000, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a report folder (:mod:`atlasreg.contracts`) into out_dir from evaluation folders of
    `atlasreg evaluate`: the self-contained HTML page, the Markdown and its figures (the figure folder
    replaced as a whole), then the report information naming the folders. Raises AtlasregError for a
    folder that is not an evaluation (or one without rows, or with metrics out of range), for two
    folders giving the same column on one test set, for n_boot < 1, or when out_dir holds a report of
    other evaluation folders and not `overwrite` (which deletes it; :func:`atlasreg.outputs.claim_output`);
    the whole report is built before anything is written, so nothing is written then. Returns (html
    path, markdown path)."""
    if not evaluations:
        raise AtlasregError("no evaluation folders given")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise AtlasregError(f"--bootstrap: expected an integer >= 1 (bootstrap repetitions), got {n_boot!r}")
    with warnings.catch_warnings():  # means of all-NaN columns (e.g. HD of empty outputs) are shown as '–'
        warnings.simplefilter("ignore", RuntimeWarning)
        return _build(evaluations, out_dir, sensitivity, reference, title, n_boot, overwrite)


def _build(evaluations, out_dir, sensitivity, reference, title, n_boot, overwrite) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    identity = {"evaluations": [str(Path(e).resolve()) for e in evaluations],
                "sensitivity": [str(Path(e).resolve()) for e in sensitivity]}
    evs = [load_evaluation(p) for p in evaluations]
    sensitivity = _sensitivity_evaluations(sensitivity)
    table = collect(evs)
    page = _Page()
    page.text(f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} from "
              f"{len(evs)} evaluation folder(s): " + "; ".join(
                  f"{e.path} ({e.info.get('model', '?')}, {e.test_set}, {len({r['case'] for r in e.rows})} cases)"
                  for e in evs))
    page.text("Cells: mean ± standard deviation over cases. Bold: best and second best; underlined: best. "
              "Superscript * (†): the best (second best) column is significantly better than this one, "
              f"one-sided paired bootstrap of the mean difference, {n_boot} repetitions, 98% interval, "
              "1% level (paper Sec. 3). Distances in world units of the references (pixels for PNG).")
    for test_set in table.test_sets():
        page.heading(f"Test set: {test_set}")
        claims = claims_table(table, test_set, n_boot)
        if len(claims) > 1:
            page.heading("The paper's claims on this test set", 3)
            page.text("Per metric: mean difference, positive when the first column is better (DSC higher, "
                      "distances lower), and the one-sided paired bootstrap p-value; bold = significant at 1%.")
            page.table(claims)
        page.heading("Segmentation accuracy (paper Tables 1, 2, 7)", 3)
        page.table(metric_table(table, test_set, n_boot))
        page.heading("Topology, transform regularity and inverse consistency (paper Table 6)", 3)
        page.table(topology_table(table, test_set))
        if reference in table.columns[test_set]:
            page.heading(f"Paired comparisons: {reference} against every other column", 3)
            page.table(comparison_table(table, test_set, reference, n_boot))
            for x in ("ITN", "U-Net"):
                if x in table.columns[test_set]:
                    page.figure(figures.scatter_figure(table, test_set, x, reference),
                                f"{test_set}: per-case DSC, {reference} against {x} (paper Fig. 12).")
                    break
            _qualitative(page, table, test_set, reference)
            ev = table.source[(test_set, reference)]
            _quality(page, ev)
        page.heading("Every pair of methods: one-sided paired bootstrap p-values", 3)
        for structure in table.values[test_set]:
            for metric in METRICS:
                page.text(f"{structure}, {METRIC_TITLES[metric]}: p that the row method is better than the "
                          "column method; bold = significant at 1%.")
                page.table(pairwise_table(table, test_set, structure, metric, n_boot))
    page.heading("Metrics per method and test set (paper Fig. 8)")
    page.figure(figures.bar_figure(table), "Mean ± std of DSC, HD95 and ASD per column, structures pooled.")
    _sensitivity(page, sensitivity, reference)
    main = next((table.source[k] for k in table.source if k[1] == reference), evs[0])
    checkpoint = main.info.get("checkpoint")
    if checkpoint:
        png = figures.atlas_figure(Path(checkpoint).parent)
        if png is not None:
            page.heading("The atlas at the start and end of training (paper Fig. 9)")
            page.figure(png, "Atlas image and foreground probability of the atlas labelmap.")
    body = "\n".join(page.html)
    html_text = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                 f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")
    owned = [out_dir / n for n in (REPORT_HTML, REPORT_MD, FIGURE_DIR) if (out_dir / n).exists()]
    claim_output(out_dir, out_dir / REPORT_INFO, read_report_info(out_dir), identity, owned, "a report", overwrite)
    with atomic_directory(out_dir / FIGURE_DIR) as tmp:  # no figure of an earlier report survives
        for name, png in page.figures.items():
            (tmp / name).write_bytes(png)
    html_path = write_text(out_dir / REPORT_HTML, html_text)
    md_path = write_text(out_dir / REPORT_MD, f"# {title}\n\n" + "\n".join(page.md))
    write_report_info(out_dir, identity["evaluations"], identity["sensitivity"])
    return Path(html_path), Path(md_path)
