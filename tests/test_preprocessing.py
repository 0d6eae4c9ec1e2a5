import numpy as np
import pytest
import torch

from atlasreg.data.preprocessing import (
    indices_to_values, one_hot, to_model_grid, to_native_grid, values_to_indices, zero_mean_unit_variance,
)
from atlasreg.spatial.grid import Grid


def test_one_hot_over_declared_labels_keeps_channels_for_missing_structures():
    lab = np.array([[0, 3], [3, 0]])
    idx = values_to_indices(lab, [0, 1, 2, 3])  # structures 1 and 2 absent: channels do not shift
    oh = one_hot(torch.from_numpy(idx)[None], 4)
    assert oh.shape == (1, 4, 2, 2) and oh[0, 3, 0, 1] == 1 and oh[0, 1].sum() == 0
    assert np.array_equal(indices_to_values(idx, [0, 1, 2, 3]), lab)
    with pytest.raises(ValueError):
        values_to_indices(np.array([[7]]), [0, 1])


def test_normalisation():
    a = zero_mean_unit_variance(np.arange(10.0))
    assert abs(a.mean()) < 1e-6 and abs(a.std() - 1) < 1e-6
    assert np.all(zero_mean_unit_variance(np.ones(5)) == 0)


def test_soft_round_trip_model_grid_loses_little():
    native = Grid((128, 128), (1.0, 1.0))
    yy, xx = np.mgrid[:128, :128]
    disc = (((yy - 60) ** 2 + (xx - 70) ** 2) < 30 ** 2).astype(np.int64)
    oh = one_hot(torch.from_numpy(disc)[None], 2)
    model_grid = Grid.centred((64, 64), (2.0, 2.0))
    model = to_model_grid(oh, native, model_grid)
    back = to_native_grid(model, model_grid, native).argmax(1)[0].numpy()
    dice = 2 * (back & disc).sum() / (back.sum() + disc.sum())
    assert dice > 0.995


def test_largest_components_keeps_the_biggest_piece_per_structure():
    from atlasreg.data.preprocessing import largest_components

    a = np.zeros((12, 12), np.int64)
    a[1:4, 1:4] = 1          # 9 voxels
    a[6:10, 6:10] = 1        # 16 voxels: kept
    a[10, 10] = 1            # touches the big one diagonally: kept with full connectivity
    a[1:3, 8:11] = 2         # 6 voxels: kept
    a[10, 0] = 2             # 1 voxel: removed
    out = largest_components(a, 3)
    assert (out == 1).sum() == 17 and out[10, 10] == 1 and out[2, 2] == 0
    assert (out == 2).sum() == 6 and out[10, 0] == 0
    b = np.zeros((4, 6, 6), np.int64)  # 3D, one structure absent
    b[0:2, 0:2, 0:2] = 1
    b[3, 5, 5] = 1
    assert (largest_components(b, 3) == 1).sum() == 8
