"""Image similarity losses for registration: MSE, LNCC, MIND-SSC, NGF and mutual information.

Each loss is a pure function ``loss(fixed, moving, ..., mask=None, reduction="mean")`` plus a thin
:class:`torch.nn.Module` wrapper holding its options; one code path for 2D and 3D.

Conventions (those of :mod:`atlasreg.spatial.grid`):

* ``fixed``, ``moving``: ``(N, C, *spatial)`` on the same grid (the moving image already warped onto
  the fixed grid, ``moving o T``), spatial dims in array order ``(z, y, x)`` / ``(y, x)``; ``moving``
  may carry gradients (to the transform or the image). With ``C > 1`` every channel is compared with
  the same channel of the other image and the per-channel losses are averaged.
* ``spacing``: voxel size in mm in ITK order ``(x, y[, z])``, for what is defined in world units
  (the LNCC window, the NGF gradients).
* ``mask``: optional voxel weights ``(N or 1, 1, *spatial)`` in [0, 1] (binary or soft), e.g. a region
  of interest of the fixed image times the field-of-view mask of the warped moving image. The loss is
  restricted to the mask: image values where the mask is 0 never enter it. Losses built on local
  operators (NGF's differences, MIND's patches) evaluate only voxels whose whole footprint lies inside
  the mask (the mask eroded by the footprint, :func:`erode_mask`); LNCC's local statistics use only
  mask voxels (normalised convolution). The mask is not differentiated.
* ``reduction``: ``"mean"`` (a scalar: the mean over the batch of the per-case values) or
  ``"per_case"`` (``(N,)``), as :func:`atlasreg.losses.label_mse`.

Sign conventions: every loss is to be MINIMISED.

* ``mse``: mean squared intensity difference, >= 0, 0 for identical images (intensity^2).
* ``lncc``: ``1 - mean local squared correlation``, in [0, 1], 0 when every local window of one image
  is an affine function of the other's (as for identical textured images; flat windows count as
  uncorrelated, so they add a constant).
* ``mind``: mean squared difference of MIND-SSC descriptors, in [0, 1], 0 for identical images.
* ``ngf``: ``1 - mean <n_f, n_m>^2`` (squared, default) in [0, 1], or ``1 - mean <n_f, n_m>``
  (unsquared) in [0, 2]; 0 where all gradients of one image are parallel to the other's (and for the
  unsquared variant point the same way).
* ``mi``: ``-MI`` (nats), or ``-NMI`` in [-2, -1] with ``normalized=True``.

Why our own LNCC and MI rather than MONAI's (monai 1.6 ``monai.losses``):

* ``LocalNormalizedCrossCorrelationLoss`` computes the right quantity (the local squared zero-normalised
  correlation of VoxelMorph, returned as ``-mean cc^2``; ``tests/test_similarity.py`` checks that our
  per-voxel map equals MONAI's away from the border), but it has no mask, takes one odd kernel size in
  voxels for all axes (no window in mm, no anisotropic spacing), and pads with zeros, so near the image
  border its local means and variances mix in zeros. Ours takes the window in mm, converts it per axis,
  averages over the voxels inside the image and the mask (separable running sums on the mask-weighted
  images: normalised convolution), with running sums for long windows.
* ``GlobalMutualInformationLoss`` (Gaussian Parzen windows) is correct for intensities in [0, 1]
  (it clamps everything else; the caller must rescale) but has no mask or voxel weights, and its
  B-spline variant takes the intensity range over the whole batch rather than per case. Ours uses
  the same Parzen estimate (Gaussian windows on bin centres, weights normalised per voxel, joint
  histogram by a batched matrix product; equal to MONAI's for images spanning [0, 1], tested), with
  per-case intensity ranges over the mask, mask weights and the normalised variant.
* MONAI has no MIND or NGF loss; these are written here after the papers.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from atlasreg.errors import AtlasregError

__all__ = [
    "mse", "lncc", "lncc_window", "mind_ssc", "mind_loss", "ngf_field", "ngf", "mutual_information",
    "erode_mask", "MSE", "LNCC", "MINDSSC", "NGF", "MutualInformation", "SIMILARITIES", "build_similarity",
]

_TINY = 1e-12


# ---------------------------------------------------------------- shared helpers

def _check(fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor | None,
           spacing: Sequence[float] | None = None) -> int:
    """Validate a pair of images (and mask, spacing); returns the spatial dimension D."""
    d = fixed.dim() - 2
    if d not in (2, 3):
        raise ValueError(f"expected images (N, C, *spatial) with 2 or 3 spatial dims, got {tuple(fixed.shape)}")
    if moving.shape != fixed.shape:
        raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} differ in shape")
    if mask is not None:
        if mask.dim() != fixed.dim() or mask.shape[1] != 1 or mask.shape[0] not in (1, fixed.shape[0]) \
                or tuple(mask.shape[2:]) != tuple(fixed.shape[2:]):
            raise ValueError(f"mask of shape {tuple(mask.shape)} is not (N or 1, 1, *spatial) for images "
                             f"{tuple(fixed.shape)}")
    if spacing is not None:
        _check_spacing(spacing, d)
    return d


def _check_spacing(spacing: Sequence[float], d: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != d or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing {spacing} is not {d} positive values in mm (ITK order x, y[, z])")
    return spacing


def _weights(mask: torch.Tensor | None, like: torch.Tensor, erode: int = 0) -> torch.Tensor:
    """Mask -> (N, 1, *spatial) detached weights of `like`'s dtype (ones without a mask), eroded by a
    box of half-width `erode` voxels (:func:`erode_mask`) before the batch is expanded."""
    if mask is None:
        return torch.ones(like.shape[0], 1, *like.shape[2:], device=like.device, dtype=like.dtype)
    w = mask.detach().to(device=like.device, dtype=like.dtype)
    if erode:
        w = erode_mask(w, [erode] * (w.dim() - 2))
    return w.expand(like.shape[0], *w.shape[1:])


def _inside(mask: torch.Tensor | None, *images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The images with their values outside the mask (mask == 0) replaced by 0, so that not even a
    NaN or an infinity there reaches the loss (multiplying by a zero weight would not remove it)."""
    if mask is None:
        return images
    inside = mask.detach().to(images[0].device) > 0
    return tuple(torch.where(inside, x, torch.zeros_like(x)) for x in images)


