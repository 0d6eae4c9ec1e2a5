"""The global rigid initialiser (registration/rigid.py, Cross-Sim-NGF, WBIR 2022) on synthetic images
with known rigid transforms: a smooth asymmetric phantom evaluated analytically on each image's own
grid (no interpolation), rotated by known angles and shifted by known mm, on grids with different
spacing, origin and direction, with inverted contrast, masks and partial fields of view."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from atlasreg.errors import AtlasregError
from atlasreg.registration import rigid_search
from atlasreg.registration.rigid import _global_rotations
from atlasreg.spatial.grid import Grid
from atlasreg.spatial.transforms import AffineTransform

#: Phantom: a soft-edged ellipsoid body and anisotropic Gaussian blobs (centre mm, sigma mm, amplitude)
#: placed so that no rotation or flip maps it onto itself.
BODY = (30.0, 20.0, 16.0)
BLOBS = (((22.0, 8.0, 5.0), (8.0, 6.0, 5.0), 0.8), ((-12.0, -5.0, -3.0), (5.0, 6.0, 4.0), -0.6),
         ((5.0, -9.0, 6.0), (6.0, 3.0, 4.0), 0.7), ((-4.0, 9.0, -6.0), (3.0, 3.0, 5.0), 0.5))


def phantom(x: torch.Tensor) -> torch.Tensor:
    """Intensity at world points x (..., D) mm (D = 2 or 3): about 0 outside the body, up to ~2."""
    d = x.shape[-1]
    q = ((x / torch.tensor(BODY[:d], dtype=x.dtype)) ** 2).sum(-1).sqrt()
    out = torch.sigmoid((1.0 - q) * 10.0)  # edge about 2 mm wide
    for mu, sigma, amp in BLOBS:
        z = (x - torch.tensor(mu[:d], dtype=x.dtype)) / torch.tensor(sigma[:d], dtype=x.dtype)
        out = out + amp * torch.exp(-0.5 * z.pow(2).sum(-1))
    return out


def rotation(ndim, degrees, axis=(0.0, 0.0, 1.0)) -> np.ndarray:
    if ndim == 2:
        a = math.radians(degrees)
        return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    axis = np.asarray(axis, dtype=np.float64)
    return Rotation.from_rotvec(axis / np.linalg.norm(axis) * math.radians(degrees)).as_matrix()


def pair(true: AffineTransform, fixed_grid: Grid, moving_grid: Grid, invert=False):
    """fixed(x) = phantom(x); moving(y) = phantom(T^-1(y)) for the true T (fixed -> moving world), so
    that moving o T = fixed. invert: the moving image is 2 - 3 x phantom (inverted contrast)."""
    fixed = phantom(fixed_grid.points(dtype=torch.float64)[0])
    moving = phantom(true.inverse().points(moving_grid.points(dtype=torch.float64))[0])
    if invert:
        moving = 2.0 - 3.0 * moving
    return fixed.float(), moving.float()


def true_transform(ndim, degrees, shift, axis=(0.0, 0.0, 1.0)) -> AffineTransform:
    return AffineTransform.from_numpy(rotation(ndim, degrees, axis), np.asarray(shift, dtype=np.float64),
                                      dtype=torch.float64)


def grid_around(size, spacing, centre, direction=None) -> Grid:
    """A grid of `size` (array order) and `spacing` whose field of view is centred on `centre` (mm)."""
    g = Grid(tuple(size), tuple(spacing), None, None if direction is None else tuple(np.ravel(direction)))
    return Grid(g.size, g.spacing, tuple((np.asarray(g.origin) - g.centre + np.asarray(centre)).tolist()),
                g.direction)


def errors(found: AffineTransform, true: AffineTransform, grid: Grid, fixed: torch.Tensor):
    """(mean, max) distance in mm between found(x) and true(x) over the phantom's voxels (> 0.5) of
    the fixed grid, and the angle in degrees of the rotation between them."""
    x = grid.points(dtype=torch.float64)
    f = AffineTransform(found.matrix.double(), found.translation.double())
    dist = (f.points(x) - true.points(x))[0].norm(dim=-1)[fixed > 0.5]
    rel = found.matrix[0].double().numpy() @ true.matrix[0].numpy().T
    d = rel.shape[0]
    angle = math.degrees(math.acos(np.clip((np.trace(rel) - (d - 2)) / 2.0, -1.0, 1.0)))
    return float(dist.mean()), float(dist.max()), angle


#: Success: every phantom voxel of the fixed image mapped within TOLERANCE working voxels (h) of its
#: true position, and the rotation within TOLERANCE_DEGREES.
TOLERANCE, TOLERANCE_DEGREES = 0.5, 3.0



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as the other test files use: the many small FFTs gain nothing from two, and
    on a shared CPU two threads made a 3D case 15 times slower (29 s against 2 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


OBLIQUE_2D = rotation(2, 25.0) @ np.diag([1.0, -1.0])  # rotated and flipped axes
OBLIQUE_3D = rotation(3, 20.0, (1.0, 2.0, 3.0)) @ np.diag([1.0, -1.0, 1.0])


# ---------------------------------------------------------------- rotation sets

def test_rotation_sets_are_rotations_covering_the_group():
    r2 = _global_rotations(2, 10.0)
    assert r2.shape == (36, 2, 2)
    r3 = _global_rotations(3, 20.0)
    assert r3.shape == (446, 3, 3)
    for r in (r2, r3):
        eye = np.broadcast_to(np.eye(r.shape[-1]), r.shape)
        assert np.allclose(r @ np.swapaxes(r, -1, -2), eye, atol=1e-12)
        assert np.allclose(np.linalg.det(r), 1.0)
    # Covering: the angle from 2000 random rotations to the nearest of the set (measured: max 28.7
    # degrees over 20000 random rotations, mean 15.7).
    q = Rotation.from_matrix(r3).as_quat()
    rnd = Rotation.random(2000, random_state=1).as_quat()
    nearest = np.degrees(2.0 * np.arccos(np.clip(np.abs(rnd @ q.T).max(1), -1.0, 1.0)))
    assert nearest.max() < 30.0 and nearest.mean() < 17.0


# ---------------------------------------------------------------- recovery of known transforms

# Fixed: 64 x 64 at 1.5 mm; moving: 60 x 50 at (1.8, 1.6) mm, rotated and flipped axes, elsewhere.
@pytest.mark.parametrize("degrees, shift, invert", [(0.0, (12.0, -7.0), False), (47.3, (-15.0, 9.0), False),
                                                    (133.7, (8.0, 11.0), True), (180.0, (3.0, -4.0), False),
                                                    (-101.9, (-9.0, -13.0), True)])
def test_2d_recovers_rotation_and_shift_across_grids(degrees, shift, invert):
    true = true_transform(2, degrees, shift)
    fixed_grid = grid_around((64, 64), (1.5, 1.5), (1.0, -2.0))
    moving_grid = grid_around((60, 50), (1.8, 1.6), np.asarray(shift) + (3.0, -2.0), OBLIQUE_2D)
    fixed, moving = pair(true, fixed_grid, moving_grid, invert)
    found = rigid_search(fixed, moving, fixed_grid, moving_grid)
    assert isinstance(found, AffineTransform) and found.batch_size == 1
    assert np.isclose(float(torch.det(found.matrix[0])), 1.0, atol=1e-5)
    mean, worst, angle = errors(found, true, fixed_grid, fixed)
    # Working spacing h = 108 mm / 64 = 1.7 mm. Measured: max <= 0.11 mm, angle <= 0.2 degrees.
    assert worst < TOLERANCE * 108.0 / 64 and angle < TOLERANCE_DEGREES, (mean, worst, angle)


@pytest.mark.parametrize("degrees, axis, shift, invert", [(120.0, (1.0, -2.0, 0.5), (6.0, -8.0, 5.0), False),
                                                          (170.0, (0.3, 1.0, -1.0), (-7.0, 4.0, 9.0), True)])
def test_3d_recovers_rotation_and_shift_across_grids(degrees, axis, shift, invert):
    true = true_transform(3, degrees, shift, axis)
    fixed_grid = grid_around((24, 32, 40), (1.8, 2.0, 2.5), (1.0, -2.0, 3.0))
    moving_grid = grid_around((30, 34, 36), (2.0, 2.2, 2.4), np.asarray(shift) + (2.0, -1.0, 1.0), OBLIQUE_3D)
    fixed, moving = pair(true, fixed_grid, moving_grid, invert)
    found = rigid_search(fixed, moving, fixed_grid, moving_grid, step=30.0, max_size=24)
    mean, worst, angle = errors(found, true, fixed_grid, fixed)
    # Working spacing h = 86.4 mm / 24 = 3.6 mm (global search at 7.2 mm over 134 rotations).
    # Measured: max <= 0.62 mm, angle <= 1.4 degrees.
    assert worst < TOLERANCE * 86.4 / 24 and angle < TOLERANCE_DEGREES, (mean, worst, angle)


def test_warping_the_moving_image_with_the_result_gives_the_fixed_image():
    true = true_transform(2, 71.9, (10.0, 5.0))
    fixed_grid = grid_around((64, 64), (1.5, 1.5), (0.0, 0.0))
    moving_grid = grid_around((60, 50), (1.8, 1.6), (12.0, 3.0), OBLIQUE_2D)
    fixed, moving = pair(true, fixed_grid, moving_grid)
    found = rigid_search(fixed, moving, fixed_grid, moving_grid)
    warped = found.warp(moving[None, None], moving_grid, fixed_grid)[0, 0]
    inside = moving_grid.contains(found.on_grid(fixed_grid))[0]
    # Measured: 0.02 of the phantom's range (linear interpolation); 0.98 with the identity.
    assert (warped - fixed)[inside].abs().max() < 0.05 * float(fixed.max() - fixed.min())


@pytest.mark.parametrize("side", ["moving", "fixed"])
def test_a_mask_selects_which_of_two_copies_is_aligned(side):
    # One image holds the phantom twice, placed by S_0 and S_1 (phantom -> world) 80 mm apart; the
    # other holds it once. Masking one copy must give the transform of that copy: S_i when the copies
    # are in the moving image, S_i^-1 when they are in the fixed one.
    single_grid = grid_around((64, 64), (1.5, 1.5), (0.0, 0.0))
    double_grid = grid_around((80, 120), (1.5, 1.5), (0.0, 0.0))
    copies = [true_transform(2, 31.7, (-40.0, 3.0)), true_transform(2, -118.4, (42.0, -4.0))]
    y = double_grid.points(dtype=torch.float64)
    double = sum(phantom(s.inverse().points(y)[0]) for s in copies).float()
    single = phantom(single_grid.points(dtype=torch.float64)[0]).float()
    for i, copy in enumerate(copies):
        mask = (y[0] - copy.translation[0]).norm(dim=-1) < 40.0
        if side == "moving":
            found = rigid_search(single, double, single_grid, double_grid, moving_mask=mask)
            mean, worst, angle = errors(found, copy, single_grid, single)
        else:
            found = rigid_search(double, single, double_grid, single_grid, fixed_mask=mask)
            mean, worst, angle = errors(found, copy.inverse(), double_grid, torch.where(mask, double, 0.0))
        # h = 180 mm / 64 = 2.8 mm. Measured: max <= 0.44 mm, angle <= 0.8 degrees (copies in the
        # moving image), <= 0.24 mm, 0.35 degrees (in the fixed image).
        assert worst < TOLERANCE * 180.0 / 64 and angle < TOLERANCE_DEGREES, (side, i, mean, worst, angle)


def test_partial_field_of_view_and_minimum_overlap():
    # The moving image sees only the left part of the phantom (a 45 x 45 mm field of view).
    true = true_transform(2, -57.3, (5.0, 6.0))
    fixed_grid = grid_around((64, 64), (1.5, 1.5), (0.0, 0.0))
    left = true.points(torch.tensor([[[-12.0, 0.0]]], dtype=torch.float64))[0, 0]  # 12 mm left of the centre
    moving_grid = grid_around((30, 30), (1.5, 1.5), left)
    fixed, moving = pair(true, fixed_grid, moving_grid)
    found = rigid_search(fixed, moving, fixed_grid, moving_grid)
    x = fixed_grid.points(dtype=torch.float64)
    seen = moving_grid.contains(true.points(x))[0] & (fixed > 0.5)
    mean, worst, angle = errors(found, true, fixed_grid, torch.where(seen, fixed, 0.0))
    # h = 96 mm / 64 = 1.5 mm. Measured: max 0.25 mm, angle 0.2 degrees.
    assert worst < TOLERANCE * 96.0 / 64 and angle < TOLERANCE_DEGREES, (mean, worst, angle)


def test_normalisation_by_gradient_energy_is_unbiased_where_the_overlap_count_is_not():
    # An unrotated, shifted copy in a field of view of the same size, mostly background. The paper's
    # N(k) = number of overlapping voxels (Eq. 5) favours poses that push background out of the
    # overlap (a rotated square overlaps a square less); the default normalisation by the gradient
    # energy in the overlap does not.
    true = true_transform(2, 0.0, (12.0, -7.0))
    fixed_grid = grid_around((64, 64), (1.5, 1.5), (0.0, 0.0))
    moving_grid = grid_around((64, 64), (1.5, 1.5), (12.0, -7.0))
    fixed, moving = pair(true, fixed_grid, moving_grid)
    found = {n: rigid_search(fixed, moving, fixed_grid, moving_grid, normalisation=n) for n in ("gradients", "overlap")}
    err = {n: errors(t, true, fixed_grid, fixed) for n, t in found.items()}
    # Measured (h = 1.5 mm): gradients max 0.001 mm, 0.0 degrees; overlap max 2.1 mm, 3.75 degrees.
    assert err["gradients"][1] < 0.1 and err["gradients"][2] < 0.1, err
    assert 2.0 < err["overlap"][2] < 10.0, err


# ---------------------------------------------------------------- bad inputs

def test_bad_inputs_raise_one_line_errors():
    grid = grid_around((32, 32), (2.0, 2.0), (0.0, 0.0))
    image = phantom(grid.points()[0])
    grid3 = Grid((8, 8, 8), (4.0, 4.0, 4.0))
    cases = [
        (dict(fixed=image[:-1]), "fixed: shape"),
        (dict(moving=image[None]), "moving: shape"),
        (dict(fixed_grid=grid3), "moving_grid: 2D, but fixed_grid is 3D"),
        (dict(moving_grid=(32, 32)), "moving_grid: expected a Grid"),
        (dict(fixed=torch.where(image > 1.0, float("nan"), image)), "fixed: has non-finite values"),
        (dict(moving_mask=torch.zeros(32, 32)), "moving_mask: mask is empty"),
        (dict(fixed_mask=torch.ones(31, 32)), "fixed_mask: shape"),
        (dict(moving=torch.full((32, 32), 3.0)), "moving: the image is constant inside its mask"),
        (dict(step=0.0), "step: 0.0 is out of range"),
        (dict(min_overlap=1.5), "min_overlap: 1.5 is out of range"),
        (dict(normalisation="voxels"), "normalisation: 'voxels' is out of range"),
        (dict(spacing=-1.0), "spacing: -1.0 is out of range"),
    ]
    for change, message in cases:
        args = dict(fixed=image, moving=image, fixed_grid=grid, moving_grid=grid)
        args.update(change)
        with pytest.raises(AtlasregError, match="^" + message) as err:
            rigid_search(**args)
        assert "\n" not in str(err.value)
