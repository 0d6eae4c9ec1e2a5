"""Global rigid initialiser: exhaustive search by FFT cross-similarity of normalised gradient fields.

Cross-Sim-NGF (Oefverstedt, Lindblad, Sladoje, "Cross-Sim-NGF: FFT-based global rigid multimodal
alignment of image volumes using normalized gradient fields", WBIR 2022, Secs. 2-3; the proceedings
are in ``shared/papers/wbir-2022-proceedings.txt``). For every rotation of a coarse-to-fine set, the
moving image is resampled in the rotated frame, and the masked cross-similarity of squared NGF
(Eqs. 2, 4-5)

    CSNGF(k) = sum_u M_A(u) M_B(u + k) <n_A(u), n_B(u + k)>^2 / N(k)

is computed for *all* integer shifts k at once: the squared dot product splits into D(D+1)/2 products
of NGF components (Eq. 6), each a cross-correlation done by FFT. The best (rotation, shift) over all
rotations is the rigid transform. Shifts whose mask overlap ``(M_A * M_B)(k)`` is below
``min_overlap`` of the smaller mask are excluded, so shifts with little overlap are never chosen.

Overlap normalisation N(k). The paper divides by the number of overlapping voxels
(``normalisation="overlap"``, Eq. 5). With field-of-view masks around an object on a background this
favours shifts and rotations that push background out of the overlap (a rotated square overlaps a
square less): on the 2D phantom of tests/test_rigid.py it missed an unrotated, shifted copy by 3.8
degrees (2.1 mm at a working spacing of 1.5 mm). The default, ``normalisation="gradients"``, divides
by the gradient energy in the overlap, ``N(k) = sum_u M_A M_B (|n_A|^2 + |n_B|^2) / 2``, an upper bound
of the numerator (|n| < 1, so ``<n_A, n_B>^2 <= |n_A|^2 |n_B|^2 <= (|n_A|^2 + |n_B|^2) / 2``): the score
lies in [0, 1], is 1 only where all edges in the overlap coincide, and flat background counts for
nothing (same phantom: 0.0 degrees, 0.001 mm). Shifts whose overlapping gradient energy is below
``min_overlap / 2`` of the smaller image's are excluded as well.

Other departures from the paper:

* Rotations come from a deterministic set (2D: every ``step`` degrees over 0-360; 3D: a super-Fibonacci
  spiral over SO(3), Alexa CVPR 2022) instead of random samples, and the best few are refined by a
  compass pattern search (rotations by +-step about each axis, the step halving) that scores only the
  shifts within _MARGIN working voxels of each candidate's, instead of new random samples.
* The NGF's epsilon is ``eps`` times each image's mean gradient norm inside its mask (``eps`` = 1), so
  it does not depend on the intensity unit. The paper's 1e-5 for [0, 1] intensities treats every
  gradient alike; with 5% noise on the 2D phantom, 7 of 20 cases were within tolerance at eps = 0.1,
  17 at 1, 19 at 2 (``benchmarks/rigid_success.py --dims 2 --angles 0 45 90 135 180 --shifts 0 20
  --repeats 2 --eps E``).
* Images are blurred to sigma = the working spacing (the paper's sigma is 1.25-1.5 working voxels;
  8 of the 20 cases above at half of it) by normalised convolution inside their masks, so that the
  field-of-view border makes no edge.
* The peak shift is refined to sub-voxel precision by a parabola per axis, and rotations are compared
  by the parabola's peak value.

Conventions are those of :mod:`atlasreg.spatial`: world coordinates in mm, components in ITK order
(x, y[, z]), images in array order. The result ``T`` maps *fixed* world points to *moving* world points
(ITK's resampling convention), so ``T.warp(moving, moving_grid, fixed_grid)`` is the moving image on the
fixed grid. Fixed and moving may have any grids (size, spacing, origin, direction); one code path for
2D and 3D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation

from ..errors import AtlasregError
from ..losses.similarity import _gradient, ngf_field
from ..spatial.grid import Grid
from ..spatial.transforms import AffineTransform, sample

#: Constants of the super-Fibonacci spiral (Alexa, CVPR 2022, Algorithm 1).
_PHI = math.sqrt(2.0)
_PSI = 1.533751168755204288118041
#: Gaussian blur before resampling onto a working grid of spacing h: sigma = _BLUR h (anti-aliasing).
_BLUR = 1.0
#: Polls of the pattern search at one step size (it moves on while a neighbour scores better).
_POLLS = 3
#: Shifts searched around a candidate's offset in the pattern search, in working voxels per side.
_MARGIN = 4


# ---------------------------------------------------------------- normalised gradient fields
# The field n = grad I / sqrt(|grad I|^2 + eps^2) (Cross-Sim-NGF Eq. 1) is the similarity losses' own
# (atlasreg.losses.similarity.ngf_field, gradients in world units), with an absolute eps here.


def _features(ngf: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The D(D+1)/2 products n_i n_j M (i <= j) of Eq. 6, cross terms weighted by sqrt(2), so that the
    sum over channels of their products with another image's is <n_A, n_B>^2. (N, P, *spatial)."""
    d = ngf.shape[1]
    out = [(1.0 if i == j else math.sqrt(2.0)) * ngf[:, i] * ngf[:, j] * mask[:, 0]
           for i in range(d) for j in range(i, d)]
    return torch.stack(out, 1)


