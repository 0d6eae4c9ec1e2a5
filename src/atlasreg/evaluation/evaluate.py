"""Evaluate the labelmaps written by ``atlasreg segment`` against reference labelmaps.

Input: a segmentation run folder, one case folder ``<prediction_dir>/<case>/`` per case holding
``<method>_labelmap<ext>`` for the outputs of :data:`METHODS` (a missing one is skipped: that method
has no rows for the case) and possibly the case's transform metrics. Output: an evaluation folder
(per-case metrics, summary table as CSV and Markdown, info, transform metrics per case, quality
control). Both folders -- file names, columns, units -- are described in :mod:`atlasreg.contracts`,
which reads and writes them.

:func:`evaluate_predictions` runs the steps: the evaluated structures (:func:`_structures`), the cases
with a prediction folder (:func:`_find_cases`), per case its metric rows, transform rows and quality
row (:func:`_evaluate_case`), the summary rows (:func:`_summary_rows`), the quality-control flags
(:func:`_flag_quality`), the Markdown (:func:`_summary_markdown`) and the info
(:func:`_evaluation_info`), then writes the folder (:func:`atlasreg.contracts.write_evaluation`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from tqdm import tqdm

from atlasreg.contracts import (  # noqa: F401 - names of the case and evaluation folders, re-exported
    LABELMAP_EXTENSIONS, LABELMAP_SUFFIX, PER_CASE_COLUMNS, QUALITY_COLUMNS, SUMMARY_COLUMNS, TRANSFORM_METRIC_COLUMNS,
    TRANSFORM_METRICS, TRANSFORMS_PER_CASE_COLUMNS, find_labelmap, labelmap_extension, read_transform_metrics,
    CASE_INFO, IN_PROGRESS, SEGMENT_INFO, evaluation_paths, read_evaluation_info, read_segment_info,
    segment_run_status, write_evaluation,
)
from atlasreg.contracts import LABELMAP_OUTPUTS as METHODS
from atlasreg.errors import AtlasregError
from atlasreg.evaluation.metrics import METRIC_NAMES, labelmap_connected_components, segmentation_metrics
from atlasreg.evaluation.quality import flag_top, qc_scores, ranking_quality
from atlasreg.evaluation.statistics import nan_mean_std
from atlasreg.evaluation.topology import count_holes
from atlasreg.outputs import claim_output

__all__ = ["METHODS", "LABELMAP_EXTENSIONS", "TRANSFORM_METRIC_COLUMNS", "TRANSFORMS_PER_CASE_COLUMNS",
           "QUALITY_COLUMNS", "QC_FRACTION", "evaluate_predictions", "find_prediction",
           "read_transform_metrics"]

BACKGROUND = 0
#: Fraction of cases flagged by the quality control (highest qc_score), at least one case.
QC_FRACTION = 0.1
#: The quality-control scores of :func:`atlasreg.evaluation.quality.qc_scores` kept per case.
_QC_SCORES = QUALITY_COLUMNS[1:4]

#: ``find_prediction(case_dir, method, prefer=None)``: a case folder's labelmap of one method, or None
#: (:func:`atlasreg.contracts.find_labelmap`).
find_prediction = find_labelmap


#: Largest label value a float labelmap may hold: every integer up to it is exact in float64 and int64.
_LARGEST_LABEL = 2.0 ** 53


def _read_labelmap(path: Path, kind: str):
    """Read a labelmap with SimpleITK: (int64 array in numpy order, image). AtlasregError on failure."""
    import SimpleITK as sitk

    from ..data.io import _native_stderr_held, _short_reason, verify_file

    # a truncated NIfTI reads as zeros and NaN in a float NIfTI as 0 (AtlasregError naming the file)
    nonfinite_on_disk = verify_file(path)
    try:
        with _native_stderr_held():  # libpng prints its warnings and errors on a corrupt PNG
            image = sitk.ReadImage(str(path))
    except Exception as error:  # SimpleITK raises RuntimeError for missing/corrupt files
        raise AtlasregError(f"cannot read {kind} labelmap ({_short_reason(error)})", path) from error
    array = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        # e.g. an RGB(A) PNG: accept only if it is grey (all colour channels equal)
        channels = array[..., :3] if array.shape[-1] >= 3 else array
        if not np.all(channels == channels[..., :1]):
            raise AtlasregError(f"{kind} labelmap has {image.GetNumberOfComponentsPerPixel()} colour "
                                "channels; expected a single-channel labelmap", path)
        array = channels[..., 0]
    if not np.issubdtype(array.dtype, np.integer):
        if nonfinite_on_disk or not np.all(np.isfinite(array)):
            raise AtlasregError(f"{kind} labelmap has NaN or infinite values; expected label values", path)
        if not np.all(array == np.round(array)):
            raise AtlasregError(f"{kind} labelmap has non-integer values; expected label values", path)
        if array.size and np.abs(array).max() > _LARGEST_LABEL:  # int64 would not hold it (3e38)
            raise AtlasregError(f"{kind} labelmap has values beyond ±2^53 (e.g. {float(np.abs(array).max()):g}); "
                                "expected label values", path)
    return array.astype(np.int64), image


def _apply_merge(array: np.ndarray, merge: Mapping[int, Sequence[int]]) -> np.ndarray:
    """Map each merge source value (and the key itself) to the key; every other value to background."""
    out = np.full_like(array, BACKGROUND)
    for key, sources in merge.items():
        out[np.isin(array, [int(key), *map(int, sources)])] = int(key)
    return out


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


@dataclass
class _Structures:
    """The evaluated foreground structures: label values (sorted), their names, the values a reference
    may hold, and the merge (None or ``{key: [source values]}``, ints)."""

    evaluated: list[int]
    names: dict[int, str]
    allowed: set[int]
    merge: dict[int, list[int]] | None


def _structures(labels: Mapping[int, str], merge: Mapping[int, Sequence[int]] | None) -> _Structures:
    """The structures to evaluate for the declared `labels` (value -> name) and an optional `merge` (see
    :func:`evaluate_predictions`). Raises AtlasregError for an empty merge, a merge of labels that are not
    declared (no labelmap could hold them) or no foreground label."""
    if merge is not None:
        merge = {int(k): [int(s) for s in v] for k, v in merge.items()}
        if not merge:
            raise AtlasregError("merge is empty")
        for key, sources in merge.items():
            undeclared = sorted({s for s in sources if s not in labels})
            if not sources or undeclared:
                what = f"label(s) {undeclared} are not declared" if undeclared else "no source labels"
                raise AtlasregError(f"--merge {key}={','.join(map(str, sources))}: {what} (declared labels: "
                                    f"{sorted(labels)})")
        evaluated = sorted(k for k in merge if k != BACKGROUND)
        names = {k: labels.get(k) or "+".join(labels.get(s, str(s)) for s in merge[k]) for k in evaluated}
        allowed = set(labels) | set(merge) | {BACKGROUND}
    else:
        evaluated = sorted(k for k in labels if k != BACKGROUND)
        names = {k: labels[k] for k in evaluated}
        allowed = set(labels) | {BACKGROUND}
    if not evaluated:
        raise AtlasregError("no foreground labels to evaluate")
    return _Structures(evaluated, names, allowed, merge)


def _check_segmentation_run(prediction_dir: Path) -> None:
    """AtlasregError naming the manifest of a segmentation run folder (:data:`SEGMENT_INFO`) whose run
    is still in progress (or was killed; a run split into parts: until every part has finished,
    :func:`~atlasreg.contracts.segment_run_status`), or naming the folder when it holds case folders
    its manifest does not list (results of another run). A folder without a manifest (written through
    the Python API) passes."""
    info = read_segment_info(prediction_dir)
    status, unfinished = segment_run_status(prediction_dir)
    if status == IN_PROGRESS:
        parts = (f"; part(s) {', '.join(map(str, unfinished))} of {info.get('parts')} have not finished"
                 if unfinished else "")
        raise AtlasregError("the segmentation run is incomplete (in progress, or killed" + parts + "): rerun the "
                            "same `atlasreg segment` command to finish it", prediction_dir / SEGMENT_INFO)
    listed = info.get("cases")
    if listed is not None and prediction_dir.is_dir():
        extra = sorted(p.name for p in prediction_dir.iterdir()
                       if p.is_dir() and (p / CASE_INFO).is_file() and p.name not in set(listed))
        if extra:
            raise AtlasregError(f"holds {len(extra)} case folder(s) its segmentation run did not write "
                                f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}; see "
                                f"{SEGMENT_INFO}): remove them or segment into a new folder", prediction_dir)


def _find_cases(prediction_dir: Path, reference_paths: Mapping[str, str | Path]) -> tuple[list[str], list[str]]:
    """(cases with a case folder in prediction_dir, cases without one), both sorted by name."""
    present, missing = [], []
    for case in sorted(reference_paths):
        (present if (prediction_dir / case).is_dir() else missing).append(case)
    return present, missing


def _read_reference(path: Path, structures: _Structures) -> tuple[np.ndarray, tuple[float, ...]]:
    """(reference labelmap, merged if asked, as int64 in numpy order; its spacing). AtlasregError naming
    the file if it cannot be read or holds values that are neither declared labels nor merge keys."""
    reference, image = _read_labelmap(path, "reference")
    unknown = sorted(set(np.unique(reference).tolist()) - structures.allowed)
    if unknown:
        raise AtlasregError(f"reference labelmap holds values {unknown} that are not declared labels "
                            f"{sorted(structures.allowed)}", path)
    if structures.merge is not None:
        reference = _apply_merge(reference, structures.merge)
    return reference, image


@dataclass
class _CaseResult:
    """One case's rows: metrics (one per method and structure), transform metrics, quality (or None)."""

    rows: list[dict] = field(default_factory=list)
    transforms: list[dict] = field(default_factory=list)
    quality: dict | None = None


