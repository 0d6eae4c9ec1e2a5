"""One-shot segmentation and cropping with DeepATLAS coordinate maps (Secs. 3.2.1, 5.2.4, 5.2.7).

Template mask (5.2.7, Eq. 14). Given the coordinate maps ``c_n`` of one or a few labelled exams and
their masks ``m_n``, the template-space mask M (on the atlas's grid) is the minimiser of

    sum_n || w_n (M o c_n - m_n) ||^2  +  lambda || grad M ||^2                    (Eq. 14 + lambda term)

(:func:`template_mask`), with ``M o c`` linear interpolation at corner-aligned coordinates
(:func:`atlasreg.deepatlas.coordinates.sample_at`) and w_n optional voxel weights (a foreground mask).
Propagation to a new exam samples M at its coordinates (:func:`propagate`, 3.2.1: "linear
interpolation resampling"), optionally thresholded.

Bounding cube (5.2.4). A box ``B_T`` of the template (min and max corner, normalised template
coordinates, ITK order) is projected onto an exam by the least-squares affine map ``A`` with
``B_T . A ~ B_n`` (:func:`cube_affine`), fitted over all the exam's voxels whose coordinates fall
inside the box, which is robust to outlying predictions; :func:`cube_vertices` projects the box's
corners and :func:`crop` resamples the exam on the box's grid (the cascade's "straight black arrow",
Fig. 6).

Choices where the paper is not explicit:

* *Eq. 14 with few exams is under-determined*: the template (twice the exam resolution, 5.1.2) has more
  voxels than one exam has observations, and voxels no exam reaches are not constrained at all; the
  minimum-norm solution is then spiky (values only next to the sample points) and propagates badly
  to other exams. A small membrane term ``lambda ||grad M||^2`` (forward differences in template
  voxels, lambda = 1e-3 by default) makes the solution unique: where exams give data it is Eq. 14's
  fit, elsewhere M is continued smoothly (harmonically) from the data. The system is symmetric
  positive definite and solved by conjugate gradients with a Jacobi preconditioner (its diagonal),
  to a relative residual of ``tol``; the system matrix ``W^T w W + lambda G^T G`` is assembled once as
  a sparse matrix (:func:`_sampling_matrix`, :func:`_membrane_matrix`), so that the iterations do not
  depend on the number of exam voxels (five native-resolution mouse scans: 5.7 M points).
  ``OMP_NUM_THREADS=1 python benchmarks/template_speed.py --labels 4 41 --exam 32,48,40 80,128,112``
  (a 64 x 96 x 80 template, one thread, beside one other 1-thread job): 4 labels 6.0 s and 12.8 s for
  the 32 x 48 x 40 and 80 x 128 x 112 exams, 41 labels (the mouse brain) 86 s and 96 s. Plain CG
  through grid_sample's autograd took 68.5 s for 4 labels on the small exam (the same problem, an
  ad-hoc run before this solver, on a busier machine); the 41-label mouse template did not finish in
  13 minutes, and the 5-scan one held 6.8 GB.
* *Paper's cohort*: 5.2.7 builds M from every labelled training exam; the same function takes one
  exam (one-shot) or a few.
* *Binarisation*: masks are used as given (binary, or soft in [0, 1]); :func:`propagate` thresholds
  at 0.5 when asked.
* *Cube points*: the pairs (template point, exam point) are ``(c_n(u), u)`` for the exam voxels u whose
  coordinate lies in the box. This needs no inversion of ``c_n``, and uses every point of ``B_T``
  that the exam shows.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch

from ..errors import AtlasregError
from .coordinates import check_coordinates, identity_coordinates, sample_at

__all__ = ["template_mask", "propagate", "cube_affine", "cube_vertices", "crop"]


def _check_maps(c: torch.Tensor, masks: torch.Tensor, weights: torch.Tensor | None) -> int:
    d = check_coordinates(c)
    if masks.dim() != c.dim() or masks.shape[0] != c.shape[0] or masks.shape[2:] != c.shape[2:]:
        raise ValueError(f"masks of shape {tuple(masks.shape)} do not match the coordinate maps {tuple(c.shape)}")
    if weights is not None and (weights.dim() != c.dim() or weights.shape[0] not in (1, c.shape[0])
                                or weights.shape[1] != 1 or weights.shape[2:] != c.shape[2:]):
        raise ValueError(f"weights of shape {tuple(weights.shape)} are not (N or 1, 1, *spatial) of the maps")
    return d


def _sampling_matrix(c: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The linear sampling at the coordinate maps c (N, D, *S) of a template of `size` (array order) as a
    sparse matrix W (N * prod(S), prod(size)), 2^D entries a row: ``W @ x.reshape(-1)`` equals
    :func:`~atlasreg.deepatlas.coordinates.sample_at` ``(x, c)`` (corner-aligned, border padding),
    flattened; x of one channel. Built explicitly (rather than through grid_sample's autograd) because
    Eq. 14's solver applies W and its transpose to 41-channel 3D templates hundreds of times: a sparse
    product is several times faster than grid_sample's backward pass (atomic adds)."""
    n, d = c.shape[:2]
    pts = c.detach().movedim(1, -1).reshape(-1, d).double()             # ITK order: component k = x, y, z
    extent = torch.tensor([float(v) for v in size[::-1]], dtype=torch.float64, device=c.device)
    p = ((pts + 1.0) / 2.0 * (extent - 1.0)).clamp(min=0.0).minimum(extent - 1.0)   # border padding
    i0 = p.floor().minimum(extent - 2.0)
    f = (p - i0).float()
    i0 = i0.long()
    strides = [math.prod(size[d - k:]) for k in range(d)]               # component k: array axis d - 1 - k
    rows = torch.arange(pts.shape[0], device=c.device)
    all_rows, all_cols, all_values = [], [], []
    for corner in range(2 ** d):
        bits = [(corner >> k) & 1 for k in range(d)]
        col = sum((i0[:, k] + bits[k]) * strides[k] for k in range(d))
        value = torch.ones_like(f[:, 0])
        for k in range(d):
            value = value * (f[:, k] if bits[k] else 1.0 - f[:, k])
        all_rows.append(rows)
        all_cols.append(col)
        all_values.append(value)
    indices = torch.stack([torch.cat(all_rows), torch.cat(all_cols)])
    shape = (pts.shape[0], math.prod(size))
    return torch.sparse_coo_tensor(indices, torch.cat(all_values).to(c.dtype), shape,
                                   check_invariants=False).coalesce()   # indices in range by construction


