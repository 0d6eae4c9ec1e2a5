"""`atlasreg report` from a small hand-made result set: tables with significance marks, figures,
self-contained HTML and Markdown."""

import csv
import io
import json
import platform
import re
import shutil
import subprocess
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from atlasreg import contracts
from atlasreg.cli import main
from atlasreg.errors import AtlasregError
from atlasreg.report import build_report, figures
from atlasreg.report.results import Evaluation, collect, column_name
from atlasreg.report.tables import claims_table, metric_table, pairwise_table

CASES = [f"C{i}" for i in range(12)]


def _rows(method, dice):
    return [{"case": c, "method": method, "label": "1", "structure": "fg", "dice": d, "hd": 10 * (1 - d),
             "hd95": 8 * (1 - d), "asd": 2 * (1 - d), "components": 1, "holes": 0, "reference_components": 1,
             "reference_holes": 0} for c, d in zip(CASES, dice)]


def _dice_cells(rows):
    table = collect([Evaluation(Path("e"), {"test_set": "t"}, rows)])
    cells = metric_table(table, "t", n_boot=2000)
    return dict(zip([c.text for c in cells[0]][2:], cells[1][2:]))  # row 1: DSC


def test_best_column_marks_significantly_worse_columns_only():
    good = 0.9 + 0.01 * np.random.default_rng(0).standard_normal(12)
    by_col = _dice_cells(_rows("refine", good) + _rows("onepass", good - 0.05) + _rows("itn", good - 0.2))
    assert by_col["ITN"].text.endswith("<sup>*†</sup>")   # worse than the best and the second best
    assert by_col["1-pass"].text.endswith("<sup>*</sup>")  # worse than the best
    assert "<sup>" not in by_col["Refine"].text
    assert by_col["Refine"].bold and by_col["Refine"].underline
    assert by_col["1-pass"].bold and not by_col["1-pass"].underline and not by_col["ITN"].bold


def test_pairwise_table_gives_one_sided_p_values():
    good = 0.9 + 0.01 * np.random.default_rng(0).standard_normal(12)
    table = collect([Evaluation(Path("e"), {"test_set": "t"}, _rows("refine", good) + _rows("itn", good - 0.2))])
    rows = pairwise_table(table, "t", "fg", "dice", n_boot=2000)
    cells = {(r[0].text, h.text): c for r in rows[1:] for h, c in zip(rows[0][1:], r[1:])}
    # Refine is 0.2 better on every case: no bootstrap sample disagrees, p < 1/2000
    assert cells[("Refine", "ITN")].bold and cells[("Refine", "ITN")].text == "< 5e-4"
    assert not cells[("ITN", "Refine")].bold and float(cells[("ITN", "Refine")].text) > 0.99
    assert cells[("ITN", "ITN")].text == "–"


def test_identical_columns_are_not_significantly_different():
    good = 0.9 + 0.01 * np.random.default_rng(1).standard_normal(12)
    by_col = _dice_cells(_rows("refine", good) + _rows("itn", good))
    assert all("<sup>" not in c.text for c in by_col.values())


def test_column_names_follow_the_paper():
    assert column_name({"method": "unet"}, "itn_lcc") == "U-Net_lcc"
    assert column_name({"method": "unet", "fixed_atlas": "B1"}, "refine") == "Independent"
    assert column_name({"method": "vml"}, "onepass") == "VML"
    assert column_name({"fixed_atlas": "B1"}, "refine") == "Fixed Refine"
    assert column_name({"seg_weight": 0.0}, "onepass") == "Atlas-ISTN-L_s 1-pass"
    assert column_name({"seg_weight": 0.0}, "refine") is None  # refinement towards a non-segmentation
    assert column_name({"stn_variant": "svf"}, "onepass") == "SVF 1-pass"
    assert column_name({}, "atlas") == "Id" and column_name({"method": "unet"}, "onepass") is None


