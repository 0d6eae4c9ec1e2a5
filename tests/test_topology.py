"""Known-answer tests of atlasreg.evaluation.topology."""

import numpy as np
import pytest
import torch

from atlasreg.evaluation.topology import count_holes, jacobian_statistics, topology_per_structure
from atlasreg.spatial.grid import Grid
from atlasreg.spatial.transforms import compose_transform


def _radius_2d(shape=(24, 24)):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return np.hypot(yy - (shape[0] - 1) / 2, xx - (shape[1] - 1) / 2)


def test_ring_has_one_component_and_one_hole():
    r = _radius_2d()
    lab = ((r >= 4) & (r <= 8)).astype(np.int64) * 2
    assert topology_per_structure(lab, [0, 2]) == {2: {"components": 1, "holes": 1}}


def test_two_discs_and_absent_label():
    lab = np.zeros((20, 30), dtype=np.int64)
    yy, xx = np.mgrid[:20, :30]
    lab[np.hypot(yy - 10, xx - 7) < 4] = 1
    lab[np.hypot(yy - 10, xx - 22) < 4] = 1
    out = topology_per_structure(lab, [0, 1, 3])
    assert out[1] == {"components": 2, "holes": 0}
    assert out[3] == {"components": 0, "holes": 0}


def test_diagonal_wall_encloses_with_complementary_connectivity():
    # Diamond outline of 1-voxel diagonal steps: 8-connected foreground -> one hole (4-conn background).
    lab = np.zeros((9, 9), dtype=np.int64)
    for k in range(4):
        lab[k, 4 + k] = lab[k, 4 - k] = lab[8 - k, 4 + k] = lab[8 - k, 4 - k] = 1
    lab[4, 0] = lab[4, 8] = 1
    assert topology_per_structure(lab, [0, 1])[1] == {"components": 1, "holes": 1}


def test_hole_cut_by_border_and_filled_by_other_label():
    r = _radius_2d()
    lab = ((r >= 4) & (r <= 8)).astype(np.int64)
    lab[r < 4] = 2  # the hole filled by another structure still counts
    assert topology_per_structure(lab, [0, 1, 2]) == {1: {"components": 1, "holes": 1},
                                                      2: {"components": 1, "holes": 0}}
    open_ring = lab[:, :12]  # the ring cut open by the border: the enclosed region touches the border
    assert count_holes(open_ring == 1) == 0


def test_hollow_ball_has_one_cavity_and_solid_ball_none():
    zz, yy, xx = np.mgrid[:16, :16, :16]
    r = np.sqrt((zz - 7.5) ** 2 + (yy - 7.5) ** 2 + (xx - 7.5) ** 2)
    hollow = ((r >= 3) & (r <= 6)).astype(np.int64)
    assert topology_per_structure(hollow, [0, 1])[1] == {"components": 1, "holes": 1}
    assert topology_per_structure((r <= 6).astype(np.int64), [0, 1])[1] == {"components": 1, "holes": 0}


def test_topology_rejects_bad_input():
    with pytest.raises(ValueError):
        topology_per_structure(np.zeros(5, dtype=int), [0, 1])
    with pytest.raises(ValueError):
        topology_per_structure(np.zeros((5, 5), dtype=int), [])


def test_jacobian_statistics_identity_and_folded_map():
    grid = Grid.centred((10, 12), (1.5, 2.0))
    ident = grid.points()
    stats = jacobian_statistics(ident, grid)
    assert stats["fraction_nonpositive"].tolist() == [0.0]
    assert stats["std_log_jacobian"][0] == pytest.approx(0.0, abs=1e-6)
    assert stats["n_voxels"][0] == 120
    folded = ident.clone()
    folded[..., 0] = -folded[..., 0]  # mirror x: det J = -1 everywhere
    stats = jacobian_statistics(torch.cat([ident, folded]), grid)
    assert stats["fraction_nonpositive"].tolist() == [0.0, 1.0]
    assert np.isnan(stats["std_log_jacobian"][1])


def test_jacobian_statistics_mask_and_smooth_svf():
    size, spacing = (16, 16), (1.0, 1.0)
    grid = Grid.centred(size, spacing)
    ident = grid.points()
    half = ident.clone()
    half[:, :, :8, 0] = -half[:, :, :8, 0]  # mirror the left half only
    mask = torch.zeros(1, 1, *size, dtype=torch.bool)
    mask[..., :, 10:] = True  # right part, away from the seam
    stats = jacobian_statistics(half, grid, mask=mask)
    assert stats["fraction_nonpositive"][0] == 0.0 and stats["n_voxels"][0] == 16 * 6
    empty = jacobian_statistics(half, grid, mask=torch.zeros(1, *size))
    assert np.isnan(empty["fraction_nonpositive"][0])
    with pytest.raises(ValueError):
        jacobian_statistics(half, grid, mask=torch.ones(1, 2, *size))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    v = torch.stack([torch.sin(3 * yy), torch.cos(2 * xx)])[None] * 1.5
    tr = compose_transform(v, None, None, grid)
    stats = jacobian_statistics(tr.forward_points(), grid)
    assert stats["fraction_nonpositive"][0] == 0.0
    assert 0.0 < stats["std_log_jacobian"][0] < 1.0
