"""The two warps of the DeepATLAS loss (Secs. 2.3, 5.1.1, 5.1.2, 5.1.5): the explicit warp Phi_E of a
learnable atlas X onto an exam (Eqs. 3, 8, 13) and the implicit warp Phi_I between two exams from their
coordinate maps (Eqs. 1, 4-7).

Conventions: :mod:`atlasreg.deepatlas.coordinates` (coordinate maps ``(N, D, *spatial)``, channels in
ITK order, corner-aligned normalised units, ``grid_sample(..., align_corners=True)``).

Explicit warp. ``Phi_E = c_n`` (5.1.2): the atlas X, a tensor on the template, is sampled at the
exam's coordinates, ``X o Phi_E`` (N, C, *exam), and compared with the exam (Eq. 8; with auxiliary
channels ``X'``, Eq. 13). :class:`Atlas` holds X as one learnable tensor, at twice the exam resolution
by default (5.1.2), optionally seeded from one exam (5.1.2, 5.2.5).

Implicit warp. ``Phi_I = c_q o c_p^-1`` (Eq. 1) aligns exam p with exam q: for every voxel y of q,
``Phi_I(y)`` is the position in p (p's normalised coordinates) with the same template coordinate,
``c_p(Phi_I(y)) = c_q(y)``, so that ``x_p o Phi_I ~ x_q`` (Eq. 4). It is computed by the recursive
approximation of Eqs. 5-7: starting from the identity,

    Phi_I(t_n) = Phi_I(t_{n-1}) + D_q (c_q - c_p o Phi_I(t_{n-1}))          (Eqs. 6-7; Eq. 5 is n = 0)

a fixed-point iteration whose only operations are linear resampling and a D x D matrix product, hence
differentiable in c_p and c_q (:func:`implicit_warp`). Phi_I is returned as a point map on q's grid in
p's normalised coordinates (``(N, D, *spatial_q)``, like a coordinate map), so ``x_p o Phi_I`` is
:func:`sample_at` ``(x_p, Phi_I)``; :func:`overlap_mask` marks the voxels of q whose match lies inside
p (the "overlapping regions", 2.3).

Choices where the paper is ambiguous:

* *D_q, "the direction cosine matrix of c_q ... the mean of all local Jacobian matrices"*, multiplies a
  template-space difference to give an exam-space step, so it must act as the inverse of the mean
  Jacobian ``dc_q/du``: for a rotation (a true direction cosine matrix) the paper's row-vector product
  ``(c_q - c_p) . D`` is exactly ``R^T`` = ``R^-1``, but coordinate maps also scale (an exam that shows
  part of the template has a mean Jacobian well below 1), and with the transpose the error then
  shrinks only by ``1 - s^2`` per step. We use the inverse of the mean Jacobian, damped
  (``(J^T J + eps I)^-1 J^T``, eps = 1e-4) so that a degenerate map (an untrained network's) gives
  bounded steps; for a well-conditioned map this is the inverse (the chord method of the equation
  ``c_p(Phi) = c_q``). ``preconditioner='transpose'`` gives the literal reading, to compare
  (tests/test_deepatlas_warps.py measures both).
* *Gradients through D_q*: D_q is held fixed (detached). The fixed point ``c_p o Phi_I = c_q`` does not
  depend on it, and the terms it would add to the gradient are proportional to the residual.
* *Gradients through the iteration* (``gradient``; the paper: "fully differentiable"): ``'unrolled'``
  differentiates all the steps; ``'last'`` runs all but the last step without gradients and
  differentiates the last one only, ``Phi = Phi* + D_q (c_q - c_p o Phi*)`` at the (nearly) converged
  Phi*: its gradient ``D_q (dc_q - dc_p o Phi*)`` is the implicit-function gradient
  ``J_p(Phi)^-1 (dc_q - dc_p o Phi)`` with the local inverse Jacobian replaced by D_q (the chord
  method's), as deep-equilibrium models do. The values are the same. Where the maps are far from
  regular (training from an untrained network), the unrolled gradient multiplies the steps'
  Jacobians ``I - D_q J_p`` and can grow with the steps: on 128 x 128 chest X-rays (5 levels, batch
  8, after the seed crops of Sec. 5.2.5) training with it folded the maps (8-10% of the voxels
  folded, 64% of the voxels converged to 1 voxel after 100 steps), with 'last' none folded and 98.9%
  converged (the paper: 99%), so DeepATLAS training uses 'last'
  (:mod:`atlasreg.deepatlas.method`).
* *Steps*: ``steps`` counts every evaluation of Eq. 7 including the first (Eq. 5); 20 by default
  ("t = 20 recursive updates", 5.1.1).
* *Outside exam p* the coordinate map is extended by its border value (grid_sample's 'border'
  padding); points of q with no match in p drift outside [-1, 1] and :func:`overlap_mask` drops them.
* *The mean Jacobian* is taken over the whole map, or over a given foreground mask of q (5.1.6).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .coordinates import check_coordinates, identity_coordinates, jacobian, normalised_to_voxels, resize, sample_at

__all__ = ["explicit_warp", "Atlas", "mean_jacobian", "implicit_warp", "overlap_mask", "implicit_residual"]

_DAMPING = 1e-4


def explicit_warp(atlas: torch.Tensor, c: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """``X o Phi_E``: the atlas (1 or N, C, *size_t) sampled at the exam's coordinate map c (N, D, *S)
    by linear interpolation with corner alignment (Eqs. 3, 8; with auxiliary channels Eq. 13).
    Returns (N, C, *S); differentiable in both. Raises ValueError if the dimensions disagree."""
    return sample_at(atlas, c, mode=mode, padding="border")


class Atlas(nn.Module):
    """The learnable atlas X (5.1.2): one tensor ``(1, channels, *size)`` on the template, trained with
    the network through :func:`explicit_warp`. Channel 0 is the image; further channels are the
    auxiliary maps of 5.1.5 (image gradient, masks), learnt the same way (Eq. 13).

    ``size``: array order, >= 2 voxels per axis; :meth:`for_exams` gives twice the exam size, the
    paper's choice. ``init``: the constant initial value. Raises ValueError for a bad size or channel
    count.
    """

    def __init__(self, channels: int, size: Sequence[int], init: float = 0.0):
        super().__init__()
        size = tuple(int(n) for n in size)
        if channels < 1 or len(size) not in (2, 3) or any(n < 2 for n in size):
            raise ValueError(f"an atlas needs >= 1 channel and a 2D/3D size with >= 2 voxels per axis, "
                             f"got channels={channels}, size={size}")
        self.tensor = nn.Parameter(torch.full((1, channels, *size), float(init)))

    @classmethod
    def for_exams(cls, exam_size: Sequence[int], channels: int = 1, factor: int = 2, init: float = 0.0) -> "Atlas":
        """An atlas at `factor` times the exam size per axis (paper: 2, "double the resolution", 5.1.2)."""
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        return cls(channels, tuple(factor * int(n) for n in exam_size), init)

    @property
    def size(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape[2:])

    @torch.no_grad()
    def seed(self, exam: torch.Tensor) -> None:
        """Seed the atlas with one representative exam (5.1.2, 5.2.5): its channels (1 or all of the
        atlas's, (C, *S) or (1, C, *S)) resampled linearly onto the atlas grid, corner-aligned, i.e. as
        seen through the identity coordinate map. Raises ValueError for a mismatched exam."""
        if exam.dim() == self.tensor.dim() - 1:
            exam = exam.unsqueeze(0)
        if exam.dim() != self.tensor.dim() or exam.shape[0] != 1 or exam.shape[1] > self.tensor.shape[1]:
            raise ValueError(f"seed exam of shape {tuple(exam.shape)} does not fit an atlas {tuple(self.tensor.shape)}")
        seeded = resize(exam.to(self.tensor), self.size)
        self.tensor[:, : exam.shape[1]] = seeded

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """``X o c``: :func:`explicit_warp` of the atlas at the coordinate map c (N, D, *S)."""
        return explicit_warp(self.tensor, c)


def mean_jacobian(c: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean local Jacobian ``dc/du`` of a coordinate map over its voxels (5.1.1), (N, D, D), dimensionless
    (:func:`atlasreg.deepatlas.coordinates.jacobian`); with `mask` (N or 1, 1, *S) a weighted mean."""
    jac = jacobian(c)  # (N, *S, D, D)
    if mask is None:
        return jac.flatten(1, -3).mean(1)
    w = mask.expand(c.shape[0], 1, *c.shape[2:]).flatten(1).to(jac)  # (N, P)
    return torch.einsum("np,npij->nij", w, jac.flatten(1, -3)) / w.sum(1).clamp_min(1e-12)[:, None, None]


def _step_matrix(c_q: torch.Tensor, mask: torch.Tensor | None, preconditioner: str) -> torch.Tensor:
    J = mean_jacobian(c_q.detach(), mask)
    if preconditioner == "transpose":
        return J.transpose(1, 2)
    if preconditioner == "inverse":
        eye = torch.eye(J.shape[-1], device=J.device, dtype=J.dtype)
        return torch.linalg.solve(J.transpose(1, 2) @ J + _DAMPING * eye, J.transpose(1, 2))
    raise ValueError(f"preconditioner must be 'inverse' or 'transpose', got {preconditioner!r}")


def implicit_warp(c_p: torch.Tensor, c_q: torch.Tensor, steps: int = 20, mask: torch.Tensor | None = None,
                  preconditioner: str = "inverse", gradient: str = "unrolled") -> torch.Tensor:
    """The implicit warp ``Phi_I = c_q o c_p^-1`` (Eq. 1) by the recursive approximation of Eqs. 5-7.

    c_p: (N, D, *S_p) coordinate map of the moving exam p; c_q: (N, D, *S_q) of the fixed exam q (the
    sizes may differ). steps: evaluations of Eq. 7 (the first is Eq. 5), >= 1. mask: optional (N or 1,
    1, *S_q) weights for the mean Jacobian D_q. Returns Phi_I (N, D, *S_q): for every voxel of q the
    point of p (p's corner-aligned normalised coordinates, ITK order) with, at convergence,
    ``c_p(Phi_I) = c_q``; ``x_p o Phi_I`` is ``sample_at(x_p, Phi_I)`` (Eq. 4). Differentiable in c_p and
    c_q (D_q held fixed; see the module docstring for this and the choice of D_q), through every step
    (``gradient='unrolled'``) or through the last one at the fixed point (``'last'``: the same values,
    the chord-method gradient; module docstring). Raises ValueError for malformed maps, a batch
    mismatch, steps < 1 or an unknown preconditioner or gradient.
    """
    d = check_coordinates(c_p, "c_p")
    if check_coordinates(c_q, "c_q") != d or c_p.shape[0] != c_q.shape[0]:
        raise ValueError(f"c_p {tuple(c_p.shape)} and c_q {tuple(c_q.shape)} differ in batch or dimension")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if gradient not in ("unrolled", "last"):
        raise ValueError(f"gradient must be 'unrolled' or 'last', got {gradient!r}")
    M = _step_matrix(c_q, mask, preconditioner)
    phi = identity_coordinates(c_q.shape[2:], c_q.device, c_q.dtype).expand_as(c_q)
    with torch.set_grad_enabled(torch.is_grad_enabled() and gradient == "unrolled"):
        for _ in range(steps - 1):
            phi = phi + torch.einsum("nij,nj...->ni...", M, c_q - sample_at(c_p, phi))
    return phi + torch.einsum("nij,nj...->ni...", M, c_q - sample_at(c_p, phi))


def implicit_residual(c_p: torch.Tensor, c_q: torch.Tensor, phi: torch.Tensor, mask: torch.Tensor | None = None,
                      preconditioner: str = "inverse") -> torch.Tensor:
    """The update Eq. 7 would still make, ``D_q (c_q - c_p o Phi_I)``, in voxels of exam p (N, D, *S_q):
    the paper's convergence criterion (5.1.1: below 1 voxel at 99% of the voxels after 20 steps)."""
    M = _step_matrix(c_q, mask, preconditioner)
    step = torch.einsum("nij,nj...->ni...", M, c_q - sample_at(c_p, phi))
    return normalised_to_voxels(step, c_p.shape[2:])


def overlap_mask(phi: torch.Tensor) -> torch.Tensor:
    """(N, 1, *S) float mask of the points of a warp (N, D, *S) that lie inside [-1, 1]^D (the voxels of
    q that have a match in exam p)."""
    check_coordinates(phi, "warp")
    return (phi.detach().abs() <= 1.0).all(dim=1, keepdim=True).to(phi.dtype)