def _write_eval(folder, info, rows, case_dirs=None):
    folder.mkdir(parents=True)
    with open(folder / "metrics_per_case.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (folder / "info.yaml").write_text(yaml.safe_dump(info))
    with open(folder / "transforms_per_case.csv", "w") as f:
        f.write("case,method,mice_mm,mice_voxels,ic_dsc,nonpositive_jacobian_fraction,std_log_jacobian\n")
        for c in CASES:
            f.write(f"{c},refine,0.1,0.05,0.997,0.0,0.02\n")
    with open(folder / "quality_control.csv", "w") as f:
        f.write("case,dice_itn_refine,itn_outside_refine,qc_score,refine_dice,flagged\n")
        for i, c in enumerate(CASES):
            f.write(f"{c},{1 - i / 20},{i / 40},{i / 20},{1 - i / 25},{i >= 10}\n")


def test_report_command_writes_html_and_markdown(tmp_path):
    # One case folder per case with an image, labelmaps and an inverse displacement for the qualitative figure.
    seg = tmp_path / "seg"
    refs = {c: _case2d(seg, c) for c in CASES}
    base = np.linspace(0.8, 0.95, 12)
    main_rows = _rows("itn", base - 0.1) + _rows("onepass", base - 0.05) + _rows("refine", base) + _rows("atlas", base - 0.3)
    _write_eval(tmp_path / "ev_main", {"test_set": "corrupt", "model": "m", "predictions": str(seg),
                                       "references": refs, "refinement": {"lambda": 0.126}}, main_rows)
    _write_eval(tmp_path / "ev_unet", {"test_set": "corrupt", "method": "unet"},
                _rows("itn", base - 0.12) + _rows("itn_lcc", base - 0.08))
    _write_eval(tmp_path / "ev_lam", {"test_set": "corrupt", "refinement": {"lambda": 1.0}}, main_rows)
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "ev_main"), str(tmp_path / "ev_unet"), "--sensitivity",
                 str(tmp_path / "ev_main"), str(tmp_path / "ev_lam"), "--out", str(out), "--bootstrap", "500"]) == 0
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for name in ("ITN", "1-pass", "Refine", "U-Net", "U-Net_lcc", "MICE", "IC-DSC", "λ*", "row better than column"):
        assert name in html and name in md
    assert html.count("data:image/png;base64,") >= 4  # scatter, qualitative, bars, sensitivity embedded
    assert "src='figures/" not in html and "](figures/figure01.png)" in md
    assert "0.997" in md  # IC-DSC from transforms_per_case.csv
    assert "recall" not in md and "C11" in md  # flagged cases listed
    rows = [line for line in md.splitlines() if line.startswith("| fg | DSC")]
    assert rows and "^*" in rows[0]  # the worse columns carry significance marks


def test_report_rejects_a_folder_that_is_not_an_evaluation(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "metrics_per_case.csv" in capsys.readouterr().err


def test_claims_table_gives_verdicts_for_present_columns_only():
    rng = np.random.default_rng(3)
    good = 0.9 + 0.01 * rng.standard_normal(12)
    rows = (_rows("refine", good) + _rows("itn", good - 0.2) + _rows("onepass", good + 0.001 * rng.standard_normal(12)))
    table = collect([Evaluation(Path("e"), {"test_set": "t"}, rows),
                     Evaluation(Path("f"), {"test_set": "t", "fixed_atlas": "C0"}, _rows("refine", good + 0.1))])
    claims = {r[0].text: r for r in claims_table(table, "t", n_boot=2000)[1:]}
    assert set(claims) == {"Refine beats the ITN (Refine vs ITN)", "Refine beats 1-pass (Refine vs 1-pass)",
                           "A learnt atlas beats a fixed one (refine) (Refine vs Fixed Refine)"}
    itn = claims["Refine beats the ITN (Refine vs ITN)"]
    assert itn[-1].text == "holds" and itn[2].text.startswith("+0.200")
    assert itn[3].text.startswith("+2.000")  # HD 2 lower: positive means better for distances too
    assert claims["Refine beats 1-pass (Refine vs 1-pass)"][-1].text == "not shown"
    fixed = claims["A learnt atlas beats a fixed one (refine) (Refine vs Fixed Refine)"]
    assert fixed[-1].text == "reversed" and "worse" in fixed[2].text


def test_claims_verdict_names_partial_reversals():
    good = 0.9 + 0.01 * np.random.default_rng(4).standard_normal(12)
    itn = _rows("itn", good)
    for r in itn:   # same Dice, but a lower HD than refine: worse on one metric only
        r["hd"] -= 1.0
    table = collect([Evaluation(Path("e"), {"test_set": "t"}, _rows("refine", good) + itn)])
    (claim,) = claims_table(table, "t", n_boot=2000)[1:]
    assert claim[-1].text == "reversed on 1 of 4" and "worse" in claim[3].text


# --------------------------------------------------------------------------------------------------
# figures of 2-D and 3-D case folders and atlases (report.figures)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# predictions, references and the deformed grid in the Okabe-Ito palette (orange, sky blue, yellow)
PREDICTION, REFERENCE, GRID = (mcolors.to_rgba(c) for c in ("#E69F00", "#56B4E9", "#F0E442"))


def _figures_of(monkeypatch) -> list:
    """The matplotlib figures that report.figures turns into PNG bytes from now on."""
    seen = []
    original = figures._png

    def keep(fig):
        seen.append(fig)
        return original(fig)

    monkeypatch.setattr(figures, "_png", keep)
    return seen


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == PNG_SIGNATURE
    height, width = plt.imread(io.BytesIO(png)).shape[:2]
    return width, height


def _colours(ax) -> set:
    """The line colours of the contour sets drawn on an Axes."""
    return {tuple(float(v) for v in c) for coll in ax.collections for c in np.atleast_2d(coll.get_edgecolor())}


def _write(array, path, spacing=None, vector=False) -> Path:
    image = sitk.GetImageFromArray(array, isVector=vector)
    if spacing is not None:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return Path(path)


SHAPE3 = (6, 10, 12)          # array order (z, y, x)
SPACING3 = (0.5, 0.8, 3.0)    # ITK order (x, y, z), mm: anisotropic


def _box(shape, lo, hi) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1
    return mask


def _case3d(seg: Path, case: str, spacing=SPACING3, reference: np.ndarray | None = None) -> Path:
    """A 3-D case folder as `atlasreg segment` writes it: NIfTI labelmaps (the reference shifted by
    one voxel along x for ITN and 1-pass), an inverse displacement field and the case information
    naming the input image (written beside). Returns the reference labelmap file."""
    d = seg / case
    d.mkdir(parents=True)
    ref = _box(SHAPE3, (1, 2, 6), (4, 5, 11)) if reference is None else reference
    image = _write((100.0 * ref + np.arange(SHAPE3[2])).astype(np.float32), seg / f"{case}_image.nii.gz", spacing)
    for output, shift in (("itn", 1), ("onepass", -1), ("refine", 0)):
        _write(np.roll(ref, shift, axis=2), contracts.case_labelmap_path(d, output, ".nii.gz"), spacing)
    field = 0.3 * np.sin(np.indices(SHAPE3)[::-1].transpose(1, 2, 3, 0))  # (z, y, x, 3), components (x, y, z)
    _write(field, d / contracts.INVERSE_FIELD, spacing, vector=True)
    contracts.write_case_info(d, image)
    return _write(ref, seg / f"{case}_reference.nii.gz", spacing)


def test_qualitative_figure_shows_three_planes_of_a_volume_through_the_reference_centroid(tmp_path, monkeypatch):
    figs = _figures_of(monkeypatch)
    seg = tmp_path / "seg"
    ref_a = _case3d(seg, "A")   # foreground z 1-3, y 2-4, x 6-10: centroid voxel (2, 3, 8)
    _case3d(seg, "B", reference=_box(SHAPE3, (2, 3, 4), (5, 7, 9)))  # no reference given: the planes
    # through the volume centre (3, 5, 6)
    png = figures.qualitative_figure(seg, {"A": str(ref_a)}, ["A", "B"], ["best", "worst"])
    width, height = _png_size(png)
    axes = np.array(figs[0].axes).reshape(6, 5)  # one row per case and view; image, ITN, 1-pass, refine, grid
    sx, sy, sz = SPACING3
    for row, case, centre in ((0, "A", (2, 3, 8)), (3, "B", (3, 5, 6))):
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(seg / f"{case}_image.nii.gz"))).astype(float)
        z, y, x = centre
        planes = (image[z], image[:, y, :], image[:, :, x])
        aspects = (sy / sx, sz / sx, sz / sy)  # rows over columns: (y, x), (z, x), (z, y)
        for v, (plane, aspect, name) in enumerate(zip(planes, aspects, ("axial", "coronal", "sagittal"))):
            ax_row = axes[row + v]
            assert name in ax_row[0].get_title()
            for ax in ax_row:
                np.testing.assert_array_equal(ax.images[0].get_array(), plane)
                assert ax.get_aspect() == pytest.approx(aspect)
            assert GRID in _colours(ax_row[4])  # the deformed grid's isolines
            for ax in ax_row[1:4]:  # the outputs in orange, the reference in sky blue where there is one
                assert PREDICTION in _colours(ax) and (REFERENCE in _colours(ax)) == (row == 0)
    assert axes[1, 0].get_title() == "A (best), coronal y=3" and height > width


