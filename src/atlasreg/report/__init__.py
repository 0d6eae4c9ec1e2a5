"""`atlasreg report`: evaluation folders -> one self-contained HTML page (figures embedded, opens
offline) and the same tables as Markdown (figures as PNG files beside it).

Contents: a table of contents linking to every heading (each has an ``id``; the Markdown has the same
anchors and contents); the provenance (generation time, software versions, and per evaluation folder
its checkpoint and SHA-256, the training run's configuration, the refinement settings, predictions and
references); the columns (every output the evaluations hold, with what it is, and the outputs a
method hides, with why). Per test set (paper Sec. 3): the paper's claims; accuracy table in the layout
of Tables 1, 2 and 7 with significance marks; topology, Jacobian and inverse-consistency table (Table
6); paired comparisons of one column (default 'Refine') against every other; ITN-vs-refine scatter
(Fig. 12); qualitative panels for the best, median and worst case (Figs. 6-7; three orthogonal planes
of a 3-D case); the quality-control ranking; a per-case table (sortable by any column in the HTML page,
by a few lines of inline script, no framework); every pair of methods. Across test sets: metric bars
(Fig. 8), the lambda* sensitivity study (Figs. 8, 15) and the atlas at the start and end of training
(Fig. 9). Every p-value says which direction it tests and is '< 1/n_boot' (e.g. '< 1e-4') where no
bootstrap sample disagrees (:func:`atlasreg.report.tables.format_p`).
"""

from __future__ import annotations

import base64
import datetime
import html
import math
import platform
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from ..contracts import (EVALUATION_INFO, FIGURE_DIR, METRICS_PER_CASE, REPORT_HTML, REPORT_INFO, REPORT_MD,
                         RUN_CONFIG, read_report_info, read_run_config, write_report_info)
from ..data.io import atomic_directory, write_text
from ..outputs import claim_output
from ..errors import AtlasregError
from ..evaluation.quality import ranking_quality
from . import figures
from .results import (METRIC_TITLES, METRICS, OUTPUT_DESCRIPTIONS, Evaluation, ResultTable, collect, column_name,
                      load_evaluation)
from .tables import (Cell, claims_table, comparison_table, format_p, metric_table, pairwise_table, to_html,
                     to_markdown, topology_table)

CSS = """body{font-family:sans-serif;max-width:1500px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.85em}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f0f0f0}
td:first-child,td:nth-child(2){text-align:left}img{max-width:100%}h2{border-bottom:1px solid #ccc}
.note{color:#555;font-size:0.9em}a.back{font-size:0.6em;font-weight:normal;margin-left:0.5em}
nav ul{margin:0.2em 0}nav li{margin:0.1em 0}
table.text td,table.text th{text-align:left}table.provenance td,table.provenance th{text-align:left;overflow-wrap:anywhere}
.scroll{max-height:36em;overflow:auto;margin-bottom:1.5em}.scroll table{margin:0}
.scroll thead th{position:sticky;top:0}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2"}
table.sortable th[aria-sort=descending]::after{content:" \\25BC"}"""

#: Sorts a ``table.sortable`` by a column when its header is clicked (or Enter pressed on it); again:
#: the other way. A cell's ``data-value`` (a number; empty for NaN, always last) is its key where
#: given, else its text (natural order, so B9 before B10). Plain DOM, no framework.
SORT_SCRIPT = """(function () {
  function key(row, col) {
    var cell = row.cells[col], value = cell.getAttribute("data-value");
    if (value === null) return cell.textContent;
    return value === "" ? NaN : parseFloat(value);
  }
  function compare(x, y) {
    if (typeof x === "number" && typeof y === "number") {
      if (isNaN(x) || isNaN(y)) return isNaN(x) - isNaN(y);
      return x - y;
    }
    return String(x).localeCompare(String(y), undefined, {numeric: true});
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      th.tabIndex = 0;
      th.title = "sort by this column";
      function sort() {
        var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a, col), y = key(b, col);
          var nan = (typeof x === "number" && isNaN(x)) - (typeof y === "number" && isNaN(y));
          return nan || dir * compare(x, y);
        });
        rows.forEach(function (row) { body.appendChild(row); });
      }
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (event) { if (event.key === "Enter") sort(); });
    });
  });
})();"""


