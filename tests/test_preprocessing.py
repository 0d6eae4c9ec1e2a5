import numpy as np
import pytest
import SimpleITK as sitk
import torch
from volumes import LABELS, ellipsoids, write_identity_header_scan, write_scan

from atlasreg.data.cases import (
    Preprocessing, has_no_spacing, intensity_stats, labels_on_grid, load_case, physical_grid,
)
from atlasreg.errors import AtlasregError
from atlasreg.data.preprocessing import indices_to_values, one_hot, values_to_indices
from atlasreg.spatial.grid import Grid
from atlasreg.spatial.transforms import resample


def test_one_hot_over_declared_labels_keeps_channels_for_missing_structures():
    lab = np.array([[0, 3], [3, 0]])
    idx = values_to_indices(lab, [0, 1, 2, 3])  # structures 1 and 2 absent: channels do not shift
    oh = one_hot(torch.from_numpy(idx)[None], 4)
    assert oh.shape == (1, 4, 2, 2) and oh[0, 3, 0, 1] == 1 and oh[0, 1].sum() == 0
    assert np.array_equal(indices_to_values(idx, [0, 1, 2, 3]), lab)
    with pytest.raises(ValueError):
        values_to_indices(np.array([[7]]), [0, 1])


def _normalised(a, **kw):
    prep = Preprocessing((0, 1), (8, 8), (1.0, 1.0), 2, **kw)
    lo, hi, scale, offset = intensity_stats(a, prep)
    return np.clip(a, lo, hi) * scale + offset


def test_normalisation():
    a = _normalised(np.arange(10.0))
    assert abs(a.mean()) < 1e-6 and abs(a.std() - 1) < 1e-6
    assert np.all(_normalised(np.ones(5)) == 0)
    # z-score inside the foreground (skull-stripped MRI): the brain voxels get mean 0 and SD 1
    brain = np.concatenate([np.zeros(50), np.linspace(10.0, 20.0, 50)])
    b = _normalised(brain, intensity="zscore_foreground")[50:]
    assert abs(b.mean()) < 1e-5 and abs(b.std() - 1) < 1e-5
    # CT: a window clipped and rescaled to [0, 1]
    ct = _normalised(np.array([-1000.0, -100.0, 0.0, 200.0, 3000.0]), intensity="rescale", clip_range=(-100.0, 200.0))
    assert np.allclose(ct, [0.0, 0.0, 1 / 3, 1.0, 1.0])
    # percentile clipping: one bright outlier does not set the scale
    spiky = np.concatenate([np.linspace(0.0, 1.0, 999), [1000.0]])
    assert _normalised(spiky, clip_percentiles=(0.5, 99.5)).max() < 2.0


@pytest.mark.parametrize("factor", [1e20, 3e38, 1e-30, -3e38])
@pytest.mark.parametrize("settings", [{}, {"intensity": "zscore_foreground", "foreground_threshold": 0.0},
                                      {"intensity": "rescale"}, {"clip_percentiles": (1.0, 99.0)}])
def test_extreme_float32_intensities_normalise_like_ordinary_ones(factor, settings):
    # float32 statistics overflowed at |x| ~ 1e20 (SD inf: an all-constant image, silently wrong) and
    # 3e38 (mean inf: NaN, then SIGSEGV in the refinement), and underflowed at 1e-30 (issue 14).
    from atlasreg.data.cases import case_from_image

    rng = np.random.default_rng(0)
    a = (rng.random((24, 20)) + np.pad(np.ones((8, 8)), ((4, 12), (6, 6)))).astype(np.float32) / 2.0
    if settings.get("intensity") == "zscore_foreground" and factor < 0:
        settings = {**settings, "foreground_threshold": -np.inf}  # every voxel: the negated foreground
    prep = Preprocessing((0, 1), (16, 16), (1.5, 1.5), 2, **settings)
    expected = case_from_image(sitk.GetImageFromArray(a), prep).image
    scaled = (a.astype(np.float64) * factor).astype(np.float32)
    assert np.all(np.isfinite(scaled)) and np.abs(scaled).max() > 0
    case = case_from_image(sitk.GetImageFromArray(scaled), prep, path="scaled.nii.gz")
    got = case.image
    assert torch.isfinite(got).all()
    if factor < 0:  # contrast inverted: z-scores change sign, a [0, 1] rescale flips; the padding (the
        # image minimum) differs, so only the scan's field of view is compared
        expected = 1.0 - expected if settings.get("intensity") == "rescale" else -expected
        inside = case.mask == 1.0
        got, expected = got[inside], expected[inside]
        assert got.numel() > 100
    assert torch.allclose(got, expected, atol=1e-4), float((got - expected).abs().max())


def test_normalisation_of_ordinary_images_is_unchanged_float32():
    # The float64 fallback leaves ordinary images bit-identical to the float32 statistics that the
    # documented results were computed with.
    a = (np.random.default_rng(1).random((10, 256, 216)) * 700.0).astype(np.float32)
    prep = Preprocessing((0, 1), (8, 8), (1.0, 1.0), 2)
    lo, hi, scale, offset = intensity_stats(a, prep)
    assert (scale, offset) == (1.0 / float(a.std()), -float(a.mean()) / float(a.std()))


def test_soft_round_trip_model_grid_loses_little():
    native = Grid((128, 128), (1.0, 1.0))
    yy, xx = np.mgrid[:128, :128]
    disc = (((yy - 60) ** 2 + (xx - 70) ** 2) < 30 ** 2).astype(np.int64)
    placed = native.resampled((64, 64), (2.0, 2.0))
    model = labels_on_grid(disc, 2, native, placed)
    assert torch.allclose(model.sum(1), torch.ones(1, 64, 64))
    back = resample(model, placed, native).argmax(1)[0].numpy()
    dice = 2 * (back & disc).sum() / (back.sum() + disc.sum())
    assert dice > 0.995


