import math

import torch

from atlasreg.losses import bending_energy, diffusion_regulariser
from atlasreg.spatial.grid import Grid


def physical_field(size, spacing):
    """u(x, y) = (3 sin(2 pi x / 40), 2 cos(2 pi y / 40)) mm on a 64 mm field of view."""
    p = Grid.centred(size, spacing).points()[0]
    k = 2 * math.pi / 40.0
    return torch.stack([3 * torch.sin(k * p[..., 0]), 2 * torch.cos(k * p[..., 1])])[None]


def test_diffusion_regulariser_is_resolution_independent():
    coarse = diffusion_regulariser(physical_field((32, 32), (2.0, 2.0)), (2.0, 2.0))
    fine = diffusion_regulariser(physical_field((128, 128), (0.5, 0.5)), (0.5, 0.5))
    # Analytic mean of (du_x/dx)^2 + (du_y/dy)^2 over whole periods would be (9 + 4) k^2 / 2.
    k = 2 * math.pi / 40.0
    analytic = 13 * k ** 2 / 2
    assert abs(float(coarse) - float(fine)) < 0.05 * float(fine)
    assert abs(float(fine) - analytic) < 0.15 * analytic


def test_regularisers_zero_for_translation_and_per_case_reduction():
    u = torch.zeros(3, 2, 16, 16)
    u[:, 0] = 5.0
    assert float(diffusion_regulariser(u, (1.0, 1.0))) == 0.0
    assert float(bending_energy(u, (1.0, 1.0))) == 0.0
    u[1] += physical_field((16, 16), (1.0, 1.0))[0]
    per_case = diffusion_regulariser(u, (1.0, 1.0), reduction="per_case")
    assert per_case.shape == (3,) and per_case[0] == 0 and per_case[1] > 0
    assert torch.isclose(per_case.mean(), diffusion_regulariser(u, (1.0, 1.0)))


def test_bending_energy_zero_for_affine_field():
    p = Grid.centred((16, 16, 16), (1.0, 2.0, 1.5)).points()[0]
    u = (p @ torch.tensor([[0.1, 0.2, 0.0], [0.0, -0.1, 0.3], [0.2, 0.0, 0.1]])).movedim(-1, 0)[None]
    assert float(bending_energy(u, (1.0, 2.0, 1.5))) < 1e-9
    assert float(diffusion_regulariser(u, (1.0, 2.0, 1.5))) > 0


def test_folding_penalty_known_values_2d_and_3d():
    """folding_penalty = mean(max(0, margin - det J)) of a point map x + u(x): 0 for a translation and
    for a mild stretch (det 1.2); for a linear field its central differences are exact, so a reflection
    along x (u_x = -2 x: det -1) costs margin + 1 everywhere, and a compression to det 0.05 costs
    margin - 0.05; in 3D a field that folds on part of the voxels costs less."""
    import pytest

    from atlasreg.losses import folding_penalty

    for d in (2, 3):
        grid = Grid.centred((6, 7, 5)[:d], (1.5, 0.8, 2.0)[:d])
        x = grid.points(dtype=torch.float64)                # (1, *size, D), components x, y[, z]
        assert float(folding_penalty(x + 3.0, grid)) == 0.0
        stretch = x.clone()
        stretch[..., 0] += 0.2 * x[..., 0]
        assert float(folding_penalty(stretch, grid)) == 0.0
        flip = x.clone()
        flip[..., 0] += -2.0 * x[..., 0]
        assert float(folding_penalty(flip, grid, margin=0.1)) == pytest.approx(1.1, abs=1e-9)
        squeeze = x.clone()
        squeeze[..., 0] += -0.95 * x[..., 0]
        assert float(folding_penalty(squeeze, grid, margin=0.1)) == pytest.approx(0.05, abs=1e-9)
    half = flip.clone()
    half[..., :2, :] = x[..., :2, :]  # the first two x columns (last array axis) do not fold
    inner = folding_penalty(half, grid, margin=0.1)
    assert 0.0 < float(inner) < 1.1
    with pytest.raises(ValueError, match="margin"):
        folding_penalty(flip, grid, margin=1.0)
