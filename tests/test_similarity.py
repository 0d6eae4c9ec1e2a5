"""Known-answer tests of atlasreg.losses.similarity: the minimum lies at the true shift, contrast
inversion, masks, gradients, world-unit windows, agreement with MONAI where MONAI has the loss."""

import functools
import math

import pytest
import torch

from atlasreg.errors import AtlasregError
from atlasreg.losses import (
    SIMILARITIES, build_similarity, lncc, lncc_window, mind_loss, mind_ssc, mse, mutual_information, ngf,
    ngf_field,
)
from atlasreg.losses.similarity import _lncc_map, erode_mask
from atlasreg.spatial.grid import Grid
from atlasreg.spatial.transforms import AffineTransform, sample

SIZES = {2: (40, 40), 3: (16, 16, 16)}
SPACINGS = {2: (1.0, 1.5), 3: (1.0, 1.5, 1.2)}
TRUE_SHIFT = {2: (-2.5, 1.0), 3: (1.5, -3.0, 0.5)}  # voxels along x, y[, z]
CANDIDATES = torch.arange(-3.0, 3.01, 0.5)            # voxels

LOSSES = {
    "mse": lambda f, m, sp, w: mse(f, m, w, reduction="per_case"),
    "lncc": lambda f, m, sp, w: lncc(f, m, sp, 7.0, w, reduction="per_case"),
    "mind": lambda f, m, sp, w: mind_loss(f, m, 1, 2, w, reduction="per_case"),
    "ngf": lambda f, m, sp, w: ngf(f, m, sp, mask=w, reduction="per_case"),
    "ngf_unsquared": lambda f, m, sp, w: ngf(f, m, sp, squared=False, mask=w, reduction="per_case"),
    "mi": lambda f, m, sp, w: mutual_information(f, m, mask=w, reduction="per_case"),
    "nmi": lambda f, m, sp, w: mutual_information(f, m, normalized=True, mask=w, reduction="per_case"),
}


def blobs(points: torch.Tensor, half_extent, seed: int = 0) -> torch.Tensor:
    """A smooth image: six Gaussian blobs (widths 12-24 % of the half field of view) at random
    places in the central half of the field of view, evaluated at world points (..., D) mm."""
    g = torch.Generator().manual_seed(seed)
    half = torch.tensor(half_extent)
    out = torch.zeros(points.shape[:-1])
    for _ in range(6):
        centre = (torch.rand(points.shape[-1], generator=g) - 0.5) * half
        width = 0.12 * half.min() * (1 + torch.rand(1, generator=g))
        height = 0.5 + torch.rand(1, generator=g)
        out += height * torch.exp(-((points - centre) ** 2).sum(-1) / (2 * width ** 2))
    return out


def fov_mask(ndim):
    """The voxels at least 3 voxels from every face: a shift of up to 3 voxels never samples outside
    the image there."""
    mask = torch.zeros(1, 1, *SIZES[ndim])
    mask[(0, 0) + (slice(3, -3),) * ndim] = 1
    return mask


@functools.lru_cache(maxsize=None)
def shifted_pair(ndim, contrast="same"):
    """fixed f(x) and the candidates moving o T_t for t = the true shift with one axis replaced by each
    candidate in turn: (D * 13, 1, *size). The moving image is f(x - s) (s the true shift, mm),
    evaluated analytically and mapped by the named contrast function, so T_t matches it for t = s."""
    grid = Grid.centred(SIZES[ndim], SPACINGS[ndim])
    pts = grid.points()[0]
    shift = torch.tensor(TRUE_SHIFT[ndim]) * torch.tensor(SPACINGS[ndim])
    fixed = blobs(pts, grid.half_extent)[None, None]
    moving = blobs(pts - shift, grid.half_extent)[None, None]
    moving = {"same": lambda v: v, "inverted": lambda v: 1 - v, "exp": lambda v: torch.exp(-1.5 * v),
              "quadratic": lambda v: -(v + v * v / 2)}[contrast](moving)
    t = shift.repeat(len(CANDIDATES) * ndim, 1)
    for j in range(ndim):
        t[j * len(CANDIDATES):(j + 1) * len(CANDIDATES), j] = CANDIDATES * SPACINGS[ndim][j]
    translations = AffineTransform(torch.eye(ndim).expand(len(t), ndim, ndim), t)
    warped = translations.warp(moving.expand(len(t), 1, *SIZES[ndim]), grid)
    return fixed.expand_as(warped), warped