# ---------------------------------------------------------------- rotation sets

def _global_rotations(ndim: int, step: float) -> np.ndarray:
    """A deterministic set of rotations covering the rotation group, (K, D, D) float64.

    2D: every `step` degrees over [0, 360). 3D: the super-Fibonacci spiral (Alexa, CVPR 2022) of
    K = ceil(pi / (r - sin r)) rotations, r = `step` in radians (K rotation-angle balls of radius r
    have the volume of SO(3)). Measured (20000 random rotations): the nearest rotation of the set is
    at most 29 degrees away for step 20 (446 rotations), 45 degrees for step 30 (134); mean 16 / 24.
    """
    if ndim == 2:
        angles = np.deg2rad(np.arange(0.0, 360.0 - 1e-9, step))
        c, s = np.cos(angles), np.sin(angles)
        return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    r = math.radians(step)
    n = int(math.ceil(math.pi / (r - math.sin(r))))
    i = np.arange(n, dtype=np.float64) + 0.5
    s = i / n
    a, b = np.sqrt(s), np.sqrt(1.0 - s)
    alpha, beta = 2.0 * math.pi * i / _PHI, 2.0 * math.pi * i / _PSI
    quat = np.stack([a * np.sin(alpha), a * np.cos(alpha), b * np.sin(beta), b * np.cos(beta)], -1)
    return Rotation.from_quat(quat).as_matrix()


def _local_rotations(ndim: int, step: float) -> tuple[np.ndarray, int]:
    """The identity and the rotations by +-`step` degrees about each axis (x, y, z in 3D; one in 2D):
    one poll of a compass pattern search. Returns ((2 P + 1, D, D) float64, index of the identity)."""
    axes = 1 if ndim == 2 else 3
    vecs = np.concatenate([np.zeros((1, axes)), np.eye(axes), -np.eye(axes)]) * math.radians(step)
    if ndim == 2:
        c, s = np.cos(vecs[:, 0]), np.sin(vecs[:, 0])
        return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2), 0
    return Rotation.from_rotvec(vecs).as_matrix(), 0


def _rotation_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Angle in degrees of the rotation a b^T (D x D)."""
    d = a.shape[-1]
    cos = (np.trace(a @ b.T) - (d - 2)) / 2.0
    return float(np.rad2deg(np.arccos(np.clip(cos, -1.0, 1.0))))


# ---------------------------------------------------------------- inputs and working grids

def _image(x, grid: Grid, key: str, mask: bool = False) -> torch.Tensor:
    """(1, 1, *grid.size) float32 from a tensor or array of shape grid.size or (1, 1, *grid.size)."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if tuple(t.shape) not in (grid.size, (1, 1, *grid.size)):
        raise AtlasregError(f"{key}: shape {tuple(t.shape)} does not match its grid {grid.size} "
                            f"(expected {grid.size} or (1, 1, *size))")
    t = t.reshape(1, 1, *grid.size).to(torch.float32)
    if not torch.isfinite(t).all():
        raise AtlasregError(f"{key}: has non-finite values")
    if mask:
        t = (t > 0).to(torch.float32)
        if t.sum() == 0:
            raise AtlasregError(f"{key}: mask is empty")
    return t