def _slug(text: str) -> str:
    """An HTML id from a heading's text: lower case, runs of other characters than letters and digits
    as one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


class _Page:
    """Collects the report as parallel HTML and Markdown fragments; figures go to both (kept as PNG
    bytes in `figures` until the report is written). Every heading gets a unique ``id`` (and a Markdown
    anchor of the same name) and an entry in the table of contents."""

    def __init__(self):
        self.html: list[str] = []
        self.md: list[str] = []
        self.figures: dict[str, bytes] = {}
        self.headings: list[tuple[int, str, str]] = []   # (level, text, id)

    def heading(self, text: str, level: int = 2, anchor: str | None = None) -> str:
        """Add a heading; anchor: its id (made unique; default from the text). Returns the id."""
        base = _slug(anchor or text)
        taken = {h[2] for h in self.headings} | {"contents", "top"}
        ident, k = base, 2
        while ident in taken:
            ident, k = f"{base}-{k}", k + 1
        self.headings.append((level, text, ident))
        back = " <a class='back' href='#contents' title='back to the contents'>contents</a>" if level == 2 else ""
        self.html.append(f"<h{level} id='{ident}'>{html.escape(text)}{back}</h{level}>")
        self.md.append(f"<a id=\"{ident}\"></a>\n\n{'#' * level} {text}\n")
        return ident

    def text(self, text: str) -> None:
        self.html.append(f"<p class='note'>{html.escape(text)}</p>")
        self.md.append(text + "\n")

    def table(self, rows: list[list[Cell]], css_class: str | None = None, scroll: bool = False) -> None:
        """Add a table (nothing for a header alone); css_class: e.g. 'sortable'; scroll: in a box of
        limited height whose header row stays in view (HTML)."""
        if len(rows) < 2:
            return
        table = to_html(rows, css_class)
        self.html.append(f"<div class='scroll'>{table}</div>" if scroll else table)
        self.md.append(to_markdown(rows) + "\n")

    def contents(self) -> tuple[str, str]:
        """The table of contents as HTML (a ``nav`` with id 'contents') and Markdown (under an anchor
        'contents'): nested lists of links to the headings, by level."""
        top = min((h[0] for h in self.headings), default=2)
        parts, md, depth = ["<nav id='contents'><h2>Contents</h2>"], ['<a id="contents"></a>\n\n## Contents\n'], 0
        for level, text, ident in self.headings:
            level = level - top + 1
            if level > depth:
                parts.append("<ul>" * (level - depth))
            else:
                parts.append("</li>" + "</ul></li>" * (depth - level))
            depth = level
            parts.append(f"<li><a href='#{ident}'>{html.escape(text)}</a>")
            md.append(f"{'  ' * (level - 1)}- [{text}](#{ident})")
        if depth:
            parts.append("</li>" + "</ul></li>" * (depth - 1) + "</ul>")
        parts.append("</nav>")
        return "\n".join(parts), "\n".join(md) + "\n"

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


def _run_dir(checkpoint: str | Path) -> Path:
    """The training run folder of a checkpoint (:func:`atlasreg.contracts.run_paths`): the folder
    holding it, or the one above for a checkpoint inside the run's checkpoint folder (the last epoch's)."""
    run_dir = Path(checkpoint).parent
    if not (run_dir / RUN_CONFIG).is_file() and (run_dir.parent / RUN_CONFIG).is_file():
        run_dir = run_dir.parent
    return run_dir


def _declared_spacing(info: dict) -> list[float] | None:
    """``data.spacing`` (ITK order, mm; for files that store no spacing) of the training run whose
    checkpoint an evaluation names (the run folder holding it, :func:`atlasreg.contracts.run_paths`), or
    None without a checkpoint, a run configuration or a declared spacing. AtlasregError naming the run
    configuration when the spacing is not a list of positive numbers."""
    checkpoint = info.get("checkpoint")
    if not checkpoint:
        return None
    run_dir = _run_dir(checkpoint)
    data = read_run_config(run_dir).get("data")
    spacing = data.get("spacing") if isinstance(data, dict) else None
    if spacing is None:
        return None
    if not (isinstance(spacing, list) and spacing and all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in spacing)):
        raise AtlasregError(f"data.spacing = {spacing!r} is not a list of positive numbers", run_dir / RUN_CONFIG)
    return [float(s) for s in spacing]


# --------------------------------------------------------------------------------------------------
# provenance and columns


def software_versions() -> dict[str, str]:
    """The versions of the software that made the report: atlasreg, torch, SimpleITK, numpy,
    matplotlib and Python (``platform.python_version``)."""
    import matplotlib
    import SimpleITK
    import torch

    from .. import __version__

    return {"atlasreg": __version__, "torch": str(torch.__version__), "SimpleITK": SimpleITK.Version.VersionString(),
            "numpy": np.__version__, "matplotlib": matplotlib.__version__, "Python": platform.python_version()}


def evaluation_provenance(ev: Evaluation) -> dict:
    """Where one evaluation folder's numbers come from, from its info (:data:`EVALUATION_INFO`, as
    ``atlasreg evaluate`` writes it) and its rows: ``folder``, ``test_set``, ``model`` and ``method``,
    ``predictions`` (the segmentation run folder), ``references`` (number of reference files named) and
    ``cases`` (cases evaluated), ``checkpoint``, ``checkpoint_sha256`` (None when not recorded),
    ``config`` (the training run's configuration file beside the checkpoint, None when absent) and
    ``refinement`` (the settings the segmentation used; None when not recorded). YAML-safe values."""
    info = ev.info
    checkpoint = info.get("checkpoint")
    config = _run_dir(checkpoint) / RUN_CONFIG if checkpoint else None
    references = info.get("references")
    refinement = info.get("refinement")
    return {"folder": str(ev.path.resolve()), "test_set": ev.test_set, "model": info.get("model"),
            "method": info.get("method"), "predictions": info.get("predictions"),
            "references": len(references) if isinstance(references, dict) else None,
            "cases": len({r["case"] for r in ev.rows}),
            "checkpoint": str(checkpoint) if checkpoint else None,
            "checkpoint_sha256": info.get("checkpoint_sha256"),
            "config": str(config) if config is not None and config.is_file() else None,
            "refinement": dict(refinement) if isinstance(refinement, dict) else None}


def _provenance(page: _Page, evs: Sequence[Evaluation], sensitivity: Sequence[tuple[float, Evaluation]],
                n_boot: int, generated: str) -> dict:
    """The provenance section; returns what it shows (for :data:`REPORT_INFO`)."""
    software = software_versions()
    records = [(ev.path.name, evaluation_provenance(ev)) for ev in evs]
    records += [(f"{ev.path.name} (sensitivity)", evaluation_provenance(ev)) for _, ev in sensitivity]
    page.heading("Provenance")
    page.text(f"Generated {generated} by atlasreg {software['atlasreg']} (" +
              ", ".join(f"{k} {v}" for k, v in software.items() if k != "atlasreg") +
              f"); paired bootstrap with {n_boot} repetitions.")

    def text(value) -> str:
        if value is None:
            return "– (not recorded)"
        if isinstance(value, dict):
            return ", ".join(f"{k} = {v}" for k, v in value.items()) or "–"
        return str(value)

    fields = (("Evaluation folder", "folder"), ("Test set", "test_set"), ("Model", "model"),
              ("Method", "method"), ("Predictions (segmentation run)", "predictions"),
              ("References named", "references"), ("Cases evaluated", "cases"), ("Checkpoint", "checkpoint"),
              ("Checkpoint SHA-256", "checkpoint_sha256"), ("Training configuration", "config"),
              ("Refinement settings", "refinement"))
    rows = [[Cell("", header=True)] + [Cell(name, header=True) for name, _ in records]]
    rows += [[Cell(title)] + [Cell(text(record[key])) for _, record in records] for title, key in fields]
    page.table(rows, css_class="provenance")
    return {"generated": generated, "software": software, "n_boot": n_boot,
            "evaluations": [record for _, record in records]}


def _columns(page: _Page, table: ResultTable, n_boot: int) -> None:
    """The columns section: each column with its test set, output, meaning and evaluation folder, the
    outputs not shown with why, and how to read the tables."""
    page.heading("Columns and how to read the tables")
    rows = [[Cell(h, header=True) for h in ("Column", "Test set", "Output", "What it is", "Evaluation folder")]]
    for test_set in table.test_sets():
        for column in table.columns[test_set]:
            output = table.outputs[(test_set, column)]
            rows.append([Cell(column), Cell(test_set), Cell(output), Cell(OUTPUT_DESCRIPTIONS.get(output, output)),
                         Cell(str(table.source[(test_set, column)].path))])
    page.table(rows, css_class="text")
    if table.hidden:
        page.text("Outputs evaluated but not shown:")
        rows = [[Cell(h, header=True) for h in ("Evaluation folder", "Output", "Why it is not shown")]]
        rows += [[Cell(str(ev.path)), Cell(output), Cell(reason)] for ev, output, reason in table.hidden]
        page.table(rows, css_class="text")
    page.text("Cells: mean ± standard deviation over cases. Bold: best and second best; underlined: best. "
              "Superscript * (†): the best (second best) column is significantly better than this one, "
              f"one-sided paired bootstrap of the mean difference, {n_boot} repetitions, 98% interval, "
              f"1% level (paper Sec. 3). Each p-value names the direction it tests; '{format_p(0.0, n_boot)}' "
              "where none of the bootstrap samples disagrees. Distances in world units of the references "
              "(pixels for PNG).")


# --------------------------------------------------------------------------------------------------
# per test set


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
    if png is None:
        return
    page.heading(f"Best, median and worst case ({column} DSC)", 3, anchor=f"{test_set}-cases")
    page.figure(png, f"{test_set}: image; ITN, 1-pass and refine contours (orange) with the reference "
                     "(sky blue); deformed atlas grid after refinement (yellow); 3-D cases in three orthogonal "
                     "planes through the reference's centre (paper Figs. 6-7).")


def _quality(page: _Page, ev: Evaluation) -> None:
    rows = ev.quality
    if not rows:
        return
    score = np.array([float(r["qc_score"]) for r in rows])
    error = 1.0 - np.array([float(r["refine_dice"]) for r in rows])
    res = ranking_quality(score, error)
    page.heading("Quality control", 3, anchor=f"{ev.test_set}-quality")
    page.text(f"Quality control ({ev.test_set}): score = 1 - DSC(ITN, refine), computed without reference. "
              f"Spearman correlation with the true refine error (1 - DSC): {res['spearman']:.2f}; "
              f"of the {res['k']} truly worst cases, {res['recall'] * 100:.0f}% are among the {res['k']} "
              "flagged ones.")
    flagged = sorted((r for r in rows if r["flagged"]), key=lambda r: -float(r["qc_score"]))
    cells = [[Cell(h, header=True) for h in ("Flagged case", "QC score", "ITN outside refine", "Refine DSC")]]
    cells += [[Cell(r["case"]), Cell(f"{float(r['qc_score']):.3f}"), Cell(f"{float(r['itn_outside_refine']):.3f}"),
               Cell(f"{float(r['refine_dice']):.3f}")] for r in flagged]
    page.table(cells)


def per_case_table(table: ResultTable, test_set: str, quality: Sequence[dict] = ()) -> list[list[Cell]]:
    """One row per case and structure of a test set: the DSC of every column, then the HD95 of every
    column (world units of the references), then, given the quality-control rows of the compared
    column's evaluation, its QC score and whether the case is flagged. Cells carry their number
    (`Cell.value`; NaN for a structure empty in the output or the reference, shown as '–') so the
    HTML page can sort by any column. Cases in natural order (B9 before B10)."""
    cols = table.columns[test_set]
    qc = {r["case"]: r for r in quality}
    head = ["Case", "Structure"] + [f"{c} DSC" for c in cols] + [f"{c} HD95" for c in cols]
    head += ["QC score", "Flagged"] if qc else []
    rows = [[Cell(h, header=True) for h in head]]
    per_structure = table.values[test_set]
    cases = {case for per_col in per_structure.values() for col in per_col.values() for case in col["dice"]}

    def natural(case: str) -> list:
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", case)]

    def number(value: float | None, digits: int) -> Cell:
        if value is None or math.isnan(value):
            return Cell("–", value=math.nan)
        return Cell(f"{value:.{digits}f}", value=float(value))

    for case in sorted(cases, key=natural):
        for structure, per_col in per_structure.items():
            row = [Cell(case), Cell(structure)]
            row += [number(per_col[c]["dice"].get(case) if c in per_col else None, 3) for c in cols]
            row += [number(per_col[c]["hd95"].get(case) if c in per_col else None, 2) for c in cols]
            if qc:
                q = qc.get(case)
                row += [number(float(q["qc_score"]) if q else None, 3),
                        Cell(("yes" if q["flagged"] else "no") if q else "–")]
            rows.append(row)
    return rows


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
    page.heading("Sensitivity to the refinement regularisation weight λ*", anchor="sensitivity")
    for test_set, points in by_set.items():
        cells = [[Cell(h, header=True) for h in ("λ*", "DSC ↑", "HD ↓", "HD95 ↓", "ASD ↓")]]
        for lam, st in sorted(points, key=lambda p: p[0]):
            cells.append([Cell(f"{lam:g}")] + [Cell(f"{st[m][0]:.3f} ± {st[m][1]:.3f}") for m in METRICS])
        page.text(f"{test_set}: {column} for each λ* (world units; 0.126 equals the reference's 500).")
        page.table(cells)
        page.figure(figures.sensitivity_figure(points), f"{test_set}: refinement against λ* (paper Figs. 8, 15).")


def _test_set(page: _Page, table: ResultTable, test_set: str, reference: str, n_boot: int) -> None:
    """The sections of one test set."""
    page.heading(f"Test set: {test_set}", anchor=f"test-set-{test_set}")
    claims = claims_table(table, test_set, n_boot)
    if len(claims) > 1:
        page.heading("The paper's claims on this test set", 3, anchor=f"{test_set}-claims")
        page.text("Per metric: mean difference, positive when the first column is better (DSC higher, "
                  "distances lower), and the one-sided paired bootstrap p-value of the direction the cell "
                  "names (that the first column is better; for 'worse', that the second one is); bold = "
                  "significant at 1%.")
        page.table(claims, css_class="text")
    page.heading("Segmentation accuracy (paper Tables 1, 2, 7)", 3, anchor=f"{test_set}-accuracy")
    page.table(metric_table(table, test_set, n_boot))
    page.heading("Topology, transform regularity and inverse consistency (paper Table 6)", 3,
                 anchor=f"{test_set}-topology")
    page.table(topology_table(table, test_set))
    quality: list[dict] = []
    if reference in table.columns[test_set]:
        page.heading(f"Paired comparisons: {reference} against every other column", 3,
                     anchor=f"{test_set}-comparisons")
        page.text(f"p: one-sided paired bootstrap p-value that {reference} is better than the column 'vs'.")
        page.table(comparison_table(table, test_set, reference, n_boot))
        for x in ("ITN", "U-Net"):
            if x in table.columns[test_set]:
                page.figure(figures.scatter_figure(table, test_set, x, reference),
                            f"{test_set}: per-case DSC, {reference} against {x} (paper Fig. 12).")
                break
        _qualitative(page, table, test_set, reference)
        ev = table.source[(test_set, reference)]
        _quality(page, ev)
        quality = ev.quality
    page.heading("Per case", 3, anchor=f"{test_set}-per-case")
    page.text("DSC and HD95 of every column per case and structure" +
              (f", and the quality-control score of {reference}" if quality else "") +
              "; click a column's header to sort by it (again: the other way). All metrics per case: the "
              f"evaluation folders' {METRICS_PER_CASE}.")
    page.table(per_case_table(table, test_set, quality), css_class="sortable", scroll=True)
    page.heading("Every pair of methods: one-sided paired bootstrap p-values", 3, anchor=f"{test_set}-pairs")
    for structure in table.values[test_set]:
        for metric in METRICS:
            page.text(f"{structure}, {METRIC_TITLES[metric]}: p that the row method is better than the "
                      "column method; bold = significant at 1%.")
            page.table(pairwise_table(table, test_set, structure, metric, n_boot))


def build_report(evaluations: Sequence[str | Path], out_dir: str | Path, sensitivity: Sequence[str | Path] = (),
                 reference: str = "Refine", title: str = "atlasreg evaluation report",
                 n_boot: int = 10000, overwrite: bool = False, progress: bool = False) -> tuple[Path, Path]:
    """Write a report folder (:mod:`atlasreg.contracts`) into out_dir from evaluation folders of
    `atlasreg evaluate`: the self-contained HTML page, the Markdown and its figures (the figure folder
    replaced as a whole), then the report information naming the folders, with the provenance. Raises
    AtlasregError for a folder that is not an evaluation (or one without rows, or with metrics out of
    range), for two folders giving the same column on one test set, for n_boot < 1, or when out_dir
    holds a report of other evaluation folders and not `overwrite` (which deletes it;
    :func:`atlasreg.outputs.claim_output`); the whole report is built before anything is written, so
    nothing is written then. progress: a bar on stderr, one step per evaluation folder read, test set
    and figure section built, when stderr is a terminal (tqdm; cleared at the end). Returns (html path,
    markdown path)."""
    if not evaluations:
        raise AtlasregError("no evaluation folders given")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise AtlasregError(f"--bootstrap: expected an integer >= 1 (bootstrap repetitions), got {n_boot!r}")
    with warnings.catch_warnings():  # means of all-NaN columns (e.g. HD of empty outputs) are shown as '–'
        warnings.simplefilter("ignore", RuntimeWarning)
        with tqdm(total=len(evaluations) + 1, desc="report", unit="step", leave=False,
                  disable=None if progress else True) as bar:
            return _build(evaluations, out_dir, sensitivity, reference, title, n_boot, overwrite, bar)


def _build(evaluations, out_dir, sensitivity, reference, title, n_boot, overwrite, bar) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    identity = {"evaluations": [str(Path(e).resolve()) for e in evaluations],
                "sensitivity": [str(Path(e).resolve()) for e in sensitivity]}
    evs = [load_evaluation(p) for p in evaluations]
    sensitivity = _sensitivity_evaluations(sensitivity)
    table = collect(evs)
    page = _Page()
    generated = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    provenance = _provenance(page, evs, sensitivity, n_boot, generated)
    _columns(page, table, n_boot)
    bar.reset(total=len(evaluations) + len(table.test_sets()) + 1)
    bar.update(len(evaluations))
    for test_set in table.test_sets():
        _test_set(page, table, test_set, reference, n_boot)
        bar.update()
    page.heading("Metrics per method and test set (paper Fig. 8)", anchor="metrics")
    page.figure(figures.bar_figure(table), "Mean ± std of DSC, HD95 and ASD per column, structures pooled.")
    _sensitivity(page, sensitivity, reference)
    bar.update()
    main = next((table.source[k] for k in table.source if k[1] == reference), evs[0])
    checkpoint = main.info.get("checkpoint")
    if checkpoint:
        png = figures.atlas_figure(Path(checkpoint).parent)
        if png is not None:
            page.heading("The atlas at the start and end of training (paper Fig. 9)", anchor="atlas")
            page.figure(png, "Atlas image and foreground probability of the atlas labelmap.")
    contents_html, contents_md = page.contents()
    body = "\n".join(page.html)
    html_text = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
                 f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
                 f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
                 f"<h1 id='top'>{html.escape(title)}</h1>\n{contents_html}\n{body}\n"
                 f"<script>\n{SORT_SCRIPT}\n</script>\n</body></html>\n")
    md_text = f"# {title}\n\n{contents_md}\n" + "\n".join(page.md)
    owned = [out_dir / n for n in (REPORT_HTML, REPORT_MD, FIGURE_DIR) if (out_dir / n).exists()]
    claim_output(out_dir, out_dir / REPORT_INFO, read_report_info(out_dir), identity, owned, "a report", overwrite)
    with atomic_directory(out_dir / FIGURE_DIR) as tmp:  # no figure of an earlier report survives
        for name, png in page.figures.items():
            (tmp / name).write_bytes(png)
    html_path = write_text(out_dir / REPORT_HTML, html_text)
    md_path = write_text(out_dir / REPORT_MD, md_text)
    write_report_info(out_dir, identity["evaluations"], identity["sensitivity"], provenance)
    return Path(html_path), Path(md_path)