@functools.lru_cache(maxsize=None)
def curves(name, ndim, contrast="same"):
    """Loss against the candidate shift, one row per axis: (D, 13)."""
    fixed, warped = shifted_pair(ndim, contrast)
    return LOSSES[name](fixed, warped, SPACINGS[ndim], fov_mask(ndim)).reshape(ndim, -1)


def argmin_shift(values):
    return tuple(float(CANDIDATES[i]) for i in values.argmin(1))


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", list(LOSSES))
def test_minimum_at_the_true_shift(name, ndim):
    # Integer and half-voxel true shifts between -3 and 3 voxels along every axis.
    values = curves(name, ndim)
    assert torch.isfinite(values).all()
    assert argmin_shift(values) == TRUE_SHIFT[ndim]


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", ["ngf", "mind", "mi", "nmi", "lncc"])
def test_inverted_contrast_keeps_the_minimum(name, ndim):
    # A non-linear decreasing map; MIND is exactly invariant to affine maps only, so it gets a milder
    # one (slope changing threefold, instead of about 30-fold for exp(-1.5 v)).
    values = curves(name, ndim, "quadratic" if name == "mind" else "exp")
    assert argmin_shift(values) == TRUE_SHIFT[ndim]


@pytest.mark.parametrize("ndim", [2, 3])
def test_mind_is_exactly_invariant_to_affine_inversion(ndim):
    torch.testing.assert_close(curves("mind", ndim, "inverted"), curves("mind", ndim), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_mse_and_unsquared_ngf_are_not_contrast_invariant(ndim):
    mse_values = curves("mse", ndim, "exp")
    assert argmin_shift(mse_values) != TRUE_SHIFT[ndim]
    truth = [list(CANDIDATES).index(s) for s in TRUE_SHIFT[ndim]]
    for j, i in enumerate(truth):
        assert mse_values[j, i] > mse_values[j].min() + 1e-3
    # Unsquared NGF is signed: opposite edge polarity at the true shift is its worst value.
    ngf_values = curves("ngf_unsquared", ndim, "exp")
    assert tuple(int(i) for i in ngf_values.argmax(1)) == tuple(truth)
    assert (ngf_values.max(1).values > 1.0).all()


def disc_mask(size, radius_fraction=0.35):
    """A binary disc / ball of radius 35 % of the (voxel) field of view, (1, 1, *size)."""
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) - (n - 1) / 2 for n in size],
                                     indexing="ij"))
    return ((idx.pow(2).sum(0).sqrt() < radius_fraction * min(size)).float())[None, None]


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", list(LOSSES))
def test_values_outside_the_mask_do_not_change_the_loss(name, ndim):
    fixed, warped = shifted_pair(ndim)
    fixed, moving = fixed[:2].clone(), warped[[3, 7]].clone()
    mask = disc_mask(SIZES[ndim])
    spacing = SPACINGS[ndim]
    reference = LOSSES[name](fixed, moving, spacing, mask)
    g = torch.Generator().manual_seed(1)
    outside = mask == 0
    filled = []
    for fill in (lambda x: torch.randn(x.shape, generator=g) * 5, lambda x: torch.full_like(x, 1e3),
                 lambda x: torch.full_like(x, math.nan)):
        f2 = torch.where(outside, fill(fixed), fixed)
        m2 = torch.where(outside, fill(moving), moving)
        torch.testing.assert_close(LOSSES[name](f2, m2, spacing, mask), reference, atol=1e-6, rtol=1e-5)
        filled.append((f2, m2))
    # The mask matters: without it the outside values change the loss.
    unmasked = LOSSES[name](*filled[0], spacing, None)
    assert ((unmasked - reference).abs() > 1e-3 * reference.abs().clamp_min(1e-2)).all()


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", list(LOSSES))
def test_gradients_flow_to_the_transform(name, ndim):
    grid = Grid.centred(SIZES[ndim], SPACINGS[ndim])
    pts = grid.points()[0]
    fixed = blobs(pts, grid.half_extent)[None, None]
    moving = blobs(pts, grid.half_extent, seed=0)[None, None].requires_grad_(True)
    t = torch.tensor([[0.7, -0.4, 0.3][:ndim]], requires_grad=True)
    warped = sample(moving, AffineTransform(torch.eye(ndim)[None], t).on_grid(grid), grid)
    loss = LOSSES[name](fixed, warped, SPACINGS[ndim], fov_mask(ndim)).mean()
    loss.backward()
    assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert torch.isfinite(moving.grad).all() and moving.grad.abs().sum() > 0


