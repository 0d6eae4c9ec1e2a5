"""The DeepATLAS losses (Secs. 2.3, 5.1.3-5.1.6, 5.5.3): smoothness (Eqs. 10-11), feature-space
normalised cross-correlation (Eq. 9), the auxiliary image-gradient and mask channels (5.1.5, Eqs.
12-13), foreground masking (5.1.6) and the training mask (5.5.3).

Each loss is a pure function plus a thin :class:`torch.nn.Module` holding its options, like
:mod:`atlasreg.losses`. Every loss is to be MINIMISED. Shapes: images and feature maps ``(N, C,
*spatial)``; warps and coordinate maps ``(N, D, *spatial)`` (:mod:`atlasreg.deepatlas.coordinates`);
masks ``(N or 1, 1, *spatial)`` in [0, 1] on the fixed image's grid, never differentiated. ``reduction``:
``"mean"`` (a scalar, the mean over the batch of the per-case values) or ``"per_case"`` (``(N,)``).

Masking (5.1.6): each loss is "multiplied point-wise by a binary mask before aggregation"; here every
per-voxel term is weighted by the mask and averaged over the mask (a weighted mean), so the loss does
not scale with the foreground's size. A case whose mask is empty contributes 0.

Loss of a warp (Eqs. 2-3), put together by the caller::

    loss_E = similarity(X' o c_n, x'_n) + smoothness(c_n)                      (Phi_E = c_n)
    loss_I = similarity(x'_p o Phi_I, x'_q) + smoothness(Phi_I)

with :func:`atlasreg.deepatlas.warps.explicit_warp` / :func:`~atlasreg.deepatlas.warps.implicit_warp`,
:class:`DeepAtlasSimilarity` and :class:`SmoothnessLoss`.

Choices where the paper is ambiguous:

* *Eq. 11, second term*: ``D^_p = log det J^_p`` is said to go "-> 1", but det J^ <= 1 for unit columns
  (Hadamard's inequality), so log det J^ = 1 is unreachable. We read the target as det J^ = 1, i.e.
  ``L_0.5(D^_p - log 1) = L_0.5(log det J^_p)``: zero exactly for orthogonal columns, so the identity
  (and any rotation, uniform or per-axis scaling and translation) costs nothing. (Taken literally,
  ``L_0.5(log det J^ - 1)`` has the same minimiser but adds 0.375 there.)
* *Folds*: ``log det`` is undefined where det <= 0. Below ``eps`` (1e-6) it is continued as
  ``log eps - log(1 + eps - det)``: continuous, increasing, slope 1 at eps, logarithmic in the depth of
  the fold. A folded voxel then costs about as much as a compression to eps (``log 1e-6`` = -13.8:
  about 7 through the Huber function, a little more the deeper the fold) and its gradient points back
  to positive determinants. A clamp would give no gradient there; continuing with the slope of the log
  at eps (1/eps) made a random network's folds cost 7e5 (a small 2D network's first step: Eq. 11 was
  7e5 for Phi_E and 2e9 for Phi_I, against 6.9 and 11 with this continuation), drowning every other
  term. A uniform reflection (det J = -1 everywhere) costs 7.13 but is a stationary point: -1 is the
  extreme determinant of unit columns and the first term sees a uniform map.
* *Jacobian*: central differences in the exam's corner-aligned normalised units
  (:func:`atlasreg.deepatlas.coordinates.jacobian`). Eq. 11 does not depend on these units: a per-axis
  rescaling of the exam axes multiplies each column of J by a constant, which the column normalisation
  removes from the second term and which only shifts log det J (above eps), and its mean, by a
  constant in the first. The same loss therefore results in voxels or mm.
* *The mean D-bar* is the (masked) mean over each case's map, differentiated like the rest (the first
  term is a robust variance of log det J).
* *Eq. 9, which mean*: each channel of a feature map is centred on its own (masked) mean, and one
  correlation coefficient is formed per level over all channels and voxels together (the single
  quotient of Eq. 9). Subtracting one mean over all channels would let channels of different mean
  level (usual after a leaky ReLU) correlate whatever the alignment. Loss: ``sum_l (1 - ncc_l)``, 0
  for perfectly correlated features (Eq. 9 sums the levels).
* *Auxiliary image gradient* (5.1.5): the gradient *magnitude* of the Prewitt operator, one channel,
  in intensity units per voxel: a scalar map, so warping it needs no reorientation of vectors. The
  atlas's auxiliary channels are learnt like its image channel (:class:`~atlasreg.deepatlas.warps.Atlas`).
* *Weight of the auxiliary MSE* relative to the feature similarity: not given; 1 by default.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .coordinates import check_coordinates, jacobian, resize

__all__ = ["huber", "masked_mean", "smoothness_loss", "SmoothnessLoss", "ncc", "feature_ncc_loss",
           "prewitt_gradient", "auxiliary_channels", "auxiliary_mse", "similarity_loss", "DeepAtlasSimilarity",
           "foreground_mask"]

_TINY = 1e-12


def _reduce(per_case: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "per_case":
        return per_case
    if reduction == "mean":
        return per_case.mean()
    raise ValueError(f"reduction must be 'mean' or 'per_case', got {reduction!r}")


def _check_mask(mask: torch.Tensor | None, n: int, spatial: Sequence[int]) -> None:
    if mask is None:
        return
    if (mask.dim() != len(spatial) + 2 or mask.shape[0] not in (1, n) or mask.shape[1] != 1
            or tuple(mask.shape[2:]) != tuple(spatial)):
        raise ValueError(f"mask of shape {tuple(mask.shape)} is not (N or 1, 1, {', '.join(map(str, spatial))})")


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-case mean of `values` (N, C, *S) over channels and voxels, weighted by `mask` (N or 1, 1, *S)
    (5.1.6). Returns (N,); 0 for a case whose mask is empty."""
    if mask is None:
        return values.flatten(1).mean(1)
    _check_mask(mask, values.shape[0], values.shape[2:])
    w = mask.detach().to(values.dtype).expand(values.shape[0], 1, *values.shape[2:])
    num = (values * w).flatten(1).sum(1)
    return num / (w.flatten(1).sum(1) * values.shape[1]).clamp_min(_TINY)


