"""Report tables in the layout of the paper's Tables 1, 2 and 7 (metrics as rows, methods as columns,
mean ± std, best bold and underlined, second best bold, significance marks), the topology and
transform-regularity table, and the paired comparisons of one method against all others.

A table is a list of rows of :class:`Cell`; :func:`to_markdown` and :func:`to_html` render it.
Significance: the one-sided paired bootstrap of the mean difference (10,000 repetitions, 98%
interval, 1% level; :func:`atlasreg.evaluation.statistics.paired_bootstrap`), as in the paper. Every
p-value is written by :func:`format_p`: '< 1e-4' (for 10,000 repetitions) where no bootstrap sample
disagrees, and each says which direction it tests.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import numpy as np

from ..evaluation.statistics import nan_mean_std, paired_bootstrap
from .results import HIGHER_IS_BETTER, METRIC_TITLES, METRICS, ResultTable


@dataclass
class Cell:
    """One table cell: its text (``<sup>`` marks kept as markup in HTML, everything else escaped), its
    emphasis, whether it is a header cell, and `value`, the number a sortable table sorts it by (None:
    by its text)."""

    text: str
    bold: bool = False
    underline: bool = False
    header: bool = False
    value: float | None = None


def format_p(p: float, n_boot: int) -> str:
    """A bootstrap p-value as text: '< 1/n_boot' when no bootstrap sample disagrees (p = 0; e.g.
    '< 1e-4' for 10,000 repetitions, '< 0.002' for 500), else p with three decimals ('0.012'), or in
    scientific notation below 0.001 ('4e-4'). p: the fraction of the n_boot bootstrap means <= 0
    (:func:`atlasreg.evaluation.statistics.paired_bootstrap`), in [0, 1]."""
    if p <= 0.0:
        return f"< {_short(1.0 / n_boot)}"
    return f"{p:.3f}" if p >= 0.001 else _short(p)


def _short(x: float) -> str:
    """A positive number with at most two significant digits, as '1e-4', '2.5e-4' or '0.002'."""
    if x >= 0.001:
        return f"{x:.2g}"
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _paired(a: dict, b: dict) -> tuple[np.ndarray, np.ndarray]:
    cases = sorted(set(a) & set(b))
    return np.array([a[c] for c in cases], float), np.array([b[c] for c in cases], float)


def significantly_better(a: dict, b: dict, metric: str, n_boot: int, alpha: float = 0.01) -> dict | None:
    """Paired bootstrap that per-case values `a` beat `b` ({case: value}); None if < 2 pairs."""
    x, y = _paired(a, b)
    if np.sum(~(np.isnan(x) | np.isnan(y))) < 2:
        return None
    return paired_bootstrap(x, y, n_boot=n_boot, alpha=alpha, higher_is_better=HIGHER_IS_BETTER[metric])


def metric_table(table: ResultTable, test_set: str, n_boot: int = 10000, digits: dict | None = None) -> list[list[Cell]]:
    """Paper Tables 1/2/7 for one test set: a row per (structure, metric), a column per method.
    Superscript * (†): the best (second best) column is significantly better than this one (p < 0.01)."""
    digits = digits or {"dice": 3, "hd": 2, "hd95": 2, "asd": 2}
    cols = table.columns[test_set]
    rows = [[Cell("Structure", header=True), Cell("Metric", header=True)] + [Cell(c, header=True) for c in cols]]
    for structure, per_col in table.values[test_set].items():
        for metric in METRICS:
            stats = {c: nan_mean_std(per_col[c][metric].values()) if c in per_col else (math.nan, math.nan) for c in cols}
            sign = 1 if HIGHER_IS_BETTER[metric] else -1
            ranked = sorted((c for c in cols if not math.isnan(stats[c][0])), key=lambda c: -sign * stats[c][0])
            best = ranked[0] if ranked else None
            second = ranked[1] if len(ranked) > 1 else None
            row = [Cell(structure), Cell(METRIC_TITLES[metric])]
            for c in cols:
                mean, std = stats[c]
                if math.isnan(mean):
                    row.append(Cell("–"))
                    continue
                marks = ""
                for top, mark in ((best, "*"), (second, "†")):
                    if top is not None and top != c:
                        res = significantly_better(per_col[top][metric], per_col[c][metric], metric, n_boot)
                        if res is not None and res["significant"]:
                            marks += mark
                d = digits[metric]
                text = f"{mean:.{d}f} ± {std:.{d}f}" + (f"<sup>{marks}</sup>" if marks else "")
                row.append(Cell(text, bold=c in (best, second), underline=c == best))
            rows.append(row)
    return rows


def topology_table(table: ResultTable, test_set: str) -> list[list[Cell]]:
    """Per method: mean components, fraction with one component, mean holes, fraction with the
    reference's topology (all structures pooled); and for methods with a transform: fraction of
    non-positive Jacobian determinants, std of log det J, MICE (voxels, mm) and IC-DSC (Table 6)."""
    head = ["Method", "Components", "1 comp.", "Holes", "Topology = ref.", "det J ≤ 0", "std log det J",
            "MICE (voxels)", "MICE (mm)", "IC-DSC"]
    rows = [[Cell(h, header=True) for h in head]]
    transforms = table.transforms.get(test_set, {})
    for col in table.columns[test_set]:
        topo = table.topology[test_set].get(col)
        if not topo:
            continue
        comps = np.array(topo["components"], float)
        row = [Cell(col), Cell(f"{comps.mean():.2f}"), Cell(f"{np.mean(comps == 1):.2f}"),
               Cell(f"{np.mean(topo['holes']):.2f}"), Cell(f"{np.mean(topo['same_topology']):.2f}")]
        tr = transforms.get(col)
        for key, fmt in (("nonpositive_jacobian_fraction", ".2e"), ("std_log_jacobian", ".3f"),
                         ("mice_voxels", ".3f"), ("mice_mm", ".3f"), ("ic_dsc", ".4f")):
            if tr and key in tr:
                mean, std = nan_mean_std(tr[key].values())
                row.append(Cell(f"{mean:{fmt}} ± {std:{fmt}}"))
            else:
                row.append(Cell("–"))
        rows.append(row)
    return rows


def comparison_table(table: ResultTable, test_set: str, reference: str, n_boot: int = 10000) -> list[list[Cell]]:
    """`reference` (e.g. 'Refine') against every other column: mean difference (positive = reference
    better), 98% bootstrap interval, one-sided p and significance at 1%, per structure and metric."""
    head = ["Structure", "Metric", "vs", "n", "Mean difference", "98% interval", f"p ({reference} better)",
            "Significant"]
    rows = [[Cell(h, header=True) for h in head]]
    for structure, per_col in table.values[test_set].items():
        if reference not in per_col:
            continue
        for metric in METRICS:
            for other in table.columns[test_set]:
                if other == reference or other not in per_col:
                    continue
                res = significantly_better(per_col[reference][metric], per_col[other][metric], metric, n_boot)
                if res is None:
                    continue
                rows.append([Cell(structure), Cell(METRIC_TITLES[metric]), Cell(other), Cell(str(res["n"])),
                             Cell(f"{res['mean_difference']:+.4f}"),
                             Cell(f"[{res['ci_low']:+.4f}, {res['ci_high']:+.4f}]"),
                             Cell(format_p(res["p_value"], n_boot)),
                             Cell("yes" if res["significant"] else "no", bold=res["significant"])])
    return rows


# The paper's claims as (claim, better column, worse column) pairs; a claim is shown when both columns
# are in the report (Atlas-ISTN paper Sec. 3: Tables 1-5 and 7, Figs. 8 and 12). The learnt and the
# fixed atlas are compared after refinement only: the paper claims no 1-pass advantage for the learnt
# atlas (its Table 4 has the 1-pass order SVF > Fixed > Atlas-ISTN).
CLAIMS = (
    ("Refine beats the ITN", "Refine", "ITN"),
    ("Refine beats 1-pass", "Refine", "1-pass"),
    ("Refine beats the U-Net", "Refine", "U-Net"),
    ("Refine beats U-Net_lcc", "Refine", "U-Net_lcc"),
    ("Refine beats VML", "Refine", "VML"),
    ("Refine beats Independent", "Refine", "Independent"),
    ("A learnt atlas beats a fixed one (refine)", "Refine", "Fixed Refine"),
    ("L_s helps (1-pass)", "1-pass", "Atlas-ISTN-L_s 1-pass"),
    ("Affine + SVF beats SVF only (refine)", "Refine", "SVF Refine"),
)


def claims_table(table: ResultTable, test_set: str, n_boot: int = 10000) -> list[list[Cell]]:
    """The paper's claims (:data:`CLAIMS`) checked on one test set: per claim and structure, for each
    metric the mean difference (positive = the claimed-better column is better) and whether it is
    significant either way (one-sided paired bootstrap, 1% level), with the p-value of the direction
    that cell reports, named in it (:func:`format_p`): 'p < 1e-4 that Refine is better' (significant),
    'worse: p = 0.003 that ITN is better' (the reverse test significant), 'n.s.: p = 0.410 that Refine
    is better' (neither); and a verdict: 'holds' (better on every metric), 'holds on k of 4', 'reversed'
    (worse on every metric), 'reversed on k of 4', 'not shown' (no significant difference) or 'mixed'
    (better on some, worse on others). Empty (header only) if no claim's columns are present."""
    head = ["Claim", "Structure"] + [METRIC_TITLES[m] for m in METRICS] + ["Verdict"]
    rows = [[Cell(h, header=True) for h in head]]
    cols = table.columns.get(test_set, [])
    for claim, a, b in CLAIMS:
        if a not in cols or b not in cols:
            continue
        for structure, per_col in table.values[test_set].items():
            if a not in per_col or b not in per_col:
                continue
            cells, better, worse = [], 0, 0
            for metric in METRICS:
                fwd = significantly_better(per_col[a][metric], per_col[b][metric], metric, n_boot)
                if fwd is None:
                    cells.append(Cell("–"))
                    continue
                rev = significantly_better(per_col[b][metric], per_col[a][metric], metric, n_boot)
                diff = fwd["mean_difference"]   # oriented: positive = `a` better, for every metric
                if fwd["significant"]:
                    better += 1
                    cells.append(Cell(f"{diff:+.3f} (p {_p_phrase(fwd['p_value'], n_boot)} that {a} is better)",
                                      bold=True))
                elif rev is not None and rev["significant"]:
                    worse += 1
                    cells.append(Cell(f"{diff:+.3f} (worse: p {_p_phrase(rev['p_value'], n_boot)} that {b} "
                                      "is better)"))
                else:
                    cells.append(Cell(f"{diff:+.3f} (n.s.: p {_p_phrase(fwd['p_value'], n_boot)} that {a} "
                                      "is better)"))
            n = sum(c.text != "–" for c in cells)
            if n == 0:
                continue
            if better == n:
                verdict = "holds"
            elif worse == n:
                verdict = "reversed"
            elif better and not worse:
                verdict = f"holds on {better} of {n}"
            elif worse and not better:
                verdict = f"reversed on {worse} of {n}"
            elif not better and not worse:
                verdict = "not shown"
            else:
                verdict = f"mixed ({better} better, {worse} worse)"
            rows.append([Cell(f"{claim} ({a} vs {b})"), Cell(structure), *cells,
                         Cell(verdict, bold=verdict == "holds")])
    return rows