def test_lncc_window_in_mm():
    assert lncc_window((1.5, 0.5), 7.5) == (5, 15)
    assert lncc_window((1.0, 1.0, 2.0), 9.0) == (9, 9, 5)      # 4.5 voxels: the nearest odd count is 5
    assert lncc_window((1.0, 1.0), 10.0) == (11, 11)            # a tie rounds up
    assert lncc_window((4.0, 1.0), (2.0, 3.0)) == (3, 3)        # at least 3 voxels
    with pytest.raises(ValueError):
        lncc_window((1.0, 1.0), 0.0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_lncc_same_physical_images_at_two_resolutions(ndim):
    # 60 mm (2D) / 24 mm (3D) fields of view sampled at 1.5 mm and at 0.5 mm; a 7.5 mm window is 5 and
    # 15 voxels, so both losses see the same physical windows.
    fov = 60.0 if ndim == 2 else 24.0
    values = []
    for spacing in (1.5, 0.5):
        n = int(round(fov / spacing))
        grid = Grid.centred((n,) * ndim, (spacing,) * ndim)
        pts = grid.points()[0]
        shift = torch.tensor([2.0, -1.0, 1.0][:ndim])
        f = blobs(pts, grid.half_extent, seed=4)[None, None]
        m = torch.exp(-blobs(pts - shift, grid.half_extent, seed=4))[None, None]
        values.append(float(lncc(f, m, (spacing,) * ndim, 7.5)))
    assert 0.05 < values[0] < 0.95
    assert values[0] == pytest.approx(values[1], rel=0.02)


def smooth_noise(size, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, *size, generator=g)
    pool = torch.nn.functional.avg_pool2d if len(size) == 2 else torch.nn.functional.avg_pool3d
    return pool(x, 3, stride=1, padding=1) + 0.1 * torch.randn(1, 1, *size, generator=g)


@pytest.mark.parametrize("ndim", [2, 3])
def test_lncc_equals_monai_away_from_the_border(ndim):
    from monai.losses import LocalNormalizedCrossCorrelationLoss

    size = SIZES[ndim]
    f = smooth_noise(size, 1)
    m = 0.5 * f + smooth_noise(size, 2)
    k = 5
    ours = _lncc_map(f, m, torch.ones_like(f), (k,) * ndim, eps=0.0)
    theirs = -LocalNormalizedCrossCorrelationLoss(spatial_dims=ndim, kernel_size=k, reduction="none",
                                                  smooth_dr=0.0)(m, f)
    inner = (slice(None), slice(None)) + (slice(k // 2, -(k // 2)),) * ndim
    torch.testing.assert_close(ours[inner], theirs[inner], atol=1e-4, rtol=1e-3)
    # Our loss is 1 - the mean of that map.
    assert float(lncc(f, m, (1.0,) * ndim, 5.0, eps=0.0)) == pytest.approx(1 - float(ours.mean()), abs=1e-6)


@pytest.mark.parametrize("normalized", [False, True])
def test_mutual_information_equals_monai_for_images_spanning_0_1(normalized):
    from monai.losses import GlobalMutualInformationLoss

    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 1, 24, 24, generator=g)
    b = (a + 0.3 * torch.rand(2, 1, 24, 24, generator=g)).clamp(0, 1)
    a.view(2, -1)[:, 0], a.view(2, -1)[:, 1] = 0.0, 1.0      # both images span exactly [0, 1]
    b.view(2, -1)[:, 0], b.view(2, -1)[:, 1] = 0.0, 1.0
    ours = mutual_information(a, b, bins=23, sigma_ratio=0.5, reduction="per_case")
    mi = torch.stack([-GlobalMutualInformationLoss(num_bins=23, sigma_ratio=0.5)(a[i:i + 1], b[i:i + 1])
                      for i in range(2)])
    assert (mi > 0.05).all()
    if not normalized:
        torch.testing.assert_close(ours, -mi, atol=1e-4, rtol=1e-4)
    else:
        nmi = -mutual_information(a, b, bins=23, normalized=True, reduction="per_case")
        h_a = -mutual_information(a, a, bins=23, reduction="per_case")  # not H(A): Parzen smoothing
        assert ((nmi > 1) & (nmi < 2)).all()
        assert (h_a > mi).all()
        # NMI = (Ha + Hb) / Hab and MI = Ha + Hb - Hab  =>  NMI = 1 + MI / Hab > 1.
        assert torch.all(nmi - 1 > 0)


@pytest.mark.parametrize("bins,sigma_ratio", [(16, 1.0), (40, 0.3), (32, 0.5)])
def test_mutual_information_truncated_windows_equal_dense_ones(bins, sigma_ratio):
    """Each voxel votes into the bins within 5 sigma only (2 r + 1 of them): the same MI, to 1e-5, as
    Gaussian windows over every bin (the estimate MONAI's GlobalMutualInformationLoss uses), written
    out here for images spanning [0, 1]."""
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 1, 32, 32, generator=g, dtype=torch.float64)
    b = (a ** 2 + 0.2 * torch.rand(1, 1, 32, 32, generator=g, dtype=torch.float64)).clamp(0, 1)
    for x in (a, b):
        x.view(-1)[0], x.view(-1)[1] = 0.0, 1.0
    centres = torch.linspace(0, 1, bins, dtype=torch.float64)
    sigma = sigma_ratio / (bins - 1)

    def votes(x):
        w = torch.exp(-0.5 * ((x.reshape(-1, 1) - centres) / sigma) ** 2)
        return w / w.sum(1, keepdim=True)

    joint = votes(a).T @ votes(b) / a.numel()

    def entropy(p):
        return -(p * torch.log(p.clamp_min(1e-12))).sum()

    dense = entropy(joint.sum(1)) + entropy(joint.sum(0)) - entropy(joint)
    assert float(dense) > 0.1
    assert float(-mutual_information(a, b, bins=bins, sigma_ratio=sigma_ratio)) == pytest.approx(float(dense), abs=1e-5)


def test_mutual_information_rises_with_dependence():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 64, 64, generator=g)
    noise = torch.rand(1, 1, 64, 64, generator=g)
    values = [-float(mutual_information(a, (1 - k) * noise - k * a ** 2)) for k in (0.0, 0.5, 1.0)]
    # Independent: 0 up to the estimator's bias (measured 0.036 nats); a deterministic map: about H(A).
    assert values[0] < 0.05 < values[1] < values[2]
    assert values[2] == pytest.approx(-float(mutual_information(a, a)), rel=0.1)


