"""Loading evaluation folders (written by ``atlasreg evaluate``) into one long table of per-case results,
with the column (method) names the paper uses.

An evaluation folder (:mod:`atlasreg.contracts`, which reads it) holds the per-case metrics and the
info (model name, model method, STN variant, fixed atlas, L_s weight, test set, label), and optionally
the transform metrics per case and the quality control. Each (folder, output) pair becomes one
*column* of the report, e.g. the Atlas-ISTN folder gives 'ITN', 'ITN_lcc', '1-pass', 'Refine' and 'Id'
(the undeformed atlas: one name, after the model's label for other models: 'Fixed Id', 'U-Net Id',
'VML Id'); a U-Net folder 'U-Net', 'U-Net_lcc' and, with a fixed atlas, 'Independent'; a VML folder
'VML'. The outputs a method hides (:func:`hidden_reason`) are listed by the report with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..contracts import METRICS_PER_CASE, read_evaluation_info, read_metrics_per_case, read_quality_control, read_transforms_per_case
from ..errors import AtlasregError

METRICS = ("dice", "hd", "hd95", "asd")
HIGHER_IS_BETTER = {"dice": True, "hd": False, "hd95": False, "asd": False}
METRIC_TITLES = {"dice": "DSC ↑", "hd": "HD ↓", "hd95": "HD95 ↓", "asd": "ASD ↓"}


def _method(info: dict):
    from ..models.registry import get_method

    return get_method(str(info.get("method", "atlas_istn")))


def model_label(info: dict) -> str:
    """Short name of the trained model behind an evaluation folder ('Atlas-ISTN', 'Fixed', 'SVF',
    'Atlas-ISTN-L_s', 'U-Net', 'VML'), unless info['label'] names it; the method's registry entry
    decides (:meth:`~atlasreg.models.registry.Method.report_column`)."""
    return _method(info).report_label(info)


def column_name(info: dict, output: str) -> str | None:
    """The report column of one output of one model, or None for outputs the paper does not show
    (e.g. the meaningless 1-pass of an untrained STN, or refinement without L_s)."""
    return _method(info).report_column(info, output)


def hidden_reason(info: dict, output: str) -> str:
    """Why the report does not show `output` of a model (:func:`column_name` is None): the method's
    :meth:`~atlasreg.models.registry.Method.report_hidden`, else 'not reported by the method'."""
    return _method(info).report_hidden(info, output) or "not reported by the method"


#: What each labelmap output of a case folder is (:data:`atlasreg.contracts.LABELMAP_OUTPUTS`), for the
#: report's list of columns.
OUTPUT_DESCRIPTIONS = {
    "itn": "segmentation network (ITN / U-Net) output",
    "itn_lcc": "the ITN output with the largest connected component of each structure only",
    "onepass": "the atlas warped by the one-pass registration (paper Eq. 9)",
    "refine": "the atlas warped after test-time refinement (paper Eqs. 17-21)",
    "atlas": "the undeformed atlas (identity transform)",
}


@dataclass
class Evaluation:
    """One evaluation folder: its info and its per-case rows (metrics, transform statistics, quality
    control), typed as :mod:`atlasreg.contracts` reads them."""

    path: Path
    info: dict
    rows: list[dict]
    transforms: list[dict] = field(default_factory=list)
    quality: list[dict] = field(default_factory=list)

    @property
    def test_set(self) -> str:
        return str(self.info.get("test_set") or self.path.name)


def _check_metrics(rows: list[dict], path: Path) -> None:
    """AtlasregError naming the per-case metrics file when it has no rows or a metric out of its range
    (NaN is allowed: a structure empty in the prediction or the reference)."""
    if not rows:
        raise AtlasregError("per-case metrics file has no rows", path)
    for line, row in enumerate(rows, start=2):
        for metric in METRICS:
            value = row[metric]
            if math.isnan(value):
                continue
            ok = 0.0 <= value <= 1.0 if metric == "dice" else 0.0 <= value < math.inf
            if not ok:
                expected = "in [0, 1]" if metric == "dice" else "a finite distance >= 0"
                raise AtlasregError(f"line {line}: {metric} = {value!r} is not {expected}", path)


def load_evaluation(path: str | Path) -> Evaluation:
    """Read an evaluation folder (:mod:`atlasreg.contracts`). Raises AtlasregError naming the folder if
    it is missing or has no per-case metrics (not an evaluation folder), or naming the file that is
    malformed (also: no rows, a Dice outside [0, 1], a negative or infinite distance)."""
    path = Path(path)
    if not path.exists():
        raise AtlasregError("evaluation folder not found", path)
    if not path.is_dir():
        raise AtlasregError("is not a folder; expected an evaluation folder of `atlasreg evaluate`", path)
    rows = read_metrics_per_case(path)
    _check_metrics(rows, path / METRICS_PER_CASE)
    return Evaluation(path, read_evaluation_info(path), rows, read_transforms_per_case(path),
                      read_quality_control(path))


@dataclass
class ResultTable:
    """Per-case values, indexed [test_set][structure][column][metric] -> {case: value}, plus the
    transform statistics [test_set][column][stat] -> {case: value}, the topology rows, and for each
    column the evaluation folder it came from."""

    values: dict = field(default_factory=dict)
    transforms: dict = field(default_factory=dict)
    topology: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    columns: dict = field(default_factory=dict)   # test_set -> ordered column names
    outputs: dict = field(default_factory=dict)   # (test_set, column) -> the case-folder output it shows
    hidden: list = field(default_factory=list)    # (evaluation, output, reason) of outputs not shown

    def test_sets(self) -> list[str]:
        return list(self.columns)


def collect(evaluations: list[Evaluation]) -> ResultTable:
    """Merge evaluation folders into a ResultTable. A column name seen twice for the same test set
    raises AtlasregError (give one of the folders a label with `atlasreg evaluate --label`)."""
    table = ResultTable()
    for ev in evaluations:
        ts = ev.test_set
        cols = table.columns.setdefault(ts, [])
        seen_here: set[str] = set()
        hidden: dict[str, str] = {}
        for r in ev.rows:
            col = column_name(ev.info, r["method"])
            if col is None:
                hidden.setdefault(r["method"], hidden_reason(ev.info, r["method"]))
                continue
            if col not in seen_here:
                if col in cols:
                    raise AtlasregError(f"column {col!r} of test set {ts!r} comes from two evaluation "
                                        "folders; label one with `atlasreg evaluate --label`", ev.path)
                cols.append(col)
                seen_here.add(col)
                table.source[(ts, col)] = ev
                table.outputs[(ts, col)] = r["method"]
            cell = table.values.setdefault(ts, {}).setdefault(r["structure"], {}).setdefault(col, {})
            for m in METRICS:
                cell.setdefault(m, {})[r["case"]] = r[m]
            topo = table.topology.setdefault(ts, {}).setdefault(col, {})
            topo.setdefault("components", []).append(r["components"])
            topo.setdefault("holes", []).append(r["holes"])
            topo.setdefault("same_topology", []).append(
                (r["components"], r["holes"]) == (r["reference_components"], r["reference_holes"]))
        table.hidden.extend((ev, output, reason) for output, reason in hidden.items())
        for r in ev.transforms:
            col = column_name(ev.info, r["method"])
            if col is None:
                continue
            cell = table.transforms.setdefault(ts, {}).setdefault(col, {})
            for k, v in r.items():
                if k not in ("case", "method"):
                    cell.setdefault(k, {})[r["case"]] = v
    return table
