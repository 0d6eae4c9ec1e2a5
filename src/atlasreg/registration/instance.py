"""Instance optimisation: fit one transform to a fixed and a moving image by gradient descent.

The approach of the instance optimisation step of VoxelMorph++ and ConvexAdam (WBIR 2022,
``shared/papers/wbir-2022-proceedings.txt``: "a single instance optimisation with hand-crafted
features and the Adam optimiser", B-spline and diffusion regularisation, 50 iterations), generalised
to four transform models of :mod:`atlasreg.spatial.transforms`, a coarse-to-fine pyramid and world
units throughout:

* ``'affine'``: :class:`AffineTransform` ``x -> A x + t`` about the fixed grid's centre;
* ``'dense'``: :class:`DisplacementField` ``x -> x + u(x)``, u on the level's grid;
* ``'bspline'``: :class:`BSplineTransform`, a cubic free-form deformation (Rueckert 1999) whose control
  points are ``control_spacing`` mm apart at every level;
* ``'svf'``: :class:`StationaryVelocityField` ``x -> exp(v)(x)`` (scaling and squaring, Arsigny 2006),
  v on the level's grid: diffeomorphic, with the exact inverse ``exp(-v)``.

The transform T maps fixed world points to moving world points (ITK's resampling convention, as
everywhere in atlasreg): the moving image warped onto the fixed grid is ``moving o T``, the moving
image sampled at T(x) for every fixed voxel centre x, so the two images may lie on different grids.
With an ``initial`` transform T0 (a rigid or affine start, a network's output) the result is
``T = T0 o D``: the optimised part D acts first, in the fixed image's space, and T0 carries its points
into the moving image. The objective minimised at each level is

    similarity(moving o T, fixed, mask) + lam * R(D - id),

R the diffusion regulariser ``mean sum_ij (du_i/dx_j)^2`` (dimensionless) or the bending energy
``mean sum_ijk (d^2 u_i / dx_j dx_k)^2`` (mm^-2) of the deformable part's displacement u, in mm on
the level's grid (:mod:`atlasreg.losses.regularisers`), so lam means the same at every resolution.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from atlasreg.losses.regularisers import bending_energy, diffusion_regulariser, folding_penalty
from atlasreg.spatial.grid import Grid
from atlasreg.spatial.transforms import (
    AffineTransform, BSplineTransform, Composite, DisplacementField, StationaryVelocityField, Transform,
    resize_field, sample,
)

MODELS = ("affine", "dense", "bspline", "svf")
REGULARISERS = {"diffusion": diffusion_regulariser, "bending": bending_energy}
OPTIMISERS = ("adam", "lbfgs")

Similarity = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def per_level(iterations: int | Sequence[int], levels: Sequence[int]) -> tuple:
    """`iterations` (one int for every level, or one per level) as a tuple of one value per level."""
    return (iterations,) * len(levels) if isinstance(iterations, (int, np.integer)) else tuple(iterations)


def optimise(fixed: torch.Tensor, fixed_grid: Grid, moving: torch.Tensor, moving_grid: Grid, *,
             similarity: Similarity, model: str = "svf", regulariser: str | None = "diffusion",
             lam: float = 0.0, levels: Sequence[int] = (4, 2, 1), iterations: int | Sequence[int] = 100,
             lr: float | None = None, optimiser: str = "adam", initial: Transform | None = None,
             fixed_mask: torch.Tensor | None = None, moving_mask: torch.Tensor | None = None,
             control_spacing: float | Sequence[float] | None = None,
             svf_steps: int = 6, svf_factor: int = 1, fold_weight: float = 0.0,
             tolerance: float = 0.0, window: int = 10) -> tuple[Transform, list[dict]]:
    """Optimise a transform T (fixed world points -> moving world points) so that ``moving o T``
    matches ``fixed``; N pairs at once.

    fixed: (N or 1, C, *fixed_grid.size); moving: (N or 1, C', *moving_grid.size), any grids of the
    same dimension (2D or 3D; world units, mm). similarity: any callable ``(warped, fixed, mask) ->
    scalar`` (warped (N, C', *level size) on the fixed level grid, fixed (N, C, *level size), mask
    (N, 1, *level size) in [0, 1] or None), lower is better; it should average over the batch (as a
    mean over all voxels does): the objective is then multiplied by N, so that each pair's gradient is
    the one it has alone and Adam (elementwise) optimises each pair as if alone.
    model: 'affine', 'dense', 'bspline' or 'svf' (module docstring). regulariser: 'diffusion',
    'bending' or None, weighted by `lam` >= 0 (world units; see the module docstring); not for the
    'affine' model. levels: downsampling factors of the pyramid, coarse to fine, e.g. (4, 2, 1): at
    factor f both images are averaged (area interpolation) onto grids of ``n // f`` voxels per axis
    over the same field of view (:meth:`Grid.downsample`), and dense and SVF parameters, fields in mm,
    are linearly upsampled to the next level (:func:`resize_field`); affine and B-spline parameters
    carry over unchanged. iterations: per level (or one int for all). optimiser: 'adam' (Kingma 2015;
    `lr` is its step in mm, the same at every level: about the largest change of a displacement, or
    of the affine map at the edge of the fixed field of view, per iteration; default a quarter of the
    finest level's mean voxel spacing) or 'lbfgs' (PyTorch's L-BFGS with a strong-Wolfe line search,
    one iteration per step; `lr` its step multiplier, default 1; a batch is then one joint problem).
    initial: a Transform of batch N or 1 from fixed to moving world points, held constant (no
    gradient reaches its own parameters, e.g. a network's weights); the result is
    ``initial o D`` (an affine result merges with an affine initial into one
    :class:`AffineTransform`). fixed_mask: (N or 1, 1, *fixed_grid.size) weights in [0, 1] on the
    fixed grid; moving_mask: (N or 1, 1, *moving_grid.size) on the moving grid, warped with T (zero
    outside its field of view; linear interpolation, not differentiated: it selects voxels, the
    optimiser does not move it); the mask given to `similarity` is their product, or None without
    masks. control_spacing: the B-spline's knot spacing in mm (one value, or one per axis in ITK order
    x, y[, z]); default 4 voxels of the fixed grid. svf_steps: squarings of the SVF. svf_factor: the
    SVF's velocity is never finer than the finest level's grid downsampled by this factor (integer
    >= 1): at level f it lives and is integrated on the fixed grid downsampled by max(f, svf_factor x
    levels[-1]), and its displacement is linearly upsampled to the level's grid before warping
    (VoxelMorph's ``int_downsize``; Atlas-ISTN integrates at half resolution too). 2 costs a quarter
    (2D) or an eighth (3D) of the finest level's squarings and smooths the field. fold_weight: weight
    of :func:`~atlasreg.losses.regularisers.folding_penalty` on the level's deformation (0: none; not
    for 'affine'), which lets a weaker `lam` fit more without folding.

    Returns (T, history): T a world-space Transform of batch N (:class:`AffineTransform`,
    :class:`DisplacementField` on the finest level's grid, :class:`BSplineTransform`, or
    :class:`StationaryVelocityField`; a :class:`Composite` with `initial` or, for an SVF on a fixed
    grid with a non-identity direction, conjugated by the grid's frame), detached; history: one dict
    per iteration, ``{'level': factor, 'iteration': i, 'loss': objective, 'similarity': ...,
    'regulariser': R (unweighted)}``, values as floats, the objective before that iteration's step.
    Raises ValueError for an unknown model, regulariser or optimiser, levels or iterations that are
    not positive integers of matching length, lam < 0, lr <= 0, images, masks or an initial transform
    that do not match their grids, dimension or batch, or a similarity that does not return a scalar.
    """
    n, ndim = _check_inputs(fixed, fixed_grid, moving, moving_grid, fixed_mask, moving_mask, initial)
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if regulariser is not None and regulariser not in REGULARISERS:
        raise ValueError(f"regulariser must be one of {tuple(REGULARISERS)} or None, got {regulariser!r}")
    if not callable(similarity):
        raise ValueError("similarity must be a callable (warped, fixed, mask) -> scalar")
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if model == "affine" and lam > 0 and regulariser is not None:
        raise ValueError("the regulariser acts on deformable models; use lam=0 for model='affine'")
    levels = tuple(levels)
    if not levels or not all(isinstance(f, (int, np.integer)) and f >= 1 for f in levels):
        raise ValueError(f"levels must be positive integers (downsampling factors), got {levels!r}")
    iterations = per_level(iterations, levels)
    if len(iterations) != len(levels) or not all(isinstance(k, (int, np.integer)) and k >= 0 for k in iterations):
        raise ValueError(f"iterations must be an integer >= 0 or one per level {levels}, got {iterations!r}")
    if optimiser not in OPTIMISERS:
        raise ValueError(f"optimiser must be one of {OPTIMISERS}, got {optimiser!r}")
    finest = fixed_grid.downsample(levels[-1])
    if lr is None:
        lr = 1.0 if optimiser == "lbfgs" else 0.25 * float(np.mean(finest.spacing))
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if svf_steps < 0:
        raise ValueError(f"svf_steps must be >= 0, got {svf_steps}")
    if not (math.isfinite(tolerance) and tolerance >= 0) or int(window) < 1:
        raise ValueError(f"tolerance must be >= 0 and window >= 1, got {tolerance!r} and {window!r}")
    if not (isinstance(svf_factor, (int, np.integer)) and svf_factor >= 1):
        raise ValueError(f"svf_factor must be an integer >= 1, got {svf_factor!r}")

    like = fixed if fixed.is_floating_point() else moving
    device, dtype = like.device, like.dtype if like.is_floating_point() else torch.float32
    if initial is not None and initial.batch_size != n:
        initial = initial[[0] * n]
    params = _PARAMETRISATIONS[model](n, fixed_grid, device, dtype, control_spacing=control_spacing,
                                      steps=svf_steps, factor=int(svf_factor), finest=int(levels[-1]))
    reg = REGULARISERS[regulariser] if regulariser is not None and lam > 0 else None
    if not float(fold_weight) >= 0 or (model == "affine" and fold_weight > 0):
        raise ValueError(f"fold_weight must be >= 0, and 0 for model='affine'; got {fold_weight}")
    frame = None if fixed_grid.is_centred else tuple(
        torch.as_tensor(a, device=device, dtype=dtype) for a in fixed_grid.frame())

    history: list[dict] = []
    for factor, steps in zip(levels, iterations):
        grid = fixed_grid.downsample(factor)              # the level's grid in world space
        grid_c = Grid.centred(grid.size, grid.spacing)    # the same in the fixed grid's frame
        mgrid, fixed_l, moving_l, fmask_l, mmask_l = _level_images(fixed, moving, fixed_mask, moving_mask, grid,
                                                                   moving_grid, factor, n, dtype)
        x_c = grid_c.points(device, dtype)
        params.to_level(grid_c, int(factor))

        def objective():
            deform = params.transform(grid_c)
            pts = deform.on_grid(grid_c)                                    # D(x), frame coordinates
            world = pts if frame is None else pts @ frame[0].T + frame[1]
            if initial is not None:
                world = initial.points(world)
            warped, mask = _warp(moving_l, mgrid, world, fmask_l, mmask_l)
            sim = similarity(warped, fixed_l, mask)
            if not isinstance(sim, torch.Tensor) or sim.dim() != 0:
                raise ValueError(f"similarity must return a scalar tensor, got "
                                 f"{tuple(sim.shape) if isinstance(sim, torch.Tensor) else type(sim).__name__}")
            r = reg((pts - x_c).movedim(-1, 1), grid_c.spacing) if reg is not None else sim.new_zeros(())
            loss = sim + lam * r
            if fold_weight > 0:
                loss = loss + fold_weight * folding_penalty(pts, grid_c)
            return loss, sim, r

        if steps == 0:
            continue
        if optimiser == "adam":
            opt = Adam(params.parameters(), lr)
        else:
            opt = torch.optim.LBFGS(params.parameters(), lr=lr, max_iter=1, line_search_fn="strong_wolfe")
        for i in range(steps):
            if tolerance > 0 and i >= 2 * window:
                # the mean objective of the last window against the window before it (a restarted Adam's
                # first steps may overshoot; a trend is what counts)
                before = sum(h["loss"] for h in history[-2 * window:-window]) / window
                if before - sum(h["loss"] for h in history[-window:]) / window < tolerance * abs(before):
                    break
            record = {}

            def closure():
                loss, sim, r = objective()
                # Gradients of the parameters only: an initial transform computed by a network keeps
                # its own graph and its weights get no .grad.
                grads = torch.autograd.grad(loss * n, params.parameters())
                for p, g in zip(params.parameters(), grads):
                    p.grad = g.contiguous()
                if not record:
                    record.update(level=int(factor), iteration=i, loss=float(loss.detach()),
                                  similarity=float(sim.detach()), regulariser=float(r.detach()))
                return loss

            if optimiser == "adam":
                closure()
                opt.step()
            else:
                opt.step(closure)
            history.append(record)

    with torch.no_grad():
        result = params.world(fixed_grid, finest)
    if initial is None:
        return result, history
    if isinstance(result, AffineTransform) and isinstance(initial, AffineTransform):
        return initial.compose(result), history
    return Composite((result, initial)), history


def similarity_at(fixed: torch.Tensor, fixed_grid: Grid, moving: torch.Tensor, moving_grid: Grid,
                  transform: Transform, similarity: Similarity, factor: int = 1,
                  fixed_mask: torch.Tensor | None = None, moving_mask: torch.Tensor | None = None) -> float:
    """The similarity of ``moving o transform`` and `fixed` on the pyramid level of downsampling
    `factor`, with the images and masks prepared as :func:`optimise` prepares that level (same shapes
    and conventions; `transform` maps fixed world points to moving world points). No gradient. Returns
    the similarity's value as a float (lower is better). Raises ValueError as optimise does for
    mismatched inputs."""
    n, _ = _check_inputs(fixed, fixed_grid, moving, moving_grid, fixed_mask, moving_mask, transform)
    like = fixed if fixed.is_floating_point() else moving
    dtype = like.dtype if like.is_floating_point() else torch.float32
    grid = fixed_grid.downsample(factor)
    mgrid, fixed_l, moving_l, fmask_l, mmask_l = _level_images(fixed, moving, fixed_mask, moving_mask, grid,
                                                               moving_grid, factor, n, dtype)
    with torch.no_grad():
        world = transform.points(grid.points(like.device, dtype).expand(n, *grid.size, grid.ndim))
        warped, mask = _warp(moving_l, mgrid, world, fmask_l, mmask_l)
        return float(similarity(warped, fixed_l, mask))


def _level_images(fixed, moving, fixed_mask, moving_mask, grid: Grid, moving_grid: Grid, factor: int, n: int,
                  dtype) -> tuple:
    """A pyramid level's moving grid and its images and masks (batch n): area-averaged onto the fixed
    level `grid` and onto the moving grid downsampled by `factor`."""
    mgrid = moving_grid.downsample(factor)
    fixed_l = _expand(_area(fixed.to(dtype), grid.size), n)
    moving_l = _expand(_area(moving.to(dtype), mgrid.size), n)
    fmask_l = None if fixed_mask is None else _expand(_area(fixed_mask.to(dtype), grid.size), n)
    mmask_l = None if moving_mask is None else _expand(_area(moving_mask.to(dtype), mgrid.size), n)
    return mgrid, fixed_l, moving_l, fmask_l, mmask_l


def _warp(moving_l, mgrid: Grid, world: torch.Tensor, fmask_l, mmask_l) -> tuple:
    """The level's moving image sampled at the world points (on the fixed level grid) and the mask the
    similarity gets: the fixed mask times the warped moving mask (which selects voxels and is not
    differentiated), or None without masks."""
    warped = sample(moving_l, world, mgrid)
    mask = fmask_l
    if mmask_l is not None:
        warped_mask = sample(mmask_l, world.detach(), mgrid, padding="zeros")
        mask = warped_mask if mask is None else mask * warped_mask
    return warped, mask


# ---------------------------------------------------------------- optimiser

class Adam:
    """Adam (Kingma and Ba 2015) with torch.optim.Adam's defaults (betas 0.9, 0.999, eps 1e-8, no weight
    decay) and the same update, for the few parameter tensors of one registration.

    Why not torch.optim.Adam: its first construction in a process imports torch._dynamo (1.4 s on the
    2-core CPU; PyTorch 2.13 wraps ``Optimizer.__init__`` in a dynamo guard), more than a whole 2D
    registration takes; tests/test_instance.py checks that both give the same parameters.
    params: tensors that require gradients; lr > 0 (the step, in the parameters' units)."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, self.betas, self.eps = float(lr), betas, float(eps)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        """One update from the parameters' .grad (parameters without a gradient are skipped)."""
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-self.lr / c1)


# ---------------------------------------------------------------- inputs

def _check_inputs(fixed, fixed_grid, moving, moving_grid, fixed_mask, moving_mask, initial) -> tuple[int, int]:
    ndim = fixed_grid.ndim
    if moving_grid.ndim != ndim:
        raise ValueError(f"the fixed grid is {ndim}D and the moving grid {moving_grid.ndim}D")
    for name, image, grid in (("fixed", fixed, fixed_grid), ("moving", moving, moving_grid),
                              ("fixed_mask", fixed_mask, fixed_grid), ("moving_mask", moving_mask, moving_grid)):
        if image is None:
            continue
        if not isinstance(image, torch.Tensor) or image.dim() != ndim + 2 or tuple(image.shape[2:]) != grid.size:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"{name} must be (N, C, *{grid.size}) on its grid, got {shape}")
        if name.endswith("mask") and image.shape[1] != 1:
            raise ValueError(f"{name} must have one channel, got {image.shape[1]}")
    sizes = {t.shape[0] for t in (fixed, moving, fixed_mask, moving_mask) if t is not None}
    if initial is not None:
        if not isinstance(initial, Transform) or initial.ndim != ndim:
            raise ValueError(f"initial must be a {ndim}D Transform, got {initial!r}")
        sizes.add(initial.batch_size)
    n = max(sizes)
    if not sizes <= {1, n}:
        raise ValueError(f"batch sizes of images, masks and initial transform must be N or 1, got {sorted(sizes)}")
    return n, ndim


def _area(image: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Average of `image` over the voxels of a coarser grid over the same field of view (area
    interpolation = adaptive average pooling); unchanged at the same size."""
    if tuple(image.shape[2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode="area")


def _expand(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if t.shape[0] == n else t.expand(n, *t.shape[1:])


def _rotate_components(u: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Vector components (N, D, *spatial) along the frame's axes -> along the world axes."""
    return torch.einsum("ij,nj...->ni...", R, u)


# ---------------------------------------------------------------- transform models
# Each model keeps its parameters in the fixed grid's frame (grid-centred coordinates: centre at 0,
# axes the grid's), where rotations act about the image centre and an SVF is integrated along the
# grid axes; `world` gives the same map in world coordinates.

class _Parametrisation:
    def __init__(self, n, fixed_grid, device, dtype, **options):
        self.n, self.ndim, self.device, self.dtype = n, fixed_grid.ndim, device, dtype

    def parameters(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def to_level(self, grid_c: Grid, factor: int = 1) -> None:
        """Bring the parameters to the level's grid (frame coordinates; `factor` its downsampling)."""

    def transform(self, grid_c: Grid) -> Transform:
        """The deformable part D in frame coordinates."""
        raise NotImplementedError

    def world(self, fixed_grid: Grid, grid: Grid) -> Transform:
        """D in world coordinates (`grid`: the finest level's grid in world space)."""
        raise NotImplementedError


class _Affine(_Parametrisation):
    """A = I + M / r, t: r the fixed field of view's mean half extent (mm), so that Adam's step on M
    moves the edge of the field of view by about as much as its step on t moves every point."""

    def __init__(self, n, fixed_grid, device, dtype, **options):
        super().__init__(n, fixed_grid, device, dtype)
        self.radius = float(np.mean(fixed_grid.half_extent))
        self.m = torch.zeros(n, self.ndim, self.ndim, device=device, dtype=dtype, requires_grad=True)
        self.t = torch.zeros(n, self.ndim, device=device, dtype=dtype, requires_grad=True)

    def parameters(self):
        return [self.m, self.t]

    def transform(self, grid_c):
        eye = torch.eye(self.ndim, device=self.device, dtype=self.dtype)
        return AffineTransform(eye + self.m / self.radius, self.t)

    def world(self, fixed_grid, grid):
        inner = self.transform(grid)
        inner = AffineTransform(inner.matrix.detach(), inner.translation.detach())
        if fixed_grid.is_centred:
            return inner
        frame = AffineTransform.grid_frame(fixed_grid, self.dtype)
        frame = AffineTransform(frame.matrix.to(self.device), frame.translation.to(self.device))
        return frame.compose(inner).compose(frame.inverse())


class _Dense(_Parametrisation):
    """u (N, D, *level size) mm on the level's grid; linearly upsampled between levels."""

    def __init__(self, n, fixed_grid, device, dtype, **options):
        super().__init__(n, fixed_grid, device, dtype)
        self.u = None

    def parameters(self):
        return [self.u]

    def to_level(self, grid_c, factor=1):
        if self.u is None:
            u = torch.zeros(self.n, self.ndim, *grid_c.size, device=self.device, dtype=self.dtype)
        else:
            u = resize_field(self.u.detach(), grid_c.size)
        self.u = u.requires_grad_(True)

    def transform(self, grid_c):
        return DisplacementField(self.u, grid_c)

    def world(self, fixed_grid, grid):
        R = torch.as_tensor(fixed_grid.direction_matrix, device=self.device, dtype=self.dtype)
        return DisplacementField(_rotate_components(self.u.detach(), R), grid)


class _SVF(_Dense):
    """v (N, D, *SVF size) mm on the fixed grid downsampled by max(level factor, finest level factor x
    `factor`) (the level's own grid where that is the level's factor), integrated there by scaling and
    squaring and linearly upsampled to the level's grid."""

    def __init__(self, n, fixed_grid, device, dtype, steps=6, factor=1, finest=1, **options):
        super().__init__(n, fixed_grid, device, dtype)
        self.steps, self.fixed_grid = steps, fixed_grid
        self.min_factor = finest * factor   # the SVF's grid is never finer than the fixed grid / this
        self.svf_factor, self.svf_c = None, None

    def to_level(self, grid_c, factor=1):
        self.svf_factor = max(factor, self.min_factor)
        g = self.fixed_grid.downsample(self.svf_factor)
        self.svf_c = Grid.centred(g.size, g.spacing)
        super().to_level(self.svf_c)

    def transform(self, grid_c):
        return StationaryVelocityField(self.u, self.svf_c, self.steps, None if self.svf_c == grid_c else grid_c)

    def world(self, fixed_grid, grid):
        v = self.u.detach()
        svf = fixed_grid.downsample(self.svf_factor)
        out = None if svf.size == grid.size else grid
        if np.array_equal(fixed_grid.direction_matrix, np.eye(self.ndim)):
            # exp(v) commutes with a translation of its grid: the same map on the world grid.
            return StationaryVelocityField(v, svf, self.steps, out)
        frame = AffineTransform.grid_frame(fixed_grid, self.dtype)  # batch N, so the result slices by case
        frame = AffineTransform(frame.matrix.to(self.device).expand(self.n, -1, -1).clone(),
                                frame.translation.to(self.device).expand(self.n, -1).clone())
        inner = StationaryVelocityField(v, Grid.centred(svf.size, svf.spacing), self.steps,
                                        None if out is None else Grid.centred(grid.size, grid.spacing))
        return Composite((frame.inverse(), inner, frame))


class _BSpline(_Parametrisation):
    """Coefficients (N, D, *control size) mm on control points `control_spacing` mm apart, the same at
    every level; the control grid covers the fixed field of view with one knot beyond it on each side,
    so every fixed voxel has its full 4^D support."""

    def __init__(self, n, fixed_grid, device, dtype, control_spacing=None, **options):
        super().__init__(n, fixed_grid, device, dtype)
        if control_spacing is None:
            spacing = tuple(4.0 * s for s in fixed_grid.spacing)
        else:
            spacing = (tuple(float(s) for s in np.ravel(control_spacing)) if np.ndim(control_spacing)
                       else (float(control_spacing),) * self.ndim)
        if len(spacing) != self.ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"control_spacing must be one positive value or {self.ndim}, got {control_spacing!r}")
        extent = [n_ * s for n_, s in zip(fixed_grid.size_xyz, fixed_grid.spacing)]
        size_xyz = [math.ceil(e / s - 1e-9) + 3 for e, s in zip(extent, spacing)]
        self.control_c = Grid.centred(tuple(reversed(size_xyz)), spacing)
        self.coefficients = torch.zeros(n, self.ndim, *self.control_c.size, device=device, dtype=dtype,
                                        requires_grad=True)

    def parameters(self):
        return [self.coefficients]

    def transform(self, grid_c):
        return BSplineTransform(self.coefficients, self.control_c)

    def world(self, fixed_grid, grid):
        R = torch.as_tensor(fixed_grid.direction_matrix, device=self.device, dtype=self.dtype)
        control = fixed_grid.resampled(self.control_c.size, self.control_c.spacing)
        return BSplineTransform(_rotate_components(self.coefficients.detach(), R), control)


_PARAMETRISATIONS = {"affine": _Affine, "dense": _Dense, "bspline": _BSpline, "svf": _SVF}