@dataclass(frozen=True)
class _Smoothed:
    """An image smoothed for one working spacing and its mask, on a pooled version of its own grid with
    one voxel more on every side (image replicated, mask zero), so that sampling both with border
    padding continues the image and gives a zero mask outside."""

    data: torch.Tensor  # (1, 2, *grid.size): image, blurred mask (> 0.5 inside)
    grid: Grid


def _smooth(image: torch.Tensor, mask: torch.Tensor, grid: Grid, h: float) -> _Smoothed:
    """Area-pool to about h / 2 (mm), then Gaussian-blur to sigma = _BLUR h in all by normalised
    convolution, blur(I M) / blur(M), so that nothing outside the mask (or the field of view) leaks in
    and the border makes no edge. Blur by MONAI's GaussianFilter."""
    d = grid.ndim
    factor = [min(n, max(1, int(h / (2.0 * s)))) for s, n in zip(grid.spacing, grid.size_xyz)]  # ITK order
    num, den = image * mask, mask
    if any(f > 1 for f in factor):
        pool = tuple(reversed(factor))
        pooling = F.avg_pool2d if d == 2 else F.avg_pool3d
        num, den = pooling(num, pool, pool), pooling(den, pool, pool)
    spacing = tuple(s * f for s, f in zip(grid.spacing, factor))
    origin = grid.index_to_world(np.array([(f - 1) / 2.0 for f in factor]))  # first block's centre
    pooled = Grid(tuple(num.shape[2:]), spacing, tuple(origin.tolist()), grid.direction)
    # A pooled voxel already has about the blur of a box of its width (variance s^2 / 12 ~ (s / 2)^2 / 3).
    sigma = [math.sqrt(max((_BLUR * h) ** 2 - (s / 2.0) ** 2, 0.0)) / s for s in spacing]
    if max(sigma) > 0.1:
        from monai.networks.layers import GaussianFilter  # here: importing MONAI takes seconds

        blur = GaussianFilter(d, sigma=list(reversed(sigma)))
        num, den = blur(num), blur(den)
    image = torch.where(den > 1e-6, num / den.clamp_min(1e-6), torch.zeros_like(num))
    pad = (1, 1) * d
    data = torch.cat([F.pad(image, pad, mode="replicate"), F.pad(den, pad)], 1)
    return _Smoothed(data, pooled.resampled(tuple(n + 2 for n in pooled.size), pooled.spacing))


def _fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (a fast FFT length)."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


@dataclass
class _Level:
    """One working spacing h: the fixed image's NGF features on its working grid, the moving image
    smoothed for h."""

    h: float
    fixed_size: tuple[int, ...]     # the fixed working grid, array order
    fixed: torch.Tensor             # (1, P + 2, *fixed_size): features, mask, gradient energy |n_A|^2 M_A
    fixed_count: float              # voxels in the fixed mask
    fixed_energy: float             # sum |n_A|^2 M_A
    diagonal: int                   # voxels of h across the moving field of view's diagonal
    moving: _Smoothed
    moving_eps: float = 0.0
    ffts: dict = field(default_factory=dict)  # FFT shape -> conjugated rfft of `fixed`