def _membrane_matrix(size: Sequence[int], dtype=torch.float32, device=None) -> torch.Tensor:
    """G^T G as a sparse matrix (prod(size) square): G the forward differences along every axis of the
    template (array order, template voxels), so that ``x^T G^T G x`` is the sum of their squares."""
    n = math.prod(size)
    index = torch.arange(n, device=device).reshape(*size)
    rows, cols, values = [], [], []
    for axis in range(len(size)):
        first = index.narrow(axis, 0, size[axis] - 1).reshape(-1)     # voxel i and its neighbour j
        second = index.narrow(axis, 1, size[axis] - 1).reshape(-1)
        for r, c_, v in ((first, first, 1.0), (second, second, 1.0), (first, second, -1.0), (second, first, -1.0)):
            rows.append(r)
            cols.append(c_)
            values.append(torch.full(r.shape, v, dtype=dtype, device=device))
    return torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(values), (n, n),
                                   check_invariants=False).coalesce()


def template_mask(c: torch.Tensor, masks: torch.Tensor, size: Sequence[int], weights: torch.Tensor | None = None,
                  smoothness: float = 1e-3, tol: float = 1e-5, max_iterations: int = 500) -> torch.Tensor:
    """The template-space mask M that best explains the exams' masks (5.2.7, Eq. 14; module docstring).

    c: (N, D, *S) coordinate maps of N labelled exams (one exam: one-shot). masks: (N, K, *S) their K
    structures' masks in [0, 1]. size: the template grid (array order), usually the atlas's. weights:
    optional (N or 1, 1, *S) voxel weights of the exams. smoothness: lambda of the membrane term
    (> 0). Returns M (1, K, *size), float, detached; near a mask's edges its values overshoot [0, 1]
    (a least-squares fit of a step by linear interpolation). Solved by conjugate gradients with a
    Jacobi preconditioner to a residual below ``tol`` times the right-hand side's (``max_iterations``
    at most). Raises ValueError for malformed inputs or smoothness <= 0.
    """
    d = _check_maps(c, masks, weights)
    size = tuple(int(n) for n in size)
    if len(size) != d or any(n < 2 for n in size):
        raise ValueError(f"template size {size} must have {d} axes of >= 2 voxels")
    if smoothness <= 0:
        raise ValueError(f"smoothness must be > 0, got {smoothness}")
    c = c.detach()
    dtype = c.dtype if c.is_floating_point() else torch.float32
    k = masks.shape[1]
    m = masks.detach().to(dtype).movedim(1, -1).reshape(-1, k)          # (N * prod(S), K)
    w = (torch.ones(m.shape[0], 1, dtype=dtype, device=c.device) if weights is None else
         weights.detach().to(dtype).expand(c.shape[0], 1, *c.shape[2:]).movedim(1, -1).reshape(-1, 1))
    W = _sampling_matrix(c.to(dtype), size)
    rows, cols = W.indices()
    Wt = torch.sparse_coo_tensor(torch.stack([cols, rows]), W.values(), (W.shape[1], W.shape[0]),
                                 check_invariants=False).coalesce()
    weighted = torch.sparse_coo_tensor(W.indices(), W.values() * w[rows, 0], W.shape, check_invariants=False)
    # The system matrix W^T w W + lambda G^T G (prod(size) square, at most 3^D entries a row) once: the
    # iterations then never touch the exams' voxels, which outnumber the template's (a native-resolution
    # 3D scan), and one sparse product a step replaces the sampling, its adjoint and the membrane.
    # Jacobi preconditioner: the system's diagonal (the membrane alone where no exam reaches). Without it
    # the scale differs by 1 / lambda between voxels the exams reach and those they do not, and a 3D
    # template of 64 x 96 x 80 voxels needed hundreds of iterations instead of tens (measured).
    with warnings.catch_warnings():   # "Sparse CSR tensor support is in beta state": CSR products are stable
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        system = (torch.sparse.mm(Wt, weighted.coalesce())
                  + smoothness * _membrane_matrix(size, dtype, c.device)).coalesce()
        (i, j), values = system.indices(), system.values()
        diagonal = torch.zeros(system.shape[0], 1, dtype=dtype, device=c.device).index_add_(
            0, i[i == j], values[i == j][:, None])
        system = system.to_sparse_csr()
        b = torch.sparse.mm(Wt.to_sparse_csr(), w * m)                   # (prod(size), K)

    def operator(X: torch.Tensor) -> torch.Tensor:  # (W^T w W + lambda G^T G) X
        return torch.sparse.mm(system, X)

    x = torch.zeros_like(b)
    r = b.clone()
    z = r / diagonal
    p = z.clone()
    rz = (r * z).sum()
    stop = (tol * torch.sqrt((b * b).sum())) ** 2
    for _ in range(max_iterations):
        if (r * r).sum() <= stop:
            break
        Ap = operator(p)
        alpha = rz / (p * Ap).sum()
        x = x + alpha * p
        r = r - alpha * Ap
        z = r / diagonal
        rz_new = (r * z).sum()
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x.t().reshape(1, k, *size).contiguous()


