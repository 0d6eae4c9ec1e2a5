import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from fields import smooth_svf
from scipy.spatial.transform import Rotation
from volumes import OBLIQUE

from atlasreg.nets.stn import STN
from atlasreg.spatial.grid import Grid
from atlasreg.spatial.transforms import (
    AffineTransform, Composite, DisplacementField, StationaryVelocityField, affine_trs, apply_affine,
    compose_transform, invert_affine, jacobian_determinant, resize_field, sample, scaling_and_squaring, warp,
)


@pytest.mark.parametrize("ndim", [2, 3])
def test_stn_transform_is_identity_at_initialisation(ndim):
    size = (32, 32) if ndim == 2 else (16, 16, 16)
    spacing = (2.0,) * ndim
    grid = Grid.centred(size, spacing)
    stn = STN(ndim, 2, grid)
    out = stn(torch.randn(3, 2, *size))
    tr = compose_transform(out["svf"], out["A"], out["t"], grid)
    ident = grid.points()
    assert torch.allclose(tr.forward_points(), ident.expand_as(tr.forward_points()), atol=1e-5)
    assert torch.allclose(tr.inverse_points(), ident.expand_as(tr.inverse_points()), atol=1e-5)
    image = torch.rand(3, 1, *size)
    assert torch.allclose(warp(image, tr.inverse_points(), grid), image, atol=1e-5)


@pytest.mark.parametrize("activation, revives", [("relu", False), ("leaky_relu", True)])
def test_a_dead_svf_decoder_gets_a_gradient_only_with_leaky_relu(activation, revives):
    # The mouse-brain failure: every unit of the decoder's last layer negative for every input, so the
    # SVF is the head's bias (a constant, L_reg 0). With ReLU nothing reaches the decoder again.
    grid = Grid.centred((16, 16, 16), (0.3,) * 3)
    stn = STN(3, 4, grid, activation=activation)
    torch.nn.init.normal_(stn.svf_head.weight, std=0.1)
    last = stn.dec1[1][0]
    with torch.no_grad():
        last.bias.fill_(-100.0)
    svf = stn(torch.rand(2, 4, *grid.size))["svf"]
    svf.square().mean().backward()
    reached = last.weight.grad.abs().max().item()
    assert (reached > 0) == revives
    with pytest.raises(ValueError, match="activation"):
        STN(3, 4, grid, activation="gelu")


@pytest.mark.parametrize("ndim", [2, 3])
def test_the_affine_rotation_reaches_the_configured_bound_and_no_further(ndim):
    # ACDC needs turns beyond the paper's 45 degrees (model.stn_max_rotation, nets/stn.py): with the
    # rotation head saturated, the angle about the last axis is the bound, and A is that rotation.
    from atlasreg.config import ConfigError, load_config
    from atlasreg.models.atlas_istn import AtlasISTNModule

    size = (32, 32) if ndim == 2 else (16, 16, 16)
    grid = Grid.centred(size, (2.0,) * ndim)
    for bound, default in ((45.0, True), (90.0, False), (180.0, False)):
        stn = STN(ndim, 2, grid) if default else STN(ndim, 2, grid, max_rotation=bound)
        with torch.no_grad():
            stn.rotation.bias[-1] = 30.0                       # tanh(30) = 1 in float32
        A = stn(torch.randn(2, 2, *size))["A"]
        c, s = math.cos(math.radians(bound)), math.sin(math.radians(bound))
        expected = torch.eye(ndim)
        expected[:2, :2] = torch.tensor([[c, -s], [s, c]])   # about z in 3D (R = Rz Ry Rx), acting on (x, y)
        assert torch.allclose(A, expected.expand_as(A), atol=1e-6)
    for bad in (0.0, -10.0, 181.0):
        with pytest.raises(ValueError, match="rotation bound"):
            STN(ndim, 2, grid, max_rotation=bad)
    labels = {0: "bg", 1: "fg"}
    cfg = load_config(None, {"data": {"labels": labels},
                             "model": {"ndim": ndim, "size": list(size), "spacing": [2.0] * ndim,
                                       "stn_max_rotation": 90}})
    assert AtlasISTNModule(cfg).net.stn.rotation_bound == pytest.approx(math.pi / 2)
    assert AtlasISTNModule(load_config(None, {"data": {"labels": labels}, "model": {
        "ndim": ndim, "size": list(size), "spacing": [2.0] * ndim}})).net.stn.rotation_bound == pytest.approx(math.pi / 4)
    with pytest.raises(ConfigError, match="model.stn_max_rotation"):
        load_config(None, {"data": {"labels": labels}, "model": {"stn_max_rotation": 0}})