def _prepare(a: torch.Tensor, b: torch.Tensor, ma: torch.Tensor, mb: torch.Tensor, fixed_grid: Grid,
             moving_grid: Grid, h: float, eps: float) -> _Level:
    """The level of working spacing `h` (mm). Fixed working grid: the fixed grid's centre and
    direction, spacing h, covering its field of view."""
    d = fixed_grid.ndim
    fs = _smooth(a, ma, fixed_grid, h)
    extent_f = np.asarray(fixed_grid.size_xyz) * np.asarray(fixed_grid.spacing)
    size_f = tuple(int(max(2, math.ceil(e / h))) for e in extent_f[::-1])
    pts = fixed_grid.resampled(size_f, (h,) * d).points()  # world points: the pooled grid's centre may differ
    a_w, ma_w = sample(fs.data, pts, fs.grid).split(1, 1)
    ma_w = (ma_w > 0.5).float()
    count = float(ma_w.sum())
    if count < 1:
        raise AtlasregError(f"fixed_mask: no voxel inside the mask at the working spacing {h:g} mm")
    na = ngf_field(a_w, (h,) * d, _relative_eps(a_w, ma_w, h, eps, "fixed"))
    energy = na.pow(2).sum(1, keepdim=True) * ma_w
    extent_m = np.asarray(moving_grid.size_xyz) * np.asarray(moving_grid.spacing)
    diagonal = int(max(2, math.ceil(float(np.linalg.norm(extent_m)) / h)))
    level = _Level(h, size_f, torch.cat([_features(na, ma_w), ma_w, energy], 1), count, float(energy.sum()),
                   diagonal, _smooth(b, mb, moving_grid, h))
    # The moving image's eps at the identity rotation (its mean gradient norm barely changes with R).
    b0, mb0 = _moving_batch(level, fixed_grid, moving_grid, np.eye(d)[None], np.zeros((1, d)), (diagonal,) * d)
    level.moving_eps = _relative_eps(b0, mb0, h, eps, "moving")
    return level


def _relative_eps(image: torch.Tensor, mask: torch.Tensor, h: float, eps: float, key: str) -> float:
    """`eps` times the mean gradient norm (intensity per mm) inside the mask; error if it is zero."""
    norm = _gradient(image, (h,) * (image.dim() - 2)).norm(dim=1, keepdim=True)
    mean = float((norm * mask).sum() / mask.sum().clamp_min(1.0))
    scale = float((image * mask).abs().max()) / h  # float32 round-off of a constant: ~1e-7 of this
    if not mean > 1e-5 * scale + 1e-30:
        raise AtlasregError(f"{key}: the image is constant inside its mask (no gradient to align)")
    return eps * mean


