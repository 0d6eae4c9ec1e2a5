"""ITK round trips (atlasreg.spatial.itk): every exported transform applied by SimpleITK to the saved
atlas image and labelmap matches atlasreg's own warp; files read back give the same maps; outside the
model's field of view the written fields continue the affine part."""

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from fields import inside_fov, smooth_svf

from atlasreg.atlas import save_atlas
from atlasreg.segment import world_transforms
from atlasreg.spatial.grid import Grid
from atlasreg.spatial.itk import field_image, read_transform, to_sitk, write_transform
from atlasreg.spatial.transforms import AffineTransform, Composite, DisplacementField, compose_transform


def rotation(ndim, angles):
    if ndim == 2:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    r = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = math.cos(a), math.sin(a)
        i, j = [k for k in range(3) if k != axis]
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        r = m @ r
    return r


def native_grid(ndim):
    """A subject grid with anisotropic spacing, a flipped axis, an oblique direction and a non-zero
    origin, larger than the model's field of view (about 100 mm against 64 mm)."""
    if ndim == 2:
        direction = rotation(2, [0.3]) @ np.diag([1.0, -1.0])
        return Grid((40, 50), (2.0, 2.5), (12.0, -30.0), tuple(direction.ravel()))
    direction = rotation(3, [0.2, -0.3, 0.4]) @ np.diag([-1.0, 1.0, 1.0])
    return Grid((20, 24, 22), (4.5, 4.0, 5.0), (-20.0, 15.0, 7.0), tuple(direction.ravel()))


def model_transform(ndim, seed=0):
    """A trained-looking Phi on the model grid: a smooth SVF of a few mm plus an affine part."""
    grid = Grid.centred((32,) * ndim if ndim == 2 else (16,) * 3, (2.0,) * ndim if ndim == 2 else (4.0,) * 3)
    v = smooth_svf(grid.downsample(2), amplitude=2.5, seed=seed)
    angles = torch.tensor([[0.15]]) if ndim == 2 else torch.tensor([[0.1, -0.12, 0.08]])
    aff = AffineTransform.from_trs(torch.tensor([[3.0, -2.0, 1.0][:ndim]]), angles, torch.full((1, ndim), 0.05))
    return compose_transform(v, aff.matrix, aff.translation, grid), grid


def atlas_on(grid):
    """A smooth atlas image and a two-structure one-hot labelmap on `grid`."""
    p = grid.points()[0]
    img = torch.exp(-(p ** 2).sum(-1) / (2 * 12.0 ** 2)) + 0.3 * torch.sin(p[..., 0] / 5.0)
    r = (p - torch.tensor([4.0] + [0.0] * (grid.ndim - 1))).norm(dim=-1)
    lab = torch.zeros(grid.size, dtype=torch.long)
    lab[r < 20] = 1
    lab[r < 9] = 2
    return img[None, None], torch.nn.functional.one_hot(lab, 3).movedim(-1, 0)[None].float()