def test_qualitative_figure_takes_the_declared_spacing_for_a_volume_without_one(tmp_path, monkeypatch):
    figs = _figures_of(monkeypatch)
    seg = tmp_path / "seg"
    ref = _case3d(seg, "A", spacing=None)   # a default NIfTI header (e.g. ACDC): unit spacing
    refs, declared = {"A": str(ref)}, [1.5, 1.5, 8.0]
    figures.qualitative_figure(seg, refs, ["A"], ["t"])
    figures.qualitative_figure(seg, refs, ["A"], ["t"], spacing=declared)
    assert [ax.get_aspect() for ax in figs[0].axes[::5]] == [1.0, 1.0, 1.0]
    # rows as high as their panels at unit spacing: (10 x 12), (6 x 12) and (6 x 10) voxels
    heights = figs[0].axes[0].get_subplotspec().get_gridspec().get_height_ratios()
    w = figures.PANEL_INCHES
    assert heights == pytest.approx([w * 10 / 12, w * 6 / 12, w * 6 / 10])
    assert [ax.get_aspect() for ax in figs[1].axes[::5]] == pytest.approx([1.0, 8.0 / 1.5, 8.0 / 1.5])
    _case3d(seg, "B")   # a file with its own spacing keeps it
    figures.qualitative_figure(seg, refs, ["B"], ["t"], spacing=declared)
    assert figs[2].axes[5].get_aspect() == pytest.approx(SPACING3[2] / SPACING3[0])
    with pytest.raises(AtlasregError, match="declared spacing .* does not match the 3-D image"):
        figures.qualitative_figure(seg, refs, ["A"], ["t"], spacing=[1.5, 1.5])


