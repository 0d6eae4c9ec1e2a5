"""Report figures with matplotlib (an Agg canvas per figure, PNG bytes): qualitative panels with
contours and the deformed grid (paper Figs. 6-7), metric bars per test set (Fig. 8),
regularisation-weight sensitivity (Figs. 8 and 15), ITN-vs-refine scatter (Fig. 12) and the atlas at
the start and end of training (Fig. 9).

Images go through one code path in 2-D and 3-D (:func:`views`): a 2-D image is one panel, a 3-D
volume three, its orthogonal planes through one voxel (axial, coronal and sagittal in array terms: the
planes normal to the array axes z, y and x), drawn in array order (the first remaining array axis
downwards, no reorientation by the header's direction). Every panel's pixel aspect ratio is the ratio
of the voxel spacings (mm) along its rows and columns, so anisotropic volumes keep their physical
shape.

Colours are the Okabe-Ito palette (:data:`OKABE_ITO`; Okabe and Ito 2008, "Color Universal Design"),
told apart with the common colour-vision deficiencies: predictions in orange, references in sky blue,
the deformed grid in yellow, bars in the palette's order. Panels are :data:`PANEL_INCHES` wide at
:data:`DPI` dots per inch (300 pixels).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..contracts import INVERSE_FIELD, atlas_paths, find_labelmap, read_case_info, run_paths
from ..data.io import has_no_spacing, read_any
from ..errors import AtlasregError
from .results import METRIC_TITLES, ResultTable

PANEL_OUTPUTS = (("itn", "ITN"), ("onepass", "1-pass"), ("refine", "Refine"))
VIEW_NAMES = ("axial", "coronal", "sagittal")  # 3-D planes normal to the array axes z, y, x

#: The Okabe-Ito colour-blind-safe palette (name -> hex), in its usual order.
OKABE_ITO = {"orange": "#E69F00", "sky blue": "#56B4E9", "bluish green": "#009E73", "yellow": "#F0E442",
             "blue": "#0072B2", "vermillion": "#D55E00", "reddish purple": "#CC79A7", "black": "#000000"}
PREDICTION_COLOUR = OKABE_ITO["orange"]
REFERENCE_COLOUR = OKABE_ITO["sky blue"]
GRID_COLOUR = OKABE_ITO["yellow"]
#: Width of one image panel (inches) and the resolution of every figure (dots per inch).
PANEL_INCHES = 3.0
DPI = 100
FONT_SIZE = 10


def _subplots(nrows: int = 1, ncols: int = 1, **kwargs):
    """A figure on its own Agg canvas and its axes (``Figure.subplots``): no pyplot, so no global
    figure registry, no backend switch and no garbage collection when it is dropped."""
    fig = Figure(figsize=kwargs.pop("figsize", None))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


@dataclass(frozen=True)
class View:
    """One panel's plane of an image of array size `shape` (array order: (y, x) or (z, y, x)).

    axis: the array axis normal to the plane (None for a 2-D image, shown whole); index: the plane's
    position along it (voxels); rows, cols: the array axes along the panel's rows and columns; aspect:
    spacing[rows] / spacing[cols] (the height of a pixel over its width, matplotlib's ``imshow``
    aspect)."""

    name: str | None
    axis: int | None
    index: int
    rows: int
    cols: int
    aspect: float

    def take(self, array: np.ndarray) -> np.ndarray:
        """The plane of an array of the image's size (any trailing component axis kept): ``array``
        itself in 2-D, the slice ``index`` along ``axis`` in 3-D."""
        return array if self.axis is None else np.take(array, self.index, axis=self.axis)

    def height(self, shape: Sequence[int], width: float, lowest: float = 0.25) -> float:
        """The height of a panel of `width` that shows this plane of an image of array size `shape` at
        its aspect, between `lowest` times `width` and `width` (a 2-D image as wide as tall keeps
        ``width``; a flat plane of an anisotropic volume gets a lower row)."""
        ratio = shape[self.rows] * self.aspect / shape[self.cols]
        return width * min(1.0, max(lowest, ratio))

    @property
    def label(self) -> str:
        """'' in 2-D; e.g. 'axial z=12' in 3-D."""
        return "" if self.axis is None else f"{self.name} {'zyx'[self.axis]}={self.index}"


def views(shape: Sequence[int], spacing: Sequence[float], centre: Sequence[int] | None = None) -> list[View]:
    """The panels of an image of array size `shape` (2 or 3 axes, array order) and voxel `spacing`
    (ITK order (x, y[, z]), mm): one :class:`View` of the whole image in 2-D; in 3-D the axial,
    coronal and sagittal planes (normal to z, y, x) through the voxel `centre` (array order; default
    the volume centre, ``size // 2``). Raises ValueError for another number of axes."""
    shape = tuple(int(n) for n in shape)
    sp = tuple(float(s) for s in reversed(tuple(spacing)))  # array order
    if len(shape) != len(sp) or len(shape) not in (2, 3):
        raise ValueError(f"views of a {len(shape)}-axis array with spacing {tuple(spacing)}: expected 2 or 3 axes")
    if len(shape) == 2:
        return [View(None, None, 0, 0, 1, sp[0] / sp[1])]
    centre = tuple(n // 2 for n in shape) if centre is None else tuple(int(c) for c in centre)
    out = []
    for axis, name in enumerate(VIEW_NAMES):
        rows, cols = (a for a in range(3) if a != axis)
        out.append(View(name, axis, centre[axis], rows, cols, sp[rows] / sp[cols]))
    return out


def foreground_centroid(labelmap: np.ndarray) -> tuple[int, ...] | None:
    """The voxel nearest to the centroid of the non-zero voxels of `labelmap` (array order), or None
    when it has none."""
    points = np.nonzero(labelmap)
    if not points[0].size:
        return None
    return tuple(int(np.round(p.mean())) for p in points)


def _image(path: Path) -> tuple[sitk.Image, np.ndarray]:
    """A 2-D or 3-D image file and its array (array order; components of a vector image last).
    AtlasregError naming the file if it cannot be read or has another dimension."""
    image = read_any(path)  # AtlasregError naming the file if it cannot be read
    if image.GetDimension() not in (2, 3):
        raise AtlasregError(f"image is {image.GetDimension()}-D; figures show 2-D and 3-D images", path)
    return image, sitk.GetArrayFromImage(image)


def _labelmap(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The array of a labelmap drawn over an image of array size `shape` (of a multi-component file
    its first component, as :func:`atlasreg.data.io.read_labelmap` reads it); AtlasregError naming the
    file if it cannot be read or its size differs."""
    image, array = _image(path)
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = array[..., 0]
    if array.shape != shape:
        raise AtlasregError(f"array size {array.shape} does not match the image's {shape}", path)
    return array


def display_spacing(image: sitk.Image, path: Path, declared: Sequence[float] | None = None) -> tuple[float, ...]:
    """The voxel spacing (ITK order, mm) a figure shows an image with: `declared` (config
    ``data.spacing``) when the file stores none (:func:`atlasreg.data.io.has_no_spacing`: PNG and the
    like, or a default NIfTI header such as ACDC's), else the file's own. AtlasregError naming the file
    when `declared` has another number of axes."""
    if declared is None or not has_no_spacing(image, path):
        return tuple(image.GetSpacing())
    if len(declared) != image.GetDimension():
        raise AtlasregError(f"declared spacing {list(declared)} does not match the {image.GetDimension()}-D image",
                            path)
    return tuple(float(s) for s in declared)


def _atlas_coordinates(image: sitk.Image, path: Path) -> np.ndarray:
    d = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() != d:
        raise AtlasregError(f"has {image.GetNumberOfComponentsPerPixel()} components per voxel; a {d}-D "
                            f"displacement field has {d}", path)
    disp = sitk.GetArrayFromImage(image).astype(np.float64)  # (*array size, D)
    index = np.stack(np.indices(disp.shape[:-1])[::-1], -1)  # ITK order (i, j[, k])
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(d, d)
    world = np.asarray(image.GetOrigin()) + (index * np.asarray(image.GetSpacing())) @ direction.T
    return world + disp  # world points as Grid.index_to_world computes them (which would import torch)


def atlas_coordinates(inverse_field: Path) -> np.ndarray:
    """The atlas world point (mm) of every voxel of a case's input image: ``p + d(p)``, with p the world
    point of the voxel and d the inverse displacement field of a case folder (Phi^-1, Eq. 8;
    :data:`atlasreg.contracts.INVERSE_FIELD`;
    the atlas points are those of the saved atlas, whose grid is centred at the world origin).

    Returns float64 (*array size, D) (array order (y, x) or (z, y, x)), components (x, y[, z]) along
    the atlas (model-grid) axes, which run along the image's x, y[, z] axes, so the isolines of two
    components draw the atlas's grid lines deformed onto the image plane they span (Figs. 6-7).
    Raises AtlasregError naming the file if it cannot be read or is not a D-component field.
    """
    return _atlas_coordinates(read_any(inverse_field), Path(inverse_field))


def _contours(ax, labelmap: np.ndarray, colour: str) -> None:
    for value in np.unique(labelmap):
        if value != 0:
            ax.contour(labelmap == value, levels=[0.5], colors=colour, linewidths=1.5)


def _grid_lines(ax, atlas: np.ndarray, view: View, step: float) -> None:
    """Isolines every `step` mm of the two atlas coordinates that vary in the plane of `view` (the one
    along the panel's columns first): the deformed atlas grid."""
    plane = view.take(atlas)
    d = atlas.shape[-1]
    for component in (d - 1 - view.cols, d - 1 - view.rows):  # array axis -> ITK component
        values = plane[..., component]
        levels = np.arange(np.ceil(values.min() / step), np.floor(values.max() / step) + 1) * step
        if levels.size:
            ax.contour(values, levels=levels, colors=GRID_COLOUR, linewidths=0.8)


@dataclass
class _Case:
    """What the qualitative figure draws of one case (arrays in array order, on the image's grid)."""

    name: str
    title: str
    image: np.ndarray                 # float64, array order
    reference: np.ndarray | None
    labelmaps: dict                   # output -> array or None
    atlas: np.ndarray | None          # atlas coordinates (*size, D) or None
    step: float                       # grid line spacing (world units of the field's header)
    views: list


def _load_case(case: str, title: str, case_dir: Path, image_path: Path, reference: str | None,
               spacing: Sequence[float] | None, outputs: Sequence[tuple[str, str]] = PANEL_OUTPUTS) -> _Case:
    image, array = _image(image_path)
    shape = tuple(array.shape[:image.GetDimension()])
    if image.GetNumberOfComponentsPerPixel() > 1:  # RGB(A) PNG: its first channel
        array = array[..., 0]
    ref = _labelmap(Path(reference), shape) if reference is not None else None
    labelmaps = {}
    for output, _ in outputs:
        path = find_labelmap(case_dir, output)
        labelmaps[output] = None if path is None else _labelmap(path, shape)
    atlas, step = None, 0.0
    inv = case_dir / INVERSE_FIELD
    if inv.is_file():
        field = read_any(inv)
        atlas = _atlas_coordinates(field, inv)
        if atlas.shape[:-1] != shape:
            raise AtlasregError(f"array size {atlas.shape[:-1]} does not match the image's {shape}", inv)
        step = max(field.GetSize()) * min(field.GetSpacing()) / 16
    centre = foreground_centroid(ref) if ref is not None else None
    return _Case(case, title, array.astype(float), ref, labelmaps, atlas, step,
                 views(shape, display_spacing(image, image_path, spacing), centre))


def qualitative_figure(predictions: Path, references: dict, cases: list[str], titles: list[str],
                       spacing: Sequence[float] | None = None,
                       outputs: Sequence[tuple[str, str]] = PANEL_OUTPUTS) -> bytes | None:
    """Figs. 6-7: per case and view (:func:`views`: the image in 2-D; in 3-D its axial, coronal and
    sagittal planes through the reference's foreground centroid, or the volume centre without a
    reference or foreground) a row with the image, the labelmaps of `outputs` ((output, panel title):
    by default the ITN, 1-pass and refined ones; a column only for an output some shown case has) as
    contours over it (:data:`PREDICTION_COLOUR`, orange) with the reference (:data:`REFERENCE_COLOUR`, sky blue;
    a legend above names them), and the deformed atlas grid (:data:`GRID_COLOUR`; isolines of the two
    in-plane atlas coordinates of each subject point, from the case's inverse displacement field;
    :func:`atlas_coordinates`; the column only when some shown case has that field). Each panel's aspect follows the voxel spacing (:func:`display_spacing`
    with `spacing`, the declared spacing ITK order in mm, for files that store none).

    predictions: a segmentation run folder (case folders, :mod:`atlasreg.contracts`); references: case
    -> reference labelmap file; cases, titles: the cases to show and their row titles. The image is the
    one the case information names; None if no case has an image. Raises AtlasregError naming a
    malformed case information file, an unreadable image, labelmap or field, or one whose size differs
    from the image's."""
    loaded = []
    for case, title in zip(cases, titles):
        case_dir = Path(predictions) / case
        image_path = (read_case_info(case_dir) or {}).get("image")
        if image_path is None or not image_path.is_file():
            continue
        loaded.append(_load_case(case, title, case_dir, image_path, references.get(case), spacing, outputs))
    if not loaded:
        return None
    shown = [(o, name) for o, name in outputs if any(c.labelmaps[o] is not None for c in loaded)]
    grid = any(c.atlas is not None for c in loaded)
    columns = 1 + len(shown) + grid
    heights = [view.height(c.image.shape, PANEL_INCHES) for c in loaded for view in c.views]
    gap = 0.04, 0.18   # between panels and rows, in fractions of a panel (room for the titles)
    fig, axes = _subplots(len(heights), columns,
                          figsize=(columns * PANEL_INCHES * (1 + gap[0]), sum(heights) * (1 + gap[1])),
                          squeeze=False, gridspec_kw={"height_ratios": heights, "wspace": gap[0], "hspace": gap[1],
                                                      "left": 0.0, "right": 1.0, "bottom": 0.0, "top": 1.0})
    r = 0
    for c in loaded:
        for view in c.views:
            image = view.take(c.image)
            axes[r, 0].imshow(image, cmap="gray", aspect=view.aspect, interpolation="nearest")
            detail = f"({c.title})" + (f", {view.label}" if view.label else "")
            # a long case name and view on one line would run into the next panel's title
            axes[r, 0].set_title(f"{c.name}{chr(10) if len(c.name) + len(detail) > 40 else ' '}{detail}",
                                 fontsize=FONT_SIZE)
            for k, (output, name) in enumerate(shown, start=1):
                ax = axes[r, k]
                ax.imshow(image, cmap="gray", aspect=view.aspect, interpolation="nearest")
                if c.reference is not None:
                    _contours(ax, view.take(c.reference), REFERENCE_COLOUR)
                if c.labelmaps[output] is not None:
                    _contours(ax, view.take(c.labelmaps[output]), PREDICTION_COLOUR)
                ax.set_title(name, fontsize=FONT_SIZE)
            if grid:
                ax = axes[r, columns - 1]
                ax.imshow(image, cmap="gray", aspect=view.aspect, interpolation="nearest")
                if c.atlas is not None:
                    _grid_lines(ax, c.atlas, view, c.step)
                ax.set_title("deformed grid (refine)", fontsize=FONT_SIZE)
            for a in axes[r]:
                a.set_axis_off()
            r += 1
    handles = [Line2D([], [], color=PREDICTION_COLOUR, linewidth=2,
                      label=f"prediction ({', '.join(name for _, name in shown)})"),
               Line2D([], [], color=REFERENCE_COLOUR, linewidth=2, label="reference"),
               *([Line2D([], [], color=GRID_COLOUR, linewidth=2, label="deformed atlas grid")] if grid else [])]
    above_titles = 1.0 + 0.3 / fig.get_figheight()  # 0.3 inch above the axes: over the first row's titles
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, above_titles), ncol=len(handles),
               fontsize=FONT_SIZE,
               frameon=False)
    return _png(fig)


def bar_figure(table: ResultTable, metrics=("dice", "hd95", "asd")) -> bytes:
    """Fig. 8: mean ± std of each metric per method, one group of bars per test set (structures pooled);
    the columns in the colours of :data:`OKABE_ITO` in order (hatched from the ninth on)."""
    sets = table.test_sets()
    colours = list(OKABE_ITO.values())
    fig, axes = _subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
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
            ax.bar(np.arange(len(sets)) + j * width, means, width, yerr=stds, label=col, capsize=2,
                   color=colours[j % len(colours)], hatch="//" if j >= len(colours) else None,
                   edgecolor="white" if j >= len(colours) else None, ecolor="#555555")
        ax.set_xticks(np.arange(len(sets)) + 0.4 - width / 2)
        ax.set_xticklabels(sets, fontsize=FONT_SIZE)
        ax.set_title(METRIC_TITLES[metric], fontsize=FONT_SIZE + 1)
    axes[0, -1].legend(fontsize=FONT_SIZE - 1, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _png(fig)


def sensitivity_figure(points: list[tuple[float, dict]], metrics=("dice", "hd95", "asd")) -> bytes:
    """Figs. 8/15: refinement result against the regularisation weight lambda*. points: (lambda*,
    {metric: (mean, std)}) per evaluation, sorted by lambda* here."""
    points = sorted(points, key=lambda p: p[0])
    lams = [p[0] for p in points]
    fig, axes = _subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        mean = [p[1][metric][0] for p in points]
        std = [p[1][metric][1] for p in points]
        ax.errorbar(lams, mean, yerr=std, marker="o", capsize=2, color=OKABE_ITO["blue"])
        ax.set_xscale("log")
        ax.set_xlabel("λ* (refinement regularisation weight)", fontsize=FONT_SIZE)
        ax.set_title(f"Refine {METRIC_TITLES[metric]}", fontsize=FONT_SIZE + 1)
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
    fig, ax = _subplots(figsize=(5, 5))
    ax.scatter(xs, ys, s=14, color=OKABE_ITO["blue"])
    lo, hi = np.nanmin(xs + ys), np.nanmax(xs + ys)
    ax.plot([lo, hi], [lo, hi], "k--", linewidth=0.8)
    ax.set_xlabel(f"{x} {METRIC_TITLES[metric]}", fontsize=FONT_SIZE)
    ax.set_ylabel(f"{y} {METRIC_TITLES[metric]}", fontsize=FONT_SIZE)
    ax.set_title(test_set, fontsize=FONT_SIZE + 1)
    return _png(fig)


def atlas_figure(run_dir: Path) -> bytes | None:
    """Fig. 9: atlas image and foreground probability of the atlas labelmap (1 - background
    probability) at the start and the end of training (columns), from the initial and final atlas
    folders of the training run folder `run_dir` (:func:`atlasreg.contracts.run_paths`); rows: the image
    then the probability, each for every view (:func:`views`: the whole 2-D atlas, or the axial, coronal
    and sagittal mid-planes of a 3-D one), aspect from the atlas (model-grid) spacing. None when the run
    folder lacks them; AtlasregError naming a file that cannot be read."""
    run = run_paths(run_dir)
    stages = [(name, atlas_paths(folder)) for name, folder in (("start", run.atlas_initial), ("end", run.atlas))]
    stages = [(n, a) for n, a in stages if a.image.is_file()]
    if not stages:
        return None
    panels = []
    for name, atlas in stages:
        image, array = _image(atlas.image)
        probs_image, probs = _image(atlas.probabilities)
        fg = 1.0 - probs[..., 0] if probs_image.GetNumberOfComponentsPerPixel() > 1 else probs
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise AtlasregError(f"has {image.GetNumberOfComponentsPerPixel()} components per voxel; an atlas image "
                                "has 1", atlas.image)
        if fg.shape != array.shape:
            raise AtlasregError(f"array size {fg.shape} differs from the atlas image's {array.shape}",
                                atlas.probabilities)
        if panels and array.shape != panels[0][1].shape:
            raise AtlasregError(f"array size {array.shape} differs from the {panels[0][0]} atlas's "
                                f"{panels[0][1].shape}", atlas.image)
        panels.append((name, array, fg, views(array.shape, image.GetSpacing())))
    n_views = len(panels[0][3])
    width = PANEL_INCHES + 1.0
    heights = [max(vs[v].height(array.shape, width) for _, array, _, vs in panels) for v in range(n_views)] * 2
    fig, axes = _subplots(2 * n_views, len(stages), figsize=(width * len(stages), sum(heights)), squeeze=False,
                          gridspec_kw={"height_ratios": heights, "wspace": 0.45})
    for j, (name, array, fg, vs) in enumerate(panels):
        for v, view in enumerate(vs):
            where = f",\n{view.label}" if view.label else ""
            axes[v, j].imshow(view.take(array), cmap="gray", aspect=view.aspect)
            axes[v, j].set_title(f"atlas image ({name}{where})", fontsize=FONT_SIZE)
            axes[n_views + v, j].imshow(view.take(fg), cmap="magma", vmin=0, vmax=1, aspect=view.aspect)
            axes[n_views + v, j].set_title(f"atlas labelmap, foreground probability ({name}{where})",
                                           fontsize=FONT_SIZE - 1)
        for a in axes[:, j]:
            a.set_axis_off()
    return _png(fig)