@pytest.mark.parametrize("ndim", [2, 3])
def test_exported_transforms_applied_by_simpleitk_match_atlasreg(ndim, tmp_path):
    phi, model = model_transform(ndim)
    native = native_grid(ndim)
    to_subject, to_atlas = world_transforms(phi, native)
    img, lab = atlas_on(model)
    files = save_atlas(lab, img, [0, 1, 2], model, tmp_path / "atlas")
    atlas_img = sitk.ReadImage(str(files["atlas_image.nii.gz"]), sitk.sitkFloat64)
    atlas_lab = sitk.ReadImage(str(files["atlas_labelmap.nii.gz"]))

    write_transform(to_atlas, tmp_path / "inverse.h5")
    write_transform(to_atlas, tmp_path / "inverse.nii.gz", grid=native)
    ours = to_atlas.warp(img, model, native)[0, 0].numpy()
    ours_pts = to_atlas.on_grid(native)[0].double()
    inside = inside_fov(to_atlas, native, model).numpy()
    assert inside.mean() > 0.1  # the test looks at a real part of the field of view

    reference = native.reference_image()
    index = np.stack(np.meshgrid(*[np.arange(n) for n in native.size], indexing="ij"), -1)[..., ::-1]
    world = native.index_to_world(index)  # (*size, D) world points of the input voxels
    for name in ("inverse.h5", "inverse.nii.gz"):
        tx = sitk.ReadTransform(str(tmp_path / name)) if name.endswith(".h5") else \
            sitk.DisplacementFieldTransform(sitk.ReadImage(str(tmp_path / name), sitk.sitkVectorFloat64))
        theirs_pts = np.array([tx.TransformPoint(tuple(p)) for p in world.reshape(-1, ndim)]).reshape(world.shape)
        err_vox = np.abs(theirs_pts - ours_pts.numpy()) / np.asarray(model.spacing)
        # Measured: max 1e-5 voxel (float32 arithmetic); the target is 0.05 voxel.
        assert err_vox[inside].max() < 0.01, name
        theirs = sitk.GetArrayFromImage(sitk.Resample(atlas_img, reference, tx, sitk.sitkLinear, 0.0))
        assert np.abs(theirs - ours)[inside].max() < 1e-3 * np.abs(ours).max(), name
        # The labelmap: SimpleITK's nearest neighbour of the saved argmax against atlasreg's soft warp.
        theirs_lab = sitk.GetArrayFromImage(sitk.Resample(atlas_lab, reference, tx, sitk.sitkNearestNeighbor, 0))
        ours_lab = to_atlas.warp(lab, model, native)[0].argmax(0).numpy()
        assert (theirs_lab == ours_lab)[inside].mean() > 0.97, name

    # Forward: the subject resampled into atlas space (fixed = the atlas grid).
    write_transform(to_subject, tmp_path / "forward.h5")
    subject = torch.rand(1, 1, *native.size)
    subject_img = sitk.GetImageFromArray(subject[0, 0].double().numpy())
    native.copy_information_to(subject_img)
    theirs = sitk.GetArrayFromImage(sitk.Resample(subject_img, model.reference_image(),
                                                  sitk.ReadTransform(str(tmp_path / "forward.h5")),
                                                  sitk.sitkLinear, 0.0))
    ours_fwd = to_subject.warp(subject, native, model)[0, 0].numpy()
    fwd_pts = to_subject.on_grid(model)[0]
    inside_fwd = (native.world_to_normalised(fwd_pts).abs() < 1 - 2.0 / min(native.size)).all(-1).numpy()
    assert inside_fwd.mean() > 0.5
    assert np.abs(theirs - ours_fwd)[inside_fwd].max() < 1e-3


@pytest.mark.parametrize("ndim", [2, 3])
def test_read_transform_gives_back_the_same_maps(ndim, tmp_path):
    phi, model = model_transform(ndim, seed=2)
    native = native_grid(ndim)
    _, to_atlas = world_transforms(phi, native)
    pts = native.points()
    for name, grid in (("t.h5", None), ("t.nii.gz", native)):
        back = read_transform(write_transform(to_atlas, tmp_path / name, grid=grid))
        assert isinstance(back, (Composite, DisplacementField))
        mapped = to_atlas.points(pts)
        inside = inside_fov(to_atlas, native, model)[None]
        err = (back.points(pts) - mapped).norm(dim=-1)[inside]
        assert err.max() < 1e-3, name
    affine = AffineTransform.from_trs(torch.tensor([[1.0, 2.0, 3.0][:ndim]]),
                                      torch.tensor([[0.2]]) if ndim == 2 else torch.tensor([[0.2, 0.1, -0.3]]),
                                      torch.full((1, ndim), 0.1))
    for name in ("a.tfm", "a.txt", "a.h5"):
        back = read_transform(write_transform(affine, tmp_path / name))
        assert isinstance(back, AffineTransform)
        assert torch.allclose(back.matrix, affine.matrix, atol=1e-6)
        assert torch.allclose(back.translation, affine.translation, atol=1e-5)


def test_sitk_transforms_with_a_centre_are_read_as_the_same_affine():
    euler = sitk.Euler3DTransform((10.0, -5.0, 3.0), 0.1, -0.2, 0.3, (1.0, 2.0, 3.0))
    ours = read_transform_from(euler)
    p = np.array([[4.0, -7.0, 12.0], [0.0, 0.0, 0.0]])
    expected = np.array([euler.TransformPoint(tuple(x)) for x in p])
    np.testing.assert_allclose(ours.points(torch.tensor(p, dtype=torch.float32)[None])[0].numpy(), expected,
                               atol=1e-4)