def test_qualitative_figure_has_columns_only_for_the_outputs_and_grid_a_case_has(tmp_path, monkeypatch):
    """A propagation run (DeepATLAS: a 1-pass labelmap per case, no field): the image and one column,
    titled as asked; no empty ITN, refine or grid panels."""
    figs = _figures_of(monkeypatch)
    seg = tmp_path / "seg"
    ref = _case3d(seg, "A")
    for output in ("itn", "refine"):
        contracts.case_labelmap_path(seg / "A", output, ".nii.gz").unlink()
    (seg / "A" / contracts.INVERSE_FIELD).unlink()
    figures.qualitative_figure(seg, {"A": str(ref)}, ["A"], ["t"], outputs=(("onepass", "DeepATLAS"), ("itn", "ITN")))
    axes = np.array(figs[0].axes).reshape(3, 2)  # three planes; image and the one output there is
    assert [ax.get_title() for ax in axes[:, 1]] == ["DeepATLAS"] * 3
    assert all(PREDICTION in _colours(ax) and REFERENCE in _colours(ax) for ax in axes[:, 1])
    assert [t.get_text() for t in figs[0].legends[0].get_texts()] == ["prediction (DeepATLAS)", "reference"]


def test_qualitative_figure_rejects_a_labelmap_of_another_size(tmp_path):
    seg = tmp_path / "seg"
    ref = _case3d(seg, "A")
    _write(np.zeros((6, 10, 11), np.uint8), contracts.case_labelmap_path(seg / "A", "onepass", ".nii.gz"))
    with pytest.raises(AtlasregError, match=r"onepass.*array size \(6, 10, 11\) does not match the image's "
                                            r"\(6, 10, 12\)"):
        figures.qualitative_figure(seg, {"A": str(ref)}, ["A"], ["t"])


def _save_atlases(run_dir: Path, size, spacing, n_labels: int = 3) -> dict:
    """Initial and final atlas folders of a training run, written by atlasreg.atlas.save_atlas."""
    import torch

    from atlasreg.atlas import save_atlas
    from atlasreg.spatial.grid import Grid

    run = contracts.run_paths(run_dir)
    grid = Grid.centred(size, spacing)
    out = {}
    for folder, sharpness in ((run.atlas_initial, 1.0), (run.atlas, 4.0)):
        logits = sharpness * torch.randn((1, n_labels, *size), generator=torch.Generator().manual_seed(0))
        probs, image = logits.softmax(1), torch.rand((1, 1, *size), generator=torch.Generator().manual_seed(1))
        save_atlas(probs, image, list(range(n_labels)), grid, folder)
        out[folder.name] = (probs[0].numpy(), image[0, 0].numpy())
    return out


def test_atlas_figure_shows_three_mid_planes_of_a_3d_atlas(tmp_path, monkeypatch):
    figs = _figures_of(monkeypatch)
    size, spacing = (4, 6, 8), (1.0, 0.5, 2.5)    # array order (z, y, x); ITK order (x, y, z), mm
    atlases = _save_atlases(tmp_path, size, spacing)
    png = figures.atlas_figure(tmp_path)
    _png_size(png)
    axes = np.array(figs[0].axes).reshape(6, 2)  # image and foreground probability, 3 views each; start, end
    mid = [slice(None)] * 3
    run = contracts.run_paths(tmp_path)
    for j, folder in enumerate((run.atlas_initial, run.atlas)):
        probs, image = atlases[folder.name]
        fg = 1.0 - probs[0]
        for v, (axis, aspect) in enumerate(((0, 0.5 / 1.0), (1, 2.5 / 1.0), (2, 2.5 / 0.5))):
            index = list(mid)
            index[axis] = size[axis] // 2
            np.testing.assert_allclose(axes[v, j].images[0].get_array(), image[tuple(index)])
            np.testing.assert_allclose(axes[3 + v, j].images[0].get_array(), fg[tuple(index)], atol=1e-6)
            assert axes[v, j].get_aspect() == pytest.approx(aspect) == axes[3 + v, j].get_aspect()
    assert figures.atlas_figure(tmp_path / "no_run") is None
    _write(np.zeros((4, 6, 7, 3), np.float32), contracts.atlas_paths(run.atlas).probabilities, vector=True)
    with pytest.raises(AtlasregError, match=r"array size \(4, 6, 7\) differs from the atlas image's \(4, 6, 8\)"):
        figures.atlas_figure(tmp_path)


def _case2d(seg: Path, case: str) -> str:
    d = seg / case
    d.mkdir(parents=True)
    img = np.zeros((32, 32), np.uint8)
    img[8:24, 8:24] = 200
    sitk.WriteImage(sitk.GetImageFromArray(img), str(d / "image.png"))
    lab = (img > 0).astype(np.uint8)
    for shift, out in enumerate(("itn", "onepass", "refine")):
        _write(np.roll(lab, shift, 1), contracts.case_labelmap_path(d, out, ".png"))
    field = 0.5 * np.sin(np.indices((32, 32))[::-1].transpose(1, 2, 0) / 3.0)
    sitk.WriteImage(sitk.GetImageFromArray(field, isVector=True), str(d / contracts.INVERSE_FIELD))
    contracts.write_case_info(d, d / "image.png")
    return str(contracts.case_labelmap_path(d, "refine", ".png"))