def huber(a: torch.Tensor, delta: float = 0.5) -> torch.Tensor:
    """Huber function of Eq. 10, element-wise: ``a^2 / 2`` for ``|a| < delta``, else
    ``delta (|a| - delta / 2)`` (Huber 1964; the paper's delta = 0.5)."""
    return F.huber_loss(a, torch.zeros_like(a), reduction="none", delta=delta)


def _safe_log(x: torch.Tensor, eps: float) -> torch.Tensor:
    """log x for x > eps, ``log eps - log(1 + eps - x)`` below (continuous, increasing; module docstring)."""
    return torch.where(x > eps, torch.log(x.clamp_min(eps)), np.log(eps) - torch.log1p((eps - x).clamp_min(0.0)))


def smoothness_loss(phi: torch.Tensor, mask: torch.Tensor | None = None, delta: float = 0.5, eps: float = 1e-6,
                    reduction: str = "mean") -> torch.Tensor:
    """Smoothness loss of Eq. 11: ``L_delta(D_p - mean D) + L_delta(D^_p)``, per-voxel terms averaged
    over the (masked) voxels.

    phi: a warp or coordinate map (N, D, *S) (Phi_E = c_n, or Phi_I). ``J_p`` its local Jacobian (central
    differences, normalised units; the loss does not depend on the units, see the module docstring),
    ``D_p = log det J_p``, ``D^_p = log det J^_p`` with ``J^_p`` the column-normalised Jacobian (unit
    columns); the paper's target det J^ = 1 is D^ = 0. Logs continued below `eps` as ``log eps - log(1 + eps - det)``.
    mask: (N or 1, 1, *S) foreground weights (5.1.6). Returns a scalar (``"mean"``) or (N,)
    (``"per_case"``), >= 0 and 0 exactly for an affine map with orthogonal Jacobian columns (identity,
    rotation, scaling, translation). Raises ValueError for a malformed map or mask.
    """
    check_coordinates(phi, "warp")
    _check_mask(mask, phi.shape[0], phi.shape[2:])
    J = jacobian(phi)  # (N, *S, D, D), columns = derivatives along the exam axes
    log_det = _safe_log(torch.linalg.det(J), eps).unsqueeze(1)  # (N, 1, *S)
    unit = J / torch.linalg.vector_norm(J, dim=-2, keepdim=True).clamp_min(_TINY)
    log_det_unit = _safe_log(torch.linalg.det(unit), eps).unsqueeze(1)
    mean = masked_mean(log_det, mask).view(-1, *[1] * (log_det.dim() - 1))
    per_case = masked_mean(huber(log_det - mean, delta), mask) + masked_mean(huber(log_det_unit, delta), mask)
    return _reduce(per_case, reduction)


