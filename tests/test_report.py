"""`atlasreg report` from a small hand-made result set: tables with significance marks, figures,
self-contained HTML and Markdown."""

import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml

from atlasreg.cli import main
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
    assert cells[("Refine", "ITN")].bold and float(cells[("Refine", "ITN")].text) < 0.01
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
    # One case folder with an image, labelmaps and an inverse displacement for the qualitative figure.
    seg = tmp_path / "seg"
    refs = {}
    for c in CASES:
        d = seg / c
        d.mkdir(parents=True)
        img = np.zeros((32, 32), np.uint8)
        img[8:24, 8:24] = 200
        sitk.WriteImage(sitk.GetImageFromArray(img), str(d / "image.png"))
        lab = (img > 0).astype(np.uint8)
        for out in ("itn", "onepass", "refine"):
            sitk.WriteImage(sitk.GetImageFromArray(lab), str(d / f"{out}_labelmap.png"))
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((32, 32, 2)), isVector=True), str(d / "inverse_displacement.nii.gz"))
        (d / "case.yaml").write_text(yaml.safe_dump({"image": str(d / "image.png")}))
        refs[c] = str(d / "refine_labelmap.png")
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
