"""Tests of atlasreg.evaluation.evaluate on tiny synthetic prediction folders."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from atlasreg.errors import AtlasregError
from atlasreg.evaluation.evaluate import evaluate_predictions

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
    assert list(rows[0]) == ["case", "method", "label", "structure", "dice", "hd", "hd95", "asd", "components",
                             "holes", "reference_components", "reference_holes"]
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
    assert "| Method | Structure | n | Dice | HD | HD95 | ASD |" in md
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
    # without merge the 255 reference values are undeclared
    with pytest.raises(AtlasregError, match=r"ref\.png.*255"):
        evaluate_predictions(tmp_path / "pred", refs, labels, tmp_path / "out2")


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