def _method_rows(case: str, method: str, prediction: np.ndarray, reference: np.ndarray, spacing,
                 structures: _Structures) -> list[dict]:
    """The metric rows (columns of ``PER_CASE_COLUMNS``) of one method's prediction of one case; the
    metrics' warnings are re-issued naming the case and the method."""
    evaluated = structures.evaluated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = segmentation_metrics(prediction, reference, [BACKGROUND, *evaluated], spacing=spacing)
    for warning in caught:
        warnings.warn(f"case {case!r}, method {method!r}: {warning.message}", UserWarning, stacklevel=4)
    return [{"case": case, "method": method, "label": label, "structure": structures.names[label],
             **{name: metrics[label][name] for name in METRIC_NAMES},
             "components": labelmap_connected_components(prediction, label),
             "holes": count_holes(prediction == label),
             "reference_components": labelmap_connected_components(reference, label),
             "reference_holes": count_holes(reference == label)}
            for label in evaluated]


def _geometry_difference(prediction, prediction_path: Path, reference, reference_path: Path) -> str | None:
    """The first difference of spacing, origin or direction (relative tolerance 1e-4, as a training
    labelmap against its image) between a prediction and its reference when both files store a geometry,
    else None: a PNG (or a NIfTI header without one) has none, and its spacing is the reference's."""
    from ..data.io import _geometry_difference as difference, has_no_spacing

    if has_no_spacing(prediction, prediction_path) or has_no_spacing(reference, reference_path):
        return None
    return difference(prediction, reference, 1e-4)


