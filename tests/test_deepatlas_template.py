"""atlasreg.deepatlas.template: the template mask of Eq. 14 from one or a few labelled exams, its
propagation by the coordinate maps (DeepATLAS 3.2.1, 5.2.7) and the bounding-cube projection of 5.2.4."""

from __future__ import annotations

import math

import pytest
import torch

from atlasreg.deepatlas.coordinates import identity_coordinates
from atlasreg.deepatlas.template import crop, cube_affine, cube_vertices, propagate, template_mask
from atlasreg.errors import AtlasregError


pytestmark = pytest.mark.usefixtures("one_thread")


def coordinate_map(size, scale: float, angle: float, shift: float, wobble: float) -> torch.Tensor:
    """A smooth coordinate map of an exam: rotation, scale, shift and a sine wobble."""
    u = identity_coordinates(size)
    d = len(size)
    R = torch.eye(d)
    R[0, 0] = R[1, 1] = math.cos(angle)
    R[0, 1], R[1, 0] = -math.sin(angle), math.sin(angle)
    return scale * torch.einsum("ij,nj...->ni...", R, u) + shift + wobble * torch.sin(math.pi * u.roll(1, 1))


def structure(c: torch.Tensor) -> torch.Tensor:
    """The exam's mask of a structure fixed in the template: an ellipsoid around (0.05, ...)."""
    d = c.shape[1]
    radii = torch.tensor([0.35, 0.25, 0.3][:d]).view(1, d, *[1] * d)
    return (((c - 0.05) / radii).pow(2).sum(1, keepdim=True) <= 1).float()


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a * b).sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize("size", [(40, 36), (20, 18, 22)])
def test_template_from_one_case_reproduces_it_and_segments_another(size):
    """One-shot: M from one exam (template twice its resolution, 5.1.2) propagated back to that exam gives
    its mask (Dice 1.0; the fitted values differ from the mask by at most 0.01 in 2D, 0.02 in 3D:
    measured 0.0051 and 0.0167, the price of the membrane term), and segments a second exam whose
    coordinates differ (another rotation, scale and wobble): measured Dice 0.972 (2D) and 0.939 (3D),
    limited by the partial-volume steps of the binary mask at the exam's resolution."""
    c1, c2 = coordinate_map(size, 0.7, 0.2, 0.02, 0.03), coordinate_map(size, 0.8, -0.15, -0.04, 0.02)
    m1, m2 = structure(c1), structure(c2)
    M = template_mask(c1, m1, tuple(2 * n for n in size))
    assert M.shape == (1, 1, *(2 * n for n in size))
    assert dice(propagate(M, c1, threshold=0.5), m1) == 1.0
    assert float((propagate(M, c1) - m1).abs().max()) < (0.01 if len(size) == 2 else 0.02)
    assert dice(propagate(M, c2, threshold=0.5), m2) > (0.95 if len(size) == 2 else 0.92)


@pytest.mark.parametrize("size, template", [((7, 9), (5, 6)), ((4, 5, 6), (6, 3, 5))])
def test_sparse_sampling_matrix_is_sample_at(size, template):
    """The explicit sampling matrix of the template solver applies the same corner-aligned linear
    interpolation with border padding as sample_at (grid_sample), also at coordinates outside [-1, 1]."""
    from atlasreg.deepatlas.coordinates import sample_at
    from atlasreg.deepatlas.template import _sampling_matrix

    g = torch.Generator().manual_seed(1)
    c = 1.3 * (2 * torch.rand(2, len(size), *size, generator=g) - 1)   # some points outside the template
    x = torch.randn(1, 1, *template, generator=g)
    W = _sampling_matrix(c, template)
    expected = sample_at(x, c).flatten()
    assert float((torch.sparse.mm(W, x.reshape(-1, 1)).flatten() - expected).abs().max()) < 1e-5


