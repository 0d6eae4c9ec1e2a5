"""Tests of the synthetic letter-B generator (atlasreg.data.letter_b; Atlas-ISTN paper Sec. 3.1)."""

import pathlib

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from atlasreg.data.letter_b import (
    BACKGROUND_INTENSITY,
    FOREGROUND_INTENSITY,
    NOISE_STD,
    generate_case,
    make_letter_b,
    write_letter_b_dataset,
)

FOUR = ndimage.generate_binary_structure(2, 1)
EIGHT = ndimage.generate_binary_structure(2, 2)
PUBLISHED = pathlib.Path("/work/shared/data/letter-b")


def n_components(mask, structure):
    return ndimage.label(mask, structure=structure)[1]


def n_holes(mask, structure):
    """Background components that do not touch the border (the letter never touches it)."""
    return n_components(~mask.astype(bool), structure) - 1


@pytest.fixture(scope="module")
def clean_cases():
    return [generate_case(np.random.default_rng([7, i])) for i in range(24)]


# --------------------------------------------------------------------------- base letter


@pytest.mark.parametrize("size", [128, 64, 256])
def test_base_letter_is_one_component_with_two_holes(size):
    b = make_letter_b(size)
    assert b.shape == (size, size)
    assert b.dtype == np.uint8
    assert set(np.unique(b).tolist()) == {0, 1}
    # one component and two holes, whichever connectivity is used
    for structure in (FOUR, EIGHT):
        assert n_components(b, structure) == 1
        assert n_holes(b, structure) == 2
    # nothing touches the border
    assert not b[0].any() and not b[-1].any() and not b[:, 0].any() and not b[:, -1].any()


def test_base_letter_geometry_matches_published_scale():
    b = make_letter_b(128).astype(bool)
    area = int(b.sum())
    assert 1800 < area < 2400  # published mean letter area 2065 px
    ys, xs = np.nonzero(b)
    assert abs(ys.mean() - 66) < 3 and abs(xs.mean() - 63.5) < 3  # published mean centroid
    height, width = np.ptp(ys) + 1, np.ptp(xs) + 1
    assert 65 < height < 85 and 40 < width < 65 and height > width
    # bottom bowl is the larger hole and lies below the top one
    lab, n = ndimage.label(~b, structure=FOUR)
    holes = [lab == k for k in range(1, n + 1) if not (lab == k)[0].any()]
    assert len(holes) == 2
    top, bottom = sorted(holes, key=lambda h: np.nonzero(h)[0].mean())
    assert bottom.sum() > top.sum() > 300


def test_make_letter_b_returns_a_fresh_writable_copy():
    a = make_letter_b(128)
    a[:] = 0
    assert make_letter_b(128).sum() > 0


# --------------------------------------------------------------------------- generated cases


def test_case_dtype_shape_and_label_values(clean_cases):
    base_area = make_letter_b(128).sum()
    for image, label in clean_cases:
        assert image.shape == label.shape == (128, 128)
        assert image.dtype == np.uint8 and label.dtype == np.uint8
        assert set(np.unique(label).tolist()) == {0, 255}
        fg = label == 255
        # the letter stays inside the image, clear of the border
        assert not fg[:3].any() and not fg[-3:].any() and not fg[:, :3].any() and not fg[:, -3:].any()
        assert 0.5 * base_area < fg.sum() < 1.6 * base_area
        # still a single letter-sized object
        lab, n = ndimage.label(fg, structure=EIGHT)
        assert np.bincount(lab.ravel())[1:].max() > 0.95 * fg.sum()


def test_cases_vary_in_pose(clean_cases):
    centroids = np.array([np.argwhere(label > 0).mean(axis=0) for _, label in clean_cases])
    areas = np.array([(label > 0).sum() for _, label in clean_cases])
    assert centroids.std(axis=0).min() > 2.0  # published: about 6 px per axis
    assert areas.std() > 50  # published: about 240 px
    labels = np.stack([label for _, label in clean_cases])
    assert len({lab.tobytes() for lab in labels}) == len(labels)


def test_same_seed_same_case_different_seed_different_case():
    a_img, a_seg = generate_case(np.random.default_rng([3, 5]))
    b_img, b_seg = generate_case(np.random.default_rng([3, 5]))
    c_img, c_seg = generate_case(np.random.default_rng([4, 5]))
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_seg, b_seg)
    assert not np.array_equal(a_seg, c_seg)
    assert not np.array_equal(a_img, c_img)


def test_intensities_match_published_statistics(clean_cases):
    inside, outside = [], []
    for image, label in clean_cases:
        fg = label > 0
        inside.append(image[fg].astype(float))
        outside.append(image[~fg].astype(float))
        assert image[fg].mean() > image[~fg].mean() + 30
    inside, outside = np.concatenate(inside), np.concatenate(outside)
    # published clean set: letter 150.0, background 100.0, noise std 25.5
    assert abs(inside.mean() - FOREGROUND_INTENSITY) < 1.5
    assert abs(outside.mean() - BACKGROUND_INTENSITY) < 1.0
    assert abs(inside.std() - NOISE_STD) < 1.0 and abs(outside.std() - NOISE_STD) < 1.0
    # additive white noise: neighbouring residuals uncorrelated
    image, label = clean_cases[0]
    resid = image.astype(float) - np.where(label > 0, FOREGROUND_INTENSITY, BACKGROUND_INTENSITY)
    corr = np.corrcoef(resid[:, 1:].ravel(), resid[:, :-1].ravel())[0, 1]
    assert abs(corr) < 0.1


