"""Tests for atlasreg.data.io: reading/validating images and labelmaps, atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from atlasreg.data.io import (atomic_directory, check_dimension, has_no_spacing, image_geometry, read_image,
                              read_labelmap, same_geometry, write_image)
from atlasreg.errors import AtlasregError

LETTER_B = Path("/work/shared/data/letter-b/clean")


def _img(arr, spacing=None, origin=None, vector=False) -> sitk.Image:
    im = sitk.GetImageFromArray(np.asarray(arr), isVector=vector)
    if spacing is not None:
        im.SetSpacing(spacing)
    if origin is not None:
        im.SetOrigin(origin)
    return im


def _label_arr(shape=(8, 8), values=(0, 1)):
    a = np.zeros(shape, np.uint8)
    a[2:5, 2:5] = values[1]
    return a


def _only_visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("ext", [".png", ".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"])
def test_read_image_roundtrip_formats(tmp_path, ext):
    arr = (np.arange(48).reshape(6, 8) * 5).astype(np.uint8)
    src = _img(arr)
    if ext != ".png":
        src.SetSpacing((0.5, 2.0))
        src.SetOrigin((3.0, -1.0))
    p = write_image(src, tmp_path / f"case{ext}")
    assert p == tmp_path / f"case{ext}" and p.exists()
    im = read_image(p)
    assert im.GetPixelID() == sitk.sitkFloat32
    assert im.GetSize() == (8, 6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(im), arr.astype(np.float32))
    if ext != ".png":
        assert same_geometry(im, src)


def test_read_image_3d_keeps_geometry(tmp_path):
    src = _img(np.random.default_rng(0).random((3, 4, 5)).astype(np.float64), spacing=(1.0, 2.0, 3.0),
               origin=(10.0, 20.0, 30.0))
    src.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))
    p = write_image(src, tmp_path / "vol.nii.gz")
    im = read_image(p)
    g = image_geometry(im)
    assert g["size"] == (5, 4, 3)
    assert g["spacing"] == pytest.approx((1.0, 2.0, 3.0))
    assert g["origin"] == pytest.approx((10.0, 20.0, 30.0))
    assert g["direction"] == pytest.approx((0, 1, 0, 1, 0, 0, 0, 0, 1))
    assert im.GetPixelID() == sitk.sitkFloat32


def test_read_image_rgb_png_to_luminance(tmp_path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 100
    rgb[..., 1] = 200
    rgb[..., 2] = 50
    write_image(_img(rgb, vector=True), tmp_path / "rgb.png")
    im = read_image(tmp_path / "rgb.png")
    assert im.GetNumberOfComponentsPerPixel() == 1 and im.GetPixelID() == sitk.sitkFloat32
    assert im.GetSize() == (5, 4)
    expected = 0.299 * 100 + 0.587 * 200 + 0.114 * 50
    np.testing.assert_allclose(sitk.GetArrayFromImage(im), expected, rtol=1e-5)


def test_read_image_missing(tmp_path):
    with pytest.raises(AtlasregError, match="file not found") as ei:
        read_image(tmp_path / "nope.png")
    assert "nope.png" in str(ei.value)


def test_read_image_corrupt(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(b"this is not a png at all \x00\x01\x02")
    with pytest.raises(AtlasregError, match="cannot read image") as ei:
        read_image(p)
    msg = str(ei.value)
    assert "x.png" in msg and "\n" not in msg


def test_read_image_truncated_png(tmp_path):
    good = write_image(_img(np.random.default_rng(1).integers(0, 255, (64, 64)).astype(np.uint8)),
                       tmp_path / "good.png")
    bad = tmp_path / "trunc.png"
    bad.write_bytes(good.read_bytes()[:100])
    with pytest.raises(AtlasregError, match="cannot read image") as ei:
        read_image(bad)
    assert "trunc.png" in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_read_image_nan(tmp_path, ext, bad, dtype):
    # ITK 5's NIfTI reader silently turns NaN/Inf into 0; read_image must still notice.
    a = np.ones((3, 4, 4), dtype)
    a[1, 2, 3] = bad
    p = write_image(_img(a), tmp_path / f"nan{ext}")
    with pytest.raises(AtlasregError, match="contains NaN or infinite intensities") as ei:
        read_image(p)
    assert f"nan{ext}" in str(ei.value)


def test_read_image_finite_float_nifti_ok(tmp_path):
    a = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    p = write_image(_img(a), tmp_path / "ok.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(p)), a)


def _truncated(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mha", ".nrrd"])
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_read_image_truncated_volume_is_an_error(tmp_path, ext, dtype):
    # SimpleITK reads a .nii(.gz) cut to half its bytes as a zero-filled image (issue 14).
    a = (np.random.default_rng(0).random((12, 16, 20)) * 1000).astype(dtype)
    p = _truncated(write_image(_img(a), tmp_path / f"cut{ext}"))
    with pytest.raises(AtlasregError) as ei:
        read_image(p)
    msg = str(ei.value)
    assert msg.startswith(str(p) + ": ") and "\n" not in msg
    # NRRD: SimpleITK's own message ("expected 96000 bytes but received 47838")
    problem = "truncated" if ext != ".nrrd" else "but received"
    assert problem in msg.removeprefix(str(p))
    with pytest.raises(AtlasregError) as ei:
        read_labelmap(p, [0, 1])
    assert problem in str(ei.value).removeprefix(str(p))


def test_read_image_truncated_separate_metaimage_data_file(tmp_path):
    p = write_image(_img(np.ones((6, 8, 10), np.float32)), tmp_path / "v.mhd", compress=False)
    _truncated(tmp_path / "v.raw")
    with pytest.raises(AtlasregError) as ei:
        read_image(p)
    assert str(ei.value).startswith(str(tmp_path / "v.raw") + ": truncated") and "\n" not in str(ei.value)


def test_read_image_corrupt_gzip_stream_is_an_error(tmp_path):
    p = write_image(_img(np.random.default_rng(0).random((12, 16, 20)).astype(np.float32)),
                    tmp_path / "crc.nii.gz")
    data = bytearray(p.read_bytes())
    data[-6] ^= 0xFF  # the gzip trailer's CRC-32
    p.write_bytes(bytes(data))
    with pytest.raises(AtlasregError) as ei:
        read_image(p)
    assert str(ei.value).startswith(f"{p}: corrupt gzip stream") and "\n" not in str(ei.value)


def test_read_image_nifti_with_extra_bytes_or_uncompressed_under_nii_gz_ok(tmp_path):
    a = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)
    plain = write_image(_img(a), tmp_path / "plain.nii")
    mislabelled = tmp_path / "plain_as.nii.gz"  # ITK reads uncompressed bytes under .nii.gz too
    mislabelled.write_bytes(plain.read_bytes())
    padded = tmp_path / "padded.nii"
    padded.write_bytes(plain.read_bytes() + b"\0" * 16)
    for p in (plain, mislabelled, padded):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(p)), a)


def test_read_image_folder(tmp_path):
    (tmp_path / "d.png").mkdir()
    with pytest.raises(AtlasregError, match="d.png"):
        read_image(tmp_path / "d.png")


# ---------------------------------------------------------------------------------------- labelmaps


def test_read_labelmap_ok(tmp_path):
    img = write_image(_img(np.zeros((8, 8), np.uint8)), tmp_path / "img.png")
    lab = write_image(_img(_label_arr(values=(0, 2))), tmp_path / "lab.png")
    ref = read_image(img)
    out = read_labelmap(lab, [0, 1, 2, 3], reference=ref, reference_path=img)
    assert out.GetPixelID() == sitk.sitkUInt16
    assert same_geometry(out, ref)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), _label_arr(values=(0, 2)))


def test_read_labelmap_negative_labels_int32(tmp_path):
    a = np.zeros((4, 4), np.int16)
    a[0, 0] = -1
    p = write_image(_img(a), tmp_path / "neg.nii.gz")
    out = read_labelmap(p, [0, -1])
    assert out.GetPixelID() == sitk.sitkInt32
    assert sitk.GetArrayFromImage(out)[0, 0] == -1


def test_read_labelmap_rgb_png_first_channel(tmp_path):
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[1:3, 1:3, :] = 255
    p = write_image(_img(rgb, vector=True), tmp_path / "seg.png")
    out = read_labelmap(p, [0, 255])
    assert out.GetNumberOfComponentsPerPixel() == 1
    assert sorted(np.unique(sitk.GetArrayFromImage(out))) == [0, 255]


def test_read_labelmap_float_integral_accepted(tmp_path):
    p = write_image(_img(_label_arr().astype(np.float32)), tmp_path / "f.nii.gz")
    out = read_labelmap(p, [0, 1])
    assert out.GetPixelID() == sitk.sitkUInt16


def test_read_labelmap_non_integer(tmp_path):
    a = _label_arr().astype(np.float32)
    a[0, 0] = 0.5
    p = write_image(_img(a), tmp_path / "frac.nii.gz")
    with pytest.raises(AtlasregError, match="non-integer") as ei:
        read_labelmap(p, [0, 1])
    assert "frac.nii.gz" in str(ei.value)


def test_read_labelmap_nan_nifti(tmp_path):
    a = _label_arr().astype(np.float32)
    a[0, 0] = np.nan
    p = write_image(_img(a), tmp_path / "nanlab.nii.gz")
    with pytest.raises(AtlasregError, match="NaN or infinite") as ei:
        read_labelmap(p, [0, 1])
    assert "nanlab.nii.gz" in str(ei.value)


def test_read_labelmap_missing_and_corrupt(tmp_path):
    with pytest.raises(AtlasregError, match="file not found") as ei:
        read_labelmap(tmp_path / "nolab.png", [0, 1])
    assert "nolab.png" in str(ei.value)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AtlasregError, match="cannot read image") as ei:
        read_labelmap(bad, [0, 1])
    assert "bad.nii.gz" in str(ei.value)


def test_read_labelmap_values_not_declared(tmp_path):
    a = _label_arr(values=(0, 1))
    a[0, 0] = 7
    a[0, 1] = 9
    p = write_image(_img(a), tmp_path / "lab.png")
    with pytest.raises(AtlasregError) as ei:
        read_labelmap(p, [0, 1, 2, 3])
    msg = str(ei.value)
    assert "lab.png" in msg
    assert "label values [7, 9] are not in the declared label list [0, 1, 2, 3]" in msg


def test_read_labelmap_size_mismatch(tmp_path):
    img = write_image(_img(np.zeros((16, 16), np.uint8)), tmp_path / "image.png")
    lab = write_image(_img(_label_arr((8, 8))), tmp_path / "label.png")
    with pytest.raises(AtlasregError) as ei:
        read_labelmap(lab, [0, 1], reference=read_image(img), reference_path=img)
    msg = str(ei.value)
    assert msg.startswith(str(lab))
    assert f"size 8x8 differs from image {img} 16x16" in msg


def test_read_labelmap_geometry_mismatch(tmp_path):
    img = write_image(_img(np.zeros((8, 8), np.float32), spacing=(1.0, 1.0)), tmp_path / "image.nii.gz")
    lab = write_image(_img(_label_arr(), spacing=(2.0, 1.0)), tmp_path / "label.nii.gz")
    with pytest.raises(AtlasregError, match="spacing") as ei:
        read_labelmap(lab, [0, 1], reference=read_image(img), reference_path=img)
    msg = str(ei.value)
    assert "label.nii.gz" in msg and "image.nii.gz" in msg and "geometry differs" in msg
    # within tolerance (1e-4 relative) is accepted
    lab2 = write_image(_img(_label_arr(), spacing=(1.00001, 1.0)), tmp_path / "label2.nii.gz")
    read_labelmap(lab2, [0, 1], reference=read_image(img), reference_path=img)
    # origin differences are detected too
    lab3 = write_image(_img(_label_arr(), origin=(0.0, 5.0)), tmp_path / "label3.nii.gz")
    with pytest.raises(AtlasregError, match="origin"):
        read_labelmap(lab3, [0, 1], reference=read_image(img), reference_path=img)


def test_read_labelmap_no_foreground(tmp_path):
    p = write_image(_img(np.zeros((8, 8), np.uint8)), tmp_path / "empty.png")
    with pytest.raises(AtlasregError, match=r"has no foreground \(only label 0\)") as ei:
        read_labelmap(p, [0, 1])
    assert "empty.png" in str(ei.value)
    out = read_labelmap(p, [0, 1], require_foreground=False)
    assert out.GetSize() == (8, 8)


def test_check_dimension(tmp_path):
    vol = _img(np.zeros((2, 3, 4), np.float32))
    check_dimension(vol, 3, "vol.nii.gz")
    with pytest.raises(AtlasregError, match="is 3D but the model is 2D") as ei:
        check_dimension(vol, 2, tmp_path / "vol.nii.gz")
    assert "vol.nii.gz" in str(ei.value)
    with pytest.raises(AtlasregError, match="is 2D but the model is 3D"):
        check_dimension(_img(np.zeros((3, 4), np.float32)), 3, "a.png")


def test_has_no_spacing_for_formats_without_geometry_and_default_headers():
    plain = _img(np.zeros((3, 4, 5), np.float32))            # unit spacing, zero origin, identity direction
    assert has_no_spacing(plain, "a.png") and has_no_spacing(plain, "v.nii.gz")
    nifti_identity = _img(np.zeros((3, 4, 5), np.float32))
    nifti_identity.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # how ITK reads a NIfTI identity affine
    assert has_no_spacing(nifti_identity, "v.nii.gz")
    for change in (lambda i: i.SetSpacing((1.0, 1.0, 8.0)), lambda i: i.SetOrigin((0.0, 0.0, 5.0)),
                   lambda i: i.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))):
        image = _img(np.zeros((3, 4, 5), np.float32))
        change(image)
        assert not has_no_spacing(image, "v.nii.gz") and has_no_spacing(image, "v.PNG")


@pytest.mark.skipif(not (LETTER_B / "B1_img.png").exists(), reason="Letter-B data not available")
def test_read_real_letter_b_pair():
    img_path, lab_path = LETTER_B / "B1_img.png", LETTER_B / "B1_seg.png"
    img = read_image(img_path)
    lab = read_labelmap(lab_path, [0, 255], reference=img, reference_path=img_path)
    assert img.GetSize() == lab.GetSize() == (128, 128)
    assert img.GetPixelID() == sitk.sitkFloat32
    assert set(np.unique(sitk.GetArrayFromImage(lab)).tolist()) == {0, 255}
    with pytest.raises(AtlasregError, match=r"label values \[255\]"):
        read_labelmap(lab_path, [0, 1])


# ------------------------------------------------------------------------------------------ writing


def test_write_image_atomic_no_temp_files(tmp_path):
    out = tmp_path / "a" / "b"
    write_image(_img(np.zeros((4, 4), np.float32)), out / "x.nii.gz")
    write_image(_img(np.ones((4, 4), np.float32)), out / "x.nii.gz")  # overwrite
    write_image(_img(np.zeros((4, 4), np.uint8)), out / "y.png")
    write_image(_img(np.zeros((2, 4, 4), np.int16)), out / "z.mhd")
    assert _only_visible(out) == ["x.nii.gz", "y.png", "z.mhd", "z.zraw"]
    assert sitk.GetArrayFromImage(read_image(out / "x.nii.gz")).max() == 1.0
    assert read_image(out / "z.mhd").GetSize() == (4, 4, 2)


def test_write_image_float_png_raises(tmp_path):
    with pytest.raises(ValueError, match="PNG"):
        write_image(_img(np.zeros((4, 4), np.float32)), tmp_path / "f.png")
    with pytest.raises(ValueError):
        write_image(_img(np.zeros((2, 4, 4), np.uint8)), tmp_path / "vol.png")
    assert list(tmp_path.iterdir()) == []


def test_write_image_failure_leaves_nothing(tmp_path):
    with pytest.raises(AtlasregError, match="cannot write image") as ei:
        write_image(_img(np.zeros((4, 4), np.float32)), tmp_path / "x.unknownext")
    assert "x.unknownext" in str(ei.value)
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_success_replaces(tmp_path):
    final = tmp_path / "case1"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_directory(final) as tmp:
        assert tmp.parent == tmp_path and tmp != final
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").exists()  # old output still visible while writing
    assert _only_visible(final) == ["new.txt"]
    assert _only_visible(tmp_path) == ["case1"]


def test_atomic_directory_exception_keeps_old(tmp_path):
    final = tmp_path / "case1"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(final) as tmp:
            (tmp / "partial.txt").write_text("x")
            raise RuntimeError("boom")
    assert _only_visible(final) == ["old.txt"]
    assert _only_visible(tmp_path) == ["case1"]


def test_atomic_directory_new_and_failed_new(tmp_path):
    with atomic_directory(tmp_path / "deep" / "out") as tmp:
        write_image(_img(np.zeros((4, 4), np.uint8)), tmp / "seg.png")
    assert _only_visible(tmp_path / "deep" / "out") == ["seg.png"]
    with pytest.raises(KeyError):
        with atomic_directory(tmp_path / "never"):
            raise KeyError("x")
    assert not (tmp_path / "never").exists()
    assert _only_visible(tmp_path) == ["deep"]


def test_geometry_helpers():
    a = _img(np.zeros((3, 4), np.float32), spacing=(1.0, 2.0), origin=(0.0, 0.0))
    b = _img(np.zeros((3, 4), np.float32), spacing=(1.0, 2.0), origin=(0.0, 0.0))
    assert image_geometry(a) == {"size": (4, 3), "spacing": (1.0, 2.0), "origin": (0.0, 0.0),
                                 "direction": (1.0, 0.0, 0.0, 1.0)}
    assert same_geometry(a, b)
    b.SetOrigin((0.0, 1e-6))
    assert same_geometry(a, b)
    b.SetOrigin((0.0, 1e-2))
    assert not same_geometry(a, b)
    assert not same_geometry(a, _img(np.zeros((4, 4), np.float32), spacing=(1.0, 2.0)))
    assert not same_geometry(a, _img(np.zeros((1, 3, 4), np.float32)))


def test_same_geometry_small_spacing_is_relative():
    a = _img(np.zeros((3, 4), np.float32), spacing=(0.01, 0.01))
    b = _img(np.zeros((3, 4), np.float32), spacing=(0.0101, 0.01))  # 1 % off: different
    assert not same_geometry(a, b)
    b.SetSpacing((0.0100001, 0.01))  # 1e-5 relative: same
    assert same_geometry(a, b)


# ------------------------------------------------------------------------------ output paths (issue 14)


def test_check_output_folder_and_file(tmp_path, monkeypatch):
    import os

    from atlasreg.data.io import check_output_file, check_output_folder

    (tmp_path / "f.txt").write_text("x")
    assert check_output_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert check_output_file(tmp_path / "new" / "o.csv") == tmp_path / "new" / "o.csv"
    for call, path, problem in ((check_output_folder, tmp_path / "f.txt", "exists and is not a folder"),
                                (check_output_folder, tmp_path / "f.txt" / "o", f"{tmp_path / 'f.txt'} is a file"),
                                (check_output_file, tmp_path, "is a folder, not a file"),
                                (check_output_file, tmp_path / "f.txt" / "o.csv", "is a file, not a folder")):
        with pytest.raises(AtlasregError, match=problem) as e:
            call(path)
        assert "\n" not in str(e.value)
    real = os.access  # root ignores permissions: answer as a read-only mount would
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(tmp_path) else real(p, mode, **kw))
    with pytest.raises(AtlasregError, match=r"is not writable \(read-only"):
        check_output_folder(tmp_path)
    with pytest.raises(AtlasregError, match=f"cannot be created: {tmp_path} is not writable"):
        check_output_folder(tmp_path / "sub")
    assert _only_visible(tmp_path) == ["f.txt"]  # nothing created


def test_remove_temporaries_cleans_a_killed_run_and_restores_a_replaced_folder(tmp_path):
    from atlasreg.data.io import remove_temporaries

    (tmp_path / "case1").mkdir()
    (tmp_path / ".tmp-0123abcd-case1").mkdir()           # killed while building the new case1
    (tmp_path / ".tmp-0123abcd-case1" / "x.png").write_bytes(b"partial")
    (tmp_path / ".old-89abcdef-case2").mkdir()           # killed between the two renames: case2 missing
    (tmp_path / ".old-89abcdef-case2" / "y.png").write_bytes(b"old, complete")
    (tmp_path / "case3").mkdir()
    (tmp_path / "case3" / ".tmp-00000000-z.nii.gz").write_bytes(b"partial")
    (tmp_path / ".tmp-mine.txt").write_text("not an atomic writer's name")
    removed = remove_temporaries(tmp_path)
    assert len(removed) == 3
    assert _only_visible(tmp_path) == [".tmp-mine.txt", "case1", "case2", "case3"]
    assert (tmp_path / "case2" / "y.png").read_bytes() == b"old, complete" and not any((tmp_path / "case3").iterdir())
    assert remove_temporaries(tmp_path / "missing") == []


def test_remove_temporaries_of_some_names_leaves_the_others(tmp_path):
    """A part of a sharded segmentation run cleans only its own entries: another part may be writing
    the others right now."""
    from atlasreg.data.io import remove_temporaries

    for name in (".tmp-0123abcd-B1", ".tmp-0123abcd-B2", ".old-89abcdef-B3"):
        (tmp_path / name).mkdir()
    (tmp_path / ".tmp-00000000-m.csv").write_text("partial")
    removed = remove_temporaries(tmp_path, {"B1", "B3", "m.csv"})
    assert sorted(p.name for p in removed) == [".old-89abcdef-B3", ".tmp-00000000-m.csv", ".tmp-0123abcd-B1"]
    assert _only_visible(tmp_path) == [".tmp-0123abcd-B2", "B3"]


def test_append_text_adds_whole_lines_and_needs_the_file(tmp_path):
    from atlasreg.data.io import append_text

    path = tmp_path / "log.csv"
    path.write_text("a\n")
    append_text(path, "b\nc\n")
    append_text(path, "")
    assert path.read_text() == "a\nb\nc\n"
    with pytest.raises(FileNotFoundError):
        append_text(tmp_path / "missing.csv", "x\n")


def test_files_are_fsynced_before_their_rename(tmp_path, monkeypatch):
    import os

    from atlasreg.data.io import atomic_file

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b))[1])
    with atomic_file(tmp_path / "a.txt") as tmp:
        tmp.write_text("a")
    write_image(_img(np.zeros((4, 4), np.uint8)), tmp_path / "b.png")
    with atomic_directory(tmp_path / "case") as tmp:
        (tmp / "c.txt").write_text("c")
    renamed = [path for kind, path in events if kind == "replace"]
    assert [Path(p).name.split("-", 2)[-1] for p in renamed] == ["a.txt", "b.png", "case"]
    for path in renamed[:2]:  # a file: flushed before its rename
        assert events.index(("fsync", path)) < events.index(("replace", path))
    inside = str(Path(renamed[2]) / "c.txt")  # a folder: its files flushed before the folder's rename
    assert events.index(("fsync", inside)) < events.index(("replace", renamed[2]))


# ------------------------------------------------------------------------------------------ DICOM

#: An oblique direction (rows: ITK's row-major direction matrix; columns: the row, column and slice
#: normal directions): 30 degrees about z times a swap of y and z.
_OBLIQUE = (np.array([[np.cos(np.pi / 6), -np.sin(np.pi / 6), 0.0], [np.sin(np.pi / 6), np.cos(np.pi / 6), 0.0],
                      [0.0, 0.0, 1.0]]) @ np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]))


def _ct_series(folder, names=None, uid=None):
    """A 3D series of 8x10x12 voxels of (0.8, 0.9, 2.5) mm, oblique, with SliceThickness 1 mm (not the
    spacing) and rescale slope 0.5, intercept -1024 (Hounsfield units in half units). Returns (array in
    rescaled units (z, y, x), the volume written)."""
    from dicom_series import UID_ROOT, write_dicom_series

    rng = np.random.default_rng(0)
    array = rng.integers(-2000, 4000, size=(12, 10, 8)) * 0.5 - 1024.0
    volume = write_dicom_series(folder, array, (0.8, 0.9, 2.5), (10.0, -20.0, 30.0), _OBLIQUE,
                                series_uid=uid or UID_ROOT + ".31", thickness=1.0, names=names, rescale=(0.5, -1024.0))
    return array, volume


def _same_geometry_within(image, size, spacing, origin, direction, atol=1e-4):
    assert image.GetSize() == tuple(size)
    np.testing.assert_allclose(image.GetSpacing(), spacing, atol=atol)
    np.testing.assert_allclose(image.GetOrigin(), origin, atol=atol)
    np.testing.assert_allclose(image.GetDirection(), np.asarray(direction).ravel(), atol=atol)


def test_read_dicom_series_gives_the_array_and_the_series_geometry(tmp_path, capfd):
    """The folder and any one of its files read the whole series: slices ordered by their position (the
    file names are shuffled), spacing from the positions (2.5 mm, not the SliceThickness of 1 mm), the
    oblique direction and origin of the series, intensities rescaled (slope 0.5, intercept -1024)."""
    names = [f"IM{k:02d}" for k in np.random.default_rng(1).permutation(12)]  # no extension, out of order
    array, volume = _ct_series(tmp_path / "ct", names=names)
    for path in (tmp_path / "ct", tmp_path / "ct" / names[0], tmp_path / "ct" / names[7]):
        image = read_image(path)
        assert image.GetPixelID() == sitk.sitkFloat32
        _same_geometry_within(image, (8, 10, 12), (0.8, 0.9, 2.5), (10.0, -20.0, 30.0), _OBLIQUE)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array.astype(np.float32))
        assert same_geometry(image, volume)
    assert capfd.readouterr().err == ""  # no ITK or GDCM warning on the way


def test_a_single_frame_dicom_is_2d(tmp_path):
    """A radiograph (one file, 16x20) and a series of one slice are 2D images: in-plane spacing, and the
    in-plane origin and direction when the image lies in the patient's x-y plane; coordinates along
    the image's rows and columns when it does not (coronal); zero origin, identity direction without
    ImagePositionPatient / ImageOrientationPatient."""
    from dicom_series import write_dicom_image

    array = (np.arange(20 * 16).reshape(20, 16) * 37 % 4096).astype(np.uint16)
    cases = {  # (origin, row, column) -> expected 2D origin, direction
        "plain": (None, (1, 0, 0), (0, 1, 0), (0.0, 0.0), np.eye(2)),
        "rotated": ((5.0, 7.0, -3.0), (0, 1, 0), (-1, 0, 0), (5.0, 7.0), [[0.0, -1.0], [1.0, 0.0]]),
        "coronal": ((5.0, 7.0, -3.0), (1, 0, 0), (0, 0, -1), (5.0, 3.0), np.eye(2)),
    }
    for name, (origin, row, column, origin2, direction2) in cases.items():
        path = write_dicom_image(tmp_path / name / "xr.dcm", array, (0.15, 0.2), origin, row, column)
        for given in (path, path.parent):
            image = read_image(given)
            _same_geometry_within(image, (16, 20), (0.15, 0.2), origin2, direction2)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
            check_dimension(image, 2, given)  # a 2D model takes it (was: "image is 3D but the model is 2D")

    from dicom_series import write_dicom_series

    one = write_dicom_series(tmp_path / "one", array[None].astype(np.int16), (0.7, 0.6, 3.0), (1.0, 2.0, 3.0),
                             np.eye(3))
    image = read_image(tmp_path / "one")
    _same_geometry_within(image, (16, 20), (0.7, 0.6), (1.0, 2.0), np.eye(2))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(one)[0])


def _one_line(error: AtlasregError, *names) -> str:
    text = str(error.value)
    assert "\n" not in text and "Traceback" not in text
    for name in names:
        assert str(name) in text, (name, text)
    return text


def test_bad_dicom_folders_are_one_line_errors_naming_them(tmp_path, capfd):
    from dicom_series import UID_ROOT

    (tmp_path / "empty").mkdir()
    with pytest.raises(AtlasregError, match="is a folder") as error:
        read_image(tmp_path / "empty")
    _one_line(error, tmp_path / "empty")

    _ct_series(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "zz.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"not a data set" * 20)
    with pytest.raises(AtlasregError, match="GDCM does not recognise it") as error:
        read_image(tmp_path / "corrupt")
    _one_line(error, tmp_path / "corrupt" / "zz.dcm")

    _ct_series(tmp_path / "truncated")  # a slice cut short: GDCM leaves it out of the series; refused
    data = (tmp_path / "truncated" / "slice004.dcm").read_bytes()
    (tmp_path / "truncated" / "slice004.dcm").write_bytes(data[:-40])
    with pytest.raises(AtlasregError, match="GDCM does not recognise it") as error:
        read_image(tmp_path / "truncated")
    _one_line(error, tmp_path / "truncated" / "slice004.dcm")

    a, b = UID_ROOT + ".41", UID_ROOT + ".42"
    _ct_series(tmp_path / "two", names=[f"a{k:02d}.dcm" for k in range(12)], uid=a)
    array_b, _ = _ct_series(tmp_path / "two", names=[f"b{k:02d}.dcm" for k in range(12)], uid=b)
    with pytest.raises(AtlasregError, match="holds 2 DICOM series") as error:
        read_image(tmp_path / "two")
    _one_line(error, tmp_path / "two", a, b, "12 files")
    # one file of a series picks that series
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(tmp_path / "two" / "b03.dcm")), array_b)

    _ct_series(tmp_path / "missing")
    (tmp_path / "missing" / "slice005.dcm").unlink()
    with pytest.raises(AtlasregError, match=r"not evenly spaced \(steps of 2.5 to 5 mm") as error:
        read_image(tmp_path / "missing")
    _one_line(error, tmp_path / "missing")

    from dicom_series import write_dicom_series

    positions = [(0.0, 0.0, 2.5 * (k // 2)) for k in range(6)]  # two phases at each of 3 positions
    write_dicom_series(tmp_path / "phases", np.zeros((6, 4, 4), np.int16), (1.0, 1.0, 2.5), (0, 0, 0), np.eye(3),
                       positions=positions)
    with pytest.raises(AtlasregError, match="6 files lie at 3 positions") as error:
        read_image(tmp_path / "phases")
    _one_line(error, tmp_path / "phases")

    sheared = [(0.0, 0.5 * k, 2.5 * k) for k in range(4)]  # gantry tilt
    write_dicom_series(tmp_path / "tilt", np.zeros((4, 4, 4), np.int16), (1.0, 1.0, 2.5), (0, 0, 0), np.eye(3),
                       positions=sheared)
    with pytest.raises(AtlasregError, match="sheared") as error:
        read_image(tmp_path / "tilt")
    _one_line(error, tmp_path / "tilt")
    assert capfd.readouterr().err == ""


def test_two_views_of_one_series_are_two_2d_images(tmp_path):
    """Files of one series without a position (the two views of a chest radiograph) are 2D images each:
    the folder is refused naming them, each file reads alone."""
    from dicom_series import UID_ROOT, write_dicom_image

    uid = UID_ROOT + ".51"
    pa = np.full((20, 16), 100, np.uint16)
    write_dicom_image(tmp_path / "chest" / "pa.dcm", pa, (0.15, 0.2), series_uid=uid)
    write_dicom_image(tmp_path / "chest" / "lat.dcm", pa + 7, (0.15, 0.2), series_uid=uid)
    with pytest.raises(AtlasregError, match="holds 2 2D DICOM images of series") as error:
        read_image(tmp_path / "chest")
    _one_line(error, tmp_path / "chest", "lat.dcm", "pa.dcm")
    assert sitk.GetArrayFromImage(read_image(tmp_path / "chest" / "lat.dcm")).min() == 107
    assert read_image(tmp_path / "chest" / "pa.dcm").GetSize() == (16, 20)


def test_dicom_labelmap_written_as_nifti_keeps_the_series_geometry(tmp_path):
    """A labelmap on a DICOM series' grid written as .nii.gz (what segment does) reads back, with SimpleITK
    and with nibabel (RAS: x and y negated), with the series' spacing, origin and direction."""
    import nibabel as nib

    _, volume = _ct_series(tmp_path / "ct")
    image = read_image(tmp_path / "ct")
    labels = sitk.Cast(sitk.BinaryThreshold(image, 0.0, 1e9, 1, 0), sitk.sitkUInt8)
    path = write_image(labels, tmp_path / "out" / "itn_labelmap.nii.gz")
    back = sitk.ReadImage(str(path))
    _same_geometry_within(back, (8, 10, 12), (0.8, 0.9, 2.5), (10.0, -20.0, 30.0), _OBLIQUE)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labels))
    affine = nib.load(str(path)).affine
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(affine[:3, :3], lps_to_ras @ _OBLIQUE @ np.diag([0.8, 0.9, 2.5]), atol=1e-4)
    np.testing.assert_allclose(affine[:3, 3], lps_to_ras @ [10.0, -20.0, 30.0], atol=1e-4)