def _moving_batch(level: _Level, fixed_grid: Grid, moving_grid: Grid, rotations: np.ndarray,
                  centres: np.ndarray, size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The smoothed moving image and its (binary) mask on the rotated working grids of `size` (array
    order, spacing h): for rotation R_k (K, D, D) and centre offset nu_k (K, D) mm, the grid point of
    centred coordinate v lies at the world point c_m + R_k D_f (nu_k + v). Returns (K, 1, *size) twice."""
    d = fixed_grid.ndim
    ms = level.moving
    v = Grid.centred(size, (level.h,) * d).points()[0]  # (*size, D)
    # Centred coordinates of the pooled moving grid (direction D_m): D_m^T (c_m - c_p + R D_f (nu + v)).
    Dm = ms.grid.direction_matrix
    axes = Dm.T @ rotations @ fixed_grid.direction_matrix
    shift = Dm.T @ (moving_grid.centre - ms.grid.centre) + np.einsum("kij,kj->ki", axes, centres)
    pts = (torch.einsum("kij,...j->k...i", torch.as_tensor(axes, dtype=torch.float32), v)
           + torch.as_tensor(shift, dtype=torch.float32).view(-1, *[1] * d, d))
    k = rotations.shape[0]
    b, mb = sample(ms.data.expand(k, *ms.data.shape[1:]), pts, ms.grid, centred=True).split(1, 1)
    return b, (mb > 0.5).float()


def _score(level: _Level, fixed_grid: Grid, moving_grid: Grid, rotations: np.ndarray, centres: np.ndarray | None,
           min_overlap: float, normalisation: str, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """The best CSNGF over the shifts for each of the (K, D, D) `rotations`.

    centres None: every shift (the moving working grid is a cube as wide as its field of view's
    diagonal, so that every rotation fits; the FFTs are padded to n_f + n_m - 1, no wrap-around).
    centres (K, D) mm: only the shifts within _MARGIN working voxels of the offset ``centres[k]`` (the
    moving working grid is the fixed one plus _MARGIN voxels a side; no padding needed).
    Returns (scores (K,), offsets (K, D)): the parabola-interpolated peak value, and the offset delta
    (mm, ITK order, along the fixed grid's axes) of the moving working grid's coordinates against the
    fixed one's at the peak (a fixed grid point u meets the moving one at v = u + delta), sub-voxel.
    """
    d = fixed_grid.ndim
    dims, out = tuple(range(2, 2 + d)), tuple(range(1, 1 + d))
    p = d * (d + 1) // 2
    n_f = level.fixed_size
    if centres is None:
        n_m = (level.diagonal,) * d
        L = tuple(_fft_size(a + b - 1) for a, b in zip(n_f, n_m))
        centres, window = np.zeros((len(rotations), d)), None
    else:
        n_m = tuple(n + 2 * _MARGIN for n in n_f)
        L = tuple(_fft_size(n) for n in n_m)
        grids = torch.meshgrid(*[torch.arange(n) <= 2 * _MARGIN for n in L], indexing="ij")
        window = torch.stack(grids).all(0)  # shifts k in [0, 2 margin]: u + k stays in the grid
    if L not in level.ffts:
        level.ffts[L] = torch.fft.rfftn(level.fixed, s=L, dim=dims).conj()
    fa = level.ffts[L]
    scores, offsets = [], []
    for start in range(0, rotations.shape[0], batch):
        rot, nu = rotations[start:start + batch], centres[start:start + batch]
        b, mb = _moving_batch(level, fixed_grid, moving_grid, rot, nu, n_m)
        nb = ngf_field(b, (level.h,) * d, level.moving_eps)
        energy = nb.pow(2).sum(1, keepdim=True) * mb
        fb = torch.fft.rfftn(torch.cat([_features(nb, mb), mb, energy], 1), s=L, dim=dims)
        num = torch.fft.irfftn((fa[:, :p] * fb[:, :p]).sum(1), s=L, dim=out)
        overlap = torch.fft.irfftn(fa[:, p] * fb[:, p], s=L, dim=out)
        valid = overlap >= min_overlap * torch.clamp(mb.flatten(1).sum(1), max=level.fixed_count).view(-1, *[1] * d)
        if normalisation == "overlap":  # Eq. 5
            den = overlap
        else:
            den = 0.5 * torch.fft.irfftn(fa[:, p + 1] * fb[:, p] + fa[:, p] * fb[:, p + 1], s=L, dim=out)
            smaller = torch.clamp(energy.flatten(1).sum(1), max=level.fixed_energy).view(-1, *[1] * d)
            valid &= den >= 0.5 * min_overlap * smaller
        valid &= den > 1e-6
        if window is not None:
            valid &= window
        csngf = torch.where(valid, num / den.clamp_min(1e-6), torch.full_like(num, -1.0)).flatten(1)
        best, idx = csngf.max(1)
        index = torch.stack(torch.unravel_index(idx, L), -1)  # (K, D) array order
        peak, frac = best.double(), torch.zeros(len(rot), d, dtype=torch.float64)
        for ax in range(d):  # a parabola through the peak and its two neighbours, per axis
            stride, i = int(np.prod(L[ax + 1:])), index[:, ax]
            sm = csngf.gather(1, (idx + ((i - 1) % L[ax] - i) * stride)[:, None])[:, 0].double()
            sp = csngf.gather(1, (idx + ((i + 1) % L[ax] - i) * stride)[:, None])[:, 0].double()
            curv = sm - 2.0 * best.double() + sp
            ok = (sm >= 0) & (sp >= 0) & (curv < 0)
            frac[:, ax] = torch.where(ok, (0.5 * (sm - sp) / torch.where(ok, curv, -1.0)).clamp(-0.5, 0.5), 0.0)
            peak = peak - torch.where(ok, 0.5 * curv * frac[:, ax] ** 2, 0.0)
        k = torch.where(index < torch.tensor(n_m), index, index - torch.tensor(L)).double()  # circular -> shift
        shift = (k + frac + (torch.tensor(n_f) - torch.tensor(n_m)) / 2.0) * level.h  # array order, mm
        scores.append(peak.numpy())
        offsets.append(nu + shift.flip(-1).numpy())  # ITK order
    return np.concatenate(scores), np.concatenate(offsets)


def _best_distinct(rotations: np.ndarray, scores: np.ndarray, keep: int, separation: float) -> list[int]:
    """Indices of the `keep` best rotations, each at least `separation` degrees from those before."""
    chosen: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if all(_rotation_angle(rotations[i], rotations[j]) >= separation for j in chosen):
            chosen.append(int(i))
            if len(chosen) == keep:
                break
    return chosen


def rigid_search(fixed, moving, fixed_grid: Grid, moving_grid: Grid, fixed_mask=None, moving_mask=None, *,
                 spacing: float | None = None, max_size: int | None = None, step: float | None = None,
                 final_step: float = 1.0, keep: int = 6, min_overlap: float = 0.5, eps: float = 1.0,
                 normalisation: str = "gradients", batch: int = 16) -> AffineTransform:
    """Global rigid alignment of `moving` to `fixed` by Cross-Sim-NGF (WBIR 2022; the module docstring
    gives the method and where it departs from the paper).

    fixed, moving: tensors or arrays of shape ``grid.size`` (array order) or ``(1, 1, *grid.size)`` on
    `fixed_grid` and `moving_grid` (any size, spacing, origin and direction; both 2D or both 3D), in
    any intensity unit and contrast (the squared NGF is invariant to an inverted contrast).
    fixed_mask, moving_mask: optional, same shapes; nonzero marks the voxels to compare (default: the
    whole field of view).

    Resolution: the working spacing is ``h = max(spacing, E / max_size)`` mm, E the largest
    field-of-view extent of the two images (spacing: none, max_size: 64 in 2D and 32 in 3D by
    default). The global search (every rotation of the set, every shift) runs at 2h; the pattern
    search runs at 2h while its step is at least ``step / 4`` degrees, then at h.
    step: the global rotation step in degrees (10 in 2D: 36 angles over 0-360; 20 in 3D: 446
    rotations over SO(3), none farther than 29 degrees from any rotation).
    final_step: the pattern search halves its step from ``step / 2`` down to the first step
    <= final_step degrees.
    keep: how many distinct best rotations of the global search the pattern search refines at 2h;
    the best of them at h continues alone.
    min_overlap: the smallest mask overlap kept, as a fraction of the smaller mask (the paper's gamma).
    eps: the NGF's epsilon as a multiple of each image's mean gradient norm inside its mask.
    normalisation: "gradients" (default) or "overlap" (the paper's Eq. 5).
    batch: rotations per FFT batch (memory: about batch * (D(D+1)/2 + 2) * prod(FFT shape) complex
    numbers; the FFT shape is about 2.7 E / (2h) per axis in the global search).

    Returns the rigid ``AffineTransform`` (batch 1, float32) ``T(x) = R x + t`` mapping fixed world
    points (mm) to moving world points: R a rotation (det +1), t in mm. It is a starting point for an
    affine or deformable registration; on the phantoms of tests/test_rigid.py every phantom point lies
    within h / 2 of its true position and the rotation within 3 degrees (measured errors there), and
    benchmarks/rigid_success.py gives success rates against angle and shift. Cost: 0.1 s for a 2D pair
    and about 7 s for a 3D pair with the defaults on one CPU thread (benchmarks/rigid_success.py).
    Raises AtlasregError (one line naming the argument) for a grid that is not a Grid, grids of
    different dimension, a shape that does not match its grid, non-finite values, an empty mask, an
    image constant inside its mask, or a parameter out of range.
    """
    for key, grid in (("fixed_grid", fixed_grid), ("moving_grid", moving_grid)):
        if not isinstance(grid, Grid):
            raise AtlasregError(f"{key}: expected a Grid, got {type(grid).__name__}")
    if fixed_grid.ndim != moving_grid.ndim:
        raise AtlasregError(f"moving_grid: {moving_grid.ndim}D, but fixed_grid is {fixed_grid.ndim}D")
    d = fixed_grid.ndim
    step = float(step if step is not None else (10.0 if d == 2 else 20.0))
    max_size = int(max_size if max_size is not None else (64 if d == 2 else 32))
    for key, value, ok in (("spacing", spacing, spacing is None or spacing > 0),
                           ("max_size", max_size, max_size >= 8), ("step", step, 0 < step <= 90),
                           ("final_step", final_step, 0 < final_step <= step), ("keep", keep, keep >= 1),
                           ("min_overlap", min_overlap, 0 < min_overlap <= 1), ("eps", eps, eps > 0),
                           ("normalisation", normalisation, normalisation in ("gradients", "overlap")),
                           ("batch", batch, batch >= 1)):
        if not ok:
            raise AtlasregError(f"{key}: {value!r} is out of range")
    a = _image(fixed, fixed_grid, "fixed")
    b = _image(moving, moving_grid, "moving")
    ma = torch.ones_like(a) if fixed_mask is None else _image(fixed_mask, fixed_grid, "fixed_mask", mask=True)
    mb = torch.ones_like(b) if moving_mask is None else _image(moving_mask, moving_grid, "moving_mask", mask=True)
    extent = max(float(np.max(np.asarray(g.size_xyz) * np.asarray(g.spacing))) for g in (fixed_grid, moving_grid))
    h = max(float(spacing or 0.0), extent / max_size)
    levels: dict[float, _Level] = {}

    def score(rotations, spacing_mm, centres=None):
        if spacing_mm not in levels:
            levels[spacing_mm] = _prepare(a, b, ma, mb, fixed_grid, moving_grid, spacing_mm, eps)
        return _score(levels[spacing_mm], fixed_grid, moving_grid, rotations, centres, min_overlap,
                      normalisation, batch)

    with torch.no_grad():
        rotations = _global_rotations(d, step)
        scores, offsets = score(rotations, 2.0 * h)
        beams = [(rotations[i], scores[i], offsets[i]) for i in _best_distinct(rotations, scores, keep, step)]
        a_step, spacing_mm = step / 2.0, 2.0 * h
        while True:
            if a_step < step / 4.0 and spacing_mm != h:  # on to the fine level, with the best beam only
                spacing_mm = h
                sc, off = score(np.stack([r for r, _, _ in beams]), h, np.stack([o for _, _, o in beams]))
                j = int(np.argmax(sc))
                beams = [(beams[j][0], sc[j], off[j])]
            local, centre = _local_rotations(d, a_step)
            m = local.shape[0]
            for _ in range(_POLLS):  # poll the neighbours of every beam; move while one is better
                cand = np.concatenate([local @ r for r, _, _ in beams])
                sc, off = score(cand, spacing_mm, np.repeat(np.stack([o for _, _, o in beams]), m, 0))
                moved = False
                for j in range(len(beams)):
                    i = j * m + int(np.argmax(sc[j * m:(j + 1) * m]))
                    moved |= i != j * m + centre
                    beams[j] = (cand[i], sc[i], off[i])
                if not moved:
                    break
            if a_step <= final_step:
                break
            a_step /= 2.0
    rot, _, off = max(beams, key=lambda beam: beam[1])
    c_f, c_m, D_f = fixed_grid.centre, moving_grid.centre, fixed_grid.direction_matrix
    # u (fixed working grid, x = c_f + D_f u) meets v = u + delta (moving, x' = c_m + R D_f v), so
    # T(x) = R x + c_m - R c_f + R D_f delta.
    return AffineTransform.from_numpy(rot, c_m - rot @ c_f + rot @ D_f @ off)