def _p_phrase(p: float, n_boot: int) -> str:
    """'= 0.012' or '< 1e-4' (:func:`format_p`), to follow a 'p'."""
    text = format_p(p, n_boot)
    return text if text.startswith("<") else f"= {text}"


def to_markdown(rows: list[list[Cell]]) -> str:
    """A GitHub-flavoured Markdown table of `rows` (the first row is the header; bold as ``**``,
    underline as ``<u>``, ``<sup>`` marks as ``^``)."""
    def fmt(c: Cell) -> str:
        t = c.text.replace("<sup>", "^").replace("</sup>", "").replace("|", "\\|")
        if c.bold:
            t = f"**{t}**"
        if c.underline:
            t = f"<u>{t}</u>"
        return t
    out = ["| " + " | ".join(fmt(c) for c in rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows[1:]]
    return "\n".join(out)


def to_html(rows: list[list[Cell]], css_class: str | None = None) -> str:
    """An HTML table of `rows`: the first row in ``<thead>`` when it is all header cells, the others in
    ``<tbody>``; a cell with a `value` carries it as ``data-value`` (what the report's sorting script
    sorts by; NaN as an empty attribute). css_class: the table's class (e.g. 'sortable')."""
    def fmt(c: Cell) -> str:
        # Only the <sup> marks we produce are kept as markup; everything else is escaped.
        t = html.escape(c.text).replace("&lt;sup&gt;", "<sup>").replace("&lt;/sup&gt;", "</sup>")
        if c.underline:
            t = f"<u>{t}</u>"
        if c.bold:
            t = f"<b>{t}</b>"
        tag = "th" if c.header else "td"
        value = "" if c.value is None else f" data-value='{'' if math.isnan(c.value) else repr(float(c.value))}'"
        return f"<{tag}{value}>{t}</{tag}>"

    def tr(r: list[Cell]) -> str:
        return "<tr>" + "".join(fmt(c) for c in r) + "</tr>"

    head, body = (rows[:1], rows[1:]) if rows and all(c.header for c in rows[0]) else ([], rows)
    attribute = f" class='{html.escape(css_class)}'" if css_class else ""
    parts = [f"<table{attribute}>"]
    if head:
        parts.append("<thead>" + tr(head[0]) + "</thead>")
    parts.append("<tbody>\n" + "\n".join(tr(r) for r in body) + "\n</tbody>")
    return "\n".join(parts) + "\n</table>"


def pairwise_table(table: ResultTable, test_set: str, structure: str, metric: str,
                   n_boot: int = 10000) -> list[list[Cell]]:
    """Every pair of methods for one structure and metric: the cell in row a, column b is the one-sided
    bootstrap p-value that a is better than b (bold when significant at 1%); '–' on the diagonal or
    without paired cases."""
    cols = [c for c in table.columns[test_set] if c in table.values[test_set].get(structure, {})]
    per_col = table.values[test_set][structure]
    rows = [[Cell(f"{METRIC_TITLES[metric]}: row better than column?", header=True)]
            + [Cell(c, header=True) for c in cols]]
    for a in cols:
        row = [Cell(a)]
        for b in cols:
            res = None if a == b else significantly_better(per_col[a][metric], per_col[b][metric], metric, n_boot)
            row.append(Cell("–") if res is None else Cell(format_p(res["p_value"], n_boot), bold=res["significant"]))
        rows.append(row)
    return rows
