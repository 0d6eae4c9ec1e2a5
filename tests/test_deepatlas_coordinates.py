"""atlasreg.deepatlas.coordinates: corner-aligned coordinate maps in ITK channel order, their Jacobians
and their world coordinates on an atlasreg Grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from atlasreg.deepatlas.coordinates import (coordinates_to_world, identity_coordinates, jacobian, normalised_to_voxels,
                                            resize, sample_at, world_to_coordinates)
from atlasreg.spatial.grid import Grid


@pytest.mark.parametrize("size", [(7, 5), (5, 4, 3)])
def test_identity_map_is_corner_aligned_in_itk_order_and_samples_an_image_unchanged(size):
    c = identity_coordinates(size, dtype=torch.float64)
    d = len(size)
    assert c.shape == (1, d, *size)
    # channel 0 is x: it varies along the last array axis, from -1 at the first voxel to +1 at the last
    assert torch.equal(c[0, 0].flatten()[: size[-1]], torch.linspace(-1, 1, size[-1], dtype=torch.float64))
    assert float(c[0, d - 1].flatten()[0]) == -1.0 and float(c[0, d - 1].flatten()[-1]) == 1.0
    image = torch.randn(2, 3, *size, dtype=torch.float64)
    out = sample_at(image, c.expand(2, *c.shape[1:]))
    assert torch.allclose(out, image, atol=1e-12)


@pytest.mark.parametrize("sizes", [((5, 7), (33, 18)), ((3, 4, 5), (9, 6, 17))])
def test_corner_aligned_resizing_keeps_the_identity_map_exact(sizes):
    """Why corner alignment (5.2.2): the identity map upsampled or downsampled is the identity map of the
    new size (up to float64 rounding), so a coarse level's map refines into a finer one without a shift."""
    small, large = sizes
    up = resize(identity_coordinates(small, dtype=torch.float64), large)
    assert torch.allclose(up, identity_coordinates(large, dtype=torch.float64), atol=1e-12)
    down = resize(identity_coordinates(large, dtype=torch.float64), small)
    assert torch.allclose(down, identity_coordinates(small, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("size", [(9, 6), (5, 7, 4)])
def test_jacobian_of_an_affine_map_is_its_matrix(size):
    d = len(size)
    torch.manual_seed(0)
    A = torch.randn(d, d, dtype=torch.float64)
    u = identity_coordinates(size, dtype=torch.float64)
    c = torch.einsum("ij,nj...->ni...", A, u) + 0.3
    J = jacobian(c)
    assert J.shape == (1, *size, d, d)
    assert torch.allclose(J, A.expand_as(J), atol=1e-12)
    assert torch.allclose(jacobian(u), torch.eye(d, dtype=torch.float64).expand_as(J), atol=1e-12)


def test_world_coordinates_of_corners_are_the_corner_voxel_centres_on_an_oblique_grid():
    angle = 0.4
    direction = (math.cos(angle), -math.sin(angle), 0.0, math.sin(angle), math.cos(angle), 0.0, 0.0, 0.0, 1.0)
    grid = Grid((6, 5, 4), (0.7, 1.3, 2.0), (10.0, -4.0, 3.0), direction)
    corners = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [1.0, -1.0, 1.0]], dtype=torch.float64)
    world = coordinates_to_world(corners, grid)
    last = np.array(grid.size_xyz) - 1
    expected = grid.index_to_world(np.array([[0, 0, 0], last, [last[0], 0, last[2]]]))
    assert np.allclose(world.numpy(), expected, atol=1e-9)
    assert torch.allclose(world_to_coordinates(world, grid), corners, atol=1e-12)


def test_normalised_differences_in_voxels():
    u = torch.ones(1, 2, 3, 4)  # one normalised unit along x (4 voxels) and y (3 voxels)
    v = normalised_to_voxels(u, (3, 4))
    assert torch.equal(v[0, :, 0, 0], torch.tensor([1.5, 1.0]))


def test_bad_maps_are_refused():
    with pytest.raises(ValueError, match=">= 2 voxels"):
        identity_coordinates((1, 5))
    with pytest.raises(ValueError, match="coordinate map"):
        jacobian(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="spatial dims"):
        sample_at(torch.zeros(1, 1, 4, 4, 4), identity_coordinates((4, 4)))