def _panel_pixels(ax) -> tuple[float, float]:
    """Width and height (pixels of the PNG, at figures.DPI) of the image drawn on an Axes."""
    box = ax.get_window_extent()
    return box.width * figures.DPI / ax.figure.dpi, box.height * figures.DPI / ax.figure.dpi


def test_2d_figures_keep_their_layout_and_size(tmp_path, monkeypatch):
    """2-D output: one row per case, square panels, and the PNG size measured for these folders when
    the figures were made larger (issue 13: panels of about 170 pixels, 855 x 559 and 481 x 463 before,
    measured at commit c8e7040; 1580 x 1137 and 677 x 628 now, panels of 300 and 250 pixels)."""
    figs = _figures_of(monkeypatch)
    seg = tmp_path / "seg"
    refs = {c: _case2d(seg, c) for c in ("C0", "C1", "C2")}
    png = figures.qualitative_figure(seg, refs, ["C0", "C1", "C2"], ["best", "median", "worst"])
    assert _png_size(png) == (1580, 1137)
    axes = np.array(figs[0].axes).reshape(3, 5)
    assert all(min(_panel_pixels(ax)) >= 295 for ax in axes.flat)
    assert [ax.get_title() for ax in axes[0]] == ["C0 (best)", "ITN", "1-pass", "Refine", "deformed grid (refine)"]
    assert all(ax.get_aspect() == 1.0 for ax in axes.flat)
    np.testing.assert_array_equal(axes[1, 2].images[0].get_array(),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(seg / "C1" / "image.png"))))
    atlases = _save_atlases(tmp_path / "run", (16, 16), (2.0, 2.0), n_labels=2)
    png = figures.atlas_figure(tmp_path / "run")
    assert _png_size(png) == (677, 628)
    axes = np.array(figs[1].axes).reshape(2, 2)
    assert all(min(_panel_pixels(ax)) >= 250 for ax in axes.flat)
    assert [ax.get_title() for ax in axes[:, 1]] == ["atlas image (end)",
                                                     "atlas labelmap, foreground probability (end)"]
    np.testing.assert_allclose(axes[1, 1].images[0].get_array(), 1.0 - atlases["atlas"][0][0], atol=1e-6)


def test_report_of_a_3d_evaluation(tmp_path, monkeypatch):
    """`atlasreg evaluate` of 3-D case folders (unit-spacing headers, as ACDC's) read by `atlasreg report`:
    the tables hold the 3-D metrics, the qualitative figure three planes per case at the run's declared
    spacing, the atlas figure three planes per atlas."""
    from atlasreg.evaluation.evaluate import evaluate_predictions

    figs = _figures_of(monkeypatch)
    seg = tmp_path / "seg"
    refs = {c: str(_case3d(seg, c, spacing=None, reference=_box(SHAPE3, (1, 2, 2 + i), (5, 8, 8 + i))))
            for i, c in enumerate(("P0", "P1", "P2", "P3"))}
    run = contracts.run_paths(tmp_path / "run")
    _save_atlases(run.root, (4, 6, 8), (1.0, 1.0, 4.0))
    run.config.write_text(yaml.safe_dump({"data": {"spacing": [1.5, 1.5, 8.0]}}))  # as train writes it
    evaluate_predictions(seg, refs, {0: "background", 1: "heart"}, tmp_path / "ev", test_set="volumes",
                         info={"model": "m3d", "checkpoint": str(run.final_checkpoint), "references": refs})
    html_path, md_path = build_report([tmp_path / "ev"], tmp_path / "report", n_boot=200)
    md = md_path.read_text()
    # ITN and 1-pass: the reference box (6 voxels along x) shifted by one voxel: DSC 5/6, HD 1 voxel
    dsc = next(line for line in md.splitlines() if line.startswith("| heart | DSC"))
    hd = next(line for line in md.splitlines() if line.startswith("| heart | HD ↓"))
    assert dsc.count("0.833 ± 0.000") == 2 and "1.000 ± 0.000" in dsc
    assert hd.count("1.00 ± 0.00") == 2 and "0.00 ± 0.00" in hd
    assert html_path.read_text().count("data:image/png;base64,") == len(figs) >= 4  # scatter, panels, bars, atlas
    qualitative = next(f for f in figs if len(f.axes) == 3 * 3 * 5)   # best, median, worst; 3 planes each
    assert [ax.get_aspect() for ax in qualitative.axes[:15:5]] == pytest.approx([1.0, 8.0 / 1.5, 8.0 / 1.5])
    atlas = next(f for f in figs if len(f.axes) == 6 * 2)
    assert [ax.get_aspect() for ax in atlas.axes[:6:2]] == pytest.approx([1.0, 4.0, 4.0])


