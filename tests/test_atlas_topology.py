import numpy as np
import pytest
import torch
from scipy import ndimage

from atlasreg.atlas_topology import connect_structures, connected_atlas, fitted_atlas
from atlasreg.evaluation.topology import topology_per_structure


def components(indices, label):
    return ndimage.label(indices == label, ndimage.generate_binary_structure(indices.ndim, indices.ndim))[1]


def with_background(p):
    """Probabilities (C, *S) whose channel 0 takes what the structures leave."""
    p[0] = 1.0 - p[1:].sum(0)
    return p


def test_a_broken_bar_is_joined_along_its_most_probable_path_and_a_far_speck_merges_into_its_surroundings():
    """Structure 1: a bar cut in two (3 voxels missing), its probability a ridge along the whole bar;
    it is joined by exactly the 3 missing voxels. Structure 2: a block and a one-voxel speck inside
    structure 3, 12 voxels away: a bridge would add more voxels than the speck has, so the speck takes
    the surrounding label 3 and no new component of any structure appears."""
    indices = np.zeros((12, 20, 30), dtype=np.int64)
    p = np.zeros((4, 12, 20, 30), dtype=np.float32)
    indices[5, 10, 2:12] = 1
    indices[5, 10, 15:25] = 1
    p[1, 5, 10, 2:25] = 0.6
    p[1, 4, 10, 2:25] = 0.3       # a worse way round: above the bar
    indices[1:4, 1:4, 1:4] = 2
    p[2, 1:4, 1:4, 1:4] = 0.9
    indices[6:11, 14:19, 20:29] = 3
    p[3, 6:11, 14:19, 20:29] = 0.8
    indices[8, 16, 24] = 2
    p[2, 8, 16, 24] = 0.5
    p[3, 8, 16, 24] = 0.4
    out, changes = connect_structures(indices, with_background(p))
    assert changes == {1: {"restored": 0, "joined": 1, "dropped": 0}, 2: {"restored": 0, "joined": 0, "dropped": 1}}
    assert [components(out, c) for c in (1, 2, 3)] == [1, 1, 1]
    assert np.argwhere(out != indices).tolist() == [[5, 10, 12], [5, 10, 13], [5, 10, 14], [8, 16, 24]]
    assert out[8, 16, 24] == 3
    assert indices[5, 10, 12] == 0    # the input is not changed


def test_a_structure_the_argmax_lost_is_restored_from_its_probabilities_and_an_absent_one_stays_absent():
    """Structure 1 is thin and blurred: the background wins every voxel, but its soft volume is 8
    voxels; it comes back as its 8 most probable voxels (a line). Structure 2 has no probability
    anywhere (a label of the set that no training case holds) and stays absent. 2D: the same code."""
    p = np.zeros((3, 16, 16), dtype=np.float32)
    p[1, 8, 4:12] = 0.4
    p[1, 7, 4:12] = 0.3
    p[1, 9, 4:12] = 0.3
    p = with_background(p)
    indices = p.argmax(0)
    assert not (indices == 1).any()
    out, changes = connect_structures(indices, p, spacing=(0.5, 0.5))
    assert changes == {1: {"restored": 1, "joined": 0, "dropped": 0}}
    assert np.argwhere(out == 1).tolist() == [[8, x] for x in range(4, 12)]
    assert not (out == 2).any()
    assert topology_per_structure(out, [0, 1, 2])[1]["components"] == 1


def test_connect_structures_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="do not match"):
        connect_structures(np.zeros((4, 4), dtype=int), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="do not match"):
        connect_structures(np.zeros(4, dtype=int), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="spacing"):
        connect_structures(np.zeros((4, 4), dtype=int), np.zeros((2, 4, 4)), spacing=(1.0, 1.0, 1.0))


def fragmented_atlas():
    """(1, 3, 16, 24) atlas: structure 1 a bar whose middle the background wins (probability 0.45)."""
    p = np.zeros((3, 16, 24), dtype=np.float32)
    p[1, 8, 3:21] = 0.9
    p[1, 8, 10:14] = 0.45
    p[2, 2:5, 2:5] = 1.0
    return torch.from_numpy(with_background(p))[None]


def test_the_connected_atlas_keeps_the_soft_boundaries_and_its_argmax_is_one_component_per_structure():
    atlas = fragmented_atlas()
    assert components(atlas[0].argmax(0).numpy(), 1) == 2
    out = connected_atlas(atlas, (2.0, 2.0))
    labels = out[0].argmax(0).numpy()
    assert components(labels, 1) == 1 and components(labels, 2) == 1
    assert torch.allclose(out.sum(1), torch.ones(1, 16, 24))
    assert torch.allclose(out, 0.5 * (atlas + torch.nn.functional.one_hot(torch.from_numpy(labels), 3)
                                      .movedim(-1, 0)[None].float()))
    assert out.dtype == atlas.dtype


def test_fitted_atlas_is_the_module_atlas_or_its_connected_version_computed_once_per_atlas(monkeypatch):
    import atlasreg.atlas_topology as topology
    from atlasreg.spatial.grid import Grid

    class Net:
        grid = Grid.centred((16, 24), (2.0, 2.0))

    class Module:
        net = Net()

        def __init__(self):
            self.atlas_labelmap = fragmented_atlas()

    module, calls = Module(), []
    original = topology.connected_atlas
    monkeypatch.setattr(topology, "connected_atlas", lambda a, s: calls.append(s) or original(a, s))
    assert fitted_atlas(module, {"atlas_topology": "none"}) is module.atlas_labelmap
    first = fitted_atlas(module, {"atlas_topology": "connected"})
    assert fitted_atlas(module, {"atlas_topology": "connected"}) is first
    assert calls == [(2.0, 2.0)]
    module.atlas_labelmap.mul_(1.0)  # an atlas update (in place, as training does): computed again
    fitted_atlas(module, {"atlas_topology": "connected"})
    assert len(calls) == 2
    with pytest.raises(ValueError, match="atlas_topology"):
        fitted_atlas(module, {"atlas_topology": "fused"})
