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