def test_known_values():
    # MSE of a constant offset c is c^2 (only inside the mask).
    f = torch.rand(2, 1, 8, 9)
    mask = torch.zeros(1, 1, 8, 9)
    mask[..., 2:5, 3:7] = 1
    assert float(mse(f, f + 0.5)) == pytest.approx(0.25, rel=1e-6)
    assert float(mse(f, torch.where(mask > 0, f + 0.3, f - 9.0), mask)) == pytest.approx(0.09, rel=1e-5)
    # NGF of a linear ramp I = 2 x + 3 y (mm) with eps = 1: n = (2, 3) / sqrt(13 + 1) everywhere.
    grid = Grid.centred((12, 10, 8), (0.5, 1.0, 2.0))
    p = grid.points()[0]
    ramp = (2 * p[..., 0] + 3 * p[..., 1])[None, None]
    n = ngf_field(ramp, grid.spacing, eps=1.0)
    expected = torch.tensor([2.0, 3.0, 0.0]) / math.sqrt(14.0)
    torch.testing.assert_close(n, expected.view(1, 3, 1, 1, 1).expand_as(n), atol=1e-5, rtol=1e-5)
    # Same direction, opposite sign: <n_f, n_m> = -13/14, so squared NGF 1 - (13/14)^2, unsquared
    # 1 + 13/14 (eps = 1 for both images).
    assert float(ngf(ramp, -ramp, grid.spacing, eps=1.0)) == pytest.approx(1 - (13 / 14) ** 2, abs=1e-5)
    assert float(ngf(ramp, -ramp, grid.spacing, eps=1.0, squared=False)) == pytest.approx(1 + 13 / 14, abs=1e-5)
    # With a mask the field is 0 outside the mask eroded by one voxel.
    box = torch.zeros(1, 1, 12, 10, 8)
    box[..., 3:9, 2:8, 2:6] = 1
    nm = ngf_field(ramp, grid.spacing, eps=1.0, mask=box)
    inner = erode_mask(box, (1, 1, 1))
    assert float(inner.sum()) == 4 * 4 * 2 and (nm[:, :, inner[0, 0] == 0] == 0).all()
    torch.testing.assert_close(nm[:, :, 4, 3, 3], expected[None], atol=1e-5, rtol=1e-5)
    # MIND-SSC: 12 descriptors in 3D, 4 in 2D; a constant image has all descriptors 1, maximum 1.
    assert mind_ssc(torch.rand(1, 2, 9, 9, 9)).shape == (1, 24, 9, 9, 9)
    assert mind_ssc(torch.full((1, 1, 9, 9), 3.0)).eq(1).all()
    d = mind_ssc(torch.rand(2, 1, 16, 16))
    assert d.shape == (2, 4, 16, 16) and torch.allclose(d.amax(1), torch.ones(1))


