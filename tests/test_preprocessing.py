import numpy as np
import pytest
import torch

from atlasreg.data.cases import Preprocessing, intensity_stats, labels_on_grid
from atlasreg.data.preprocessing import indices_to_values, one_hot, values_to_indices
from atlasreg.spatial.grid import Grid
from atlasreg.spatial.transforms import resample


def test_one_hot_over_declared_labels_keeps_channels_for_missing_structures():
    lab = np.array([[0, 3], [3, 0]])
    idx = values_to_indices(lab, [0, 1, 2, 3])  # structures 1 and 2 absent: channels do not shift
    oh = one_hot(torch.from_numpy(idx)[None], 4)
    assert oh.shape == (1, 4, 2, 2) and oh[0, 3, 0, 1] == 1 and oh[0, 1].sum() == 0
    assert np.array_equal(indices_to_values(idx, [0, 1, 2, 3]), lab)
    with pytest.raises(ValueError):
        values_to_indices(np.array([[7]]), [0, 1])


def _normalised(a, **kw):
    prep = Preprocessing((0, 1), (8, 8), (1.0, 1.0), 2, **kw)
    lo, hi, scale, offset = intensity_stats(a, prep)
    return np.clip(a, lo, hi) * scale + offset


def test_normalisation():
    a = _normalised(np.arange(10.0))
    assert abs(a.mean()) < 1e-6 and abs(a.std() - 1) < 1e-6
    assert np.all(_normalised(np.ones(5)) == 0)
    # z-score inside the foreground (skull-stripped MRI): the brain voxels get mean 0 and SD 1
    brain = np.concatenate([np.zeros(50), np.linspace(10.0, 20.0, 50)])
    b = _normalised(brain, intensity="zscore_foreground")[50:]
    assert abs(b.mean()) < 1e-5 and abs(b.std() - 1) < 1e-5
    # CT: a window clipped and rescaled to [0, 1]
    ct = _normalised(np.array([-1000.0, -100.0, 0.0, 200.0, 3000.0]), intensity="rescale", clip_range=(-100.0, 200.0))
    assert np.allclose(ct, [0.0, 0.0, 1 / 3, 1.0, 1.0])
    # percentile clipping: one bright outlier does not set the scale
    spiky = np.concatenate([np.linspace(0.0, 1.0, 999), [1000.0]])
    assert _normalised(spiky, clip_percentiles=(0.5, 99.5)).max() < 2.0


def test_soft_round_trip_model_grid_loses_little():
    native = Grid((128, 128), (1.0, 1.0))
    yy, xx = np.mgrid[:128, :128]
    disc = (((yy - 60) ** 2 + (xx - 70) ** 2) < 30 ** 2).astype(np.int64)
    placed = native.resampled((64, 64), (2.0, 2.0))
    model = labels_on_grid(disc, 2, native, placed)
    assert torch.allclose(model.sum(1), torch.ones(1, 64, 64))
    back = resample(model, placed, native).argmax(1)[0].numpy()
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
