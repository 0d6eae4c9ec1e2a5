"""Loading evaluation folders (written by ``atlasreg evaluate``) into one long table of per-case results,
with the column (method) names the paper uses.

An evaluation folder (:mod:`atlasreg.contracts`, which reads it) holds the per-case metrics and the
info (model name, model method, STN variant, fixed atlas, L_s weight, test set, label), and optionally
the transform metrics per case and the quality control. Each (folder, output) pair becomes one
*column* of the report, e.g. the
Atlas-ISTN folder gives 'ITN', '1-pass', 'Refine' and 'Id'; a U-Net folder 'U-Net', 'U-Net_lcc' and,
with a fixed atlas, 'Independent'; a VML folder 'VML'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..contracts import read_evaluation_info, read_metrics_per_case, read_quality_control, read_transforms_per_case
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


def load_evaluation(path: str | Path) -> Evaluation:
    """Read an evaluation folder (:mod:`atlasreg.contracts`). Raises AtlasregError naming the folder if
    it has no per-case metrics (not an evaluation folder), or naming the file that is malformed."""
    path = Path(path)
    rows = read_metrics_per_case(path)
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
        for r in ev.rows:
            col = column_name(ev.info, r["method"])
            if col is None:
                continue
            if col not in seen_here:
                if col in cols:
                    raise AtlasregError(f"column {col!r} of test set {ts!r} comes from two evaluation "
                                        "folders; label one with `atlasreg evaluate --label`", ev.path)
                cols.append(col)
                seen_here.add(col)
                table.source[(ts, col)] = ev
            cell = table.values.setdefault(ts, {}).setdefault(r["structure"], {}).setdefault(col, {})
            for m in METRICS:
                cell.setdefault(m, {})[r["case"]] = r[m]
            topo = table.topology.setdefault(ts, {}).setdefault(col, {})
            topo.setdefault("components", []).append(r["components"])
            topo.setdefault("holes", []).append(r["holes"])
            topo.setdefault("same_topology", []).append(
                (r["components"], r["holes"]) == (r["reference_components"], r["reference_holes"]))
        for r in ev.transforms:
            col = column_name(ev.info, r["method"])
            if col is None:
                continue
            cell = table.transforms.setdefault(ts, {}).setdefault(col, {})
            for k, v in r.items():
                if k not in ("case", "method"):
                    cell.setdefault(k, {})[r["case"]] = v
    return table
