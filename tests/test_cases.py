"""Degenerate inputs of atlasreg.data.cases (issue 14, item 7): images with a single voxel along an
axis or covering no model voxel (errors naming the file), constant images and images larger than the
model's field of view (one warning per file naming it and what was done)."""

import dataclasses
import re
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from atlasreg.data.cases import Preprocessing, case_from_image, load_case
from atlasreg.errors import AtlasregError

#: A 2D model of 16x16 voxels of 2 mm (a 32x32 mm field of view) on PNGs of 1 mm pixels.
PREP2 = Preprocessing((0, 255), (16, 16), (2.0, 2.0), 2, spacing_override=(1.0, 1.0))
#: A 3D model of 8x8x8 voxels of 2 mm (16x16x16 mm).
PREP3 = Preprocessing((0, 1), (8, 8, 8), (2.0, 2.0, 2.0), 3)


def write(path, array, spacing=None):
    image = sitk.GetImageFromArray(array)
    if spacing is not None:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def noise(shape, seed=0, scale=200.0):
    return (np.random.default_rng(seed).random(shape) * scale).astype(np.uint8 if len(shape) == 2 else np.float32)


@pytest.mark.parametrize("name, array, prep", [
    ("one.png", np.full((1, 1), 7, np.uint8), PREP2),
    ("row.png", noise((1, 16)), PREP2),
    ("column.png", noise((16, 1)), PREP2),
    ("one.nii.gz", np.full((1, 1), 7.0, np.float32), PREP2),
    ("one3d.nii.gz", np.full((1, 1, 1), 7.0, np.float32), PREP3),
    ("slice.nii.gz", noise((1, 16, 16)), PREP3),
])
def test_a_single_voxel_along_an_axis_is_an_error_naming_the_file(tmp_path, name, array, prep):
    # Before: read without complaint, every model voxel padding (field-of-view mask 0), a labelmap of
    # background only: nothing segmented, a training case that weighs nothing.
    path = write(tmp_path / name, array)
    size = "x".join(str(n) for n in array.shape[::-1])
    with pytest.raises(AtlasregError, match=f"image is {size} voxels; .* at least 2 voxels along every axis") as e:
        load_case(path, None, prep)
    assert e.value.path == str(path) and "\n" not in str(e.value)
    with pytest.raises(AtlasregError, match="at least 2 voxels") as e:  # an image in memory: named too
        case_from_image(sitk.GetImageFromArray(array.astype(np.float32)), prep, name="tiny")
    assert str(e.value).startswith("image 'tiny': ")


