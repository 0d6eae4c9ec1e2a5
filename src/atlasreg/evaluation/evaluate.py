"""Evaluate the labelmaps written by ``atlasreg segment`` against reference labelmaps.

File contract (input, written by ``atlasreg segment``): for each case name ``<case>`` a folder
``<prediction_dir>/<case>/`` holding

- ``itn_labelmap<ext>``: the ITN (segmentation network) output,
- ``itn_lcc_labelmap<ext>``: the same with only the largest connected component per structure,
- ``onepass_labelmap<ext>``: the atlas warped by the one-pass registration,
- ``refine_labelmap<ext>``: the atlas warped after test-time refinement,
- ``atlas_labelmap<ext>``: the undeformed atlas (identity, "Id"),

where ``<ext>`` is ``.png`` or ``.nii.gz`` (the input image's extension). Voxel values are the declared
label values. A missing method file is skipped (that method has no rows for the case). The folder may
also hold ``transform_metrics.csv`` (columns :data:`TRANSFORM_METRIC_COLUMNS`, one row per transform:
``onepass``, ``refine``), gathered into ``transforms_per_case.csv``.

Output files in ``out_dir`` (each written atomically):

- ``metrics_per_case.csv``: columns ``case, method, label, structure, dice, hd, hd95, asd, components,
  holes, reference_components, reference_holes``;
  one row per case, method and evaluated foreground structure. Distances are in world units of the
  reference image (mm when its spacing is in mm); ``components`` is the number of connected components
  of the structure in the prediction (full connectivity).
- ``summary.csv``: one row per (method, structure): ``method, label, structure, n, dice_mean, dice_std,
  hd_mean, hd_std, hd95_mean, hd95_std, asd_mean, asd_std, components_mean, single_component_fraction,
  holes_mean, same_topology_fraction``
  (NaN-ignoring mean and population standard deviation over cases; ``n`` is the number of cases).
- ``summary.md``: the same numbers as a Markdown table with ``mean ± std`` cells, followed (when
  there are such rows) by a table of the transform metrics per method and a quality-control section
  (ranking quality of the QC score and the flagged cases).
- ``info.yaml``: the ``info`` mapping given to :func:`evaluate_predictions` plus ``test_set``,
  ``predictions`` (absolute path of the prediction folder), ``merge`` (null or ``{key: [values]}``),
  ``labels`` (``{value: name}``) and ``n_cases`` (cases with at least one prediction file).
- ``transforms_per_case.csv``: columns ``case, method, mice_mm, mice_voxels, ic_dsc,
  nonpositive_jacobian_fraction, std_log_jacobian``, the rows of every evaluated case's
  ``transform_metrics.csv`` (written by ``atlasreg segment``, see :mod:`atlasreg.segment`) with the case
  name prepended; header only when no case has that file. MICE in mm and in model-grid voxels and
  IC-DSC after the paper's Sec. 3.2 (Table 6); fraction of model-grid voxels with det J <= 0 and std of
  log det J of the forward transform.
- ``quality_control.csv`` (only when at least one case has both ``itn`` and ``refine`` labelmaps; an
  older one is removed otherwise): columns ``case, dice_itn_refine, itn_outside_refine, qc_score,
  refine_dice, flagged``, one row per such case, see :mod:`atlasreg.evaluation.quality`:
  ``dice_itn_refine`` is the mean over the evaluated structures of the Dice between the ITN and the
  refined labelmap (no reference used), ``itn_outside_refine`` the fraction of ITN foreground voxels
  on the refined labelmap's background, ``qc_score = 1 - dice_itn_refine`` (higher: look at this
  case), ``refine_dice`` the mean Dice of ``refine`` against the reference over the structures (to
  judge the score), ``flagged`` True for the cases with the 10 % highest scores (at least one).
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import yaml

from atlasreg.data.io import write_text
from atlasreg.errors import AtlasregError
from atlasreg.evaluation.metrics import METRIC_NAMES, labelmap_connected_components, segmentation_metrics
from atlasreg.evaluation.quality import flag_top, qc_scores, ranking_quality
from atlasreg.evaluation.statistics import nan_mean_std
from atlasreg.evaluation.topology import count_holes

__all__ = ["METHODS", "LABELMAP_EXTENSIONS", "TRANSFORM_METRIC_COLUMNS", "TRANSFORMS_PER_CASE_COLUMNS",
           "QUALITY_COLUMNS", "QC_FRACTION", "evaluate_predictions", "find_prediction",
           "read_transform_metrics"]

METHODS = ("itn", "itn_lcc", "onepass", "refine", "atlas")
LABELMAP_EXTENSIONS = (".png", ".nii.gz")
BACKGROUND = 0

PER_CASE_COLUMNS = ("case", "method", "label", "structure", "dice", "hd", "hd95", "asd", "components", "holes",
                    "reference_components", "reference_holes")
SUMMARY_COLUMNS = ("method", "label", "structure", "n",
                   "dice_mean", "dice_std", "hd_mean", "hd_std", "hd95_mean", "hd95_std",
                   "asd_mean", "asd_std", "components_mean", "single_component_fraction", "holes_mean",
                   "same_topology_fraction")
#: Columns of ``<case>/transform_metrics.csv`` written by ``atlasreg segment``.
TRANSFORM_METRIC_COLUMNS = ("method", "mice_mm", "mice_voxels", "ic_dsc", "nonpositive_jacobian_fraction",
                            "std_log_jacobian")
TRANSFORMS_PER_CASE_COLUMNS = ("case", *TRANSFORM_METRIC_COLUMNS)
QUALITY_COLUMNS = ("case", "dice_itn_refine", "itn_outside_refine", "qc_score", "refine_dice", "flagged")
#: Fraction of cases flagged by the quality control (highest qc_score), at least one case.
QC_FRACTION = 0.1


def find_prediction(case_dir: Path, method: str, prefer: str | None = None) -> Path | None:
    """``case_dir/<method>_labelmap<ext>`` for the first existing ``<ext>`` in ``LABELMAP_EXTENSIONS``
    (``prefer`` first, if given), or None if there is none."""
    extensions = list(LABELMAP_EXTENSIONS)
    if prefer in extensions:
        extensions.remove(prefer)
        extensions.insert(0, prefer)
    for ext in extensions:
        path = Path(case_dir) / f"{method}_labelmap{ext}"
        if path.is_file():
            return path
    return None


def _extension(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _read_labelmap(path: Path, kind: str):
    """Read a labelmap with SimpleITK: (int64 array in numpy order, image). AtlasregError on failure."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except Exception as error:  # SimpleITK raises RuntimeError for missing/corrupt files
        detail = str(error).strip().splitlines()
        reason = detail[-1].strip().removeprefix("sitk::ERROR:").strip() if detail else type(error).__name__
        raise AtlasregError(f"cannot read {kind} labelmap ({reason})", path) from error
    array = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        # e.g. an RGB(A) PNG: accept only if it is grey (all colour channels equal)
        channels = array[..., :3] if array.shape[-1] >= 3 else array
        if not np.all(channels == channels[..., :1]):
            raise AtlasregError(f"{kind} labelmap has {image.GetNumberOfComponentsPerPixel()} colour "
                                "channels; expected a single-channel labelmap", path)
        array = channels[..., 0]
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise AtlasregError(f"{kind} labelmap has non-integer values; expected label values", path)
    return array.astype(np.int64), image