def test_channels_and_reductions():
    g = torch.Generator().manual_seed(0)
    f = torch.rand(3, 2, 16, 16, generator=g)
    m = torch.rand(3, 2, 16, 16, generator=g)
    for name, fn in LOSSES.items():
        per_case = fn(f, m, (1.0, 1.0), None)
        assert per_case.shape == (3,), name
        per_channel = torch.stack([fn(f[:, c:c + 1], m[:, c:c + 1], (1.0, 1.0), None) for c in range(2)])
        torch.testing.assert_close(per_case, per_channel.mean(0), msg=name)
    assert float(ngf(f, m, (1.0, 1.0))) == pytest.approx(float(ngf(f, m, (1.0, 1.0), reduction="per_case").mean()))
    with pytest.raises(ValueError):
        mse(f, m, reduction="sum")
    with pytest.raises(ValueError):
        lncc(f, m[:, :1], (1.0, 1.0))
    with pytest.raises(ValueError):
        ngf(f, m, (1.0,))
    with pytest.raises(ValueError):
        mind_loss(f, m, mask=torch.ones(1, 1, 8, 8))


def test_registry_builds_every_loss_by_name():
    assert set(SIMILARITIES) == {"mse", "lncc", "mind", "ngf", "mi"}
    fixed, warped = shifted_pair(2)
    f, m = fixed[:2], warped[:2]
    spacing = SPACINGS[2]
    expected = {"mse": mse(f, m), "lncc": lncc(f, m, spacing, 9.0), "mind": mind_loss(f, m),
                "ngf": ngf(f, m, spacing), "mi": mutual_information(f, m)}
    for name, module in SIMILARITIES.items():
        torch.testing.assert_close(module(spacing)(f, m), expected[name])
    torch.testing.assert_close(build_similarity("mi", spacing, normalized=True, bins=16)(f, m),
                               mutual_information(f, m, bins=16, normalized=True))
    torch.testing.assert_close(build_similarity("ngf", spacing, squared=False)(f, m, fov_mask(2)[:1]),
                               ngf(f, m, spacing, squared=False, mask=fov_mask(2)))
    with pytest.raises(AtlasregError, match="similarity: unknown 'ssd'"):
        build_similarity("ssd", spacing)
    with pytest.raises(AtlasregError, match="similarity 'lncc'"):
        build_similarity("lncc", spacing, window_mm=-1)
    with pytest.raises(AtlasregError, match="similarity 'mind'"):
        build_similarity("mind", spacing, bins=3)


