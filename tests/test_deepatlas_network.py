"""atlasreg.deepatlas.network: the coordinate network's output range and shapes in 2D and 3D, and the
staged switching of its multi-resolution heads (DeepATLAS Secs. 2.2.1, 5.2.3)."""

from __future__ import annotations

import pytest
import torch

from atlasreg.deepatlas.coordinates import identity_coordinates, normalised_to_voxels, resize
from atlasreg.deepatlas.network import CoordinateNet, level_sizes

SIZES = {2: (33, 29), 3: (17, 15, 13)}  # odd sizes: levels of ceil(n / 2)


pytestmark = pytest.mark.usefixtures("one_thread")


def small_net(ndim: int, active_levels: int | None = None) -> CoordinateNet:
    torch.manual_seed(0)
    return CoordinateNet(ndim, 1, channels=(4, 8, 16), head_channels=8, active_levels=active_levels)


def blobs(size) -> torch.Tensor:
    """Two exams (N = 2): two Gaussian blobs, and the same mirrored."""
    u = identity_coordinates(size)
    x = (torch.exp(-((u - 0.2) ** 2).sum(1, keepdim=True) / 0.1)
         + 0.5 * torch.exp(-((u + 0.3) ** 2).sum(1, keepdim=True) / 0.05))
    return torch.cat([x, x.flip(-1)], 0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_output_is_a_coordinate_map_in_the_unit_cube_at_every_level(ndim):
    net = small_net(ndim)
    size = SIZES[ndim]
    x = 1000.0 * torch.randn(2, 1, *size)  # a wild input still maps into [-1, 1]^D (the tanh head)
    c = net(x)
    assert c.shape == (2, ndim, *size)
    assert float(c.detach().abs().max()) <= 1.0 and torch.isfinite(c).all()
    maps = net.forward_levels(x)
    assert [tuple(m.shape[2:]) for m in maps] == level_sizes(size, 2)[::-1]  # c_2, c_1, c_0
    c.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("ndim", [2, 3])
def test_active_levels_run_only_the_coarsest_heads(ndim):
    net = small_net(ndim, active_levels=1)
    x = blobs(SIZES[ndim])
    coarse = net(x, full_resolution=False)
    assert tuple(coarse.shape[2:]) == level_sizes(SIZES[ndim], 2)[2]
    full = net(x)
    assert tuple(full.shape[2:]) == SIZES[ndim]
    assert torch.allclose(full, resize(coarse, SIZES[ndim]))  # 5.2.3: upsampled to full resolution
    full.sum().backward()
    used = {id(p) for p in net.level_parameters(2)}
    for level in (0, 1):  # heads and decoder blocks of inactive levels take no part
        for p in [*net.heads[level].parameters(), *net.backbone.decoder[level].parameters()]:
            assert id(p) not in used and p.grad is None
    with pytest.raises(ValueError, match="active_levels"):
        net.active_levels = 4
    # each parameter belongs to exactly one level (what a level's warm-up trains, the others keep)
    per_level = [{id(p) for p in net.level_parameters(level)} for level in range(3)]
    assert sum(map(len, per_level)) == len(set().union(*per_level)) == len(list(net.parameters()))


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_new_head_starts_as_a_zero_residual_and_its_warmup_reproduces_the_upsampled_previous_level(ndim):
    """5.2.3. Switched on, the new level's features f_l are exactly 0 (its gate is 0): its output does not
    depend on its head's weights. It is not yet equal to the upsampled previous output (the shared tanh
    block does not commute with upsampling: measured 3.6 voxels max in 2D (24 x 20), 1.7 in 3D
    (12 x 10 x 11), with this random network). The paper's warm-up, training only the new level's
    parameters to reproduce the upsampled previous level, brings the difference below 0.2 voxel max
    and 0.02 voxel mean (measured after 6 L-BFGS steps: 2D 0.134 / 0.013, 3D 0.074 / 0.012 voxel),
    leaving every other weight and the previous level's output unchanged."""
    net = small_net(ndim, active_levels=1)
    x = blobs({2: (24, 20), 3: (12, 10, 11)}[ndim])
    previous = net(x, full_resolution=False).detach()
    net.active_levels = 2
    c1 = net.forward_levels(x)[-1].detach()
    head = {k: v.clone() for k, v in net.heads[1].state_dict().items()}
    with torch.no_grad():
        for p in net.heads[1].parameters():
            p.add_(torch.randn_like(p))
    assert torch.equal(net.forward_levels(x)[-1], c1)  # f_1 = 0 exactly
    net.heads[1].load_state_dict(head)

    def difference() -> torch.Tensor:
        maps = net.forward_levels(x)
        assert torch.equal(maps[0], previous)
        return normalised_to_voxels(maps[1] - resize(maps[0], maps[1].shape[2:]), maps[1].shape[2:]).detach().abs()

    assert float(difference().max()) > 1.0
    trained = net.level_parameters()
    frozen = [p for p in net.parameters() if all(p is not q for q in trained)]
    kept = [p.detach().clone() for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.LBFGS(trained, lr=1.0, max_iter=20, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = net.head_warmup_loss(x)
        loss.backward()
        return loss

    for _ in range(6):
        opt.step(closure)
    err = difference()
    assert float(err.max()) < 0.2 and float(err.mean()) < 0.02
    assert all(torch.equal(p, k) for p, k in zip(frozen, kept))


def test_bad_inputs_and_settings_are_refused():
    net = small_net(2)
    with pytest.raises(ValueError, match=r"expected input \(N, 1"):
        net(torch.zeros(1, 2, 16, 16))
    with pytest.raises(ValueError, match="too small"):
        net(torch.zeros(1, 1, 16, 3))  # 3 -> 2 -> 1 voxel at the deepest level
    with pytest.raises(ValueError, match="warm-up needs"):
        CoordinateNet(2, 1, (4, 8), 4, active_levels=1).head_warmup_loss(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="ndim"):
        CoordinateNet(4)