def test_declared_spacing_is_the_data_spacing_of_the_checkpoint_run(tmp_path):
    from atlasreg.report import _declared_spacing

    run = contracts.run_paths(tmp_path)
    info = {"checkpoint": str(run.final_checkpoint)}
    assert _declared_spacing({}) is None and _declared_spacing(info) is None   # no checkpoint; no run config
    run.config.write_text(yaml.safe_dump({"data": {"labels": {0: "background", 1: "fg"}}}))
    assert _declared_spacing(info) is None
    run.config.write_text(yaml.safe_dump({"data": {"spacing": [1.5, 1.5, 8]}}))
    assert _declared_spacing(info) == [1.5, 1.5, 8.0]
    # an evaluation of checkpoints/last.ckpt finds the run's config one folder up
    assert _declared_spacing({"checkpoint": str(tmp_path / "checkpoints" / "last.ckpt")}) == [1.5, 1.5, 8.0]
    run.config.write_text(yaml.safe_dump({"data": {"spacing": [1.5, "x"]}}))
    with pytest.raises(AtlasregError, match=r"data.spacing = \[1.5, 'x'\] is not a list of positive numbers") as error:
        _declared_spacing(info)
    assert error.value.path == str(run.config)


# --------------------------------------------------------------------------------------------------
# the page (issue 13 item 6): contents and anchors, provenance, every column, one name for the atlas,
# p-values, per-case table; loaded in headless Chromium

def test_format_p_is_one_over_n_boot_where_no_bootstrap_sample_disagrees():
    from atlasreg.evaluation.statistics import paired_bootstrap
    from atlasreg.report.tables import format_p

    a = 0.9 + 0.01 * np.random.default_rng(5).standard_normal(12)
    res = paired_bootstrap(a, a - 0.2, n_boot=10000)
    assert res["p_value"] == 0.0 and format_p(res["p_value"], 10000) == "< 1e-4"
    assert [format_p(0.0, n) for n in (500, 2000, 3000, 1)] == ["< 0.002", "< 5e-4", "< 3.3e-4", "< 1"]
    assert [format_p(p, 10000) for p in (0.0123, 0.001, 4e-4, 2.5e-4, 1.0)] == ["0.012", "0.001", "4e-4", "2.5e-4",
                                                                               "1.000"]


def test_claims_cells_name_the_direction_each_p_value_tests():
    good = 0.9 + 0.01 * np.random.default_rng(3).standard_normal(12)
    table = collect([Evaluation(Path("e"), {"test_set": "t"}, _rows("refine", good) + _rows("itn", good - 0.2)),
                     Evaluation(Path("f"), {"test_set": "t", "fixed_atlas": "C0"}, _rows("refine", good + 0.1))])
    claims = {r[0].text: r for r in claims_table(table, "t", n_boot=2000)[1:]}
    itn = claims["Refine beats the ITN (Refine vs ITN)"]
    assert itn[2].text == "+0.200 (p < 5e-4 that Refine is better)" and itn[2].bold
    fixed = claims["A learnt atlas beats a fixed one (refine) (Refine vs Fixed Refine)"]
    assert fixed[2].text == "-0.100 (worse: p < 5e-4 that Fixed Refine is better)" and not fixed[2].bold


def test_every_output_has_a_column_and_the_undeformed_atlas_one_name():
    assert column_name({}, "itn_lcc") == "ITN_lcc" and column_name({"fixed_atlas": "B1"}, "itn_lcc") == "Fixed ITN_lcc"
    assert [column_name(info, "atlas") for info in ({}, {"fixed_atlas": "B1"}, {"method": "unet"}, {"method": "vml"},
                                                    {"seg_weight": 0.0})] == \
        ["Id", "Fixed Id", "U-Net Id", "VML Id", "Atlas-ISTN-L_s Id"]
    from atlasreg.report.results import hidden_reason

    assert "untrained" in hidden_reason({"method": "unet"}, "onepass")
    assert "without L_s" in hidden_reason({"seg_weight": 0.0}, "itn_lcc")


REFINE_ORDER = [3, 7, 0, 11, 5, 1, 9, 2, 10, 6, 4, 8]   # case index of the 1st, 2nd, ... lowest Refine DSC
SHA = "ab" * 32


@pytest.fixture(scope="module")
def issue13_report(tmp_path_factory):
    """`atlasreg report` (the command line) of an Atlas-ISTN evaluation with all five outputs and a
    U-Net evaluation with a fixed atlas, 12 2-D case folders, a training run folder with its config:
    (report folder, the Atlas-ISTN evaluation's info, {case: Refine DSC})."""
    tmp = tmp_path_factory.mktemp("issue13")
    seg = tmp / "seg"
    refs = {c: _case2d(seg, c) for c in CASES}
    run = contracts.run_paths(tmp / "run")
    run.root.mkdir()
    run.config.write_text(yaml.safe_dump({"name": "m"}))
    refine = np.empty(12)
    refine[REFINE_ORDER] = np.linspace(0.8, 0.95, 12)
    info = {"test_set": "corrupt", "model": "m", "method": "atlas_istn", "predictions": str(seg), "references": refs,
            "checkpoint": str(run.final_checkpoint), "checkpoint_sha256": SHA,
            "refinement": {"iterations": 50, "lambda": 0.126}}
    _write_eval(tmp / "ev_main", info, _rows("itn", refine - 0.1) + _rows("itn_lcc", refine - 0.02)
                + _rows("onepass", refine - 0.05) + _rows("refine", refine) + _rows("atlas", refine - 0.3))
    _write_eval(tmp / "ev_unet", {"test_set": "corrupt", "method": "unet", "fixed_atlas": "C0"},
                _rows("itn", refine - 0.12) + _rows("itn_lcc", refine - 0.08) + _rows("onepass", refine - 0.3)
                + _rows("refine", refine - 0.01) + _rows("atlas", refine - 0.3))
    out = tmp / "report"
    assert main(["report", str(tmp / "ev_main"), str(tmp / "ev_unet"), "--out", str(out), "--bootstrap", "500"]) == 0
    return out, info, dict(zip(CASES, refine))


