"""Report figures with matplotlib (an Agg canvas per figure, PNG bytes): qualitative panels with
contours and the deformed grid (paper Figs. 6-7), metric bars per test set (Fig. 8),
regularisation-weight sensitivity (Figs. 8 and 15), ITN-vs-refine scatter (Fig. 12) and the atlas at
the start and end of training (Fig. 9). 3-D images are shown by their middle slice along the first array axis.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..contracts import INVERSE_FIELD, atlas_paths, find_labelmap, read_case_info, run_paths
from ..data.io import read_any
from .results import METRIC_TITLES, ResultTable

PANEL_OUTPUTS = (("itn", "ITN"), ("onepass", "1-pass"), ("refine", "Refine"))


def _subplots(nrows: int = 1, ncols: int = 1, **kwargs):
    """A figure on its own Agg canvas and its axes (``Figure.subplots``): no pyplot, so no global
    figure registry, no backend switch and no garbage collection when it is dropped."""
    fig = Figure(figsize=kwargs.pop("figsize", None))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def _read(path: Path) -> np.ndarray:
    """Array of an image file; for a 3-D image its middle slice along the first array axis (z).
    Vector images keep their components as the last axis."""
    image = read_any(path)  # AtlasregError naming the file if it cannot be read
    array = sitk.GetArrayFromImage(image)
    return array[array.shape[0] // 2] if image.GetDimension() == 3 else array


def atlas_coordinates(inverse_field: Path) -> np.ndarray:
    """The atlas world point (mm) of every voxel of a case's input image: ``p + d(p)``, with p the world
    point of the voxel and d the inverse displacement field of a case folder (Phi^-1, Eq. 8;
    :data:`atlasreg.contracts.INVERSE_FIELD`;
    the atlas points are those of the saved atlas, whose grid is centred at the world origin). For a 3-D
    field, the middle slice along the first array axis (as :func:`_read`).

    Returns float64 (H, W, D), components (x, y[, z]) along the atlas (model-grid) axes: the first two
    run along the image's x and y axes, so their isolines draw the atlas's grid lines deformed onto
    the image (Figs. 6-7). Raises AtlasregError naming the file if it cannot be read.
    """
    image = read_any(inverse_field)
    d = image.GetDimension()
    disp = sitk.GetArrayFromImage(image).astype(np.float64)  # (*array size, D)
    if d == 3:
        disp = disp[disp.shape[0] // 2]
    j, i = np.meshgrid(np.arange(disp.shape[0]), np.arange(disp.shape[1]), indexing="ij")
    index = np.stack([i, j] + ([np.full_like(i, image.GetSize()[2] // 2)] if d == 3 else []), -1)  # ITK order
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(d, d)
    world = np.asarray(image.GetOrigin()) + (index * np.asarray(image.GetSpacing())) @ direction.T
    return world + disp  # world points as Grid.index_to_world computes them (which would import torch)


def _contours(ax, labelmap: np.ndarray, colour: str) -> None:
    for value in np.unique(labelmap):
        if value != 0:
            ax.contour(labelmap == value, levels=[0.5], colors=colour, linewidths=0.8)


def qualitative_figure(predictions: Path, references: dict, cases: list[str], titles: list[str]) -> bytes | None:
    """Figs. 6-7: per case a row with the image, the ITN, 1-pass and refined labelmaps as red contours
    over the image with the reference in green, and the deformed atlas grid (isolines of the atlas
    coordinates of each subject point, from the case's inverse displacement field). The image is the one
    the case information names; None if no case has an image. Raises AtlasregError naming a malformed
    case information file."""
    rows = []
    for case in cases:
        case_dir = Path(predictions) / case
        image_path = (read_case_info(case_dir) or {}).get("image")
        if image_path is None or not image_path.is_file():
            continue
        rows.append((case, case_dir, image_path))
    if not rows:
        return None
    fig, axes = _subplots(len(rows), 5, figsize=(12, 2.6 * len(rows)), squeeze=False)
    for r, ((case, case_dir, image_path), title) in enumerate(zip(rows, titles)):
        image = _read(image_path).astype(float)
        if image.ndim == 3:  # RGB(A) PNG
            image = image[..., 0]
        reference = _read(Path(references[case])) if case in references else None
        axes[r, 0].imshow(image, cmap="gray")
        axes[r, 0].set_title(f"{case} ({title})", fontsize=8)
        for k, (output, name) in enumerate(PANEL_OUTPUTS, start=1):
            ax = axes[r, k]
            ax.imshow(image, cmap="gray")
            path = find_labelmap(case_dir, output)
            if reference is not None:
                _contours(ax, reference, "lime")
            if path is not None:
                _contours(ax, _read(path), "red")
            ax.set_title(name, fontsize=8)
        ax = axes[r, 4]
        ax.imshow(image, cmap="gray")
        inv = case_dir / INVERSE_FIELD
        if inv.is_file():
            atlas = atlas_coordinates(inv)
            h, w = atlas.shape[:2]
            sp = read_any(inv).GetSpacing()
            step = max(w, h) * min(sp[:2]) / 16
            for component in (atlas[..., 0], atlas[..., 1]):
                levels = np.arange(np.ceil(component.min() / step), np.floor(component.max() / step) + 1) * step
                if levels.size:
                    ax.contour(component, levels=levels, colors="yellow", linewidths=0.5)
        ax.set_title("deformed grid (refine)", fontsize=8)
        for a in axes[r]:
            a.set_axis_off()
    return _png(fig)


def bar_figure(table: ResultTable, metrics=("dice", "hd95", "asd")) -> bytes:
    """Fig. 8: mean ± std of each metric per method, one group of bars per test set (structures pooled)."""
    sets = table.test_sets()
    fig, axes = _subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        all_cols = list(dict.fromkeys(c for s in sets for c in table.columns[s]))
        width = 0.8 / max(1, len(all_cols))
        for j, col in enumerate(all_cols):
            means, stds = [], []
            for s in sets:
                vals = [v for per in table.values[s].values() if col in per for v in per[col][metric].values()]
                vals = np.array(vals, float)
                means.append(np.nanmean(vals) if vals.size else np.nan)
                stds.append(np.nanstd(vals) if vals.size else np.nan)
            ax.bar(np.arange(len(sets)) + j * width, means, width, yerr=stds, label=col, capsize=2)
        ax.set_xticks(np.arange(len(sets)) + 0.4 - width / 2)
        ax.set_xticklabels(sets, fontsize=8)
        ax.set_title(METRIC_TITLES[metric], fontsize=9)
    axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _png(fig)


def sensitivity_figure(points: list[tuple[float, dict]], metrics=("dice", "hd95", "asd")) -> bytes:
    """Figs. 8/15: refinement result against the regularisation weight lambda*. points: (lambda*,
    {metric: (mean, std)}) per evaluation, sorted by lambda* here."""
    points = sorted(points, key=lambda p: p[0])
    lams = [p[0] for p in points]
    fig, axes = _subplots(1, len(metrics), figsize=(4 * len(metrics), 3), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        mean = [p[1][metric][0] for p in points]
        std = [p[1][metric][1] for p in points]
        ax.errorbar(lams, mean, yerr=std, marker="o", capsize=2)
        ax.set_xscale("log")
        ax.set_xlabel("λ* (refinement regularisation weight)", fontsize=8)
        ax.set_title(f"Refine {METRIC_TITLES[metric]}", fontsize=9)
    return _png(fig)


def scatter_figure(table: ResultTable, test_set: str, x: str = "ITN", y: str = "Refine",
                   metric: str = "dice") -> bytes | None:
    """Fig. 12: per-case metric of `y` against `x` (structures pooled), with the diagonal."""
    xs, ys = [], []
    for per in table.values[test_set].values():
        if x in per and y in per:
            a, b = per[x][metric], per[y][metric]
            for case in sorted(set(a) & set(b)):
                xs.append(a[case])
                ys.append(b[case])
    if not xs:
        return None
    fig, ax = _subplots(figsize=(3.6, 3.6))
    ax.scatter(xs, ys, s=8)
    lo, hi = np.nanmin(xs + ys), np.nanmax(xs + ys)
    ax.plot([lo, hi], [lo, hi], "k--", linewidth=0.8)
    ax.set_xlabel(f"{x} {METRIC_TITLES[metric]}", fontsize=8)
    ax.set_ylabel(f"{y} {METRIC_TITLES[metric]}", fontsize=8)
    ax.set_title(test_set, fontsize=9)
    return _png(fig)


def atlas_figure(run_dir: Path) -> bytes | None:
    """Fig. 9: atlas image and labelmap probabilities at the start and the end of training, from the
    initial and final atlas folders of the training run folder `run_dir` (:func:`atlasreg.contracts.run_paths`).
    None when the run folder lacks them."""
    run = run_paths(run_dir)
    stages = [(name, atlas_paths(folder)) for name, folder in (("start", run.atlas_initial), ("end", run.atlas))]
    stages = [(n, a) for n, a in stages if a.image.is_file()]
    if not stages:
        return None
    fig, axes = _subplots(2, len(stages), figsize=(3.2 * len(stages), 6.2), squeeze=False)
    for j, (name, atlas) in enumerate(stages):
        axes[0, j].imshow(_read(atlas.image), cmap="gray")
        axes[0, j].set_title(f"atlas image ({name})", fontsize=8)
        probs = _read(atlas.probabilities)
        fg = 1.0 - probs[..., 0] if probs.ndim == 3 else probs
        axes[1, j].imshow(fg, cmap="magma", vmin=0, vmax=1)
        axes[1, j].set_title(f"atlas labelmap, foreground probability ({name})", fontsize=8)
        for a in axes[:, j]:
            a.set_axis_off()
    return _png(fig)
