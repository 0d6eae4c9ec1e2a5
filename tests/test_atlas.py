import math

import SimpleITK as sitk
import torch
from torch.utils.data import TensorDataset

from atlasreg.atlas import atlas_init, atlas_update, save_atlas
from atlasreg.spatial.grid import Grid
from atlasreg.config import load_config
from atlasreg.models.atlas_istn import AtlasISTNModule


def test_atlas_init_and_update_follow_eq_15():
    labs = torch.rand(4, 3, 8, 8)
    imgs = torch.rand(4, 1, 8, 8)
    lab0, img0 = atlas_init(labs, imgs)
    assert torch.allclose(lab0, labs.mean(0, keepdim=True))
    new_mean = torch.rand(1, 3, 8, 8)
    upd = atlas_update(lab0, new_mean, 0.01)
    assert torch.allclose(upd, 0.99 * lab0 + 0.01 * new_mean)


def test_module_atlas_update_is_eq_15_with_warped_mean():
    """One epoch-end update of the Lightning module equals Eq. 15 with the mean of z_i o Phi_i (Eq. 16):
    at initialisation Phi is the identity, so the warped mean is the plain mean."""
    cfg = load_config(None, {"data": {"labels": {0: "bg", 1: "fg"}}, "model": {"size": [16, 16]},
                             "training": {"atlas_eta": 0.25}})
    m = AtlasISTNModule(cfg)
    labs = torch.zeros(5, 2, 16, 16)
    labs[:, 1, 4:12, 4:12] = 1
    labs[:, 0] = 1 - labs[:, 1]
    imgs = torch.randn(5, 1, 16, 16)
    m.set_training_data(TensorDataset(imgs, labs))
    m.atlas_labelmap.copy_(torch.full((1, 2, 16, 16), 0.5))
    m.atlas_image.zero_()
    m.update_atlas()
    assert torch.allclose(m.atlas_labelmap, 0.75 * 0.5 + 0.25 * labs.mean(0, keepdim=True), atol=1e-5)
    assert torch.allclose(m.atlas_image, 0.25 * imgs.mean(0, keepdim=True), atol=1e-5)


def test_save_atlas_writes_images_with_grid(tmp_path):
    lab = torch.zeros(1, 2, 8, 16)
    lab[:, 1, 2:6, 4:12] = 1
    lab[:, 0] = 1 - lab[:, 1]
    paths = save_atlas(lab, torch.rand(1, 1, 8, 16), [0, 255], Grid.centred((8, 16), (2.0, 3.0)), tmp_path)
    img = sitk.ReadImage(str(paths["atlas_labelmap.nii.gz"]))
    assert img.GetSize() == (16, 8) and img.GetSpacing() == (2.0, 3.0)
    arr = sitk.GetArrayFromImage(img)
    assert set(arr.ravel().tolist()) == {0, 255} and (arr == 255).sum() == 32
    # Centred: the centre of the field of view is the world origin.
    assert abs(img.GetOrigin()[0] + 15.0) < 1e-6 and abs(img.GetOrigin()[1] + 10.5) < 1e-6
    assert sitk.ReadImage(str(paths["atlas_probabilities.nii.gz"])).GetNumberOfComponentsPerPixel() == 2


def test_fade_in_weight_follows_eq_24():
    from atlasreg.models.atlas_istn import fade_in_weight

    assert fade_in_weight(25, {"e0": 25, "tau": 25}) == 0.5
    assert abs(fade_in_weight(0, {"e0": 25, "tau": 25}) - 1 / (1 + math.exp(1))) < 1e-12
    assert fade_in_weight(3, None) == 1.0
    assert fade_in_weight(0, {"e0": 100000, "tau": 1}) == 0.0  # no OverflowError far before e0
    assert fade_in_weight(100000, {"e0": 0, "tau": 1}) == 1.0


def test_delayed_affine_start_uses_identity_affine():
    cfg = load_config(None, {"data": {"labels": {0: "bg", 1: "fg"}}, "model": {"size": [16, 16]},
                             "training": {"affine_start_epoch": 2}})
    m = AtlasISTNModule(cfg)
    assert not m.use_affine()  # current_epoch is 0 before training
    _, tr = m.net(torch.randn(2, 1, 16, 16), torch.rand(1, 2, 16, 16), use_affine=m.use_affine())
    assert tr.affine is None and tr.svf is not None


def test_initial_atlas_is_the_streamed_mean_of_eq_15_bit_for_bit():
    """The module reads the cases batch by batch; its initial atlas still equals atlas_init on the
    stacked cases exactly (37 cases: more than one run of 16 in torch's summation order)."""
    cfg = load_config(None, {"data": {"labels": {0: "bg", 1: "fg"}}, "model": {"size": [16, 16]},
                             "training": {"atlas_batch_size": 7}})
    m = AtlasISTNModule(cfg)
    gen = torch.Generator().manual_seed(0)
    labs = torch.softmax(torch.randn(37, 2, 16, 16, generator=gen), 1)
    imgs = torch.randn(37, 1, 16, 16, generator=gen)
    m.set_training_data(TensorDataset(imgs, labs))
    m.on_fit_start()
    lab0, img0 = atlas_init(labs, imgs)
    assert torch.equal(m.atlas_labelmap, lab0) and torch.equal(m.atlas_image, img0)