class _ParsedPage(HTMLParser):
    """Headings (tag, id, text), links, image sources, the navigation's links and the tables (rows of
    (cell text, data-value or None)) of an HTML page."""

    def __init__(self, text: str):
        super().__init__()
        self.headings, self.links, self.sources, self.nav, self.tables = [], [], [], [], []
        self._heading, self._in_nav, self._cell = None, False, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "nav":
            self._in_nav = True
        elif tag in ("h2", "h3") and not self._in_nav:
            self._heading = [tag, a.get("id"), ""]
        elif tag == "a" and "href" in a:
            (self.nav if self._in_nav else self.links).append(a["href"])
        elif tag in ("img", "script", "link") and ("src" in a or "href" in a):
            self.sources.append(a.get("src") or a.get("href"))
        elif tag == "table":
            self.tables.append((a.get("class"), []))
        elif tag == "tr":
            self.tables[-1][1].append([])
        elif tag in ("td", "th"):
            self._cell = ["", a.get("data-value")]

    def handle_endtag(self, tag):
        if tag == "nav":
            self._in_nav = False
        elif tag in ("h2", "h3") and self._heading:
            self.headings.append(tuple(self._heading))
            self._heading = None
        elif tag in ("td", "th") and self._cell:
            self.tables[-1][1][-1].append(tuple(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._heading is not None:
            self._heading[2] += data
        if self._cell is not None:
            self._cell[0] += data

    def table(self, first_header: str) -> list[list[tuple]]:
        return next(rows for _, rows in self.tables if rows and rows[0][0][0] == first_header)


def test_report_has_contents_provenance_every_column_and_a_per_case_table(issue13_report):
    import torch

    import atlasreg

    out, info, refine = issue13_report
    text = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    page = _ParsedPage(text)
    # every heading has a unique id; the contents link to each, in order; every link and source is inside
    ids = [h[1] for h in page.headings]
    assert all(ids) and len(set(ids)) == len(ids) and page.nav == [f"#{i}" for i in ids]
    assert {"provenance", "test-set-corrupt", "corrupt-per-case", "corrupt-claims"} <= set(ids)
    assert all(link[1:] in ids + ["contents"] for link in page.links)
    assert page.sources and all(s.startswith("data:image/png;base64,") for s in page.sources)
    for ident in ids:  # the Markdown has the same anchors and contents
        assert f'<a id="{ident}"></a>' in md and f"](#{ident})" in md
    # provenance: the evaluation's checkpoint, its SHA-256, the run's config, refinement; the versions
    provenance = dict((row[0][0], row[1][0]) for row in page.table("")[1:])
    assert provenance["Checkpoint"] == info["checkpoint"] and provenance["Checkpoint SHA-256"] == SHA
    assert provenance["Training configuration"] == str(Path(info["checkpoint"]).parent / contracts.RUN_CONFIG)
    assert provenance["Refinement settings"] == "iterations = 50, lambda = 0.126"
    assert provenance["References named"] == provenance["Cases evaluated"] == "12"
    for version in (f"atlasreg {atlasreg.__version__}", f"torch {torch.__version__}",
                    f"SimpleITK {sitk.Version.VersionString()}", f"Python {platform.python_version()}"):
        assert version in text
    manifest = contracts.read_report_info(out)
    assert manifest["evaluations"] == [str(out.parent / "ev_main"), str(out.parent / "ev_unet")]
    assert manifest["sensitivity"] == []
    assert manifest["provenance"]["evaluations"][0]["checkpoint_sha256"] == SHA
    assert manifest["provenance"]["software"]["torch"] == str(torch.__version__)
    # every output a column (ITN_lcc too), the undeformed atlas named 'Id'; the U-Net's 1-pass listed as hidden
    accuracy = [c[0] for c in page.table("Structure")[0]]
    assert accuracy[2:] == ["ITN", "ITN_lcc", "1-pass", "Refine", "Id", "U-Net", "U-Net_lcc", "Independent", "U-Net Id"]
    columns = {c[0] for _, rows in page.tables for c in rows[0]} | {r[0][0] for r in page.table("Method")}
    assert "Id" in columns and "Identity" not in text and not {"atlas", "Atlas", "Identity"} & columns
    hidden = page.table("Evaluation folder")
    assert [c[0] for c in hidden[1]][1:] == ["onepass",
                                             "the U-Net's STN is untrained: its 1-pass is the undeformed atlas"]
    # p-values: '< 1/500' where no bootstrap sample disagrees (Refine beats Id on every case), never 0.0000
    cells = [c[0] for _, rows in page.tables for row in rows for c in row]
    assert "< 0.002" in cells and "0.0000" not in cells and not any("p=0.000" in c for c in cells)
    # the per-case table: one row per case in natural order, sortable, its cells carrying their values
    sortable = [rows for cls, rows in page.tables if cls == "sortable"]
    assert len(sortable) == 1
    head, *rows = sortable[0]
    column = [c[0] for c in head].index("Refine DSC")
    assert [r[0][0] for r in rows] == CASES
    for r in rows:
        assert float(r[column][1]) == pytest.approx(refine[r[0][0]], abs=1e-12)
        assert r[column][0] == f"{refine[r[0][0]]:.3f}"
    assert "| C11 | fg |" in md


CHECK = """<script>
window.addEventListener("error", function (event) {
  var t = event.target;
  if (t && t !== window) console.error("failed to load: " + (t.src || t.href || t.tagName));
}, true);
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  images.forEach(function (i) {
    if (!i.complete || i.naturalWidth === 0) console.error("image not shown: " + i.src.slice(0, 40));
  });
  var result = {images: images.length, shown: images.filter(function (i) { return i.naturalWidth > 0; }).length};
  var table = document.querySelector("table.sortable");
  if (table) {
    var head = Array.prototype.slice.call(table.tHead.rows[0].cells);
    var th = head.filter(function (h) { return h.textContent === "Refine DSC"; })[0];
    var cases = function () {
      return Array.prototype.map.call(table.tBodies[0].rows, function (r) { return r.cells[0].textContent; });
    };
    th.click();
    result.ascending = cases();
    th.click();
    result.descending = cases();
  }
  var pre = document.createElement("pre");
  pre.id = "atlasreg-check";
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>"""


def _chromium(page: Path, profile: Path) -> tuple[list[str], dict | None]:
    """Load `page` in headless Chromium: its console messages (what the page logged and every uncaught
    error, from Chromium's log on stderr) and the result the CHECK script left in the page."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    done = subprocess.run([binary, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={profile}",
                           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=180)
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    found = re.search(r"<pre id=\"atlasreg-check\">(.*?)</pre>", done.stdout, re.S)
    return console, json.loads(unescape(found.group(1))) if found else None


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="no chromium binary on PATH (Debian: apt-get install chromium); the page is not "
                           "loaded in a browser")
def test_report_page_loads_in_headless_chromium_without_errors(issue13_report, tmp_path):
    out, _, refine = issue13_report
    text = (out / "report.html").read_text()
    page = out / "chromium_check.html"   # beside the report, so relative paths resolve as they would there
    page.write_text(text.replace("<head>", "<head>" + CHECK, 1))
    console, result = _chromium(page, tmp_path / "profile")
    assert console == [] and result is not None
    assert result["images"] == result["shown"] == text.count("<img ") >= 3
    by_refine = sorted(refine, key=refine.get)
    assert result["ascending"] == by_refine and result["descending"] == by_refine[::-1]
    # the check sees a figure that does not load, and a script error
    broken = text.replace("<img src='data:image/png;base64,", "<img src='figures/none.png' data-x='", 1)
    broken = broken.replace("</body>", "<script>nothing();</script></body>")
    page.write_text(broken.replace("<head>", "<head>" + CHECK, 1))
    console, result = _chromium(page, tmp_path / "profile")
    assert any("failed to load: file://" in line and "figures/none.png" in line for line in console)
    assert any("image not shown" in line for line in console)
    assert any("Uncaught ReferenceError: nothing is not defined" in line for line in console)
    assert result["shown"] == result["images"] - 1
    page.unlink()


def test_report_shows_progress_on_a_terminal_only(tmp_path, monkeypatch):
    """Issue 13 item 4: `report` shows a progress bar on a terminal (cleared at the end) and none
    when stderr is not one or with --quiet; the report is the same either way."""
    import io
    import sys

    base = np.linspace(0.8, 0.95, 12)
    _write_eval(tmp_path / "ev", {"test_set": "t"}, _rows("itn", base - 0.1) + _rows("refine", base))

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    outputs = {}
    for name, argv in (("bar", []), ("quiet", ["--quiet"])):
        err = Terminal()
        monkeypatch.setattr(sys, "stderr", err)
        assert main(["report", str(tmp_path / "ev"), "--out", str(tmp_path / name), "--bootstrap", "50", *argv]) == 0
        outputs[name] = err.getvalue()
    monkeypatch.undo()
    assert "report" in outputs["bar"] and "step" in outputs["bar"] and outputs["quiet"] == ""
    strip = lambda text: re.sub(r"Generated [^<|\n]*|\d{4}-\d\d-\d\dT[\d:+.-]+|/report/|/quiet/|/bar/", "", text)
    assert strip((tmp_path / "bar" / "report.md").read_text()) == strip((tmp_path / "quiet" / "report.md").read_text())
