"""Known-answer tests of atlasreg.evaluation.registration: TRE from landmark files, propagated-label
overlap, folding and log-Jacobian spread, inverse-consistency error of transform pairs."""

import math

import numpy as np
import pytest
import torch
from fields import smooth_svf

from atlasreg.errors import AtlasregError
from atlasreg.evaluation.registration import (
    inverse_consistency_error, propagate_labels, propagated_label_metrics, read_landmark_pair,
    target_registration_error, transform_regularity,
)
from atlasreg.spatial.grid import Grid
from atlasreg.spatial.transforms import (
    AffineTransform, Composite, DisplacementField, StationaryVelocityField, jacobian_determinant, rotation_matrix,
)


def write_csv(path, points, names=True):
    cols = ["x", "y", "z"][:points.shape[1]]
    lines = [",".join((["name"] if names else []) + cols)]
    for i, p in enumerate(points):
        lines.append(",".join(([f"L{i}"] if names else []) + [repr(float(v)) for v in p]))
    path.write_text("\n".join(lines) + "\n")
    return path


def translation(t):
    t = torch.as_tensor(t, dtype=torch.float64)[None]
    return AffineTransform(torch.eye(t.shape[1], dtype=torch.float64)[None], t)


@pytest.mark.parametrize("ndim", [2, 3])
def test_tre_of_a_translation_from_landmark_files(tmp_path, ndim):
    rng = np.random.default_rng(0)
    fixed = rng.uniform(-40, 40, size=(7, ndim))
    t = np.array([3.0, -4.0, 12.0][:ndim])                      # |t| = 5 mm (2D), 13 mm (3D)
    moving = fixed + t
    f_csv, m_csv = write_csv(tmp_path / "fixed.csv", fixed), write_csv(tmp_path / "moving.csv", moving, False)
    norm = float(np.linalg.norm(t))
    # The right translation: TRE 0, initial TRE |t| at every landmark.
    out = target_registration_error(translation(t), f_csv, m_csv)
    assert out["n_landmarks"] == 7 and out["tre_mm"].shape == (7,)
    assert out["tre_max_mm"] < 1e-9
    for stat in ("mean", "median", "max"):
        assert out[f"initial_tre_{stat}_mm"] == pytest.approx(norm)
    assert out["initial_tre_std_mm"] == pytest.approx(0.0, abs=1e-9)
    # Half the translation leaves half the error; the identity (None) leaves all of it.
    half = target_registration_error(translation(t / 2), fixed, moving)
    np.testing.assert_allclose(half["tre_mm"], norm / 2, rtol=1e-9)
    assert target_registration_error(None, f_csv, m_csv)["tre_mean_mm"] == pytest.approx(norm)
    # float32 transforms and dense fields: a constant displacement field is the same translation.
    grid = Grid.centred((16,) * ndim, (6.0,) * ndim)
    u = torch.tensor(t, dtype=torch.float32).view(1, ndim, *[1] * ndim).expand(1, ndim, *grid.size)
    dense = target_registration_error(DisplacementField(u.contiguous(), grid), fixed, moving)
    assert dense["tre_max_mm"] < 1e-4


def test_tre_of_a_rotation():
    # Landmarks on a circle of radius r about the centre of a rotation by theta: TRE 2 r sin(theta / 2).
    r, theta = 20.0, math.radians(30.0)
    angles = np.linspace(0, 2 * math.pi, 9)[:-1]
    fixed = r * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    rot = AffineTransform(rotation_matrix(torch.tensor([[theta]], dtype=torch.float64)),
                          torch.zeros(1, 2, dtype=torch.float64))
    out = target_registration_error(rot, fixed, fixed)
    np.testing.assert_allclose(out["tre_mm"], 2 * r * math.sin(theta / 2), rtol=1e-9)
    assert out["initial_tre_max_mm"] == 0.0