def test_template_is_the_direct_solution_of_the_regularised_normal_equations():
    """The preconditioned conjugate gradients reach the minimiser of Eq. 14 + lambda ||grad M||^2: the
    dense normal equations (W^T w W + lambda G^T G) M = W^T w m, W the linear sampling at c (built column
    by column from unit images), G the forward differences, solved directly; a template larger than
    the exam has voxels no exam reaches (continued by the membrane term alone)."""
    from atlasreg.deepatlas.coordinates import sample_at

    size, template = (6, 5), (12, 10)
    c = coordinate_map(size, 0.7, 0.2, 0.02, 0.03)
    m = structure(c)
    weights = torch.rand(1, 1, *size, generator=torch.Generator().manual_seed(0)) + 0.5
    smoothness = 1e-2
    n = template[0] * template[1]
    W = torch.stack([sample_at(torch.eye(n)[j].view(1, 1, *template), c).flatten() for j in range(n)], 1)
    membrane = torch.zeros(n, n)    # G^T G, G the forward differences along each axis
    for axis in range(2):
        G = torch.stack([torch.diff(torch.eye(n)[j].view(1, 1, *template), dim=2 + axis).flatten()
                         for j in range(n)], 1)
        membrane += G.T @ G
    w = weights.flatten()
    A = W.T @ (w[:, None] * W) + smoothness * membrane
    expected = torch.linalg.solve(A.double(), (W.T @ (w * m.flatten())).double())
    M = template_mask(c, m, template, weights=weights, smoothness=smoothness, tol=1e-7)
    assert float((M.flatten().double() - expected).abs().max()) < 1e-4


def test_few_shot_template_and_several_structures():
    size = (32, 30)
    maps = torch.cat([coordinate_map(size, 0.7, 0.2, 0.02, 0.03), coordinate_map(size, 0.75, -0.1, -0.03, 0.02)])
    masks = torch.cat([structure(maps), structure(-maps)], 1)  # two structures, K = 2
    M = template_mask(maps, masks, (64, 60))
    assert M.shape == (1, 2, 64, 60)
    out = propagate(M, maps, threshold=0.5)
    for n in range(2):
        for k in range(2):
            assert dice(out[n, k], masks[n, k]) > 0.99  # measured 1.0
    with pytest.raises(ValueError, match="do not match"):
        template_mask(maps, masks[:1], (64, 60))
    with pytest.raises(ValueError, match="smoothness"):
        template_mask(maps, masks, (64, 60), smoothness=0.0)


@pytest.mark.parametrize("size", [(30, 26), (14, 12, 16)])
def test_bounding_cube_projection_inverts_an_affine_coordinate_map(size):
    """For c = A u + t, the least-squares map of 5.2.4 is u = A^-1 (c - t): the box's corners land where the
    exam shows them, and the crop resamples the exam on the box's grid."""
    d = len(size)
    c = coordinate_map(size, 0.6, 0.3, 0.1, 0.0)
    A_true = 0.6 * torch.tensor([[math.cos(0.3), -math.sin(0.3)], [math.sin(0.3), math.cos(0.3)]])
    if d == 3:
        A_true = torch.block_diag(A_true, torch.tensor([[0.6]]))
    lo, hi = [-0.2] * d, [0.3] * d
    A, t = cube_affine(c, lo, hi)
    inverse = torch.linalg.inv(A_true)
    assert torch.allclose(A[0], inverse, atol=1e-4)
    assert torch.allclose(t[0], -inverse @ torch.full((d,), 0.1), atol=1e-4)
    corners = cube_vertices(A, t, lo, hi)
    assert corners.shape == (1, 2 ** d, d)
    assert torch.allclose(corners[0, -1], inverse @ (torch.tensor(hi) - 0.1), atol=1e-4)
    # an exam whose intensity is a function of its template coordinates, cropped on the box
    image = torch.cos(3 * c[:, :1]) + c[:, -1:]
    cropped = crop(image, A, t, lo, hi, (12,) * d)
    box = torch.tensor(lo).view(1, d, *[1] * d) + (identity_coordinates((12,) * d) + 1) / 2 * 0.5
    # linear interpolation of the exam: measured max error 0.0025 (2D), 0.0077 (3D)
    assert (cropped - (torch.cos(3 * box[:, :1]) + box[:, -1:])).abs().max() < 0.02


def test_a_box_the_exam_does_not_show_is_an_error():
    c = coordinate_map((20, 20), 0.5, 0.0, 0.0, 0.0)  # the exam shows [-0.5, 0.5]^2 of the template
    with pytest.raises(AtlasregError, match="too few to project"):
        cube_affine(c, [0.7, 0.7], [0.9, 0.9])
    with pytest.raises(ValueError, match="minima below"):
        cube_affine(c, [0.3, 0.0], [0.1, 0.5])