def _per_channel(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *S) -> (N * C, 1, *S), channels of a case consecutive."""
    return x.reshape(x.shape[0] * x.shape[1], 1, *x.shape[2:])


def _reduce(per_case_channel: torch.Tensor, n: int, reduction: str) -> torch.Tensor:
    """(N * C,) or (N,) values -> mean over the channels of a case -> (N,) or their mean."""
    per_case = per_case_channel.reshape(n, -1).mean(1)
    if reduction == "per_case":
        return per_case
    if reduction == "mean":
        return per_case.mean()
    raise ValueError(f"unknown reduction {reduction!r} (expected 'mean' or 'per_case')")


def _weighted_mean(values: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-case weighted mean of (N, K, *S) values with (N, 1, *S) weights over K and space -> (N,)."""
    num = (values * w).flatten(1).sum(1)
    return num / (w.flatten(1).sum(1) * values.shape[1]).clamp_min(_TINY)


def _box_mean(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Mean of (N, C, *S) over a box of `window` voxels per ARRAY axis (odd sizes), centred, counting
    only voxels inside the image; separable. Windows of up to 9 voxels: average pooling
    (``count_include_pad=False``); longer ones: running sums (a cumulative sum accumulated in float64,
    so the cost does not grow with the window and no precision is lost; on a 112 x 128 x 80 volume a
    61-voxel LNCC window takes 2.4 s instead of 8.3 s)."""
    d = x.dim() - 2
    pool = F.avg_pool2d if d == 2 else F.avg_pool3d
    for axis, k in enumerate(window):
        if k == 1:
            continue
        dim, n, h = 2 + axis, x.shape[2 + axis], k // 2
        if k <= 9:
            kernel, padding = [1] * d, [0] * d
            kernel[axis], padding[axis] = k, h
            x = pool(x, tuple(kernel), stride=1, padding=tuple(padding), count_include_pad=False)
            continue
        pad = [0, 0] * d
        pad[2 * (d - 1 - axis)] = h + 1  # F.pad lists the last axis first
        pad[2 * (d - 1 - axis) + 1] = h
        c = torch.cumsum(F.pad(x, pad), dim, dtype=torch.float64)  # c[i] = sum of padded x[:i + 1]
        idx = torch.arange(n, device=x.device)
        count = ((idx + h + 1).clamp(max=n) - (idx - h).clamp(min=0)).to(torch.float64)
        shape = [1] * x.dim()
        shape[dim] = n
        x = ((c.narrow(dim, k, n) - c.narrow(dim, 0, n)) / count.view(shape)).to(x.dtype)
    return x


def erode_mask(mask: torch.Tensor, radius: Sequence[int]) -> torch.Tensor:
    """Erode a (soft) mask by a box: each voxel takes the minimum of the mask over the box of
    half-width ``radius[j]`` voxels along ARRAY axis j (``(z, y, x)`` / ``(y, x)``).

    mask: (N, 1, *S). Returns (N, 1, *S). The image border counts as inside (replicate padding), so a
    mask that reaches the border is not eroded there: the local operators that use it (NGF, MIND) read
    only voxels inside the image (one-sided differences, replicated borders, clipped patches). A voxel keeps a nonzero weight only when the whole box around it is
    inside the mask, so a loss evaluated on the eroded mask never reads image values outside `mask`.
    """
    d = mask.dim() - 2
    radius = [int(r) for r in radius]
    if len(radius) != d or min(radius) < 0:
        raise ValueError(f"radius {radius} is not {d} non-negative voxel counts")
    if max(radius) == 0:
        return mask
    pad = []
    for r in reversed(radius):  # F.pad lists the last axis first
        pad += [r, r]
    padded = F.pad(mask, pad, mode="replicate")
    pool = F.max_pool2d if d == 2 else F.max_pool3d
    return -pool(-padded, tuple(2 * r + 1 for r in radius), stride=1)


# ---------------------------------------------------------------- MSE

def mse(fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor | None = None,
        reduction: str = "mean") -> torch.Tensor:
    """Mean squared intensity difference, ``mean_x w(x) (f(x) - m(x))^2 / mean_x w(x)``.

    Shapes, mask and reduction as in the module docstring. Returns >= 0 (intensity units squared); 0 for
    identical images. Only for images of the same modality and intensity scale (Atlas-ISTN's image
    refinement found it harmful on CT, paper Sec. 3). Raises ValueError for mismatched shapes.
    """
    _check(fixed, moving, mask)
    w = _weights(mask, fixed)
    diff = torch.where(w > 0, fixed - moving, torch.zeros_like(fixed))
    return _reduce(_weighted_mean(diff.pow(2), w), fixed.shape[0], reduction)


# ---------------------------------------------------------------- LNCC

def lncc_window(spacing: Sequence[float], window_mm: float | Sequence[float]) -> tuple[int, ...]:
    """The LNCC box in voxels per ITK axis ``(x, y[, z])``: the odd number of voxels nearest to
    ``window_mm / spacing`` (ties, i.e. even quotients, round up), at least 3.

    spacing: voxel size in mm (ITK order); window_mm: the box's side in mm, one value or one per axis.
    E.g. spacing (1.5, 0.5), 7.5 mm -> (5, 15). Raises ValueError for a non-positive window or spacing.
    """
    spacing = _check_spacing(spacing, len(spacing))
    window = [float(window_mm)] * len(spacing) if isinstance(window_mm, (int, float)) else \
        [float(w) for w in window_mm]
    if len(window) != len(spacing) or not all(math.isfinite(w) and w > 0 for w in window):
        raise ValueError(f"LNCC window {window_mm} mm is not one positive value or one per axis of {spacing}")
    return tuple(max(3, 2 * int(math.floor(w / (2 * s))) + 1) for w, s in zip(window, spacing))


def _lncc_fixed(fixed: torch.Tensor, w: torch.Tensor, window_array: Sequence[int]) -> torch.Tensor:
    """The fixed image's part of the local statistics, (N, 3, *S): sum of weights, local mean and
    local mean of squares over the mask voxels of each box. They do not depend on the moving image, so
    an optimiser's loop computes them once (:class:`LNCC`)."""
    fw = torch.where(w > 0, fixed, torch.zeros_like(fixed))
    stats = _box_mean(torch.cat([w, fw * w, fw * fw * w], dim=1), window_array)
    sw = stats[:, :1].clamp_min(_TINY)
    return torch.cat([sw, stats[:, 1:] / sw], dim=1)


def _lncc_map(fixed: torch.Tensor, moving: torch.Tensor, w: torch.Tensor, window_array: Sequence[int],
              eps: float, fixed_stats: torch.Tensor | None = None) -> torch.Tensor:
    """Local squared correlation cc^2 (N, 1, *S) of single-channel images, statistics over the mask
    voxels of each box (normalised convolution). fixed_stats: :func:`_lncc_fixed` of (fixed, w), if
    already computed."""
    if fixed_stats is None:
        fixed_stats = _lncc_fixed(fixed, w, window_array)
    zero = torch.zeros_like(fixed)
    fw, mw = torch.where(w > 0, fixed, zero), torch.where(w > 0, moving, zero)
    stats = _box_mean(torch.cat([mw * w, mw * mw * w, fw * mw * w], dim=1), window_array)
    sw, mf, ff = fixed_stats[:, :1], fixed_stats[:, 1:2], fixed_stats[:, 2:3]
    mm, mmm, fm = (stats[:, i:i + 1] / sw for i in range(3))
    var_f = (ff - mf * mf).clamp_min(0)
    var_m = (mmm - mm * mm).clamp_min(0)
    cov = fm - mf * mm
    return cov * cov / (var_f * var_m + eps)


def lncc(fixed: torch.Tensor, moving: torch.Tensor, spacing: Sequence[float], window_mm: float = 9.0,
         mask: torch.Tensor | None = None, eps: float = 1e-5, reduction: str = "mean") -> torch.Tensor:
    """Local normalised cross-correlation loss ``1 - mean_x cc(x)^2`` (squared LNCC, as VoxelMorph,
    Balakrishnan et al. 2019, and ANTs' CC metric, Avants et al. 2008).

    cc(x) is the Pearson correlation of f and m over the box around x of side ``window_mm`` mm,
    converted to an odd voxel count per axis by :func:`lncc_window` with the image `spacing` (mm, ITK
    order), so the same physical images give about the same loss at any resolution. Local means are
    taken over the voxels inside the image and the mask (a soft mask weights them); the loss is the
    mask-weighted mean of ``cc^2 = cov^2 / (var_f var_m + eps)`` (eps in intensity^4, guards flat boxes,
    where cc^2 = 0). Invariant to local affine intensity changes, including inversion.

    Returns a value in [0, 1] to minimise. Shapes, mask and reduction as in the module docstring.
    Raises ValueError for mismatched shapes, spacing or window.
    """
    return _lncc(fixed, moving, spacing, window_mm, mask, eps, reduction)[0]


def _lncc(fixed, moving, spacing, window_mm, mask, eps, reduction, fixed_stats=None):
    """:func:`lncc` and the fixed image's statistics it used (to be given back as `fixed_stats` while
    fixed and mask stay the same)."""
    _check(fixed, moving, mask, spacing)
    window = tuple(reversed(lncc_window(spacing, window_mm)))  # array order
    n = fixed.shape[0]
    w = _per_channel(_weights(mask, fixed).repeat_interleave(fixed.shape[1], 0))
    f = _per_channel(fixed)
    if fixed_stats is None:
        fixed_stats = _lncc_fixed(f, w, window)
    cc2 = _lncc_map(f, _per_channel(moving), w, window, eps, fixed_stats)
    return _reduce(1 - _weighted_mean(cc2, w), n, reduction), fixed_stats


# ---------------------------------------------------------------- MIND-SSC

def _ssc_pairs(d: int, dilation: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Pairs of the 2D-neighbourhood (offsets +-dilation along each array axis) at distance
    sqrt(2) * dilation: 12 in 3D (Heinrich et al. 2013), 4 in 2D."""
    neighbours = []
    for axis in range(d):
        for sign in (-1, 1):
            o = [0] * d
            o[axis] = sign * dilation
            neighbours.append(tuple(o))
    pairs = []
    for i, a in enumerate(neighbours):
        for b in neighbours[i + 1:]:
            if sum((p - q) ** 2 for p, q in zip(a, b)) == 2 * dilation ** 2:
                pairs.append((a, b))
    return pairs


def _shifted(padded: torch.Tensor, offset: Sequence[int], pad: int, size: Sequence[int]) -> torch.Tensor:
    """I(x + offset) from an image replicate-padded by `pad` on every side."""
    index = [slice(None), slice(None)] + [slice(pad + o, pad + o + n) for o, n in zip(offset, size)]
    return padded[tuple(index)]


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2, mask: torch.Tensor | None = None
             ) -> torch.Tensor:
    """MIND-SSC descriptors (Heinrich et al., "Towards realtime multimodal fusion for image-guided
    interventions using self-similarity context", MICCAI 2013; MIND: Heinrich et al., Med. Image Anal.
    16(7), 2012).

    For every pair (a, b) of the six-neighbourhood (3D; the four-neighbourhood in 2D) at offsets of
    ``dilation`` voxels along the array axes whose distance is sqrt(2) * dilation (12 pairs in 3D, 4
    in 2D), the patch distance ``D_ab(x) = mean_{y in P(x)} (I(y + a) - I(y + b))^2`` over the box P
    of half-width ``radius`` voxels (side 2 radius + 1, clipped at the image border; the paper's
    Gaussian patch replaced by a box, as in the authors' code). Then ``MIND_ab(x) = exp(-(D_ab(x) - min_ab D(x)) / V(x))`` with
    ``V(x) = mean_ab (D_ab(x) - min_ab D(x))`` clamped to [1e-3, 1e3] times its mean over the image (or
    the mask), so the largest descriptor entry is 1. ``radius`` and ``dilation`` are in voxels
    (ConvexAdam's defaults 1 and 2); on anisotropic grids they span different lengths in mm.

    image: (N, C, *S); mask: optional (N or 1, 1, *S), only where the mean of V is taken.
    Returns (N, C * K, *S) in [0, 1], K = 12 (3D) or 4 (2D), the pairs of channel c consecutive.
    The neighbour offsets replicate the image border. Raises ValueError for a malformed image, radius or dilation.
    """
    d = image.dim() - 2
    if d not in (2, 3):
        raise ValueError(f"expected an image (N, C, *spatial) with 2 or 3 spatial dims, got {tuple(image.shape)}")
    if int(radius) < 0 or int(dilation) < 1:
        raise ValueError(f"MIND radius {radius} must be >= 0 and dilation {dilation} >= 1 (voxels)")
    radius, dilation = int(radius), int(dilation)
    n, c, size = image.shape[0], image.shape[1], image.shape[2:]
    x = _per_channel(image)
    pad = [dilation] * (2 * d)
    padded = F.pad(x, pad, mode="replicate")
    dist = torch.cat([(_shifted(padded, a, dilation, size) - _shifted(padded, b, dilation, size)).pow(2)
                      for a, b in _ssc_pairs(d, dilation)], dim=1)
    dist = _box_mean(dist, [2 * radius + 1] * d)
    dist = dist - dist.min(dim=1, keepdim=True).values
    var = dist.mean(dim=1, keepdim=True)
    w = _weights(mask, image).repeat_interleave(c, 0)
    mean_var = ((var * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(_TINY)).detach()
    mean_var = mean_var.view(-1, *[1] * (d + 1))
    var = torch.minimum(torch.maximum(var, mean_var * 1e-3), mean_var * 1e3).clamp_min(_TINY)
    descriptors = torch.exp(-dist / var)
    return descriptors.reshape(n, -1, *size)


def mind_loss(fixed: torch.Tensor, moving: torch.Tensor, radius: int = 1, dilation: int = 2,
              mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """MIND-SSC loss: mean squared difference of the :func:`mind_ssc` descriptors of the two images
    (as in ConvexAdam, Siebert et al. 2021; the MIND paper uses the mean absolute difference).

    Exactly invariant to affine intensity maps, inversion included (D and V scale alike); a non-linear
    monotone map keeps the self-similarity pattern only where it is locally affine over the descriptor
    footprint (measured on smooth blobs: exp(-v), whose slope changes tenfold over the intensity range,
    moves the minimum by 0.25 voxel; a slope changing threefold, not at all). With a mask, only voxels whose
    descriptor footprint (half-width ``dilation + radius`` voxels) lies inside the mask count
    (:func:`erode_mask`), and V is normalised over them. Returns a value in [0, 1] to minimise.
    Shapes, mask and reduction as in the module docstring; radius and dilation in voxels.
    """
    return _mind_loss(fixed, moving, radius, dilation, mask, reduction)[0]


def _mind_loss(fixed, moving, radius, dilation, mask, reduction, fixed_descriptors=None):
    """:func:`mind_loss` and the fixed image's descriptors it used (to be given back as
    `fixed_descriptors` while fixed and mask stay the same)."""
    _check(fixed, moving, mask)
    fixed, moving = _inside(mask, fixed, moving)
    w = _weights(mask, fixed, erode=int(radius) + int(dilation))
    if fixed_descriptors is None:
        fixed_descriptors = mind_ssc(fixed, radius, dilation, w)
    diff = (fixed_descriptors - mind_ssc(moving, radius, dilation, w)).pow(2)
    k = diff.shape[1] // fixed.shape[1]
    diff = diff.reshape(fixed.shape[0] * fixed.shape[1], k, *fixed.shape[2:])
    wc = w.repeat_interleave(fixed.shape[1], 0)
    return _reduce(_weighted_mean(diff, wc), fixed.shape[0], reduction), fixed_descriptors


# ---------------------------------------------------------------- NGF

def _gradient(x: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Spatial gradient of (N, 1, *S) in intensity/mm, components in ITK order (x, y[, z]):
    (N, D, *S). Central differences inside, one-sided at the border (torch.gradient)."""
    d = x.dim() - 2
    return torch.cat([torch.gradient(x, spacing=float(spacing[j]), dim=x.dim() - 1 - j)[0]
                      for j in range(d)], dim=1)


def _ngf_field(image: torch.Tensor, spacing: Sequence[float], eps: float | None,
               w: torch.Tensor | None, inside: torch.Tensor | None) -> torch.Tensor:
    """:func:`ngf_field` of (M, 1, *S) with `w` the mask already eroded and `inside` the voxels of the
    mask itself (or both None)."""
    d = image.dim() - 2
    if inside is not None:  # values outside the mask never enter (not even as NaN)
        image = torch.where(inside, image, torch.zeros_like(image))
    grad = _gradient(image, spacing)
    if w is not None:
        grad = grad * (w > 0)
    norm2 = grad.pow(2).sum(1, keepdim=True)
    if eps is None:
        ww = _weights(None, image) if w is None else w
        mean_norm = (norm2.sqrt() * ww).flatten(1).sum(1) / ww.flatten(1).sum(1).clamp_min(_TINY)
        eps2 = (0.1 * mean_norm.detach()).pow(2).clamp_min(_TINY).view(-1, *[1] * (d + 1))
    else:
        eps2 = float(eps) ** 2
    n = grad / torch.sqrt(norm2 + eps2)
    return n if w is None else n * w


def _check_eps(eps: float | None) -> None:
    if eps is not None and not (math.isfinite(float(eps)) and float(eps) > 0):
        raise ValueError(f"NGF eps {eps} must be positive (intensity per mm) or None")


def ngf_field(image: torch.Tensor, spacing: Sequence[float], eps: float | None = None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised gradient field ``n(x) = grad I(x) / sqrt(|grad I(x)|^2 + eps^2)`` (Haber and
    Modersitzki, "Intensity gradient based registration and fusion of multi-modal images", MICCAI 2006,
    and Methods Inf. Med. 46(3), 2007; Oefverstedt et al., Cross-Sim-NGF, WBIR 2022, Eq. 1).

    image: (N, 1, *S); spacing: voxel size in mm, ITK order. The gradient is taken in world units
    (intensity per mm) by central differences (one-sided at the image border). eps (intensity per mm)
    keeps the field small where the gradient is below it (noise, flat regions); None: 0.1 times the
    image's mean gradient norm over the (eroded) mask, per case (detached), which makes n invariant
    to a global intensity scale.
    mask: optional (N or 1, 1, *S); the field is multiplied by the mask eroded by one voxel
    (:func:`erode_mask`, the differences' footprint), so it is 0 outside the mask (the masked field
    n^M = M n of Cross-Sim-NGF, Sec. 2) and never reads image values outside it.

    Returns (N, D, *S), |n| < 1, components (x, y[, z]). Raises ValueError for a malformed image,
    spacing, mask or eps.
    """
    d = image.dim() - 2
    if d not in (2, 3) or image.shape[1] != 1:
        raise ValueError(f"expected an image (N, 1, *spatial) with 2 or 3 spatial dims, got {tuple(image.shape)}")
    spacing = _check_spacing(spacing, d)
    _check_eps(eps)
    _check(image, image, mask)
    if mask is None:
        return _ngf_field(image, spacing, eps, None, None)
    return _ngf_field(image, spacing, eps, _weights(mask, image, erode=1), _weights(mask, image) > 0)


def ngf(fixed: torch.Tensor, moving: torch.Tensor, spacing: Sequence[float], eps: float | None = None,
        squared: bool = True, mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Normalised gradient field distance, the mask-weighted mean over voxels of

    * ``squared=True`` (default): ``1 - <n_f(x), n_m(x)>^2`` (Haber and Modersitzki 2006; s_NGF of
      Cross-Sim-NGF, WBIR 2022, Eq. 2). Invariant to the polarity of edges, hence to contrast inversion
      (multi-modal); in [0, 1].
    * ``squared=False``: ``1 - <n_f(x), n_m(x)>`` (the unsquared s_US-NGF, WBIR 2022 Eq. 3). Signed:
      aligned edges of opposite polarity give 2, so inverted contrast is pushed out of alignment; for
      same-modality pairs only; in [0, 2].

    n = :func:`ngf_field` (gradients in intensity/mm with the image `spacing`, mm, ITK order; eps per
    image as documented there: a float in intensity/mm, or None for 0.1 x the mean gradient norm).
    Flat regions (|grad| << eps) contribute 1. With a mask the mean runs over the mask eroded by one
    voxel, as s_ANGF (WBIR 2022 Eq. 4). Returns the loss to minimise; shapes, mask and reduction as in
    the module docstring. Raises ValueError for mismatched shapes, spacing or eps.
    """
    _check(fixed, moving, mask, spacing)
    _check_eps(eps)
    c = fixed.shape[1]
    w = inside = None
    if mask is not None:
        w = _weights(mask, fixed, erode=1).repeat_interleave(c, 0)
        inside = _weights(mask, fixed).repeat_interleave(c, 0) > 0
    nf = _ngf_field(_per_channel(fixed), spacing, eps, w, inside)
    nm = _ngf_field(_per_channel(moving), spacing, eps, w, inside)
    dot = (nf * nm).sum(1, keepdim=True)
    local = 1 - (dot * dot if squared else dot)
    return _reduce(_weighted_mean(local, _weights(None, dot) if w is None else w), fixed.shape[0], reduction)


# ---------------------------------------------------------------- mutual information

def _parzen(x: torch.Tensor, w: torch.Tensor, bins: int, sigma_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse Gaussian Parzen weights of (M, 1, *S) intensities, rescaled to [0, 1] by their per-image
    min and max over the voxels with w > 0 (detached): for each voxel the bins within
    ``r = ceil(5 sigma_ratio - 1/2)`` bins of its nearest bin centre, (M, V, 2r + 1) bin indices (long)
    and weights exp(-d^2 / (2 sigma^2)) normalised to sum 1 per voxel (d the distance to the bin centre
    in bin widths, sigma = sigma_ratio bin widths). The bins left out lie at least 5 sigma away (weight
    below 4e-6 of the largest), so the estimate is the dense one's up to that truncation, at 2r + 1
    instead of `bins` exponentials per voxel (Mattes et al. 2003 use compact B-spline windows for the
    same reason)."""
    inside = (w > 0).flatten(1)
    flat = x.flatten(1)
    big = torch.finfo(flat.dtype).max
    lo = torch.where(inside, flat, torch.full_like(flat, big)).amin(1, keepdim=True).detach()
    hi = torch.where(inside, flat, torch.full_like(flat, -big)).amax(1, keepdim=True).detach()
    s = ((flat - lo) / (hi - lo).clamp_min(_TINY)).clamp(0, 1) * (bins - 1)
    r = max(1, math.ceil(5.0 * sigma_ratio - 0.5))
    offsets = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    centres = torch.round(s.detach())[..., None] + offsets                  # (M, V, 2r + 1)
    valid = (centres >= 0) & (centres <= bins - 1)
    weights = torch.exp(-0.5 * ((s[..., None] - centres) / sigma_ratio) ** 2) * valid
    return centres.clamp(0, bins - 1).long(), weights / weights.sum(-1, keepdim=True)


def mutual_information(fixed: torch.Tensor, moving: torch.Tensor, bins: int = 32, sigma_ratio: float = 0.5,
                       normalized: bool = False, mask: torch.Tensor | None = None,
                       reduction: str = "mean") -> torch.Tensor:
    """Mutual information of the intensities by Parzen windowing (Viola and Wells 1997; Mattes et al.,
    IEEE TMI 22(1), 2003), or normalised mutual information (Studholme et al., Pattern Recognit. 32(1),
    1999).

    Each image is rescaled to [0, 1] by its own minimum and maximum over the mask voxels (per case and
    channel; the range is not differentiated) and every voxel votes into ``bins`` equally spaced bin
    centres 0 .. 1 with Gaussian weights of standard deviation ``sigma = sigma_ratio / (bins - 1)``
    (``sigma_ratio`` bin widths), normalised to sum 1 per voxel and truncated beyond 5 sigma (each
    voxel votes into 2 r + 1 bins, 5 for the default 0.5; see :func:`_parzen`); the joint histogram is
    the mask-weighted mean of the outer products, p(a, b), with marginals p(a), p(b). Then
    ``MI = H(A) + H(B) - H(A, B)`` (nats) and ``NMI = (H(A) + H(B)) / H(A, B)`` in [1, 2].
    Memory: (N C, V, (2 r + 1)^2) joint votes (V voxels).

    Returns ``-MI``, or ``-NMI`` with ``normalized=True``, to minimise. Invariant to any one-to-one
    intensity map up to binning. Shapes, mask and reduction as in the module docstring. Raises
    ValueError for mismatched shapes, fewer than 2 bins or a non-positive sigma_ratio.
    """
    return _mutual_information(fixed, moving, bins, sigma_ratio, normalized, mask, reduction)[0]


def _mutual_information(fixed, moving, bins, sigma_ratio, normalized, mask, reduction, fixed_parzen=None):
    """:func:`mutual_information` and the fixed image's Parzen votes (bin indices, weights times the
    voxel weights), which depend on the fixed image and mask only; `fixed_parzen` reuses them."""
    _check(fixed, moving, mask)
    if int(bins) < 2 or not float(sigma_ratio) > 0:
        raise ValueError(f"mutual information needs bins >= 2 (got {bins}) and sigma_ratio > 0 (got {sigma_ratio})")
    fixed, moving = _inside(mask, fixed, moving)
    bins = int(bins)
    n = fixed.shape[0]
    w = _per_channel(_weights(mask, fixed).repeat_interleave(fixed.shape[1], 0))
    vw = w.flatten(1)
    if fixed_parzen is None:
        ia, wa = _parzen(_per_channel(fixed), w, bins, float(sigma_ratio))
        fixed_parzen = (ia, wa * (vw / vw.sum(1, keepdim=True).clamp_min(_TINY))[..., None])
    ia, wa = fixed_parzen
    ib, wb = _parzen(_per_channel(moving), w, bins, float(sigma_ratio))
    votes = (wa[..., :, None] * wb[..., None, :]).flatten(1)                 # (M, V k^2)
    cells = (ia[..., :, None] * bins + ib[..., None, :]).flatten(1)
    joint = votes.new_zeros(votes.shape[0], bins * bins).scatter_add(1, cells, votes).view(-1, bins, bins)
    pa, pb = joint.sum(2), joint.sum(1)

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * torch.log(p.clamp_min(_TINY))).flatten(1).sum(1)

    ha, hb, hab = entropy(pa), entropy(pb), entropy(joint)
    value = (ha + hb) / hab.clamp_min(_TINY) if normalized else ha + hb - hab
    return _reduce(-value, n, reduction), fixed_parzen


# ---------------------------------------------------------------- modules

class _FixedCache:
    """What a similarity module computes from the fixed image and mask alone (LNCC's local statistics,
    MIND's descriptors, MI's Parzen votes), kept for the next call while the very same tensors come
    back unchanged: an optimiser's loop passes one fixed image per pyramid level. A tensor that requires gradients is
    never cached; an in-place change (its version counter) or another tensor invalidates the entry.
    The entry holds the tensors themselves, so no other tensor can take over their identity."""

    def __init__(self):
        self._key: tuple | None = None
        self._value: torch.Tensor | None = None

    @staticmethod
    def _key_of(fixed: torch.Tensor, mask: torch.Tensor | None) -> tuple | None:
        if fixed.requires_grad or (mask is not None and mask.requires_grad):
            return None
        return (fixed, fixed._version, mask, None if mask is None else mask._version)

    def get(self, fixed: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | tuple | None:
        key = self._key_of(fixed, mask)
        if key is None or self._key is None:
            return None
        same = key[0] is self._key[0] and key[2] is self._key[2] and key[1] == self._key[1] and key[3] == self._key[3]
        return self._value if same else None

    def put(self, fixed: torch.Tensor, mask: torch.Tensor | None, value: torch.Tensor | tuple) -> None:
        self._key = self._key_of(fixed, mask)
        if self._key is None:
            self._value = None
        else:
            self._value = tuple(v.detach() for v in value) if isinstance(value, tuple) else value.detach()


class MSE(nn.Module):
    """Module form of :func:`mse`; ``forward(fixed, moving, mask=None)``. `spacing` is accepted (and
    unused) so that every entry of :data:`SIMILARITIES` is built the same way."""

    def __init__(self, spacing: Sequence[float] | None = None, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, fixed, moving, mask=None):
        return mse(fixed, moving, mask, self.reduction)


class LNCC(nn.Module):
    """Module form of :func:`lncc` for images of voxel size `spacing` (mm, ITK order)."""

    def __init__(self, spacing: Sequence[float], window_mm: float = 9.0, eps: float = 1e-5,
                 reduction: str = "mean"):
        super().__init__()
        self.spacing = _check_spacing(spacing, len(spacing))
        lncc_window(self.spacing, window_mm)  # validates the window now
        self.window_mm, self.eps, self.reduction = window_mm, eps, reduction
        self._cache = _FixedCache()

    def forward(self, fixed, moving, mask=None):
        """As :func:`lncc`; the fixed image's local statistics are computed once per fixed image and
        mask (:class:`_FixedCache`): half the box filtering per call in an optimiser's loop."""
        stats = self._cache.get(fixed, mask)
        loss, stats = _lncc(fixed, moving, self.spacing, self.window_mm, mask, self.eps, self.reduction, stats)
        self._cache.put(fixed, mask, stats)
        return loss


class MINDSSC(nn.Module):
    """Module form of :func:`mind_loss` (radius and dilation in voxels; `spacing` unused)."""

    def __init__(self, spacing: Sequence[float] | None = None, radius: int = 1, dilation: int = 2,
                 reduction: str = "mean"):
        super().__init__()
        if int(radius) < 0 or int(dilation) < 1:
            raise ValueError(f"MIND radius {radius} must be >= 0 and dilation {dilation} >= 1 (voxels)")
        self.radius, self.dilation, self.reduction = int(radius), int(dilation), reduction
        self._cache = _FixedCache()

    def forward(self, fixed, moving, mask=None):
        """As :func:`mind_loss`; the fixed image's descriptors are computed once per fixed image and
        mask (:class:`_FixedCache`): half the descriptor work per call in an optimiser's loop."""
        descriptors = self._cache.get(fixed, mask)
        loss, descriptors = _mind_loss(fixed, moving, self.radius, self.dilation, mask, self.reduction, descriptors)
        self._cache.put(fixed, mask, descriptors)
        return loss


class NGF(nn.Module):
    """Module form of :func:`ngf` for images of voxel size `spacing` (mm, ITK order)."""

    def __init__(self, spacing: Sequence[float], eps: float | None = None, squared: bool = True,
                 reduction: str = "mean"):
        super().__init__()
        self.spacing = _check_spacing(spacing, len(spacing))
        self.eps, self.squared, self.reduction = eps, bool(squared), reduction

    def forward(self, fixed, moving, mask=None):
        return ngf(fixed, moving, self.spacing, self.eps, self.squared, mask, self.reduction)


class MutualInformation(nn.Module):
    """Module form of :func:`mutual_information` (`spacing` unused)."""

    def __init__(self, spacing: Sequence[float] | None = None, bins: int = 32, sigma_ratio: float = 0.5,
                 normalized: bool = False, reduction: str = "mean"):
        super().__init__()
        if int(bins) < 2 or not float(sigma_ratio) > 0:
            raise ValueError(f"mutual information needs bins >= 2 (got {bins}) and sigma_ratio > 0 "
                             f"(got {sigma_ratio})")
        self.bins, self.sigma_ratio, self.normalized, self.reduction = int(bins), float(sigma_ratio), \
            bool(normalized), reduction

        self._cache = _FixedCache()

    def forward(self, fixed, moving, mask=None):
        """As :func:`mutual_information`; the fixed image's Parzen votes are computed once per fixed
        image and mask (:class:`_FixedCache`)."""
        cached = self._cache.get(fixed, mask)
        loss, parzen = _mutual_information(fixed, moving, self.bins, self.sigma_ratio, self.normalized, mask,
                                           self.reduction, cached)
        self._cache.put(fixed, mask, parzen)
        return loss


#: Similarity modules by name; each is called as ``SIMILARITIES[name](spacing, **options)`` and the
#: module as ``module(fixed, moving, mask=None)``.
SIMILARITIES: dict[str, Callable[..., nn.Module]] = {
    "mse": MSE,
    "lncc": LNCC,
    "mind": MINDSSC,
    "ngf": NGF,
    "mi": MutualInformation,
}


def build_similarity(name: str, spacing: Sequence[float], **options) -> nn.Module:
    """``SIMILARITIES[name](spacing, **options)`` for a name given by a user (command line, config).

    Raises AtlasregError (one line, naming 'similarity') for an unknown name or an option the loss
    does not take or rejects.
    """
    if name not in SIMILARITIES:
        raise AtlasregError(f"similarity: unknown '{name}' (choose from {', '.join(SIMILARITIES)})")
    try:
        return SIMILARITIES[name](spacing, **options)
    except (TypeError, ValueError) as exc:
        raise AtlasregError(f"similarity '{name}': {str(exc).splitlines()[0]}") from None