def read_transform_from(tx):
    from atlasreg.spatial.itk import from_sitk
    return from_sitk(tx)


@pytest.mark.parametrize("ndim", [2, 3])
def test_written_fields_continue_the_affine_part_outside_the_model_field_of_view(ndim, tmp_path):
    """A pure affine Phi on a 64 mm model grid written for a 100 mm input: the displacement at every
    input voxel is the analytic affine map (the earlier code clamped the point map at the model
    border, up to 10 mm wrong there)."""
    model = Grid.centred((32,) * ndim if ndim == 2 else (16,) * 3, (2.0,) * ndim if ndim == 2 else (4.0,) * 3)
    native = Grid.centred((100,) * ndim if ndim == 2 else (25,) * 3, (1.0,) * ndim if ndim == 2 else (4.0,) * 3)
    angles = torch.tensor([[0.2]]) if ndim == 2 else torch.tensor([[0.1, 0.2, -0.1]])
    affine = AffineTransform.from_trs(torch.full((1, ndim), 4.0), angles, torch.full((1, ndim), 0.1))
    phi = compose_transform(None, affine.matrix, affine.translation, model)
    _, to_atlas = world_transforms(phi, native)
    path = write_transform(to_atlas, tmp_path / "inverse.nii.gz", grid=native)
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # (*size, D)
    pts = native.points()[0].double()
    inv = affine.inverse()
    expected = (pts @ inv.matrix[0].double().T + inv.translation[0].double()) - pts
    outside = ~native.contains(pts.float()) | ~model.contains(pts.float())
    assert outside.any()
    np.testing.assert_allclose(field, expected.numpy(), atol=1e-3)


def test_field_image_rejects_a_mismatched_grid():
    with pytest.raises(ValueError):
        field_image(torch.zeros(2, 4, 5), Grid.centred((5, 4), (1.0, 1.0)))
    with pytest.raises(TypeError):
        to_sitk(object())


@pytest.mark.parametrize("ndim", [2, 3])
def test_bspline_transform_equals_itks_and_round_trips(ndim, tmp_path):
    """A cubic B-spline FFD on an oblique, anisotropic control grid: atlasreg's evaluation equals ITK's
    BSplineTransform (same control points and coefficients) wherever ITK evaluates it, and a file
    written and read back gives the same transform."""
    from atlasreg.spatial.transforms import BSplineTransform

    direction = np.eye(ndim)
    direction[:2, :2] = rotation(2, [0.3])
    grid = Grid((5, 6, 7)[:ndim], (9.0, 8.0, 10.0)[:ndim], (-20.0, 5.0, 3.0)[:ndim], tuple(direction.ravel()))
    coef = torch.randn(1, ndim, *grid.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    T = BSplineTransform(coef, grid)
    tx = to_sitk(T)
    index = np.random.default_rng(0).uniform(1.0, np.array(grid.size_xyz) - 2.0, size=(300, ndim))
    pts = grid.index_to_world(index)  # where all 4^D control points exist
    ours = T.points(torch.tensor(pts)[None])[0].numpy()
    theirs = np.array([tx.TransformPoint(tuple(p)) for p in pts])
    np.testing.assert_allclose(ours, theirs, atol=1e-9)  # measured: 7e-15 mm
    assert np.abs(ours - pts).max() > 1.0  # a real deformation
    back = read_transform(write_transform(T, tmp_path / "ffd.tfm"), dtype=torch.float64)
    assert isinstance(back, BSplineTransform) and back.control_grid == grid
    assert torch.equal(back.coefficients, coef)
    # Constant coefficients translate every point well inside the grid (partition of unity).
    shift = BSplineTransform(torch.full((1, ndim, *grid.size), 2.5, dtype=torch.float64), grid)
    inner = torch.tensor(grid.index_to_world(index))[None]
    assert torch.allclose(shift.points(inner) - inner, torch.full_like(inner, 2.5), atol=1e-9)