def propagate(template: torch.Tensor, c: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """One-shot segmentation (3.2.1): the template mask (1, K, *size_t) sampled at an exam's coordinate
    map c (N, D, *S) by linear interpolation (``M o c_n``): (N, K, *S) values, or 0/1 masks (value >
    `threshold`) when a threshold is given (0.5 for masks)."""
    values = sample_at(template, c, mode="bilinear", padding="border")
    return values if threshold is None else (values > threshold).to(values.dtype)


def _box(box_min: Sequence[float], box_max: Sequence[float], d: int, device, dtype):
    lo = torch.as_tensor(box_min, dtype=dtype, device=device).reshape(-1)
    hi = torch.as_tensor(box_max, dtype=dtype, device=device).reshape(-1)
    if lo.numel() != d or hi.numel() != d or not bool((hi > lo).all()):
        raise ValueError(f"a {d}D box needs {d} minima below {d} maxima, got {list(map(float, lo))} and "
                         f"{list(map(float, hi))}")
    return lo, hi


def cube_affine(c: torch.Tensor, box_min: Sequence[float], box_max: Sequence[float],
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares affine projection of a template box onto exams (5.2.4): ``u ~ A p + t`` for every
    exam voxel u (the exam's corner-aligned normalised coordinates) whose template coordinate
    ``p = c(u)`` lies inside the box (``B_T . A ~ B_n``).

    c: (N, D, *S) coordinate maps. box_min, box_max: D values each, template coordinates (normalised,
    ITK order). weights: optional (N or 1, 1, *S) foreground weights (voxels with weight 0 are left
    out). Returns (A (N, D, D), t (N, D)), template -> exam, normalised units. Raises AtlasregError if
    an exam shows too little of the box to fit a D-dimensional affine map (fewer than D + 1 voxels in
    general position), ValueError for malformed arguments.
    """
    d = check_coordinates(c)
    lo, hi = _box(box_min, box_max, d, c.device, c.dtype)
    if weights is not None and (weights.dim() != c.dim() or weights.shape[1] != 1 or weights.shape[2:] != c.shape[2:]
                                or weights.shape[0] not in (1, c.shape[0])):
        raise ValueError(f"weights of shape {tuple(weights.shape)} are not (N or 1, 1, *spatial) of the maps")
    u = identity_coordinates(c.shape[2:], c.device, c.dtype)[0].flatten(1).T  # (P, D)
    As, ts = [], []
    for n in range(c.shape[0]):
        p = c[n].detach().flatten(1).T  # (P, D)
        inside = ((p >= lo) & (p <= hi)).all(1)
        if weights is not None:
            inside &= weights[min(n, weights.shape[0] - 1), 0].flatten() > 0
        X = torch.cat([p[inside], torch.ones_like(p[inside, :1])], 1)  # (P_in, D + 1)
        if X.shape[0] < d + 1 or int(torch.linalg.matrix_rank(X)) < d + 1:
            raise AtlasregError(f"exam {n} shows {int(inside.sum())} voxels of the box {lo.tolist()} - {hi.tolist()}, "
                                f"too few to project it (needs {d + 1} in general position)")
        B = torch.linalg.lstsq(X.double(), u[inside].double()).solution.to(c.dtype)  # (D + 1, D)
        As.append(B[:d].T)
        ts.append(B[d])
    return torch.stack(As), torch.stack(ts)


def cube_vertices(A: torch.Tensor, t: torch.Tensor, box_min: Sequence[float], box_max: Sequence[float]) -> torch.Tensor:
    """The 2^D corners of a template box projected by :func:`cube_affine`'s maps: (N, 2^D, D), exam
    normalised coordinates (ITK order); corner k takes the maximum along axis j when bit j of k is set."""
    d = A.shape[-1]
    lo, hi = _box(box_min, box_max, d, A.device, A.dtype)
    corners = torch.stack([torch.where(torch.tensor([(k >> j) & 1 for j in range(d)], dtype=torch.bool,
                                                    device=A.device), hi, lo) for k in range(2 ** d)])
    return corners @ A.transpose(1, 2) + t[:, None, :]


def crop(image: torch.Tensor, A: torch.Tensor, t: torch.Tensor, box_min: Sequence[float], box_max: Sequence[float],
         size: Sequence[int]) -> torch.Tensor:
    """Resample exams onto a template box (5.2.4, Fig. 6): a grid of `size` (array order) spanning the
    box corner to corner in template coordinates, mapped into each exam by its affine (A, t) from
    :func:`cube_affine`, where the exam (N, C, *S) is sampled linearly (zeros outside the exam).
    Returns (N, C, *size): the region in a standard field of view and orientation."""
    d = A.shape[-1]
    lo, hi = _box(box_min, box_max, d, image.device, image.dtype)
    grid = identity_coordinates(size, image.device, image.dtype)  # [-1, 1] corner to corner
    shape = (1, d, *[1] * d)
    template_points = lo.view(shape) + (grid + 1) * 0.5 * (hi - lo).view(shape)
    template_points = template_points.expand(A.shape[0], *grid.shape[1:])
    exam_points = torch.einsum("nij,nj...->ni...", A.to(image.dtype), template_points)
    exam_points = exam_points + t.to(image.dtype).view(A.shape[0], d, *[1] * d)
    return sample_at(image, exam_points, padding="zeros")
