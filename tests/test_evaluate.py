"""Tests of atlasreg.evaluation.evaluate on tiny synthetic prediction folders."""

import csv
import io
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from atlasreg.errors import AtlasregError
from atlasreg.evaluation.evaluate import evaluate_predictions
from atlasreg.evaluation.metrics import symmetric_hd95

LABELS = {0: "background", 1: "right lung", 2: "left lung"}


def write(path: Path, array: np.ndarray, spacing=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    if spacing is not None:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def two_squares(shift_x_label1=0, values=(1, 2)):
    out = np.zeros((32, 32), dtype=np.uint8)
    out[4:12, 4 + shift_x_label1:12 + shift_x_label1] = values[0]
    out[16:24, 18:26] = values[1]
    return out


def read_csv(path: Path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def png_case_tree(tmp_path):
    """Two cases. c1: itn exact, onepass label 1 shifted by 3 px along x, atlas label 1 split in two,
    refine missing. c2: itn and onepass exact, no atlas."""
    refs = {}
    pred = tmp_path / "pred"
    for case in ("c1", "c2"):
        refs[case] = write(tmp_path / "refs" / f"{case}.png", two_squares())
        write(pred / case / "itn_labelmap.png", two_squares())
    write(pred / "c1" / "onepass_labelmap.png", two_squares(shift_x_label1=3))
    write(pred / "c2" / "onepass_labelmap.png", two_squares())
    split = two_squares()
    split[4:12, 7:9] = 0  # label 1 cut into two blobs
    write(pred / "c1" / "atlas_labelmap.png", split)
    return pred, refs


def test_per_case_csv_and_summary(tmp_path, png_case_tree):
    pred, refs = png_case_tree
    per_case, summary_md = evaluate_predictions(pred, refs, LABELS, tmp_path / "out")
    assert per_case == tmp_path / "out" / "metrics_per_case.csv"
    assert summary_md == tmp_path / "out" / "summary.md"
    rows = read_csv(per_case)
    assert list(rows[0]) == ["case", "method", "label", "structure", "dice", "hd", "hd95", "hd95_avg", "asd",
                             "components", "holes", "reference_components", "reference_holes"]
    assert all(r["holes"] == "0" and r["reference_holes"] == "0" for r in rows)  # filled squares
    key = {(r["case"], r["method"], int(r["label"])): r for r in rows}
    # c1: itn, onepass, atlas (refine missing); c2: itn, onepass; two structures each
    assert len(rows) == (3 + 2) * 2
    assert not any(r["method"] == "refine" for r in rows)
    assert not any(r["case"] == "c2" and r["method"] == "atlas" for r in rows)

    itn = key[("c1", "itn", 1)]
    assert itn["structure"] == "right lung"
    assert float(itn["dice"]) == pytest.approx(1.0) and float(itn["hd"]) == pytest.approx(0.0)
    assert int(itn["components"]) == 1
    shifted = key[("c1", "onepass", 1)]
    assert float(shifted["dice"]) == pytest.approx(2 * 40 / 128)  # 8x8 squares overlapping 8x5
    assert float(shifted["hd"]) == pytest.approx(3.0)
    assert float(shifted["hd95"]) <= 3.0 + 1e-6
    # Eq. 16 of DeepATLAS: the mean of the two directed 95th percentiles, never above their maximum
    assert float(shifted["hd95_avg"]) == pytest.approx(symmetric_hd95(
        two_squares(shift_x_label1=3), two_squares(), [0, 1, 2])[1])
    assert 0 < float(shifted["hd95_avg"]) <= float(shifted["hd95"])
    assert float(key[("c1", "onepass", 2)]["dice"]) == pytest.approx(1.0)
    assert int(key[("c1", "atlas", 1)]["components"]) == 2

    summary = {(r["method"], int(r["label"])): r for r in read_csv(tmp_path / "out" / "summary.csv")}
    onepass = summary[("onepass", 1)]
    assert int(onepass["n"]) == 2
    assert float(onepass["dice_mean"]) == pytest.approx((0.625 + 1.0) / 2)
    assert float(onepass["dice_std"]) == pytest.approx(0.1875)
    assert float(onepass["hd_mean"]) == pytest.approx(1.5)
    assert float(onepass["hd_std"]) == pytest.approx(1.5)
    atlas = summary[("atlas", 1)]
    assert int(atlas["n"]) == 1
    assert float(atlas["components_mean"]) == pytest.approx(2.0)
    assert float(atlas["single_component_fraction"]) == pytest.approx(0.0)
    assert float(summary[("itn", 2)]["single_component_fraction"]) == pytest.approx(1.0)
    assert ("refine", 1) not in summary

    md = summary_md.read_text()
    assert "| Method | Structure | n | Dice | HD | HD95 | HD95 avg. | ASD |" in md
    assert "| onepass | right lung | 2 | 0.812 ± 0.188 | 1.50 ± 1.50 |" in md
    assert "| atlas | right lung | 1 |" in md and "| 2.00 | 0.00 |" in md
    assert "refine" not in md
    assert not list((tmp_path / "out").glob("*.tmp"))  # atomic writes leave no temporaries


def test_merge_option(tmp_path):
    """JSRT-style prediction (1, 2 = lungs, 3 = heart) vs Montgomery-style reference (255 = lungs)."""
    labels = {0: "background", 1: "right lung", 2: "left lung", 3: "heart"}
    ref = two_squares(values=(255, 255))
    prediction = two_squares()
    prediction[26:30, 2:6] = 3  # heart: not mapped, becomes background
    refs = {"m1": write(tmp_path / "ref.png", ref)}
    write(tmp_path / "pred" / "m1" / "itn_labelmap.png", prediction)
    shifted = two_squares(shift_x_label1=3)
    write(tmp_path / "pred" / "m1" / "refine_labelmap.png", shifted)
    per_case, _ = evaluate_predictions(tmp_path / "pred", refs, labels, tmp_path / "out", merge={255: [1, 2]})
    rows = read_csv(per_case)
    assert {(r["method"], r["label"]) for r in rows} == {("itn", "255"), ("refine", "255")}
    itn = next(r for r in rows if r["method"] == "itn")
    assert itn["structure"] == "right lung+left lung"
    assert float(itn["dice"]) == pytest.approx(1.0)
    assert float(itn["hd"]) == pytest.approx(0.0)
    assert int(itn["components"]) == 2  # two lungs, heart merged into background
    refine = next(r for r in rows if r["method"] == "refine")
    # union of two 8x8 squares; one shifted by 3 -> overlap 40 + 64 of 128 + 128
    assert float(refine["dice"]) == pytest.approx(2 * (40 + 64) / 256)
    # quality control on the merged labels: ITN (heart dropped) vs refined, both as 255
    (qc,) = read_csv(tmp_path / "out" / "quality_control.csv")
    assert float(qc["dice_itn_refine"]) == pytest.approx(2 * (40 + 64) / 256)
    assert float(qc["itn_outside_refine"]) == pytest.approx(24 / 128)  # 8x3 strip left by the shift
    assert float(qc["refine_dice"]) == pytest.approx(2 * (40 + 64) / 256)
    assert qc["flagged"] == "True"
    info = yaml.safe_load((tmp_path / "out" / "info.yaml").read_text())
    assert info["merge"] == {255: [1, 2]} and info["labels"] == labels and info["n_cases"] == 1
    # without merge the 255 reference values are undeclared
    with pytest.raises(AtlasregError, match=r"ref\.png.*255"):
        evaluate_predictions(tmp_path / "pred", refs, labels, tmp_path / "out2")


def test_merge_of_several_targets_groups_hemispheres(tmp_path):
    """Left/right structures grouped (the mouse brain's 20 structures from 40 labels): each target merges
    its own sources, named by them, and a structure split between hemispheres scores as one."""
    labels = {0: "background", 1: "left A", 2: "right A", 3: "left B", 4: "right B"}
    reference = np.zeros((32, 32), dtype=np.uint8)
    reference[4:12, 4:12], reference[4:12, 20:28] = 1, 2       # A: one square a hemisphere
    reference[18:26, 4:12], reference[18:26, 20:28] = 3, 4     # B
    prediction = reference.copy()
    prediction[4:12, 4:12] = 2                                 # A's left half labelled right: A grouped is exact
    prediction[18:26, 20:28] = 0                               # B's right half missed
    refs = {"c": write(tmp_path / "ref.png", reference)}
    write(tmp_path / "pred" / "c" / "itn_labelmap.png", prediction)
    per_case, _ = evaluate_predictions(tmp_path / "pred", refs, labels, tmp_path / "out",
                                       merge={101: [1, 2], 102: [3, 4]})
    rows = {r["structure"]: r for r in read_csv(per_case)}
    assert set(rows) == {"left A+right A", "left B+right B"}
    assert float(rows["left A+right A"]["dice"]) == pytest.approx(1.0)
    assert float(rows["left B+right B"]["dice"]) == pytest.approx(2 * 64 / (64 + 128))


def test_nifti_3d_with_spacing(tmp_path):
    ref = np.zeros((12, 16, 16), dtype=np.uint8)
    ref[3:9, 4:10, 4:10] = 1
    pred = np.zeros_like(ref)
    pred[3:9, 4:10, 7:13] = 1  # shifted by 3 along x
    refs = {"v1": write(tmp_path / "v1_ref.nii.gz", ref, spacing=(2.0, 1.0, 1.5))}
    write(tmp_path / "pred" / "v1" / "onepass_labelmap.nii.gz", pred, spacing=(2.0, 1.0, 1.5))
    per_case, _ = evaluate_predictions(tmp_path / "pred", refs, {0: "bg", 1: "organ"}, tmp_path / "out")
    (row,) = read_csv(per_case)
    assert row["method"] == "onepass"
    assert float(row["hd"]) == pytest.approx(6.0)  # 3 voxels x 2 mm along x
    assert float(row["dice"]) == pytest.approx(0.5)


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal (tqdm shows its bar only there when asked to, disable=None)."""

    def isatty(self):
        return True


@pytest.mark.parametrize("progress, terminal", [(True, True), (True, False), (False, True)])
def test_progress_bar_per_case_on_a_terminal_only(tmp_path, png_case_tree, monkeypatch, progress, terminal):
    pred, refs = png_case_tree
    err = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    evaluate_predictions(pred, refs, LABELS, tmp_path / "out", progress=progress)
    shown = err.getvalue()
    if progress and terminal:
        assert "evaluating" in shown and "0/2 " in shown and "case/s" in shown  # total: the cases
        assert shown.endswith("\r")  # cleared at the end (leave=False): the summary follows on a clean line
    else:
        assert shown == ""


def test_a_failed_case_clears_the_progress_bar(tmp_path, png_case_tree, monkeypatch):
    pred, refs = png_case_tree
    bad = tmp_path / "broken_ref.png"
    bad.write_bytes(b"not an image")
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    with pytest.raises(AtlasregError, match="broken_ref.png"):
        evaluate_predictions(pred, dict(refs, c2=bad), LABELS, tmp_path / "out", progress=True)
    assert "evaluating" in err.getvalue() and err.getvalue().endswith("\r")  # the error starts a clean line


def test_unreadable_reference_raises(tmp_path, png_case_tree):
    pred, refs = png_case_tree
    bad = tmp_path / "broken_ref.png"
    bad.write_bytes(b"not an image")
    refs = dict(refs, c1=bad)
    with pytest.raises(AtlasregError, match="broken_ref.png") as info:
        evaluate_predictions(pred, refs, LABELS, tmp_path / "out")
    assert info.value.path == str(bad)
    with pytest.raises(AtlasregError, match="missing_ref.png"):
        evaluate_predictions(pred, {"c1": tmp_path / "missing_ref.png"}, LABELS, tmp_path / "out")


def test_size_mismatch_and_unreadable_prediction_raise(tmp_path):
    refs = {"c1": write(tmp_path / "ref.png", two_squares())}
    write(tmp_path / "pred" / "c1" / "itn_labelmap.png", np.zeros((20, 20), dtype=np.uint8))
    with pytest.raises(AtlasregError, match="itn_labelmap.png.*size"):
        evaluate_predictions(tmp_path / "pred", refs, LABELS, tmp_path / "out")
    (tmp_path / "pred" / "c1" / "itn_labelmap.png").write_bytes(b"garbage")
    with pytest.raises(AtlasregError, match="itn_labelmap.png"):
        evaluate_predictions(tmp_path / "pred", refs, LABELS, tmp_path / "out")


def test_no_predictions_at_all_raises(tmp_path):
    refs = {"c1": write(tmp_path / "ref.png", two_squares())}
    (tmp_path / "pred" / "c1").mkdir(parents=True)
    with pytest.raises(AtlasregError, match="no prediction"):
        evaluate_predictions(tmp_path / "pred", refs, LABELS, tmp_path / "out")


def test_empty_structure_warns_with_case_and_nan(tmp_path):
    refs = {"c1": write(tmp_path / "ref.png", two_squares())}
    only_label_2 = two_squares()
    only_label_2[only_label_2 == 1] = 0
    write(tmp_path / "pred" / "c1" / "itn_labelmap.png", only_label_2)
    with pytest.warns(UserWarning, match="c1.*itn.*label 1"):
        per_case, summary_md = evaluate_predictions(tmp_path / "pred", refs, LABELS, tmp_path / "out")
    row = next(r for r in read_csv(per_case) if r["label"] == "1")
    assert float(row["dice"]) == 0.0 and math.isnan(float(row["hd"])) and int(row["components"]) == 0
    assert "| itn | right lung | 1 | 0.000 ± 0.000 | n/a |" in summary_md.read_text()


# ---------------------------------------------------------------- info, transform metrics, quality control

TRANSFORM_HEADER = "method,mice_mm,mice_voxels,ic_dsc,nonpositive_jacobian_fraction,std_log_jacobian"


@pytest.fixture
def qc_tree(tmp_path):
    """Four cases, all with reference == two_squares().
    c1: itn == refine == reference; transform_metrics.csv with onepass and refine rows.
    c2: itn = reference + a 16-voxel blob of label 1 at (28:32, 0:4); refine with label 1 shifted by 3;
        transform_metrics.csv with a onepass row only.
    c3: itn = reference, refine with label 1 shifted by 1.
    c4: itn only (no refine, no transform_metrics.csv)."""
    pred = tmp_path / "pred"
    refs = {c: write(tmp_path / "refs" / f"{c}.png", two_squares()) for c in ("c1", "c2", "c3", "c4")}
    blob = two_squares()
    blob[28:32, 0:4] = 1
    for case, itn, refine in (("c1", two_squares(), two_squares()), ("c2", blob, two_squares(3)),
                              ("c3", two_squares(), two_squares(1)), ("c4", two_squares(), None)):
        write(pred / case / "itn_labelmap.png", itn)
        if refine is not None:
            write(pred / case / "refine_labelmap.png", refine)
    (pred / "c1" / "transform_metrics.csv").write_text(
        f"{TRANSFORM_HEADER}\nonepass,0.2,0.1,0.99,0.0,0.05\nrefine,0.4,0.2,0.97,0.01,0.15\n")
    (pred / "c2" / "transform_metrics.csv").write_text(f"{TRANSFORM_HEADER}\nonepass,0.6,0.3,0.95,0.0,0.1\n")
    return pred, refs


def test_info_transforms_and_quality_control(tmp_path, qc_tree):
    pred, refs = qc_tree
    out = tmp_path / "out"
    result = evaluate_predictions(pred, refs, LABELS, out, test_set="clean",
                                  info={"name": "tiny", "method": "atlas_istn", "checkpoint": tmp_path / "m.ckpt",
                                        "n_cases": -1})
    assert result == (out / "metrics_per_case.csv", out / "summary.md")  # return value unchanged

    info = yaml.safe_load((out / "info.yaml").read_text())
    assert info == {"name": "tiny", "method": "atlas_istn", "checkpoint": str(tmp_path / "m.ckpt"),
                    "n_cases": 4, "test_set": "clean", "predictions": str(pred.resolve()), "merge": None,
                    "labels": LABELS}

    text = (out / "transforms_per_case.csv").read_text().splitlines()
    assert text[0] == "case," + TRANSFORM_HEADER
    rows = read_csv(out / "transforms_per_case.csv")
    assert [(r["case"], r["method"]) for r in rows] == [("c1", "onepass"), ("c1", "refine"), ("c2", "onepass")]
    assert float(rows[2]["mice_voxels"]) == pytest.approx(0.3)

    assert (out / "quality_control.csv").read_text().splitlines()[0] == \
        "case,dice_itn_refine,itn_outside_refine,qc_score,refine_dice,flagged"
    qc = {r["case"]: r for r in read_csv(out / "quality_control.csv")}
    assert sorted(qc) == ["c1", "c2", "c3"]  # c4 has no refined labelmap
    assert float(qc["c1"]["dice_itn_refine"]) == 1.0 and float(qc["c1"]["qc_score"]) == 0.0
    assert float(qc["c1"]["itn_outside_refine"]) == 0.0 and float(qc["c1"]["refine_dice"]) == 1.0
    # c2, label 1: ITN 64 + 16 voxels, refined square shifted by 3 (64), overlap 40; label 2 identical
    c2_dice = (2 * 40 / (80 + 64) + 1.0) / 2
    assert float(qc["c2"]["dice_itn_refine"]) == pytest.approx(c2_dice)
    assert float(qc["c2"]["qc_score"]) == pytest.approx(1 - c2_dice)
    assert float(qc["c2"]["itn_outside_refine"]) == pytest.approx((16 + 24) / 144)  # blob + 8x3 strip
    assert float(qc["c2"]["refine_dice"]) == pytest.approx((0.625 + 1.0) / 2)
    assert float(qc["c3"]["qc_score"]) == pytest.approx(1 - (2 * 56 / 128 + 1.0) / 2)
    assert [qc[c]["flagged"] for c in ("c1", "c2", "c3")] == ["False", "True", "False"]  # top 10%: 1 of 3

    md = (out / "summary.md").read_text()
    assert "## Transform metrics" in md
    assert "| onepass | 2 | 0.2000 ± 0.1000 | 0.4000 ± 0.2000 | 0.9700 ± 0.0200 | 0.00e+00 ± 0.00e+00 | " \
           "0.075 ± 0.025 |" in md
    assert "| refine | 1 | 0.2000 ± 0.0000 |" in md
    assert "## Quality control" in md
    # qc scores 0, 0.222, 0.0625 against true errors 0, 0.1875, 0.0625: perfectly ranked
    assert "Spearman rank correlation between QC score and true error: 1.000" in md
    assert "- Recall at 10%: 1.00 (share of the 1 worst case(s) by true error that are among the 1 flagged)" in md
    assert f"| c2 | {1 - c2_dice:.3f} | {c2_dice:.3f} | {40 / 144:.3f} | 0.812 |" in md
    assert "| c1 |" not in md.split("## Quality control")[1]
    assert not list(out.glob("*.tmp"))


def test_no_quality_control_without_refine(tmp_path, png_case_tree):
    pred, refs = png_case_tree
    out = tmp_path / "out"
    evaluate_predictions(pred, refs, LABELS, out)
    (out / "quality_control.csv").write_text("stale\n")  # as if an earlier evaluation of these predictions
    evaluate_predictions(pred, refs, LABELS, out)
    assert not (out / "quality_control.csv").exists()  # no case has refine; the stale file is gone
    assert (out / "transforms_per_case.csv").read_text() == "case," + TRANSFORM_HEADER + "\n"
    info = yaml.safe_load((out / "info.yaml").read_text())
    assert info["test_set"] == "pred" and info["n_cases"] == 2 and info["merge"] is None
    md = (out / "summary.md").read_text()
    assert "## Quality control" not in md and "## Transform metrics" not in md


def test_quality_control_flags_the_worst_of_many(tmp_path):
    """ITN == reference (label 1 an 8x16 rectangle), refined label 1 missing its last i = 0..10 columns:
    qc_score equals the true error, so the ranking is perfect and the 2 flagged (of 11) are the two
    most truncated cases."""
    def labelmap(cut=0):
        out = two_squares()
        out[out == 1] = 0
        out[4:12, 2:18 - cut] = 1
        return out

    refs = {}
    for i in range(11):
        case = f"s{i:02d}"
        refs[case] = write(tmp_path / "refs" / f"{case}.png", labelmap())
        write(tmp_path / "pred" / case / "itn_labelmap.png", labelmap())
        write(tmp_path / "pred" / case / "refine_labelmap.png", labelmap(cut=i))
    evaluate_predictions(tmp_path / "pred", refs, LABELS, tmp_path / "out", methods=("itn", "refine"))
    qc = read_csv(tmp_path / "out" / "quality_control.csv")
    for r in qc:
        assert float(r["qc_score"]) == pytest.approx(1 - float(r["refine_dice"]))
    assert [r["case"] for r in qc if r["flagged"] == "True"] == ["s09", "s10"]
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "true error: 1.000" in md and "Recall at 10%: 1.00 (share of the 2 worst" in md


def test_malformed_transform_metrics_raise(tmp_path, qc_tree):
    pred, refs = qc_tree
    bad = pred / "c2" / "transform_metrics.csv"
    bad.write_text("method,mice_mm\nonepass,0.1\n")
    with pytest.raises(AtlasregError, match="lacks the column") as info:
        evaluate_predictions(pred, refs, LABELS, tmp_path / "out")
    assert info.value.path == str(bad)
    bad.write_text(f"{TRANSFORM_HEADER}\nonepass,abc,0.1,0.9,0,0.1\n")
    with pytest.raises(AtlasregError, match="mice_mm"):
        evaluate_predictions(pred, refs, LABELS, tmp_path / "out")