def _evaluate_case(case: str, case_dir: Path, reference_path: Path, structures: _Structures,
                   methods: Sequence[str]) -> _CaseResult:
    """Metrics of every method's labelmap found in case_dir against the reference, the case's transform
    metrics, and its quality-control row when it has both ``itn`` and ``refine`` labelmaps. Raises
    AtlasregError naming the file for an unreadable reference, prediction or transform metrics file, or
    a prediction whose size or geometry differs from the reference's (geometry: when both files store
    one); warns when the spacing of a file without geometry differs."""
    reference, reference_image = _read_reference(reference_path, structures)
    spacing = reference_image.GetSpacing()
    result = _CaseResult()
    metrics_path = case_dir / TRANSFORM_METRICS
    if metrics_path.is_file():
        result.transforms = [{"case": case, **r} for r in read_transform_metrics(metrics_path)]
    kept: dict[str, np.ndarray] = {}  # the ITN and refined labelmaps, for the quality control
    for method in methods:
        prediction_path = find_labelmap(case_dir, method, prefer=labelmap_extension(reference_path))
        if prediction_path is None:
            continue
        prediction, prediction_image = _read_labelmap(prediction_path, "prediction")
        if prediction.shape != reference.shape:
            raise AtlasregError(f"prediction size {prediction_image.GetSize()} differs from the "
                                f"reference size {reference_image.GetSize()} ({reference_path})",
                                prediction_path)
        difference = _geometry_difference(prediction_image, prediction_path, reference_image, reference_path)
        if difference:
            raise AtlasregError(f"geometry differs from the reference {reference_path}: {difference}",
                                prediction_path)
        if not np.allclose(prediction_image.GetSpacing(), spacing, rtol=1e-3, atol=1e-6):
            warnings.warn(f"{prediction_path}: spacing {prediction_image.GetSpacing()} differs from the "
                          f"reference spacing {spacing}; using the reference spacing", UserWarning,
                          stacklevel=3)
        if structures.merge is not None:
            prediction = _apply_merge(prediction, structures.merge)
        result.rows.extend(_method_rows(case, method, prediction, reference, spacing, structures))
        if method in ("itn", "refine"):
            kept[method] = prediction
    if len(kept) == 2:
        scores = qc_scores(kept["itn"], kept["refine"], structures.evaluated, background=BACKGROUND)
        refine_dice, _ = nan_mean_std([r["dice"] for r in result.rows if r["method"] == "refine"])
        result.quality = {"case": case, **{k: scores[k] for k in _QC_SCORES}, "refine_dice": refine_dice}
    return result


