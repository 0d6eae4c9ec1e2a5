"""atlasreg.deepatlas.losses: smoothness (Eqs. 10-11), feature NCC (Eq. 9), the auxiliary channels of
5.1.5, masking (5.1.6) and the training mask of 5.5.3, each against a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from atlasreg.deepatlas.autoencoder import FeatureAutoencoder
from atlasreg.deepatlas.coordinates import identity_coordinates, resize
from atlasreg.deepatlas.losses import (DeepAtlasSimilarity, SmoothnessLoss, auxiliary_channels, auxiliary_mse,
                                       feature_ncc_loss, foreground_mask, huber, masked_mean, ncc, prewitt_gradient,
                                       similarity_loss, smoothness_loss)


def rotation(d: int, angle: float) -> torch.Tensor:
    R = torch.eye(d, dtype=torch.float64)
    R[0, 0] = R[1, 1] = math.cos(angle)
    R[0, 1], R[1, 0] = -math.sin(angle), math.sin(angle)
    return R


def affine(u: torch.Tensor, A: torch.Tensor, t: float = 0.0) -> torch.Tensor:
    return torch.einsum("ij,nj...->ni...", A, u) + t


# ---------------------------------------------------------------- smoothness (Eq. 11)

@pytest.mark.parametrize("size", [(13, 11), (7, 9, 8)])
def test_identity_and_rigid_or_scaled_maps_cost_nothing(size):
    d = len(size)
    u = identity_coordinates(size, dtype=torch.float64)
    assert float(smoothness_loss(u)) < 1e-28  # float64 rounding of linspace only
    assert float(smoothness_loss(identity_coordinates(size))) < 1e-10  # float32
    scaled = torch.diag(torch.tensor([0.5, 0.8, 0.7][:d], dtype=torch.float64))
    for A in (0.6 * rotation(d, 0.7), rotation(d, -0.3) @ scaled):  # uniform det, orthogonal columns
        assert float(smoothness_loss(affine(u, A, 0.1))) < 1e-24


def test_a_shear_costs_the_log_det_of_its_unit_columns():
    """J = [[1, s], [0, 1]]: det J = 1 everywhere (first term 0); unit columns (1, 0) and (s, 1) / sqrt(1 + s^2)
    have det 1 / sqrt(1 + s^2), so the loss is L_0.5(-log(1 + s^2) / 2) exactly."""
    u = identity_coordinates((10, 12), dtype=torch.float64)
    for s in (0.3, 2.0):  # quadratic and linear part of the Huber function
        c = affine(u, torch.tensor([[1.0, s], [0.0, 1.0]], dtype=torch.float64))
        expected = huber(torch.tensor(-0.5 * math.log(1 + s * s), dtype=torch.float64))
        assert torch.allclose(smoothness_loss(c), expected, atol=1e-12, rtol=0)


def test_a_varying_determinant_costs_the_huber_spread_of_its_log():
    """c_x = u_x + (a / pi) sin(pi u_x): det J = 1 + a cos(pi u_x), columns orthogonal. The loss equals the
    mean over voxels of L_0.5(log det J - mean log det J) with the analytic derivative (within the
    central-difference error: measured 0.37% on 64 x 48)."""
    a = 0.6
    u = identity_coordinates((48, 64), dtype=torch.float64)
    c = u.clone()
    c[:, 0] = u[:, 0] + a / math.pi * torch.sin(math.pi * u[:, 0])
    log_det = torch.log(1 + a * torch.cos(math.pi * u[:, 0]))
    expected = huber(log_det - log_det.mean()).mean()
    assert abs(float(smoothness_loss(c)) / float(expected) - 1) < 0.01


def test_smoothness_is_masked_and_folds_are_penalised_with_a_gradient():
    u = identity_coordinates((16, 16), dtype=torch.float64)
    c = u.clone()
    right = u[:, 0] > 0.2
    c[:, 0] = torch.where(right, u[:, 0] + 0.3 * torch.sin(6 * u[:, 1]) * (u[:, 0] - 0.2), u[:, 0])
    mask = (u[:, :1] < 0.0).double()  # the deformation lies outside the mask (one voxel margin)
    assert float(smoothness_loss(c)) > 1e-3
    assert float(smoothness_loss(c, mask)) < 1e-24
    per_case = SmoothnessLoss()(torch.cat([u, c]), reduction="per_case")
    assert per_case.shape == (2,) and float(per_case[0]) < 1e-24 < float(per_case[1])
    reflected = u.clone()
    reflected[:, 0] = -u[:, 0]  # det J = det J^ = -1 everywhere, so only the second term costs:
    expected = 0.5 * (abs(math.log(1e-6) - math.log(2 + 1e-6)) - 0.25)  # log 1e-6 - log(1 + 1e-6 + 1), 7.129
    assert abs(float(smoothness_loss(reflected)) - expected) < 1e-9
    # a partial fold: det J = 1 + 1.5 cos(pi u_x) < 0 for |u_x| > 0.73; a gradient step unfolds
    folded = u.clone()
    folded[:, 0] = u[:, 0] + 1.5 / math.pi * torch.sin(math.pi * u[:, 0])
    folded.requires_grad_(True)
    loss = smoothness_loss(folded)
    loss.backward()
    assert torch.isfinite(folded.grad).all()
    step = (folded - 1e-3 * folded.grad / folded.grad.abs().max()).detach()
    assert float(smoothness_loss(step)) < float(loss.detach())
    with pytest.raises(ValueError, match="mask"):
        smoothness_loss(c, mask[..., :-1])


# ---------------------------------------------------------------- similarity (Eq. 9, 5.1.5)

def test_ncc_is_the_correlation_coefficient():
    torch.manual_seed(0)
    a, b = torch.randn(2, 1, 9, 8, dtype=torch.float64), torch.randn(2, 1, 9, 8, dtype=torch.float64)
    b = b + 0.7 * a
    expected = [np.corrcoef(a[n].flatten().numpy(), b[n].flatten().numpy())[0, 1] for n in range(2)]
    assert np.allclose(ncc(a, b).numpy(), expected, atol=1e-12)
    mask = torch.zeros(1, 1, 9, 8, dtype=torch.float64)
    mask[..., 2:7, 1:5] = 1
    inside = [np.corrcoef(a[n, 0, 2:7, 1:5].flatten().numpy(), b[n, 0, 2:7, 1:5].flatten().numpy())[0, 1]
              for n in range(2)]
    assert np.allclose(ncc(a, b, mask).numpy(), inside, atol=1e-12)
    # channels are centred on their own means: shifting one channel of both maps changes nothing
    two_a, two_b = torch.cat([a, a], 1), torch.cat([b, b], 1)
    shifted_a, shifted_b = two_a.clone(), two_b.clone()
    shifted_a[:, 1] += 10.0
    shifted_b[:, 1] -= 3.0
    assert torch.allclose(ncc(two_a, two_b), ncc(shifted_a, shifted_b), atol=1e-12)


def test_feature_ncc_loss_over_levels():
    torch.manual_seed(0)
    f = [torch.randn(2, 4, 12, 10), torch.randn(2, 8, 6, 5)]
    assert float(feature_ncc_loss(f, f)) < 1e-6
    assert torch.allclose(feature_ncc_loss(f, [-f[0], -f[1]]), torch.tensor(4.0))  # 2 levels x (1 - (-1))
    scaled = [3.0 * f[0] + 1.0, 0.5 * f[1] - 2.0]  # an affine intensity change is perfectly correlated
    assert float(feature_ncc_loss(f, scaled)) < 1e-6
    noise = [torch.randn_like(f[0]), torch.randn_like(f[1])]
    assert 1.7 < float(feature_ncc_loss(f, noise)) < 2.3  # uncorrelated: about 1 per level


def test_prewitt_gradient_matches_scipy():
    """Our Prewitt magnitude equals scipy.ndimage.prewitt's per-axis responses, rescaled by 1 / (2 * 3^(D-1))
    (derivative [-1, 0, 1] / 2, smoothing [1, 1, 1] / 3), with replicate ('nearest') borders."""
    torch.manual_seed(0)
    for shape in ((11, 9), (6, 7, 5)):
        x = torch.randn(1, 1, *shape, dtype=torch.float64)
        d = len(shape)
        ref = np.sqrt(sum((ndimage.prewitt(x[0, 0].numpy(), axis=k, mode="nearest") / (2 * 3 ** (d - 1))) ** 2
                          for k in range(d)))
        assert np.allclose(prewitt_gradient(x)[0, 0].numpy(), ref, atol=1e-12)
    ramp = 2.5 * torch.arange(12.0).view(1, 1, 12, 1).expand(1, 1, 12, 8)  # slope 2.5 per voxel along y
    assert torch.allclose(prewitt_gradient(ramp)[..., 1:-1, :], torch.tensor(2.5))


def test_auxiliary_channels_and_the_similarity_loss():
    torch.manual_seed(0)
    image = torch.rand(2, 1, 16, 14)
    masks = torch.rand(2, 2, 16, 14)
    aux = auxiliary_channels(image, masks)
    assert aux.shape == (2, 4, 16, 14) and set(aux[:, 2:].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(aux[:, 1:2], prewitt_gradient(image))

    def features(x):  # a stand-in extractor: the image at two resolutions
        return [x, resize(x, (8, 7))]

    assert float(similarity_loss(aux, aux, features)) < 1e-6
    other = aux.clone()
    other[:, 1:] = torch.rand_like(other[:, 1:])
    expected = auxiliary_mse(other[:, 1:], aux[:, 1:])  # channel 0 identical: only the auxiliary MSE is left
    assert torch.allclose(similarity_loss(other, aux, features, auxiliary_weight=2.0), 2 * expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(N, 1"):
        auxiliary_channels(masks)


def test_similarity_module_freezes_its_extractor_and_has_the_mse_ablation():
    torch.manual_seed(0)
    ae = FeatureAutoencoder(2, channels=(4, 8), heads=2)
    sim = DeepAtlasSimilarity(ae)
    sim.train()
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())
    fixed = torch.rand(2, 2, 12, 10)
    moving = fixed.clone().requires_grad_(True)
    assert float(sim(moving, fixed).detach()) < 1e-5
    shifted = fixed.roll(3, dims=-1).requires_grad_(True)
    loss = sim(shifted, fixed)
    loss.backward()
    assert float(loss.detach()) > 0.01 and float(shifted.grad.abs().sum()) > 0
    mse = DeepAtlasSimilarity(None, feature_mse=True)
    assert torch.allclose(mse(shifted, fixed).detach(), masked_mean((shifted - fixed) ** 2).mean() * 2, atol=1e-6)
    with pytest.raises(ValueError, match="extractor"):
        DeepAtlasSimilarity(None)


# ---------------------------------------------------------------- masks (5.1.6, 5.5.3)

@pytest.mark.parametrize("shape", [(40, 36), (20, 24, 22)])
def test_foreground_mask_fills_holes_and_keeps_the_largest_region(shape):
    """A body of 40 HU with an air-filled lung (a hole) and a separate table below it, in air (-1000 HU).
    After the blur (sigma 0.7 voxel, MONAI's kernel) a voxel outside a face of the body shows 24% of it
    (-753 HU) and a corner voxel of the body 44% in 3D (-539 HU), so at -640 HU the mask is the body's
    box exactly: lung filled, table dropped. At the paper's -900 HU the body grows by one voxel on each
    face."""
    hu = torch.full((1, 1, *shape), -1000.0)
    body = (slice(None), slice(None), *[slice(4, n - 8) for n in shape])
    hu[body] = 40.0
    hu[(slice(None), slice(None), *[slice(8, n - 12) for n in shape])] = -1000.0  # the lung
    hu[(slice(None), slice(None), *[slice(n - 4, n - 2) for n in shape])] = 40.0  # the table, in a corner
    expected = torch.zeros_like(hu)
    expected[body] = 1.0
    assert torch.equal(foreground_mask(hu, threshold=-640.0), expected)
    paper = foreground_mask(hu)  # -900 HU
    grown = torch.zeros_like(hu)
    grown[(slice(None), slice(None), *[slice(3, n - 7) for n in shape])] = 1.0
    assert bool((paper <= grown).all()) and bool((paper >= expected).all())
    assert float(paper.sum()) > float(expected.sum())
    assert float(foreground_mask(torch.full((1, 1, 8, 8), -1000.0)).sum()) == 0.0