class SmoothnessLoss(nn.Module):
    """Module form of :func:`smoothness_loss` (Eq. 11), holding delta and eps."""

    def __init__(self, delta: float = 0.5, eps: float = 1e-6):
        super().__init__()
        self.delta, self.eps = delta, eps

    def forward(self, phi: torch.Tensor, mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        return smoothness_loss(phi, mask, self.delta, self.eps, reduction)


def ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised cross-correlation (product-moment correlation coefficient) of two maps, the quotient of
    Eq. 9: a, b (N, C, *S), each channel centred on its (masked) mean, sums over channels and voxels.
    Returns (N,) in [-1, 1]; 0 where a map is constant. Raises ValueError on a shape mismatch."""
    if a.shape != b.shape or a.dim() < 3:
        raise ValueError(f"maps must be (N, C, *spatial) of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    _check_mask(mask, a.shape[0], a.shape[2:])
    w = (torch.ones_like(a[:, :1]) if mask is None
         else mask.detach().to(a.dtype).expand(a.shape[0], 1, *a.shape[2:]))
    total = w.flatten(2).sum(2, keepdim=True).clamp_min(_TINY)  # (N, 1, 1)
    a_flat, b_flat, w_flat = a.flatten(2), b.flatten(2), w.flatten(2)
    a_c = a_flat - (a_flat * w_flat).sum(2, keepdim=True) / total
    b_c = b_flat - (b_flat * w_flat).sum(2, keepdim=True) / total
    cov = (w_flat * a_c * b_c).flatten(1).sum(1)
    var = (w_flat * a_c.pow(2)).flatten(1).sum(1) * (w_flat * b_c.pow(2)).flatten(1).sum(1)
    return cov / torch.sqrt(var + _TINY)


def feature_ncc_loss(moving: Sequence[torch.Tensor], fixed: Sequence[torch.Tensor],
                     mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Feature similarity of Eq. 9 as a loss: ``sum_l (1 - ncc(R_m^l, R_f^l))`` over the feature levels
    (paper: two, at full and half resolution). moving, fixed: lists of (N, C_l, *s_l) maps; mask
    (N or 1, 1, *S) at the finest level's size, resampled to each level (corner-aligned linear). Returns
    a scalar or (N,), in [0, 2 * levels], 0 for perfectly correlated features. Raises ValueError for
    mismatched lists."""
    if len(moving) != len(fixed) or not moving:
        raise ValueError(f"need the same non-zero number of feature levels, got {len(moving)} and {len(fixed)}")
    per_case = 0.0
    for m, f in zip(moving, fixed):
        level_mask = None if mask is None else resize(mask.to(m.dtype), m.shape[2:])
        per_case = per_case + (1.0 - ncc(m, f, level_mask))
    return _reduce(per_case, reduction)


def prewitt_gradient(x: torch.Tensor) -> torch.Tensor:
    """Image gradient magnitude by the Prewitt operator (Prewitt 1970; 5.1.5): per channel, the
    derivative ``[-1, 0, 1] / 2`` along each axis smoothed by ``[1, 1, 1] / 3`` along the other axes
    (the separable 3x3(x3) Prewitt kernels, scaled so that a ramp of slope s per voxel gives s),
    replicate padding. x: (N, C, *S), 2D or 3D. Returns (N, C, *S), intensity units per voxel, >= 0.
    Built on MONAI's separable_filtering."""
    from monai.networks.layers.simplelayers import separable_filtering

    d = x.dim() - 2
    if d not in (2, 3):
        raise ValueError(f"expected (N, C, *spatial) with 2 or 3 spatial dims, got {tuple(x.shape)}")
    deriv = torch.tensor([-0.5, 0.0, 0.5], dtype=x.dtype, device=x.device)
    smooth = torch.full((3,), 1.0 / 3.0, dtype=x.dtype, device=x.device)
    # separable_filtering correlates (no flip): [-1/2, 0, 1/2] gives (x[i+1] - x[i-1]) / 2
    grads = [separable_filtering(x, [deriv if k == axis else smooth for k in range(d)], mode="replicate")
             for axis in range(d)]
    return torch.linalg.vector_norm(torch.stack(grads, 0), dim=0)


def auxiliary_channels(image: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """``x'`` of Eqs. 12-13 (5.1.5): the image (N, 1, *S), its Prewitt gradient magnitude and, when
    labels exist, the binarised masks (N, K, *S) (> 0.5), concatenated: (N, 2 + K, *S). Raises
    ValueError for an image that is not single-channel or masks of another shape."""
    if image.dim() not in (4, 5) or image.shape[1] != 1:
        raise ValueError(f"image must be (N, 1, *spatial), got {tuple(image.shape)}")
    parts = [image, prewitt_gradient(image)]
    if masks is not None:
        if masks.dim() != image.dim() or masks.shape[0] != image.shape[0] or masks.shape[2:] != image.shape[2:]:
            raise ValueError(f"masks of shape {tuple(masks.shape)} do not match the image {tuple(image.shape)}")
        parts.append((masks > 0.5).to(image.dtype))
    return torch.cat(parts, 1)


def auxiliary_mse(moving: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor | None = None,
                  reduction: str = "mean") -> torch.Tensor:
    """Mean squared error of the auxiliary channels (5.1.5): (N, C, *S) each, (masked) mean over
    channels and voxels. Units: those of the channels, squared. Raises ValueError on a shape mismatch."""
    if moving.shape != fixed.shape:
        raise ValueError(f"shape mismatch: {tuple(moving.shape)} vs {tuple(fixed.shape)}")
    return _reduce(masked_mean((moving - fixed).pow(2), mask), reduction)


def similarity_loss(moving: torch.Tensor, fixed: torch.Tensor, features: Callable[[torch.Tensor], list],
                    mask: torch.Tensor | None = None, auxiliary_weight: float = 1.0,
                    reduction: str = "mean") -> torch.Tensor:
    """L_sim of Eqs. 2-3 with auxiliary channels (Eqs. 12-13, 5.1.5): on channel 0 the feature NCC of
    Eq. 9 (:func:`feature_ncc_loss` of ``features(moving[:, :1])`` and ``features(fixed[:, :1])``), plus
    ``auxiliary_weight`` times the MSE of the remaining channels, if any.

    moving: the warped image ``x'_p o Phi_I`` or ``X' o c_n`` (N, C, *S); fixed: ``x'_q`` or ``x'_n``, the
    same shape; features: a function image (N, 1, *S) -> list of feature maps (the pretrained
    autoencoder's, :meth:`~atlasreg.deepatlas.autoencoder.FeatureAutoencoder.features`); the fixed
    image's features are computed without gradients. mask: (N or 1, 1, *S) on the fixed grid (the
    foreground, times the overlap mask for Phi_I)."""
    if moving.shape != fixed.shape:
        raise ValueError(f"shape mismatch: {tuple(moving.shape)} vs {tuple(fixed.shape)}")
    with torch.no_grad():
        fixed_features = features(fixed[:, :1])
    per_case = feature_ncc_loss(features(moving[:, :1]), fixed_features, mask, reduction="per_case")
    if moving.shape[1] > 1:
        per_case = per_case + auxiliary_weight * auxiliary_mse(moving[:, 1:], fixed[:, 1:], mask, "per_case")
    return _reduce(per_case, reduction)


class DeepAtlasSimilarity(nn.Module):
    """Module form of :func:`similarity_loss`: holds the frozen feature extractor (a pretrained
    :class:`~atlasreg.deepatlas.autoencoder.FeatureAutoencoder`, kept in eval mode with
    ``requires_grad`` off) and the auxiliary weight. ``feature_mse=True`` replaces the feature NCC by the
    MSE of the images (the ablation of 5.4.3)."""

    def __init__(self, extractor: nn.Module | None, auxiliary_weight: float = 1.0, feature_mse: bool = False):
        super().__init__()
        if extractor is None and not feature_mse:
            raise ValueError("a feature extractor is needed unless feature_mse=True")
        self.extractor = extractor
        if extractor is not None:
            extractor.requires_grad_(False)
            extractor.eval()
        self.auxiliary_weight, self.feature_mse = auxiliary_weight, feature_mse

    def train(self, mode: bool = True) -> "DeepAtlasSimilarity":
        super().train(mode)
        if self.extractor is not None:
            self.extractor.eval()  # frozen: its normalisation never switches to training
        return self

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        if self.feature_mse:
            if moving.shape != fixed.shape:
                raise ValueError(f"shape mismatch: {tuple(moving.shape)} vs {tuple(fixed.shape)}")
            per_case = auxiliary_mse(moving[:, :1], fixed[:, :1], mask, "per_case")
            if moving.shape[1] > 1:
                per_case = per_case + self.auxiliary_weight * auxiliary_mse(moving[:, 1:], fixed[:, 1:], mask,
                                                                            "per_case")
            return _reduce(per_case, reduction)
        return similarity_loss(moving, fixed, self.extractor.features, mask, self.auxiliary_weight, reduction)


def foreground_mask(image: torch.Tensor, threshold: float = -900.0, sigma: float = 0.7) -> torch.Tensor:
    """Training mask of 5.5.3 (used by 5.1.6): (1) Gaussian blur of standard deviation `sigma` voxels
    (MONAI's separable Gaussian, replicate padding), (2) voxels above `threshold` (paper: -900 HU, on the
    resampled CT before its clipping to [-256, 256]; give the threshold in the image's own units),
    (3) holes filled (``scipy.ndimage.binary_fill_holes``: background not connected to the border),
    (4) the largest connected component kept (``scipy.ndimage.label``, full connectivity: 8 neighbours
    in 2D, 26 in 3D, as atlasreg's topology checks). image: (N, 1, *S), 2D or 3D. Returns (N, 1, *S)
    0/1 in the image's floating dtype (float32 otherwise), on its device, without gradients; all zeros
    for a case with nothing above the threshold. Raises ValueError for a malformed image or sigma < 0."""
    from monai.networks.layers.convutils import gaussian_1d
    from monai.networks.layers.simplelayers import separable_filtering
    from scipy import ndimage

    d = image.dim() - 2
    if d not in (2, 3) or image.shape[1] != 1:
        raise ValueError(f"image must be (N, 1, *spatial) with 2 or 3 spatial dims, got {tuple(image.shape)}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    with torch.no_grad():
        x = image.detach().float()
        if sigma > 0:
            kernel = gaussian_1d(torch.tensor(float(sigma)), normalize=True).to(x.device)
            x = separable_filtering(x, [kernel] * d, mode="replicate")
        out = []
        for case in (x[:, 0] > threshold).cpu().numpy():
            filled = ndimage.binary_fill_holes(case)
            labels, count = ndimage.label(filled, structure=np.ones((3,) * d, dtype=bool))
            if count > 1:
                sizes = np.bincount(labels.ravel())
                sizes[0] = 0
                filled = labels == int(np.argmax(sizes))
            out.append(filled)
    dtype = image.dtype if image.is_floating_point() else torch.float32
    return torch.as_tensor(np.stack(out)[:, None], device=image.device).to(dtype)