def test_largest_components_keeps_the_biggest_piece_per_structure():
    from atlasreg.data.preprocessing import largest_components

    a = np.zeros((12, 12), np.int64)
    a[1:4, 1:4] = 1          # 9 voxels
    a[6:10, 6:10] = 1        # 16 voxels: kept
    a[10, 10] = 1            # touches the big one diagonally: kept with full connectivity
    a[1:3, 8:11] = 2         # 6 voxels: kept
    a[10, 0] = 2             # 1 voxel: removed
    out = largest_components(a, 3)
    assert (out == 1).sum() == 17 and out[10, 10] == 1 and out[2, 2] == 0
    assert (out == 2).sum() == 6 and out[10, 0] == 0
    b = np.zeros((4, 6, 6), np.int64)  # 3D, one structure absent
    b[0:2, 0:2, 0:2] = 1
    b[3, 5, 5] = 1
    assert (largest_components(b, 3) == 1).sum() == 8


# ---------------------------------------------------------------- volumes (atlasreg.data.cases)

def test_padding_never_invents_anatomy(tmp_path):
    """A 6-slice scan (4 mm slices) whose structure runs through every slice, on a 16-slice model grid:
    the foreground volume on the model grid equals the file's within 5%; beyond the scan's slices the
    field-of-view mask is 0, the background channel 1 and the image the padding value. Measured volume
    ratio: 1.004."""
    size_xyz, spacing = (20, 18, 6), (1.5, 1.5, 4.0)
    yy, xx = np.mgrid[:18, :20]
    disc = ((xx - 9.0) * 1.5) ** 2 + ((yy - 9.5) * 1.5) ** 2 < 9.0 ** 2  # radius 9 mm, in every slice
    lab = np.repeat(disc[None], size_xyz[2], 0).astype(np.int16)
    img = (100.0 + 50.0 * lab + np.random.default_rng(0).normal(0, 2, lab.shape)).astype(np.float32)
    image, label = write_scan(tmp_path, "slab", img, lab, spacing=spacing, origin=(-5.0, 8.0, 20.0),
                              direction=np.eye(3))
    prep = Preprocessing((0, 1), (16, 16, 16), (2.0, 2.0, 4.0), 3)
    case = load_case(image, label, prep)
    model_mm3 = float(np.prod(prep.spacing))
    on_model = float((1.0 - case.labelmap[0, 0]).sum()) * model_mm3
    in_file = float(lab.sum()) * float(np.prod(spacing))
    print(f"foreground on the model grid / in the file: {on_model / in_file:.4f}")
    assert abs(on_model / in_file - 1.0) < 0.05, (on_model, in_file)
    # Model slices (4 mm, centred on the scan) at |z| <= 10 mm lie on the scan's slices, the others
    # (|z| >= 14 mm) beyond its 24 mm.
    z = (np.arange(16) - 7.5) * 4.0
    outside, inside = np.abs(z) > 12.0, np.abs(z) < 12.0
    assert outside.sum() == 10 and inside.sum() == 6
    assert torch.all(case.mask[0, 0, outside] == 0.0)
    assert torch.all(case.mask[0, 0, inside, 2:-2, 2:-2] == 1.0)  # in-plane, the model grid (32 mm) is wider too
    assert torch.all(case.labelmap[0, 0, outside] == 1.0) and torch.all(case.labelmap[0, 1:, outside] == 0.0)
    lo, hi, scale, offset = case.stats
    assert torch.allclose(case.image[0, 0, outside], torch.tensor(float(img.min()) * scale + offset))
    assert float(case.labelmap[0, 1, inside].amax()) == 1.0  # the structure is there on the scan's slices


def test_declared_spacing_replaces_an_identity_header_only(tmp_path):
    """data.spacing gives the physical spacing of a NIfTI with an identity affine (ACDC), while the
    outputs keep the file's grid; a file with a real header keeps its own spacing."""
    img, lab = ellipsoids(size_xyz=(16, 18, 6), spacing=(1.4, 1.6, 6.0))
    identity, _ = write_identity_header_scan(tmp_path, "identity", img, lab)
    real, _ = write_scan(tmp_path, "real", img, lab)
    declared = (1.4, 1.6, 6.0)
    prep = Preprocessing(tuple(LABELS), (8, 16, 16), (1.6, 1.6, 4.0), 3, spacing_override=declared)
    source = sitk.ReadImage(str(identity))
    assert has_no_spacing(source, identity) and not has_no_spacing(sitk.ReadImage(str(real)), real)
    case = load_case(identity, None, prep)
    assert case.grid.spacing == (1.0, 1.0, 1.0) and case.physical.spacing == declared
    assert case.physical.size == case.grid.size and case.physical.direction == case.grid.direction
    assert np.allclose(case.frame().matrix[0].abs().sum(0).numpy(), 1.0 / np.asarray(declared), atol=1e-6)
    kept = load_case(real, None, prep)
    assert kept.physical == kept.grid and np.allclose(kept.grid.spacing, (0.9, 1.3, 3.5))
    # An identity direction with a real origin is a header, not a lost one.
    moved = sitk.ReadImage(str(identity))
    moved.SetOrigin((1.0, 2.0, 3.0))
    assert not has_no_spacing(moved, "moved.nii.gz")
    with pytest.raises(AtlasregError, match="data.spacing") as e:
        physical_grid(source, (1.4, 1.6), identity)
    assert e.value.path == str(identity)