@pytest.mark.parametrize("ndim", [2, 3])
def test_phi_composed_with_inverse_is_identity(ndim):
    size = (64, 64) if ndim == 2 else (32, 32, 32)
    spacing = (1.5,) * ndim
    grid = Grid.centred(size, spacing)
    v = smooth_svf(grid.downsample(2), amplitude=2.0 if ndim == 2 else 1.0)  # up to ~6 / 3 mm displacement
    angles = torch.tensor([[0.2]]) if ndim == 2 else torch.tensor([[0.1, -0.15, 0.2]])
    A, t = affine_trs(torch.full((1, ndim), 2.0), angles, torch.full((1, ndim), 0.05))
    tr = compose_transform(v, A, t, grid, steps=7)
    # Phi(Phi^-1(x)): sample the forward map at the inverse points.
    fwd = tr.forward_points().movedim(-1, 1)
    inv = tr.inverse_points()
    roundtrip = sample(fwd, inv, grid).movedim(1, -1)
    err = (roundtrip - grid.points()).norm(dim=-1)
    interior = err[(slice(None),) + (slice(size[0] // 4, -size[0] // 4),) * ndim]
    # Measured (2026-11-21): mean 0.008 mm in 2D, 0.04 mm in 3D (max 0.02 / 0.14 mm); bounds with margin.
    assert interior.mean() < 0.05 * spacing[0]
    assert interior.max() < 0.3 * spacing[0]


def test_half_resolution_integration_matches_full_resolution():
    size, spacing = (64, 64), (1.0, 1.0)
    grid = Grid.centred(size, spacing)
    half = grid.downsample(2)
    v_half = smooth_svf(half, amplitude=2.0, seed=3)
    u_from_half = resize_field(scaling_and_squaring(v_half, half, 7), size)
    u_full = scaling_and_squaring(resize_field(v_half, size), grid, 7)
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    diff = (u_from_half - u_full)[inner].norm(dim=1)
    scale = u_full[inner].norm(dim=1).mean()
    assert scale > 1.0  # a real deformation of a few mm
    assert diff.mean() < 0.03 * scale


def test_scaling_and_squaring_of_constant_field_is_translation():
    size, spacing = (16, 16), (2.0, 2.0)
    v = torch.zeros(1, 2, *size)
    v[:, 0] = 3.0
    u = scaling_and_squaring(v, Grid.centred(size, spacing), 6)
    assert torch.allclose(u[:, 0], torch.full_like(u[:, 0], 3.0), atol=1e-4)
    assert torch.allclose(u[:, 1], torch.zeros_like(u[:, 1]), atol=1e-4)


def test_known_rotation_and_scaling_move_a_pattern_where_expected():
    # A bright dot at (x, y) = (10, 0) mm; rotate by 90 degrees and scale by 2 about the centre.
    size, spacing = (64, 64), (1.0, 1.0)
    grid = Grid.centred(size, spacing)
    pts = grid.points()[0]
    dot = torch.exp(-((pts - torch.tensor([10.0, 0.0])) ** 2).sum(-1) / 2.0)[None, None]
    # Phi maps atlas (here: output) points to source points: output(x) = dot(T(x)), T = R(90) D(0.5).
    A, t = affine_trs(torch.zeros(1, 2), torch.tensor([[math.pi / 2]]), torch.log(torch.tensor([[0.5, 0.5]])))
    out = warp(dot, apply_affine(A, t, grid.points()), grid)
    peak = pts.reshape(-1, 2)[out.flatten().argmax()]
    # T(x) = (10, 0) <=> 0.5 R x = (10, 0) <=> x = R^-1 (20, 0) = (0, -20).
    assert torch.allclose(peak, torch.tensor([0.0, -20.0]), atol=0.6)


def test_affine_inverse():
    A, t = affine_trs(torch.tensor([[1.0, -2.0, 3.0]]), torch.tensor([[0.3, -0.2, 0.1]]),
                      torch.tensor([[0.1, -0.1, 0.2]]))
    Ai, ti = invert_affine(A, t)
    p = torch.randn(1, 5, 3)
    assert torch.allclose(apply_affine(Ai, ti, apply_affine(A, t, p)), p, atol=1e-5)


def test_jacobian_determinant_of_scaling_and_fold():
    size, spacing = (16, 16), (0.5, 0.5)
    grid = Grid.centred(size, spacing)
    pts = grid.points()
    A, t = affine_trs(torch.zeros(1, 2), torch.zeros(1, 1), torch.log(torch.tensor([[2.0, 1.5]])))
    det = jacobian_determinant(apply_affine(A, t, pts), grid)
    assert torch.allclose(det, torch.full_like(det, 3.0), atol=1e-4)
    folded = pts.clone()
    folded[..., 0] = -folded[..., 0]  # mirror in x: orientation reversed
    assert (jacobian_determinant(folded, grid) < 0).all()


def test_grid_resampled_keeps_centre():
    g = Grid((128, 128), (1.0, 1.0), (5.0, -3.0), (0.0, -1.0, 1.0, 0.0))
    m = g.resampled((64, 64), (2.0, 2.0))
    assert m.half_extent == g.half_extent
    assert torch.allclose(torch.tensor(m.centre), torch.tensor(g.centre))


@pytest.mark.parametrize("ndim", [2, 3])
def test_inverse_is_computed_lazily_and_once(ndim):
    size = (16, 16) if ndim == 2 else (8, 8, 8)
    spacing = (2.0,) * ndim
    grid = Grid.centred(size, spacing)
    v = smooth_svf(grid.downsample(2), amplitude=1.0)
    angles = torch.tensor([[0.2]]) if ndim == 2 else torch.tensor([[0.1, -0.15, 0.2]])
    A, t = affine_trs(torch.full((1, ndim), 2.0), angles, torch.full((1, ndim), 0.05))
    tr = compose_transform(v, A, t, grid)
    fwd = tr.forward_points()
    # The inverse is integrated only when asked for (the atlas update never asks).
    assert "_inverse" not in tr.__dict__
    inv = tr.inverse_points()
    assert "_inverse" in tr.__dict__ and tr.inverse_points() is inv
    assert torch.equal(fwd, tr.forward_points())


def test_known_3d_affine_moves_a_dot_on_an_anisotropic_oblique_grid():
    """A dot at a world point p0 on a grid with anisotropic spacing, a flipped axis, a rotated
    direction and a non-zero origin; warping by T (image o T) puts the dot at T^-1(p0)."""
    c, s = math.cos(0.5), math.sin(0.5)
    direction = torch.tensor([[c, 0, s], [0, -1.0, 0], [-s, 0, c]])
    grid = Grid((30, 36, 40), (1.2, 1.0, 1.5), (-20.0, 25.0, -15.0), tuple(direction.ravel().tolist()))
    pts = grid.points(dtype=torch.float64)[0]
    p0 = pts[15, 18, 20] + torch.tensor([1.1, -0.7, 0.4], dtype=torch.float64)
    dot = torch.exp(-((pts - p0) ** 2).sum(-1) / (2 * 1.5 ** 2))[None, None].float()
    T = AffineTransform.from_trs(torch.tensor([[3.0, -2.0, 4.0]]), torch.tensor([[0.2, -0.1, 0.3]]),
                                 torch.log(torch.tensor([[1.1, 0.9, 1.05]])))
    out = T.warp(dot, grid)[0, 0]
    # Sub-voxel peak: centre of mass of the top of the warped dot.
    w = torch.where(out > 0.5 * out.max(), out, torch.zeros_like(out)).double()
    peak = (w[..., None] * pts).sum((0, 1, 2)) / w.sum()
    expected = T.inverse().points(p0.float()[None, None])[0, 0].double()
    assert (peak - expected).norm() < 0.3  # mm; the dot is symmetric up to the map's small anisotropy
    det = T.jacobian_determinant(grid)
    assert torch.allclose(det, torch.full_like(det, 1.1 * 0.9 * 1.05), atol=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_composite_of_affine_and_svf_with_its_inverse_is_the_identity(ndim):
    grid = Grid.centred((48,) * 2 if ndim == 2 else (32,) * 3, (1.5,) * ndim)
    v = smooth_svf(grid.downsample(2), amplitude=1.5 if ndim == 2 else 1.0, seed=5)  # up to 4-5 mm
    svf = StationaryVelocityField(v, grid.downsample(2), 7, grid)
    angles = torch.tensor([[0.3]]) if ndim == 2 else torch.tensor([[0.2, -0.1, 0.25]])
    T = Composite((svf, AffineTransform.from_trs(torch.full((1, ndim), 3.0), angles, torch.full((1, ndim), 0.1))))
    x = grid.points()
    inner = (grid.world_to_normalised(x).abs() < 0.5).all(-1)
    err = (T.inverse().points(T.points(x)) - x).norm(dim=-1)[inner]
    # Measured (2026-11-28): mean 0.018 / 0.045 mm, max 0.06 / 0.13 mm (2D / 3D), from integrating
    # exp(v) and exp(-v) at half resolution and interpolating them.
    assert err.mean() < 0.05 * grid.spacing[0] and err.max() < 0.3 * grid.spacing[0]
    with pytest.raises(ValueError, match="no exact inverse"):
        DisplacementField(torch.zeros(1, ndim, *grid.size), grid).inverse()
    # Batch selection keeps each part's entry.
    assert T[0].batch_size == 1 and T.simplified().transforms[-1].matrix.shape == (1, ndim, ndim)


def test_slicing_a_batch_keeps_what_was_computed():
    """A case taken out of a batch reuses exp(v), exp(-v) and Phi^-1's point map of the batch (the
    export slices every case out of the refined batch) and gives the same maps as the batch."""
    grid = Grid.centred((16, 16), (2.0, 2.0))
    v = torch.cat([smooth_svf(grid.downsample(2), 1.0, seed=s) for s in (0, 1)])
    A, t = affine_trs(torch.zeros(2, 2), torch.tensor([[0.1], [-0.2]]), torch.zeros(2, 2))
    tr = compose_transform(v, A, t, grid)
    fwd, inv = tr.forward_points(), tr.inverse_points()
    one = tr[1]
    assert "field" in one.svf.__dict__ and "_inverse" in one.__dict__ and "_inverse_points" in one.__dict__
    assert "field" in one.inverse().transforms[-1].__dict__
    assert torch.equal(one.forward_points(), fwd[1:]) and torch.equal(one.inverse_points(), inv[1:])
    fresh = compose_transform(v[1:], A[1:], t[1:], grid)
    assert torch.allclose(fresh.inverse_points(), inv[1:], atol=1e-5)


def oblique_anisotropic_grid():
    """A 3D grid with anisotropic spacing, a direction rotated by 20 degrees with a flipped axis, and
    its centre at (3, -2, 1) mm (a non-zero origin)."""
    size, spacing = (10, 14, 12), (0.9, 1.3, 3.5)
    origin = np.array([3.0, -2.0, 1.0]) - OBLIQUE @ (np.asarray(spacing) * (np.asarray(size[::-1]) - 1) / 2.0)
    return Grid(size, spacing, tuple(origin.tolist()), tuple(OBLIQUE.ravel().tolist()))


def test_known_3d_trs_affine_maps_an_oblique_anisotropic_grid_as_numpy_does():
    """T = M_t R D_s (Eq. 1) with Euler angles (x, then y, then z), anisotropic scaling and a
    translation, at the voxel centres of an oblique, flipped, anisotropic grid: atlasreg's points
    equal an independent NumPy/SciPy computation (index -> world by the header, then the matrix), and
    warping an image by T equals SimpleITK's resampling with the same affine."""
    grid = oblique_anisotropic_grid()
    angles, scale, shift = (0.3, -0.2, 0.5), (1.2, 0.9, 1.1), (2.0, -1.5, 1.0)
    T = AffineTransform.from_trs(torch.tensor([shift], dtype=torch.float64), torch.tensor([angles], dtype=torch.float64),
                                 torch.log(torch.tensor([scale], dtype=torch.float64)))
    # Independent: world = origin + direction @ (spacing * index); T(p) = R diag(s) p + t, R = Rz Ry Rx
    # (SciPy's extrinsic 'xyz' Euler angles).
    index = np.stack(np.meshgrid(*[np.arange(n) for n in grid.size], indexing="ij"), -1)[..., ::-1]  # array order, ITK components
    world = np.asarray(grid.origin) + (index * np.asarray(grid.spacing)) @ np.asarray(grid.direction).reshape(3, 3).T
    matrix = Rotation.from_euler("xyz", angles).as_matrix() @ np.diag(scale)
    expected = world @ matrix.T + np.asarray(shift)
    np.testing.assert_allclose(grid.points(dtype=torch.float64)[0].numpy(), world, atol=1e-10)
    np.testing.assert_allclose(T.on_grid(grid)[0].numpy(), expected, atol=1e-10)
    np.testing.assert_allclose(T.displacement(grid)[0].movedim(0, -1).numpy(), expected - world, atol=1e-10)
    np.testing.assert_allclose(T.inverse().points(torch.as_tensor(expected)[None])[0].numpy(), world, atol=1e-10)

    image = torch.rand(1, 1, *grid.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sitk_image = sitk.GetImageFromArray(image[0, 0].numpy())
    grid.copy_information_to(sitk_image)
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(matrix.ravel().tolist()))
    tx.SetTranslation(shift)
    theirs = sitk.GetArrayFromImage(sitk.Resample(sitk_image, sitk_image, tx, sitk.sitkLinear, 0.0))
    ours = T.warp(image, grid)[0, 0].numpy()
    inside = grid.world_to_index(expected)
    inside = ((inside >= 0) & (inside <= np.asarray(grid.size_xyz) - 1)).all(-1)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(ours[inside], theirs[inside], atol=1e-9)


def test_affine_svf_with_its_inverse_is_the_identity_on_an_anisotropic_grid_in_an_oblique_frame():
    """Phi = T o exp(v) on a 3D model grid of ACDC-like anisotropy (2.5, 2.5, 8 mm), with an SVF of up
    to 1.5 voxels: Phi^-1 o Phi and Phi o Phi^-1 are the identity in the inner half of the field of
    view, and so are the world transforms ``F o Phi`` and its inverse through a frame F with an oblique,
    flipped direction and an anisotropic scaling (a declared spacing, as export's Case.frame). Measured:
    max 0.044 voxel (mean 0.016) of the model grid's smallest spacing, from integrating exp(v) and
    exp(-v) at half resolution."""
    grid = Grid.centred((16, 32, 32), (2.5, 2.5, 8.0))
    v = smooth_svf(grid.downsample(2), amplitude=1.0, seed=5)
    aff = AffineTransform.from_trs(torch.tensor([[3.0, -2.0, 4.0]]), torch.tensor([[0.2, -0.1, 0.25]]),
                                   torch.log(torch.tensor([[1.1, 0.9, 1.05]])))
    phi = compose_transform(v, aff.matrix, aff.translation, grid, steps=7)
    x = grid.points()
    voxel = min(grid.spacing)
    assert (phi.svf.points(x) - x).norm(dim=-1).max() > 1.4 * voxel  # a real deformation
    inner = (grid.world_to_normalised(x).abs() < 0.5).all(-1)
    err = (phi.inverse().points(phi.points(x)) - x).norm(dim=-1)[inner] / voxel
    back = (phi.points(phi.inverse().points(x)) - x).norm(dim=-1)[inner] / voxel
    print(f"Phi^-1 o Phi: max {err.max():.4f} voxel, mean {err.mean():.4f}; Phi o Phi^-1: max {back.max():.4f}")
    assert err.max() < 0.05 and back.max() < 0.05 and err.mean() < 0.02

    frame = AffineTransform.from_numpy(OBLIQUE @ np.diag([1 / 1.4, 1 / 1.6, 1 / 6.0]), np.array([12.0, -7.5, 30.0]))
    to_subject = Composite((phi, frame))
    to_atlas = to_subject.inverse()
    world_err = (to_atlas.points(to_subject.points(x)) - x).norm(dim=-1)[inner] / voxel
    assert world_err.max() < 0.05
    # Subject points (file coordinates) whose atlas point lies in the inner half; the error vectors
    # are brought back to the model's millimetres by the frame's linear part (in the file's own voxels,
    # 1.4 x 1.6 x 6 mm, finer than the model's in x and y, the same error is up to 0.057 voxel).
    y = to_subject.points(x)
    subject_err = (to_subject.points(to_atlas.points(y)) - y)[inner]
    subject_err_voxels = (subject_err @ torch.linalg.inv(frame.matrix[0]).T).norm(dim=-1) / voxel
    assert subject_err_voxels.max() < 0.05
