"""Grid (atlasreg.spatial.grid): one geometry type for images and the model grid, checked against
SimpleITK's own index <-> physical point conversion."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from atlasreg.spatial.grid import Grid


def oblique_grid():
    c, s = np.cos(0.4), np.sin(0.4)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, -1.0]])  # rotated, z flipped
    return Grid((6, 7, 9), (0.7, 1.3, 2.5), (10.0, -4.0, 3.0), tuple(direction.ravel()))


def test_points_and_indices_match_simpleitk():
    g = oblique_grid()
    img = g.reference_image()
    pts = g.points(dtype=torch.float64)[0]
    for idx in [(0, 0, 0), (8, 6, 5), (3, 2, 4)]:  # ITK order (x, y, z)
        expected = img.TransformIndexToPhysicalPoint(idx)
        np.testing.assert_allclose(pts[idx[2], idx[1], idx[0]].numpy(), expected, atol=1e-9)
        np.testing.assert_allclose(g.index_to_world(np.array(idx)), expected, atol=1e-9)
        np.testing.assert_allclose(g.world_to_index(np.array(expected)), idx, atol=1e-9)
    assert Grid.from_sitk(img) == g
    assert Grid.from_dict(g.to_dict()) == g


def test_normalised_coordinates_span_the_field_of_view():
    g = oblique_grid()
    pts = g.points(dtype=torch.float64)
    norm = g.world_to_normalised(pts)
    # Voxel centres lie half a voxel inside the faces at -1 and 1 (align_corners=False).
    n = torch.tensor(g.size_xyz, dtype=torch.float64)
    assert torch.allclose(norm.amin(dim=(0, 1, 2, 3)), -1 + 1 / n) and torch.allclose(norm.amax(dim=(0, 1, 2, 3)), 1 - 1 / n)
    assert torch.allclose(g.normalised_to_world(norm), pts)
    assert torch.allclose(g.centred_to_world(g.world_to_centred(pts)), pts)
    assert g.contains(pts).all() and not g.contains(pts + 100.0).any()


def test_centred_grid_is_the_model_grid():
    g = Grid.centred((8, 16), (2.0, 3.0))
    assert g.is_centred and np.allclose(g.centre, 0.0)
    assert torch.equal(g.points(), g.points(centred=True))
    assert not oblique_grid().is_centred


def test_derived_grids_keep_centre_and_direction():
    g = oblique_grid()
    for other in (g.resampled((3, 4, 5), (1.0, 1.0, 1.0)), g.resize((3, 14, 9)), g.downsample(2),
                  g.crop_or_pad((10, 10, 10))):
        assert g.same_frame(other)
    half = g.downsample(2)
    assert half.size == (3, 3, 4) and np.allclose(half.half_extent, g.half_extent)
    assert g.crop_or_pad((10, 10, 10)).spacing == g.spacing
    assert not g.same_frame(Grid.centred(g.size, g.spacing))


def test_bad_grids_raise():
    with pytest.raises(ValueError):
        Grid((4,), (1.0,))
    with pytest.raises(ValueError):
        Grid((4, 4), (1.0, 0.0))
    with pytest.raises(ValueError):
        Grid((4, 4), (1.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(ValueError):
        Grid((4, 4), (1.0, 1.0)).copy_information_to(sitk.Image(3, 4, sitk.sitkUInt8))