@pytest.mark.parametrize("window", [(3, 5), (11, 1), (15, 31)])
def test_box_mean_short_and_long_windows(window):
    # Pooling (<= 9 voxels) and running sums (longer): the mean over the part of the box inside the
    # image, compared with a direct loop.
    from atlasreg.losses.similarity import _box_mean

    x = torch.randn(2, 1, 20, 24, generator=torch.Generator().manual_seed(0))
    out = _box_mean(x, window)
    hy, hx = window[0] // 2, window[1] // 2
    for i, j in [(0, 0), (5, 7), (19, 23), (10, 0)]:
        box = x[:, :, max(i - hy, 0):i + hy + 1, max(j - hx, 0):j + hx + 1]
        torch.testing.assert_close(out[:, :, i, j], box.mean((2, 3)), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_ngf_of_a_ramp_is_its_normalised_gradient_in_world_units(ndim):
    spacing = (0.7, 1.9, 3.1)[:ndim]
    grid = Grid((9, 11, 13)[:ndim], spacing)
    slope = torch.tensor([3.0, -4.0, 12.0][:ndim], dtype=torch.float64)  # intensity per mm
    image = (grid.points(dtype=torch.float64) * slope).sum(-1)[:, None]
    eps = 0.5
    n = ngf_field(image, spacing, eps)
    expected = slope / math.sqrt(float(slope.pow(2).sum()) + eps ** 2)
    assert n.shape == (1, ndim, *grid.size)
    assert torch.allclose(n.movedim(1, -1), expected.expand(1, *grid.size, ndim), atol=1e-12)
    # Inverted contrast flips the field, so its squared dot products are unchanged.
    assert torch.allclose(ngf_field(2.0 - 3.0 * image, spacing, 3.0 * eps), -n, atol=1e-12)


@pytest.mark.parametrize("name", ["lncc", "mind", "mi"])
def test_module_reuses_what_it_computed_from_the_fixed_image_only_while_fixed_and_mask_are_the_same(name):
    """LNCC, MINDSSC and MutualInformation (the modules) compute the fixed image's part (local
    statistics, descriptors, Parzen votes) once per fixed image and mask: repeated calls, a new moving image, an in-place change of the fixed
    image, another fixed tensor and another mask all give the pure function's value (to 1e-6), and its
    gradient too."""
    from atlasreg.losses.similarity import LNCC, MINDSSC, MutualInformation, lncc, mind_loss

    spacing = (1.0, 1.2, 2.0)
    module = {"lncc": LNCC(spacing, window_mm=5.0), "mind": MINDSSC(spacing), "mi": MutualInformation(spacing)}[name]
    function = {"lncc": lambda f, m, k: lncc(f, m, spacing, 5.0, k), "mind": lambda f, m, k: mind_loss(f, m, mask=k),
                "mi": lambda f, m, k: mutual_information(f, m, mask=k)}[name]
    g = torch.Generator().manual_seed(3)
    fixed = torch.rand(2, 1, 20, 18, 16, generator=g)
    mask = (torch.rand(2, 1, 20, 18, 16, generator=g) > 0.3).float()
    for step in range(6):
        moving = torch.rand(2, 1, 20, 18, 16, generator=g).requires_grad_(True)
        m = None if step == 5 else mask
        if step == 3:
            fixed.mul_(0.5).add_(0.2)                     # in place: the cached part is stale
        if step == 4:
            fixed = torch.rand(2, 1, 20, 18, 16, generator=g)
        got = module(fixed, moving, m)
        (grad,) = torch.autograd.grad(got, moving)
        moving2 = moving.detach().clone().requires_grad_(True)
        want = function(fixed, moving2, m)
        (grad_want,) = torch.autograd.grad(want, moving2)
        assert abs(float(got) - float(want)) < 1e-6, step
        assert torch.allclose(grad, grad_want, atol=1e-7), step
