"""Tests for atlasreg.data.dataset: finding image/label pairs and selecting cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from atlasreg.data.dataset import CasePair, find_pairs, natural_key, select_cases
from atlasreg.errors import AtlasregError

# find_pairs only looks at file names, so empty files suffice.


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"")


def _names(pairs):
    return [p.name for p in pairs]


# --------------------------------------------------------------------------------------- two folders


def test_two_folders_by_name(tmp_path):
    _touch(tmp_path / "images", "JPCLN002.png", "JPCLN001.png", "notes.txt", ".tmp-ab-JPCLN003.png")
    _touch(tmp_path / "labels", "JPCLN001.png", "JPCLN002.png", "extra.png")
    pairs = find_pairs(tmp_path / "images", tmp_path / "labels")
    assert pairs == [
        CasePair("JPCLN001", tmp_path / "images" / "JPCLN001.png", tmp_path / "labels" / "JPCLN001.png"),
        CasePair("JPCLN002", tmp_path / "images" / "JPCLN002.png", tmp_path / "labels" / "JPCLN002.png"),
    ]


def test_two_folders_with_suffixes_and_double_extension(tmp_path):
    _touch(tmp_path / "img", "p1_0000.nii.gz", "p2_0000.nii.gz")
    _touch(tmp_path / "lab", "p1_seg.nrrd", "p2_seg.nii.gz")
    pairs = find_pairs(str(tmp_path / "img"), str(tmp_path / "lab"), image_suffix="_0000",
                       label_suffix="_seg")
    assert _names(pairs) == ["p1", "p2"]
    assert pairs[0].label.name == "p1_seg.nrrd" and pairs[1].label.name == "p2_seg.nii.gz"


def test_two_folders_missing_label(tmp_path):
    _touch(tmp_path / "images", "a.png", "b.png", "c.png")
    _touch(tmp_path / "labels", "a.png")
    with pytest.raises(AtlasregError, match="no labelmap for image") as ei:
        find_pairs(tmp_path / "images", tmp_path / "labels")
    msg = str(ei.value)
    assert str(tmp_path / "images" / "b.png") in msg and "1 more" in msg


def test_two_folders_ambiguous_label(tmp_path):
    _touch(tmp_path / "images", "a.png")
    _touch(tmp_path / "labels", "a.png", "a.nii.gz")
    with pytest.raises(AtlasregError, match="more than one labelmap"):
        find_pairs(tmp_path / "images", tmp_path / "labels")


def test_folder_missing(tmp_path):
    with pytest.raises(AtlasregError, match="folder not found") as ei:
        find_pairs(tmp_path / "nothere")
    assert "nothere" in str(ei.value)
    _touch(tmp_path / "images", "a.png")
    with pytest.raises(AtlasregError, match="labels folder not found"):
        find_pairs(tmp_path / "images", tmp_path / "nolabels")


def test_no_images(tmp_path):
    _touch(tmp_path / "images", "readme.txt")
    with pytest.raises(AtlasregError, match="no images found") as ei:
        find_pairs(tmp_path / "images")
    assert "images" in str(ei.value)


# ---------------------------------------------------------------------------------------- one folder


def test_one_folder_suffixes_natural_order(tmp_path):
    d = tmp_path / "letter"
    _touch(d, *[f"B{i}_img.png" for i in (10, 2, 1, 100)], *[f"B{i}_seg.png" for i in (1, 2, 10, 100)])
    pairs = find_pairs(d, image_suffix="_img", label_suffix="_seg")
    assert _names(pairs) == ["B1", "B2", "B10", "B100"]
    assert pairs[1] == CasePair("B2", d / "B2_img.png", d / "B2_seg.png")
    # same result when the labels folder is given as the same folder
    assert find_pairs(d, d, image_suffix="_img", label_suffix="_seg") == pairs


def test_one_folder_empty_image_suffix(tmp_path):
    d = tmp_path / "data"
    _touch(d, "c1.nii.gz", "c1_seg.nii.gz", "c2.mha", "c2_seg.mha")
    pairs = find_pairs(d, label_suffix="_seg")
    assert _names(pairs) == ["c1", "c2"]
    assert pairs[0].label.name == "c1_seg.nii.gz"


def test_one_folder_missing_label(tmp_path):
    d = tmp_path / "data"
    _touch(d, "B1_img.png", "B1_seg.png", "B2_img.png")
    with pytest.raises(AtlasregError, match="no labelmap for image") as ei:
        find_pairs(d, image_suffix="_img", label_suffix="_seg")
    assert "B2_img.png" in str(ei.value)


def test_one_folder_needs_distinct_suffixes(tmp_path):
    d = tmp_path / "data"
    _touch(d, "a.png")
    with pytest.raises(AtlasregError, match="label_suffix"):
        find_pairs(d, d)
    with pytest.raises(AtlasregError, match="must differ"):
        find_pairs(d, image_suffix="_x", label_suffix="_x")


def test_images_only(tmp_path):
    d = tmp_path / "test"
    _touch(d, "B3_img.png", "B1_img.png", "B1_seg.png", "other.mhd", "other.raw")
    pairs = find_pairs(d, image_suffix="_img")
    assert pairs == [CasePair("B1", d / "B1_img.png", None), CasePair("B3", d / "B3_img.png", None)]
    assert _names(find_pairs(d)) == ["B1_img", "B1_seg", "B3_img", "other"]


# ----------------------------------------------------------------------------------------------- CSV


def test_csv_relative_and_absolute(tmp_path):
    _touch(tmp_path / "data" / "imgs", "x10.png", "x2.png")
    _touch(tmp_path / "data" / "segs", "x10.png", "x2.png")
    csv = tmp_path / "data" / "cases.csv"
    csv.write_text("image,label\n"
                   "imgs/x10.png,segs/x10.png\n"
                   f"{tmp_path / 'data' / 'imgs' / 'x2.png'},segs/x2.png\n\n")
    pairs = find_pairs(csv=csv)
    assert pairs == [
        CasePair("x2", tmp_path / "data" / "imgs" / "x2.png", tmp_path / "data" / "segs" / "x2.png"),
        CasePair("x10", tmp_path / "data" / "imgs" / "x10.png", tmp_path / "data" / "segs" / "x10.png"),
    ]


def test_csv_name_column_and_no_labels(tmp_path):
    _touch(tmp_path, "a_img.nii.gz", "b_img.nii.gz")
    csv = tmp_path / "list.csv"
    csv.write_text("name,image\nalpha,a_img.nii.gz\n,b_img.nii.gz\n")
    pairs = find_pairs(csv=csv, image_suffix="_img")
    assert pairs == [CasePair("alpha", tmp_path / "a_img.nii.gz", None),
                     CasePair("b", tmp_path / "b_img.nii.gz", None)]


def test_csv_errors(tmp_path):
    _touch(tmp_path, "a.png", "a_seg.png", "b.png")
    with pytest.raises(AtlasregError, match="CSV file not found"):
        find_pairs(csv=tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("img,seg\na.png,a_seg.png\n")
    with pytest.raises(AtlasregError, match="no 'image' column") as ei:
        find_pairs(csv=bad)
    assert "bad.csv" in str(ei.value)
    partial = tmp_path / "partial.csv"
    partial.write_text("image,label\na.png,a_seg.png\nb.png,\n")
    with pytest.raises(AtlasregError, match="no labelmap for image") as ei:
        find_pairs(csv=partial)
    assert "b.png" in str(ei.value) and "partial.csv" in str(ei.value)
    gone = tmp_path / "gone.csv"
    gone.write_text("image,label\nzzz.png,a_seg.png\n")
    with pytest.raises(AtlasregError, match="zzz.png"):
        find_pairs(csv=gone)
    dup = tmp_path / "dup.csv"
    dup.write_text("image,name\na.png,x\nb.png,x\n")
    with pytest.raises(AtlasregError, match="already used"):
        find_pairs(csv=dup)
    with pytest.raises(AtlasregError, match="not both"):
        find_pairs(tmp_path, csv=partial)


# ------------------------------------------------------------------------------------------ ordering


def test_natural_key():
    names = ["B10", "b2", "B1", "B100", "A3", "B2x", "case_01", "case_1"]
    assert sorted(names, key=natural_key) == ["A3", "B1", "b2", "B2x", "B10", "B100", "case_01", "case_1"]


# ---------------------------------------------------------------------------------------- select_cases


def _pairs(n=20, prefix="B"):
    return [CasePair(f"{prefix}{i}", Path(f"{prefix}{i}_img.png"), Path(f"{prefix}{i}_seg.png"))
            for i in range(1, n + 1)]


def test_select_none_and_range():
    pairs = _pairs(20)
    assert select_cases(pairs, None) == pairs
    assert _names(select_cases(pairs, "B3-B12")) == [f"B{i}" for i in range(3, 13)]
    assert _names(select_cases(pairs, "B18-25")) == ["B18", "B19", "B20"]
    assert _names(select_cases(pairs, "B7")) == ["B7"]
    with pytest.raises(AtlasregError, match="matches none"):
        select_cases(pairs, "C1-C5")
    with pytest.raises(AtlasregError, match="after end"):
        select_cases(pairs, "B9-B3")
    # range parts with digits/hyphens in the prefix
    odd = [CasePair(n, Path(n), None) for n in ("sub-01", "sub-02", "sub-10", "other-02")]
    assert _names(select_cases(odd, "sub-1-sub-2")) == ["sub-01", "sub-02"]


def test_select_list():
    pairs = _pairs(10)
    assert _names(select_cases(pairs, ["B5", "B2", "B5"])) == ["B5", "B2"]
    with pytest.raises(AtlasregError, match="unknown case names") as ei:
        select_cases(pairs, ["B1", "X1", "X2", "X3", "X4", "X5", "X6", "X7"])
    msg = str(ei.value)
    assert "X1, X2, X3, X4, X5" in msg and "X6" not in msg and "2 more" in msg


def test_select_fraction_disjoint_covering_deterministic():
    pairs = _pairs(37)
    train = select_cases(pairs, {"fraction": [0, 0.8], "seed": 0})
    val = select_cases(pairs, {"fraction": [0.8, 1.0], "seed": 0})
    assert len(train) == round(0.8 * 37) and len(train) + len(val) == 37
    assert not set(_names(train)) & set(_names(val))
    assert set(_names(train)) | set(_names(val)) == set(_names(pairs))
    # deterministic, independent of input order, returned in input order
    assert select_cases(pairs, {"fraction": [0, 0.8], "seed": 0}) == train
    assert set(_names(select_cases(pairs[::-1], {"fraction": [0, 0.8], "seed": 0}))) == set(_names(train))
    assert train == [p for p in pairs if p in train]
    # a random split, not the first 80 %; another seed gives another split
    assert _names(train) != _names(pairs[: len(train)])
    other = select_cases(pairs, {"fraction": [0, 0.8], "seed": 1})
    assert _names(other) != _names(train)
    # three-way split covers everything once
    parts = [select_cases(pairs, {"fraction": f, "seed": 3}) for f in ([0, 0.5], [0.5, 0.75], [0.75, 1])]
    flat = [n for part in parts for n in _names(part)]
    assert sorted(flat) == sorted(_names(pairs))


def test_select_fraction_by_group_keeps_a_patients_frames_on_one_side():
    """ACDC's split: cases patientNNN_frameMM grouped by '^patient\\d+' (both frames of a patient, and
    a patient's third file, on the same side), for several seeds; the fraction counts patients; a name
    the pattern does not match is its own group; a capture group is the key when the pattern has one."""
    pairs = [CasePair(f"patient{p:03d}_frame{f:02d}", Path(f"patient{p:03d}_frame{f:02d}.nii.gz"), None)
             for p in range(1, 21) for f in (1, 12)] + [CasePair("patient007_frame05", Path("x.nii.gz"), None),
                                                         CasePair("extra", Path("extra.nii.gz"), None)]

    def patients(part):
        return {n.split("_")[0] for n in _names(part)}

    for seed in range(5):
        spec = {"seed": seed, "group": r"^patient\d+"}
        train = select_cases(pairs, {"fraction": [0, 0.8], **spec})
        val = select_cases(pairs, {"fraction": [0.8, 1.0], **spec})
        assert not set(_names(train)) & set(_names(val))
        assert set(_names(train)) | set(_names(val)) == set(_names(pairs))
        assert not patients(train) & patients(val)
        for part in (train, val):
            for patient in patients(part) - {"extra"}:
                assert {f"{patient}_frame01", f"{patient}_frame12"} <= set(_names(part))
        assert len(patients(train) | patients(val)) == 21 and len(patients(val)) == round(0.2 * 21)
    # The split differs from a split of cases, which would separate some patient's frames.
    by_case = select_cases(pairs, {"fraction": [0, 0.8], "seed": 0})
    assert any(len({n for n in _names(by_case) if n.startswith(p)}) == 1 for p in patients(by_case) - {"extra"})
    captured = select_cases(pairs, {"fraction": [0, 0.5], "seed": 0, "group": r"^(patient\d+)_frame"})
    assert _names(captured) == _names(select_cases(pairs, {"fraction": [0, 0.5], "seed": 0, "group": r"^patient\d+"}))
    with pytest.raises(AtlasregError, match="not a regular expression"):
        select_cases(pairs, {"fraction": [0, 0.5], "group": "(patient"})


def test_select_bad_specs():
    pairs = _pairs(5)
    with pytest.raises(AtlasregError):
        select_cases(pairs, {"fraction": [0.5, 0.2]})
    with pytest.raises(AtlasregError):
        select_cases(pairs, {"fraction": [0.0, 0.05]})  # selects nothing
    with pytest.raises(AtlasregError):
        select_cases(pairs, {"frac": [0, 1]})
    with pytest.raises(AtlasregError):
        select_cases(pairs, 3.5)


# ---------------------------------------------------------------------------------------------- DICOM


def _series(folder: Path, uid_end: str = "1", prefix: str = "slice") -> Path:
    """A small DICOM volume (3 files named <prefix><k>.dcm) in `folder`."""
    import numpy as np
    from dicom_series import UID_ROOT, write_dicom_series

    write_dicom_series(folder, np.zeros((3, 4, 5), np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3),
                       series_uid=f"{UID_ROOT}.6{uid_end}", names=[f"{prefix}{k}.dcm" for k in range(3)])
    return folder


def _radiograph(path: Path, uid_end: str) -> Path:
    import numpy as np
    from dicom_series import UID_ROOT, write_dicom_image

    return write_dicom_image(path, np.ones((6, 5), np.uint16), (0.2, 0.2), series_uid=f"{UID_ROOT}.7{uid_end}")


def test_a_folder_of_one_dicom_series_is_one_case_named_after_it(tmp_path):
    series = _series(tmp_path / "patient7")
    assert find_pairs(series) == [CasePair("patient7", series, None)]
    single = _radiograph(tmp_path / "xr3" / "IM1", "1").parent  # one radiograph in its folder
    assert find_pairs(single) == [CasePair("xr3", single, None)]


def test_a_folder_of_dicom_case_folders_and_of_radiographs(tmp_path):
    """Case folders (one series each) beside other images are one case each, named after the folder;
    DICOM files that are images of their own (radiographs, one series each) are one case each, named
    without .dcm; with a labels folder they pair by these names."""
    images = tmp_path / "images"
    _series(images / "case2", "2")
    _series(images / "case10", "3")
    _touch(images, "case1.nii.gz", "notes.txt")
    (images / "empty_folder").mkdir()
    assert find_pairs(images) == [CasePair("case1", images / "case1.nii.gz", None),
                                  CasePair("case2", images / "case2", None),
                                  CasePair("case10", images / "case10", None)]
    _touch(tmp_path / "labels", "case1.nii.gz", "case2.nii.gz", "case10.nii.gz")
    assert [(p.name, p.image.name, p.label.name) for p in find_pairs(images, tmp_path / "labels")] == \
        [("case1", "case1.nii.gz", "case1.nii.gz"), ("case2", "case2", "case2.nii.gz"),
         ("case10", "case10", "case10.nii.gz")]

    xrays = tmp_path / "xrays"
    for k, name in enumerate(("JPCLN002.dcm", "JPCLN001.DCM", "JPCLN010_img.dcm")):
        _radiograph(xrays / name, str(k))
    assert find_pairs(xrays) == [CasePair("JPCLN001", xrays / "JPCLN001.DCM", None),
                                 CasePair("JPCLN002", xrays / "JPCLN002.dcm", None),
                                 CasePair("JPCLN010_img", xrays / "JPCLN010_img.dcm", None)]
    assert find_pairs(xrays, image_suffix="_img") == [CasePair("JPCLN010", xrays / "JPCLN010_img.dcm", None)]


def test_dicom_folders_that_are_not_one_case_each_are_refused(tmp_path):
    two = tmp_path / "two"
    _series(two, "4", prefix="a")
    _series(two, "5", prefix="b")
    with pytest.raises(AtlasregError, match="holds 2 DICOM series") as ei:
        find_pairs(two)
    assert str(two) in str(ei.value) and "\n" not in str(ei.value)

    mixed = _series(tmp_path / "mixed", "6")
    _touch(mixed, "mask.nii.gz")
    with pytest.raises(AtlasregError, match="a series needs a folder of its own") as ei:
        find_pairs(mixed)
    assert str(mixed) in str(ei.value)

    _touch(tmp_path / "corrupt", "bad.dcm")
    with pytest.raises(AtlasregError, match="GDCM does not recognise it") as ei:
        find_pairs(tmp_path / "corrupt")
    assert str(tmp_path / "corrupt" / "bad.dcm") in str(ei.value)

    _touch(tmp_path / "nothing")
    with pytest.raises(AtlasregError, match="no images found.*DICOM"):
        find_pairs(tmp_path / "nothing")


def test_csv_names_a_dicom_folder(tmp_path):
    series = _series(tmp_path / "scans" / "pt01")
    _touch(tmp_path / "segs", "pt01.nii.gz")
    csv = tmp_path / "cases.csv"
    csv.write_text("image,label\nscans/pt01,segs/pt01.nii.gz\n")
    assert find_pairs(csv=csv) == [CasePair("pt01", series, tmp_path / "segs" / "pt01.nii.gz")]