def test_bad_landmark_files_name_the_file(tmp_path):
    good = write_csv(tmp_path / "fixed.csv", np.zeros((3, 3)))
    cases = {
        "missing.csv": None,
        "fewer.csv": "x,y,z\n1,2,3\n4,5,6\n",
        "letters.csv": "x,y,z\n1,2,3\n4,five,6\n7,8,9\n",
        "header_only.csv": "x,y,z\n",
        "flat.csv": "x,y\n1,2\n3,4\n5,6\n",
        "nan.csv": "x,y,z\n1,2,3\n4,nan,6\n7,8,9\n",
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(AtlasregError) as info:
            read_landmark_pair(good, path)
        message = str(info.value)
        assert name in message and "\n" not in message, message
    with pytest.raises(AtlasregError, match="fewer.csv: has 2 landmarks"):
        target_registration_error(None, good, tmp_path / "fewer.csv")
    with pytest.raises(AtlasregError, match="fixed.csv: has 3-D landmarks, the transform is 2-D"):
        target_registration_error(translation([1.0, 2.0]), good, good)
    with pytest.raises(ValueError):
        target_registration_error(None, np.zeros((3, 2)), np.zeros((4, 2)))


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_and_its_exact_inverse_are_inverse_consistent(ndim):
    grid = Grid.centred((12,) * ndim, (1.5, 1.0, 2.0)[:ndim])
    rng = np.random.default_rng(1)
    A = np.eye(ndim) + 0.2 * rng.standard_normal((ndim, ndim))
    t = rng.uniform(-5, 5, ndim)
    forward = AffineTransform.from_numpy(A, t, dtype=torch.float64)
    inverse = AffineTransform.from_numpy(np.linalg.inv(A), -np.linalg.inv(A) @ t, dtype=torch.float64)
    out = inverse_consistency_error(forward, inverse, grid)
    assert out["ice_max_mm"][0] < 1e-9 and out["n_voxels"][0] == 12 ** ndim
    # An inverse that is off by a translation d: the round trip misses by |d| everywhere.
    d = np.array([0.3, -0.4, 1.2][:ndim])
    off = Composite((inverse, AffineTransform.from_numpy(np.eye(ndim), d, dtype=torch.float64)))
    out = inverse_consistency_error(forward, off, grid)
    assert out["ice_mean_mm"][0] == pytest.approx(np.linalg.norm(d))
    assert out["ice_max_mm"][0] == pytest.approx(np.linalg.norm(d))
    assert out["ice_mean_voxels"][0] == pytest.approx(np.linalg.norm(d / np.array(grid.spacing)))
    # Only the voxels in the mask count; an empty mask gives NaN.
    mask = torch.zeros(1, *grid.size)
    mask[(0,) + (slice(2, 5),) * ndim] = 1
    assert inverse_consistency_error(forward, off, grid, mask)["n_voxels"][0] == 3 ** ndim
    assert math.isnan(inverse_consistency_error(forward, off, grid, torch.zeros(1, *grid.size))["ice_mean_mm"][0])


def test_svf_and_its_negation_are_nearly_inverse_consistent():
    grid = Grid.centred((32, 32), (1.0, 1.0))
    v = torch.cat([smooth_svf(grid, 1.5, seed=s, terms=2) for s in (0, 1)])
    phi = StationaryVelocityField(v, grid, steps=7)
    out = inverse_consistency_error(phi, phi.inverse(), grid)
    moved = (phi.on_grid(grid) - grid.points()).norm(dim=-1).flatten(1).mean(1)
    assert (moved > 1.0).all()                              # more than a voxel on average
    assert out["ice_mean_mm"].shape == (2,)
    assert (out["ice_mean_mm"] < 0.05 * moved.numpy()).all() and (out["ice_mean_mm"] > 0).all()


@pytest.mark.parametrize("ndim", [2, 3])
def test_folding_fraction_and_log_jacobian_spread_of_a_known_field(ndim):
    # u_x = c sin(k x) with 12 voxels per period: the central difference of u_x is
    # c sin(k h) / h cos(k x) = 2 cos(k x), so det J = 1 + 2 cos(k x) <= 0 on 4 of every 12 columns
    # (phases 15 + 30 m degrees; cos <= -1/2 at 135, 165, 195, 225). 26 columns: the 24 inside are
    # two periods.
    size = (6, 8, 26) if ndim == 3 else (8, 26)
    h = 1.5
    grid = Grid.centred(size, (h,) * ndim)
    x = grid.points()[0][..., 0]
    k = 2 * math.pi / (12 * h)
    c = 2 * h / math.sin(k * h)
    u = torch.zeros(1, ndim, *size)
    u[0, 0] = c * torch.sin(k * x)
    interior = torch.zeros(1, *size)
    interior[..., 1:-1] = 1                                  # central differences only (x borders are one-sided)
    out = transform_regularity(DisplacementField(u, grid), grid, interior)
    assert out["fraction_nonpositive"][0] == pytest.approx(1 / 3, abs=1e-9)
    det = 1 + 2 * np.cos(k * x[..., 1:-1].double().numpy())
    expected = np.std(np.log(det[det > 0]))
    assert out["std_log_jacobian"][0] == pytest.approx(expected, rel=1e-4)
    # An affine map with det 2: no folding, no spread.
    scale = AffineTransform.from_numpy(np.diag([2.0] + [1.0] * (ndim - 1)), np.zeros(ndim))
    out = transform_regularity(scale, grid)
    assert out["fraction_nonpositive"][0] == 0 and out["std_log_jacobian"][0] == pytest.approx(0, abs=1e-5)


def test_propagated_labels_of_a_shifted_square():
    # Moving: two squares (labels 10, 20) of side 8 voxels; fixed: the same squares 2 voxels further
    # in +x. T(x) = x - 2 voxels maps fixed points to moving points, so the warp puts them back exactly.
    spacing = (0.5, 0.8)
    grid = Grid.centred((32, 40), spacing)
    moving = np.zeros(grid.size, dtype=np.int64)
    moving[4:12, 6:14] = 10
    moving[16:24, 20:28] = 20
    fixed = np.roll(moving, 2, axis=1)
    labels = [0, 10, 20]
    shift = AffineTransform(torch.eye(2)[None], torch.tensor([[-2 * spacing[0], 0.0]]))
    exact = propagate_labels(moving, labels, shift, grid, grid)
    np.testing.assert_array_equal(exact, fixed)
    out = propagated_label_metrics(exact, fixed, labels, spacing)
    assert out["dice_mean"] == 1.0 and out["hd95_mean"] == 0.0
    # The identity leaves the 2-voxel shift: Dice (8 - 2) / 8 for both squares, HD95 at most 1 mm.
    identity = AffineTransform.identity(2)
    same = propagate_labels(moving, labels, identity, grid, grid)
    np.testing.assert_array_equal(same, moving)
    out = propagated_label_metrics(same, fixed, labels, spacing)
    assert out["dice_mean"] == pytest.approx(6 / 8)
    assert set(out["per_label"]) == {10, 20}
    assert 0 < out["hd95_mean"] <= 2 * spacing[0] + 1e-6
    # Outside the moving field of view the propagated labelmap is background.
    far = AffineTransform(torch.eye(2)[None], torch.tensor([[100.0, 0.0]]))
    assert (propagate_labels(moving, labels, far, grid, grid) == 0).all()


def test_regularity_of_a_displacement_field_file_on_a_flipped_grid(tmp_path):
    """An ITK displacement field file of the affine map x -> A x (A = diag(0.4, 0.4, 1), det 0.16) on a
    grid with direction diag(-1, -1, 1) (the mouse-brain volumes' header), read back with
    read_transform: det J = 0.16 at every voxel. (SimpleITK's DisplacementFieldJacobianDeterminant,
    which differentiates along the index axes and ignores the direction, gives 2.56 inside: ITK issue
    #5358; the registration benchmark therefore scores folding with transform_regularity.)"""
    import SimpleITK as sitk

    from atlasreg.spatial.itk import read_transform

    img = sitk.Image([10, 12, 8], sitk.sitkVectorFloat64, 3)
    img.SetSpacing((0.5, 0.6, 0.7))
    img.SetOrigin((3.0, -2.0, 1.0))
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    grid = Grid.from_sitk(img)
    x = grid.points()[0].double().numpy()                       # (z, y, x, 3) world points
    a = np.diag([0.4, 0.4, 1.0])
    field = sitk.GetImageFromArray(x @ a.T - x, isVector=True)
    field.CopyInformation(img)
    sitk.WriteImage(field, str(tmp_path / "field.nii.gz"))
    transform = read_transform(tmp_path / "field.nii.gz")
    stats = transform_regularity(transform, grid)
    assert stats["fraction_nonpositive"][0] == 0.0
    with torch.no_grad():
        det = jacobian_determinant(transform.on_grid(grid), grid)
    assert torch.allclose(det, torch.full_like(det, 0.16), atol=1e-4), (det.min(), det.max())