def test_an_image_covering_no_model_voxel_is_an_error(tmp_path):
    # 4x4 voxels of 0.1 mm: the whole image lies between the centres of the model's 2 mm voxels.
    path = write(tmp_path / "speck.nii.gz", noise((4, 4)).astype(np.float32), spacing=(0.1, 0.1))
    with pytest.raises(AtlasregError, match=r"image extent 0\.4x0\.4 mm covers no voxel centre of the model grid") as e:
        load_case(path, None, PREP2)
    assert e.value.path == str(path)
    # one that covers a few model voxels is segmented (a low-resolution image, not a wrong one)
    small = write(tmp_path / "small.nii.gz", noise((4, 4)).astype(np.float32), spacing=(1.0, 1.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        case = load_case(small, None, PREP2)
    assert float(case.mask.sum()) == 4.0 and not caught


@pytest.mark.parametrize("name, array, prep", [
    ("flat.png", np.full((32, 32), 7, np.uint8), PREP2),
    ("flat.nii.gz", np.full((16, 16, 16), 7.0, np.float32), PREP3),
])
def test_a_constant_image_warns_once_and_is_normalised_to_zeros(tmp_path, name, array, prep):
    path = write(tmp_path / name, array)
    for settings in ({}, {"intensity": "zscore_foreground"}, {"intensity": "rescale"},
                     {"clip_percentiles": (0.5, 99.5), "pad_value": -3.0}):
        p = dataclasses.replace(prep, **settings)
        target = tmp_path / f"{len(settings)}{settings.get('intensity', '')}{name}"
        target.write_bytes(path.read_bytes())
        with pytest.warns(UserWarning, match="^" + re.escape(f"{target}: constant intensity 7: normalised to "
                                                            "zeros")) as caught:
            case = load_case(target, None, p)
        assert len(caught) == 1
        assert torch.equal(case.image, torch.zeros_like(case.image)) and float(case.mask.sum()) > 0
        with warnings.catch_warnings(record=True) as again:  # once per file, however often it is read
            warnings.simplefilter("always")
            load_case(target, None, p)
        assert not again
    for _ in range(2):  # an image in memory is named by its case name, and reported every time
        with pytest.warns(UserWarning, match=r"^image 'flat': constant intensity 7: normalised to zeros"):
            case_from_image(sitk.GetImageFromArray(array.astype(np.float32)), prep, name="flat")


def test_an_image_clipped_to_one_value_warns(tmp_path):
    # CT below the window: every voxel clips to the window's lower end.
    path = write(tmp_path / "air.nii.gz", np.arange(256, dtype=np.float32).reshape(16, 16) - 1300.0)
    prep = dataclasses.replace(PREP2, intensity="rescale", clip_range=(-100.0, 200.0))
    with pytest.warns(UserWarning, match=re.escape(f"{path}: intensities in [-1300, -1045] are all -100 after "
                                                   "clipping; normalised to zeros")):
        case = load_case(path, None, prep)
    assert torch.equal(case.image, torch.zeros_like(case.image))


def test_an_image_larger_than_the_field_of_view_warns_how_much_was_cropped(tmp_path):
    # 64x64 pixels of 1 mm on a 32x32 mm field of view centred on the image: the outer 75% is cropped.
    path = write(tmp_path / "big.png", noise((64, 64)))
    with pytest.warns(UserWarning, match="^" + re.escape(
            f"{path}: extent 64x64 mm of the image exceeds the model's field of view 32x32 mm: 75% of the "
            "image's voxels lie outside and were cropped; the region around (31.5, 31.5) mm was used")):
        case = load_case(path, None, PREP2)
    assert float(case.mask.sum()) == 256.0
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        load_case(path, None, PREP2)
    assert not again
    # 3D, one axis too long: of 24 slices of 1.5 mm (36 mm), the 14 whose centres lie more than 8 mm
    # from the centre are outside the 16 mm field of view
    vol = write(tmp_path / "long.nii.gz", noise((24, 8, 8)), spacing=(2.0, 2.0, 1.5))
    with pytest.warns(UserWarning, match=re.escape(f"{vol}: extent 16x16x36 mm of the image exceeds the model's "
                                                   "field of view 16x16x16 mm: 58.3% of the image's voxels lie "
                                                   "outside")):
        load_case(vol, None, PREP3)


def test_the_field_of_view_check_follows_what_the_model_grid_is_centred_on(tmp_path):
    # Centred on the labels (training): the labelled structure, not the image, must fit.
    img = noise((64, 64))
    lab = np.zeros((64, 64), np.uint8)
    lab[28:36, 28:36] = 255  # 8 mm: fits the 32 mm field of view
    image, label = write(tmp_path / "img.png", img), write(tmp_path / "lab.png", lab)
    prep = dataclasses.replace(PREP2, centre="labels")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_case(image, label, prep)
        load_case(image, None, prep)  # at test time the structure is found later: nothing checked here
    assert not caught
    lab[4:60, 20:44] = 255  # 24x56 mm: taller than the field of view
    big = write(tmp_path / "biglab.png", lab)
    with pytest.warns(UserWarning, match=re.escape(f"{image}: extent 24x56 mm of the labelled structures exceeds "
                                                   "the model's field of view 32x32 mm: 42.9% of their voxels lie "
                                                   "outside")):
        load_case(image, big, prep)
    # Centred on the foreground: a bright disc of 40 mm diameter in a 64 mm image
    yy, xx = np.mgrid[:64, :64]
    disc = ((yy - 31.5) ** 2 + (xx - 31.5) ** 2 < 20 ** 2).astype(np.uint8) * 200
    fg = write(tmp_path / "disc.png", disc)
    prep = dataclasses.replace(PREP2, centre="foreground")
    with pytest.warns(UserWarning, match=re.escape(f"{fg}: extent 40x40 mm of the foreground (intensities above 0) "
                                                   "exceeds the model's field of view 32x32 mm: ")):
        load_case(fg, None, prep)


def test_a_sliver_outside_the_field_of_view_gives_no_warning(tmp_path):
    # 34 pixels on 32 mm: a column at each side (5.9%) outside warns, one pixel of foreground (< 1%) does not.
    wide = write(tmp_path / "wide.png", noise((32, 34)))
    with pytest.warns(UserWarning, match=re.escape(f"{wide}: extent 34x32 mm of the image exceeds the model's field "
                                                   "of view 32x32 mm: 5.88% of")):
        load_case(wide, None, PREP2)
    disc = np.zeros((64, 64), np.uint8)
    disc[20:44, 20:44] = 200
    disc[20, 2] = 200  # a stray bright pixel far out
    path = write(tmp_path / "stray.png", disc)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_case(path, None, dataclasses.replace(PREP2, centre="foreground"))
    assert not caught


def test_ordinary_images_give_no_warning(tmp_path):
    # As large as the field of view (Letter-B: 128 pixels of 1 mm on 64 voxels of 2 mm) or smaller.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, shape in enumerate([(32, 32), (20, 28), (32, 8)]):
            load_case(write(tmp_path / f"ok{i}.png", noise(shape, seed=i)), None, PREP2)
        load_case(write(tmp_path / "ok.nii.gz", noise((8, 16, 10)), spacing=(1.6, 1.0, 2.0)), None, PREP3)
    assert not caught, [str(w.message) for w in caught]
