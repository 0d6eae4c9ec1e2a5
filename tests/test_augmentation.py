"""Spatial augmentation (MONAI RandAffine): seeded, and the same random affine for image and labelmap."""

import torch

from atlasreg.data.augmentation import make_spatial_augmentation

CFG = {"translation_voxels": 4, "rotation_degrees": 15, "scale": [0.9, 1.1], "probability": 1.0}


def batch():
    g = torch.Generator().manual_seed(0)
    lab = torch.zeros(3, 2, 24, 24)
    lab[:, 1, 6:18, 8:16] = 1
    lab[:, 0] = 1 - lab[:, 1]
    return lab[:, 1:] + 0.01 * torch.randn(3, 1, 24, 24, generator=g), lab


def test_same_seed_same_augmentation_and_image_follows_labelmap():
    image, lab = batch()
    a_img, a_lab = make_spatial_augmentation(CFG, 2, (1.0, 1.0), seed=3)(image, lab)
    b_img, b_lab = make_spatial_augmentation(CFG, 2, (1.0, 1.0), seed=3)(image, lab)
    c_img, _ = make_spatial_augmentation(CFG, 2, (1.0, 1.0), seed=4)(image, lab)
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    assert not torch.allclose(a_img, c_img)
    # The image is the foreground channel plus noise: both moved by the same affine.
    assert (a_img - a_lab[:, 1:]).abs().max() < 0.1
    assert torch.allclose(a_lab.sum(1), torch.ones_like(a_lab[:, 0]), atol=1e-5)  # still a partition of unity
    assert not torch.allclose(a_lab, lab)  # something moved


def test_per_axis_ranges_turn_slices_in_plane_only():
    """rotation_degrees [30, 0, 0] and translation [0, 3, 3] (array order z, y, x) move the anatomy
    within each slice and never across slices: the foreground per slice is kept; one range for every
    axis moves it across slices. A list of the wrong length is a ConfigError naming the key."""
    import pytest

    from atlasreg.config import ConfigError

    lab = torch.zeros(2, 2, 8, 24, 24)
    lab[:, 1, 2:6, 6:18, 8:16] = 1
    lab[:, 0] = 1 - lab[:, 1]
    image = lab[:, 1:].clone()
    mask = torch.ones_like(image)
    per_slice = lab[:, 1].sum((-1, -2))
    cfg = dict(CFG, rotation_degrees=[30, 0, 0], translation_voxels=[0, 3, 3], scale=[1.0, 1.0])
    _, in_plane, _ = make_spatial_augmentation(cfg, 3, (1.0, 1.0, 1.0), seed=1)(image, lab, mask)
    assert not torch.allclose(in_plane, lab)
    assert torch.allclose(in_plane[:, 1].sum((-1, -2))[:, 2:6], per_slice[:, 2:6], rtol=0.1)
    assert in_plane[:, 1, :2].abs().max() < 1e-4 and in_plane[:, 1, 6:].abs().max() < 1e-4
    cfg_all = dict(cfg, rotation_degrees=30, translation_voxels=3)
    _, everywhere, _ = make_spatial_augmentation(cfg_all, 3, (1.0, 1.0, 1.0), seed=1)(image, lab, mask)
    assert everywhere[:, 1, :2].sum() + everywhere[:, 1, 6:].sum() > 1.0
    with pytest.raises(ConfigError, match="rotation_degrees"):
        make_spatial_augmentation(dict(CFG, rotation_degrees=[30, 0]), 3, (1.0, 1.0, 1.0))