def _apply_merge(array: np.ndarray, merge: Mapping[int, Sequence[int]]) -> np.ndarray:
    """Map each merge source value (and the key itself) to the key; every other value to background."""
    out = np.full_like(array, BACKGROUND)
    for key, sources in merge.items():
        out[np.isin(array, [int(key), *map(int, sources)])] = int(key)
    return out


def _csv_text(columns: Sequence[str], rows: Iterable[Mapping[str, object]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(float(v)) if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def _fmt(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _fmt_e(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.2e} ± {std:.2e}"


def _plain(value):
    """A YAML-safe copy: mappings and sequences recursively, paths as strings, numpy scalars as Python
    numbers, other unknown objects as their str()."""
    if isinstance(value, Mapping):
        return {(k if isinstance(k, (str, int, float, bool)) else str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def read_transform_metrics(path: str | Path) -> list[dict[str, object]]:
    """Rows of a ``transform_metrics.csv`` written by ``atlasreg segment``: ``{"method": str, <metric>:
    float, ...}`` with the metric columns of :data:`TRANSFORM_METRIC_COLUMNS` (an empty cell is NaN;
    extra columns are ignored). Raises AtlasregError naming the file if it cannot be read, lacks a
    column or holds a non-numeric value."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in TRANSFORM_METRIC_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise AtlasregError(f"transform metrics file lacks the column(s) {missing}", path)
            raw = list(reader)
    except OSError as error:
        raise AtlasregError(f"cannot read transform metrics ({error.strerror or error})", path) from error
    rows = []
    for line, record in enumerate(raw, start=2):
        row: dict[str, object] = {"method": record["method"]}
        for column in TRANSFORM_METRIC_COLUMNS[1:]:
            text = (record[column] or "").strip()
            try:
                row[column] = float(text) if text else math.nan
            except ValueError:
                raise AtlasregError(f"line {line}: {column} = {text!r} is not a number", path) from None
        rows.append(row)
    return rows


def _transform_table(rows: Sequence[Mapping[str, object]]) -> list[str]:
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    lines = [
        "",
        "## Transform metrics",
        "",
        "Mean ± standard deviation over cases (NaN-ignoring), on the model grid. MICE: masked inverse "
        "consistency error of the atlas round trip atlas -> subject -> atlas over the atlas structures "
        "(paper Sec. 3.2, Table 6), in model-grid voxels and in mm; IC-DSC: mean Dice between the atlas "
        "labelmap and its round trip; det J <= 0: fraction of grid voxels where the forward transform "
        "folds; SD log det J: standard deviation of log det J over the grid.",
        "",
        "| Method | n | MICE (voxels) | MICE (mm) | IC-DSC | det J <= 0 | SD log det J |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method in methods:
        group = [r for r in rows if r["method"] == method]
        stats = {c: nan_mean_std([float(r[c]) for r in group]) for c in TRANSFORM_METRIC_COLUMNS[1:]}
        lines.append(f"| {method} | {len(group)} | {_fmt(*stats['mice_voxels'], 4)} | "
                     f"{_fmt(*stats['mice_mm'], 4)} | {_fmt(*stats['ic_dsc'], 4)} | "
                     f"{_fmt_e(*stats['nonpositive_jacobian_fraction'])} | {_fmt(*stats['std_log_jacobian'], 3)} |")
    return lines


def _quality_section(rows: Sequence[Mapping[str, object]], ranking: Mapping[str, float]) -> list[str]:
    def num(value: float, digits: int) -> str:
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"

    lines = [
        "",
        "## Quality control",
        "",
        "QC score = 1 - mean Dice (over the structures) between the ITN and the refined labelmap; it "
        "needs no reference, higher means the case is more worth a look. Its ranking of the cases is "
        "judged against the true error 1 - refine Dice (mean over the structures, against the "
        f"reference) over {ranking['n']} cases:",
        "",
        f"- Spearman rank correlation between QC score and true error: {num(ranking['spearman'], 3)} "
        f"(p = {'n/a' if math.isnan(ranking['spearman_p']) else format(ranking['spearman_p'], '.2g')})",
        f"- Recall at {QC_FRACTION:.0%}: {num(ranking['recall'], 2)} (share of the {ranking['k']} worst "
        f"case(s) by true error that are among the {ranking['k']} flagged)",
        "",
        "Flagged cases (highest QC scores):",
        "",
        "| Case | QC score | Dice ITN-Refine | ITN outside Refine | Refine Dice |",
        "|---|---:|---:|---:|---:|",
    ]
    flagged = sorted((r for r in rows if r["flagged"]), key=lambda r: -float(r["qc_score"]))
    for r in flagged:
        lines.append(f"| {r['case']} | {num(float(r['qc_score']), 3)} | {num(float(r['dice_itn_refine']), 3)} | "
                     f"{num(float(r['itn_outside_refine']), 3)} | {num(float(r['refine_dice']), 3)} |")
    return lines


def evaluate_predictions(prediction_dir: str | Path, reference_paths: Mapping[str, str | Path],
                         labels: Mapping[int, str], out_dir: str | Path,
                         merge: Mapping[int, Sequence[int]] | None = None,
                         methods: Sequence[str] = METHODS, test_set: str | None = None,
                         info: Mapping | None = None) -> tuple[Path, Path]:
    """Compute per-case, per-method, per-structure metrics and write CSV and Markdown summaries.

    Parameters
    ----------
    prediction_dir:
        Folder written by ``atlasreg segment`` (see the module docstring for the layout).
    reference_paths:
        Case name -> reference labelmap file (any format SimpleITK reads). Spacing for the distances
        comes from the reference image.
    labels:
        Declared label values -> structure names; value 0 is the background and is not evaluated.
    out_dir:
        Output folder (created if needed).
    merge:
        Optional relabelling applied to both prediction and reference before the metrics, e.g.
        ``{255: [1, 2]}`` maps values 1 and 2 (and 255 itself) to 255. When given, only the merge keys
        are evaluated and every other value becomes background. Reference values may then be label
        values or merge keys. The structure name of a key is ``labels[key]`` if declared, else the
        source names joined with ``+``.
    methods:
        Method names to look for (``<method>_labelmap<ext>``); default :data:`METHODS`. Quality control
        needs ``itn`` and ``refine`` among them.
    test_set:
        Name of the test set, written to ``info.yaml``; default: the prediction folder's name.
    info:
        Extra entries for ``info.yaml`` (e.g. model name, method, STN variant, label; YAML-safe values,
        paths are written as strings); the keys written by this function take precedence.

    Returns
    -------
    ``(out_dir / "metrics_per_case.csv", out_dir / "summary.md")``; ``summary.csv``, ``info.yaml``,
    ``transforms_per_case.csv`` and (when possible) ``quality_control.csv`` are written too (see the
    module docstring).

    Raises
    ------
    AtlasregError
        If a reference or prediction cannot be read, their sizes differ, the reference holds values
        that are not declared labels (or merge keys), no prediction file is found at all, or a case's
        ``transform_metrics.csv`` is malformed.
    """
    prediction_dir = Path(prediction_dir)
    out_dir = Path(out_dir)
    labels = {int(k): str(v) for k, v in labels.items()}
    if not reference_paths:
        raise AtlasregError("no reference labelmaps given")
    if merge is not None:
        merge = {int(k): [int(s) for s in v] for k, v in merge.items()}
        if not merge:
            raise AtlasregError("merge is empty")
        evaluated = sorted(k for k in merge if k != BACKGROUND)
        names = {k: labels.get(k) or "+".join(labels.get(s, str(s)) for s in merge[k]) for k in evaluated}
        allowed = set(labels) | set(merge) | {BACKGROUND}
    else:
        evaluated = sorted(k for k in labels if k != BACKGROUND)
        names = {k: labels[k] for k in evaluated}
        allowed = set(labels) | {BACKGROUND}
    if not evaluated:
        raise AtlasregError("no foreground labels to evaluate")

    rows: list[dict[str, object]] = []
    transform_rows: list[dict[str, object]] = []
    quality_rows: list[dict[str, object]] = []
    evaluated_cases: set[str] = set()
    found_any = False
    missing: list[str] = []
    for case in sorted(reference_paths):
        if not (prediction_dir / case).is_dir():
            missing.append(case)
            continue
        reference_path = Path(reference_paths[case])
        reference, reference_image = _read_labelmap(reference_path, "reference")
        unknown = sorted(set(np.unique(reference).tolist()) - allowed)
        if unknown:
            raise AtlasregError(f"reference labelmap holds values {unknown} that are not declared labels "
                                f"{sorted(allowed)}", reference_path)
        spacing = reference_image.GetSpacing()
        if merge is not None:
            reference = _apply_merge(reference, merge)
        case_dir = prediction_dir / case
        metrics_path = case_dir / "transform_metrics.csv"
        if metrics_path.is_file():
            transform_rows.extend({"case": case, **r} for r in read_transform_metrics(metrics_path))
        kept: dict[str, np.ndarray] = {}  # the ITN and refined labelmaps, for the quality control
        for method in methods:
            prediction_path = find_prediction(case_dir, method, prefer=_extension(reference_path))
            if prediction_path is None:
                continue
            found_any = True
            evaluated_cases.add(case)
            prediction, prediction_image = _read_labelmap(prediction_path, "prediction")
            if prediction.shape != reference.shape:
                raise AtlasregError(f"prediction size {prediction_image.GetSize()} differs from the "
                                    f"reference size {reference_image.GetSize()} ({reference_path})",
                                    prediction_path)
            if not np.allclose(prediction_image.GetSpacing(), spacing, rtol=1e-3, atol=1e-6):
                warnings.warn(f"{prediction_path}: spacing {prediction_image.GetSpacing()} differs from the "
                              f"reference spacing {spacing}; using the reference spacing", UserWarning,
                              stacklevel=2)
            if merge is not None:
                prediction = _apply_merge(prediction, merge)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                metrics = segmentation_metrics(prediction, reference, [BACKGROUND, *evaluated],
                                               spacing=spacing)
            for warning in caught:
                warnings.warn(f"case {case!r}, method {method!r}: {warning.message}", UserWarning,
                              stacklevel=2)
            for label in evaluated:
                rows.append({"case": case, "method": method, "label": label, "structure": names[label],
                             **{name: metrics[label][name] for name in METRIC_NAMES},
                             "components": labelmap_connected_components(prediction, label),
                             "holes": count_holes(prediction == label),
                             "reference_components": labelmap_connected_components(reference, label),
                             "reference_holes": count_holes(reference == label)})
            if method in ("itn", "refine"):
                kept[method] = prediction
        if len(kept) == 2:
            scores = qc_scores(kept["itn"], kept["refine"], evaluated, background=BACKGROUND)
            refine_dice, _ = nan_mean_std([r["dice"] for r in rows if r["case"] == case and r["method"] == "refine"])
            quality_rows.append({"case": case, **{k: scores[k] for k in ("dice_itn_refine", "itn_outside_refine",
                                                                         "qc_score")},
                                 "refine_dice": refine_dice})
    if missing:  # one warning: evaluating a subset of a reference folder is common (e.g. B901-B1000)
        warnings.warn(f"{prediction_dir}: {len(missing)} reference case(s) have no prediction folder and were "
                      f"skipped (e.g. {', '.join(missing[:3])})", UserWarning, stacklevel=2)
    if not found_any:
        raise AtlasregError(f"no prediction labelmaps (<method>_labelmap.png / .nii.gz for methods "
                            f"{list(methods)}) found for any case", prediction_dir)

    summary: list[dict[str, object]] = []
    for method in methods:
        for label in evaluated:
            group = [r for r in rows if r["method"] == method and r["label"] == label]
            if not group:
                continue
            entry: dict[str, object] = {"method": method, "label": label, "structure": names[label],
                                        "n": len(group)}
            for name in METRIC_NAMES:
                entry[f"{name}_mean"], entry[f"{name}_std"] = nan_mean_std([r[name] for r in group])
            components = np.asarray([r["components"] for r in group], dtype=float)
            entry["components_mean"] = float(components.mean())
            entry["single_component_fraction"] = float(np.mean(components == 1))
            entry["holes_mean"] = float(np.mean([r["holes"] for r in group]))
            entry["same_topology_fraction"] = float(np.mean(
                [(r["components"], r["holes"]) == (r["reference_components"], r["reference_holes"])
                 for r in group]))
            summary.append(entry)

    lines = [
        "# Segmentation metrics",
        "",
        "Mean ± standard deviation over cases (NaN-ignoring). HD, HD95 and ASD in world units of the "
        "reference images (mm when their spacing is in mm). Components: mean number of connected "
        "components of the predicted structure; 1 comp.: fraction of cases with exactly one; Holes: mean "
        "number of holes; Topology = ref.: fraction of cases whose components and holes equal the "
        "reference's.",
        "",
        "| Method | Structure | n | Dice | HD | HD95 | ASD | Components | 1 comp. | Holes | Topology = ref. |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in summary:
        lines.append(
            f"| {e['method']} | {e['structure']} | {e['n']} | {_fmt(e['dice_mean'], e['dice_std'], 3)} | "
            f"{_fmt(e['hd_mean'], e['hd_std'], 2)} | {_fmt(e['hd95_mean'], e['hd95_std'], 2)} | "
            f"{_fmt(e['asd_mean'], e['asd_std'], 2)} | {e['components_mean']:.2f} | "
            f"{e['single_component_fraction']:.2f} | {e['holes_mean']:.2f} | {e['same_topology_fraction']:.2f} |")

    if transform_rows:
        lines.extend(_transform_table(transform_rows))
    if quality_rows:
        flags = flag_top([float(r["qc_score"]) for r in quality_rows], QC_FRACTION)
        for r, flag in zip(quality_rows, flags):
            r["flagged"] = bool(flag)
        ranking = ranking_quality([float(r["qc_score"]) for r in quality_rows],
                                  [1.0 - float(r["refine_dice"]) for r in quality_rows], QC_FRACTION)
        lines.extend(_quality_section(quality_rows, ranking))

    info_out = dict(_plain(dict(info or {})))
    info_out.update({
        "test_set": str(test_set) if test_set is not None else prediction_dir.resolve().name,
        "predictions": str(prediction_dir.resolve()),
        "merge": None if merge is None else {int(k): list(v) for k, v in merge.items()},
        "labels": dict(labels),
        "n_cases": len(evaluated_cases),
    })

    out_dir.mkdir(parents=True, exist_ok=True)
    per_case_path = out_dir / "metrics_per_case.csv"
    summary_csv_path = out_dir / "summary.csv"
    summary_md_path = out_dir / "summary.md"
    quality_path = out_dir / "quality_control.csv"
    write_text(per_case_path, _csv_text(PER_CASE_COLUMNS, rows))
    write_text(summary_csv_path, _csv_text(SUMMARY_COLUMNS, summary))
    write_text(out_dir / "transforms_per_case.csv", _csv_text(TRANSFORMS_PER_CASE_COLUMNS, transform_rows))
    if quality_rows:
        write_text(quality_path, _csv_text(QUALITY_COLUMNS, quality_rows))
    elif quality_path.is_file():
        quality_path.unlink()  # a stale file from an earlier evaluation into the same folder
    write_text(out_dir / "info.yaml", yaml.safe_dump(info_out, sort_keys=False, allow_unicode=True))
    write_text(summary_md_path, "\n".join(lines) + "\n")
    return per_case_path, summary_md_path