def test_other_sizes():
    image, label = generate_case(np.random.default_rng(0), size=64)
    assert image.shape == label.shape == (64, 64)
    assert set(np.unique(label).tolist()) == {0, 255}
    with pytest.raises(ValueError):
        generate_case(np.random.default_rng(0), size=4)
    with pytest.raises(ValueError):
        make_letter_b(4)


# --------------------------------------------------------------------------- corrupt variant


def test_corrupt_changes_image_but_not_labelmap():
    n_changed_cases = 0
    for i in range(8):
        clean_img, clean_seg = generate_case(np.random.default_rng([11, i]), corrupt=False)
        corr_img, corr_seg = generate_case(np.random.default_rng([11, i]), corrupt=True)
        np.testing.assert_array_equal(clean_seg, corr_seg)
        assert not np.array_equal(clean_img, corr_img)
        fg = clean_seg > 0
        diff = corr_img.astype(int) - clean_img.astype(int)
        # the noise field is shared, so differences come only from the clutter:
        # bright blobs outside the letter and erased pieces inside it
        assert (diff[~fg] >= 0).all()
        assert (diff[fg] <= 0).all()
        assert (diff[~fg] > 0).sum() >= 10
        assert (diff[fg] < 0).sum() >= 5
        n_changed_cases += 1
    assert n_changed_cases == 8


def test_corrupt_clutter_intensities():
    corr_img, label = generate_case(np.random.default_rng([12, 0]), corrupt=True)
    clean_img, _ = generate_case(np.random.default_rng([12, 0]), corrupt=False)
    fg = label > 0
    diff = corr_img.astype(int) - clean_img.astype(int)
    step = int(FOREGROUND_INTENSITY - BACKGROUND_INTENSITY)
    # blobs are painted at the letter intensity, missing pieces at the background intensity
    # (same noise field), so apart from clipping at 0/255 the changes are exactly +-50
    assert np.median(diff[~fg][diff[~fg] != 0]) == step
    assert np.median(diff[fg][diff[fg] != 0]) == -step
    # blobs are compact: most changed background pixels have changed neighbours
    blobs = (diff > 0) & ~fg
    assert ndimage.binary_erosion(blobs).sum() > 0.3 * blobs.sum()


# --------------------------------------------------------------------------- writer


def test_writer_names_format_and_determinism(tmp_path):
    out = tmp_path / "set"
    paths = write_letter_b_dataset(out, n_cases=3, seed=5, start_index=4)
    expected = [out / f"B{i}_{kind}.png" for i in (4, 5, 6) for kind in ("img", "seg")]
    assert paths == expected
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in expected)  # no temp files left
    for i in (4, 5, 6):
        img = sitk.ReadImage(str(out / f"B{i}_img.png"))
        seg = sitk.ReadImage(str(out / f"B{i}_seg.png"))
        assert img.GetSize() == seg.GetSize() == (128, 128)
        assert img.GetPixelID() == seg.GetPixelID() == sitk.sitkUInt8
        assert img.GetNumberOfComponentsPerPixel() == 1
        ref_img, ref_seg = generate_case(np.random.default_rng([5, i]))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), ref_img)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(seg), ref_seg)
        assert Image.open(out / f"B{i}_seg.png").mode == "L"
    # a case depends on (seed, index) only, not on n_cases / start_index
    other = tmp_path / "other"
    write_letter_b_dataset(other, n_cases=1, seed=5, start_index=5)
    assert (other / "B5_img.png").read_bytes() == (out / "B5_img.png").read_bytes()
    assert (other / "B5_seg.png").read_bytes() == (out / "B5_seg.png").read_bytes()
    # overwriting in place works (atomic replace)
    write_letter_b_dataset(out, n_cases=1, seed=6, start_index=4)
    assert (out / "B4_img.png").read_bytes() != (other / "B5_img.png").read_bytes()


def test_writer_corrupt_and_edge_cases(tmp_path):
    clean = write_letter_b_dataset(tmp_path / "clean", n_cases=2, seed=1)
    corrupt = write_letter_b_dataset(tmp_path / "corrupt", n_cases=2, seed=1, corrupt=True)
    for c, k in zip(clean, corrupt):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(c)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(k)))
        if c.name.endswith("_seg.png"):
            np.testing.assert_array_equal(a, b)
        else:
            assert not np.array_equal(a, b)
    assert write_letter_b_dataset(tmp_path / "empty", n_cases=0) == []
    with pytest.raises(ValueError):
        write_letter_b_dataset(tmp_path / "neg", n_cases=-1)


# --------------------------------------------------------------------------- published data (optional)


@pytest.mark.skipif(not (PUBLISHED / "clean" / "B1_img.png").exists(), reason="published letter-B data not available")
def test_statistics_close_to_published_data(clean_cases):
    pub_in, pub_out, pub_area = [], [], []
    for i in range(1, 21):
        img = np.asarray(Image.open(PUBLISHED / "clean" / f"B{i}_img.png"), dtype=float)
        seg = np.asarray(Image.open(PUBLISHED / "clean" / f"B{i}_seg.png")) > 0
        pub_in.append(img[seg].mean())
        pub_out.append(img[~seg].mean())
        pub_area.append(seg.sum())
    gen_in = [img[seg > 0].mean() for img, seg in clean_cases]
    gen_out = [img[seg == 0].mean() for img, seg in clean_cases]
    gen_area = [(seg > 0).sum() for _, seg in clean_cases]
    assert abs(np.mean(gen_in) - np.mean(pub_in)) < 2
    assert abs(np.mean(gen_out) - np.mean(pub_out)) < 2
    assert abs(np.mean(gen_area) - np.mean(pub_area)) < 0.15 * np.mean(pub_area)
