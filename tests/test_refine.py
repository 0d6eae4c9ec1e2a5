import pytest
import torch

from atlasreg.spatial.grid import Grid
from atlasreg.models.atlas_istn import AtlasISTN
from atlasreg.models.refine import refine_transforms


def square(n, lo, hi, size=32):
    lab = torch.zeros(n, 2, size, size)
    lab[:, 1, lo[0]:hi[0], lo[1]:hi[1]] = 1
    lab[:, 0] = 1 - lab[:, 1]
    return lab


def test_refinement_lowers_its_loss_and_leaves_the_network_untouched():
    torch.manual_seed(0)
    net = AtlasISTN(2, 2, Grid.centred((32, 32), (2.0, 2.0)))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    atlas = square(1, (10, 10), (22, 22))
    target = square(2, (12, 8), (26, 20))  # shifted and stretched square: the "ITN logits"
    tr, history = refine_transforms(net, target, atlas, iterations=30, lr=3e-3)
    assert history.shape == (31, 2)
    assert (history[-1] < 0.5 * history[0]).all()
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("variant,use_affine", [("svf", True), ("affine", True), ("affine_svf", False)])
def test_refinement_of_every_stn_variant(variant, use_affine):
    """SVF only and affine only (paper Table 4 ablations) and the affine part not yet started."""
    torch.manual_seed(0)
    net = AtlasISTN(2, 2, Grid.centred((32, 32), (2.0, 2.0)), stn_variant=variant)
    atlas = square(1, (10, 10), (22, 22))
    target = square(2, (12, 8), (26, 20))
    tr, history = refine_transforms(net, target, atlas, iterations=30, lr=3e-3, use_affine=use_affine)
    assert history.shape == (31, 2) and (history[-1] < history[0]).all()
    assert (tr.svf is None) == (variant == "affine")
    assert (tr.affine is None) == (variant == "svf" or not use_affine)


def test_batched_refinement_equals_refining_each_case_alone():
    torch.manual_seed(1)
    net = AtlasISTN(2, 2, Grid.centred((32, 32), (2.0, 2.0)))
    atlas = square(1, (10, 10), (22, 22))
    targets = torch.cat([square(1, (12, 8), (26, 20)), square(1, (6, 6), (18, 24))])
    tr_both, h_both = refine_transforms(net, targets, atlas, iterations=10, lr=3e-3)
    tr_one, h_one = refine_transforms(net, targets[1:], atlas, iterations=10, lr=3e-3)
    assert torch.allclose(h_both[:, 1], h_one[:, 0], rtol=1e-4, atol=1e-6)
    # Points in mm on a 64 mm field: float32 round-off of batched vs single convolutions, amplified by
    # 10 Adam steps, stays below 2 micrometres.
    assert torch.allclose(tr_both.inverse_points()[1], tr_one.inverse_points()[0], atol=2e-3)