def _summary_rows(rows: Sequence[Mapping], methods: Sequence[str], structures: _Structures) -> list[dict]:
    """One row (columns of ``SUMMARY_COLUMNS``) per method and structure that has per-case rows:
    NaN-ignoring mean and std of each metric over the cases, and the topology fractions."""
    summary: list[dict[str, object]] = []
    for method in methods:
        for label in structures.evaluated:
            group = [r for r in rows if r["method"] == method and r["label"] == label]
            if not group:
                continue
            entry: dict[str, object] = {"method": method, "label": label, "structure": structures.names[label],
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
    return summary


def _flag_quality(rows: Sequence[dict]) -> dict[str, float] | None:
    """Set ``flagged`` on each quality row (the QC_FRACTION highest scores, at least one) and return the
    ranking quality of the score against the true error 1 - refine Dice
    (:func:`atlasreg.evaluation.quality.ranking_quality`); None for no rows."""
    if not rows:
        return None
    flags = flag_top([float(r["qc_score"]) for r in rows], QC_FRACTION)
    for r, flag in zip(rows, flags):
        r["flagged"] = bool(flag)
    return ranking_quality([float(r["qc_score"]) for r in rows],
                           [1.0 - float(r["refine_dice"]) for r in rows], QC_FRACTION)


def _summary_markdown(summary: Sequence[Mapping], transform_rows: Sequence[Mapping],
                      quality_rows: Sequence[Mapping], ranking: Mapping[str, float] | None) -> str:
    """The summary as Markdown: the metrics table, then the transform metrics and the quality-control
    section when there are such rows."""
    lines = [
        "# Segmentation metrics",
        "",
        "Mean ± standard deviation over cases (NaN-ignoring). HD, HD95 and ASD in world units of the "
        "reference images (mm when their spacing is in mm); HD95 is the maximum of the two directed 95th "
        "percentiles, HD95 avg. their mean (DeepATLAS, Eq. 16). Components: mean number of connected "
        "components of the predicted structure; 1 comp.: fraction of cases with exactly one; Holes: mean "
        "number of holes; Topology = ref.: fraction of cases whose components and holes equal the "
        "reference's.",
        "",
        "| Method | Structure | n | Dice | HD | HD95 | HD95 avg. | ASD | Components | 1 comp. | Holes | Topology = ref. |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in summary:
        lines.append(
            f"| {e['method']} | {e['structure']} | {e['n']} | {_fmt(e['dice_mean'], e['dice_std'], 3)} | "
            f"{_fmt(e['hd_mean'], e['hd_std'], 2)} | {_fmt(e['hd95_mean'], e['hd95_std'], 2)} | "
            f"{_fmt(e['hd95_avg_mean'], e['hd95_avg_std'], 2)} | "
            f"{_fmt(e['asd_mean'], e['asd_std'], 2)} | {e['components_mean']:.2f} | "
            f"{e['single_component_fraction']:.2f} | {e['holes_mean']:.2f} | {e['same_topology_fraction']:.2f} |")
    if transform_rows:
        lines.extend(_transform_table(transform_rows))
    if quality_rows and ranking is not None:
        lines.extend(_quality_section(quality_rows, ranking))
    return "\n".join(lines) + "\n"


def _evaluation_info(info: Mapping | None, test_set: str | None, prediction_dir: Path,
                     structures: _Structures, labels: Mapping[int, str], n_cases: int) -> dict:
    """The evaluation's info: the caller's entries (YAML-safe copy), then the keys of this evaluation."""
    info_out = dict(_plain(dict(info or {})))
    info_out.update({
        "test_set": str(test_set) if test_set is not None else prediction_dir.resolve().name,
        "predictions": str(prediction_dir.resolve()),
        "merge": None if structures.merge is None else {int(k): list(v) for k, v in structures.merge.items()},
        "labels": dict(labels),
        "n_cases": n_cases,
    })
    return info_out


def evaluate_predictions(prediction_dir: str | Path, reference_paths: Mapping[str, str | Path],
                         labels: Mapping[int, str], out_dir: str | Path,
                         merge: Mapping[int, Sequence[int]] | None = None,
                         methods: Sequence[str] = METHODS, test_set: str | None = None,
                         info: Mapping | None = None, overwrite: bool = False,
                         progress: bool = False) -> tuple[Path, Path]:
    """Compute per-case, per-method, per-structure metrics and write CSV and Markdown summaries.

    Parameters
    ----------
    prediction_dir:
        Folder written by ``atlasreg segment`` (a segmentation run folder, :mod:`atlasreg.contracts`).
    reference_paths:
        Case name -> reference labelmap file (any format SimpleITK reads). Spacing for the distances
        comes from the reference image.
    labels:
        Declared label values -> structure names; value 0 is the background and is not evaluated.
    out_dir:
        Output folder (created if needed), an evaluation folder (:mod:`atlasreg.contracts`).
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
        Name of the test set, written to the info; default: the prediction folder's name.
    info:
        Extra entries for the info (e.g. model name, method, STN variant, label; YAML-safe values,
        paths are written as strings); the keys written by this function take precedence.
    overwrite:
        Delete the results of another evaluation that `out_dir` holds (other predictions, references,
        checkpoint or merge; :func:`atlasreg.outputs.claim_output`); without it such a folder is refused.
    progress:
        Show a progress bar on stderr, one step per case, when stderr is a terminal (tqdm); it is
        cleared when the evaluation ends or fails.

    Returns
    -------
    The paths of the per-case metrics (CSV) and of the Markdown summary in out_dir; the summary CSV,
    the info, the transform metrics per case and (when possible) the quality control are written too
    (see :mod:`atlasreg.contracts`).

    Raises
    ------
    AtlasregError
        If the prediction folder is missing or holds no folder of a reference case, a reference or
        prediction cannot be read (truncated, NaN, non-integer values), their sizes differ, or their
        geometries when both files store one, the reference holds values that are not declared labels
        (or merge keys), the merge names labels that are not declared, no prediction file is found at
        all, or a case's transform metrics file is malformed; if the predictions are a segmentation run
        still in progress (or killed), or hold case folders their run's manifest does not list
        (:data:`SEGMENT_INFO`); if `out_dir` holds another evaluation and not `overwrite`. Nothing is
        written then, and no warning of the cases is shown.
    """
    prediction_dir = Path(prediction_dir)
    if not prediction_dir.is_dir():
        raise AtlasregError("predictions folder not found" if not prediction_dir.exists() else
                            "is not a folder; expected the output folder of `atlasreg segment`", prediction_dir)
    _check_segmentation_run(prediction_dir)
    labels = {int(k): str(v) for k, v in labels.items()}
    if not reference_paths:
        raise AtlasregError("no reference labelmaps given")
    structures = _structures(labels, merge)
    # out_dir is claimed before the metrics are computed, so a refused folder costs nothing
    planned = _evaluation_info(info, test_set, prediction_dir, structures, labels, 0)
    identity = {k: planned.get(k) for k in ("predictions", "references", "checkpoint", "checkpoint_sha256", "merge")}
    files = evaluation_paths(out_dir)
    owned = [p for p in dataclasses.astuple(files) if p.exists() and p != files.info]
    claim_output(out_dir, files.info, read_evaluation_info(out_dir), identity, owned, "an evaluation", overwrite)
    present, missing = _find_cases(prediction_dir, reference_paths)
    if not present:
        raise AtlasregError(f"no case folder for any of the {len(missing)} reference case(s) "
                            f"(e.g. {', '.join(missing[:3])})", prediction_dir)
    rows: list[dict] = []
    transform_rows: list[dict] = []
    quality_rows: list[dict] = []
    n_cases = 0  # cases with at least one prediction file
    # The cases' warnings (empty structures, ...) are shown once every case was read: bad input found in
    # a later case is then the only line printed (the progress bar, on a terminal only, is cleared first).
    bar = tqdm(total=len(present), desc="evaluating", unit="case", leave=False, disable=None if progress else True)
    with warnings.catch_warnings(record=True) as caught, bar:
        warnings.simplefilter("always")
        for case in present:
            result = _evaluate_case(case, prediction_dir / case, Path(reference_paths[case]), structures, methods)
            rows.extend(result.rows)
            transform_rows.extend(result.transforms)
            if result.quality is not None:
                quality_rows.append(result.quality)
            n_cases += bool(result.rows)
            bar.update()
    if not n_cases:
        raise AtlasregError(f"no prediction labelmaps (<method>{LABELMAP_SUFFIX}{' / '.join(LABELMAP_EXTENSIONS)} "
                            f"for methods {list(methods)}) found for any case", prediction_dir)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if missing:  # one warning: evaluating a subset of a reference folder is common (e.g. B901-B1000)
        warnings.warn(f"{prediction_dir}: {len(missing)} reference case(s) have no prediction folder and were "
                      f"skipped (e.g. {', '.join(missing[:3])})", UserWarning, stacklevel=2)
    summary = _summary_rows(rows, methods, structures)
    ranking = _flag_quality(quality_rows)
    markdown = _summary_markdown(summary, transform_rows, quality_rows, ranking)
    info_out = _evaluation_info(info, test_set, prediction_dir, structures, labels, n_cases)
    paths = write_evaluation(out_dir, rows, summary, transform_rows, quality_rows, info_out, markdown)
    return paths.metrics_per_case, paths.summary_md
